"""Tier 2: `repfs-admin snapshot diff` against the live file system of a running daemon does
not hold writers while it works (issue 8, item 6).

The daemon is an ordinary `repfs mount`, started by a small launcher that wraps the diff's
path step (repfs.snap.verbs.changed_paths) so that it blocks on a FIFO the test controls:
the diff's worker thread is then stopped mid-diff, after the live file system was pinned. The
proof is an ordering of events, not a time: while the diff is blocked, a writer creates,
overwrites and fsyncs files and its calls return; only then is the diff released. Its answer
is the state at the pin (it does not show what was written while it ran); the next diff does.
The pin is an internal snapshot: `snapshot list` and `status` do not show it, it is gone after
the diff, and one left by a daemon killed mid-diff is deleted at the next mount.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import fsck_clean, run_repfs, umount_busy_tolerant
from tests.t2_snap_mount import admin_fails, admin_ok

# wraps the diff's path step in the daemon; everything else is the real `repfs mount`
LAUNCHER = r"""
import os, sys
import repfs.snap.verbs as verbs
real = verbs.changed_paths
gate = os.environ["REPFS_TEST_DIFF_GATE"]
def gated(*args, **kw):
    open(os.path.join(gate, "blocked"), "w").close()
    with open(os.path.join(gate, "release")) as f:  # a FIFO: waits for the test's writer
        f.read()
    os.unlink(os.path.join(gate, "blocked"))
    return real(*args, **kw)
verbs.changed_paths = gated
from repfs.cli.main import main
sys.argv[0] = "repfs"
main()
"""


class GatedSite:
    def __init__(self, tmp: Path):
        self.site = tmp / "site"
        self.path = tmp / "mnt"
        self.gate = tmp / "gate"
        self.gate.mkdir()
        os.mkfifo(self.gate / "release")
        self.path.mkdir()
        run_repfs("mkfs", self.site, "--size", "128M")

    def mount(self) -> None:
        env = dict(os.environ, REPFS_TEST_DIFF_GATE=str(self.gate))
        r = subprocess.run([sys.executable, "-c", LAUNCHER, "mount", str(self.site),
                            str(self.path)], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(self.path)

    def wait_blocked(self, proc: subprocess.Popen) -> None:
        """Until the diff's thread waits at the gate (a guard against a hang, not a timing)."""
        deadline = time.monotonic() + 120
        while not (self.gate / "blocked").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the diff never reached its path step"
            time.sleep(0.02)

    def release(self) -> threading.Thread:
        """Let one gated diff go on (whenever it gets there)."""
        t = threading.Thread(target=lambda: open(self.gate / "release", "w").close(),
                             daemon=True)
        t.start()
        return t

    def diff_proc(self, *args) -> subprocess.Popen:
        return subprocess.Popen(["repfs-admin", "--site", str(self.path), "--json",
                                 "snapshot", "diff", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def saves(self) -> int:
        return len(list((self.site / "save").glob("*.save")))

    def log(self) -> str:
        return (self.site / "repfs.log").read_text(errors="replace")

    def cleanup(self) -> None:
        if os.path.ismount(self.path):
            r = umount_busy_tolerant(self.path)
            if os.path.ismount(self.path):
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
            assert r.returncode == 0, r.stderr


@pytest.fixture
def gated(tmp_path):
    g = GatedSite(tmp_path)
    try:
        yield g
    finally:
        g.release()  # a diff still at the gate goes on (the umount waits for nothing)
        g.cleanup()


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_writers_go_on_while_a_live_diff_runs(gated):
    g = gated
    g.mount()
    m = g.path
    for i in range(20):
        write_durable(m / f"same{i}", b"s" * 5000)
    write_durable(m / "f", b"before")
    admin_ok(m, "snapshot", "create", "s1")
    write_durable(m / "f", b"after, before the diff")
    (m / "d").mkdir()
    write_durable(m / "d" / "new", b"n")

    diff = g.diff_proc("s1")
    g.wait_blocked(diff)
    # the diff is stopped inside its worker thread, with the live file system pinned
    assert g.saves() == 2  # s1's save volume and the pin's
    assert [s["name"] for s in admin_ok(m, "snapshot", "list")] == ["s1"]
    assert [s["name"] for s in admin_ok(m, "status")["snapshots"]] == ["s1"]
    pin = re.search(r"pinned as (diff-pin-\S+)", g.log()).group(1)
    assert "pins a diff that is running" in admin_fails(1, m, "snapshot", "delete", pin)
    assert "snapshot diff's own" in admin_fails(1, m, "snapshot", "create", "diff-pin-x")
    done = threading.Event()

    def writer():
        write_durable(m / "during", b"written while the diff ran")
        write_durable(m / "f", b"overwritten while the diff ran")
        (m / "d2").mkdir()
        os.rename(m / "same3", m / "d2" / "moved")
        fd = os.open(m, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        done.set()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    t.join(120)  # a guard: a held writer would wait for the release below, forever
    assert done.is_set(), "a writer waited for the diff"
    assert (g.gate / "blocked").exists() and diff.poll() is None  # still at the gate
    g.release()
    out, err = diff.communicate(timeout=120)
    assert diff.returncode == 0, err
    d = json.loads(out)
    assert d["from"] == "s1" and d["to"] == "live"
    changes = {p["path"]: p["change"] for p in d["paths"]}
    # the state at the pin: the writes of the writer above are not in it
    assert changes == {"/": "modified", "/f": "modified", "/d": "added", "/d/new": "added"}
    assert g.saves() == 1  # the pin is gone
    assert [s["name"] for s in admin_ok(m, "snapshot", "list")] == ["s1"]

    g.release()  # the next diff sees them
    d = admin_ok(m, "snapshot", "diff", "s1")
    changes = {p["path"]: p["change"] for p in d["paths"]}
    assert changes == {"/": "modified", "/f": "modified", "/d": "added", "/d/new": "added",
                       "/during": "added", "/d2": "added", "/d2/moved": "added",
                       "/same3": "deleted"}
    assert g.saves() == 1
    g.cleanup()
    fsck_clean(g.site)
    bad = [ln for ln in g.log().splitlines() if " WARNING " in ln or " ERROR " in ln]
    assert not bad, bad


def _mounted_with_a_change_since_s1(g) -> Path:
    """Mount, write /f, snapshot s1, then change /f: a live diff has one path to find."""
    g.mount()
    m = g.path
    write_durable(m / "f", b"one")
    admin_ok(m, "snapshot", "create", "s1")
    write_durable(m / "f", b"two")
    return m


def test_a_pin_left_by_a_killed_daemon_is_deleted_at_the_next_mount(gated):
    g = gated
    m = _mounted_with_a_change_since_s1(g)
    pid = admin_ok(m, "status")["pid"]
    diff = g.diff_proc("s1")
    g.wait_blocked(diff)
    assert g.saves() == 2
    os.kill(pid, signal.SIGKILL)
    diff.communicate(timeout=120)
    assert diff.returncode != 0
    subprocess.run(["fusermount3", "-u", "-z", str(m)], check=False)
    deadline = time.monotonic() + 60
    while (Path("/proc") / str(pid)).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.unlink(g.gate / "blocked")
    g.mount()
    assert g.saves() == 1
    assert "left by a diff that did not finish" in g.log()
    assert [s["name"] for s in admin_ok(m, "snapshot", "list")] == ["s1"]
    g.release()
    d = admin_ok(m, "snapshot", "diff", "s1")
    assert {p["path"]: p["change"] for p in d["paths"]} == {"/f": "modified"}
    g.cleanup()
    fsck_clean(g.site)


def test_an_unmount_during_a_live_diff_cancels_it_and_deletes_the_pin(gated):
    """The daemon goes down while a live diff runs: the diff is cancelled, its worker thread
    is stopped and waited for, and the pin is deleted then (not left for the next mount)."""
    g = gated
    m = _mounted_with_a_change_since_s1(g)
    diff = g.diff_proc("s1")
    g.wait_blocked(diff)
    assert g.saves() == 2
    umount = subprocess.Popen([sys.executable, "-m", "repfs", "umount", str(m)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "diff from s1 cancelled" not in g.log():  # (a guard against a hang)
        assert time.monotonic() < deadline and umount.poll() is None, umount.communicate()
        time.sleep(0.05)
    assert g.saves() == 2  # the thread is still at the gate: the pin stays meanwhile
    g.release()
    _, err = umount.communicate(timeout=120)
    assert umount.returncode == 0, err
    diff.communicate(timeout=120)
    assert diff.returncode != 0  # cancelled: no answer
    assert g.saves() == 1
    g.mount()
    assert "left by a diff that did not finish" not in g.log()
    assert [s["name"] for s in admin_ok(m, "snapshot", "list")] == ["s1"]
    g.cleanup()
    fsck_clean(g.site)
    bad = [ln for ln in g.log().splitlines() if " WARNING " in ln or " ERROR " in ln]
    assert not bad, bad
