"""Tier 2: faults stay contained (issue 7, item 3), through real daemons and mounts.

Faults are injected from below: a site directory lives on powerfs (tests/powerfs.py), whose
rules fail chosen operations (write, read, create, fsync) on chosen site files with EIO or
ENOSPC; or a file of the site is damaged on disk. No hook in the daemon.

For each background task: the daemon and its mount stay up, `status` shows the task's state
and its last error with the time, the error is logged once, and once the fault clears the task
recovers by itself and replication completes with the secondary byte-exact. A redo log that
cannot be written turns the mount read-only (errors=remount-ro) with fsync'd data intact after
a remount. A delta set damaged at the secondary is quarantined, reported, asked for again and
then played correctly.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import lmdb
import pytest

from repfs.repl import keys as K
from tests.conftest import fsck_clean, run_repfs
from tests.powerfs import PowerFS
from tests.t2_repl import (
    NO_AUTO_CUT, admin, api, assert_same_tree, daemon_alive, log_lines, log_tail,
    start_replication, status, wait_converged,
)


def _fsync(path, flags=os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _fsync(path.parent)


class Site:
    """A site (on powerfs when `power`) and its mount; `.site` and `.path` as conftest's Mount
    so the helpers of t2_repl work on it. Log lines at WARNING or worse must contain one of
    `expected` (the faults the test injects), and each expected one must be there."""

    def __init__(self, tmp: Path, name: str, *, power: bool):
        self.pf = PowerFS(tmp / f"{name}-disk", tmp / f"{name}-pf") if power else None
        self.site = (self.pf.mnt if power else tmp) / name
        self.path = tmp / f"{name}-mnt"
        self.path.mkdir()
        self.expected: set[str] = set()
        if self.pf:
            self.pf.start()
        run_repfs("mkfs", self.site, "--size", "256M")

    def mount(self) -> None:
        run_repfs("mount", self.site, self.path)
        assert os.path.ismount(self.path)

    def umount(self) -> None:
        run_repfs("umount", self.path)

    def expect(self, needle: str) -> None:
        self.expected.add(needle)

    def status(self) -> dict:
        return api(self.site, "GET", "/status")

    def task(self, name: str) -> dict:
        return self.status()["tasks"][name]

    def alive(self) -> None:
        """The daemon runs and the mount answers."""
        assert daemon_alive(self.site), f"the daemon of {self.site} died:\n{log_tail(self.site)}"
        assert os.path.ismount(self.path)
        os.listdir(self.path)

    def teardown(self, errors: list[str]) -> None:
        try:
            if os.path.ismount(self.path):
                r = run_repfs("umount", self.path, check=False)
                if r.returncode != 0:
                    errors.append(f"umount {self.path}: {r.stderr.strip()}")
        finally:
            if os.path.ismount(self.path):
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
        lines = log_lines(self.site)
        bad = [ln for ln in lines if (" WARNING " in ln or " ERROR " in ln or "Traceback" in ln)
               and not any(x in ln for x in self.expected)]
        if bad:
            errors.append(f"{self.site}/repfs.log has unexpected warnings: {bad[:3]}")
        missing = [x for x in self.expected if not any(x in ln for ln in lines)]
        if missing:
            errors.append(f"{self.site}/repfs.log lacks the expected lines: {missing}")
        if self.pf:
            self.pf.clear_faults()
        if not errors:
            r = run_repfs("fsck", self.site, check=False)
            if r.returncode != 0:
                errors.append(f"fsck {self.site}: exit {r.returncode}\n{r.stdout}{r.stderr}")
        if self.pf:
            self.pf.stop()


@pytest.fixture
def sites(tmp_path):
    made: list[Site] = []

    def make(name: str, *, power: bool = True) -> Site:
        s = Site(tmp_path, name, power=power)
        made.append(s)
        return s

    yield make
    errors: list[str] = []
    for s in made:
        try:
            s.teardown(errors)
        except Exception as e:  # noqa: BLE001 - tear every site down, then fail
            errors.append(f"teardown of {s.site}: {e!r}")
    assert not errors, "\n".join(errors)


def wait_for(what: str, fn, timeout: float = 30.0, sites_=()):
    """Poll `fn()` until it returns something true; the daemons must stay alive meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        for s in sites_:
            s.alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def kernel_options(mountpoint: Path) -> list[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        f = line.split()
        if len(f) > 3 and f[1] == str(mountpoint):
            return f[3].split(",")
    return []


def count_lines(site: Site, needle: str) -> int:
    return sum(needle in ln for ln in log_lines(site.site))


# ----------------------------------------------------------------------------- the mount


def test_volume_and_redo_log_errors(sites):
    """One site on powerfs, three faults in turn (one site: the suite's time budget)."""
    s = sites("s1")
    cfg = s.site / "site.toml"
    text, k = re.subn(r"commit_interval = [0-9.]+", "commit_interval = 0.2", cfg.read_text())
    assert k == 1
    cfg.write_text(text)
    s.mount()

    # 1. The disk under the volume fails a file's data write (ENOSPC, then EIO): that
    # request fails with the errno (ENOSPC stays ENOSPC), the blocks it had mapped are
    # unmapped (fsck clean below), the file system stays writable.
    data = os.urandom(256 << 10)
    for err in ("ENOSPC", "EIO"):
        rule = s.pf.add_fault("s1/volume.img", "write", errno=err, count=1)
        fd = os.open(s.path / f"f-{err}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, data, 0)
            assert ei.value.errno == getattr(errno, err)
            assert s.pf.stats()["faults"][str(rule)] == 1
            assert os.pwrite(fd, data, 0) == len(data)  # the next one goes through
            os.fsync(fd)
        finally:
            os.close(fd)
        assert (s.path / f"f-{err}").read_bytes() == data
        s.expect(f"write failed: [Errno {getattr(errno, err)}]")
    # A snapshot's save volume cannot take a before-image (its file system is full): the
    # overwrite that needed it fails with ENOSPC and changes nothing; the next one works.
    admin(s.path, "snapshot", "create", "before")
    rule = s.pf.add_fault("s1/save/*.save", "write", errno="ENOSPC", count=1)
    fd = os.open(s.path / "f-EIO", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"X" * 4096, 0)
        assert ei.value.errno == errno.ENOSPC
        assert s.pf.stats()["faults"][str(rule)] == 1
        assert (s.path / "f-EIO").read_bytes() == data  # unchanged
        assert os.pwrite(fd, b"X" * 4096, 0) == 4096
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (s.path / "f-EIO").read_bytes()[:4096] == b"X" * 4096
    admin(s.path, "snapshot", "delete", "before")
    st = s.status()
    assert st["fs_error"] is None and not st["readonly"]
    s.umount()
    fsck_clean(s.site)
    s.mount()

    # 2. The redo log cannot be written when a file is fsync'd: the mount turns read-only
    # (errors=remount-ro), keeps serving what it holds, and every fsync'd byte survives.
    kept = os.urandom(300_000)
    write_durable(s.path / "kept", kept)
    with open(s.path / "late", "wb") as f:
        os.fsync(f.fileno())  # created and committed: what follows only writes
        rule = s.pf.add_fault("s1/journal", "write", errno="EIO")
        f.write(b"never durable")
        f.flush()
        with pytest.raises(OSError) as ei:
            os.fsync(f.fileno())  # the commit cannot write its redo record
    assert ei.value.errno == errno.EIO
    assert s.pf.stats()["faults"][str(rule)] >= 1
    s.expect("failed writing the redo log")
    s.alive()
    assert (s.path / "kept").read_bytes() == kept
    assert (s.path / "late").read_bytes() == b"never durable"  # from memory
    with pytest.raises(OSError) as ei:
        (s.path / "new").write_bytes(b"x")
    assert ei.value.errno == errno.EROFS
    st = s.status()
    assert st["readonly"] and st["state"] == "read-only after an error", st["state"]
    assert "redo log" in st["fs_error"] and "Input/output error" in st["fs_error"], \
        st["fs_error"]
    assert st["fs_error_at"]
    assert st["tasks"]["commit"]["errors"] == 0  # the commit loop itself never fails
    human = admin(s.path, "status").stdout
    assert "read-only" in human.lower() and "redo log" in human, human
    r = admin(s.path, "snapshot", "create", "nope", check=False)
    assert r.returncode != 0 and "read-only after an error" in r.stderr, r.stderr
    # as ext4's errors=remount-ro: the kernel's mount turns read-only too
    wait_for("the kernel mount to turn read-only", lambda: "ro" in kernel_options(s.path),
             sites_=(s,))
    # the failing path again (a commit asked for by fsync: EIO): nothing more is logged
    for _ in range(3):
        with open(s.path / "kept", "rb") as f, pytest.raises(OSError) as ei:
            os.fsync(f.fileno())
        assert ei.value.errno == errno.EIO
    assert count_lines(s, "failed writing the redo log") == 1, log_tail(s.site)
    s.umount()
    s.pf.clear_faults()
    fsck_clean(s.site)
    s.mount()
    assert (s.path / "kept").read_bytes() == kept
    assert s.status()["fs_error"] is None

    # 3. The periodic commit (no fsync) meets the fault: the same, and what that commit
    # held (the file's data) is absent after the remount.
    fd = os.open(s.path / "lost", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.fsync(fd)  # created and committed: what follows only writes
        rule = s.pf.add_fault("s1/journal", "write", errno="EIO")
        warnings = count_lines(s, " WARNING ") + count_lines(s, " ERROR ")
        assert os.write(fd, b"never committed") == 15  # no fsync: the commit loop meets it
    finally:
        os.close(fd)
    # a verb whose consistency point meets the failure (or comes just after the commit loop
    # did): one line for the caller, never an "internal error"
    r = admin(s.path, "snapshot", "create", "during", check=False)
    assert r.returncode != 0 and "read-only after an error" in r.stderr, r.stderr
    assert "internal error" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    st = wait_for("the commit loop to fail", lambda: (
        s.status() if s.status()["fs_error"] else None), sites_=(s,))
    assert st["readonly"] and "redo log" in st["fs_error"], st["fs_error"]
    assert s.pf.stats()["faults"][str(rule)] >= 1
    wait_for("the kernel mount to turn read-only", lambda: "ro" in kernel_options(s.path),
             sites_=(s,))
    for _ in range(3):  # commits asked for again (fsync: EIO): nothing more is logged
        with open(s.path / "kept", "rb") as f, pytest.raises(OSError) as ei:
            os.fsync(f.fileno())
        assert ei.value.errno == errno.EIO
    assert count_lines(s, " WARNING ") + count_lines(s, " ERROR ") == warnings + 1, \
        log_tail(s.site)
    assert s.task("commit")["errors"] == 0
    s.alive()
    s.umount()
    s.pf.clear_faults()
    fsck_clean(s.site)
    s.mount()
    assert (s.path / "kept").read_bytes() == kept
    assert (s.path / "lost").read_bytes() == b""  # its data's commit never happened
    (s.path / "after").write_bytes(b"writable again")

    # 4. The volume cannot be read at mount: a one-line error, no daemon left behind, and
    # the next mount (the disk sound again) finds everything.
    s.umount()
    s.pf.add_fault("s1/volume.img", "read", errno="EIO")
    r = run_repfs("mount", s.site, s.path, check=False)
    assert r.returncode != 0 and "Input/output error" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.ismount(s.path) and not daemon_alive(s.site)
    s.pf.clear_faults()
    s.mount()
    assert (s.path / "kept").read_bytes() == kept
    assert (s.path / "after").read_bytes() == b"writable again"


# ----------------------------------------------------------------------------- the primary


def make_pair(sites, *, power1=True, power2=False, policy=NO_AUTO_CUT):
    m1 = sites("s1", power=power1)
    m2 = sites("s2", power=power2)
    m1.mount()
    m2.mount()
    if policy:
        admin(m1.path, "replicate", "policy", *policy)
    start_replication(m1, m2)
    return m1, m2


def _overwrite(path: Path, data: bytes) -> None:
    """Overwrite a file's first bytes in place (the same blocks) and fsync it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, 0) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


class _Paused:
    """The secondary's daemon stopped (SIGSTOP) for a moment: the primary's send task waits
    on its first request, so a delta set cut meanwhile is not sent before the test has
    overwritten its blocks (its pin copies them) and armed a fault."""

    def __init__(self, m2: Site):
        self.pid = int((m2.site / "repfs.pid").read_text().split()[0])

    def __enter__(self):
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        os.kill(self.pid, signal.SIGCONT)


def test_primary_tasks_recover_from_disk_errors(sites):
    m1, m2 = make_pair(sites, policy=("--timeout", "0.3", "--hwm", "100G"))
    (m1.path / "a").write_bytes(os.urandom(200_000))
    wait_converged(m1, m2, timeout=60)

    # 1. the cut: its pinning snapshot's save volume cannot be created
    before = m1.task("cut")["errors"]
    rules = [m1.pf.add_fault("s1/save/*.save", "create", errno="EIO")]
    (m1.path / "b").write_bytes(os.urandom(500_000))
    st = wait_for("the cut to fail", lambda: (
        m1.task("cut") if m1.task("cut")["errors"] > before else None), sites_=(m1, m2))
    assert "EIO" in st["last_error"] and st["last_error_at"], st
    assert st["state"] in ("retrying", "recovering") and st["error_kind"] == "transient"
    m1.alive()
    (m1.path / "c").write_bytes(b"the file system is unaffected")  # writes go on
    assert (m1.path / "c").read_bytes() == b"the file system is unaffected"
    assert m1.status()["current_delta_set_blocks"] > 0  # kept in the change log
    r = admin(m1.path, "replicate", "deltaset", check=False)  # on demand: a clear error
    assert r.returncode == 1 and "EIO" in r.stderr and "next cut ships them" in r.stderr, \
        r.stderr
    m1.expect("cut: EIO")
    assert m1.pf.stats()["faults"][str(rules[-1])] >= 1
    m1.pf.clear_faults()
    wait_for("the cut to recover", lambda: m1.task("cut")["state"] == "running",
             sites_=(m1, m2))
    wait_converged(m1, m2, timeout=60)
    assert_same_tree(m1.path, m2.path)

    # 2. the send task: the pin's save volume cannot be read. Delta set n is cut while the
    # secondary is paused, its blocks are overwritten before it is sent (the pin copies
    # them), then every read of the save volumes fails
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    name = f"send {m2.site.name}"
    before = m1.task(name)["errors"]
    with _Paused(m2):
        e = os.urandom(300_000)
        (m1.path / "e").write_bytes(e)
        n = admin_cut(m1)
        _overwrite(m1.path / "e", os.urandom(300_000))
        assert m1.status()["chunk_area_bytes"] >= 300_000  # the pin copied e's blocks
        rules.append(m1.pf.add_fault("s1/save/*.save", "read", errno="EIO"))
    st = wait_for("the send task to fail", lambda: (
        m1.task(name) if m1.task(name)["errors"] > before else None), sites_=(m1, m2))
    assert "EIO" in st["last_error"], st
    m1.alive()
    m1.expect(f"{name}: EIO")
    assert m1.pf.stats()["faults"][str(rules[-1])] >= 1
    d = m1.status()["destinations"][0]
    assert d["state"] == "replicating" and d["acked_delta_set"] < n, d  # retried, not given up

    # 3. a bug-class error (KeyError) in the send task, from a damaged LMDB record of the
    # delta set it is sending: logged once with its traceback, shown as permanent, retried
    # with back-off; `status` still answers (its replication part says what it cannot
    # read); once the record is repaired the delta set is sent
    assert m1.status()["last_cut_delta_set"] == n
    env = lmdb.open(str(m1.site / "meta.lmdb"), map_size=1 << 40, max_dbs=32, subdir=True)
    try:
        db = env.open_db(K.DELTASETS)
        with env.begin(write=True, db=db) as txn:
            good = txn.get(K.u64(n))
            rec = json.loads(good)
            del rec["first_change_ns"]
            txn.put(K.u64(n), json.dumps(rec).encode())
        m1.pf.clear_faults()
        st = wait_for("the send task to fail on the record", lambda: (
            m1.status() if "KeyError" in (m1.task(name)["last_error"] or "") else None),
            sites_=(m1, m2))
        t = st["tasks"][name]
        assert t["last_error"] == "KeyError: 'first_change_ns'" and t["error_kind"] == "permanent"
        assert "first_change_ns" in st["replication_status_error"]
        assert "cannot report" in admin(m1.path, "status").stdout
        m1.alive()
        m1.expect(f"{name} failed: KeyError")
        m1.expect("Traceback")  # logged once with its traceback: a bug to look at
        with env.begin(write=True, db=db) as txn:
            txn.put(K.u64(n), good)
    finally:
        env.close()
    wait_converged(m1, m2, n, timeout=60)
    assert (m2.path / "e").read_bytes() == e  # as it was at n's boundary (from the pin)
    assert m1.task(name)["state"] == "running"
    wait_converged(m1, m2, admin_cut(m1), timeout=60)
    assert_same_tree(m1.path, m2.path)
    for needle in ("cut: EIO", f"{name}: EIO", f"{name} failed: KeyError"):
        assert count_lines(m1, needle) == 1, (needle, log_tail(m1.site))
    human = admin(m1.path, "status").stdout
    assert "cut" in human and "EIO" in human, human


def test_a_full_disk_under_the_pins_does_not_stop_the_file_system(sites):
    """The disk under the primary's save volumes is full (then fails) while blocks of a delta
    set not yet sent are overwritten, so its pinning snapshot cannot copy them: replication
    is held up, not the file system. The site stays writable (new files are created and
    fsync'd meanwhile; an overwrite that needed the copy fails, changing nothing), status
    shows the error, nothing is lost. powerfs (FUSE) cannot reserve a pin's room at the cut
    (fallocate), so the pin cannot keep its copy of committed metadata and breaks: the
    destination stops with "needs a full resync" and `replicate start --force` brings it
    back (on a disk file system the room reserved right after the cut makes this rare: the
    copies then fail only if that reservation itself found the disk full, which is logged)."""
    m1, m2 = make_pair(sites)
    (m1.path / "a").write_bytes(os.urandom(200_000))
    wait_converged(m1, m2, admin_cut(m1), timeout=60)
    for i, err in enumerate(("ENOSPC", "EIO")):
        with _Paused(m2):
            b = os.urandom(400_000)
            (m1.path / f"b{i}").write_bytes(b)
            n = admin_cut(m1)
            rule = m1.pf.add_fault("s1/save/*.save", "write", errno=err)
            new = os.urandom(100_000)
            try:
                _overwrite(m1.path / f"b{i}", new)  # blocks of delta set n: the pin's copy
                b = new + b[len(new):]
            except OSError as e:
                assert e.errno == getattr(errno, err), e
                assert (m1.path / f"b{i}").read_bytes() == b  # unchanged
                m1.expect(f"write failed: [Errno {e.errno}]")
            # the file system goes on: new files, their directory (a block of delta set n)
            for j in range(3):
                write_durable(m1.path / f"c{i}-{j}", b"kept %d" % j)
            os.utime(m1.path / f"b{i}", (1, 1))
            st = m1.status()
            assert st["fs_error"] is None and not st["readonly"], st
            assert err in json.dumps(st), st  # shown
            assert m1.pf.stats()["faults"][str(rule)] >= 1
        m1.alive()
        m1.expect(err)
        m1.pf.clear_faults()
        d = wait_for("the destination to stop", lambda: (
            m1.status()["destinations"][0] if m1.status()["destinations"][0]["state"]
            == "error" else None), sites_=(m1, m2))
        assert f"delta set {n}" in d["error"] and "resync" in d["error"], d
        m1.expect("needs a full resync")
        start_replication(m1, m2, "--force")
        wait_converged(m1, m2, timeout=60)
        assert (m2.path / f"b{i}").read_bytes() == b
        assert_same_tree(m1.path, m2.path)


def test_a_pinned_block_damaged_on_the_primary_disk_is_never_sent(sites):
    """A copied block of a pinned delta set is damaged on the primary's disk before it is
    sent (one flipped bit in the pin's save volume): it is never sent (the secondary would
    apply it: the chunk's checksum is made from what was read); the destination stops with
    the reason, the daemon stays up, and a full resync brings the secondary back."""
    m1, m2 = make_pair(sites)
    (m1.path / "a").write_bytes(os.urandom(200_000))
    wait_converged(m1, m2, admin_cut(m1), timeout=60)
    saves = {p.name for p in (m1.site / "save").glob("*.save")}
    with _Paused(m2):
        b = os.urandom(400_000)
        (m1.path / "b").write_bytes(b)
        n = admin_cut(m1)
        _overwrite(m1.path / "b", os.urandom(400_000))
        (pin,) = [p for p in (m1.site / "save").glob("*.save") if p.name not in saves]
        fd = os.open(pin, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff", pin.stat().st_size - 100_000)  # inside a copied block
            os.fsync(fd)
        finally:
            os.close(fd)

    def outcome():
        d = m1.status()["destinations"][0]
        if d["state"] == "error":
            return d
        if m2.status()["last_played_delta_set"] >= n:
            return "played"
        return None

    d = wait_for("the destination to stop", outcome, sites_=(m1, m2))
    assert d != "played", f"delta set {n} was sent and played with a block damaged on the " \
                          f"primary's disk"
    assert f"delta set {n}" in d["error"] and "resync" in d["error"], d
    assert m2.status()["last_played_delta_set"] < n
    m1.expect(f"delta set {n}")
    m1.alive()
    start_replication(m1, m2, "--force")
    wait_converged(m1, m2, timeout=60)
    assert_same_tree(m1.path, m2.path)


# ----------------------------------------------------------------------------- the secondary


def test_damaged_delta_set_is_quarantined_and_asked_for_again(sites):
    m1, m2 = make_pair(sites, power1=False, power2=False)
    admin(m2.path, "replicate", "policy", "--playback-timeout", "3600")  # hold it unplayed
    data = os.urandom(600_000)
    (m1.path / "f").write_bytes(data)
    n = admin_cut(m1)
    wait_for("the secondary to receive it",
             lambda: m2.status()["last_received_delta_set"] == n, sites_=(m1, m2))
    assert m2.status()["last_played_delta_set"] == n - 1
    # the disk under the secondary damages the received delta set (after it was verified,
    # made durable and acknowledged): one flipped bit in the middle of its data
    ds = m2.site / "save" / "incoming" / f"{n}.ds"
    raw = bytearray(ds.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    with open(ds, "r+b") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    m2.expect(f"delta set {n}")  # the one ERROR line of the quarantine
    admin(m2.path, "replicate", "policy", "--playback-timeout", "0")
    st = wait_for("the quarantine", lambda: (
        m2.status() if m2.status()["quarantined_delta_sets"] else None), sites_=(m1, m2))
    q = st["quarantined_delta_sets"]
    assert len(q) == 1 and q[0]["delta_set"] == n and q[0]["at"], q
    kept = Path(q[0]["file"])
    assert kept.parent == m2.site / "save" / "quarantine" and kept.read_bytes() == raw
    assert "quarantined" in admin(m2.path, "status").stdout
    # asked for again, received again, played: the secondary equals the primary
    wait_converged(m1, m2, n, timeout=60)
    m2.alive()
    assert (m2.path / "f").read_bytes() == data
    assert_same_tree(m1.path, m2.path)
    assert m2.task("playback")["state"] == "running"
    lines = [ln for ln in log_lines(m2.site) if " ERROR " in ln and "quarantined" in ln]
    assert len(lines) == 1, lines  # once, never a crash loop
    # replication goes on
    (m1.path / "g").write_bytes(b"after")
    wait_converged(m1, m2, admin_cut(m1), timeout=60)
    assert_same_tree(m1.path, m2.path)


def test_secondary_disk_errors_are_retried(sites):
    m1 = sites("s1", power=False)
    m2 = sites("s2", power=True)
    m1.mount()
    m2.mount()
    (m1.path / "before").write_bytes(os.urandom(2 << 20))
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    # the initial copy: the secondary's disk fails the first writes of the staged copy
    rule = m2.pf.add_fault("s2/save/incoming/copy.ds", "write", errno="EIO", count=2)
    start_replication(m1, m2)  # retried by the send task until it goes through
    assert m2.pf.stats()["faults"][str(rule)] == 2
    name = f"send {m2.site.name}"
    assert m1.task(name)["errors"] >= 1 and "EIO" in m1.task(name)["last_error"]
    assert "EIO" in m2.task("receiver")["last_error"]
    m2.expect("receiver: EIO")
    wait_converged(m1, m2, timeout=60)
    assert_same_tree(m1.path, m2.path)
    # delta sets: the incoming area is full
    rule = m2.pf.add_fault("s2/save/incoming/*", "write", errno="ENOSPC")
    (m1.path / "f").write_bytes(os.urandom(400_000))
    n = admin_cut(m1)
    st = wait_for("the receiver to fail", lambda: (
        m2.task("receiver") if "ENOSPC" in (m2.task("receiver")["last_error"] or "") else None),
        sites_=(m1, m2))
    assert "ENOSPC" in st["last_error"] and st["error_kind"] == "transient", st
    assert m2.pf.stats()["faults"][str(rule)] >= 1
    errors = m1.task(name)["errors"]
    wait_for("the sender to see it", lambda: m1.task(name)["errors"] > errors,
             sites_=(m1, m2))
    m2.expect("receiver: ENOSPC")
    m2.alive()
    m2.pf.clear_faults()
    wait_converged(m1, m2, n, timeout=60)
    assert m2.task("receiver")["state"] == "running"
    assert_same_tree(m1.path, m2.path)
    assert count_lines(m2, "receiver: ENOSPC") == 1

    # the received delta set cannot be made durable (its fsync fails once): it is dropped
    # whole and sent again from its first chunk (a failed fsync may have lost pages)
    (m1.path / "h").write_bytes(os.urandom(300_000))
    rule = m2.pf.add_fault("s2/save/incoming/*", "fsync", errno="EIO", count=1)
    wait_converged(m1, m2, admin_cut(m1), timeout=60)
    assert m2.pf.stats()["faults"][str(rule)] == 1
    assert "EIO" in m2.task("receiver")["last_error"]
    assert_same_tree(m1.path, m2.path)

    # playback: the secondary's volume fails three writes; the playback task retries and
    # plays the delta set whole
    data = os.urandom(700_000)
    (m1.path / "g").write_bytes(data)
    rule = m2.pf.add_fault("s2/volume.img", "write", errno="EIO", skip=1, count=3)
    n = admin_cut(m1)
    st = wait_for("playback to fail", lambda: (
        m2.task("playback") if m2.task("playback")["errors"] else None), sites_=(m1, m2))
    assert "EIO" in st["last_error"] and st["last_error_at"], st
    m2.expect("playback: EIO")
    m2.alive()
    wait_converged(m1, m2, n, timeout=60)  # the rule is spent: playback succeeds again
    assert m2.pf.stats()["faults"][str(rule)] == 3
    assert m2.task("playback")["state"] == "running"
    assert (m2.path / "g").read_bytes() == data
    assert_same_tree(m1.path, m2.path)
    assert count_lines(m2, "playback: EIO") == 1

    # meta.lmdb: one durable LMDB commit on the secondary fails (lmdb.Error, not an OSError):
    # refused as busy and shown in status like any disk error, no traceback, then recovered
    (m1.path / "k").write_bytes(os.urandom(300_000))
    rule = m2.pf.add_fault("s2/meta.lmdb/*", "fsync", errno="EIO", count=1)
    n = admin_cut(m1)
    wait_converged(m1, m2, n, timeout=60)
    assert m2.pf.stats()["faults"][str(rule)] == 1
    errs = [t["last_error"] for t in m2.status()["tasks"].values() if t["last_error"]]
    assert any("Input/output error" in e for e in errs), errs
    m2.expect("Input/output error")
    assert count_lines(m2, "Traceback") == 0
    m2.alive()
    assert_same_tree(m1.path, m2.path)


def admin_cut(m1) -> int:
    out = json_cut(m1)
    assert out["state"] == "ready", out
    return out["delta_set"]


def json_cut(m1) -> dict:
    import json
    return json.loads(admin(m1.path, "replicate", "deltaset", json_out=True).stdout)

