"""Tier 4: a forwarder (docs/replication.md, "Forwarders") survives power cuts and kill -9.

Three sites on 127.0.0.1, each with `--listen`: a primary, a forwarder (a secondary with a
route for the group to a next hop) and its next hop. The forwarder's site directory lives on
powerfs (tests/powerfs.py), and so does the next hop's (its disk is slowed down at times, so
that the forwarder holds what it forwards for a while). A churn thread on the primary changes
files and cuts delta sets in a loop; the forwarder receives, plays each delta set (which
makes it ready in its own mailbox, pinned by snapshot repl-ds-N, in the transaction that
records it played) and sends it on.

The power cuts are aimed at the forwarder's phases: powerfs cuts right before the N-th write
or sync of its incoming area (receiving), of its volume (direct writes, playback), of its
pins' save volumes (a playback copying the blocks a held delta set still needs), of
meta.lmdb (the playback's records, the pin and the mailbox record), of its save area's
directory, at a random moment while it forwards to a slowed next hop, and as soon as status
shows a long playback (a 12 MiB file overwritten in place); each phase must be hit, and at
least one cut must land inside a playback (the fsck after it logs that it finished one,
which makes the delta set ready and pinned as the playback would have). After each cut: `repfs fsck` of the forwarder's site
is clean, it is mounted again on its port, the churn stops, the primary cuts once more, and
the forwarder and its next hop play that delta set; the three trees are equal (contents,
metadata, inode numbers) and the forwarder never told its next hop that it no longer holds a
delta set it asks for. At the end the forwarder holds nothing (`forwarding.held_delta_sets`
empty), no repl-ds-* pin or save volume is left over, the primary's `verify` finds the
forwarder's volume equal to its own, and the blocks in use in the forwarder's and the next
hop's volumes are byte for byte the same.

The kill -9 loop runs the same workload without powerfs and kills the forwarder's daemon at
random moments while the primary cuts, then (until one lands inside a playback) as soon as
status shows a long one; the same checks follow each kill and end the loop. It found that
a forwarder lost a delta set it had just played: a send task's prune deleted the pin that
receiver.play queues before its commit, as an orphan (deltaset.py, DeltaSets.prune).

REPFS_POWER_ROUNDS (x7 cuts) / REPFS_CRASH_ROUNDS (kills) scale the loops (`SOAK=forward
tools/soak ROUNDS POWER_ROUNDS` runs many), REPFS_POWER_SEED varies the random choices.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from repfs.rcp.groups import GroupStore
from tests.conftest import run_repfs
from tests.t2_rcp import GROUP, SECRET, address, port_of
from tests.t2_repl import NO_AUTO_CUT, Workload, admin, api, log_lines, tree, tree_diff
from tests.t4_power import PowerSite, _stable_tree, _wait_dead, _wait_unmounted
from tests.t4_repl_crash import _interrupted, _meta, kill9, post

ROUNDS = max(1, int(os.environ.get("REPFS_POWER_ROUNDS", "1")))  # (0: as 1)
KILL_ROUNDS = int(os.environ.get("REPFS_CRASH_ROUNDS", "2"))  # (the soak: many)
SEED = int(os.environ.get("REPFS_POWER_SEED", "0"))
# the kill -9 loop with the primary's bypass (docs/replication.md, "Forwarders"): it sends
# straight to the next hop after 1 s without the forwarder, which stays down 2-6 s while
# the primary goes on cutting (a soak option: each round takes longer)
BYPASS = os.environ.get("REPFS_FORWARD_BYPASS") == "1"

SIZE = "128M"
BIG = 12 << 20  # a file overwritten whole: a delta set whose playback lasts
NO_LONGER = "no longer hold"  # the forwarder lost a delta set its next hop asks for


class ListeningPowerSite(PowerSite):
    """A PowerSite whose daemon listens on 127.0.0.1, on the same port after every cut."""

    listen = "127.0.0.1:0"

    def mount(self) -> None:
        run_repfs("mount", self.site, self.path, "--listen", self.listen)
        assert os.path.ismount(self.path)
        self.pid = int((self.site / "repfs.pid").read_text().split()[0])
        self.listen = f"127.0.0.1:{port_of(self.site)}"


class Churn(threading.Thread):
    """On the primary's mount, until stopped: a random file workload, an fsync'd overwrite of
    a hot file each step (so consecutive delta sets share blocks: a playback overwrites what
    a held delta set's pin still needs), and a delta set cut every few steps."""

    def __init__(self, m1, seed: int, pause: float = 0.03, start: bool = True):
        super().__init__(daemon=True)
        self.m1, self.pause = m1, pause
        self.rng = random.Random(seed)
        self.work = Workload(m1.path / "w", seed)
        self.hot = m1.path / "hot"
        self.halt = threading.Event()
        self.cuts: list[int] = []
        self.error: BaseException | None = None
        if start:
            self.start()

    def run(self) -> None:
        try:
            k = 0
            while not self.halt.is_set():
                self.work.step()
                fd = os.open(self.hot, os.O_WRONLY)
                try:
                    os.pwrite(fd, self.rng.randbytes(self.rng.choice([4096, 65536, 300_000])),
                              self.rng.randrange(0, 1 << 20, 4096))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                k += 1
                if k % self.rng.randrange(2, 6) == 0:
                    status, out = post(self.m1.site, "/replicate/deltaset", {"wait": True})
                    if status == 200:
                        self.cuts.append(out["delta_set"])
                time.sleep(self.pause)
        except BaseException as e:  # shown by stop()
            self.error = e

    def stop(self) -> None:
        self.halt.set()
        if not self.ident:
            return
        self.join(120)
        assert not self.is_alive(), "the churn did not stop"
        if self.error is not None:
            raise AssertionError(f"the churn on the primary failed: {self.error!r}")


def played(site: Path) -> int:
    return api(site, "GET", "/status")["last_played_delta_set"] or 0


def _wait(pred, what: str, sites=(), timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {s} log:\n" + "\n".join(log_lines(s)[-25:]) for s in sites)
            raise AssertionError(f"{what} not within {timeout} s{tails}")
        time.sleep(0.1)


def converge(p, f, h) -> int:
    """The primary cuts once more; the forwarder and its next hop play that delta set; the
    three trees are equal. Returns its number."""
    status, out = post(p.site, "/replicate/deltaset", {"wait": True}, timeout=120)
    assert status == 200 and out["state"] == "ready", out
    n = out["delta_set"]
    _wait(lambda: played(f.site) >= n and played(h.site) >= n,
          f"delta set {n} played by the forwarder and its next hop",
          sites=(p.site, f.site, h.site))
    want = tree(p.path)
    for m in (f, h):
        got = _stable_tree(m.path)
        deadline = time.monotonic() + 2.5
        while got != want and time.monotonic() < deadline:  # (caches dropped a bit late)
            time.sleep(0.25)
            got = _stable_tree(m.path)
        assert got == want, f"{m.path} differs from the primary at delta set {n}: " + "; ".join(
            tree_diff(want, got))
    fwd = api(f.site, "GET", "/status")["forwarding"]
    assert fwd and [r["state"] for r in fwd["next_hops"]] == ["replicating"], fwd
    assert not [ln for ln in log_lines(f.site) if NO_LONGER in ln], "a next hop lost a delta set"
    return n


def three_sites(power_site, mount_site, on_powerfs: bool = True, bypass_after: int = 86400):
    """Primary (plain directory), forwarder and next hop (on powerfs if `on_powerfs`), all
    holding the group; the primary replicates to the forwarder, the forwarder routes to the
    next hop, and both have played their initial copies."""
    p = mount_site(SIZE, "--listen", "127.0.0.1:0", name="prim")
    if on_powerfs:
        f, h = power_site("fwd"), power_site("hop")
        for m in (f, h):
            m.create(SIZE)
            m.mount()
    else:
        f = mount_site(SIZE, "--listen", "127.0.0.1:0", name="fwd")
        h = mount_site(SIZE, "--listen", "127.0.0.1:0", name="hop")
    for m in (p, f, h):
        GroupStore(m.site).add(GROUP, SECRET)
    # the primary bypasses the forwarder only if asked: its own forwarding is what is tested
    toml = p.site / "site.toml"
    toml.write_text(toml.read_text().replace("bypass_after = 30",
                                             f"bypass_after = {bypass_after}"))
    p.umount()
    run_repfs("mount", p.site, p.path, "--listen", "127.0.0.1:0")
    admin(p.path, "replicate", "policy", *NO_AUTO_CUT)
    Workload(p.path, "fwd-base").run(30)
    for name, size in (("hot", 3 << 20), ("big", BIG)):
        (p.path / name).write_bytes(os.urandom(size))
    (p.path / "w").mkdir()
    admin(p.path, "replicate", "start", "--to", address(f), "--group", GROUP, timeout=180)
    admin(f.path, "route", "add", GROUP, address(h))
    converge(p, f, h)
    return p, f, h


@pytest.fixture
def power_site(tmp_path):
    made: list[ListeningPowerSite] = []

    def make(name: str) -> ListeningPowerSite:
        s = ListeningPowerSite(tmp_path, name)
        made.append(s)
        return s

    yield make
    for s in made:
        s.teardown()


def _dead_state(site: Path) -> dict:
    """The replication state on a stopped forwarder's disk (printed with each round): a
    playback recorded as running, the pins recorded (repl-ds-N -> whether its save volume
    exists), the delta sets it holds, its next hops' (acked, played), its last played."""
    from repfs.repl import keys as RK
    from repfs.snap import keys as SK
    env = _meta(site)
    try:
        with env.begin() as txn:
            playing = txn.get(b"playing", db=env.open_db(RK.CTX, txn=txn, create=False))
            last_played = txn.get(b"last_played", db=env.open_db(RK.CTX, txn=txn,
                                                                   create=False))
            pins = {}
            for name, key in txn.cursor(db=env.open_db(SK.NAMES, txn=txn, create=False)):
                if name.startswith(b"repl-ds-"):
                    pins[name.decode()] = (site / "save" / f"{SK.unpack_id(key)}.save").exists()
            held = [json.loads(v)["number"] for _, v in txn.cursor(
                db=env.open_db(RK.DELTASETS, txn=txn, create=False)) if json.loads(v)["pinned"]]
            hops = {json.loads(v)["name"]: (json.loads(v)["acked"], json.loads(v)["played"])
                    for _, v in txn.cursor(db=env.open_db(RK.DESTS, txn=txn, create=False))}
    finally:
        env.close()
    return {"playing": playing is not None, "pins": pins, "held": held, "hops": hops,
            "last_played": RK.from_u64(last_played) if last_played else None}


def _leftovers(site: Path) -> tuple[list[str], list[str]]:
    """(pins recorded, save volumes no recorded snapshot owns) of a stopped site."""
    from repfs.snap import keys as SK
    env = _meta(site)
    try:
        with env.begin() as txn:
            names = {n.decode(): SK.unpack_id(k) for n, k in
                     txn.cursor(db=env.open_db(SK.NAMES, txn=txn, create=False))}
    finally:
        env.close()
    ids = set(names.values())
    orphans = [p.name for p in (site / "save").glob("*.save")
               if not (p.stem.isdigit() and int(p.stem) in ids)]
    return sorted(n for n in names if n.startswith("repl-ds-")), orphans


def in_use_digest(image: Path) -> str:
    """A digest of a stopped site's volume: the block bitmap and every block it says
    is in use (free blocks may legitimately differ between replicas: docs/replication.md,
    "Verifying a secondary")."""
    from repfs.fs.format import BLOCK_SIZE, Superblock
    from repfs.pagedbits import unpack
    h = hashlib.sha256()
    with open(image, "rb") as fh:
        sb = Superblock.unpack(fh.read(BLOCK_SIZE))
        fh.seek(sb.bbitmap_start * BLOCK_SIZE)
        raw = fh.read(sb.bbitmap_blocks * BLOCK_SIZE)
        bits = np.concatenate([unpack(raw[i:i + BLOCK_SIZE])
                               for i in range(0, len(raw), BLOCK_SIZE)])[:sb.nblocks]
        h.update(np.packbits(bits).tobytes())
        step = 2048  # blocks per read
        for s in range(0, sb.nblocks, step):
            mask = bits[s:s + step]
            if not mask.any():
                continue
            fh.seek(s * BLOCK_SIZE)
            buf = np.frombuffer(fh.read(len(mask) * BLOCK_SIZE), np.uint8)
            h.update(buf.reshape(-1, BLOCK_SIZE)[mask].tobytes())
    return h.hexdigest()


def finish(p, f, h) -> None:
    """The primary verifies the forwarder (a delta set of its own, forwarded too); the next
    hop plays what the forwarder played, which then holds nothing; all three stop cleanly,
    the forwarder leaves no pin or save volume behind and its volume's blocks in use are its
    next hop's."""
    r = admin(p.path, "verify", "--to", address(f), check=False, timeout=180)
    assert r.returncode == 0, f"verify of the forwarder: {r.stdout}{r.stderr}"
    n = played(f.site)
    _wait(lambda: played(h.site) >= n and not api(f.site, "GET", "/status")["forwarding"][
        "held_delta_sets"], f"the next hop at delta set {n}, the forwarder holding nothing",
        sites=(f.site, h.site), timeout=60)
    for m in (p, f, h):
        run_repfs("umount", m.path)
        _wait_unmounted(m.path)
        if isinstance(m, PowerSite):
            m.pid = None
    pins, orphans = _leftovers(f.site)
    assert not pins and not orphans, f"left over at the forwarder: pins {pins}, save {orphans}"
    assert in_use_digest(f.site / "volume.img") == in_use_digest(h.site / "volume.img"), (
        "the forwarder's and its next hop's volumes differ in blocks in use")
    for m in (f, h):
        run_repfs("fsck", m.site)
        assert not [ln for ln in log_lines(m.site) if "Traceback" in ln], m.site
        if isinstance(m, PowerSite):
            m.pf.stop()


# ----------------------------------------------------------------------------- power cuts

PLAYBACK = "playback"
SLOW_HOP = ("site/volume.img|site/save/incoming/*", "write")
PHASES = [  # (name, the forwarder's files, ops, skip range, slow the next hop)
    ("receive", "site/save/incoming/*", "write|fsync", 6, False),
    ("volume (direct writes, playback)", "site/volume.img", "write|fsync", 8, False),
    ("pin copies", "site/save/*.save", "write|fsync", 4, True),
    ("meta.lmdb (records, pins, mailbox)", "site/meta.lmdb/*", "write|fsync", 30, False),
    # (new pins' save volumes are named durably at their first sync, or by a delete's)
    ("the save area's directory sync", "site/save", "fsyncdir", 2, True),
    ("forwarding to a slow next hop", None, None, 0, True),
    # a 12 MiB file of blocks in use overwritten in place, the cut as soon as status shows
    # its delta set playing; it landed inside the playback if the fsck after it logs that it
    # finished one (required). Last: aimed at again, a few times, until one did
    (PLAYBACK, None, None, 0, False),
]


def test_power_cuts_at_the_forwarder(power_site, mount_site):
    rng = random.Random(9101 + SEED)
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    p, f, h = three_sites(power_site, mount_site)
    hits: dict[str, int] = {}
    plan = [ph for _ in range(ROUNDS) for ph in PHASES]
    rnd = 0
    while rnd < len(plan):
        phase, path, ops, skip, slow = plan[rnd]
        before = _interrupted(f.site)
        if slow:
            h.pf.add_fault(*SLOW_HOP, count=None, delay=0.03)
        if path is not None:
            f.pf.arm_cut(path, ops, skip=rng.randrange(skip),
                         keep=rng.choice(["none", "random"]), seed=rng.randrange(1 << 30))
        churn = Churn(p, rng.randrange(1 << 30), start=phase != PLAYBACK)
        got = None
        if phase == PLAYBACK:  # a big delta set of blocks in use: a long playback
            with open(p.path / "big", "r+b") as fh:  # (in place: no block is free)
                fh.write(os.urandom(BIG))
            status, out = post(p.site, "/replicate/deltaset", {"wait": True})
            assert status == 200, out
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = api(f.site, "GET", "/status")
                if out["delta_set"] in (st["playing_delta_set"], st["last_played_delta_set"]):
                    break
        elif path is not None:
            got = f.pf.wait_frozen(10)
        else:
            time.sleep(rng.uniform(0.3, 2.0))
        if not f.pf.stats()["frozen"]:  # (timed, or not reached in time: a cut now)
            f.pf.freeze(rng.choice(["none", "random"]), rng.randrange(1 << 30))
        if (got is not None or path is None) and phase != PLAYBACK:
            hits[phase] = hits.get(phase, 0) + 1
        out = f.power_cut()  # (its fsck finishes an interrupted playback, and logs it)
        churn.stop()
        h.pf.clear_faults()
        if _interrupted(f.site) > before:
            hits["inside a playback"] = hits.get("inside a playback", 0) + 1
        dead = _dead_state(f.site)
        f.mount()
        n = converge(p, f, h)
        print(f"round {rnd}: {phase}: {'aimed' if got else 'timed'} cut {out}, "
              f"{len(churn.cuts)} delta sets cut, after fsck {dead}; converged at {n}",
              flush=True)
        rnd += 1
        if rnd == len(plan) and not hits.get("inside a playback") and rnd < len(
                PHASES) * ROUNDS + 3:
            plan.append(PHASES[-1])  # (a playback is short: aimed at again, a few times)
    finish(p, f, h)
    print(f"cuts in their phase: {hits}")
    missing = [ph for ph in [ph[0] for ph in PHASES if ph[0] != PLAYBACK]
               + ["inside a playback"] if not hits.get(ph)]
    assert not missing, f"no cut landed during: {missing}"


# ----------------------------------------------------------------------------- kill -9


def test_kill9_of_the_forwarder(mount_site):
    rng = random.Random(9201 + SEED)
    p, f, h = three_sites(None, mount_site, on_powerfs=False,
                          bypass_after=1 if BYPASS else 86400)
    if BYPASS:
        p.expect_log("sending straight to its next hops")
    fport = port_of(f.site)
    inside = rnd = 0
    # random moments; then (until one lands inside a playback, at most 3 times) a kill as
    # soon as status shows a long playback (a 12 MiB file of blocks in use overwritten)
    while rnd < KILL_ROUNDS or (not inside and rnd < KILL_ROUNDS + 3):
        aimed = rnd >= KILL_ROUNDS
        churn = Churn(p, rng.randrange(1 << 30), start=not aimed)
        if aimed:
            with open(p.path / "big", "r+b") as fh:
                fh.write(os.urandom(BIG))
            status, out = post(p.site, "/replicate/deltaset", {"wait": True})
            assert status == 200, out
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = api(f.site, "GET", "/status")
                if out["delta_set"] in (st["playing_delta_set"], st["last_played_delta_set"]):
                    break
        else:
            time.sleep(rng.uniform(0.2, 2.5))
        before = _interrupted(f.site)
        pid = kill9(f.site)
        churn.stop()
        dead = _dead_state(f.site)
        subprocess.run(["fusermount3", "-u", "-z", str(f.path)], check=False,
                       capture_output=True)
        _wait_dead(pid)
        _wait_unmounted(f.path)
        if BYPASS:  # the next hop fed by the primary meanwhile
            more = Churn(p, rng.randrange(1 << 30))
            time.sleep(rng.uniform(2.0, 6.0))
            more.stop()
        run_repfs("mount", f.site, f.path, "--listen", f"127.0.0.1:{fport}")
        inside += _interrupted(f.site) > before
        n = converge(p, f, h)
        print(f"round {rnd}: killed after {len(churn.cuts)} delta sets cut"
              f"{' (aimed at a playback)' if aimed else ''}, on disk {dead}; converged at {n}",
              flush=True)
        rnd += 1
    assert inside, "no kill landed inside a playback: test too weak"
    finish(p, f, h)
