"""Tier 2: edges a user hits through a real mount and the command line — values out of range,
file handles, mount options, O_DIRECT against the page cache, bad mkfs arguments.

Each test mounts its own small site (the `mount_site` fixture checks a clean umount, a clean
fsck and a log without warnings afterwards)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fsck_clean, run_repfs

AT_FDCWD = -100
SYS_PY = "/usr/bin/python3"  # readable by every uid
libc = ctypes.CDLL(None, use_errno=True)


def sh(cmd, *, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}: {r.stderr.strip()}")
    return r


def mount_options(path: Path) -> set[str]:
    """The per-mount options the kernel shows for `path` (findmnt -no OPTIONS)."""
    return set(sh(["findmnt", "-no", "OPTIONS", "--mountpoint", path]).stdout.strip()
               .split(","))


def daemon_alive(site: Path) -> bool:
    try:
        pid = int((site / "repfs.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return os.path.exists(f"/proc/{pid}")


# ----------------------------------------------------------------------------- times


def test_times_out_of_range_are_clamped_and_the_commit_survives(mount_site):
    """`touch -d 'May 30 2514' f` once killed the daemon at the next commit and lost that
    commit's changes. Times outside the format's range (1677-09-21..2262-04-11) are clamped
    to it, as ext4 clamps to its own range."""
    mnt = mount_site("64M")
    m = mnt.path
    (m / "before").write_bytes(b"written just before")
    for name in ("future", "past", "big", "now"):
        (m / name).write_bytes(name.encode())
    sh(["touch", "-d", "May 30 2514", m / "future"])
    sh(["touch", "-d", "@-99999999999", m / "past"])  # the year -1199
    sh(["touch", "-m", "-d", f"@{2**62}", m / "big"])  # far past anything time_t dates
    fd = os.open(m / "now", os.O_RDONLY)
    try:
        os.fsync(fd)  # a commit: it used to fail here and take the mount down
    finally:
        os.close(fd)
    hi, lo = 2**63 - 1, -(2**63)
    assert os.stat(m / "future").st_mtime_ns == hi
    assert os.stat(m / "future").st_atime_ns == hi
    assert os.stat(m / "past").st_mtime_ns == lo
    assert os.stat(m / "big").st_mtime_ns == hi
    assert daemon_alive(mnt.site) and os.path.ismount(m)
    assert (m / "before").read_bytes() == b"written just before"
    # values the format cannot hold are refused at the request, never at the commit
    f = m / "before"
    with pytest.raises(OSError) as ei:
        os.truncate(f, (4 << 40) + 1)  # past MAX_FILE_SIZE
    assert ei.value.errno == errno.EFBIG
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user." + "n" * 251, b"v")
    assert ei.value.errno == errno.ERANGE
    os.chown(f, 2**32 - 2, 2**32 - 2)  # the largest valid ids
    os.mknod(m / "dev", stat.S_IFCHR | 0o600, os.makedev(4095, 2**20 - 1))  # the largest rdev
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert daemon_alive(mnt.site)
    mnt.umount()
    mnt = mount_site("64M")
    m = mnt.path
    assert (m / "before").read_bytes() == b"written just before"
    assert os.stat(m / "future").st_mtime_ns == hi and os.stat(m / "past").st_mtime_ns == lo
    # what `stat` prints: the last instant the format holds
    assert sh(["date", "-u", "-r", m / "future", "+%Y-%m-%d"]).stdout.strip() == "2262-04-11"
    st = os.stat(m / "before")
    assert (st.st_uid, st.st_gid, st.st_size) == (2**32 - 2, 2**32 - 2, 19)
    assert os.stat(m / "dev").st_rdev == os.makedev(4095, 2**20 - 1)


# ----------------------------------------------------------------------------- file handles


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def name_to_handle(path: Path) -> bytes:
    fh = _FileHandle()
    fh.handle_bytes = 128
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(fh),
                              ctypes.byref(mount_id), 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    return bytes(fh)


def open_by_handle(mount_path: Path, handle: bytes, flags: int = os.O_RDONLY) -> int:
    mfd = os.open(mount_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fh = _FileHandle.from_buffer_copy(handle)
        fd = libc.open_by_handle_at(mfd, ctypes.byref(fh), flags)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    finally:
        os.close(mfd)


def test_file_handles_survive_a_remount(mount_site):
    """name_to_handle_at + open_by_handle_at (what NFS re-export and backup tools use), for a
    file and a directory. Across a remount the kernel has no cached inode, so it must decode
    the handle by looking up "." in the inode itself — what failed with ESTALE for files.
    A handle of a deleted file is stale."""
    mnt = mount_site("64M")
    m = mnt.path
    os.makedirs(m / "d/sub")
    (m / "d/sub/f").write_bytes(b"file by handle")
    (m / "gone").write_bytes(b"deleted later")
    handles = {name: name_to_handle(m / name) for name in ("d/sub/f", "d/sub", "gone")}

    def check(m: Path) -> None:
        fd = open_by_handle(m, handles["d/sub/f"])
        try:
            assert os.read(fd, 100) == b"file by handle"
            assert os.fstat(fd).st_ino == os.stat(m / "d/sub/f").st_ino
        finally:
            os.close(fd)
        fd = open_by_handle(m, handles["d/sub"], os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert os.listdir(fd) == ["f"]
            assert os.readlink(f"/proc/self/fd/{fd}") == str(m / "d/sub")
        finally:
            os.close(fd)

    check(m)  # with the kernel's inode cache warm
    os.unlink(m / "gone")
    mnt.umount()
    mnt = mount_site("64M")  # a fresh kernel inode cache: every handle goes through lookup "."
    check(mnt.path)
    with pytest.raises(OSError) as ei:
        open_by_handle(mnt.path, handles["gone"])
    assert ei.value.errno == errno.ESTALE
    # the inode number is reused by a new file: the generation tells them apart
    for i in range(4):
        (mnt.path / f"new{i}").write_bytes(b"new")
    with pytest.raises(OSError) as ei:
        open_by_handle(mnt.path, handles["gone"])
    assert ei.value.errno == errno.ESTALE


# ----------------------------------------------------------------------------- mkfs


def _fails_one_line(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("repfs: ") and "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_mkfs_size_must_be_a_positive_finite_size(tmp_path):
    """--size: nan/inf/1e400 once ended in a traceback and 0.5 made a 0-byte request; now
    everything that is not a positive finite size is refused (exit 2), and nothing is left
    behind — not even the directories mkfs would have made."""
    from repfs.cli import QuietError, parse_size
    for bad, word in (("nan", "finite"), ("inf", "finite"), ("-inf", "finite"),
                      ("Infinity", "finite"), ("sNaN", "finite"), ("1e400", "too large"),
                      ("1e400K", "too large"), ("-1", "positive"), ("0", "positive"),
                      ("-0", "positive"), ("0.5", "less than one byte"),
                      ("0.0001K", "less than one byte"), ("", "bad size"),
                      ("1.5.5G", "bad size"), ("G", "bad size"), ("1e3X", "bad size")):
        with pytest.raises(QuietError) as ei:
            parse_size(bad)
        assert ei.value.code == 2 and word in str(ei.value), (bad, str(ei.value))
    assert [parse_size(t) for t in ("1.5M", "1e6", "64MiB", " 4096 ", "1e30")] == [
        1536 << 10, 10**6, 64 << 20, 4096, 10**30]
    # through the command line: one line, exit 2, nothing made
    parent = tmp_path / "a"
    for bad, word in (("nan", "finite"), ("0.5", "less than one byte"), ("1.5K", "too small"),
                      ("1e30", "too large"), ("20T", "too large")):
        r = run_repfs("mkfs", parent / "b/site", f"--size={bad}", check=False)
        _fails_one_line(r, 2, word)
        assert not parent.exists(), bad
    # a failure inside mkfs (too few inodes) removes the directories it made, too
    r = run_repfs("mkfs", parent / "b/site", "--size", "64M", "--inodes", "5", check=False)
    _fails_one_line(r, 1, "inode")
    assert not parent.exists()
    # ...but never a directory that was there before, nor what it held
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine").write_text("x")
    r = run_repfs("mkfs", keep, "--size", "64M", "--inodes", "5", check=False)
    _fails_one_line(r, 1, "inode")
    assert sorted(os.listdir(keep)) == ["mine"]
    # a fraction is fine: rounded down to whole 4 KiB blocks
    run_repfs("mkfs", tmp_path / "ok", "--size", "1.5e6", "--inodes", "64")
    from repfs.fs.format import Superblock
    sb = Superblock.unpack((tmp_path / "ok/volume.img").read_bytes()[:4096])
    assert sb.nblocks == 1_500_000 // 4096


def test_any_label_or_directory_name_gives_a_readable_site_toml(tmp_path):
    """site.toml is written by a TOML writer: a label or a directory name with '"' or '\\'
    once wrote a file that no later mount could read."""
    import tomllib

    from repfs.site import Site
    for i, label in enumerate(('quote"d', "back\\slash", 'both \\" and \n newline', "")):
        site = Site.create(tmp_path / f's{i} "q" \\b', 1 << 20, label=label)
        text = (site.path / "site.toml").read_text()
        assert "# repfs site configuration" in text  # the commented template stays
        cfg = tomllib.loads(text)
        assert cfg["site"]["name"] == (label or site.path.name)
        assert cfg["fs"]["commit_interval"] == 5.0
    # and a mount reads it
    site = tmp_path / 'dir "with" \\ quotes'
    run_repfs("mkfs", site, "--size", "1M", "--label", 'a "label" \\ too')
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        run_repfs("mount", site, mnt)
        assert os.path.ismount(mnt)
        run_repfs("umount", mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    fsck_clean(site)


# ----------------------------------------------------------------------------- mount options

UID = 1000


def _run_as(uid: int, cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    """Run `cmd` as uid/gid `uid` (no groups) with its cwd entered as root first (the test's
    tmp directories are not searchable by others; the mount's root is)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           *map(str, cmd)], cwd=cwd, capture_output=True, text=True, timeout=60)


def _setuid_id(m: Path) -> None:
    """A set-uid-root copy of id(1) on the mount: `./id -u` prints 0 only if set-uid works."""
    data = Path("/usr/bin/id").read_bytes()
    (m / "id").write_bytes(data)
    os.chown(m / "id", 0, 0)
    os.chmod(m / "id", 0o4755)


def _script(m: Path) -> Path:
    p = m / "script.sh"
    p.write_text("#!/bin/sh\necho ran\n")
    os.chmod(p, 0o755)
    return p


def _old_atime(p: Path) -> int:
    """Set p's atime to long ago (so relatime would update it on the next read)."""
    old = 1_000_000_000 * 10**9
    os.utime(p, ns=(old, os.stat(p).st_mtime_ns))
    return old


def test_mount_options_are_honoured(mount_site, tmp_path):
    """nosuid, nodev, noexec, noatime, nodiratime and ro from `repfs mount -o` and from
    `mount -t fuse.repfs -o` (fstab) reach the kernel and the daemon; without them a root
    mount has set-uid, devices and relatime (the daemon used to add suid,dev whatever fstab
    said, and the helper refused nodiratime)."""
    # the defaults of a root mount
    mnt = mount_site("64M")
    m = mnt.path
    _setuid_id(m)
    os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    _script(m)
    assert _run_as(UID, ["./id", "-u"], m).stdout.strip() == "0"
    with open(m / "null", "wb") as f:
        f.write(b"discarded")
    assert sh([m / "script.sh"]).stdout == "ran\n"
    (m / "data").write_bytes(b"x")
    old = _old_atime(m / "data")
    (m / "data").read_bytes()
    assert os.stat(m / "data").st_atime_ns > old  # relatime
    flags = os.statvfs(m).f_flag
    assert not flags & (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_RDONLY)
    mnt.umount()

    # repfs mount -o
    mnt = mount_site("64M", "-o", "nosuid,nodev,noatime,nodiratime")
    m = mnt.path
    flags = os.statvfs(m).f_flag
    assert flags & os.ST_NOSUID and flags & os.ST_NODEV and flags & os.ST_NOATIME
    assert {"nosuid", "nodev", "noatime"} <= mount_options(m)
    assert _run_as(UID, ["./id", "-u"], m).stdout.strip() == str(UID)  # set-uid ignored
    with pytest.raises(PermissionError):
        open(m / "null", "wb")
    old = _old_atime(m / "data")
    (m / "data").read_bytes()
    assert os.stat(m / "data").st_atime_ns == old  # noatime: the daemon leaves it
    mnt.umount()

    # fstab's way: mount(8) runs the helper mount.fuse.repfs
    site, m = mnt.site, mnt.path
    try:
        sh(["mount", "-t", "fuse.repfs", "-o", "ro,noexec,nosuid,nodiratime,_netdev", site, m])
        flags = os.statvfs(m).f_flag
        assert flags & os.ST_NOEXEC and flags & os.ST_RDONLY and flags & os.ST_NOSUID
        with pytest.raises(PermissionError):
            subprocess.run([m / "script.sh"], timeout=30)
        with pytest.raises(OSError) as ei:
            open(m / "new", "w")
        assert ei.value.errno == errno.EROFS
        assert (m / "data").read_bytes() == b"x"
    finally:
        r = run_repfs("umount", m, check=False)
        if os.path.ismount(m):
            subprocess.run(["fusermount3", "-u", "-z", str(m)], check=False)
    assert r.returncode == 0, r.stderr
    r = run_repfs("mount", site, m, "-o", "bogus", check=False)
    assert r.returncode == 2 and "unknown mount option 'bogus'" in r.stderr
    r = run_repfs("mount", site, m, "-o", "noatime,diratime", check=False)
    assert r.returncode == 2 and "'diratime' is not supported" in r.stderr
    assert not os.path.ismount(m)


def test_remount_read_only_and_back(mount_site):
    """`mount -o remount,ro` and `remount,rw` (mount(8) runs the helper, which has the daemon
    remount): read-only, writes fail with EROFS and reads change no access time; back to
    read-write, everything works and nothing was lost."""
    mnt = mount_site("64M", "-o", "nodev")
    m = mnt.path
    (m / "a").write_bytes(b"before the remount")
    old = _old_atime(m / "a")
    busy = open(m / "busy", "w")  # open for writing: a remount to read-only is refused
    try:
        r = sh(["mount", "-o", "remount,ro", m], check=False)
        assert r.returncode != 0 and "busy" in r.stderr.lower(), r.stderr
        assert not os.statvfs(m).f_flag & os.ST_RDONLY
    finally:
        busy.close()
    sh(["mount", "-o", "remount,ro", m])
    assert os.statvfs(m).f_flag & os.ST_RDONLY and "ro" in mount_options(m)
    assert "nodev" in mount_options(m)  # the other options stay as they were
    for fn in (lambda: open(m / "b", "w"), lambda: open(m / "a", "r+"),
               lambda: os.mkdir(m / "d"), lambda: os.unlink(m / "a"),
               lambda: os.utime(m / "a")):
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno == errno.EROFS
    assert (m / "a").read_bytes() == b"before the remount"
    assert os.stat(m / "a").st_atime_ns == old  # a read-only file system updates no atime
    # the command line's own way back
    run_repfs("mount", mnt.site, m, "-o", "remount,rw")
    assert not os.statvfs(m).f_flag & os.ST_RDONLY and "nodev" in mount_options(m)
    (m / "b").write_bytes(b"after the remount")
    assert os.stat(m / "a").st_atime_ns == old  # the read while read-only was not recorded
    sh(["mount", "-o", "remount,ro", m])
    sh(["mount", "-o", "remount,rw", m])
    # mount(8) passes the merged list: a flag turned back on is a 'no…' word left out
    sh(["mount", "-o", "remount,dev,noexec,nosuid", m])
    assert {"noexec", "nosuid"} <= set(mount_options(m)) and "nodev" not in mount_options(m)
    sh(["mount", "-o", "remount,exec", m])
    assert "noexec" not in mount_options(m) and "nosuid" in mount_options(m)
    (m / "c").write_bytes(b"c")
    r = run_repfs("mount", "x", "/proc", "-o", "remount,ro", check=False)
    assert r.returncode == 1 and "not a repfs mount point" in r.stderr
    r = _run_as(UID, [sys.executable, "-m", "repfs", "mount", "-o", "remount,ro", "x", m], m)
    assert r.returncode == 1 and "only root" in r.stderr, r.stderr
    assert not os.statvfs(m).f_flag & os.ST_RDONLY
    mnt.umount()
    mnt = mount_site("64M")
    m = mnt.path
    assert (m / "a").read_bytes() == b"before the remount"
    assert (m / "b").read_bytes() == b"after the remount" and (m / "c").read_bytes() == b"c"


def _admin(target: Path, *args) -> dict:
    """repfs-admin --json, run in this process (its own entry point; cheaper than a process)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from repfs.cli import run_cli
    from repfs.cli.admin import _main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = run_cli("repfs-admin", _main, ["--site", str(target), "--json", *map(str, args)])
    assert rc == 0, f"repfs-admin {args}: exit {rc}: {err.getvalue().strip()}"
    return json.loads(out.getvalue())


def test_site_paths_with_any_characters_mount(mount_site, tmp_path):
    """A site (and a mount point) whose path holds ',', '\\', a space, a newline, '@' or '#'
    mounts, answers status, mounts its snapshots and unmounts: the daemon escapes the path in
    libfuse's fsname option (a ',' used to split it into options: 'fuse_session_new()
    failed', and a path holding ',ro' or ',nodev' added those options), and the mount table
    is read back exactly (the kernel shows the path octal-escaped). A snapshot of a site
    whose path is longer than a Unix socket's address mounts too (its socket was put in the
    site's directory: 'AF_UNIX path too long', a 500)."""
    from repfs.common import mount_site as site_of, repfs_mounts
    mnt = mount_site("64M", name="a,ro,nodev")
    assert repfs_mounts()[str(mnt.path)] == str(mnt.site)
    assert not os.statvfs(mnt.path).f_flag & (os.ST_RDONLY | os.ST_NODEV)  # none from the path
    mnt.umount()

    name = "b\\c d\ne@f#g,h-" + "long" * 20  # (a path longer than a Unix socket's 107 bytes)
    mnt = mount_site("64M", name=name)
    m, site = mnt.path, mnt.site
    assert repfs_mounts()[str(m)] == str(site)
    (m / "f").write_bytes(b"data")
    st = _admin(m, "status")
    assert st["site"] == str(site) and st["state"] == "mounted"
    # its snapshot's mount: fsname SITE@NAME, read back exactly
    _admin(m, "snapshot", "create", "s1")
    smnt = tmp_path / "snap, \\\n@mnt"
    smnt.mkdir()
    _admin(m, "snapshot", "mount", "s1", smnt)
    try:
        assert repfs_mounts()[str(smnt)] == f"{site}@s1"
        assert site_of(f"{site}@s1") == str(site)  # ('@' in the site's path too)
        assert (smnt / "f").read_bytes() == b"data"
        assert _admin(smnt, "status")["site"] == str(site)  # the snapshot's mount finds its site
        run_repfs("umount", smnt)
    finally:
        if os.path.ismount(smnt):
            subprocess.run(["fusermount3", "-u", "-z", str(smnt)], check=False)
    mnt.umount()
    assert str(m) not in repfs_mounts()
    # fstab's way: mount(8) runs the helper with the path as it is
    try:
        sh(["mount", "-t", "fuse.repfs", site, m])
        assert repfs_mounts()[str(m)] == str(site)
        assert (m / "f").read_bytes() == b"data"
    finally:
        r = run_repfs("umount", m, check=False)
        if os.path.ismount(m):
            subprocess.run(["fusermount3", "-u", "-z", str(m)], check=False)
    assert r.returncode == 0, r.stderr


def _remount_request(site: Path, body: dict) -> tuple[int, dict]:
    """POST /v1/remount straight to the site's control port (what the mount helper sends)."""
    import http.client
    ctl = json.loads((site / "control.json").read_text())
    token = (site / "control.token").read_text().strip()
    conn = http.client.HTTPConnection(ctl["host"], ctl["port"], timeout=120)
    try:
        conn.request("POST", "/v1/remount", json.dumps(body),
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_concurrent_remounts_take_turns(mount_site):
    """Two remounts at once: the second waits for the first and applies its options over the
    first one's result (the request-file protocol answered one of them and left the other to
    time out after 60 s). Proven to overlap: the daemon logs the remount that waited."""
    import threading
    mnt = mount_site("64M")
    m, site = mnt.path, mnt.site
    log = site / "repfs.log"

    def both(a: dict, b: dict) -> list:
        out = [None, None]
        go = threading.Barrier(2)

        def run(i, body):
            go.wait()
            out[i] = _remount_request(site, body)
        ts = [threading.Thread(target=run, args=(i, body)) for i, body in enumerate((a, b))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=300)
        return out

    waits = 0
    for _ in range(10):
        (m / "f").write_bytes(os.urandom(1 << 20))  # something for the consistency point
        r = both({"options": "ro"}, {"options": "noatime"})
        assert [s for s, _ in r] == [200, 200], r
        # whichever ran second kept what the first had done
        assert os.statvfs(m).f_flag & os.ST_RDONLY and {"ro", "noatime"} <= mount_options(m)
        r = both({"readonly": False}, {"options": "relatime"})
        assert [s for s, _ in r] == [200, 200], r
        assert not os.statvfs(m).f_flag & os.ST_RDONLY and "relatime" in mount_options(m)
        waits = log.read_text().count("waits for the one under way")
        if waits:
            break
    assert waits >= 1, "no remount ever waited for another: the window was not hit"
    (m / "g").write_bytes(b"written after the remounts")

    # the same through mount(8) and the helper, both at once
    procs = [subprocess.Popen(["mount", "-o", "remount,ro", str(m)], stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
        p.stderr.close()
    assert os.statvfs(m).f_flag & os.ST_RDONLY
    sh(["mount", "-o", "remount,rw", m])

    # bad requests: 400 with the reason, nothing changed
    for body, words in (({"options": 5}, "bad options"), ({"options": "ro,bogus"}, "bogus"),
                        ({"readonly": "yes"}, "readonly"), ({"options": "ro\n"}, "bad options")):
        status, doc = _remount_request(site, body)
        assert status == 400 and words in doc["error"], (body, status, doc)
    assert not os.statvfs(m).f_flag & os.ST_RDONLY
    assert (m / "g").read_bytes() == b"written after the remounts"


# ----------------------------------------------------------------------------- O_DIRECT

_RACE = r"""
import mmap, os, random, sys
path, role, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
N, BS = 64, 4096
if role == "writer":  # O_DIRECT writes of random extents, each round its own byte value
    rnd = random.Random(7)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 16 * BS)
    state = bytearray(N)
    for r in range(rounds):
        a = rnd.randrange(N); n = rnd.randint(1, min(16, N - a)); v = r % 250 + 1
        buf[:n * BS] = bytes([v]) * (n * BS)
        os.pwrite(fd, memoryview(buf)[:n * BS], a * BS)
        state[a:a + n] = bytes([v]) * n
    os.close(fd)
    open(path + ".done", "w").close()
    sys.stdout.write(state.hex())
else:  # buffered reads until the writer is done; count the changes seen (the race window)
    rnd = random.Random(int(role))
    changes, last = 0, None
    f = open(path, "rb")
    while not os.path.exists(path + ".done"):
        f.seek(0)
        data = f.read()
        if last is not None and data != last:
            changes += 1
        last = data
        if rnd.random() < 0.2:
            f.close(); f = open(path, "rb")
    sys.stdout.write(str(changes))
"""


def _resident(p: Path) -> int:
    return int(sh(["fincore", "--bytes", "--noheadings", "-o", "RES", p]).stdout)


def test_o_direct_writes_leave_no_stale_page_cache(mount_site):
    """After O_DIRECT writes raced buffered readers, a later buffered read returned stale data:
    opens kept the kernel's page cache. A file opened with O_DIRECT is opened without it."""
    mnt = mount_site("64M")
    m = mnt.path
    # the mechanism, seen with fincore(1) (whose own open is the later open)
    for name in ("plain", "direct"):
        (m / name).write_bytes(os.urandom(1 << 20))
    os.close(os.open(m / "direct", os.O_RDONLY | os.O_DIRECT))
    for name in ("plain", "direct"):
        (m / name).read_bytes()  # into the page cache
    assert _resident(m / "plain") == 1 << 20  # kept across opens, as before
    assert _resident(m / "direct") == 0  # dropped at the open
    # the race: one O_DIRECT writer, two buffered readers (other processes)
    f = m / "raced"
    f.write_bytes(bytes(64 * 4096))
    readers = [subprocess.Popen([SYS_PY, "-c", _RACE, f, str(i), "0"], stdout=subprocess.PIPE,
                                text=True) for i in (1, 2)]
    w = sh([SYS_PY, "-c", _RACE, f, "writer", "1500"])
    changes = [int(r.communicate(timeout=60)[0]) for r in readers]
    assert sum(changes) >= 1, "the readers never overlapped the writer: the race was not hit"
    want = b"".join(bytes([v]) * 4096 for v in bytes.fromhex(w.stdout))
    assert f.read_bytes() == want  # a later buffered read in a new open
    with open(f, "rb") as g:
        assert g.read() == want
