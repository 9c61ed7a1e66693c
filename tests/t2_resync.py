"""Tier 2: resync without a full copy (FIG. 28-29), with real daemons on this host.

The reference's cycle up to the resync: a primary replicates; its secondary goes down while
the primary cuts more delta sets (kept for it) and writes more (not cut); the primary dies
(kill -9); the secondary fails over (it holds exactly what it played); the new primary is
written to; the old primary comes back, is fenced; `resync --peer` brings it to the new
primary's state by sending only the blocks either side changed since the restart point —
counted — and keeps its own divergent state in snapshot divergence-GEN; replication then
goes on from the new primary to the old one.
"""

from __future__ import annotations

import errno
import os
import threading
import time

from tests.t2_failover import errno_of_write, fill, failover, snapshot_names, wait_for, write
from tests.t2_repl import (admin, admin_json, api, assert_same_tree, cut, start_replication,
                          tree, wait_converged)
from tests.t2_metrics import metrics, value
from tests.t4_repl_crash import kill9, remount


def resync_json(m, *args) -> dict:
    return admin_json(m.path, "resync", *args, timeout=300)


def dest(m, name: str) -> dict:
    return next(d for d in api(m.site, "GET", "/status")["destinations"] if d["name"] == name)


def test_resync_sends_only_the_blocks_that_differ_then_replication_goes_on(mount_site):
    m1 = mount_site("256M", name="s1")
    m2 = mount_site("256M", name="s2")
    admin(m1.path, "replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    fill(m1.path, "a", n=20, size=400_000)  # what both hold: ~8 MB, not sent again
    start_replication(m1, m2)
    fill(m1.path, "base", n=2)
    wait_converged(m1, m2, cut(m1))
    restart = tree(m1.path)
    # the secondary goes down; the primary cuts a delta set it keeps for it, then writes more
    m2.expect_log("")  # (killed: its log may end anyhow)
    m1.expect_log("")
    kill9(m2.site)
    fill(m1.path, "lost-cut", n=2)
    with open(m1.path / "a-3", "r+b") as f:
        f.write(b"diverged on the old primary")
    cut(m1)
    fill(m1.path, "lost-uncut", n=1)
    os.sync()
    kill9(m1.site)  # the disaster
    remount(m2)
    out = admin_json(m2.path, "failover", timeout=300)
    assert out["role"] == "primary" and out["generation"] == 2, out
    assert tree(m2.path) == restart
    # the new primary lives on
    fill(m2.path, "new", n=2)
    with open(m2.path / "a-5", "r+b") as f:
        f.write(b"changed on the new primary")
    os.sync()
    # the old primary comes back, is told of generation 2 and fenced
    remount(m1)
    wait_for(lambda: api(m1.site, "GET", "/status")["fenced"], "the fence", sites=[m1.site])
    assert errno_of_write(m1.path / "late") == errno.EROFS
    # status and /metrics say it: fenced, and the new primary's generation
    assert value(metrics(m1.site), "repfs_fenced") == 1
    assert value(metrics(m2.site), "repfs_fenced") == 0
    assert value(metrics(m2.site), "repfs_restart_point_delta_set") > 0
    st1 = api(m1.site, "GET", "/status")
    assert any(p["role"] == "newer primary" and "generation 2" in p["state"]
               for p in st1["peers"]), st1["peers"]

    plan = resync_json(m2, "--peer", str(m1.site), "--dry-run")
    assert plan["dry_run"] and not plan["full_copy"], plan
    assert plan["old_primary_changed_blocks"] > 0 and plan["new_primary_changed_blocks"] > 0
    for f in ("/lost-cut-0", "/lost-uncut-0", "/a-3"):
        assert f in plan["discarded_paths"], plan["discarded_paths"]
    assert "/a-7" not in plan["discarded_paths"], plan["discarded_paths"]
    assert api(m1.site, "GET", "/status")["role"] == "primary"  # nothing changed

    r = admin(m2.path, "resync", "--peer", str(m1.site), timeout=300)
    assert "resync started" in r.stdout, r.stdout
    name = m1.site.name
    d = wait_for(lambda: (x := dest(m2, name))["state"] == "replicating" and x,
                 "the resync to finish", timeout=120, sites=[m1.site, m2.site])
    assert d["resync"]["blocks"] > 0, d
    st1 = api(m1.site, "GET", "/status")
    assert (st1["role"], st1["generation"], st1["fenced"]) == ("secondary", 2, None), st1
    wait_for(lambda: api(m1.site, "GET", "/status")["last_played_delta_set"]
             >= d["acked_delta_set"], "the old primary to play the resync", sites=[m1.site])
    assert_same_tree(m2.path, m1.path)
    # only what differs crossed the wire: far below the ~8 MB both held, at most the union
    copied = dest(m2, name)["resync"]["copied_blocks"]
    assert 0 < copied <= d["resync"]["blocks"], (copied, d)
    # the data written since the restart point: 3 files of 300 KB on the old primary (lost)
    # and 2 on the new one, 2 blocks changed in place: ~372 blocks, and some metadata
    assert copied < 500, copied
    # the old primary's divergent state is kept
    assert "divergence-2" in snapshot_names(m1)
    # replication goes on, new primary -> old primary
    write(m2.path / "after", os.urandom(50_000))
    wait_converged(m2, m1, cut(m2))
    assert_same_tree(m2.path, m1.path)
    # resync again: already done
    again = resync_json(m2, "--peer", str(m1.site))
    assert again["already"], again
    # failback (FIG. 30): the old primary is the primary again, generation 3, nothing lost
    write(m2.path / "last-on-new", os.urandom(70_000))
    r = admin(m2.path, "failback", timeout=300)
    assert "is the primary now (generation 3)" in r.stdout, r.stdout
    st1, st2 = api(m1.site, "GET", "/status"), api(m2.site, "GET", "/status")
    assert (st1["role"], st1["generation"], st1["readonly"]) == ("primary", 3, False), st1
    assert (st2["role"], st2["generation"]) == ("secondary", 3), st2
    assert_same_tree(m1.path, m2.path)  # last-on-new included: lost nothing
    write(m1.path / "back-home", os.urandom(60_000))
    wait_converged(m1, m2, cut(m1))
    assert_same_tree(m1.path, m2.path)
    # failback again at the site that failed back (now m1's secondary): done, it says so
    r = admin(m2.path, "failback")
    assert r.stdout.startswith("already switched over: this site is a secondary of"), r


def test_resync_of_a_site_of_another_volume_is_a_full_copy_with_a_warning(mount_site):
    m1 = mount_site("64M", name="s1")
    m2 = mount_site("64M", name="s2")
    other = mount_site("64M", name="other")
    admin(m1.path, "replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    start_replication(m1, m2)
    fill(m1.path, "a", n=2)
    wait_converged(m1, m2, cut(m1))
    m1.expect_log("")
    kill9(m1.site)
    failover(m2)
    r = admin(m2.path, "resync", "--peer", str(other.site), "--dry-run")
    assert "every block in use" in r.stdout and "WARNING" in r.stderr, r
    m2.expect_log("FULL COPY")
    r = admin(m2.path, "resync", "--peer", str(other.site))
    assert "FULL COPY" in r.stderr and "full copy started" in r.stdout, r
    wait_for(lambda: dest(m2, other.site.name)["state"] == "replicating", "the full copy",
             timeout=120, sites=[m2.site, other.site])
    wait_for(lambda: api(other.site, "GET", "/status")["last_played_delta_set"] >= 1,
             "the copy to be played", sites=[other.site])
    assert_same_tree(m2.path, other.path)
    # bad input: not at a new primary; an unknown peer
    for m, args, why in ((other, ["--peer", str(m2.site)], "secondary"),
                         (m2, ["--peer", "/nonexistent/site"], "not")):
        r = admin(m.path, "resync", *args, check=False)
        assert r.returncode != 0 and why in r.stderr, r
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = admin(other.path, "failback", check=False)  # a secondary that never failed over
    assert r.returncode != 0 and "secondary" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1, r
    remount(m1)  # (the old primary back: fenced; its mount is the fixture's to end)


def test_switchover_under_a_running_writer_loses_nothing(mount_site):
    """switchover --to while a writer fsyncs file after file on the primary: the writer
    meets EROFS at the fence; every file it had fsync'd before is on the new primary, whole;
    the old primary is the new one's secondary (no full copy); switching back works."""
    m1 = mount_site("128M", name="s1")
    m2 = mount_site("128M", name="s2")
    start_replication(m1, m2)
    fill(m1.path, "a", n=3)
    wait_converged(m1, m2, cut(m1))
    done: list[tuple[str, bytes]] = []
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            data = os.urandom(40_000)
            try:
                write(m1.path / f"w-{i}", data)
            except OSError as e:
                assert e.errno == errno.EROFS, e
                return
            done.append((f"w-{i}", data))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.5)
        for m in (m1, m2):  # (each is fenced in its turn: the planned way)
            m.expect_log("fenced")
        r = admin(m1.path, "switchover", "--to", m2.site.name, timeout=300)
    finally:
        stop.set()
        t.join(60)
    assert "is the primary now (generation 2)" in r.stdout, r.stdout
    assert len(done) > 0
    for name, data in done:  # every write that returned is on the new primary
        assert (m2.path / name).read_bytes() == data, name
    st1 = api(m1.site, "GET", "/status")
    assert (st1["role"], st1["generation"]) == ("secondary", 2), st1
    d = dest(m2, m1.site.name)
    assert d["resync"]["copied_blocks"] < 64, d  # nothing to copy: no full copy
    assert_same_tree(m2.path, m1.path)
    r = admin(m1.path, "switchover", "--to", m2.site.name)  # again: done already
    assert "already switched over" in r.stdout, r.stdout
    # and back
    write(m2.path / "on-2", os.urandom(30_000))
    r = admin(m2.path, "switchover", "--to", m1.site.name, timeout=300)
    assert "generation 3" in r.stdout, r.stdout
    assert_same_tree(m1.path, m2.path)
