"""Tier 2: a real `repfs mount`, driven by ordinary file I/O from other processes and other
users, compared against what ext4 does."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import pickle
import random
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import fsck_clean, run_repfs

SYS_PY = "/usr/bin/python3"  # readable by every uid, unlike root's pyenv shims
UID_A, UID_B = 1000, 1001
SETPRIV = ["setpriv", "--reuid={u}", "--regid={g}", "--clear-groups"]
AT_FDCWD = -100
SYS_RENAMEAT2 = 316  # x86_64
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


# ----------------------------------------------------------------------------- helpers


def sh(cmd, *, cwd=None, user=None, check=True, input=None, timeout=120):
    """Run a command in another process (optionally as uid `user`, gid = uid, no groups)."""
    if isinstance(cmd, str):
        cmd = ["sh", "-c", cmd]
    cmd = [str(c) for c in cmd]
    if user is not None:
        cmd = [a.format(u=user, g=user) for a in SETPRIV] + cmd
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, input=input, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return r


def as_user(uid, fn, *, cwd, gid=None, groups=(), umask=0o022):
    """Run fn() in a forked child as `uid` with its cwd at `cwd` (entered as root, so the
    test's private tmp directories need not be searchable). Returns fn()'s value; an OSError
    in the child is raised again here with its errno."""
    gid = uid if gid is None else gid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            try:
                os.chdir(cwd)
                os.umask(umask)
                os.setgroups(list(groups))
                os.setgid(gid)
                os.setuid(uid)
                res = ("ok", fn())
            except OSError as e:
                res = ("oserror", e.errno)
            data = pickle.dumps(res)
        except BaseException as e:  # noqa: BLE001
            data = pickle.dumps(("exc", repr(e)))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    kind, val = pickle.loads(b"".join(chunks))
    if kind == "oserror":
        raise OSError(val, os.strerror(val))
    if kind == "exc":
        raise AssertionError(f"child failed: {val}")
    return val


def errno_of(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


def expect(err, fn, *args, **kw):
    got = errno_of(fn, *args, **kw)
    assert got == err, (f"{getattr(fn, '__name__', fn)}{args}: expected "
                        f"{errno.errorcode.get(err, err)}, got {errno.errorcode.get(got, got)}")


def user_errno(uid, fn, *, cwd, **kw):
    """errno of fn() run as uid (0 if it succeeded)."""
    try:
        as_user(uid, fn, cwd=cwd, **kw)
    except OSError as e:
        return e.errno
    return 0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit(mnt: Path) -> None:
    """Make the daemon commit (fsync on any file is a group commit)."""
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_statfs(mnt: Path, ok, timeout: float = 10.0):
    """statvfs once `ok(st)` holds: freed space shows after the kernel's FORGET for an
    unlinked inode has arrived and a commit has applied the frees."""
    deadline = time.monotonic() + timeout
    while True:
        commit(mnt)
        st = os.statvfs(mnt)
        if ok(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old, new, flags) -> None:
    r = _libc.syscall(SYS_RENAMEAT2, AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new),
                      flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def mode_of(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def read_as(uid, name, *, cwd):
    def rd():
        with open(name, "rb") as f:
            return f.read()
    return as_user(uid, rd, cwd=cwd)


def write_as(uid, name, data, *, cwd, off=None):
    def wr():
        fd = os.open(name, os.O_WRONLY)
        try:
            if off is None:
                return os.write(fd, data)
            return os.pwrite(fd, data, off)
        finally:
            os.close(fd)
    return as_user(uid, wr, cwd=cwd)


# ----------------------------------------------------------------------------- a shared mount
#
# Most tests here need a mount but not a fresh one: they share one per module, each in its own
# directory, which saves a mkfs/mount/umount/fsck per test. Its teardown checks what the
# `mount` fixture checks (clean `repfs umount`, clean fsck, a log without warnings), after all
# of them, so damage done by any of them is caught.


class Shared:
    def __init__(self, path: Path, site: Path, root: Path):
        self.path, self.site, self.root = path, site, root


@pytest.fixture(scope="module")
def _shared_site(tmp_path_factory):
    base = tmp_path_factory.mktemp("shared")
    site, mnt = base / "site", base / "mnt"
    mnt.mkdir()
    run_repfs("mkfs", site, "--size", "1G")
    run_repfs("mount", site, mnt)
    errors = []
    try:
        yield site, mnt
    finally:
        if os.path.ismount(mnt):
            r = run_repfs("umount", mnt, check=False)
            if r.returncode != 0:
                errors.append(f"umount {mnt}: {r.stderr.strip()}")
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        bad = [ln for ln in (site / "repfs.log").read_text().splitlines()
               if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
        if bad:
            errors.append(f"the shared site's log has warnings: {bad[:3]}")
        r = run_repfs("fsck", site, check=False)
        if r.returncode != 0:
            errors.append(f"fsck of the shared site: exit {r.returncode}\n{r.stdout}{r.stderr}")
    assert not errors, "\n".join(errors)


@pytest.fixture
def shared(_shared_site, request):
    site, mnt = _shared_site
    assert os.path.ismount(mnt), "the shared mount is gone (an earlier test broke it)"
    d = mnt / request.node.name
    d.mkdir()
    os.chmod(d, 0o755)
    return Shared(d, site, mnt)


# ----------------------------------------------------------------------------- I/O tools


def test_ordinary_tools_from_other_processes(shared, tmp_path):
    m = shared.path
    src = tmp_path / "src.bin"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(payload)
    sh(["cp", src, m / "copy.bin"])
    assert sh(["sha256sum", m / "copy.bin"]).stdout.split()[0].decode() == sha(payload)
    assert sh(["cat", m / "copy.bin"]).stdout == payload
    # dd into the middle without truncating, from yet another process
    sh(["dd", "if=/dev/zero", f"of={m / 'copy.bin'}", "bs=4096", "seek=3", "count=2",
        "conv=notrunc", "status=none"])
    want = payload[:3 * 4096] + bytes(2 * 4096) + payload[5 * 4096:]
    assert (m / "copy.bin").read_bytes() == want
    # python -c in another process appends
    sh([SYS_PY, "-c", "import sys; open(sys.argv[1], 'ab').write(b'tail')", m / "copy.bin"])
    want += b"tail"
    assert hashlib.sha256((m / "copy.bin").read_bytes()).hexdigest() == sha(want)
    # mv, ln, ln -s, stat
    sh(["mkdir", "-p", m / "a/b/c"])
    sh(["mv", m / "copy.bin", m / "a/b/c/moved.bin"])
    assert not (m / "copy.bin").exists()
    sh(["ln", m / "a/b/c/moved.bin", m / "a/hard"])
    sh(["ln", "-s", "b/c/moved.bin", m / "a/soft"])
    out = sh(["stat", "-c", "%s %h %F", m / "a/hard"]).stdout.decode().split(" ", 2)
    assert out[0] == str(len(want)) and out[1] == "2" and out[2].strip() == "regular file"
    assert sh(["stat", "-c", "%F", m / "a/soft"]).stdout.decode().strip() == "symbolic link"
    assert sh(["readlink", m / "a/soft"]).stdout.decode().strip() == "b/c/moved.bin"
    assert sh(["sha256sum", m / "a/soft"]).stdout.split()[0].decode() == sha(want)
    # cp -a of a tree, diff -r against the source
    sh(["cp", "-a", m / "a", m / "a2"])
    sh(["diff", "-r", m / "a", m / "a2"])
    sh(["rm", "-rf", m / "a", m / "a2"])
    assert os.listdir(m) == []


# ----------------------------------------------------------------------------- permissions


def test_non_owner_cannot_write(shared):
    m = shared.path
    os.mkdir(m / "pub")
    os.chmod(m / "pub", 0o777)

    def make():
        fd = os.open("pub/a", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        os.write(fd, b"from A")
        os.close(fd)
        return os.stat("pub/a").st_uid
    assert as_user(UID_A, make, cwd=m) == UID_A
    assert mode_of(m / "pub/a") == 0o644
    # B may read, but not write, truncate, utime(now), set an xattr, chmod or chown
    assert read_as(UID_B, "pub/a", cwd=m) == b"from A"
    assert user_errno(UID_B, lambda: os.open("pub/a", os.O_WRONLY), cwd=m) == errno.EACCES
    assert user_errno(UID_B, lambda: os.open("pub/a", os.O_RDWR), cwd=m) == errno.EACCES
    assert user_errno(UID_B, lambda: os.open("pub/a", os.O_RDONLY | os.O_TRUNC),
                      cwd=m) == errno.EACCES
    assert user_errno(UID_B, lambda: os.truncate("pub/a", 0), cwd=m) == errno.EACCES
    assert user_errno(UID_B, lambda: os.utime("pub/a"), cwd=m) == errno.EACCES
    assert user_errno(UID_B, lambda: os.utime("pub/a", ns=(1, 1)), cwd=m) == errno.EPERM
    assert user_errno(UID_B, lambda: os.setxattr("pub/a", "user.x", b"1"),
                      cwd=m) == errno.EACCES
    assert user_errno(UID_B, lambda: os.chmod("pub/a", 0o666), cwd=m) == errno.EPERM
    assert user_errno(UID_B, lambda: os.chown("pub/a", UID_B, UID_B), cwd=m) == errno.EPERM
    # the same through a shell in another process
    r = sh("echo B >> pub/a", cwd=m, user=UID_B, check=False)
    assert r.returncode != 0 and b"Permission denied" in r.stderr
    r = sh(["chmod", "666", "pub/a"], cwd=m, user=UID_B, check=False)
    assert r.returncode != 0 and b"Operation not permitted" in r.stderr
    assert (m / "pub/a").read_bytes() == b"from A"
    assert mode_of(m / "pub/a") == 0o644
    # the owner may; root may
    sh("echo A >> pub/a", cwd=m, user=UID_A)
    assert (m / "pub/a").read_bytes() == b"from AA\n"
    with open(m / "pub/a", "ab") as f:
        f.write(b"root")
    assert read_as(UID_B, "pub/a", cwd=m) == b"from AA\nroot"
    # chgrp by the owner to a group it is not in: EPERM; chmod by the owner: fine
    assert user_errno(UID_A, lambda: os.chown("pub/a", -1, 1234), cwd=m) == errno.EPERM
    as_user(UID_A, lambda: os.chmod("pub/a", 0o600), cwd=m)
    assert mode_of(m / "pub/a") == 0o600
    assert user_errno(UID_B, lambda: open("pub/a", "rb"), cwd=m) == errno.EACCES
    # group permissions: B in the file's group may read a 0640 file, not write it
    os.chown(m / "pub/a", UID_A, 4321)
    os.chmod(m / "pub/a", 0o640)
    assert as_user(UID_B, lambda: open("pub/a", "rb").read(), cwd=m,
                   groups=[4321]) == b"from AA\nroot"
    assert user_errno(UID_B, lambda: os.open("pub/a", os.O_WRONLY), cwd=m,
                      groups=[4321]) == errno.EACCES
    assert user_errno(UID_B, lambda: open("pub/a", "rb"), cwd=m) == errno.EACCES
    # a private directory: B can neither list it nor reach into it
    as_user(UID_A, lambda: os.mkdir("pub/priv", 0o700), cwd=m)
    as_user(UID_A, lambda: open("pub/priv/f", "w").write("x"), cwd=m)
    assert user_errno(UID_B, lambda: os.listdir("pub/priv"), cwd=m) == errno.EACCES
    assert user_errno(UID_B, lambda: os.stat("pub/priv/f"), cwd=m) == errno.EACCES
    assert user_errno(UID_B, lambda: open("pub/priv/g", "w"), cwd=m) == errno.EACCES
    # no execute bit: nobody may execute, not even root
    (m / "script").write_text("#!/bin/sh\necho hi\n")
    os.chmod(m / "script", 0o644)
    assert not os.access(m / "script", os.X_OK)
    assert errno_of(subprocess.run, [str(m / "script")]) == errno.EACCES
    os.chmod(m / "script", 0o755)
    assert sh(["./script"], user=UID_B, cwd=m).stdout == b"hi\n"
    # a non-owner in a plain (non-sticky) 0777 directory may delete the file
    as_user(UID_B, lambda: os.unlink("pub/a"), cwd=m)
    assert not (m / "pub/a").exists()


def test_sticky_directory(shared):
    m = shared.path
    os.mkdir(m / "tmp")
    os.chmod(m / "tmp", 0o1777)
    assert mode_of(m / "tmp") == 0o1777
    as_user(UID_A, lambda: open("tmp/a", "w").write("A"), cwd=m)
    as_user(UID_A, lambda: os.mkdir("tmp/adir"), cwd=m)
    as_user(UID_B, lambda: open("tmp/b", "w").write("B"), cwd=m)
    # B cannot remove or rename A's entries, nor replace them by a rename
    assert user_errno(UID_B, lambda: os.unlink("tmp/a"), cwd=m) == errno.EPERM
    assert user_errno(UID_B, lambda: os.rmdir("tmp/adir"), cwd=m) == errno.EPERM
    assert user_errno(UID_B, lambda: os.rename("tmp/a", "tmp/stolen"), cwd=m) == errno.EPERM
    assert user_errno(UID_B, lambda: os.rename("tmp/b", "tmp/a"), cwd=m) == errno.EPERM
    r = sh(["rm", "-f", "tmp/a"], cwd=m, user=UID_B, check=False)
    assert r.returncode != 0 and b"Operation not permitted" in r.stderr
    r = sh(["mv", "tmp/a", "tmp/x"], cwd=m, user=UID_B, check=False)
    assert r.returncode != 0
    assert (m / "tmp/a").read_text() == "A" and (m / "tmp/adir").is_dir()
    assert (m / "tmp/b").read_text() == "B"
    # each may remove their own; root may remove anything
    as_user(UID_A, lambda: os.rename("tmp/a", "tmp/a2"), cwd=m)
    as_user(UID_A, lambda: os.unlink("tmp/a2"), cwd=m)
    as_user(UID_B, lambda: os.rename("tmp/b", "tmp/b2"), cwd=m)
    os.rmdir(m / "tmp/adir")
    os.unlink(m / "tmp/b2")
    # the directory's owner may remove others' files too
    os.chown(m / "tmp", UID_B, UID_B)
    as_user(UID_A, lambda: open("tmp/c", "w").write("C"), cwd=m)
    as_user(UID_B, lambda: os.unlink("tmp/c"), cwd=m)
    assert os.listdir(m / "tmp") == []


def test_setgid_directory_inheritance(shared):
    m = shared.path
    os.mkdir(m / "sg")
    os.chown(m / "sg", 0, 1234)
    os.chmod(m / "sg", 0o2777)
    assert mode_of(m / "sg") == 0o2777
    # root creates: the group comes from the directory, subdirectories inherit set-gid
    (m / "sg/f").write_text("x")
    os.mkdir(m / "sg/d")
    os.mkdir(m / "sg/d/e")
    os.symlink("f", m / "sg/l")
    os.mkfifo(m / "sg/p")
    for p in ("sg/f", "sg/d", "sg/d/e", "sg/p"):
        assert os.stat(m / p).st_gid == 1234, p
    assert os.lstat(m / "sg/l").st_gid == 1234
    assert os.stat(m / "sg/d").st_mode & stat.S_ISGID
    assert os.stat(m / "sg/d/e").st_mode & stat.S_ISGID
    assert not os.stat(m / "sg/f").st_mode & stat.S_ISGID
    # a user outside group 1234 creates: group 1234 still, set-gid on its directories
    as_user(UID_A, lambda: open("sg/u", "w").write("u"), cwd=m)
    as_user(UID_A, lambda: os.mkdir("sg/ud", 0o755), cwd=m, umask=0)
    st = os.stat(m / "sg/u")
    assert (st.st_uid, st.st_gid) == (UID_A, 1234)
    st = os.stat(m / "sg/ud")
    assert (st.st_uid, st.st_gid) == (UID_A, 1234)
    assert stat.S_IMODE(st.st_mode) == 0o2755
    as_user(UID_A, lambda: open("sg/ud/deep", "w").close(), cwd=m)
    assert os.stat(m / "sg/ud/deep").st_gid == 1234
    # ... but may not make a set-gid file of a group it is not in (ext4 strips the bit)
    def mk_sgid():
        fd = os.open("sg/x", os.O_CREAT | os.O_WRONLY, 0o2755)
        os.close(fd)
    as_user(UID_A, mk_sgid, cwd=m, umask=0)
    st = os.stat(m / "sg/x")
    assert st.st_gid == 1234 and stat.S_IMODE(st.st_mode) == 0o755
    # chmod g+s by the owner on a file of a foreign group: the kernel drops S_ISGID
    as_user(UID_A, lambda: os.chmod("sg/u", 0o2755), cwd=m)
    assert mode_of(m / "sg/u") == 0o755
    # ... a member of the group keeps it
    as_user(UID_A, lambda: os.chmod("sg/u", 0o2755), cwd=m, groups=[1234])
    assert mode_of(m / "sg/u") == 0o2755
    # outside a set-gid directory the creator's group is used
    os.mkdir(m / "plain")
    os.chmod(m / "plain", 0o777)
    as_user(UID_A, lambda: open("plain/f", "w").close(), cwd=m)
    as_user(UID_A, lambda: os.mkdir("plain/d"), cwd=m)
    assert os.stat(m / "plain/f").st_gid == UID_A
    assert os.stat(m / "plain/d").st_gid == UID_A
    assert not os.stat(m / "plain/d").st_mode & stat.S_ISGID


def test_chown_by_root_clears_setuid(shared):
    m = shared.path
    f = m / "prog"
    f.write_bytes(b"#!/bin/sh\n")
    os.chown(f, UID_A, UID_A)
    os.chmod(f, 0o4755)
    assert mode_of(f) == 0o4755
    os.chown(f, UID_B, UID_B)
    assert mode_of(f) == 0o755
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (UID_B, UID_B)
    # set-gid with group execute is cleared as well
    os.chmod(f, 0o6755)
    sh(["chown", f"{UID_A}:{UID_A}", f])
    assert mode_of(f) == 0o755
    # set-gid without group execute (not a set-gid program) stays for root, as on ext4
    os.chmod(f, 0o2745)
    os.chown(f, UID_B, -1)
    assert mode_of(f) == 0o2745
    # chgrp alone clears set-uid too
    os.chmod(f, 0o4755)
    os.chown(f, -1, 4321)
    assert mode_of(f) == 0o755
    # directories keep their set-gid bit on chown
    os.mkdir(m / "d")
    os.chmod(m / "d", 0o2775)
    os.chown(m / "d", UID_A, UID_A)
    assert mode_of(m / "d") == 0o2775
    # chown to the same owner still clears set-uid (ext4 does)
    os.chmod(f, 0o4755)
    os.chown(f, UID_B, 4321)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (UID_B, 4321)
    assert mode_of(f) == 0o755


def test_write_by_non_root_clears_setuid(shared):
    m = shared.path
    os.mkdir(m / "pub")
    os.chmod(m / "pub", 0o777)
    f = m / "pub/prog"
    f.write_bytes(b"abc")
    os.chown(f, UID_A, UID_A)
    # the owner writes its own set-uid file
    os.chmod(f, 0o4755)
    write_as(UID_A, "pub/prog", b"X", cwd=m, off=0)
    assert mode_of(f) == 0o755
    # another user writes a world-writable set-uid/set-gid file
    os.chmod(f, 0o6777)
    write_as(UID_B, "pub/prog", b"Y", cwd=m, off=1)
    assert mode_of(f) == 0o777
    # through a shell from another process
    os.chmod(f, 0o4777)
    sh("printf Z >> pub/prog", cwd=m, user=UID_B)
    assert mode_of(f) == 0o777
    # truncate by a non-root user clears it too
    os.chmod(f, 0o4777)
    as_user(UID_B, lambda: os.truncate("pub/prog", 2), cwd=m)
    assert mode_of(f) == 0o777
    assert f.read_bytes() == b"XY"
    # root (CAP_FSETID) writing keeps the bits
    os.chmod(f, 0o4755)
    with open(f, "r+b") as fh:
        fh.write(b"R")
    assert mode_of(f) == 0o4755
    assert f.read_bytes() == b"RY"
    # set-gid without group execute is no set-gid program: a write leaves it
    os.chmod(f, 0o2747)
    write_as(UID_B, "pub/prog", b"Q", cwd=m, off=0)
    assert mode_of(f) == 0o2747


def test_chmod_by_non_owner_fails(shared):
    m = shared.path
    f = m / "f"
    f.write_text("x")
    os.chown(f, UID_A, UID_A)
    os.chmod(f, 0o666)
    assert user_errno(UID_B, lambda: os.chmod("f", 0o777), cwd=m) == errno.EPERM
    assert user_errno(UID_B, lambda: os.chmod("f", 0o600), cwd=m) == errno.EPERM
    assert user_errno(UID_B, lambda: os.chown("f", UID_B, -1), cwd=m) == errno.EPERM
    assert user_errno(UID_A, lambda: os.chown("f", UID_B, -1), cwd=m) == errno.EPERM
    assert user_errno(UID_B, lambda: os.setxattr("f", "trusted.x", b"1"), cwd=m) == errno.EPERM
    r = sh(["chmod", "u+s", "f"], cwd=m, user=UID_B, check=False)
    assert r.returncode == 1 and b"Operation not permitted" in r.stderr
    assert mode_of(f) == 0o666
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (UID_A, UID_A)
    as_user(UID_A, lambda: os.chmod("f", 0o4600), cwd=m)
    assert mode_of(f) == 0o4600
    # non-root may not make device nodes
    os.chmod(m, 0o777)
    assert user_errno(UID_A, lambda: os.mknod("dev", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
                      cwd=m) == errno.EPERM
    os.chmod(m, 0o755)
    assert not (m / "dev").exists()


# ----------------------------------------------------------------------------- errno values


def test_errno_values(shared):
    m = shared.path
    (m / "file").write_text("x")
    os.mkdir(m / "dir")
    (m / "dir/inner").write_text("y")
    os.mkdir(m / "empty")
    # ENOENT
    expect(errno.ENOENT, os.stat, m / "missing")
    expect(errno.ENOENT, open, m / "missing")
    expect(errno.ENOENT, os.unlink, m / "missing")
    expect(errno.ENOENT, os.rmdir, m / "missing")
    expect(errno.ENOENT, os.rename, m / "missing", m / "x")
    expect(errno.ENOENT, os.link, m / "missing", m / "x")
    expect(errno.ENOENT, os.readlink, m / "missing")
    expect(errno.ENOENT, open, m / "missing/sub", "w")
    expect(errno.ENOENT, os.getxattr, m / "missing", "user.a")
    os.symlink("nowhere", m / "dangling")
    expect(errno.ENOENT, os.stat, m / "dangling")
    expect(errno.ENOENT, open, m / "dangling")
    r = sh(["cat", m / "missing"], check=False)
    assert r.returncode == 1 and b"No such file or directory" in r.stderr
    # EEXIST
    expect(errno.EEXIST, os.mkdir, m / "dir")
    expect(errno.EEXIST, os.mkdir, m / "file")
    expect(errno.EEXIST, os.open, m / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect(errno.EEXIST, os.open, m / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect(errno.EEXIST, os.link, m / "file", m / "dir/inner")
    expect(errno.EEXIST, os.symlink, "x", m / "file")
    expect(errno.EEXIST, os.mkfifo, m / "file")
    expect(errno.EEXIST, os.mknod, m / "dir", stat.S_IFREG | 0o644)
    # ENOTEMPTY
    expect(errno.ENOTEMPTY, os.rmdir, m / "dir")
    expect(errno.ENOTEMPTY, os.rename, m / "empty", m / "dir")
    r = sh(["rmdir", m / "dir"], check=False)
    assert r.returncode == 1 and b"Directory not empty" in r.stderr
    # ENOTDIR
    expect(errno.ENOTDIR, os.mkdir, m / "file/sub")
    expect(errno.ENOTDIR, os.rmdir, m / "file")
    expect(errno.ENOTDIR, os.listdir, m / "file")
    expect(errno.ENOTDIR, open, m / "file/x", "w")
    expect(errno.ENOTDIR, os.stat, f"{m}/file/")
    expect(errno.ENOTDIR, os.rename, m / "dir", m / "file")
    expect(errno.ENOTDIR, os.open, m / "file", os.O_RDONLY | os.O_DIRECTORY)
    # EISDIR
    expect(errno.EISDIR, open, m / "dir", "w")
    expect(errno.EISDIR, os.open, m / "dir", os.O_RDWR)
    expect(errno.EISDIR, os.unlink, m / "dir")
    expect(errno.EISDIR, os.rename, m / "file", m / "empty")
    expect(errno.EISDIR, os.truncate, m / "dir", 0)
    fd = os.open(m / "dir", os.O_RDONLY)
    try:
        expect(errno.EISDIR, os.read, fd, 10)
    finally:
        os.close(fd)
    # EPERM / EINVAL from the namespace rules
    expect(errno.EPERM, os.link, m / "dir", m / "dirlink")
    expect(errno.EINVAL, os.rename, m / "dir", m / "dir/inner2")
    expect(errno.EINVAL, os.readlink, m / "file")
    expect(errno.EINVAL, os.truncate, m / "file", -1)
    # nothing changed by any of that
    assert sorted(os.listdir(m)) == ["dangling", "dir", "empty", "file"]
    assert os.listdir(m / "dir") == ["inner"]
    assert (m / "file").read_text() == "x"
    assert (m / "dir/inner").read_text() == "y"
    assert os.stat(m).st_nlink == 4  # '.', '..'/mount entry and two subdirectories
    assert os.stat(m / "dir").st_nlink == 2


def test_enametoolong(shared):
    m = shared.path
    long = "n" * 256
    ok = "n" * 255
    (m / "f").write_text("x")
    expect(errno.ENAMETOOLONG, open, m / long, "w")
    expect(errno.ENAMETOOLONG, os.stat, m / long)
    expect(errno.ENAMETOOLONG, os.mkdir, m / long)
    expect(errno.ENAMETOOLONG, os.rename, m / "f", m / long)
    expect(errno.ENAMETOOLONG, os.link, m / "f", m / long)
    expect(errno.ENAMETOOLONG, os.symlink, "f", m / long)
    expect(errno.ENAMETOOLONG, os.mkfifo, m / long)
    expect(errno.ENAMETOOLONG, os.unlink, m / long)
    r = sh(["touch", m / long], check=False)
    assert r.returncode == 1 and b"File name too long" in r.stderr
    # 255 bytes is fine, in UTF-8 too (85 three-byte characters)
    (m / ok).write_text("ok")
    utf = "\u20ac" * 85
    assert len(utf.encode()) == 255
    os.mkdir(m / utf)
    expect(errno.ENAMETOOLONG, os.mkdir, m / (utf + "x"))
    assert sorted(os.listdir(m)) == sorted(["f", ok, utf])
    assert (m / ok).read_text() == "ok"
    # a symlink target up to 4095 bytes is kept exactly; 4096 is refused by the kernel
    target = (("t" * 254 + "/") * 17)[:4095]
    os.symlink(target, m / "longlink")
    assert os.readlink(m / "longlink") == target
    assert os.lstat(m / "longlink").st_size == 4095
    expect(errno.ENAMETOOLONG, os.symlink, target + "x", m / "longer")


def test_exdev_rename_across_mounts(shared, tmp_path):
    m = shared.path
    (m / "f").write_bytes(b"data")
    outside = tmp_path / "outside"
    outside.write_bytes(b"out")
    expect(errno.EXDEV, os.rename, m / "f", tmp_path / "f")
    expect(errno.EXDEV, os.rename, outside, m / "o")
    expect(errno.EXDEV, os.link, m / "f", tmp_path / "hl")
    expect(errno.EXDEV, os.link, outside, m / "hl")
    expect(errno.EXDEV, renameat2, m / "f", tmp_path / "f", RENAME_NOREPLACE)
    assert (m / "f").read_bytes() == b"data" and outside.read_bytes() == b"out"
    # mv copes by copying and removing
    sh(["mv", m / "f", tmp_path / "moved"])
    assert (tmp_path / "moved").read_bytes() == b"data" and not (m / "f").exists()
    sh(["mv", outside, m / "in"])
    assert (m / "in").read_bytes() == b"out" and not outside.exists()


def test_eloop(shared):
    m = shared.path
    os.symlink("b", m / "a")
    os.symlink("a", m / "b")
    os.symlink("self", m / "self")
    for p in ("a", "b", "self"):
        expect(errno.ELOOP, os.stat, m / p)
        expect(errno.ELOOP, open, m / p)
        expect(errno.ELOOP, open, m / p, "w")
    expect(errno.ELOOP, os.listdir, m / "a")
    expect(errno.ELOOP, os.stat, m / "a/x")
    r = sh(["cat", m / "a"], check=False)
    assert r.returncode == 1 and b"Too many levels of symbolic links" in r.stderr
    # O_NOFOLLOW on a symlink
    (m / "real").write_text("r")
    os.symlink("real", m / "toreal")
    expect(errno.ELOOP, os.open, m / "toreal", os.O_RDONLY | os.O_NOFOLLOW)
    # a chain of 41 links is too long, 40 is fine (Linux follows at most 40)
    prev = "real"
    for i in range(41):
        os.symlink(prev, m / f"c{i}")
        prev = f"c{i}"
    assert (m / "c39").read_text() == "r"
    expect(errno.ELOOP, os.stat, m / "c40")
    assert os.readlink(m / "a") == "b"
    assert stat.S_ISLNK(os.lstat(m / "a").st_mode)


def test_efbig(shared):
    m = shared.path
    f = m / "big"
    f.write_bytes(b"head")
    limit = 4 << 40
    expect(errno.EFBIG, os.truncate, f, limit + 1)
    expect(errno.EFBIG, os.truncate, f, 1 << 50)
    assert os.stat(f).st_size == 4
    fd = os.open(f, os.O_RDWR)
    try:
        expect(errno.EFBIG, os.pwrite, fd, b"x", limit)
        expect(errno.EFBIG, os.pwrite, fd, b"x", limit + 12345)
        assert os.fstat(fd).st_size == 4
        # up to the limit is fine; a write across it is cut short at the limit
        os.truncate(f, limit)
        assert os.fstat(fd).st_size == limit
        assert os.pwrite(fd, b"yz", limit - 1) == 1
        assert os.fstat(fd).st_size == limit
        assert os.pread(fd, 10, limit - 1) == b"y"
        expect(errno.EFBIG, os.pwrite, fd, b"z", limit)
        assert os.pread(fd, 4, 0) == b"head"
        assert os.fstat(fd).st_blocks < 128
    finally:
        os.close(fd)
    r = sh(["truncate", "-s", str(limit + 4096), f], check=False)
    assert r.returncode == 1 and b"File too large" in r.stderr
    os.truncate(f, 4)
    assert f.read_bytes() == b"head"


def _fill(path: Path, chunk: int = 1 << 20) -> int:
    """Write until ENOSPC with dd in another process; returns the bytes written."""
    r = sh(["dd", "if=/dev/urandom", f"of={path}", f"bs={chunk}", "status=none"], check=False)
    assert r.returncode != 0 and b"No space left on device" in r.stderr, r.stderr
    return os.stat(path).st_size


def test_enospc(mount_site):
    mnt = mount_site("16M")
    m = mnt.path
    keep = os.urandom(300_000)
    (m / "keep").write_bytes(keep)
    os.mkdir(m / "dir")
    (m / "dir/small").write_text("small")
    commit(m)
    before = os.statvfs(m)
    n = _fill(m / "fill")
    assert 12 << 20 < n < 16 << 20
    st = os.statvfs(m)
    assert st.f_bavail < 16  # a few blocks stay back for the indirect blocks of a write
    assert st.f_bfree < before.f_bfree
    # further writes fail, whole and partial, from this and other processes
    expect(errno.ENOSPC, lambda: (m / "more").write_bytes(os.urandom(1 << 20)))
    fd = os.open(m / "fill", os.O_WRONLY | os.O_APPEND)
    try:
        expect(errno.ENOSPC, os.write, fd, b"x" * 65536)
    finally:
        os.close(fd)
    r = sh(f"head -c 1000000 /dev/zero > {m / 'more2'}", check=False)
    assert r.returncode != 0 and b"No space left on device" in r.stderr
    # what was there is intact, and reading the full file gives back what dd wrote
    assert (m / "keep").read_bytes() == keep
    assert (m / "dir/small").read_text() == "small"
    assert os.stat(m / "fill").st_size == n
    # metadata still works: rename, chmod, xattr, listing
    os.rename(m / "dir/small", m / "dir/small2")
    os.chmod(m / "keep", 0o600)
    assert sorted(os.listdir(m)) >= ["dir", "fill", "keep"]
    # free the space: after a commit it can be used again
    os.unlink(m / "fill")
    for p in ("more", "more2"):
        if (m / p).exists():
            os.unlink(m / p)
    st = wait_statfs(m, lambda st: st.f_bfree >= before.f_bfree - 2)
    assert st.f_ffree == before.f_ffree
    again = os.urandom(8 << 20)
    (m / "again").write_bytes(again)
    assert (m / "again").read_bytes() == again
    assert (m / "keep").read_bytes() == keep
    mnt.umount()
    out = fsck_clean(mnt.site)
    assert "clean" in out
    mnt2 = mount_site("16M")
    assert (mnt2.path / "keep").read_bytes() == keep
    assert (mnt2.path / "again").read_bytes() == again
    assert (mnt2.path / "dir/small2").read_text() == "small"


def test_space_freed_by_truncate_is_usable_at_once(mount_site):
    """On a full file system, space freed by truncate (or unlink) is usable at once, as on
    ext4 (which forces a commit and retries), not only after the next commit."""
    mnt = mount_site("16M")
    m = mnt.path
    _fill(m / "fill")
    commit(m)
    os.truncate(m / "fill", 0)  # frees its blocks now (no FORGET from the kernel involved)
    data = os.urandom(4 << 20)
    (m / "new").write_bytes(data)  # was ENOSPC until the next commit (up to 5 s)
    assert (m / "new").read_bytes() == data


# ----------------------------------------------------------------------------- links, rename


def test_hard_links(shared):
    m = shared.path
    os.mkdir(m / "d1")
    os.mkdir(m / "d2")
    (m / "d1/a").write_bytes(b"original")
    sh(["ln", m / "d1/a", m / "d2/b"])
    os.link(m / "d1/a", m / "d1/c")
    sa, sb, sc = (os.stat(m / p) for p in ("d1/a", "d2/b", "d1/c"))
    assert sa.st_ino == sb.st_ino == sc.st_ino
    assert sa.st_nlink == sb.st_nlink == sc.st_nlink == 3
    # a change through one name shows through the others, from another process too
    sh(f"printf CHANGED | dd of={m / 'd2/b'} conv=notrunc status=none")
    assert (m / "d1/a").read_bytes() == b"CHANGEDl"
    assert (m / "d1/c").read_bytes() == b"CHANGEDl"
    os.chmod(m / "d1/c", 0o600)
    assert mode_of(m / "d2/b") == 0o600
    os.setxattr(m / "d1/a", "user.k", b"v")
    assert os.getxattr(m / "d2/b", "user.k") == b"v"
    # unlinking names lowers the count; the data lives while a name does
    os.unlink(m / "d1/a")
    assert os.stat(m / "d2/b").st_nlink == 2
    sh(["rm", m / "d1/c"])
    assert os.stat(m / "d2/b").st_nlink == 1
    assert (m / "d2/b").read_bytes() == b"CHANGEDl"
    # rename onto another link of the same inode does nothing
    os.link(m / "d2/b", m / "d2/b2")
    os.rename(m / "d2/b", m / "d2/b2")
    assert sorted(os.listdir(m / "d2")) == ["b", "b2"]
    assert os.stat(m / "d2/b").st_nlink == 2
    # many links
    for i in range(200):
        os.link(m / "d2/b", m / f"d1/l{i}")
    assert os.stat(m / "d2/b").st_nlink == 202
    for i in range(200):
        os.unlink(m / f"d1/l{i}")
    assert os.stat(m / "d2/b").st_nlink == 2
    # directories' link counts: 2 + subdirectories, unaffected by file links
    assert os.stat(m / "d1").st_nlink == 2
    os.mkdir(m / "d1/s1")
    os.mkdir(m / "d1/s2")
    assert os.stat(m / "d1").st_nlink == 4
    os.rename(m / "d1/s2", m / "d2/s2")
    assert os.stat(m / "d1").st_nlink == 3 and os.stat(m / "d2").st_nlink == 3
    assert os.stat(m / "d2/s2/..").st_ino == os.stat(m / "d2").st_ino
    os.rmdir(m / "d1/s1")
    assert os.stat(m / "d1").st_nlink == 2


def test_symlinks(shared):
    m = shared.path
    os.mkdir(m / "dir")
    (m / "dir/target").write_text("T")
    sh(["ln", "-s", "dir/target", m / "rel"])
    os.symlink(str(m / "dir/target"), m / "abs")
    os.symlink("../dir", m / "dir/up")
    st = os.lstat(m / "rel")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("dir/target")
    assert stat.S_IMODE(st.st_mode) == 0o777
    assert (m / "rel").read_text() == "T" and (m / "abs").read_text() == "T"
    assert (m / "dir/up/target").read_text() == "T"
    assert os.readlink(m / "dir/up") == "../dir"
    # writing through a symlink writes the target; rename moves the link, not the target
    with open(m / "rel", "a") as f:
        f.write("2")
    assert (m / "dir/target").read_text() == "T2"
    os.rename(m / "rel", m / "dir/rel")
    assert os.readlink(m / "dir/rel") == "dir/target"
    expect(errno.ENOENT, os.stat, m / "dir/rel")  # relative to its new directory now
    # chmod/chown via a link act on the target; lchown on the link itself
    os.chmod(m / "abs", 0o600)
    assert mode_of(m / "dir/target") == 0o600
    os.lchown(m / "abs", UID_A, UID_A)
    assert os.lstat(m / "abs").st_uid == UID_A and os.stat(m / "dir/target").st_uid == 0
    # removing the target leaves a dangling link
    os.unlink(m / "dir/target")
    expect(errno.ENOENT, open, m / "abs")
    assert os.readlink(m / "abs") == str(m / "dir/target")
    # creating through a dangling link creates the target
    (m / "abs").write_text("again")
    assert (m / "dir/target").read_text() == "again"
    # unlink removes the link only; a link to a directory
    os.symlink("dir", m / "dl")
    assert sorted(os.listdir(m / "dl")) == ["rel", "target", "up"]
    os.unlink(m / "dl")
    assert (m / "dir").is_dir()
    expect(errno.ENOTDIR, os.rmdir, m / "abs")
    # xattrs in user.* are not allowed on symlinks (as everywhere on Linux)
    expect(errno.EPERM, os.setxattr, m / "abs", "user.a", b"1", follow_symlinks=False)


def test_renameat2(shared):
    m = shared.path
    (m / "x").write_text("X")
    (m / "y").write_text("Y")
    os.mkdir(m / "d")
    (m / "d/inner").write_text("I")
    os.mkdir(m / "e")
    # RENAME_NOREPLACE
    expect(errno.EEXIST, renameat2, m / "x", m / "y", RENAME_NOREPLACE)
    assert (m / "x").read_text() == "X" and (m / "y").read_text() == "Y"
    expect(errno.EEXIST, renameat2, m / "d", m / "e", RENAME_NOREPLACE)
    renameat2(m / "x", m / "z", RENAME_NOREPLACE)
    assert not (m / "x").exists() and (m / "z").read_text() == "X"
    renameat2(m / "z", m / "x", RENAME_NOREPLACE)
    # RENAME_EXCHANGE of two files
    ix, iy = os.stat(m / "x").st_ino, os.stat(m / "y").st_ino
    renameat2(m / "x", m / "y", RENAME_EXCHANGE)
    assert (m / "x").read_text() == "Y" and (m / "y").read_text() == "X"
    assert os.stat(m / "x").st_ino == iy and os.stat(m / "y").st_ino == ix
    # ... of a file and a directory across directories: link counts follow the directory
    nl_root, nl_e = os.stat(m).st_nlink, os.stat(m / "e").st_nlink
    renameat2(m / "d", m / "x", RENAME_EXCHANGE)  # directory d <-> file x
    assert (m / "d").read_text() == "Y" and (m / "x/inner").read_text() == "I"
    os.rename(m / "d", m / "e/f")
    renameat2(m / "x", m / "e/f", RENAME_EXCHANGE)  # dir goes into e, file comes up
    assert (m / "x").read_text() == "Y" and (m / "e/f/inner").read_text() == "I"
    assert os.stat(m).st_nlink == nl_root - 1
    assert os.stat(m / "e").st_nlink == nl_e + 1
    assert os.stat(m / "e/f/..").st_ino == os.stat(m / "e").st_ino
    # exchange with a missing name, or a directory with its own descendant
    expect(errno.ENOENT, renameat2, m / "x", m / "nope", RENAME_EXCHANGE)
    expect(errno.EINVAL, renameat2, m / "e", m / "e/f/inner", RENAME_EXCHANGE)
    expect(errno.EINVAL, renameat2, m / "x", m / "y", RENAME_EXCHANGE | RENAME_NOREPLACE)
    # exchanging two hard links of one file changes nothing
    os.link(m / "y", m / "y2")
    renameat2(m / "y", m / "y2", RENAME_EXCHANGE)
    assert (m / "y").read_text() == "X" and os.stat(m / "y").st_nlink == 2
    assert sorted(os.listdir(m)) == ["e", "x", "y", "y2"]
    assert sorted(os.listdir(m / "e")) == ["f"]


def test_rename_over_existing(shared):
    m = shared.path
    (m / "a").write_text("A")
    (m / "b").write_text("B")
    fd = os.open(m / "b", os.O_RDONLY)
    try:
        os.rename(m / "a", m / "b")
        assert (m / "b").read_text() == "A" and not (m / "a").exists()
        assert os.pread(fd, 10, 0) == b"B"  # the replaced file lives while open
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    os.mkdir(m / "d1")
    os.mkdir(m / "d2")
    (m / "d1/f").write_text("f")
    os.rename(m / "d1", m / "d2")  # onto an empty directory
    assert (m / "d2/f").read_text() == "f" and not (m / "d1").exists()
    assert os.stat(m).st_nlink == 3
    sh(["mv", "-T", m / "d2", m / "d3"])
    assert sorted(os.listdir(m)) == ["b", "d3"]


# ----------------------------------------------------------------------------- xattrs


def test_xattrs(shared):
    m = shared.path
    f = m / "f"
    f.write_text("x")
    os.mkdir(m / "d")
    sh(["setfattr", "-n", "user.color", "-v", "blue", f])
    sh(["setfattr", "-n", "user.empty", f])
    os.setxattr(f, "user.bin", bytes(range(256)))
    os.setxattr(m / "d", "user.dir", b"on a directory")
    os.setxattr(f, "trusted.secret", b"root only")
    os.setxattr(f, "security.label", b"lbl")
    assert os.getxattr(f, "user.color") == b"blue"
    assert os.getxattr(f, "user.empty") == b""
    assert os.getxattr(f, "user.bin") == bytes(range(256))
    assert os.getxattr(m / "d", "user.dir") == b"on a directory"
    assert sorted(os.listxattr(f)) == sorted(
        ["user.color", "user.empty", "user.bin", "trusted.secret", "security.label"])
    out = sh(["getfattr", "-n", "user.color", "--only-values", f]).stdout
    assert out == b"blue"
    dump = sh(["getfattr", "-d", "-m", "-", f]).stdout.decode()
    assert 'user.color="blue"' in dump and 'trusted.secret="root only"' in dump
    # flags
    expect(errno.EEXIST, os.setxattr, f, "user.color", b"red", os.XATTR_CREATE)
    expect(errno.ENODATA, os.setxattr, f, "user.none", b"1", os.XATTR_REPLACE)
    os.setxattr(f, "user.color", b"green", os.XATTR_REPLACE)
    os.setxattr(f, "user.new", b"n", os.XATTR_CREATE)
    assert os.getxattr(f, "user.color") == b"green"
    # missing, removal, unsupported namespace
    expect(errno.ENODATA, os.getxattr, f, "user.none")
    expect(errno.ENODATA, os.removexattr, f, "user.none")
    sh(["setfattr", "-x", "user.new", f])
    expect(errno.ENODATA, os.getxattr, f, "user.new")
    expect(errno.EOPNOTSUPP, os.setxattr, f, "bogus.name", b"1")
    # values from 0 bytes to 64 KiB (E2BIG beyond, from the kernel), names up to 255 bytes
    big = os.urandom(3000)
    os.setxattr(f, "user.big", big)
    assert os.getxattr(f, "user.big") == big
    huge = os.urandom(65536)
    os.setxattr(f, "user.huge", huge)
    assert os.getxattr(f, "user.huge") == huge
    os.removexattr(f, "user.huge")
    expect(errno.E2BIG, os.setxattr, f, "user.vast", b"v" * 65537)
    expect(errno.ERANGE, os.setxattr, f, "user." + "n" * 251, b"1")
    assert os.getxattr(f, "user.big") == big  # a refused set changes nothing
    # permissions: user.* needs write access; trusted.* needs CAP_SYS_ADMIN
    os.chmod(f, 0o644)
    os.chmod(m, 0o755)
    assert user_errno(UID_A, lambda: os.setxattr("f", "user.a", b"1"), cwd=m) == errno.EACCES
    assert as_user(UID_A, lambda: os.getxattr("f", "user.color"), cwd=m) == b"green"
    assert user_errno(UID_A, lambda: os.getxattr("f", "trusted.secret"),
                      cwd=m) == errno.ENODATA
    os.chown(f, UID_A, UID_A)
    as_user(UID_A, lambda: os.setxattr("f", "user.owner", b"mine"), cwd=m)
    assert os.getxattr(f, "user.owner") == b"mine"
    # removing all of them gives the block back
    for name in os.listxattr(f):
        os.removexattr(f, name)
    assert os.listxattr(f) == []


def test_mount_readahead_raised(shared):
    """The daemon raises its mount's readahead (the kernel's FUSE default is 128 KiB) once
    the kernel has its INIT reply, so cold sequential reads take fewer READ round trips."""
    from repfs.fs.ops import Operations
    st = os.stat(shared.path)
    path = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    deadline = time.monotonic() + 10  # set by a task of the daemon right after INIT
    while path.read_text().strip() != str(Operations.READ_AHEAD_KB) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.read_text().strip() == str(Operations.READ_AHEAD_KB)
    data = os.urandom(3 << 20)  # and a sequential read returns the file
    (shared.path / "ra").write_bytes(data)
    assert (shared.path / "ra").read_bytes() == data


def test_security_capability_answered_and_killed_by_a_write(shared):
    """The kernel asks for security.capability before every write; the adapter answers a file
    without attributes on a fast path. A file that has file capabilities gets them read
    (not the fast path's ENODATA), and a write removes them, as on ext4; a file with other
    attributes but no capabilities answers ENODATA too."""
    m = shared.path
    f, g = m / "caps", m / "plain"
    f.write_bytes(b"x" * 4096)
    g.write_bytes(b"y")
    expect(errno.ENODATA, os.getxattr, f, "security.capability")
    caps = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)  # v2, effective, cap_net_bind
    os.setxattr(f, "security.capability", caps)
    os.setxattr(g, "user.other", b"1")
    assert os.getxattr(f, "security.capability") == caps
    expect(errno.ENODATA, os.getxattr, g, "security.capability")
    with open(f, "r+b") as fh:
        fh.write(b"z")
    expect(errno.ENODATA, os.getxattr, f, "security.capability")
    assert f.read_bytes() == b"z" + b"x" * 4095


_libc.getxattr.restype = _libc.listxattr.restype = ctypes.c_ssize_t
_libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.listxattr.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]


def _raw_xattr_call(fn, *args) -> tuple[int, int]:
    """(result, errno) of a libc xattr call with the buffer size given (os.getxattr retries
    with larger buffers itself, so it cannot show ERANGE)."""
    r = fn(*args)
    return r, (ctypes.get_errno() if r < 0 else 0)


def test_xattrs_many_small_and_64k_values(mount_site):
    """Issue 7: a thousand small attributes and 64 KiB values on one file, through the kernel;
    size probes and short buffers; they survive a remount and unlink gives their blocks back."""
    mnt = mount_site("256M")
    m = mnt.path
    commit(m)
    free0 = os.statvfs(m).f_bfree
    f = m / "f"
    f.write_bytes(b"data")
    small = {f"user.k{i:04d}": b"v%d" % i for i in range(1000)}
    for k, v in small.items():
        os.setxattr(f, k, v)
    big = random.Random(7).randbytes(65536)
    os.setxattr(f, "user.big", big)
    hexval = random.Random(8).randbytes(20000)
    sh(["setfattr", "-n", "user.hex", "-v", "0x" + hexval.hex(), f])
    assert os.getxattr(f, "user.big") == big
    assert sorted(os.listxattr(f)) == sorted([*small, "user.big", "user.hex"])
    assert sh(["getfattr", "--only-values", "-n", "user.k0999", f]).stdout == b"v999"
    dump = sh(["getfattr", "-d", f]).stdout.decode()
    assert 'user.k0000="v0"' in dump and 'user.k0999="v999"' in dump
    # getxattr/listxattr: size 0 asks the size; a buffer one byte short gets ERANGE
    path = os.fsencode(f)
    buf = ctypes.create_string_buffer(65536)
    assert _raw_xattr_call(_libc.getxattr, path, b"user.big", None, 0) == (65536, 0)
    assert _raw_xattr_call(_libc.getxattr, path, b"user.big", buf, 65535) == (-1, errno.ERANGE)
    assert _raw_xattr_call(_libc.getxattr, path, b"user.big", buf, 65536) == (65536, 0)
    assert buf.raw == big
    size, e = _raw_xattr_call(_libc.listxattr, path, None, 0)
    assert e == 0 and size == sum(len(k) + 1 for k in os.listxattr(f))
    assert _raw_xattr_call(_libc.listxattr, path, buf, size - 1) == (-1, errno.ERANGE)
    expect(errno.E2BIG, os.setxattr, f, "user.vast", big + b"!")
    expect(errno.ENODATA, os.removexattr, f, "user.none")
    # XATTR_CREATE / XATTR_REPLACE with large values
    expect(errno.EEXIST, os.setxattr, f, "user.big", b"x", os.XATTR_CREATE)
    expect(errno.ENODATA, os.setxattr, f, "user.none", big, os.XATTR_REPLACE)
    os.setxattr(f, "user.k0500", big[::-1], os.XATTR_REPLACE)
    small["user.k0500"] = big[::-1]
    for i in range(0, 1000, 2):
        os.removexattr(f, f"user.k{i:04d}")
        del small[f"user.k{i:04d}"]
    mnt.umount()
    mnt = mount_site()
    f = mnt.path / "f"
    assert sorted(os.listxattr(f)) == sorted([*small, "user.big", "user.hex"])
    assert all(os.getxattr(f, k) == v for k, v in small.items())
    assert os.getxattr(f, "user.big") == big and os.getxattr(f, "user.hex") == hexval
    assert f.read_bytes() == b"data"
    os.unlink(f)
    st = wait_statfs(mnt.path, lambda st: st.f_bfree >= free0)
    assert st.f_bfree == free0


def test_trusted_xattr_names_hidden_from_users(shared):
    """listxattr hides trusted.* names from unprivileged users, as ext4 does."""
    m = shared.path
    f = m / "f"
    f.write_text("x")
    os.setxattr(f, "user.u", b"1")
    os.setxattr(f, "trusted.t", b"2")
    assert sorted(os.listxattr(f)) == ["trusted.t", "user.u"]
    assert as_user(UID_A, lambda: sorted(os.listxattr("f")), cwd=m) == ["user.u"]


# ----------------------------------------------------------------------------- special files


def test_device_nodes_fifos_sockets(shared):
    m = shared.path
    os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    sh(["mknod", "-m", "644", m / "zero", "c", "1", "5"])
    os.mknod(m / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    umask = os.umask(0)
    os.umask(umask)
    st = os.stat(m / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666 & ~umask
    st = os.stat(m / "zero")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 5)
    assert stat.S_IMODE(st.st_mode) == 0o644
    st = os.stat(m / "blk")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 200)
    assert st.st_size == 0
    # the nodes work (the mount allows devices for root)
    with open(m / "null", "wb") as f:
        assert f.write(b"discarded") == 9
    assert (m / "null").read_bytes() == b""
    assert sh(["head", "-c", "16", m / "zero"]).stdout == bytes(16)
    assert sh(["stat", "-c", "%F %t %T", m / "zero"]).stdout.decode().split() == [
        "character", "special", "file", "1", "5"]
    # FIFOs: mkfifo from another process, data through it between two other processes
    sh(["mkfifo", m / "fifo"])
    os.mkfifo(m / "fifo2", 0o600)
    assert stat.S_ISFIFO(os.stat(m / "fifo").st_mode)
    assert mode_of(m / "fifo2") == 0o600
    writer = subprocess.Popen(["sh", "-c", f"printf 'through the pipe' > {m / 'fifo'}"])
    reader = sh(["cat", m / "fifo"], timeout=30)
    assert writer.wait(timeout=30) == 0
    assert reader.stdout == b"through the pipe"
    assert os.stat(m / "fifo").st_size == 0
    # a unix socket bound in the file system
    spath = str(m / "sock")
    assert len(spath) < 100
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(spath)
        srv.listen(1)
        assert stat.S_ISSOCK(os.stat(spath).st_mode)
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cli.connect(spath)
        conn, _ = srv.accept()
        cli.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        cli.close()
    finally:
        srv.close()
    # special files keep type and rdev across rename, link and remount
    os.rename(m / "null", m / "null2")
    os.link(m / "blk", m / "blk2")
    assert os.stat(m / "blk2").st_rdev == os.makedev(7, 200) and os.stat(m / "blk").st_nlink == 2
    os.unlink(m / "sock")


# ----------------------------------------------------------------------------- timestamps


def test_nanosecond_timestamps(mount_site):
    mnt = mount_site()
    m = mnt.path
    f = m / "f"
    f.write_text("x")
    a_ns, m_ns = 1_500_000_000_123_456_789, 1_600_000_000_987_654_321
    os.utime(f, ns=(a_ns, m_ns))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (a_ns, m_ns)
    # another process sees the same nanoseconds
    out = sh(["stat", "-c", "%x|%y", f]).stdout.decode()
    assert ".123456789 " in out.split("|")[0] and ".987654321 " in out.split("|")[1]
    # before 1970 and far ahead
    os.utime(m / "f", ns=(-123_456_789_012, 4_000_000_000_000_000_001))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (-123_456_789_012, 4_000_000_000_000_000_001)
    # UTIME_NOW (utime(path) with no times) and touch from another process
    os.utime(f, ns=(a_ns, m_ns))
    before = time.time_ns()
    os.utime(f)
    after = time.time_ns()
    st = os.stat(f)
    slop = 50_000_000  # the kernel's coarse clock may lag a tick behind time_ns()
    assert before - slop <= st.st_mtime_ns <= after + slop
    assert before - slop <= st.st_atime_ns <= after + slop
    os.utime(f, ns=(a_ns, m_ns))
    sh(["touch", "-m", f])
    st = os.stat(f)
    assert st.st_atime_ns == a_ns and abs(st.st_mtime_ns - time.time_ns()) < 5_000_000_000
    # only the atime (touch -a), with nanoseconds from a reference via touch -d
    sh(["touch", "-a", "-d", "2001-02-03 04:05:06.123456789 UTC", f])
    assert os.stat(f).st_atime_ns == 981_173_106_123_456_789
    # changes move mtime and ctime
    os.utime(f, ns=(a_ns, m_ns))
    c0 = os.stat(f).st_ctime_ns
    time.sleep(0.02)
    sh(f"printf more >> {f}")
    st = os.stat(f)
    assert st.st_mtime_ns > m_ns and st.st_ctime_ns > c0
    c1 = st.st_ctime_ns
    time.sleep(0.02)
    os.chmod(f, 0o600)
    assert os.stat(f).st_ctime_ns > c1
    d0 = os.stat(m).st_mtime_ns
    time.sleep(0.02)
    (m / "g").write_text("g")
    assert os.stat(m).st_mtime_ns > d0
    # exact nanoseconds survive a remount
    os.utime(f, ns=(a_ns, m_ns))
    os.utime(m / "g", ns=(7, 8))
    mnt.umount()
    mnt = mount_site()
    st = os.stat(mnt.path / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (a_ns, m_ns)
    st = os.stat(mnt.path / "g")
    assert (st.st_atime_ns, st.st_mtime_ns) == (7, 8)


# ----------------------------------------------------------------------------- data


def test_sparse_files(shared):
    m = shared.path
    f = m / "sparse"
    tib = 1 << 40
    sh(["truncate", "-s", "1T", f])
    st = os.stat(f)
    assert st.st_size == tib and st.st_blocks == 0
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"end", tib - 3)
        os.pwrite(fd, b"mid", tib // 2)
        os.pwrite(fd, b"start", 0)
        st = os.fstat(fd)
        assert st.st_size == tib
        assert st.st_blocks <= 3 * 8 + 16 * 8  # three data blocks plus their indirect blocks
        assert os.pread(fd, 5, 0) == b"start"
        assert os.pread(fd, 3, tib // 2) == b"mid"
        assert os.pread(fd, 10, tib - 3) == b"end"
        # holes read as zeros, at any offset and size
        assert os.pread(fd, 1 << 20, 1 << 38) == bytes(1 << 20)
        assert os.pread(fd, 4096 * 3 + 5, tib // 2 - 4096) == (
            bytes(4096) + b"mid" + bytes(4096 * 2 + 2))
        assert os.pread(fd, 100, 5) == bytes(100)
    finally:
        os.close(fd)
    # from another process: dd out of the middle of a hole
    r = sh(["dd", f"if={f}", "bs=1M", "skip=300000", "count=2", "status=none"])
    assert r.stdout == bytes(2 << 20)
    free_before = os.statvfs(m).f_bfree
    assert free_before > (900 << 20) // 4096  # a 1 TiB file costs next to nothing
    # write past EOF makes a hole; truncate down then up reads zeros past the old end
    g = m / "g"
    with open(g, "wb") as fh:
        fh.write(b"a" * 10000)
        fh.seek(10 << 20)
        fh.write(b"b")
    assert os.stat(g).st_size == (10 << 20) + 1
    assert os.stat(g).st_blocks <= 8 * 8  # 4 data blocks and 2 indirect blocks
    data = g.read_bytes()
    assert data[:10000] == b"a" * 10000 and data[10000:-1] == bytes(len(data) - 10001)
    os.truncate(g, 100)
    os.truncate(g, 9000)
    assert g.read_bytes() == b"a" * 100 + bytes(8900)
    # unlinking the 1 TiB file frees its few blocks (its holes cost nothing to free)
    free = os.statvfs(m).f_bfree
    os.unlink(f)
    dfd = os.open(m, os.O_RDONLY)
    try:
        os.fsync(dfd)  # commits: the freed blocks count as free
    finally:
        os.close(dfd)
    assert os.statvfs(m).f_bfree >= free + 2


def test_unlinked_open_file_stays_readable(mount):
    m = mount.path
    (m / "other").write_text("o")
    commit(m)
    base = os.statvfs(m)
    data = os.urandom(2 << 20)
    (m / "victim").write_bytes(data)
    # another process holds it open, waits until we unlink it, then reads it
    code = ("import sys,hashlib\n"
            "f=open(sys.argv[1],'rb')\n"
            "print('ready',flush=True)\n"
            "sys.stdin.readline()\n"
            "print(hashlib.sha256(f.read()).hexdigest(),flush=True)\n")
    with subprocess.Popen([SYS_PY, "-c", code, m / "victim"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as p:
        assert p.stdout.readline().strip() == "ready"
        fd = os.open(m / "victim", os.O_RDWR)
        try:
            sh(["rm", m / "victim"])
            assert not (m / "victim").exists()
            expect(errno.ENOENT, open, m / "victim")
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == sha(data)
            assert p.wait(timeout=30) == 0
            # this process can still read and write it
            assert os.fstat(fd).st_nlink == 0
            assert os.pread(fd, len(data), 0) == data
            os.pwrite(fd, b"more", len(data))
            assert os.fstat(fd).st_size == len(data) + 4
            assert os.pread(fd, 8, len(data) - 4) == data[-4:] + b"more"
            # a new file with the old name is a different file
            (m / "victim").write_text("new")
            assert os.pread(fd, 4, 0) == data[:4]
            os.unlink(m / "victim")
            commit(m)
            assert os.statvfs(m).f_bfree <= base.f_bfree - 512  # still held
        finally:
            os.close(fd)
    # once closed (and forgotten by the kernel) its blocks and inode are free again
    st = wait_statfs(m, lambda st: st.f_bfree >= base.f_bfree)
    assert st.f_bfree == base.f_bfree
    assert st.f_ffree == base.f_ffree
    os.unlink(m / "other")
    assert os.listdir(m) == []


def test_large_sequential_write_read(mount_site, tmp_path):
    mnt = mount_site()
    src = tmp_path / "src.bin"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(256):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    want = h.hexdigest()
    sh(["dd", f"if={src}", f"of={mnt.path / 'big'}", "bs=4M", "status=none"])
    src.unlink()
    assert os.stat(mnt.path / "big").st_size == 256 << 20
    assert sh(["sha256sum", mnt.path / "big"]).stdout.split()[0].decode() == want
    used = (os.statvfs(mnt.path).f_blocks - os.statvfs(mnt.path).f_bfree) * 4096
    assert 256 << 20 <= used < (256 << 20) + (4 << 20)
    # read back from the volume (not the page cache) after a remount
    mnt.umount()
    mnt = mount_site()
    r = sh(f"dd if={mnt.path / 'big'} bs=1M status=none | sha256sum")
    assert r.stdout.split()[0].decode() == want
    # unaligned reads of any size agree with a plain read of the same range
    fd = os.open(mnt.path / "big", os.O_RDONLY)
    try:
        head = os.pread(fd, 48 << 20, 0)
        assert len(head) == 48 << 20
        rng = random.Random(5)
        off = 0
        while off < len(head):
            n = min(rng.randint(1, 3 << 20), len(head) - off)
            assert os.pread(fd, n, off) == head[off:off + n]
            off += n
        assert os.pread(fd, 100, (256 << 20) - 10) == os.pread(fd, 10, (256 << 20) - 10)
        assert os.pread(fd, 100, 256 << 20) == b""
    finally:
        os.close(fd)


def test_statfs(mount):
    m = mount.path
    st0 = os.statvfs(m)
    assert st0.f_bsize == 4096 and st0.f_frsize == 4096
    assert st0.f_namemax == 255
    assert 0 < st0.f_bavail <= st0.f_bfree <= st0.f_blocks <= (1 << 30) // 4096
    assert st0.f_blocks > (1 << 30) // 4096 * 0.9
    assert 0 < st0.f_ffree <= st0.f_files
    # `stat -f` in another process agrees
    out = sh(["stat", "-f", "-c", "%S %b %f %c %d", m]).stdout.decode().split()
    assert list(map(int, out)) == [4096, st0.f_blocks, st0.f_bfree, st0.f_files, st0.f_ffree]
    with open(m / "f", "wb") as f:
        f.write(os.urandom(8 << 20))
        f.flush()
        os.fsync(f.fileno())
    os.mkdir(m / "d")
    commit(m)
    st1 = os.statvfs(m)
    assert st1.f_blocks == st0.f_blocks and st1.f_files == st0.f_files
    assert st0.f_bfree - st1.f_bfree >= 2048
    assert st0.f_bfree - st1.f_bfree < 2048 + 64
    assert st0.f_bavail - st1.f_bavail == st0.f_bfree - st1.f_bfree
    assert st0.f_ffree - st1.f_ffree == 2
    out = sh(["df", "-B4096", "--output=used", m]).stdout.decode().split()
    assert int(out[-1]) == st1.f_blocks - st1.f_bfree
    os.unlink(m / "f")
    os.rmdir(m / "d")
    st2 = wait_statfs(m, lambda st: st.f_bfree >= st0.f_bfree)
    assert st2.f_bfree == st0.f_bfree and st2.f_ffree == st0.f_ffree


# ----------------------------------------------------------------------------- mounting


def _mount_line(path: Path) -> str:
    with open("/proc/mounts") as f:
        return next(ln for ln in f if ln.split()[1] == str(path))


def _image_digest(site: Path) -> str:
    h = hashlib.sha256()
    with open(site / "volume.img", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            if chunk.count(0) != len(chunk):
                h.update(chunk)
            else:
                h.update(b"z%d" % len(chunk))
    return h.hexdigest()


def test_readonly_mount(mount_site):
    mnt = mount_site("64M")
    m = mnt.path
    (m / "f").write_text("content")
    os.mkdir(m / "d")
    (m / "d/g").write_text("g")
    os.setxattr(m / "f", "user.a", b"1")
    os.symlink("f", m / "l")
    mnt.umount()
    digest = _image_digest(mnt.site)
    mnt = mount_site("64M", "--ro")
    m = mnt.path
    assert _mount_line(m).split()[3].startswith("ro,")
    # reading works
    assert (m / "f").read_text() == "content" and (m / "l").read_text() == "content"
    assert os.getxattr(m / "f", "user.a") == b"1"
    assert sorted(os.listdir(m)) == ["d", "f", "l"]
    # every change is refused with EROFS
    changes = {
        "create": lambda: open(m / "new", "w"),
        "write": lambda: open(m / "f", "r+"),
        "append": lambda: open(m / "f", "a"),
        "mkdir": lambda: os.mkdir(m / "d2"),
        "rmdir": lambda: os.rmdir(m / "d"),
        "unlink": lambda: os.unlink(m / "f"),
        "rename": lambda: os.rename(m / "f", m / "f2"),
        "link": lambda: os.link(m / "f", m / "f2"),
        "symlink": lambda: os.symlink("f", m / "l2"),
        "mknod": lambda: os.mkfifo(m / "p"),
        "chmod": lambda: os.chmod(m / "f", 0o600),
        "chown": lambda: os.chown(m / "f", UID_A, UID_A),
        "utime": lambda: os.utime(m / "f"),
        "setxattr": lambda: os.setxattr(m / "f", "user.b", b"2"),
        "removexattr": lambda: os.removexattr(m / "f", "user.a"),
        "truncate": lambda: os.truncate(m / "f", 0),
        "renameat2": lambda: renameat2(m / "f", m / "d", RENAME_EXCHANGE),
    }
    for what, fn in changes.items():
        assert errno_of(fn) == errno.EROFS, what
    r = sh(["touch", m / "t"], check=False)
    assert r.returncode == 1 and b"Read-only file system" in r.stderr
    r = sh(["cp", m / "f", m / "copy"], check=False)
    assert r.returncode == 1
    mnt.umount()
    assert _image_digest(mnt.site) == digest  # a read-only mount writes nothing
    mnt = mount_site("64M")
    assert (mnt.path / "f").read_text() == "content"
    assert sorted(os.listdir(mnt.path)) == ["d", "f", "l"]


def _wait_daemon_gone(site: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (site / "repfs.pid").exists():
        assert time.monotonic() < deadline, "the daemon did not exit after umount"
        time.sleep(0.05)


def _check_log(site: Path) -> None:
    log = site / "repfs.log"
    bad = [ln for ln in log.read_text().splitlines()
           if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
    assert not bad, bad


def test_mount_dash_t_helper(tmp_path):
    site, mnt = tmp_path / "site", tmp_path / "mnt"
    mnt.mkdir()
    run_repfs("mkfs", site, "--size", "64M")
    try:
        r = sh(["mount", "-t", "fuse.repfs", site, mnt], check=False)
        assert r.returncode == 0, r.stderr
        line = _mount_line(mnt)
        assert line.split()[2] == "fuse.repfs" and line.split()[0] == str(site)
        (mnt / "f").write_bytes(b"via mount -t")
        # plain umount(8): the daemon notices, checkpoints and exits
        sh(["umount", mnt])
        assert not os.path.ismount(mnt)
        _wait_daemon_gone(site)
        fsck_clean(site)
        # read-only through -o ro, then `repfs umount`
        sh(["mount", "-t", "fuse.repfs", "-o", "ro,noatime,nodev", site, mnt])
        assert (mnt / "f").read_bytes() == b"via mount -t"
        expect(errno.EROFS, open, mnt / "g", "w")
        run_repfs("umount", mnt)
        assert not os.path.ismount(mnt)
        assert not (site / "repfs.pid").exists()
        # mount options mount(8) passes, and writeback_cache
        sh(["mount", "-t", "fuse.repfs", "-o", "rw,relatime,writeback_cache", site, mnt])
        data = os.urandom(1 << 20)
        with open(mnt / "wb", "wb") as f:
            for i in range(0, len(data), 1000):
                f.write(data[i:i + 1000])
        assert (mnt / "wb").read_bytes() == data
        # the kernel keeps the file's times under the writeback cache: the site gets exactly
        # those (its SETATTR), not the daemon's clock at each WRITE
        times = os.stat(mnt / "wb").st_mtime_ns, os.stat(mnt / "wb").st_ctime_ns
        run_repfs("umount", mnt)
        sh(["mount", "-t", "fuse.repfs", site, mnt])
        assert (mnt / "wb").read_bytes() == data
        assert (os.stat(mnt / "wb").st_mtime_ns, os.stat(mnt / "wb").st_ctime_ns) == times
        assert (mnt / "f").read_bytes() == b"via mount -t"
        # an unknown option is refused with a message, nothing mounted
        run_repfs("umount", mnt)
        r = sh(["mount", "-t", "fuse.repfs", "-o", "bogus_option", site, mnt], check=False)
        assert r.returncode != 0 and b"bogus_option" in r.stderr
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    _wait_daemon_gone(site)
    fsck_clean(site)
    _check_log(site)


def _manifest(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            entry = dict(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, nlink=st.st_nlink,
                         mtime=st.st_mtime_ns, ino=st.st_ino)
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                entry["sha"] = sha(p.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = st.st_rdev
            if not stat.S_ISLNK(st.st_mode):
                entry["xattrs"] = {k: os.getxattr(p, k) for k in sorted(os.listxattr(p))}
            out[rel] = entry
    return out


def test_data_persists_across_remount(mount_site):
    mnt = mount_site()
    m = mnt.path
    rng = random.Random(1234)
    os.makedirs(m / "a/b/c")
    os.mkdir(m / "sticky")
    os.chmod(m / "sticky", 0o1777)
    for size in (0, 1, 4095, 4096, 4097, 12 * 4096, 12 * 4096 + 1, (1 << 20) + 3,
                 1024 * 4096 + 4096 * 13 + 7):
        (m / f"a/f{size}").write_bytes(rng.randbytes(size))
    (m / "a/b/c/deep").write_bytes(rng.randbytes(100_000))
    with open(m / "sparse", "wb") as f:
        f.write(b"S")
        f.seek(100 << 20)
        f.write(b"E")
    with open(m / "truncated", "wb") as f:
        f.write(b"t" * 10000)
    os.truncate(m / "truncated", 5000)
    os.truncate(m / "truncated", 9000)
    os.link(m / "a/f4097", m / "a/b/hard")
    with open(m / "mapped", "wb") as f:  # written through a shared mapping
        f.truncate(50_000)
    with open(m / "mapped", "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        mm[4000:4100] = b"m" * 100
        mm[-7:] = b"the end"
        mm.flush()
        mm.close()
    os.symlink("a/b/c/deep", m / "sym")
    os.symlink("x" * 3000, m / "longsym")
    os.mkfifo(m / "fifo")
    os.mknod(m / "chr", stat.S_IFCHR | 0o600, os.makedev(4, 64))
    os.chown(m / "a/f1", UID_A, UID_B)
    os.chmod(m / "a/f1", 0o4751)
    os.setxattr(m / "a/f0", "user.k", b"v" * 500)
    os.setxattr(m / "a", "trusted.t", b"")
    for p in ("a/f0", "a/f1", "sparse", "a/b"):
        os.utime(m / p, ns=(1_234_567_890_123_456_789, 1_111_111_111_222_222_222))
    # many names in one directory (the table doubles several times)
    os.mkdir(m / "many")
    for i in range(300):
        (m / f"many/entry-{i:04d}-{'x' * (i % 50)}").write_bytes(i.to_bytes(2, "little"))
    for i in range(0, 300, 3):
        os.unlink(m / f"many/entry-{i:04d}-{'x' * (i % 50)}")
    before = _manifest(m)
    mnt.umount()
    mnt = mount_site()
    after = _manifest(mnt.path)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k] == before[k], k


def test_readdir_while_the_directory_changes(shared):
    """POSIX: a name neither added nor removed during a readdir scan is returned exactly
    once, even when the directory's table grows (doubles) or shrinks meanwhile."""
    m = shared.path
    d = m / "d"
    os.mkdir(d)
    for i in range(1000):
        os.mknod(d / f"old-{i:05d}")
    seen = []
    removed = set()
    with os.scandir(d) as it:
        for k, e in enumerate(it):
            seen.append(e.name)
            if k == 50:  # grow the table several times over
                for i in range(3000):
                    os.mknod(d / f"new-{i:05d}")
            if k == 300:  # and remove names not seen yet
                for i in range(0, 1000, 2):
                    name = f"old-{i:05d}"
                    if name not in seen:
                        os.unlink(d / name)
                        removed.add(name)
    stable = {f"old-{i:05d}" for i in range(1000)} - removed
    counts = {}
    for n in seen:
        counts[n] = counts.get(n, 0) + 1
    assert not [n for n, c in counts.items() if c > 1], "names returned twice"
    assert not stable - set(seen), f"{len(stable - set(seen))} stable names were skipped"
    assert len(os.listdir(d)) == 4000 - len(removed)
    sh(["rm", "-rf", d])


def test_open_with_o_trunc_truncates(shared):
    """FUSE passes O_TRUNC to open() (atomic_o_trunc): the file system must truncate."""
    m = shared.path
    sh(f"printf 'hello world' > {m / 'f'}")
    sh(f"printf HI > {m / 'f'}")  # the shell opens with O_WRONLY|O_CREAT|O_TRUNC
    assert sh(["cat", m / "f"]).stdout == b"HI"
    with open(m / "f", "wb") as fh:  # Python's "wb" is O_TRUNC as well
        fh.write(b"x")
    assert (m / "f").read_bytes() == b"x"
    fd = os.open(m / "f", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(m / "f").st_size == 0


def test_read_updates_atime_as_relatime(shared):
    """The mount says relatime: a read after a write (atime <= mtime) updates atime."""
    m = shared.path
    f = m / "f"
    f.write_bytes(b"x" * 100)
    os.utime(f, ns=(1_000_000_000_000_000_000, 1_500_000_000_000_000_000))  # atime < mtime
    before = time.time_ns()
    assert sh(["cat", f]).stdout == b"x" * 100
    assert os.stat(f).st_atime_ns >= before - 50_000_000


def test_large_directory_listed_by_ls(shared):
    m = shared.path
    d = m / "big"
    os.mkdir(d)
    n = 10_000
    # made by another process: 10,000 names (links to one file, the cheapest entries)
    code = ("import os,sys\n"
            "d=sys.argv[1]\n"
            "open(os.path.join(d,'seed'),'w').write('s')\n"
            "for i in range(1, %d):\n"
            "    os.link(os.path.join(d,'seed'), os.path.join(d,'name-%%05d' %% i))\n" % n)
    sh([SYS_PY, "-c", code, d], timeout=300)
    want = {"seed"} | {f"name-{i:05d}" for i in range(1, n)}
    out = sh(["env", "LC_ALL=C", "ls", "-1", d]).stdout.decode().split("\n")
    assert out[-1] == ""
    assert out[:-1] == sorted(want)
    out = sh(["ls", "-1", "-f", d]).stdout.decode().split()
    assert len(out) == n + 2 and set(out) == want | {".", ".."}  # no duplicates, no gaps
    assert os.stat(d / "seed").st_nlink == n
    assert sh(["find", d, "-type", "f"]).stdout.decode().count("\n") == n
    # remove every other name while another process lists the directory
    code = ("import os,sys\n"
            "d=sys.argv[1]\n"
            "for i in range(1, %d, 2):\n"
            "    os.unlink(os.path.join(d,'name-%%05d' %% i))\n" % n)
    sh([SYS_PY, "-c", code, d], timeout=300)
    want -= {f"name-{i:05d}" for i in range(1, n, 2)}
    out = sh(["env", "LC_ALL=C", "ls", "-1", d]).stdout.decode().split()
    assert out == sorted(want)
    assert os.stat(d / "seed").st_nlink == len(want)
    sh(["rm", "-rf", d])
    assert os.listdir(m) == []
