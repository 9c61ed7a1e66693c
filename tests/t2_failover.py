"""Tier 2: failover (FIG. 23, 31-33) and the generation fence (invariant 5), with real daemons.

A primary and a secondary on this host (and, for RCP, two sites reached by HOST:PORT on
loopback), each mounted by its own daemon. The secondary takes over with `repfs-admin
failover`; the new primary must hold exactly the delta sets it played, byte for byte (the
primary's tree at that boundary: contents, sizes, modes, times, inode numbers, xattrs), on the
same mount; the old primary, once it hears of the new generation, refuses writes (EROFS).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from pathlib import Path

import lmdb

from repfs.rcp.groups import GroupStore
from tests.t2_repl import (
    ADMIN, admin, admin_json, api, assert_same_tree, cut, daemon_alive, log_tail, make_pair,
    start_replication, tree, wait_converged,
)
from tests.t4_repl_crash import kill9, post, remount

SECRET = b"the-group-secret-of-t2-failover-0123456789"
GROUP = "g1"


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def failover(m, *args, check=True):
    return admin(m.path, "failover", *args, check=check, timeout=300)


def failover_json(m, *args) -> dict:
    return admin_json(m.path, "failover", *args, timeout=300)


def ctx(site: Path, key: bytes):
    """A key of the site's replication context, read beside its running daemon (LMDB
    readers may be in other processes)."""
    env = lmdb.open(str(Path(site) / "meta.lmdb"), max_dbs=64, readonly=True, lock=True,
                    create=False)
    try:
        db = env.open_db(b"replctx", create=False)
        with env.begin(db=db) as txn:
            return txn.get(key)
    finally:
        env.close()


def wait_for(cond, what: str, timeout: float = 30.0, sites=()):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        for s in sites:
            assert daemon_alive(s), f"the daemon of {s} died:\n{log_tail(s)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def errno_of_write(path: Path) -> int | None:
    try:
        write(path, b"x")
    except OSError as e:
        return e.errno
    return None


def fill(root: Path, tag: str, n: int = 4, size: int = 300_000) -> None:
    for i in range(n):
        write(root / f"{tag}-{i}", os.urandom(size))
    os.setxattr(root / f"{tag}-0", b"user.tag", tag.encode())


@contextlib.contextmanager
def no_dead_mounts(*mounts):
    """A test that kills daemons leaves no dead mount behind if it fails midway (the
    fixture's teardown cannot see one: os.path.ismount is False for ENOTCONN)."""
    try:
        yield
    finally:
        for m in mounts:
            if not daemon_alive(m.site):
                subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True)


def snapshot_names(m) -> list[str]:
    return [s["name"] for s in api(m.site, "GET", "/snapshots")]


# ----------------------------------------------------------------------------- tests


def test_failover_after_the_primary_is_killed(mount_site):
    """kill -9 of the primary; --sync refused, --dry-run changes nothing; failover: the new
    primary holds exactly the played delta sets, on the same mount (an open file and the
    working directory stay valid), becomes writable, logs its changes; failover again says it
    is done; the old primary, mounted again, is fenced once its send task meets the new
    generation. Failover at a primary and at a site that never replicated is refused."""
    p = make_pair(mount_site)
    fresh = mount_site("64M", name="fresh")
    with no_dead_mounts(p.m1, p.m2):
        _failover_after_kill(p.m1, p.m2, fresh)


def _failover_after_kill(m1, m2, fresh):
    # bad input: not at a secondary
    for m in (m1, fresh):
        r = failover(m, check=False)
        assert r.returncode == 1, r
        assert "is a primary" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    fill(m1.path, "a")
    n = cut(m1)
    wait_converged(m1, m2, n)
    boundary = tree(m1.path)
    fill(m1.path, "b")  # never cut: lost with the primary
    held = open(m2.path / "a-1", "rb")  # opened on the read-only secondary
    cwd = os.open(m2.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        kill9(m1.site)
        r = failover(m2, "--sync", check=False)
        assert r.returncode == 1 and "unreachable" in r.stderr, r
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        before = api(m2.site, "GET", "/status")
        plan = failover_json(m2, "--dry-run")
        assert plan["dry_run"] and plan["generation"] == 2, plan
        assert plan["restart_point"] == "restart-2" and plan["restart_delta_set"] == n, plan
        assert plan["lost"]["known"] is False, plan
        after = api(m2.site, "GET", "/status")
        for k in ("role", "generation", "replication_state", "last_played_delta_set",
                  "readonly", "snapshots"):
            assert before[k] == after[k], (k, before[k], after[k])
        assert errno_of_write(m2.path / "nope") == errno.EROFS

        r = failover(m2)
        assert "now the primary, generation 2" in r.stdout, r.stdout
        assert "lost: cannot be told" in r.stdout, r.stdout
        st = api(m2.site, "GET", "/status")
        assert (st["role"], st["generation"], st["readonly"]) == ("primary", 2, False), st
        assert st["restart_point"]["snapshot"] == "restart-2", st
        assert st["restart_point"]["delta_set"] == n, st
        assert st["last_failover"]["state"] == "done", st
        assert st["last_failover"]["lost"]["known"] is False, st
        assert "restart-2" in snapshot_names(m2)
        assert tree(m2.path) == boundary  # exactly what was played, byte for byte
        held.seek(0)
        assert held.read() == (m2.path / "a-1").read_bytes()  # the open file still reads
        assert os.listdir(cwd)  # the directory opened before failover too
        # writable, and the change log runs from the restart point on
        write(m2.path / "new", os.urandom(100_000))
        with open(m2.path / "a-1", "r+b") as f:
            f.write(b"changed")
        os.sync()
        st = api(m2.site, "GET", "/status")
        assert st["replicating"] is True and st["current_delta_set"] == n + 1, st
        assert st["current_delta_set_blocks"] > 0, st
        # failover again: already done (idempotent)
        r = failover(m2)
        assert "already failed over" in r.stdout, r.stdout
    finally:
        held.close()
        os.close(cwd)
    # the old primary comes back believing it is primary: fenced at its first contact
    m1.expect_log("fenced:")
    m1.expect_log("holds generation 2")
    remount(m1)
    st = wait_for(lambda: (s := api(m1.site, "GET", "/status"))["fenced"] and s,
                  "the old primary to be fenced", sites=[m1.site])
    assert "holds generation 2" in st["fenced"] and st["readonly"], st
    assert errno_of_write(m1.path / "late") == errno.EROFS
    r = admin(m1.path, "status")
    assert "FENCED" in r.stdout, r.stdout
    r = subprocess.run(["mount", "-o", "remount,rw", str(m1.path)], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "fenced" in (r.stdout + r.stderr), r
    assert errno_of_write(m1.path / "late") == errno.EROFS
    # the new primary was not touched by it, and refuses to be taken by generation 1, even
    # with force (what replicate start --force from the old primary would ask)
    assert (m2.path / "new").exists() and not (m2.path / "late").exists()
    st2 = api(m2.site, "GET", "/status")
    assert st2["generation"] == 2
    code, doc = post(m2.site, "/repl/attach", {
        "primary": {"uuid": st2["uuid"], "site": str(m1.site)}, "generation": 1,
        "nblocks": st2["volume_bytes"] // 4096, "force": True})
    assert code == 409 and "older than this site's 2" in doc["error"], (code, doc)
    # the way back until resync exists (docs/recovery.md): a full copy onto the old primary,
    # which ends its fence; it then follows the new primary at generation 2
    start_replication(m2, m1, "--force", to=str(m1.site))
    st = api(m1.site, "GET", "/status")
    assert (st["role"], st["generation"], st["fenced"]) == ("secondary", 2, None), st
    assert_same_tree(m2.path, m1.path)
    # the changes logged since the restart point became the first delta set of generation 2
    # (its block list kept for the retention period: what a resync needs)
    assert api(m2.site, "GET", "/status")["last_cut_delta_set"] == n + 1


def test_failover_now_discards_what_is_not_played_and_reports_the_loss(mount_site):
    """Playback held: two delta sets received, not played; then the secondary stops
    receiving (replicate stop there) and the primary cuts a third. failover --now (the
    primary up): the two are discarded; all three are reported lost, with the changes never
    cut; the new primary shows the last played boundary; the primary is fenced at once
    (EROFS, status says why)."""
    p = make_pair(mount_site)
    m1, m2 = p.m1, p.m2
    boundary = tree(m1.path)  # the initial copy, played
    admin(m2.path, "replicate", "policy", "--playback-timeout", "3600")
    fill(m1.path, "c")
    n1 = cut(m1)
    fill(m1.path, "d", n=2)
    n2 = cut(m1)
    wait_for(lambda: api(m2.site, "GET", "/status")["last_received_delta_set"] == n2,
             "both delta sets received", sites=[m1.site, m2.site])
    m1.expect_log("is no longer a replicating secondary")  # (its send task stops: ERROR)
    admin(m2.path, "replicate", "stop")
    wait_for(lambda: api(m1.site, "GET", "/status")["destinations"][0]["state"] == "error",
             "the primary's send task to stop", sites=[m1.site])
    fill(m1.path, "e", n=1)
    n3 = cut(m1)  # cut, never received
    write(m1.path / "uncut", os.urandom(40_000))
    os.sync()
    played = api(m2.site, "GET", "/status")["last_played_delta_set"]
    assert played == n1 - 1
    m1.expect_log("fenced:")
    out = failover_json(m2, "--now")
    assert [x["delta_set"] for x in out["discarded"]] == [n1, n2], out
    assert out["restart_delta_set"] == played and out["fence"]["state"] == "fenced", out
    lost = out["lost"]
    assert lost["known"] and [x["delta_set"] for x in lost["delta_sets"]] == [n1, n2, n3], lost
    assert lost["uncut_blocks"] > 0 and lost["bytes"] >= 4096 * (
        sum(x["blocks"] for x in lost["delta_sets"]) + lost["uncut_blocks"]), lost
    assert tree(m2.path) == boundary
    assert not (m2.path / "c-0").exists()
    write(m2.path / "after", b"new primary")
    st1 = api(m1.site, "GET", "/status")
    assert st1["fenced"] and "holds generation 2" in st1["fenced"] and st1["readonly"], st1
    assert errno_of_write(m1.path / "late") == errno.EROFS
    # a second secondary failing over to the same generation is refused by the fenced
    # primary: it must not take over too
    code, doc = post(m1.site, "/repl/failover", {"step": "fence", "generation": 2,
                                                 "by": "elsewhere:/s3", "after": 0})
    assert code == 409 and "already fenced" in doc["error"], (code, doc)
    st2 = api(m2.site, "GET", "/status")
    assert st2["last_failover"]["lost"]["delta_sets"], st2
    r = admin(m2.path, "status")
    assert "last failover" in r.stdout and f"lost: delta sets {n1}, {n2}, {n3}" in r.stdout, \
        r.stdout


def test_failover_sync_over_rcp_loses_nothing(mount_site):
    """Two sites on loopback (RCP). failover --sync with the primary up: it turns
    read-only, cuts and ships its last delta set (writes never cut before); the new primary
    shows every byte the primary had; the primary was fenced over RCP."""
    m1 = mount_site("256M", "--listen", "127.0.0.1:0", name="s1")
    m2 = mount_site("256M", "--listen", "127.0.0.1:0", name="s2")
    for m in (m1, m2):
        GroupStore(m.site).add(GROUP, SECRET)
    admin(m1.path, "replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    port = json.loads((m2.site / "control.json").read_text())["port"]
    start_replication(m1, m2, "--group", GROUP, to=f"127.0.0.1:{port}")
    fill(m1.path, "e")
    cut(m1)
    fill(m1.path, "f", n=3)  # never cut: --sync ships it
    os.sync()
    want = tree(m1.path)
    m1.expect_log("fenced:")
    m1.expect_log("holds generation 2")  # (its send task stops: ERROR)
    # (the secondary reached by HOST:PORT, as any verb)
    out = json.loads(subprocess.run(
        [ADMIN, "--site", f"127.0.0.1:{port}", "--token-file", str(m2.site / "control.token"),
         "--json", "failover", "--sync"], capture_output=True, text=True, timeout=300,
        check=True).stdout)
    assert out["sync"] and out["generation"] == 2 and not out["readonly"], out
    assert out["lost"]["known"] and not out["lost"]["delta_sets"], out
    assert out["lost"]["uncut_blocks"] == 0, out
    assert tree(m2.path) == want
    assert errno_of_write(m1.path / "late") == errno.EROFS
    wait_for(lambda: api(m1.site, "GET", "/status")["destinations"][0]["state"] == "error",
             "the old primary's send task to stop", sites=[m1.site])
    assert "holds generation 2" in api(m1.site, "GET", "/status")["fenced"]
    write(m2.path / "after", b"new primary")


def test_kill9_during_failover_then_failover_again(mount_site):
    """The secondary's daemon is killed while its failover plays what it received; mounted
    again (still a secondary, receiving nothing), failover again finishes it: the same
    generation, the data byte-exact. The last delta set received was damaged on its disk
    meanwhile: it is not played, the restart point is the one before, and the report says
    so. A restart of the new primary keeps it the primary, writable and logging."""
    p = make_pair(mount_site)
    with no_dead_mounts(p.m1, p.m2):
        _kill9_during_failover(p.m1, p.m2)


def _kill9_during_failover(m1, m2):
    admin(m2.path, "replicate", "policy", "--playback-timeout", "3600")
    boundaries = []
    for i in range(3):
        fill(m1.path, f"g{i}", n=4, size=2 << 20)
        boundaries.append(tree(m1.path))  # (nothing writes until the cut)
        n = cut(m1)
    want = boundaries[-2]  # the last delta set is damaged below: never played
    wait_for(lambda: api(m2.site, "GET", "/status")["last_received_delta_set"] == n,
             "the delta sets received", sites=[m1.site, m2.site])
    kill9(m1.site)  # (its mount is gone: the fence finds nobody)
    # the first delta set to play is made a FIFO (a fault injected under the daemon): the
    # failover's playback blocks opening it, after the failover has begun, and is killed there
    first = api(m2.site, "GET", "/status")["last_played_delta_set"] + 1
    ds = m2.site / "save" / "incoming" / f"{first}.ds"
    aside = ds.with_name("aside")
    os.rename(ds, aside)
    os.mkfifo(ds, 0o600)
    proc = subprocess.Popen([ADMIN, "--site", str(m2.path), "failover"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (raw := ctx(m2.site, b"failover")) and json.loads(raw)["step"]
                 == "begun", "the failover to begin", sites=[m2.site])
        kill9(m2.site)
    finally:
        proc.communicate(timeout=60)
        os.unlink(ds)
        os.rename(aside, ds)
    # and the last one received is damaged on this site's disk (a byte of its data flipped)
    last = m2.site / "save" / "incoming" / f"{n}.ds"
    with open(last, "r+b") as f:
        f.seek(last.stat().st_size - 100)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    rec = json.loads(ctx(m2.site, b"failover"))
    assert rec["step"] == "begun" and rec["fence"]["state"] == "unreachable", rec
    remount(m2)
    st = api(m2.site, "GET", "/status")
    assert st["role"] == "secondary" and st["readonly"], st
    assert st["replication_state"] == "failover" and st["last_played_delta_set"] < n, st
    assert st["last_failover"]["state"].startswith("in progress"), st
    m2.expect_log("the restart point is delta set")  # (the damaged one: ERROR)
    out = failover_json(m2)
    assert out["generation"] == 2 and out["restart_delta_set"] == n - 1, out
    assert out["damaged"]["delta_set"] == n, out
    assert [x["delta_set"] for x in out["discarded"]] == [n], out
    assert out["fence"]["state"] == "unreachable", out
    assert tree(m2.path) == want
    write(m2.path / "after", b"new primary")
    os.sync()
    # a restart of the new primary (kill -9): read-write, generation 2, still logging
    # the changes since the restart point
    kill9(m2.site)
    remount(m2)
    st = api(m2.site, "GET", "/status")
    assert (st["role"], st["generation"], st["readonly"]) == ("primary", 2, False), st
    assert st["replicating"] is True and st["current_delta_set_blocks"] > 0, st
    assert st["restart_point"]["delta_set"] == n - 1, st
    assert (m2.path / "after").read_bytes() == b"new primary"
    write(m2.path / "after2", b"still writable")
    assert "already failed over" in failover(m2).stdout
