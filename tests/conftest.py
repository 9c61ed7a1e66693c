"""Shared fixtures for every tier.

* ``make_fs`` / ``core_fs``: a FileSystem core on a fresh volume in tmp_path, no mount. After the
  test the core is checkpointed, reopened and fsck'd; any problem fails the test.
* ``mount``: a real `repfs mount` (daemonized, as a user would run it) of a fresh site; the
  teardown requires a clean `repfs umount` (exit 0), a clean fsck and a log without warnings,
  and always force-unmounts.
* Any WARNING or worse logged in the test process fails the test.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from repfs.fs.core import FileSystem
from repfs.fs.fsck import fsck
from repfs.fs.mkfs import mkfs
from repfs.volume import Volume

REPFS = [sys.executable, "-m", "repfs"]

# Property-based fuzzing (t0_fuzz, t1_fuzz_core): by default a bounded, reproducible run (the
# same examples every time, no example database); REPFS_FUZZ_EXAMPLES=N runs N examples per
# property with fresh random seeds, keeping failures in .hypothesis/ (git-ignored) to replay.
hypothesis_settings.register_profile(
    "repfs-ci", max_examples=200, deadline=None, derandomize=True, database=None,
    print_blob=True)
hypothesis_settings.register_profile(
    "repfs-long", max_examples=int(os.environ.get("REPFS_FUZZ_EXAMPLES") or 200), deadline=None,
    print_blob=True)
hypothesis_settings.load_profile("repfs-long" if os.environ.get("REPFS_FUZZ_EXAMPLES")
                                 else "repfs-ci")


def run_repfs(*args, check=True, timeout=120, prefix=(), **kw) -> subprocess.CompletedProcess:
    """`repfs ARGS`; `prefix` runs it under another command (tests/netns.py: nsenter --net)."""
    r = subprocess.run([*prefix, *REPFS, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"repfs {' '.join(map(str, args))} exited {r.returncode}: "
                             f"{r.stderr.strip()}")
    return r


def fsck_clean(site: Path) -> str:
    r = run_repfs("fsck", site, check=False)
    assert r.returncode == 0, f"fsck found problems:\n{r.stdout}{r.stderr}"
    return r.stdout


class CoreFactory:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.made: list[tuple[FileSystem, Path, Path]] = []

    def __call__(self, size: int = 256 << 20, inodes: int | None = None) -> FileSystem:
        n = len(self.made)
        img, jnl = self.tmp / f"vol{n}.img", self.tmp / f"journal{n}"
        dev = Volume.create(img, size // 4096)
        mkfs(dev, jnl, ninodes=inodes)
        fs = FileSystem(dev, jnl)
        self.made.append((fs, img, jnl))
        return fs

    def reopen(self, fs: FileSystem, readonly: bool = False) -> FileSystem:
        """Close cleanly and open again (what a remount does)."""
        for i, (f, img, jnl) in enumerate(self.made):
            if f is fs:
                fs.close()
                fs.dev.close()
                new = FileSystem(Volume(img), jnl, readonly=readonly)
                self.made[i] = (new, img, jnl)
                return new
        raise KeyError(fs)

    def check_all(self) -> None:
        for fs, img, jnl in self.made:
            if fs.journal.fd < 0:
                continue
            fs.close()
            fs.dev.close()
            ro = FileSystem(Volume(img), jnl, readonly=True)
            report = fsck(ro)
            ro.journal.close()
            ro.dev.close()
            assert report.clean, "fsck: " + "; ".join(p.message for p in report.problems)


@pytest.fixture
def make_fs(tmp_path):
    factory = CoreFactory(tmp_path)
    yield factory
    factory.check_all()


@pytest.fixture
def core_fs(make_fs):
    return make_fs()


class Mount:
    def __init__(self, site: Path, path: Path):
        self.site = site
        self.path = path
        self.expected_log: set[str] = set()

    def expect_log(self, needle: str) -> None:
        """A WARNING/ERROR line containing `needle` is this test's point: the teardown then
        requires it in the site's log (the window was hit) and ignores it, and only it."""
        self.expected_log.add(needle)

    def umount(self) -> None:
        run_repfs("umount", self.path)


def holders(mountpoint: Path) -> list[str]:
    """The processes with a working directory or an open file under `mountpoint`."""
    prefix, out = str(mountpoint), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/cwd")] + [
                os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            if any(x == prefix or x.startswith(prefix + "/") for x in links):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"{pid}: {cmd[:120]}")
        except OSError:
            continue
    return out


def umount_busy_tolerant(mountpoint: Path) -> subprocess.CompletedProcess:
    """`repfs umount` for a fixture's teardown: garbage (an unclosed iterator over the mount)
    is collected first, and a mount that is busy for a moment (another worker's process passing
    through) is tried again for up to 15 s; the error names who holds it."""
    gc.collect()
    deadline = time.monotonic() + 15
    while True:
        r = run_repfs("umount", mountpoint, check=False)
        if r.returncode == 0 or "busy" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def _wait_unmounted(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while os.path.ismount(path) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def mount_site(tmp_path):
    """Factory: mount_site(size='1G', extra mount args...) -> Mount; cleaned up afterwards."""
    mounts: list[Mount] = []

    def make(size: str = "1G", *args, name: str = "site", mkfs_args=()) -> Mount:
        site = tmp_path / name
        mnt = tmp_path / f"{name}-mnt"
        if not (site / "volume.img").exists():
            run_repfs("mkfs", site, "--size", size, *mkfs_args)
        mnt.mkdir(exist_ok=True)
        run_repfs("mount", site, mnt, *args)
        assert os.path.ismount(mnt)
        m = Mount(site, mnt)
        mounts.append(m)
        return m

    yield make
    errors = []
    for m in mounts:
        teardown_mount(m.path, m.site, m.expected_log, errors)
    assert not errors, "\n".join(errors)


def teardown_mount(path: Path, site: Path, expected_log, errors: list[str]) -> None:
    """A test mount's end: unmount (lazily if it must), then the site's log holds no
    WARNING/ERROR/Traceback except `expected_log` needles (each of which must appear), and,
    if nothing went wrong so far, fsck finds it clean. Problems are appended to `errors`."""
    try:
        if os.path.ismount(path):
            r = umount_busy_tolerant(path)
            if r.returncode != 0:
                errors.append(f"umount {path}: {r.stderr.strip()}; held by: "
                              f"{holders(path) or 'nobody any more'}")
    finally:
        if os.path.ismount(path):
            subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
            _wait_unmounted(path)
    log = site / "repfs.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    bad = [ln for ln in text.splitlines()
           if (" WARNING " in ln or " ERROR " in ln or "Traceback" in ln)
           and not any(x in ln for x in expected_log)]
    if bad:
        errors.append(f"{log} has warnings: {bad[:3]}")
    missing = [x for x in expected_log if x not in text]
    if missing:
        errors.append(f"{log} lacks the expected lines: {missing}")
    if not errors:
        r = run_repfs("fsck", site, check=False)
        if r.returncode != 0:
            errors.append(f"fsck {site}: exit {r.returncode}\n{r.stdout}{r.stderr}")


@pytest.fixture
def mount(mount_site):
    return mount_site()


@pytest.fixture(autouse=True)
def _no_warnings_logged(caplog):
    yield
    bad = [r for r in caplog.get_records("call") if r.levelno >= logging.WARNING]
    assert not bad, "unexpected log records: " + "; ".join(r.getMessage() for r in bad)
