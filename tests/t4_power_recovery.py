"""Tier 4: power cuts aimed at the steps of failover and resync (issue 10, deliverable 8).

The site that the recovery step changes lives on powerfs (tests/powerfs.py): a cut keeps none
or a random part of what was not made durable, the daemon is killed, powerfs comes back with
what survived, and `repfs fsck` of the site must be clean (PowerSite.power_cut).

* Failover at a secondary on powerfs (its primary, a plain site, stays up and is fenced). The
  secondary's volume is slowed down so that delta sets are received but not yet played when
  the failover starts; the cut lands while the failover plays them, takes the restart-point
  snapshot or promotes (aimed at the volume's writes, at meta.lmdb's syncs once the restart
  point's save volume is made, at that save volume, at meta.lmdb, or at a random moment). After it: the site mounts, `failover` run again
  completes; the new primary's tree is exactly the old primary's at the last delta-set
  boundary it had received (nothing received is lost, nothing else is there); the generation
  was raised once; a file fsync'd after the failover returned survives a later cut. The round
  then resyncs the old primary and switches back over, for the next round.
* Resync of an old primary on powerfs. Each round: the old primary cuts and ships a delta
  set, writes more (never cut: the writes the failover loses), its secondary (a plain site)
  fails over and fences it, writes; `resync --peer OLD` runs at the new primary while the
  old one's power is cut, aimed at its meta.lmdb (the divergence snapshot's record, the
  attach), at the divergence snapshot's save volume, at the copy and its playback (the
  volume and the incoming area), or at a random moment. After it: fsck clean; if snapshot
  divergence-GEN was taken it reads exactly the old primary's divergent state (core API);
  resync run again completes, and the old primary equals the new one (contents, metadata,
  inode numbers). The round ends with a switchover back, for the next round; at the end every
  divergence snapshot still reads its state.
* Resync by a new primary on powerfs (the old primary a plain site): the same rounds, the
  cut at the new primary as the old one attaches (once divergence-GEN shows there), at its
  meta.lmdb (the destination `resync-attach`, the intermediate point's cut and snapshot, the
  block list), at the intermediate point's save volume, or at a random moment. After it:
  fsck clean, every change fsync'd on the new primary is there, resync run again completes
  and the trees are equal.

Where each cut landed is read from the dead site's disk (the failover record's step, the
restart or divergence snapshot, the role, the new primary's destination record) and printed;
each test requires at least one cut in the middle of its procedure.

REPFS_POWER_ROUNDS multiplies the rounds (the suite: 2 failover cuts, 3 at the old primary
and 2 at the new one during resync; N: every phase N times); `SOAK=recovery tools/soak 0 N`.
REPFS_POWER_SEED varies the random choices.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from tests.conftest import fsck_clean, run_repfs
from tests.t2_failover import fill, wait_for, write
from tests.t2_repl import (NO_AUTO_CUT, admin, admin_json, api, assert_same_tree, cut,
                           log_lines, start_replication, tree, tree_diff, wait_converged)
from tests.t4_power import Request, _wait_unmounted, power_site  # noqa: F401 (a fixture)
from tests.t4_repl_crash import _meta
from tests.t4_snap_crash import hash_tree

ROUNDS = int(os.environ.get("REPFS_POWER_ROUNDS", "1"))
SEED = int(os.environ.get("REPFS_POWER_SEED", "0"))
SIZE = "64M"
KEEP = ("none", "random")

# (name, path glob, ops, skip range) of a cut at the secondary while it fails over; None: a
# cut at a random moment
PROMOTE = "as it promotes"
FAILOVER_PHASES = [
    ("play", "site/volume.img", "write|fsync", 6),
    (PROMOTE, None, None, 0),  # (meta.lmdb's syncs once restart-GEN's save volume is made)
    ("restart point", "site/save/*.save|site/save", "create|fsyncdir", 1),
    ("meta.lmdb (played, restart point, promote)", "site/meta.lmdb/*", "write|fsync", 12),
    ("random moment", None, None, 0),
]
SUITE_FAILOVER = 2  # phases the suite runs (x ROUNDS: all of them, in turn)

RESYNC_PHASES = [
    ("meta.lmdb (divergence snapshot, attach)", "site/meta.lmdb/*", "write|fsync", 6),
    ("copy and playback", "site/save/incoming/*|site/volume.img", "write|fsync", 12),
    ("divergence snapshot's save volume", "site/save/*.save|site/save", "create|fsyncdir", 1),
    ("random moment", None, None, 0),
]
SUITE_RESYNC = 3


def _on_disk(site: Path) -> dict:
    """A stopped site's recovery state: role, generation, the failover record's step,
    fenced, the snapshots."""
    from repfs.repl import keys as RK
    from repfs.snap import keys as SK
    env = _meta(site)
    try:
        with env.begin() as txn:
            ctx = env.open_db(RK.CTX, txn=txn, create=False)
            role = txn.get(b"role", db=ctx)
            gen = txn.get(b"generation", db=ctx)
            fo = txn.get(b"failover", db=ctx)
            fenced = txn.get(b"fenced", db=ctx)
            names = [n.decode() for n, _ in txn.cursor(
                db=env.open_db(SK.NAMES, txn=txn, create=False))]
    finally:
        env.close()
    return {"role": role.decode() if role else None,
            "generation": RK.from_u64(gen) if gen else None,
            "failover_step": json.loads(fo).get("step") if fo else None,
            "fenced": fenced is not None,
            "snapshots": sorted(n for n in names if not n.startswith("repl-"))}


def _snapshot_tree(site: Path, name: str) -> dict[str, str]:
    """Snapshot `name` of a stopped site, read through the core API: path -> content hash
    (as t4_snap_crash.hash_tree reads a mount)."""
    from repfs.fs.core import FileSystem
    from repfs.site import Site
    from repfs.snap.layer import SnapLayer, SnapshotDevice
    from tests.t4_snap_crash import core_hash_tree
    fs = Site(site).open_fs()
    try:
        layer = fs.dev
        while not isinstance(layer, SnapLayer):
            layer = layer.lower
        snap = next(s for s in layer.store.queue if s.name == name)
        out = core_hash_tree(FileSystem(SnapshotDevice(layer, snap), None, readonly=True))
        fs.checkpoint()
    finally:
        fs.close()
        fs.dev.close()
    return {k: v for k, v in out.items()}


def _status(m) -> dict:
    return api(m.site, "GET", "/status")


def _dest(m, name: str) -> dict | None:
    return next((d for d in _status(m)["destinations"] if d["name"] == name), None)


def _arm_or_wait(victim, phase, rng) -> dict | None:
    """Wait for the phase's armed cut at `victim` (or a random moment) and cut the power
    there if it has not gone yet. Returns the aimed cut's result, None if it was timed."""
    name, path, ops, skip = phase
    got = None
    if path is not None:
        got = victim.pf.wait_frozen(30)
    else:
        time.sleep(rng.uniform(0.0, 1.5))
    if not victim.pf.stats()["frozen"]:
        victim.pf.freeze(rng.choice(KEEP), rng.randrange(1 << 30))
    return got


def _resync(new, old, timeout: float = 120) -> None:
    """`resync --peer OLD` at `new` (again), until the old primary has played the copy and
    shows the new primary's tree."""
    r = admin(new.path, "resync", "--peer", str(old.site), check=False, timeout=300)
    assert r.returncode == 0, f"resync: {r.stdout}{r.stderr}"
    name = old.site.name
    d = wait_for(lambda: (x := _dest(new, name)) and x["state"] == "replicating" and x,
                 "the resync to finish", timeout=timeout, sites=[new.site, old.site])
    wait_for(lambda: _status(old)["last_played_delta_set"] >= d["acked_delta_set"],
             "the old primary to play the resync", timeout=timeout, sites=[old.site])
    assert_same_tree(new.path, old.path)


def _switch(frm, to) -> None:
    """switchover at `frm` to its destination `to`; `to` is then the primary."""
    r = admin(frm.path, "switchover", "--to", to.site.name, check=False, timeout=300)
    assert r.returncode == 0 and "is the primary now" in r.stdout, f"{r.stdout}{r.stderr}"
    admin(to.path, "replicate", "policy", *NO_AUTO_CUT)


# ----------------------------------------------------------------------------- failover


def test_power_cuts_during_failover(power_site, mount_site):
    rng = random.Random(10401 + SEED)
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    p = mount_site(SIZE, name="prim")
    p.expect_log("fenced")  # (each failover fences it; a resync attaches it again)
    s = power_site("sec")
    s.create(SIZE)
    s.mount()
    admin(p.path, "replicate", "policy", *NO_AUTO_CUT)
    fill(p.path, "base", n=3, size=200_000)
    start_replication(p, s)
    wait_converged(p, s, cut(p))
    plan = _plan(FAILOVER_PHASES, SUITE_FAILOVER)
    where: dict[str, int] = {}
    for rnd, phase in enumerate(plan):
        # p primary, s its secondary, played up to p's last cut
        st = _status(s)
        gen = st["generation"]
        boundaries = {st["last_played_delta_set"]: tree(p.path)}
        played_before = st["last_played_delta_set"]
        s.pf.add_fault("site/volume.img", "write", count=None, delay=0.15)  # (a pile)
        for k in range(3):
            fill(p.path, f"r{rnd}-{k}", n=3, size=300_000)
            with open(p.path / "base-1", "r+b") as f:  # (blocks of the last boundary too)
                f.seek(rng.randrange(0, 200_000, 4096))
                f.write(os.urandom(8192))
                f.flush()
                os.fsync(f.fileno())
            boundaries[cut(p)] = tree(p.path)
        last = max(boundaries)
        wait_for(lambda: _status(s)["last_received_delta_set"] >= last,
                 f"delta set {last} received", timeout=60, sites=[s.site])
        played_before = max(played_before, _status(s)["last_played_delta_set"])
        name, path, ops, skip = phase
        req = Request(s.site, "POST", "/failover", {})
        # (armed once the failover has begun: before, the volume's writes are the
        # background playback's; if it is done already, a timed cut follows)
        def begun():
            fo = _status(s).get("last_failover") or {}
            return fo.get("generation") == gen + 1 and fo.get("state")
        wait_for(begun, "the failover to begin", timeout=60, sites=[s.site])
        if path is not None:
            s.pf.arm_cut(path, ops, skip=rng.randrange(skip), keep=rng.choice(KEEP),
                         seed=rng.randrange(1 << 30))
        if name == PROMOTE:  # the restart point's save volume made: then its record's
            # commit, then the promotion's (the cut before the 2nd or 3rd sync of meta.lmdb)
            seen = s.pf.add_fault("site/save/*.save", "create", count=0)
            deadline = time.monotonic() + 60
            while not s.pf.stats()["seen"].get(str(seen)):
                assert time.monotonic() < deadline, "no restart point was taken"
                time.sleep(0.001)
            s.pf.arm_cut("site/meta.lmdb/*", "fsync", skip=rng.randrange(1, 3),
                         keep=rng.choice(KEEP), seed=rng.randrange(1 << 30))
        got = _arm_or_wait(s, phase, rng) if name != PROMOTE else s.pf.wait_frozen(30)
        if not s.pf.stats()["frozen"]:
            s.pf.freeze(rng.choice(KEEP), rng.randrange(1 << 30))
        out = s.power_cut()
        req.join(30)
        dead = _on_disk(s.site)
        step = ("before it began" if dead["failover_step"] is None
                else dead["failover_step"] + (" (restart point taken)" if
                                              f"restart-{gen + 1}" in dead["snapshots"] else ""))
        where[step] = where.get(step, 0) + 1
        print(f"round {rnd}: {name}: {'aimed' if got else 'timed'} cut {out}; on disk "
              f"{dead}; played before {played_before}, received {last}", flush=True)
        s.mount()
        # failover again: it completes, from the step it had reached
        ans = admin_json(s.path, "failover", timeout=300)
        assert ans["role"] == "primary" and ans["generation"] == gen + 1, ans
        st = _status(s)
        assert (st["role"], st["generation"], st["readonly"]) == ("primary", gen + 1, False), st
        n = ans["restart_delta_set"]
        assert n == last, (f"{name}: the restart point is delta set {n}, but {last} had been "
                           f"received (played before the failover: {played_before})")
        got_tree = tree(s.path)
        assert got_tree == boundaries[n], (f"{name}: the new primary is not the old one at "
                                           f"delta set {n}: " + "; ".join(
                                               tree_diff(boundaries[n], got_tree)))
        snaps = [x["name"] for x in api(s.site, "GET", "/snapshots")]
        assert f"restart-{gen + 1}" in snaps and f"restart-{gen + 2}" not in snaps, snaps
        # a write acknowledged by fsync after the failover survives a later cut
        data = os.urandom(150_000)
        write(s.path / f"after-{rnd}", data)
        s.power_cut(rng.choice(KEEP), rng.randrange(1 << 30))
        s.mount()
        assert (s.path / f"after-{rnd}").read_bytes() == data
        st = _status(s)
        assert (st["role"], st["generation"]) == ("primary", gen + 1), st
        if rnd + 1 < len(plan):  # the old primary back as the primary, for the next round
            _resync(s, p)
            _switch(s, p)
            wait_converged(p, s, cut(p))
    print(f"where the cuts landed: {where}")
    assert any(k.startswith(("begun", "played")) for k in where), (
        f"no cut landed in the middle of a failover: {where}")
    s.finish()
    s.pid = None


# ----------------------------------------------------------------------------- resync


def _dest_on_disk(site: Path, name: str) -> str | None:
    """The state of destination `name` in a stopped primary's table (None: none)."""
    from repfs.repl import keys as RK
    env = _meta(site)
    try:
        with env.begin() as txn:
            for _, raw in txn.cursor(db=env.open_db(RK.DESTS, txn=txn, create=False)):
                d = json.loads(raw)
                if d.get("name") == name:
                    return d.get("state")
    finally:
        env.close()
    return None


def _resync_rounds(old, new, victim, phases: list, rng: random.Random) -> tuple:
    """Rounds of: `old`, the primary of `new`, ships a delta set and writes more (never cut);
    `new` fails over (fencing `old`) and writes; `resync --peer OLD` at `new` while the power
    of `victim` (one of them, on powerfs) is cut; the checks; a switchover back. Returns (where the
    cuts landed: counts, the divergence snapshots made on `old` -> the state each keeps)."""
    divergent: dict[str, dict] = {}
    where: dict[str, int] = {}
    for rnd, phase in enumerate(phases):
        fill(old.path, f"r{rnd}-cut", n=2, size=200_000)
        wait_converged(old, new, cut(old))
        fill(old.path, f"r{rnd}-lost", n=2, size=200_000)  # lost by the failover
        with open(old.path / "base-2", "r+b") as f:
            f.seek(rng.randrange(0, 200_000, 4096))
            f.write(b"diverged on the old primary" * 200)
            f.flush()
            os.fsync(f.fileno())
        ans = admin_json(new.path, "failover", timeout=300)  # (fences the old primary)
        gen = ans["generation"]
        assert ans["fence"]["state"] == "fenced", ans
        fill(new.path, f"r{rnd}-new", n=2, size=200_000)
        with open(new.path / "base-0", "r+b") as f:
            f.write(os.urandom(12288))
            f.flush()
            os.fsync(f.fileno())
        wait_for(lambda: _status(old)["fenced"], "the old primary's fence", sites=[old.site])
        div_want = hash_tree(old.path)
        new_want = hash_tree(new.path)  # (every change on it was fsync'd)
        name, path, ops, skip = phase
        if path is not None:
            victim.pf.arm_cut(path, ops, skip=rng.randrange(skip), keep=rng.choice(KEEP),
                              seed=rng.randrange(1 << 30))
        if name == "copy and playback":  # (the copy lasts: the cut lands inside it)
            victim.pf.add_fault("site/volume.img|site/save/incoming/*", "write", count=None,
                                delay=0.03)
        req = Request(new.site, "POST", "/resync", {"peer": str(old.site)})
        snap = f"divergence-{gen}"
        if name == ATTACH:  # (the old primary takes its divergence snapshot, then attaches)
            wait_for(lambda: snap in [x["name"] for x in api(old.site, "GET", "/snapshots")],
                     f"{snap} on the old primary", timeout=60, sites=[old.site])
            victim.pf.freeze(rng.choice(KEEP), rng.randrange(1 << 30))
        got = None if name == ATTACH else _arm_or_wait(victim, phase, rng)
        out = victim.power_cut()
        req.join(60)
        dead = _on_disk(victim.site)
        if victim is old:
            step = ("attached" if dead["role"] == "secondary" else "divergence snapshot "
                    "taken" if snap in dead["snapshots"] else "before attach")
        else:
            step = f"destination {_dest_on_disk(new.site, old.site.name)}"
            if step == "destination resync-attach" and _status(old)["role"] == "secondary":
                step += " (the old primary attached)"
        where[step] = where.get(step, 0) + 1
        print(f"round {rnd}: {name}: {'aimed' if got else 'timed'} cut {out}; resync answer "
              f"{req.status} {req.reply}; on disk {dead}: {step}", flush=True)
        if victim is old and snap in dead["snapshots"]:
            kept = _snapshot_tree(old.site, snap)
            assert kept == div_want, (f"{name}: {snap} does not hold the old primary's "
                                      f"divergent state: "
                                      f"{sorted(set(kept.items()) ^ set(div_want.items()))[:6]}")
        victim.mount()
        if victim is new:
            assert hash_tree(new.path) == new_want, f"{name}: the new primary lost fsync'd data"
        _resync(new, old)
        snaps = [x["name"] for x in api(old.site, "GET", "/snapshots")]
        assert snap in snaps, snaps
        divergent[snap] = div_want
        _switch(new, old)
        wait_converged(old, new, cut(old))
    print(f"where the cuts landed: {where}")
    return where, divergent


def _plan(phases: list, suite: int) -> list:
    return [phases[i % len(phases)]
            for i in range(suite * ROUNDS if ROUNDS == 1 else len(phases) * ROUNDS)]


def _old_and_new(old, new) -> None:
    """`old` replicating to `new`, with a few files."""
    admin(old.path, "replicate", "policy", *NO_AUTO_CUT)
    fill(old.path, "base", n=3, size=200_000)
    start_replication(old, new)


def test_power_cuts_of_the_old_primary_during_resync(power_site, mount_site):
    rng = random.Random(10501 + SEED)
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    old = power_site("old")
    old.create(SIZE)
    old.mount()
    new = mount_site(SIZE, name="new")
    new.expect_log("fenced")  # (fenced by each switchover back)
    _old_and_new(old, new)
    where, divergent = _resync_rounds(old, new, old, _plan(RESYNC_PHASES, SUITE_RESYNC), rng)
    assert set(where) - {"before attach"}, f"no cut landed in the middle of a resync: {where}"
    # a clean end; every divergence snapshot still reads the state it kept
    run_repfs("umount", old.path)
    _wait_unmounted(old.path)
    old.pid = None
    fsck_clean(old.site)
    for snap, want in divergent.items():
        assert _snapshot_tree(old.site, snap) == want, f"{snap} changed"
    assert not [ln for ln in log_lines(old.site) if "Traceback" in ln]
    old.pf.stop()


# (new, at the new primary: the intermediate point - a cut and snapshot repl-init-PEER -,
# the union's block list and the destination's record, up to the attach)
ATTACH = "as the old primary attaches"
NEW_PRIMARY_PHASES = [
    (ATTACH, None, None, 0),  # (once divergence-GEN shows on the old primary)
    ("meta.lmdb (destination, intermediate point, block list)", "site/meta.lmdb/*",
     "write|fsync", 16),
    ("intermediate point's save volume", "site/save/*.save|site/save", "create|fsyncdir", 1),
    ("random moment", None, None, 0),
]
SUITE_NEW_PRIMARY = 2


def test_power_cuts_of_the_new_primary_during_resync(power_site, mount_site):
    rng = random.Random(10601 + SEED)
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    old = mount_site(SIZE, name="old")
    old.expect_log("fenced")  # (fenced by each failover)
    new = power_site("new")
    new.create(SIZE)
    new.mount()
    _old_and_new(old, new)
    where, _ = _resync_rounds(old, new, new, _plan(NEW_PRIMARY_PHASES, SUITE_NEW_PRIMARY),
                              rng)
    assert set(where) - {"destination None", "destination stopped"}, (
        f"no cut landed after the intermediate point was recorded: {where}")
    new.finish()
    new.pid = None
