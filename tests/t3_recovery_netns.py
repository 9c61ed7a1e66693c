"""Tier 3: the reference's whole recovery cycle (FIG. 21) across network namespaces, over RCP
(issue 10 item 8). Each site's daemon runs in its own namespace on the bridge of
tests/netns.py; every verb and every delta set, block list and copy crosses the bridge.

* `test_whole_cycle`: a workload on the primary P, replicated to S; the boundary R (a delta
  set played at S) is kept as a tree (contents, sizes, modes, times, inode numbers, xattrs).
  The disaster: P's link is cut, P goes on writing (a delta set it cuts and keeps, and
  changes it never cuts), then its daemon is killed (-9). Failover at S without --sync: P is
  unreachable; S holds exactly R. S is written to. P comes back while its link is still
  down and writes again (it still believes it is the primary); its link is restored: it
  learns of generation 2 and fences itself (EROFS, status says why). `resync --peer P`
  (dry run first: the files it would discard there; then for real): P's divergent state is
  kept in snapshot divergence-2 and P ends with S's tree; the blocks on the wire (S's
  `resync.copied_blocks`, and S's RCP wire bytes to P on /metrics) are bounded by what was
  written on both sides, allowing for the file system's metadata and the granules of P's
  over-marking change log, far from the volume's used blocks. `failback`: P is the primary
  again (generation 3), nothing S held is lost; replication P -> S goes on as before,
  across a cut of S's link, and `verify` finds the two volumes equal block by block.
* `test_sync_failover_and_kills_during_resync_and_failback`: `failover --sync` loses
  nothing (S shows P's tree with what P wrote and never cut). The resync's copy (slowed by
  tc tbf) is cut short by a kill -9 of P's daemon, then of S's: each time it goes on by
  itself, from where P held the copy whole. While S is dead, a second failover, at P (S's
  secondary, its copy not yet played) is refused in one line, changing nothing: it holds
  no consistent state of S's to take over with. `failback`, its initiator S killed -9 while
  P waits for S's last delta set (slowed): P finishes by itself once S is back (P primary
  of generation 3 with S's last tree, S its secondary), and `failback` again says it is
  done.

Budget: 80-110 s for the file on the loaded 2-core machine (load 5-8); ~15 s of it is the
failover's wait for the answer of a primary whose link is cut (failover.PEER_TIMEOUT).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time

import pytest

from repfs.rcp.groups import GroupStore
from repfs.repl.sender import COPY_PIECE
from tests.conftest import run_repfs
from tests.netns import netlab  # noqa: F401 (the fixture)
from tests.t2_failover import errno_of_write, snapshot_names, wait_for, write
from tests.t2_metrics import metrics, value
from tests.t2_repl import (ADMIN, NO_AUTO_CUT, Workload, admin, admin_json, api, cut,
                           daemon_alive, tree, tree_diff)
from tests.t3_rcp_netns import GROUP, SECRET
from tests.t4_repl_crash import kill9

BS = 4096
WINDOW = 2  # S's [repl] send_window in the kill test: records in flight, sent again at most
FENCED_LOG = "holds generation 2"  # the old primary's WARNING when it fences itself


T0 = [time.monotonic()]


def phase(what: str) -> None:
    now = time.monotonic()
    print(f"[{now - T0[0]:6.1f} s] {what}", flush=True)


def admin_in(ns, m, *args, check: bool = True, timeout: float = 120):
    """`repfs-admin --site MOUNT ARGS` run inside the site's namespace (at its console: it
    reaches its own daemon while its link is cut)."""
    cmd = [*ns.nsenter, ADMIN, "--site", str(m.path), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def blocks(nbytes: int) -> int:
    return -(-nbytes // BS)


def same(a, b, grace: float = 2.5) -> None:
    """`b`'s mount shows `a`'s tree (read once; a played delta set may show a moment late)."""
    want = tree(a.path)
    deadline = time.monotonic() + grace
    while (got := tree(b.path)) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{b.site.name} differs from {a.site.name}: "
                                 + "; ".join(tree_diff(want, got)))
        time.sleep(0.25)


def dest(m, name: str) -> dict:
    return next(d for d in api(m.site, "GET", "/status")["destinations"] if d["name"] == name)


def dest_row(m, name: str) -> dict:
    """Destination `name` in `repfs-admin --json status` at `m` (the CLI)."""
    return next(d for d in admin_json(m.path, "status")["destinations"] if d["name"] == name)


def played(m) -> int:
    return api(m.site, "GET", "/status")["last_played_delta_set"] or 0


def converge(prim, sec, name: str, timeout: float = 60.0) -> int:
    """Cut at `prim`, wait until destination `name` (`sec`) has played it."""
    n = cut(prim)
    wait_for(lambda: (d := dest(prim, name))["state"] == "replicating"
             and d["played_delta_set"] >= n and played(sec) >= n,
             f"delta set {n} played at {sec.site.name}", timeout, sites=[prim.site, sec.site])
    return n


def remount_in(ns, m) -> None:
    """The site's (dead or live) mount gone, the site mounted again on its address."""
    if daemon_alive(m.site):
        m.umount()
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False, capture_output=True)
    wait_for(lambda: not os.path.ismount(m.path), f"{m.path} unmounted")
    run_repfs("mount", m.site, m.path, "--listen", ns.listen, prefix=ns.nsenter)


@pytest.fixture
def sites(netlab, tmp_path):
    """sites(size, s_window) -> (p ns, P mount, s ns, S mount): P (primary) and S (its secondary,
    over RCP, group GROUP), each in its namespace; no delta set is cut unless asked. A mount
    whose daemon a failed test left dead is lazily unmounted before netlab's teardown."""
    made = []

    def make(size: str = "256M", s_window: int | None = None):
        pn, sn = netlab.add_site("p"), netlab.add_site("s")
        if s_window is not None:  # S's site.toml [repl] send_window (the default is 8)
            run_repfs("mkfs", tmp_path / "s", "--size", size)
            toml = tmp_path / "s" / "site.toml"
            assert "send_window = 8\n" in toml.read_text()
            toml.write_text(toml.read_text().replace("send_window = 8\n",
                                                     f"send_window = {s_window}\n"))
        mp = netlab.mount_in(pn, tmp_path / "p", tmp_path / "p-mnt", size=size)
        ms = netlab.mount_in(sn, tmp_path / "s", tmp_path / "s-mnt", size=size)
        made.extend((mp, ms))
        for m in (mp, ms):
            GroupStore(m.site).add(GROUP, SECRET)
        admin(mp.path, "replicate", "policy", *NO_AUTO_CUT)
        return pn, mp, sn, ms

    yield make
    for m in made:
        if not daemon_alive(m.site):
            subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True)


def start(mp, to: str) -> None:
    out = admin_json(mp.path, "replicate", "start", "--to", to, "--group", GROUP,
                     timeout=180)
    assert out["state"] == "replicating", out


def files(root, tag: str, n: int, size: int) -> int:
    """`n` new files of `size` random bytes; returns the data blocks written."""
    for i in range(n):
        write(root / f"{tag}-{i}", os.urandom(size))
    return n * blocks(size)


def overwrite(path, offset: int, size: int) -> int:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    return blocks(offset % BS + size)


def test_whole_cycle(netlab, sites, tmp_path):
    T0[0] = time.monotonic()
    pn, mp, sn, ms = sites()
    mp.expect_log(FENCED_LOG)  # (its WARNING, and its send task's ERROR: a stale primary)
    ms.expect_log("holds generation 3")  # (fenced by the failback: the planned way)
    phase("sites")
    base = files(mp.path, "b", 16, 400_000)  # what both hold: ~6.4 MB, never sent again
    (mp.path / "wl").mkdir()
    wl = Workload(mp.path / "wl", "recovery-netns")
    wl.run(10)
    phase("written")
    start(mp, sn.listen)
    phase("started")
    wl.run(10)
    converge(mp, ms, sn.listen)
    same(mp, ms)
    wl.run(10)
    restart = converge(mp, ms, sn.listen)  # R: the boundary S will take over at
    boundary = tree(mp.path)
    same(mp, ms)

    # the disaster: P's link is cut; P goes on writing (a delta set cut and kept for S, then
    # changes never cut), and its daemon is killed
    phase("boundary R")
    netlab.cut_link(pn)
    p_blocks = files(mp.path, "lost-cut", 2, 40_000)
    p_blocks += overwrite(mp.path / "b-3", 8192, 16_384)
    out = json.loads(admin_in(pn, mp, "--json", "replicate", "deltaset").stdout)
    assert (out["delta_set"], out["state"]) == (restart + 1, "ready"), out
    p_blocks += files(mp.path, "lost-uncut", 1, 40_000)
    p_blocks += overwrite(mp.path / "b-4", 0, 8192)
    os.sync()
    kill9(mp.site)
    subprocess.run(["fusermount3", "-u", "-z", str(mp.path)], check=False, capture_output=True)

    phase("killed")
    # failover at S without --sync: P cannot be reached; S holds exactly R
    out = admin_json(ms.path, "failover", timeout=300)
    assert (out["role"], out["generation"], out["restart_delta_set"]) == \
        ("primary", 2, restart), out
    assert out["fence"]["state"] == "unreachable" and out["lost"]["known"] is False, out
    got = tree(ms.path)
    assert got == boundary, "; ".join(tree_diff(boundary, got))
    phase("failed over")
    admin(ms.path, "replicate", "policy", *NO_AUTO_CUT)
    # S is written to
    s_blocks = files(ms.path, "new", 3, 60_000)
    s_blocks += overwrite(ms.path / "b-5", 4096, 16_384)
    s_blocks += overwrite(ms.path / "b-3", 100_000, 8192)
    os.sync()
    on_s = tree(ms.path)

    # P comes back, its link still down: it believes it is the primary and writes on
    remount_in(pn, mp)
    p_blocks += files(mp.path, "lost-late", 1, 40_000)
    os.sync()
    diverged = {k: v for k, v in tree(mp.path).items()
                if k.startswith(("lost-", "b-3", "b-4"))}
    st = json.loads(admin_in(pn, mp, "--json", "status").stdout)
    assert (st["role"], st["generation"], st["fenced"]) == ("primary", 1, None), st
    phase("P back, cut off")
    netlab.restore_link(pn)
    st = wait_for(lambda: (s := api(mp.site, "GET", "/status"))["fenced"] and s["readonly"]
                  and s, "P to be fenced", timeout=60, sites=[mp.site])
    assert FENCED_LOG in st["fenced"] and st["readonly"], st
    assert errno_of_write(mp.path / "refused") == errno.EROFS
    assert "FENCED" in admin(mp.path, "status").stdout
    assert (mp.path / "lost-late-0").exists()

    phase("P fenced")
    # resync --peer P: a dry run first (changes nothing), then for real
    plan = admin_json(ms.path, "resync", "--peer", pn.listen, "--dry-run", timeout=300)
    assert plan["dry_run"] and not plan["full_copy"], plan
    for f in ("/lost-cut-0", "/lost-uncut-0", "/lost-late-0", "/b-3", "/b-4"):
        assert f in plan["discarded_paths"], plan["discarded_paths"]
    assert "/b-7" not in plan["discarded_paths"], plan
    assert api(mp.site, "GET", "/status")["role"] == "primary"  # (still: nothing changed)
    r = admin(ms.path, "resync", "--peer", pn.listen, timeout=300)
    assert "resync started" in r.stdout, r.stdout
    phase("resync started")
    d = wait_for(lambda: (x := dest(ms, pn.listen))["state"] == "replicating" and x,
                 "the resync to finish", timeout=120, sites=[mp.site, ms.site])
    wait_for(lambda: played(mp) >= d["acked_delta_set"], "P to play the resync",
             sites=[mp.site])
    st = api(mp.site, "GET", "/status")
    assert (st["role"], st["generation"], st["fenced"]) == ("secondary", 2, None), st
    got = tree(mp.path)
    assert got == on_s, "; ".join(tree_diff(on_s, got))
    # P's divergent state (the writes the failover lost) is kept in snapshot divergence-2
    assert "divergence-2" in snapshot_names(mp)
    smnt = tmp_path / "divergence"
    smnt.mkdir()
    admin(mp.path, "snapshot", "mount", "divergence-2", smnt)
    try:
        kept = {k: v for k, v in tree(smnt).items() if k in diverged}
    finally:
        run_repfs("umount", smnt)
    assert kept == diverged, "; ".join(tree_diff(diverged, kept))
    phase("resynced")
    # the blocks on the wire: the divergent and new ones, not the volume
    copied = dest_row(ms, pn.listen)["resync"]["copied_blocks"]
    wire = value(metrics(ms.site), "repfs_destination_wire_bytes_total",
                 destination=pn.listen)
    print(f"resync: {copied} blocks copied, {wire} wire bytes; written: P {p_blocks}, "
          f"S {s_blocks}, base {base}")
    assert s_blocks <= copied <= d["resync"]["blocks"], (copied, s_blocks, d)
    # (P's change log over-marks after its kill: whole intent regions, thousands of blocks;
    # the granule hashes leave out those that hold S's content. Allowance: a granule per
    # extent written on P, 64 metadata blocks: inodes, directories, bitmaps)
    assert copied <= s_blocks + p_blocks + 16 * 8 + 64, (copied, s_blocks, p_blocks)
    vfs = os.statvfs(ms.path)
    assert copied * 10 < vfs.f_blocks - vfs.f_bfree, (copied, vfs)  # not the volume
    assert s_blocks * BS * 0.9 <= wire <= copied * BS * 1.05 + (256 << 10), (wire, copied)

    # failback: P is the primary again; everything S held is there. Asked while P's daemon
    # is down (killed -9), it stops with an error and changes nothing; asked again once P is
    # back, it goes on
    write(ms.path / "last-on-s", os.urandom(70_000))
    kill9(mp.site)
    r = admin(ms.path, "failback", check=False, timeout=300)
    assert r.returncode != 0 and "run switchover again" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    st = api(ms.site, "GET", "/status")
    assert (st["role"], st["generation"], st["readonly"]) == ("primary", 2, False), st
    write(ms.path / "after-the-error", os.urandom(30_000))  # (S still takes writes)
    remount_in(pn, mp)
    last = tree(ms.path)
    r = admin(ms.path, "failback", timeout=300)
    assert "is the primary now (generation 3)" in r.stdout, r.stdout
    phase("failed back")
    stp, sts = api(mp.site, "GET", "/status"), api(ms.site, "GET", "/status")
    assert (stp["role"], stp["generation"], stp["readonly"]) == ("primary", 3, False), stp
    assert (sts["role"], sts["generation"]) == ("secondary", 3), sts
    got = tree(mp.path)
    assert got == last, "; ".join(tree_diff(last, got))

    # replication as before, P -> S, across a cut of S's link
    wl.run(10)
    name = sn.listen
    converge(mp, ms, name)
    same(mp, ms)
    phase("replicating P -> S")
    netlab.cut_link(sn)
    wl.run(8)
    cut(mp)
    wl.run(4)
    netlab.restore_link(sn)
    converge(mp, ms, name)
    same(mp, ms)
    out = admin_json(mp.path, "verify", "--to", name, timeout=300)  # block by block
    assert out["in_sync"] is True, out
    phase("done")


def copying(m, name: str, beyond: int = 0) -> dict | None:
    """Destination `name`'s row while its resync copy is under way and has sent more than
    `beyond` blocks (None otherwise)."""
    d = dest(m, name)
    copied = (d.get("resync") or {}).get("copied_blocks", 0)
    return d if d["state"] == "initial-copy" and copied > beyond else None


def test_sync_failover_and_kills_during_resync_and_failback(netlab, sites):
    """failover --sync across namespaces loses nothing; the resync's copy goes on after a
    kill -9 of the old primary's daemon (its receiver) and then of the new primary's (its
    sender) in the middle of it, by itself; a failback whose initiator is killed -9 once the
    other side took over is finished by the other side, and re-issuing it says it is done."""
    T0[0] = time.monotonic()
    pn, mp, sn, ms = sites("128M", s_window=WINDOW)
    mp.expect_log(FENCED_LOG)  # (fenced by --sync: the planned way)
    ms.expect_log("holds generation 3")  # (fenced by the failback)
    files(mp.path, "b", 6, 400_000)
    start(mp, sn.listen)
    wl = Workload(mp.path, "recovery-netns-sync")
    wl.run(8)
    converge(mp, ms, sn.listen)
    wl.run(8)
    files(mp.path, "uncut", 2, 100_000)  # written, never cut: --sync ships it
    os.sync()
    phase("replicating")

    # failover --sync: P turns read-only, cuts and ships its last delta set: nothing is lost
    out = admin_json(ms.path, "failover", "--sync", timeout=300)
    assert (out["role"], out["generation"], out["sync"]) == ("primary", 2, True), out
    assert out["fence"]["state"] == "fenced (--sync)", out
    assert out["lost"]["known"] and out["lost"]["blocks"] == 0, out
    got, want = tree(ms.path), tree(mp.path)
    assert got == want, "; ".join(tree_diff(want, got))
    st = api(mp.site, "GET", "/status")
    assert FENCED_LOG in st["fenced"] and st["readonly"], st
    assert errno_of_write(mp.path / "refused") == errno.EROFS
    phase("failed over --sync")

    # S writes enough for the resync's copy to take a while over a slowed link
    admin(ms.path, "replicate", "policy", *NO_AUTO_CUT)
    files(ms.path, "new", 3, 4 << 20)
    os.sync()
    on_s = tree(ms.path)
    netlab.limit_rate(sn, 16)  # (12 MiB take ~6 s)
    r = admin(ms.path, "resync", "--peer", pn.listen, timeout=300)
    assert "resync started" in r.stdout, r.stdout
    # kill -9 of the old primary (receiving the copy) in the middle of it
    k1 = wait_for(lambda: copying(ms, pn.listen, 900), "the copy under way", timeout=60,
                  sites=[ms.site])["resync"]["copied_blocks"]
    kill9(mp.site)
    remount_in(pn, mp)
    # P kept what it held whole (at most the records in flight were lost)
    pos = api(mp.site, "GET", "/repl/receiver")["copy"]["next_block"]
    assert pos > 0, pos
    phase("P killed, remounted")
    # then kill -9 of the new primary (sending it), once the copy went on
    k2 = wait_for(lambda: copying(ms, pn.listen, k1 + 900), "the copy to go on",
                  timeout=60, sites=[ms.site, mp.site])["resync"]["copied_blocks"]
    kill9(ms.site)
    # a second failover, at the old primary, before the resync finished: refused (it holds
    # neither its primary's state nor, once the copy is played, its own: nothing to take
    # over with), in one line, and nothing changes
    r = admin(mp.path, "failover", check=False)
    assert r.returncode == 1 and "holds no copy of its primary yet" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    st = api(mp.site, "GET", "/status")
    assert (st["role"], st["generation"], st["replication_state"]) == \
        ("secondary", 2, "initial-copy"), st
    remount_in(sn, ms)
    phase("S killed, remounted")
    netlab.limit_rate(sn, None)
    d = wait_for(lambda: (x := dest(ms, pn.listen))["state"] == "replicating" and x,
                 "the resync to finish", timeout=120, sites=[mp.site, ms.site])
    wait_for(lambda: played(mp) >= d["acked_delta_set"], "P to play the resync",
             sites=[mp.site])
    got = tree(mp.path)
    assert got == on_s, "; ".join(tree_diff(on_s, got))
    # each time it went on from where P held the copy whole: sent again, at most the
    # records in flight at each kill (the window, and one being read)
    again = d["resync"]["copied_blocks"] - d["resync"]["blocks"]
    assert again <= 2 * (WINDOW + 1) * COPY_PIECE, (d, k1, k2)
    phase("resynced")

    # failback; its initiator S is killed -9 once P took over (P waits for S's last delta
    # set, slowed down): P finishes by itself, and failback again says it is done
    converge(ms, mp, pn.listen)  # (what S's change log over-marked after its kill is sent)
    write(ms.path / "last-on-s", os.urandom(200 * BS))  # (below a drain's floor)
    last = tree(ms.path)
    netlab.limit_rate(sn, 2)  # (the last delta set takes ~3 s)
    proc = subprocess.Popen([ADMIN, "--site", str(ms.path), "failback"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: "waiting for its last delta set" in (mp.site / "repfs.log")
                 .read_text(), "P to wait for S's last delta set", timeout=60,
                 sites=[mp.site, ms.site])
        kill9(ms.site)
        assert "failover done" not in (mp.site / "repfs.log").read_text().split(
            "waiting for its last delta set")[-1], "the kill came too late"
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # (the test failed before the kill)
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, (out, err)
    phase("S killed in failback")
    remount_in(sn, ms)
    netlab.limit_rate(sn, None)
    # (a status read while S is being attached may show it a secondary of generation 2 for
    # a moment: its primary's objects are gone before its attach's transaction)
    wait_for(lambda: (s := api(ms.site, "GET", "/status"))["role"] == "secondary"
             and s["generation"] == 3, "P to finish the failback", timeout=60,
             sites=[mp.site, ms.site])
    stp, sts = api(mp.site, "GET", "/status"), api(ms.site, "GET", "/status")
    assert (stp["role"], stp["generation"], stp["readonly"]) == ("primary", 3, False), stp
    assert (sts["role"], sts["generation"]) == ("secondary", 3), sts
    got = tree(mp.path)
    assert got == last, "; ".join(tree_diff(last, got))
    # failback again (after its error): it is done, it says so
    r = admin(ms.path, "failback")
    assert "already switched over" in r.stdout, r.stdout
    phase("failed back")
