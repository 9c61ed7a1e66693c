"""Tier 2: the command-line tools' error paths, against real sites and mounts.

Every failure must print exactly one line on stderr (prefixed with the program's name),
exit with the documented code (`repfs`: 1 the operation failed, 2 bad arguments; `repfs
fsck`: 0 clean, 1 repaired, 4 problems remain, 8 could not run) and damage nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repfs.fs.format import Superblock
from tests.conftest import fsck_clean, run_repfs

ADMIN = [sys.executable, "-c", "import sys; from repfs.cli.admin import main; main()"]


def run_admin(*args, check=True):
    r = subprocess.run([*ADMIN, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"repfs-admin {args} exited {r.returncode}: {r.stderr.strip()}")
    return r


def fails(r: subprocess.CompletedProcess, code: int, *words: str, prog: str = "repfs") -> str:
    """r failed with `code` and one line on stderr that mentions every word."""
    err = r.stderr
    assert r.returncode == code, f"exit {r.returncode}, want {code}: {err!r} {r.stdout!r}"
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert lines[0].startswith(f"{prog}: "), lines[0]
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"
    return lines[0]


def digest(site: Path) -> dict[str, str]:
    """Contents of everything in a site directory but the log and the lock."""
    out = {}
    for p in sorted(site.rglob("*")):
        if p.is_file() and p.name not in ("repfs.log", "lock"):
            out[str(p.relative_to(site))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def mounted(path: Path) -> bool:
    return os.path.ismount(path)


def make_site(path: Path, size: str = "64M") -> Path:
    run_repfs("mkfs", path, "--size", size)
    return path


# ----------------------------------------------------------------------------- mkfs


def test_mkfs_errors(tmp_path):
    site = make_site(tmp_path / "site")
    before = digest(site)
    # an existing site without --force
    fails(run_repfs("mkfs", site, "--size", "64M", check=False), 1, "already", "--force")
    fails(run_repfs("mkfs", site, "--size", "1G", check=False), 1, "--force")
    assert digest(site) == before
    # bad --size: exit 2, nothing made
    for bad in ("abc", "10X", "-1G", "0", "", "1.5.5G", "G"):
        new = tmp_path / f"new-{len(bad)}-{bad.strip('-.') or 'empty'}"
        fails(run_repfs("mkfs", new, "--size", bad, check=False), 2, "size")
        assert not (new / "volume.img").exists()
    # too small: exit 2, nothing made
    for small in ("100K", "4096", "255K"):
        new = tmp_path / f"small-{small}"
        fails(run_repfs("mkfs", new, "--size", small, check=False), 2, "small")
        assert not new.exists() or not (new / "volume.img").exists()
    # also a bad size on the existing site leaves it alone
    fails(run_repfs("mkfs", site, "--size", "abc", "--force", check=False), 2, "size")
    assert digest(site) == before
    # arguments missing or unknown
    fails(run_repfs("mkfs", tmp_path / "x", check=False), 2, "--size")
    fails(run_repfs("mkfs", check=False), 2)
    fails(run_repfs(check=False), 2)
    fails(run_repfs("frobnicate", check=False), 2)
    fails(run_repfs("mkfs", tmp_path / "x", "--size", "64M", "--bogus", check=False), 2)
    # impossible requests fail without leaving half a site behind
    fails(run_repfs("mkfs", tmp_path / "lbl", "--size", "64M", "--label", "L" * 65,
                    check=False), 1, "label")
    assert not (tmp_path / "lbl/volume.img").exists()
    fails(run_repfs("mkfs", tmp_path / "ino", "--size", "64M", "--inodes", "5", check=False),
          1, "inode")
    assert not (tmp_path / "ino/volume.img").exists()
    (tmp_path / "plainfile").write_text("x")
    fails(run_repfs("mkfs", tmp_path / "plainfile", "--size", "64M", check=False), 1)
    assert (tmp_path / "plainfile").read_text() == "x"
    # and afterwards the same paths can be made into sites
    run_repfs("mkfs", tmp_path / "lbl", "--size", "64M", "--label", "L" * 64)
    fsck_clean(tmp_path / "lbl")
    fsck_clean(site)
    # --force really replaces
    out = run_repfs("mkfs", site, "--size", "32M", "--force").stdout
    assert "made site" in out
    assert Superblock.unpack((site / "volume.img").read_bytes()[:4096]).nblocks == 8192
    fsck_clean(site)


def test_mkfs_failure_leaves_no_half_site(tmp_path):
    """20T is past what the format addresses (2**32-1 blocks) and ext4's 16 TiB file size
    limit: mkfs refuses it up front, and must not leave an empty volume.img (or an empty site
    directory) behind that makes the next mkfs say 'already a repfs site'."""
    site = tmp_path / "huge"
    r = run_repfs("mkfs", site, "--size", "20T", check=False)
    fails(r, 2, "too large")
    assert not site.exists()
    run_repfs("mkfs", site, "--size", "64M")
    fsck_clean(site)


# ----------------------------------------------------------------------------- mount


def test_mount_errors(mount_site, tmp_path):
    live = mount_site("64M", name="live")
    (live.path / "f").write_text("still here")
    other = make_site(tmp_path / "other")
    other_before = digest(other)
    empty = tmp_path / "empty-mnt"
    empty.mkdir()
    # not a site, or no such site
    nosite = tmp_path / "nosite"
    nosite.mkdir()
    fails(run_repfs("mount", nosite, empty, check=False), 1, "not a repfs site")
    fails(run_repfs("mount", tmp_path / "missing", empty, check=False), 1, "missing")
    # the mount point: missing, a file, not empty, already a mount point
    fails(run_repfs("mount", other, tmp_path / "nope", check=False), 1, "does not exist")
    (tmp_path / "afile").write_text("x")
    fails(run_repfs("mount", other, tmp_path / "afile", check=False), 1, "not a directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    fails(run_repfs("mount", other, full, check=False), 1, "not empty")
    fails(run_repfs("mount", other, live.path, check=False), 1, "already a mount point")
    # the site is mounted already (elsewhere)
    line = fails(run_repfs("mount", live.site, empty, check=False), 1, "already mounted")
    assert str(live.path) in line
    # bad mount options
    fails(run_repfs("mount", other, empty, "-o", "bogus", check=False), 2, "bogus")
    fails(run_repfs("mount", other, check=False), 2)
    # nothing got mounted, nothing was damaged; the live mount works on
    for p in (empty, full, tmp_path / "nope"):
        assert not mounted(p)
    assert (full / "x").read_text() == "x" and os.listdir(empty) == []
    assert (live.path / "f").read_text() == "still here"
    (live.path / "g").write_text("new")
    assert digest(other) == other_before
    fsck_clean(other)
    # and the refused site mounts fine where it may
    m = mount_site("64M", name="other")
    assert os.listdir(m.path) == []


def test_umount_errors(mount_site, tmp_path):
    live = mount_site("64M")
    (live.path / "f").write_text("x")
    plain = tmp_path / "plain"
    plain.mkdir()
    fails(run_repfs("umount", plain, check=False), 1, "not a repfs mount")
    fails(run_repfs("umount", tmp_path / "missing", check=False), 1, "not a repfs mount")
    fails(run_repfs("umount", "/proc", check=False), 1, "not a repfs mount")  # not ours
    fails(run_repfs("umount", live.site, check=False), 1, "not a repfs mount")  # the site dir
    fails(run_repfs("umount", check=False), 2)
    assert mounted(Path("/proc"))
    # a busy mount stays mounted, with a message saying why
    fd = os.open(live.path / "f", os.O_RDONLY)
    try:
        fails(run_repfs("umount", live.path, check=False), 1, "busy")
        assert mounted(live.path)
        assert os.pread(fd, 10, 0) == b"x"
    finally:
        os.close(fd)
    assert (live.path / "f").read_text() == "x"


def test_sigterm_unmounts_cleanly(mount_site):
    """SIGTERM (systemd's stop, `kill`) ends the daemon as `repfs umount` does: the data
    committed, the kernel's mount gone (it was left dead: 'Transport endpoint is not
    connected'), the site clean; it mounts again with the data."""
    from repfs.site import Site
    m = mount_site("64M")
    (m.path / "f").write_bytes(b"kept" * 1000)
    pid = Site(m.site).owner()[0]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    # (/proc/mounts, not ismount: a dead FUSE mount fails stat, which ismount calls "no")
    while os.path.exists(f"/proc/{pid}") or any(
            line.split()[1] == str(m.path)
            for line in Path("/proc/mounts").read_text().splitlines()):
        assert time.monotonic() < deadline, "still running or still mounted"
        time.sleep(0.05)
    assert "unmounted" in (m.site / "repfs.log").read_text()
    assert run_repfs("fsck", m.site, check=False).returncode == 0
    run_repfs("mount", m.site, m.path)
    assert (m.path / "f").read_bytes() == b"kept" * 1000


# ----------------------------------------------------------------------------- fsck


def test_fsck_errors(mount_site, tmp_path):
    live = mount_site("64M")
    (live.path / "f").write_text("x")
    line = fails(run_repfs("fsck", live.site, check=False), 8, "in use")
    assert str(live.path) in line  # says where it is mounted
    fails(run_repfs("fsck", live.site, "--repair", check=False), 8, "in use")
    nosite = tmp_path / "nosite"
    nosite.mkdir()
    fails(run_repfs("fsck", nosite, check=False), 8, "not a repfs site")
    fails(run_repfs("fsck", tmp_path / "missing", check=False), 8)
    fails(run_repfs("fsck", check=False), 2)
    # mkfs --force on a mounted site is refused too
    fails(run_repfs("mkfs", live.site, "--size", "64M", "--force", check=False), 1, "in use")
    assert (live.path / "f").read_text() == "x"
    (live.path / "g").write_text("y")
    assert sorted(os.listdir(live.path)) == ["f", "g"]


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def test_corrupted_superblock(tmp_path, mount_site):
    m = mount_site("64M")
    (m.path / "f").write_text("precious")
    m.umount()
    img = m.site / "volume.img"
    before = digest(m.site)
    _flip(img, 100)  # inside the checksummed fields (the uuid)
    damaged = digest(m.site)
    fails(run_repfs("mount", m.site, m.path, check=False), 1, "checksum")
    assert not mounted(m.path)
    fails(run_repfs("fsck", m.site, check=False), 8, "checksum")
    fails(run_repfs("fsck", m.site, "--repair", check=False), 8, "checksum")
    fails(run_admin("--site", m.site, "status", check=False), 1, "checksum",
          prog="repfs-admin")
    assert digest(m.site) == damaged  # none of that wrote anything
    # a wrong magic number is named as such
    _flip(img, 100)
    _flip(img, 0, 0xFF)
    fails(run_repfs("mount", m.site, m.path, check=False), 1, "not a repfs volume")
    fails(run_repfs("fsck", m.site, check=False), 8, "not a repfs volume")
    _flip(img, 0, 0xFF)
    assert digest(m.site) == before
    fsck_clean(m.site)
    m = mount_site("64M")
    assert (m.path / "f").read_text() == "precious"


def _bitmap_bit(img: Path, sb: Superblock, block: int) -> tuple[int, int]:
    """(file offset of the bitmap byte, bit mask) of `block` in the block bitmap."""
    assert block < 4096 * 8  # in the first bitmap block (volume block 1)
    return sb.bbitmap_start * 4096 + block // 8, 1 << (block % 8)


def _get_bit(img: Path, off: int, mask: int) -> bool:
    with open(img, "rb") as f:
        f.seek(off)
        return bool(f.read(1)[0] & mask)


def test_fsck_finds_and_repairs_bitmap_damage(mount_site):
    m = mount_site("64M")
    data = os.urandom(300_000)
    (m.path / "data").write_bytes(data)
    os.mkdir(m.path / "d")
    (m.path / "d/small").write_text("small")
    m.umount()
    out = fsck_clean(m.site)
    assert "clean" in out
    img = m.site / "volume.img"
    sb = Superblock.unpack(img.read_bytes()[:4096])
    assert sb.bbitmap_start == 1
    # mark an unused data block as used (a leak)
    unused = sb.nblocks - 10
    off, mask = _bitmap_bit(img, sb, unused)
    assert not _get_bit(img, off, mask)
    _flip(img, off, mask)
    r = run_repfs("fsck", m.site, check=False)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "marked used but nothing uses them" in r.stdout and str(unused) in r.stdout
    assert "run with --repair" in r.stdout
    r = run_repfs("fsck", m.site, check=False)  # a plain fsck changed nothing
    assert r.returncode == 4
    r = run_repfs("fsck", m.site, "--repair", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "repaired" in r.stdout
    assert not _get_bit(img, off, mask)
    fsck_clean(m.site)
    # mark a block a file uses as free (the dangerous kind): found, and repaired
    m = mount_site("64M")
    ino = os.stat(m.path / "data").st_ino
    m.umount()
    used = next(b for b in range(sb.data_start, sb.nblocks)
                if _get_bit(img, *_bitmap_bit(img, sb, b)))
    off, mask = _bitmap_bit(img, sb, used)
    _flip(img, off, mask)
    r = run_repfs("fsck", m.site, "-q", check=False)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "in use are marked free" in r.stdout
    r = run_repfs("fsck", m.site, "--repair", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert _get_bit(img, off, mask)
    fsck_clean(m.site)
    m = mount_site("64M")
    assert (m.path / "data").read_bytes() == data
    assert os.stat(m.path / "data").st_ino == ino
    assert (m.path / "d/small").read_text() == "small"


def test_fsck_exit_codes_and_output(tmp_path):
    site = make_site(tmp_path / "site")
    r = run_repfs("fsck", site)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.strip().splitlines()[-1] == "clean"
    assert "check_block_bitmap" in r.stdout
    r = run_repfs("fsck", site, "-q")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    r = run_repfs("fsck", site, "--repair")
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "clean"


# ----------------------------------------------------------------------------- repfs-admin


def test_admin_status(mount_site, tmp_path):
    m = mount_site("64M")
    pid = int((m.site / "repfs.pid").read_text().split("\n")[0])
    # mounted: by site directory and by mount point, as a table and as JSON
    for target in (m.site, m.path):
        r = run_admin("--site", target, "status")
        assert r.stderr == ""
        rows = dict(line.split(None, 1) for line in r.stdout.splitlines()
                    if line and not line.startswith(" ") and len(line.split(None, 1)) == 2)
        assert rows["site"] == str(m.site)
        assert rows["state"].startswith("mounted")
        assert str(m.path) in r.stdout and str(pid) in r.stdout
        st = json.loads(run_admin("--site", target, "--json", "status").stdout)
        assert st["state"] == "mounted" and st["mountpoint"] == str(m.path)
        assert st["pid"] == pid and st["site"] == str(m.site)
        assert st["volume_bytes"] == 64 << 20
    used0 = st["used_bytes"]
    with open(m.path / "big", "wb") as f:
        f.write(os.urandom(8 << 20))
    st = json.loads(run_admin("--site", m.site, "--json", "status").stdout)
    assert st["used_bytes"] - used0 >= 8 << 20  # live numbers from the daemon
    vfs = os.statvfs(m.path)
    assert st["free_bytes"] == vfs.f_bfree * 4096
    inodes_used = st["inodes"] - st["free_inodes"]
    m.umount()
    # not mounted: read from the volume itself
    st2 = json.loads(run_admin("--site", m.site, "--json", "status").stdout)
    assert st2["state"] == "not mounted"
    assert st2["mountpoint"] is None and st2["pid"] is None
    assert st2["volume_bytes"] == 64 << 20
    assert st2["free_bytes"] == st["free_bytes"]
    assert st2["inodes"] - st2["free_inodes"] == inodes_used
    r = run_admin("--site", m.site, "status")
    assert "not mounted" in r.stdout and r.stderr == ""
    # errors: one line, non-zero, nothing touched
    before = digest(m.site)
    nosite = tmp_path / "nosite"
    nosite.mkdir()
    fails(run_admin("--site", nosite, "status", check=False), 1, "neither", prog="repfs-admin")
    fails(run_admin("--site", m.site, check=False), 2, prog="repfs-admin")
    fails(run_admin("status", check=False), 2, "--site", prog="repfs-admin")
    fails(run_admin("--site", m.site, "frobnicate", check=False), 2, prog="repfs-admin")
    assert digest(m.site) == before


def _run_into_closed_pipe(cmd) -> subprocess.CompletedProcess:
    """Run cmd with its stdout a pipe whose reader is gone (`cmd | true`, `| head -0`)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)


def test_closed_stdout_gives_no_traceback(tmp_path):
    site = make_site(tmp_path / "site")
    for cmd in ([sys.executable, "-m", "repfs", "fsck", str(site)],
                [*ADMIN, "--site", str(site), "status"],
                [*ADMIN, "--site", str(site), "--json", "status"]):
        r = _run_into_closed_pipe(cmd)
        assert "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) <= 1, r.stderr
        if "fsck" in cmd:
            assert r.returncode != 1, "fsck exit 1 would mean 'all problems repaired'"
    fsck_clean(site)


def test_admin_json_after_the_verb(tmp_path):
    site = make_site(tmp_path / "site")
    st = json.loads(run_admin("--site", site, "status", "--json").stdout)
    assert st["state"] == "not mounted"


# ----------------------------------------------------------------------------- control port


def test_admin_tells_no_daemon_from_no_answer(mount_site):
    """A wedged daemon (here: stopped with SIGSTOP) is 'did not answer in N s' (exit 4), a site
    without a daemon or an address where nothing listens is 'no daemon' (exit 3)."""
    m = mount_site("64M")
    host, port = (lambda c: (c["host"], c["port"]))(json.loads((m.site / "control.json")
                                                               .read_text()))
    token = (m.site / "control.token").read_text().strip()
    pid = int((m.site / "repfs.pid").read_text().split("\n")[0])
    # (nothing may touch the mount while its daemon is stopped: the site directory is the target)
    os.kill(pid, signal.SIGSTOP)
    try:
        r = run_admin("--site", m.site, "--timeout", "1", "snapshot", "list", check=False)
    finally:
        os.kill(pid, signal.SIGCONT)
    fails(r, 4, "did not answer in 1 s", prog="repfs-admin")
    assert run_admin("--site", m.site, "--json", "snapshot", "list").stdout.strip() == "[]"
    for bad in ("0", "-1", "nan", "inf", "soon"):
        fails(run_admin("--site", m.site, "--timeout", bad, "status", check=False), 2,
              "timeout", prog="repfs-admin")
    m.umount()
    fails(run_admin("--site", m.site, "snapshot", "list", check=False), 3, "no daemon",
          "not mounted", prog="repfs-admin")
    r = subprocess.run([*ADMIN, "--site", f"{host}:{port}", "status"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "REPFS_TOKEN": token})
    fails(r, 3, "no daemon", f"{host}:{port}", prog="repfs-admin")


def test_token_file_open_to_others_is_refused(mount_site):
    m = mount_site("64M")
    token = m.site / "control.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    token.chmod(0o640)
    try:
        fails(run_admin("--site", m.site, "snapshot", "list", check=False), 1,
              "open to other users", "0640", prog="repfs-admin")
    finally:
        token.chmod(0o600)
    m.umount()
    before = token.read_text()
    token.chmod(0o604)
    fails(run_repfs("mount", m.site, m.path, check=False), 1, "open to other users",
          "chmod 600")
    assert not mounted(m.path)
    assert token.read_text() == before  # refused, not silently replaced
    token.chmod(0o600)
    run_repfs("mount", m.site, m.path)
    assert run_admin("--site", m.site, "--json", "snapshot", "list").stdout.strip() == "[]"


HOSTILE = r"""
import json, os, select, socket, sys, time
host, port, site = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {"uid": os.getuid()}

def talk(data, shut=True):
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply.split(b"\r\n", 1)[0].decode("latin-1")

try:
    open(os.path.join(site, "control.token")).read()
    out["token"] = "read"
except PermissionError:
    out["token"] = "denied"
out["garbage"] = talk(b"\x16\x03\x01\x02\x00 not http\r\n\r\n")
out["zeros"] = talk(bytes(3000))
out["no_token"] = talk(b"POST /v1/snapshots HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n"
                       b'{"name":"ev"}')
out["guessed"] = talk(b"DELETE /v1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + b"A" * 43 + b"\r\n\r\n")
out["restore"] = talk(b"POST /v1/snapshots/s1/restore HTTP/1.1\r\nHost: x\r\n"
                      b"Authorization: Bearer x\r\nContent-Length: 0\r\n\r\n")
out["huge"] = talk(b"POST /v1/repl/chunk HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Length: 999999999999\r\n\r\n", shut=False)
# a flood of connections that say nothing: past the cap on unauthenticated ones, each new
# one closes the oldest (strangers cannot hold every slot; a 503 would refuse peers too)
flood = [socket.create_connection((host, port), timeout=30) for _ in range(100)]
busy, deadline = 0, time.monotonic() + 20
waiting = list(flood)
while waiting and busy < 36 and time.monotonic() < deadline:
    ready, _, _ = select.select(waiting, [], [], 0.5)
    for s in ready:
        waiting.remove(s)
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            data = b""
        if data == b"" or data.startswith(b"HTTP/1.1 503"):
            busy += 1
out["busy"] = busy
for s in flood:
    s.close()
for _ in range(100):  # the daemon notices the closed connections, then serves again
    out["after"] = talk(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
    if not out["after"].startswith("HTTP/1.1 503"):
        break
    time.sleep(0.1)
print(json.dumps(out))
"""


def test_hostile_local_user_is_refused_without_damage(mount_site):
    """Another local user (nobody) cannot read the token; garbage gets a 400 (not silence),
    requests without the token a 401 before their body is read, a flood of silent
    connections is closed past the cap on unauthenticated ones (logged, rate-limited);
    afterwards the site is unchanged and serves as before."""
    m = mount_site("64M")
    m.expect_log("have not authenticated")
    run_admin("--site", m.site, "snapshot", "create", "s1")
    c = json.loads((m.site / "control.json").read_text())
    before = digest(m.site)
    snaps = run_admin("--site", m.site, "--json", "snapshot", "list").stdout
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        "/usr/bin/python3", "-I", "-c", HOSTILE, c["host"], str(c["port"]),
                        str(m.site)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["uid"] != 0 and out["token"] == "denied"
    assert out["garbage"].startswith("HTTP/1.1 400") and out["zeros"].startswith("HTTP/1.1 400")
    for k in ("no_token", "guessed", "restore", "huge", "after"):
        assert out[k].startswith("HTTP/1.1 401"), (k, out[k])
    assert out["busy"] >= 1
    assert digest(m.site) == before
    assert run_admin("--site", m.site, "--json", "snapshot", "list").stdout == snaps


def test_replicate_start_refuses_a_name_that_fits_no_index(mount_site):
    """A destination's name becomes an LMDB key and a snapshot's name: one that cannot be
    either is refused before anything is sent, and the would-be secondary is untouched."""
    a = mount_site("64M", name="a")
    b = mount_site("64M", name="b" * 195)  # the default name is the directory's: too long
    before = json.loads(run_admin("--site", b.site, "--json", "status").stdout)
    fails(run_admin("--site", a.site, "replicate", "start", "--to", b.site, check=False), 1,
          "bad destination name", "--name", prog="repfs-admin")
    fails(run_admin("--site", a.site, "replicate", "start", "--to", b.site, "--name",
                    "😀" * 70, check=False), 1, "bad destination name", prog="repfs-admin")
    after = json.loads(run_admin("--site", b.site, "--json", "status").stdout)
    assert after.get("role") == before.get("role") and not after.get("readonly")
    assert json.loads(run_admin("--site", a.site, "--json", "status").stdout).get(
        "destinations", []) == []


def test_admin_refuses_times_that_are_not_finite(tmp_path):
    site = make_site(tmp_path / "site")
    for opt, bad in (("--timeout", "nan"), ("--timeout", "inf"), ("--retention", "1e400"),
                     ("--playback-timeout", "-1"), ("--retention", "soon")):
        fails(run_admin("--site", site, "replicate", "policy", opt, bad, check=False), 2,
              "bad time", bad, prog="repfs-admin")


def test_paths_on_the_sites_own_mount_do_not_wedge_its_daemon(mount_site):
    """`replicate start --to` and `snapshot mount` given a path on the site's own mount: the
    daemon looked the path up from its own loop, which serves that very lookup, and hung for
    good (every request after it, the mount itself included). Now: a clear refusal, or (a
    snapshot mounted in a directory of the live tree) it works, and the daemon still answers."""
    a = mount_site("64M", name="a")
    (a.path / "sub").mkdir()
    r = run_admin("--site", a.site, "--timeout", "20", "replicate", "start", "--to", a.path,
                  check=False)
    fails(r, 1, "on this site's own mount", prog="repfs-admin")
    r = run_admin("--site", a.site, "--timeout", "20", "replicate", "start", "--to",
                  a.path / "sub" / "s2", check=False)
    fails(r, 1, "on this site's own mount", prog="repfs-admin")
    run_admin("--site", a.site, "snapshot", "create", "s")
    run_admin("--site", a.site, "--timeout", "20", "snapshot", "mount", "s", a.path / "sub")
    try:
        assert mounted(a.path / "sub") and os.listdir(a.path / "sub") == ["sub"]
    finally:
        run_repfs("umount", a.path / "sub", check=False)
        if mounted(a.path / "sub"):
            subprocess.run(["fusermount3", "-u", "-z", str(a.path / "sub")], check=False)
    assert json.loads(run_admin("--site", a.site, "--json", "status").stdout)["state"] == \
        "mounted"


def test_mount_clears_a_dead_mount_of_its_site(mount_site):
    """After kill -9 of a daemon, `repfs mount` of the same site on the same mount point works
    at once: the old mount is cleared even while the kernel still answers stat from its caches
    (no process holds the site: its lock is free)."""
    from repfs.common import check_mountpoint, repfs_mounts
    from repfs.site import Site
    m = mount_site("64M")
    (m.path / "f").write_bytes(b"kept")
    fd = os.open(m.path / "f", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    # a live daemon's mount is left alone ...
    assert Site(m.site).in_use()
    with pytest.raises(Exception, match="already a mount point"):
        check_mountpoint(str(m.path), served=lambda p: Site(p).in_use())
    # ... a mount whose site nobody serves is cleared, whether or not stat still answers
    pid = int((m.site / "repfs.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not Site(m.site).in_use():
            break
        time.sleep(0.05)
    assert str(m.path) in repfs_mounts()
    assert check_mountpoint(str(m.path), served=lambda p: Site(p).in_use()) == str(m.path)
    assert str(m.path) not in repfs_mounts()
    run_repfs("mount", m.site, m.path)
    assert (m.path / "f").read_bytes() == b"kept"


def test_a_stale_pid_file_naming_a_live_process_does_not_block_the_mount(mount_site, tmp_path):
    """repfs.pid is written durably, so a power cut (or kill -9) leaves it behind; after a
    reboot its pid may belong to any process. The site is in use only while its lock is held:
    such a file made `repfs mount` refuse ('already mounted at ... (pid 1)') for good."""
    site = make_site(tmp_path / "s")
    (site / "repfs.pid").write_text(f"{os.getpid()}\n/mnt/elsewhere\n")  # alive, not a daemon
    st = json.loads(run_admin("--site", site, "--json", "status").stdout)
    assert st["state"] == "not mounted" and st["pid"] is None, st
    m = mount_site("64M", name="s")
    (m.path / "f").write_text("mounted")
    st = json.loads(run_admin("--site", m.path, "--json", "status").stdout)
    assert st["state"] == "mounted" and st["pid"] != os.getpid()


def test_another_user_gets_one_line_not_a_traceback():
    """A site's directory is 0700: another user's repfs mount, fsck, mkfs --force and
    repfs-admin status ended in a PermissionError traceback. Now one line each, and the
    site is unchanged."""
    import shutil
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="repfs-t2-cli-"))  # (pytest's own is 0700)
    try:
        os.chmod(base, 0o755)
        site = make_site(base / "s")
        before = digest(site)
        mnt = base / "m"
        mnt.mkdir(mode=0o777)
        closed = base / "closed"
        closed.mkdir(mode=0o700)
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                     sys.executable, "-c"]
        repfs = "import sys; from repfs.cli.main import main; sys.argv[0] = 'repfs'; main()"
        admin = "import sys; from repfs.cli.admin import main; main()"
        for code, args, rc in ((repfs, ["mount", site, mnt], 1), (repfs, ["fsck", site], 8),
                               (repfs, ["mkfs", site, "--size", "1M", "--force"], 1),
                               (repfs, ["mkfs", closed / "x", "--size", "1M"], 1),
                               (admin, ["--site", site, "status"], 1)):
            r = subprocess.run(as_nobody + [code, *map(str, args)], capture_output=True,
                               text=True, timeout=60, cwd="/")
            assert r.returncode == rc and "Traceback" not in r.stderr, (args, r.returncode,
                                                                        r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
            assert "permission denied" in r.stderr.lower(), (args, r.stderr)
        assert not mounted(mnt) and digest(site) == before and os.listdir(closed) == []
        # mounted: repfs-admin at the mount point said 'no daemon ... not mounted' (exit 3),
        # and repfs umount took the daemon for gone and said nothing (exit 0, still mounted)
        run_repfs("mount", site, mnt)
        try:
            for code, args in ((admin, ["--site", mnt, "status"]), (repfs, ["umount", mnt])):
                r = subprocess.run(as_nobody + [code, *map(str, args)], capture_output=True,
                                   text=True, timeout=60, cwd="/")
                assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (
                    args, r.returncode, r.stderr)
            assert "permission denied" in r.stderr.lower() or "cannot unmount" in r.stderr
            assert mounted(mnt)
        finally:
            run_repfs("umount", mnt, check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
