"""Tier 2: copies of snapshots between sites and pull updates (FIG. 34-40), with real daemons
on this host (recovery/copy.py).

A source takes snapshots; `copy SNAP --to PEER` gives an empty peer the snapshot's tree;
`copy SNAP2 --base SNAP --to PEER` sends only the blocks that differ (counted against the
snapshot delta the source reports); `pull --from SOURCE` at the copy brings it to the
source's youngest snapshot by FIG. 37-38's rule (nothing, the delta, or a full copy when the
copy's snapshot is gone at the source); a copy whose receiving daemon is killed mid-way
resumes where the receiver's staged copy ends when the command is issued again. Each copy is
compared with the tree the source's mount showed when the snapshot was taken.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from repfs.rcp.groups import GroupStore
from tests.t2_failover import GROUP, SECRET, fill, no_dead_mounts, wait_for, write
from tests.t2_repl import ADMIN, admin, admin_json, api, daemon_alive, tree, tree_diff
from tests.t4_repl_crash import kill9, post, remount


def snap(m, name: str) -> None:
    """A snapshot at the source (through its control port: the CLI is tested elsewhere)."""
    os.sync()
    status, out = post(m.site, "/snapshots", {"name": name})
    assert status == 200, out


def copy(m, *args) -> dict:
    return admin_json(m.path, "copy", *[str(a) for a in args], timeout=300)


def diff_blocks(m, older: str, younger: str) -> int:
    return api(m.site, "GET", f"/snapshots/{older}/diff?to={younger}&paths=0")["changed_blocks"]


def same_tree(path, want: dict, grace: float = 3.0) -> None:
    """The copy's mount shows `want` (a moment late: the kernel's caches are dropped after
    the playback is recorded)."""
    deadline = time.monotonic() + grace
    while True:
        got = tree(path)
        if got == want:
            return
        assert time.monotonic() < deadline, tree_diff(want, got)
        time.sleep(0.1)


def refused(m, *args) -> str:
    r = admin(m.path, *[str(a) for a in args], check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_copy_incremental_copy_and_pull(mount_site):
    m1 = mount_site("256M", name="src")
    m2 = mount_site("256M", name="copy")
    m3 = mount_site("256M", name="other")
    fill(m1.path, "a", n=8, size=200_000)
    (m1.path / "d").mkdir()
    os.symlink("a-1", m1.path / "d" / "link")
    snap(m1, "v1")
    t1 = tree(m1.path)

    full = copy(m1, "v1", "--to", m2.site)
    assert full["sent_blocks"] == full["blocks"] > 400, full  # ~1.6 MB of data and metadata
    assert full["state"] == "copied" and full["base"] is None, full
    same_tree(m2.path, t1)
    st = api(m2.site, "GET", "/status")
    assert st["role"] == "secondary" and st["replication_state"] == "copied", st
    assert "copied from it" in admin(m2.path, "status").stdout
    assert errno_of(lambda: write(m2.path / "x", b"x")) is not None  # read-only

    # changes: part of a file, a new file, a file gone, a rename
    with open(m1.path / "a-2", "r+b") as f:
        f.seek(50_000)
        f.write(os.urandom(10_000))
    fill(m1.path, "b", n=1, size=100_000)
    os.unlink(m1.path / "a-5")
    os.rename(m1.path / "a-6", m1.path / "d" / "a-6")
    snap(m1, "v2")
    t2 = tree(m1.path)
    plan = copy(m1, "v2", "--base", "v1", "--to", m2.site, "--dry-run")
    assert plan["dry_run"] and plan["sent_blocks"] == diff_blocks(m1, "v1", "v2"), plan
    assert "'v1'" in plan["replaces"], plan
    same_tree(m2.path, t1)  # (nothing changed)
    inc = copy(m1, "v2", "--base", "v1", "--to", m2.site)
    # exactly the snapshot delta v1 -> v2 (FIG. 39-40): what changed and is in use in v2
    assert inc["sent_blocks"] == inc["blocks"] == diff_blocks(m1, "v1", "v2"), inc
    assert 0 < inc["sent_blocks"] < full["sent_blocks"] // 4, (inc, full)
    same_tree(m2.path, t2)
    again = copy(m1, "v2", "--base", "v1", "--to", m2.site)  # idempotent
    assert again["already"] and again["sent_blocks"] == 0, again

    # bad input: one line, exit 1, nothing changed
    assert "no snapshot named 'nosuch'" in refused(m1, "copy", "nosuch", "--to", m2.site)
    assert "not older" in refused(m1, "copy", "v1", "--base", "v2", "--to", m2.site)
    assert "does not hold a copy of snapshot 'v1'" in refused(
        m1, "copy", "v2", "--base", "v1", "--to", m3.site)
    fill(m3.path, "own", n=1)
    assert "holds files; --force" in refused(m1, "copy", "v1", "--to", m3.site)
    assert "holds no copy" in refused(m1, "pull", "--from", m3.site)
    assert "came from" in refused(m2, "pull", "--from", m3.site)
    assert "is not a repfs site" in refused(m1, "copy", "v1", "--to", m1.path / "d")
    same_tree(m2.path, t2)

    # pull (FIG. 37-38): the delta from the copy's version to the source's youngest
    fill(m1.path, "c", n=2, size=150_000)
    snap(m1, "v3")
    t3 = tree(m1.path)
    plan = admin_json(m2.path, "pull", "--from", m1.site, "--dry-run")
    assert plan["decision"] == "delta" and plan["dry_run"], plan
    out = admin_json(m2.path, "pull", "--from", m1.site)
    assert out["decision"] == "delta" and out["base"] == "v2", out
    assert plan["sent_blocks"] == out["sent_blocks"], (plan, out)
    assert out["sent_blocks"] == diff_blocks(m1, "v2", "v3"), out
    same_tree(m2.path, t3)
    out = admin_json(m2.path, "pull", "--from", m1.site)
    assert out["decision"] == "current" and out["sent_blocks"] == 0, out
    out = admin_json(m2.path, "pull", "--from", m1.site, "--min-interval", "3600")
    assert out["decision"] == "not due", out
    # the copy's version is gone at the source: a full copy of the youngest (step 648)
    fill(m1.path, "e", n=1)
    snap(m1, "v4")
    t4 = tree(m1.path)
    admin(m1.path, "snapshot", "delete", "v3")
    out = admin_json(m2.path, "pull", "--from", m1.site)
    assert out["decision"] == "full" and out["snapshot"] == "v4", out
    assert out["sent_blocks"] > full["sent_blocks"], out
    same_tree(m2.path, t4)


def errno_of(fn):
    try:
        fn()
    except OSError as e:
        return e.errno
    return None


def test_kill9_of_the_receiver_mid_copy_then_reissue_resumes(mount_site):
    m1 = mount_site("256M", name="src")
    m2 = mount_site("256M", name="copy")
    fill(m1.path, "big", n=8, size=2 << 20)  # 16 MiB
    snap(m1, "s")
    want = tree(m1.path)

    def staged() -> int:  # blocks the receiver holds of the copy (most written direct)
        return (api(m2.site, "GET", "/repl/receiver").get("copy") or {}).get("next_block", 0)

    with no_dead_mounts(m2):
        proc = subprocess.Popen([ADMIN, "--site", str(m1.path), "copy", "s", "--to",
                                 str(m2.site), "--bwlimit", "2M"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: staged() > 768,
                     "the copy to be under way", sites=[m1.site, m2.site])
            assert "is being copied" in refused(m1, "snapshot", "delete", "s")
            cp = api(m1.site, "GET", "/status")["copy"]  # its progress
            assert cp["snapshot"] == "s" and 0 < cp["sent_blocks"] < cp["blocks"], cp
            assert "copying snapshot s to" in admin(m1.path, "status").stdout
            m2.expect_log("")  # (killed: its log may end anyhow)
            kill9(m2.site)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 1 and "re-issue the command" in err, err
        remount(m2)
    assert daemon_alive(m1.site)
    out = copy(m1, "s", "--to", m2.site)
    assert api(m1.site, "GET", "/status")["copy"] is None
    assert out["resumed_at_block"] and out["resumed_at_block"] > (3 << 20) // 4096 - 64, out
    assert 0 < out["sent_blocks"] < out["blocks"], out
    same_tree(m2.path, want)


def test_copy_over_rcp(mount_site):
    """A full copy then an incremental one to a site reached by HOST:PORT (RCP on loopback)."""
    m1 = mount_site("256M", "--listen", "127.0.0.1:0", name="src")
    m2 = mount_site("256M", "--listen", "127.0.0.1:0", name="copy")
    for m in (m1, m2):
        GroupStore(m.site).add(GROUP, SECRET)
    port = json.loads((m2.site / "control.json").read_text())["port"]
    fill(m1.path, "a", n=3)
    snap(m1, "v1")
    copy(m1, "v1", "--to", f"127.0.0.1:{port}", "--group", GROUP)
    fill(m1.path, "b", n=1)
    snap(m1, "v2")
    want = tree(m1.path)
    out = copy(m1, "v2", "--base", "v1", "--to", f"127.0.0.1:{port}", "--group", GROUP)
    assert out["sent_blocks"] == diff_blocks(m1, "v1", "v2"), out
    same_tree(m2.path, want)
    assert "needs --group" in refused(m1, "copy", "v2", "--to", f"127.0.0.1:{port}")
    # a pull over RCP: the source is asked at its address and pushes back to the copy's
    src = f"127.0.0.1:{json.loads((m1.site / 'control.json').read_text())['port']}"
    fill(m1.path, "c", n=1)
    snap(m1, "v3")
    want = tree(m1.path)
    out = admin_json(m2.path, "pull", "--from", src, "--group", GROUP)
    assert out["decision"] == "delta" and out["sent_blocks"] == diff_blocks(m1, "v2", "v3"), out
    same_tree(m2.path, want)
    assert admin_json(m2.path, "pull", "--from", src, "--group", GROUP)["decision"] == "current"
