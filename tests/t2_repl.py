"""Tier 2: local replication end to end, through real mounts.

Two sites on this host, both mounted by their own daemons (`repfs mount`); the first is made
the primary with `repfs-admin --site M1 replicate start --to S2`. After every cut and playback
the secondary's mount must equal the primary at the delta-set boundary: byte for byte, with
sizes, modes, owners, times, link counts, inode numbers, xattrs and symlinks.

Helpers here are shared with the crash tests (t4_repl_crash.py).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_repfs

ADMIN = str(Path(sys.executable).parent / "repfs-admin")
NO_AUTO_CUT = ("--timeout", "3600", "--hwm", "100G")


# ----------------------------------------------------------------------------- admin


def admin(target, *args, check=True, timeout=120, json_out=False):
    cmd = [ADMIN, "--site", str(target)] + (["--json"] if json_out else []) + [str(a) for a in args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def admin_json(target, *args, timeout=120) -> dict:
    return json.loads(admin(target, *args, json_out=True, timeout=timeout).stdout)


def status(target) -> dict:
    """`repfs-admin --site TARGET --json status` (the CLI itself)."""
    return admin_json(target, "status")


def api(site: Path, method: str, path: str, timeout: float = 30.0) -> dict:
    """A control-port request straight from the test process (fast, for polling): the same
    JSON the CLI prints."""
    site = Path(site)
    try:
        c = json.loads((site / "control.json").read_text())
    except FileNotFoundError:
        raise AssertionError(f"the daemon of {site} is not running (died?):\n"
                             f"{log_tail(site)}") from None
    token = (site / "control.token").read_text().strip()
    conn = http.client.HTTPConnection(c["host"], c["port"], timeout=timeout)
    try:
        conn.request(method, "/v1" + path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200, (resp.status, doc)
    return doc


def daemon_alive(site: Path) -> bool:
    from repfs.site import Site
    return Site(site).owner() is not None


def log_tail(site: Path, n: int = 30) -> str:
    return "\n".join(log_lines(site)[-n:])


def cut(m1) -> int:
    """`repfs-admin replicate deltaset` (waits until the delta set is ready)."""
    out = admin_json(m1.path, "replicate", "deltaset")
    assert out["state"] == "ready", out
    return out["delta_set"]


def wait_converged(m1, m2, n: int | None = None, timeout: float = 60.0) -> int:
    """Poll both sites until the destination acked and played delta set `n` (default: the
    last cut one) and the secondary reports it played. Returns that number."""
    deadline = time.monotonic() + timeout
    while True:
        p = api(m1.site, "GET", "/status")
        target = p["last_cut_delta_set"] if n is None else n
        d = p["destinations"][0]
        s = api(m2.site, "GET", "/status")
        last = (p["last_cut_delta_set"], d, {k: s.get(k) for k in (
            "last_received_delta_set", "last_played_delta_set", "replication_state")})
        if (d["state"] == "replicating" and d["acked_delta_set"] == target
                and d["played_delta_set"] == target and p["last_cut_delta_set"] >= target
                and s["last_played_delta_set"] == target):
            return target
        if time.monotonic() > deadline:
            raise AssertionError(f"no convergence on delta set {target} in {timeout} s: {last}"
                                 f"\n--- primary log:\n{log_tail(m1.site)}\n--- secondary "
                                 f"log:\n{log_tail(m2.site)}")
        for m in (m1, m2):
            assert daemon_alive(m.site), f"the daemon of {m.site} died:\n{log_tail(m.site)}"
        time.sleep(0.1)


def start_replication(m1, m2, *extra, timeout: float = 120.0, to: str | None = None) -> dict:
    """`replicate start --to S2` (waits for the initial copy), watching that neither daemon
    dies meanwhile (the command would wait for ever). `to`: another --to (HOST:PORT)."""
    cmd = [ADMIN, "--site", str(m1.path), "--json", "replicate", "start", "--to",
           to or str(m2.site), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            for m in (m1, m2):
                if not daemon_alive(m.site):
                    raise AssertionError(f"the daemon of {m.site} died during replicate start:"
                                         f"\n{log_tail(m.site)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"replicate start did not finish in {timeout} s")
            time.sleep(0.1)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"replicate start exited {proc.returncode}: {err.strip()}"
    d = json.loads(out)
    assert d["state"] == "replicating", d
    return d


# ----------------------------------------------------------------------------- trees


def tree(root: Path, *, times: bool = True, inodes: bool = True) -> dict:
    """path -> everything a reader can see about it (content as a digest)."""
    root = Path(root)
    out = {}

    def entry(p: Path, rel: str):
        st = os.lstat(p)
        fmt = stat.S_IFMT(st.st_mode)
        e = {"fmt": fmt, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
             "size": st.st_size, "nlink": st.st_nlink}
        if times:
            e["mtime"] = st.st_mtime_ns
            e["ctime"] = st.st_ctime_ns
        if inodes:
            e["ino"] = st.st_ino
        if stat.S_ISREG(fmt):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
            e["sha"] = h.hexdigest()
        elif stat.S_ISLNK(fmt):
            e["target"] = os.readlink(p)
        elif stat.S_ISCHR(fmt) or stat.S_ISBLK(fmt):
            e["rdev"] = st.st_rdev
        if not stat.S_ISLNK(fmt):
            e["xattrs"] = {n: os.getxattr(p, n, follow_symlinks=False)
                           for n in sorted(os.listxattr(p, follow_symlinks=False))}
        out[rel] = e

    entry(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            entry(p, str(p.relative_to(root)))
    return out


def tree_diff(a: dict, b: dict, limit: int = 8) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"only in the second: {k}")
        elif k not in b:
            out.append(f"only in the first: {k}")
        elif a[k] != b[k]:
            fields = {f: (a[k].get(f), b[k].get(f)) for f in set(a[k]) | set(b[k])
                      if a[k].get(f) != b[k].get(f)}
            out.append(f"{k}: {fields}")
        if len(out) >= limit:
            break
    return out


def assert_same_tree(primary: Path, secondary: Path, *, grace: float = 2.5, **kw) -> dict:
    """The secondary mount shows the primary's tree. Readers may see a played-back delta set
    a moment late (the daemon records it played, then drops the kernel's caches), so a
    mismatch is looked at again for `grace` seconds before it fails. A time bound kept on
    purpose: it must stay below the mounts' cache timeout (5 s), or the kernel's own expiry
    of its caches would hide a missing invalidation."""
    deadline = time.monotonic() + grace
    want = tree(primary, **kw)
    while True:
        got = tree(secondary, **kw)
        if got == want:
            return want
        if time.monotonic() > deadline:
            raise AssertionError(f"{secondary} differs from {primary}: "
                                 + "; ".join(tree_diff(want, got)))
        time.sleep(0.25)


# ----------------------------------------------------------------------------- workloads


class Workload:
    """A random file-system workload on a mount, in the test process."""

    def __init__(self, root: Path, seed):
        self.root = Path(root)
        self.rng = random.Random(seed)
        self.n = 0

    def _pick(self, kind: str):
        items = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in (dirnames if kind == "dir" else filenames):
                p = Path(dirpath) / name
                # (a symlink is looked at before it is followed: its target may be a name
                # too long to stat, ENAMETOOLONG, which pathlib does not swallow)
                link = p.is_symlink()
                if kind == "dir" or (kind == "file" and not link and p.is_file()) \
                        or (kind == "any" and (link or not p.is_dir())):
                    items.append(p)
        items.sort()
        return self.rng.choice(items) if items else None

    def _dir(self) -> Path:
        d = self._pick("dir") if self.rng.random() < 0.7 else None
        return d or self.root

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}-{self.rng.randrange(1 << 20):x}"

    def data(self, size: int) -> bytes:
        if self.rng.random() < 0.3:  # compressible / repetitive
            return (self.rng.randbytes(97) * (size // 97 + 1))[:size]
        return self.rng.randbytes(size)

    def step(self) -> None:
        r = self.rng.random()
        rng = self.rng
        if r < 0.22:
            p = self._dir() / self._name("f")
            size = rng.choice([0, 1, 100, 4096, 4097, 65536, 300_000, 1 << 20, 3 << 20])
            with open(p, "wb") as f:
                f.write(self.data(size))
            os.chmod(p, rng.choice([0o644, 0o600, 0o755, 0o4755, 0o640]))
        elif r < 0.27:
            p = self._dir() / self._name("sparse")
            with open(p, "wb") as f:
                f.seek(rng.randrange(1, 50 << 20))
                f.write(self.data(rng.randrange(1, 20000)))
        elif r < 0.45:
            p = self._pick("file")
            if p is None:
                return
            size = p.stat().st_size
            with open(p, "r+b") as f:
                f.seek(rng.randrange(0, size + 1) if size else 0)
                f.write(self.data(rng.choice([1, 511, 4096, 10000, 200_000])))
        elif r < 0.5:
            p = self._pick("file")
            if p is not None:
                os.truncate(p, rng.randrange(0, p.stat().st_size + 5000))
        elif r < 0.55:
            os.mkdir(self._dir() / self._name("d"), rng.choice([0o755, 0o700, 0o1777]))
        elif r < 0.62:
            p = self._pick("any")
            if p is not None:
                os.unlink(p)
        elif r < 0.68:
            p = self._pick("any")
            if p is not None:
                os.rename(p, self._dir() / self._name("r"))
        elif r < 0.72:
            p = self._pick("file")
            if p is not None:
                os.link(p, self._dir() / self._name("h"))
        elif r < 0.77:
            target = rng.choice(["f1", "../x", "/etc/passwd", "a" * rng.randrange(1, 300)])
            os.symlink(target, self._dir() / self._name("l"))
        elif r < 0.86:
            p = self._pick("file") or self._pick("dir")
            if p is not None:
                os.setxattr(p, f"user.k{rng.randrange(5)}".encode(),
                            rng.randbytes(rng.randrange(0, 200)))
        elif r < 0.89:
            p = self._pick("file")
            if p is not None:
                names = os.listxattr(p)
                if names:
                    os.removexattr(p, rng.choice(names))
        elif r < 0.92:
            os.mkfifo(self._dir() / self._name("fifo"))
        elif r < 0.96:
            p = self._pick("file")
            if p is not None:
                os.utime(p, ns=(rng.randrange(1 << 40), rng.randrange(1 << 40)))
        else:
            d = self._pick("dir")
            if d is not None and not any(d.iterdir()):
                os.rmdir(d)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


class PrefixWriter(threading.Thread):
    """Writes in single-request steps (create, 4 KiB block write, rename, unlink) and logs
    each, so any consistent cut of its work is the state after some prefix of its log."""

    BLOCK = 4096

    def __init__(self, root: Path, seed):
        super().__init__(daemon=True)
        self.root = Path(root)
        self.root.mkdir(exist_ok=True)
        self.rng = random.Random(seed)
        self.files: dict[str, int] = {}  # name -> size in blocks (for picking)
        self.log: list[tuple] = []  # completed steps
        self.started = 0  # steps begun
        self.go = threading.Event()
        self.go.set()
        self.paused = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.serial = 0

    def _one(self) -> tuple:
        rng = self.rng
        r = rng.random()
        if not self.files or r < 0.1:
            self.serial += 1
            name = f"w{self.serial}"
            fd = os.open(self.root / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
            self.files[name] = 0
            return ("create", name)
        name = rng.choice(sorted(self.files))
        if r < 0.85:
            blk = rng.randrange(16)
            data = rng.randbytes(self.BLOCK)
            fd = os.open(self.root / name, os.O_WRONLY)
            try:
                assert os.pwrite(fd, data, blk * self.BLOCK) == self.BLOCK
            finally:
                os.close(fd)
            return ("write", name, blk, data)
        if r < 0.93 and len(self.files) > 2:
            self.serial += 1
            new = f"w{self.serial}"
            os.rename(self.root / name, self.root / new)
            self.files[new] = self.files.pop(name)
            return ("rename", name, new)
        if len(self.files) > 3:
            os.unlink(self.root / name)
            del self.files[name]
            return ("unlink", name)
        return self._one()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.go.is_set():
                    self.paused.set()
                    self.go.wait(0.05)
                    continue
                self.paused.clear()
                self.started += 1
                self.log.append(self._one())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.paused.set()

    def pause(self) -> None:
        self.go.clear()
        assert self.paused.wait(30), "the writer did not pause"
        while not self.paused.is_set():
            time.sleep(0.01)

    def resume(self) -> None:
        self.paused.clear()
        self.go.set()

    def finish(self) -> None:
        self.stop.set()
        self.go.set()
        self.join(30)
        if self.error:
            raise self.error


def apply_step(model: dict[str, bytearray], step: tuple) -> None:
    kind = step[0]
    if kind == "create":
        model[step[1]] = bytearray()
    elif kind == "write":
        _, name, blk, data = step
        buf = model[name]
        end = (blk + 1) * len(data)
        if len(buf) < end:
            buf.extend(bytes(end - len(buf)))
        buf[blk * len(data): end] = data
    elif kind == "rename":
        model[step[2]] = model.pop(step[1])
    elif kind == "unlink":
        del model[step[1]]


def read_flat(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


# ----------------------------------------------------------------------------- fixtures


class Pair:
    def __init__(self, m1, m2):
        self.m1 = m1
        self.m2 = m2


def make_pair(mount_site, *, policy=NO_AUTO_CUT) -> Pair:
    m1 = mount_site("1G", name="s1")
    m2 = mount_site("1G", name="s2")
    if policy:
        admin(m1.path, "replicate", "policy", *policy)
    start_replication(m1, m2)
    return Pair(m1, m2)


@pytest.fixture
def pair(mount_site):
    """Two mounted sites, the first replicating to the second (automatic cuts off)."""
    return make_pair(mount_site)


def set_chunk_capacity(site: Path, value: str) -> None:
    toml = site / "site.toml"
    text = toml.read_text()
    pat = r"^[ \t]*#?[ \t]*chunk_capacity[ \t]*=.*$"
    if re.search(r"^\[repl\]", text, re.M):
        if re.search(pat, text, re.M):
            text = re.sub(pat, f'chunk_capacity = "{value}"', text, count=1, flags=re.M)
        else:
            text = re.sub(r"^\[repl\][ \t]*$", f'[repl]\nchunk_capacity = "{value}"', text,
                          count=1, flags=re.M)
    else:
        text += f'\n[repl]\nchunk_capacity = "{value}"\n'
    toml.write_text(text)


def log_lines(site: Path) -> list[str]:
    p = Path(site) / "repfs.log"
    return p.read_text(errors="replace").splitlines() if p.exists() else []


def errno_of(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except OSError as e:
        return e.errno
    return None


# ----------------------------------------------------------------------------- tests


def test_secondary_equals_primary_after_each_cut_and_is_read_only(pair):
    m1, m2 = pair.m1, pair.m2
    wl = Workload(m1.path, "quiet")
    played = []
    for rnd in range(3):
        wl.run(45)
        n = cut(m1)
        wait_converged(m1, m2, n)
        assert_same_tree(m1.path, m2.path)
        played.append(n)
    assert played == list(range(played[0], played[0] + 3))
    # a cut with nothing written is an empty delta set and changes nothing
    n = cut(m1)
    assert n == played[-1] + 1
    wait_converged(m1, m2, n)
    assert_same_tree(m1.path, m2.path)
    # extended attributes past the root block (the xattr file, 64 KiB values) replicate, and
    # a replaced value is what the secondary's mount reads after the next delta set
    xf = m1.path / "xattrs"
    xf.write_bytes(b"x")
    for i in range(300):
        os.setxattr(xf, f"user.s{i:03d}", b"%d" % i)
    values = [random.Random(k).randbytes(65536) for k in range(2)]
    os.setxattr(xf, "user.big", values[0])
    wait_converged(m1, m2, cut(m1))
    assert os.getxattr(m2.path / "xattrs", "user.big") == values[0]
    os.setxattr(xf, "user.big", values[1])
    wait_converged(m1, m2, cut(m1))
    assert os.getxattr(m2.path / "xattrs", "user.big") == values[1]
    assert len(os.listxattr(m2.path / "xattrs")) == 301
    assert_same_tree(m1.path, m2.path)
    # a file kept open on the secondary sees the next delta set (caches invalidated)
    (m1.path / "open").write_bytes(b"A" * 70000)
    wait_converged(m1, m2, cut(m1))
    fd = os.open(m2.path / "open", os.O_RDONLY)
    try:
        assert os.pread(fd, 70000, 0) == b"A" * 70000
        with open(m1.path / "open", "r+b") as f:
            f.write(b"B" * 70000)
        wait_converged(m1, m2, cut(m1))
        deadline = time.monotonic() + 2.5  # below the 5 s cache timeout: see assert_same_tree
        while os.pread(fd, 70000, 0) != b"B" * 70000:
            assert time.monotonic() < deadline, "an open file on the secondary shows stale data"
            time.sleep(0.1)
        assert os.fstat(fd).st_mtime_ns == os.stat(m1.path / "open").st_mtime_ns
    finally:
        os.close(fd)
    # the secondary is read-only: EROFS for every change, and the control port refuses too
    (m1.path / "d").mkdir()
    (m1.path / "d" / "f").write_bytes(b"x" * 5000)
    os.symlink("f", m1.path / "d" / "l")
    wait_converged(m1, m2, cut(m1))
    before = tree(m2.path)
    f, d = m2.path / "d" / "f", m2.path / "d"
    checks = {
        "create": lambda: open(m2.path / "new", "wb"),
        "open for writing": lambda: open(f, "r+b"),
        "append": lambda: open(f, "ab"),
        "mkdir": lambda: os.mkdir(d / "sub"),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(d),
        "rename": lambda: os.rename(f, d / "g"),
        "link": lambda: os.link(f, d / "h"),
        "symlink": lambda: os.symlink("x", d / "s"),
        "chmod": lambda: os.chmod(f, 0o600),
        "chown": lambda: os.chown(f, 1, 1),
        "truncate": lambda: os.truncate(f, 0),
        "utime": lambda: os.utime(f, ns=(1, 1)),
        "setxattr": lambda: os.setxattr(f, b"user.a", b"b"),
        "mkfifo": lambda: os.mkfifo(d / "p"),
    }
    for what, fn in checks.items():
        assert errno_of(fn) == errno.EROFS, f"{what} on the secondary is not EROFS"
    # and `mount -o remount,rw` cannot make it writable (the daemon refuses, names why)
    r = subprocess.run(["mount", "-o", "remount,rw", str(m2.path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "secondary" in r.stderr, r.stderr
    assert errno_of(lambda: open(m2.path / "new", "wb")) == errno.EROFS
    assert tree(m2.path) == before
    # the control port refuses changes on a secondary too, with exit status 1 (it takes
    # snapshots of its own, for clones: t2_clone.py; restoring one would change its volume)
    for args in (("snapshot", "restore", "x"), ("replicate", "deltaset"),
                 ("replicate", "start", "--to", m1.site)):
        r = admin(m2.path, *args, check=False)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert r.stderr.strip() and "Traceback" not in r.stderr
    assert api(m2.site, "GET", "/status")["role"] == "secondary"


def test_status_keys_and_lag(pair):
    m1, m2 = pair.m1, pair.m2
    p, s = status(m1.path), status(m2.path)
    for k in ("role", "generation", "current_delta_set", "last_cut_delta_set",
              "last_played_delta_set", "lag_seconds", "destinations"):
        assert k in p, k
    for k in ("role", "generation", "current_delta_set", "last_cut_delta_set",
              "last_played_delta_set", "lag_seconds"):
        assert k in s, k
    assert p["role"] == "primary" and s["role"] == "secondary"
    assert p["generation"] == s["generation"] >= 1
    assert p["current_delta_set"] == p["last_cut_delta_set"] + 1
    assert isinstance(p["destinations"], list) and len(p["destinations"]) == 1
    d = p["destinations"][0]
    for k in ("name", "state", "acked_delta_set", "played_delta_set", "lag_seconds"):
        assert k in d, k
    assert d["name"] == m2.site.name and d["state"] == "replicating"
    assert s["last_played_delta_set"] == d["played_delta_set"]
    # the tables for people
    assert "primary" in admin(m1.path, "status").stdout
    assert "secondary" in admin(m2.path, "status").stdout
    # writes not yet played back: the lag grows. The bounds are causal, not a speed: the
    # daemon recorded the first change during the write (after t0) and computed the lag
    # after the sleep and before the status came back, so no machine is too slow for them.
    wait_converged(m1, m2)
    t0 = time.monotonic()
    (m1.path / "pending").write_bytes(os.urandom(100_000))
    time.sleep(1.2)
    p = status(m1.path)
    waited = time.monotonic() - t0
    assert 1.19 <= p["lag_seconds"] <= waited + 0.01, (p["lag_seconds"], waited)
    assert 1.19 <= p["destinations"][0]["lag_seconds"] <= waited + 0.01
    # cut and play back: nothing is left unplayed, so the lag is zero (not "small")
    n = cut(m1)
    wait_converged(m1, m2, n)
    p, s = status(m1.path), status(m2.path)
    assert p["current_delta_set_blocks"] == 0, p["current_delta_set_blocks"]
    assert p["lag_seconds"] == 0.0, p["lag_seconds"]
    assert p["destinations"][0]["lag_seconds"] == 0.0
    assert s["outstanding_delta_sets"] == [] and s["lag_seconds"] == 0.0, s
    assert s["last_played_delta_set"] == n and p["last_cut_delta_set"] == n
    assert (m2.path / "pending").read_bytes() == (m1.path / "pending").read_bytes()


def _match_prefix(model, log, lo, hi, got):
    """Advance `model` (the writer's state after `lo` steps) up to step `hi`; the index of
    the first state equal to `got`, or None."""
    snap = {name: bytes(v) for name, v in model.items()}
    k = lo
    while True:
        if snap == got:
            return k
        if k >= hi or k >= len(log):
            return None
        m = {name: bytearray(v) for name, v in snap.items()}
        apply_step(m, log[k])
        snap = {name: bytes(v) for name, v in m.items()}
        k += 1


def test_cuts_during_writes(pair, tmp_path):
    """A writer runs while delta sets are cut. (1) Each delta set played back is exactly the
    writer's state after some prefix of its steps, never a mix. (2) Cut and snapshot the
    primary at the same boundary (the writer paused around both), let the writer go on while
    the delta set travels and plays back: the secondary equals the snapshot, mounted."""
    m1, m2 = pair.m1, pair.m2
    Workload(m1.path, "concurrent-base").run(25)
    wait_converged(m1, m2, cut(m1))
    w = PrefixWriter(m1.path / "w", "prefix")
    model: dict[str, bytearray] = {}
    applied = 0
    snap_mnt = tmp_path / "snapmnt"
    snap_mnt.mkdir()
    w.start()
    try:
        for rnd in range(3):
            time.sleep(0.4)
            lo = len(w.log)
            n = cut(m1)
            hi = w.started
            wait_converged(m1, m2, n)
            got = read_flat(m2.path / "w")
            while applied < lo:
                apply_step(model, w.log[applied])
                applied += 1
            k = _match_prefix(model, w.log, lo, hi, got)
            assert k is not None, (
                f"delta set {n}: the secondary's files are not the writer's state after any "
                f"of its steps {lo}..{hi} (names: {sorted(got)[:10]})")
        assert len(w.log) > 20, "the writer hardly ran: test too weak"
        # (2) a snapshot at the boundary
        w.pause()
        n = cut(m1)
        admin(m1.path, "snapshot", "create", f"at{n}")
        w.resume()
        wait_converged(m1, m2, n)
        admin(m1.path, "snapshot", "mount", f"at{n}", snap_mnt)
        try:
            assert os.path.ismount(snap_mnt)
            assert_same_tree(snap_mnt, m2.path)
        finally:
            run_repfs("umount", snap_mnt, check=False)
            if os.path.ismount(snap_mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(snap_mnt)], check=False)
        # quiet: everything arrives
        w.pause()
        wait_converged(m1, m2, cut(m1))
        assert_same_tree(m1.path, m2.path)
        deadline = time.monotonic() + 20
        while True:  # once the mount helper is gone the snapshot can be deleted
            r = admin(m1.path, "snapshot", "delete", f"at{n}", check=False)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.returncode == 0, r.stderr
    finally:
        w.finish()
        if os.path.ismount(snap_mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(snap_mnt)], check=False)


def test_start_onto_a_site_with_files_needs_force(mount_site):
    m1 = mount_site("1G", name="s1")
    m2 = mount_site("1G", name="s2")
    Workload(m1.path, "force").run(30)
    (m2.path / "precious").write_bytes(b"keep me unless forced")
    os.mkdir(m2.path / "dir")
    before = tree(m2.path)
    r = admin(m1.path, "replicate", "start", "--to", m2.site, check=False, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "--force" in r.stderr and "Traceback" not in r.stderr
    # nothing changed on either side: the second site is still a writable primary
    assert tree(m2.path) == before
    assert status(m2.path)["role"] == "primary"
    (m2.path / "still-writable").write_bytes(b"yes")
    p = status(m1.path)
    assert p["destinations"] == [] and not p.get("replicating")
    # bad targets: one-line errors, exit 1 (2 for bad arguments)
    r = admin(m1.path, "replicate", "start", "--to", m1.site, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = admin(m1.path, "replicate", "start", "--to", m1.site.parent / "nosuchsite", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = admin(m1.path, "replicate", "start", check=False)
    assert r.returncode == 2
    s3 = m1.site.parent / "s3-unmounted"
    run_repfs("mkfs", s3, "--size", "64M")
    r = admin(m1.path, "replicate", "start", "--to", s3, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "mount" in r.stderr, r.stderr
    assert api(m1.site, "GET", "/status")["destinations"] == []
    # --force replaces the content
    start_replication(m1, m2, "--force")
    assert_same_tree(m1.path, m2.path)
    assert not (m2.path / "precious").exists()
    assert errno_of(lambda: open(m2.path / "x", "wb")) == errno.EROFS
    # starting again onto the (now replicating) secondary needs --force too
    r = admin(m1.path, "replicate", "start", "--to", m2.site, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    Workload(m1.path, "force2").run(20)
    wait_converged(m1, m2, cut(m1))
    assert_same_tree(m1.path, m2.path)


def test_direct_writes_never_touch_what_the_secondary_shows(mount_site):
    """Blocks free at the secondary's boundaries go straight into its volume as they arrive
    (`direct_blocks`), but never a block the read-only mount still shows: a file deleted by
    a delta set that waits to be played, whose blocks the next delta set reuses, reads back
    whole until the deletion is played (review of e59fb2b: 2325 of 9216 blocks read the next
    file's bytes)."""
    m1 = mount_site("64M", name="s1")
    m2 = mount_site("64M", name="s2")
    admin(m1.path, "replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    start_replication(m1, m2)
    xdata = os.urandom(36 << 20)  # (over half the volume: the next file reuses its blocks)
    with open(m1.path / "x", "wb") as f:
        f.write(xdata)
        os.fsync(f.fileno())
    wait_converged(m1, m2, cut(m1))
    assert api(m2.site, "GET", "/status")["direct_blocks"] >= 9000  # x: written once
    assert (m2.path / "x").read_bytes() == xdata
    admin(m2.path, "replicate", "policy", "--playback-timeout", "3600")
    (m1.path / "x").unlink()
    n = cut(m1)
    ydata = os.urandom(36 << 20)
    with open(m1.path / "y", "wb") as f:
        f.write(ydata)
        os.fsync(f.fileno())
    n2 = cut(m1)
    deadline = time.monotonic() + 120
    while api(m2.site, "GET", "/status")["last_received_delta_set"] != n2:
        assert time.monotonic() < deadline, "the secondary never received the delta sets"
        time.sleep(0.1)
    assert api(m2.site, "GET", "/status")["last_played_delta_set"] < n
    with open("/proc/sys/vm/drop_caches", "w") as f:  # read the volume, not the page cache
        f.write("1\n")
    assert (m2.path / "x").read_bytes() == xdata  # the mount still shows x whole
    admin(m2.path, "replicate", "policy", "--playback-timeout", "0")
    wait_converged(m1, m2, n2)
    assert not (m2.path / "x").exists() and (m2.path / "y").read_bytes() == ydata


def test_a_secondary_never_runs_with_the_writeback_cache(mount_site):
    """With the writeback cache the kernel keeps its own file sizes and times, which the
    invalidation after a playback does not refresh (helper-24: a file grown on the primary
    read at its old size on the secondary). replicate start refuses a destination mounted
    with it (one line, nothing changed), and a secondary mounted with it gets a mount
    without it, with a warning."""
    m1 = mount_site("64M", name="s1")
    m2 = mount_site("64M", "--writeback-cache", name="s2")
    r = admin(m1.path, "replicate", "start", "--to", m2.site, check=False)
    assert r.returncode == 1 and "--writeback-cache" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert status(m2.path)["role"] == "primary"
    m2.umount()
    run_repfs("mount", m2.site, m2.path)
    start_replication(m1, m2)
    m2.umount()
    run_repfs("mount", m2.site, m2.path, "--writeback-cache")
    m2.expect_log("mounted without --writeback-cache")
    (m1.path / "grows").write_bytes(b"a" * (256 << 10))
    wait_converged(m1, m2, cut(m1))
    assert (m2.path / "grows").stat().st_size == 256 << 10
    with open(m1.path / "grows", "ab") as f:
        f.write(b"b" * (256 << 10))
    wait_converged(m1, m2, cut(m1))
    assert (m2.path / "grows").read_bytes() == b"a" * (256 << 10) + b"b" * (256 << 10)
    assert (m2.path / "grows").stat().st_size == 512 << 10


def test_playback_when_a_directory_inode_is_reused_by_a_file(pair):
    """The secondary's kernel knows a directory; on the primary it is removed and its inode
    number is reused by a regular file (after a remount the allocator starts from the lowest
    free inode) in the same delta set. Playback must cope (invalidate, not crash)."""
    m1, m2 = pair.m1, pair.m2
    os.mkdir(m1.path / "d")
    (m1.path / "d" / "x").write_bytes(b"x")
    wait_converged(m1, m2, cut(m1))
    ino = os.stat(m2.path / "d").st_ino
    assert os.listdir(m2.path / "d") == ["x"]  # the kernel now knows the directory
    os.unlink(m1.path / "d" / "x")
    os.rmdir(m1.path / "d")
    run_repfs("umount", m1.path)
    run_repfs("mount", m1.site, m1.path)
    reused = None
    for i in range(4):
        p = m1.path / f"file{i}"
        p.write_bytes(b"data %d\n" % i * 100)
        if os.stat(p).st_ino == ino:
            reused = p
    assert reused is not None, "no inode reused: the scenario did not happen"
    n = cut(m1)
    wait_converged(m1, m2, n)
    assert_same_tree(m1.path, m2.path)
    assert not (m2.path / "d").exists()


def test_stop_then_start_again(pair):
    m1, m2 = pair.m1, pair.m2
    Workload(m1.path, "stop").run(30)
    wait_converged(m1, m2, cut(m1))
    assert_same_tree(m1.path, m2.path)
    out = admin_json(m1.path, "replicate", "stop")
    assert out["stopped"] == [m2.site.name]
    p = status(m1.path)
    d = p["destinations"][0]
    assert d["state"] == "stopped"
    assert p["replicating"] is False
    # later writes stay on the primary; the secondary keeps its consistent state, read-only
    frozen = tree(m2.path)
    (m1.path / "after-stop").write_bytes(os.urandom(50_000))
    r = admin(m1.path, "replicate", "deltaset", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    # nothing cut, so nothing can be on its way (the state both daemons report, no sleep)
    assert status(m1.path)["last_cut_delta_set"] == p["last_cut_delta_set"]
    s = api(m2.site, "GET", "/status")
    assert s["last_received_delta_set"] == s["last_played_delta_set"] == d["played_delta_set"]
    assert tree(m2.path) == frozen
    assert errno_of(lambda: open(m2.path / "x", "wb")) == errno.EROFS
    # starting again replaces the secondary's content (it is a secondary: --force)
    r = admin(m1.path, "replicate", "start", "--to", m2.site, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    start_replication(m1, m2, "--force")
    assert_same_tree(m1.path, m2.path)
    Workload(m1.path, "stop2").run(20)
    wait_converged(m1, m2, cut(m1))
    assert_same_tree(m1.path, m2.path)


def test_policies(pair):
    """`replicate policy --timeout 1` on the primary makes cuts happen by themselves;
    `--playback-timeout` on the secondary delays playback; knobs go to the right site."""
    m1, m2 = pair.m1, pair.m2
    assert admin(m1.path, "replicate", "policy", "--playback-timeout", "1",
                 check=False).returncode == 1
    assert admin(m2.path, "replicate", "policy", "--timeout", "1", check=False).returncode == 1
    assert admin(m1.path, "replicate", "policy", "--timeout", "-1", check=False).returncode == 2
    assert admin(m1.path, "replicate", "policy", "--hwm", "lots",
                 check=False).returncode in (1, 2)
    pol = admin_json(m1.path, "replicate", "policy", "--timeout", "1")
    assert pol["timeout"] == 1.0
    before = api(m1.site, "GET", "/status")["last_cut_delta_set"]
    data = os.urandom(300_000)
    (m1.path / "auto").write_bytes(data)
    deadline = time.monotonic() + 15
    while True:
        try:
            if (m2.path / "auto").read_bytes() == data:
                break
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, "no automatic cut within 15 s at --timeout 1"
        time.sleep(0.2)
    assert api(m1.site, "GET", "/status")["last_cut_delta_set"] > before
    # the high-water mark cuts too, with the timeout far away
    pol = admin_json(m1.path, "replicate", "policy", "--timeout", "3600", "--hwm", "1M")
    assert pol["hwm"] == 1 << 20 and pol["timeout"] == 3600.0
    wait_converged(m1, m2)
    before = api(m1.site, "GET", "/status")["last_cut_delta_set"]
    data = os.urandom(3 << 20)
    (m1.path / "hwm").write_bytes(data)
    deadline = time.monotonic() + 15
    while api(m1.site, "GET", "/status")["last_cut_delta_set"] == before:
        assert time.monotonic() < deadline, "no cut at the high-water mark"
        time.sleep(0.1)
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    wait_converged(m1, m2, cut(m1))
    assert (m2.path / "hwm").read_bytes() == data
    # the secondary plays back only after --playback-timeout
    try:
        r = admin(m2.path, "replicate", "policy", "--playback-timeout", "2", json_out=True,
                  timeout=30)
    except subprocess.TimeoutExpired:
        stuck = daemon_alive(m2.site)
        if stuck:  # a hung daemon would hang the fixture's unmount too: end it
            from repfs.site import Site
            os.kill(Site(m2.site).owner()[0], 9)
            time.sleep(0.5)
            subprocess.run(["fusermount3", "-u", "-z", str(m2.path)], check=False)
        raise AssertionError("`replicate policy --playback-timeout 2` on the secondary did "
                             "not answer in 30 s (its daemon hung)") from None
    pol = json.loads(r.stdout)
    assert pol["playback_timeout"] == 2.0
    (m1.path / "late").write_bytes(b"later")
    n = cut(m1)
    deadline = time.monotonic() + 20
    while (s2 := api(m2.site, "GET", "/status"))["last_received_delta_set"] != n:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert s2["last_played_delta_set"] < n
    assert s2["lag_seconds"] > 0, "a received delta set waits for playback: the lag is not 0"
    assert api(m1.site, "GET", "/status")["destinations"][0]["lag_seconds"] > 0
    received = [x["received"] for x in s2["outstanding_delta_sets"] if x["delta_set"] == n]
    assert len(received) == 1, s2["outstanding_delta_sets"]
    wait_converged(m1, m2, n)
    # the secondary's own records (its clock, in ms): it played n at least 2 s after it got it
    played = api(m2.site, "GET", "/status")["last_played_at"]
    held = (_iso_time(played) - _iso_time(received[0])).total_seconds()
    assert held >= 2.0 - 0.002, f"played back {held:.3f} s after receipt; --playback-timeout 2"
    assert (m2.path / "late").read_bytes() == b"later"
    assert_same_tree(m1.path, m2.path)


def _iso_time(text: str):
    """A time from the status report ("2026-11-30T06:07:39.813Z")."""
    import datetime
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")


def test_corrupted_chunks_are_rejected_and_resent(tmp_path):
    """The secondary's site lives on powerfs, which damages every read of the received delta
    sets on their way up (one flipped bit per read; the files on disk stay intact), between
    the primary's read and the secondary's apply: playback verifies the delta set before it
    writes any of it, finds a checksum wrong, quarantines it (never applied: the secondary
    still shows its earlier state) and asks for it again; the primary, which keeps the delta
    set pinned until it is played, sends it again, and once the reads are good it arrives
    and plays whole. (A peer's damaged chunk at the receiver's port:
    test_hostile_chunks_are_refused_with_a_clear_error; a received file damaged on the disk
    itself: t2_faults.)"""
    from tests.t2_faults import Site  # (t2_faults imports this module: not at the top)
    made: list = []
    errors: list[str] = []
    try:
        m1 = Site(tmp_path, "s1", power=False)
        made.append(m1)
        m2 = Site(tmp_path, "s2", power=True)
        made.append(m2)
        m1.mount()
        m2.mount()
        admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
        start_replication(m1, m2)
        Workload(m1.path, "corrupt").run(30)
        big = os.urandom(3 << 20)
        (m1.path / "big").write_bytes(big)  # several chunks in the delta set
        s2 = api(m2.site, "GET", "/status")
        played = s2["last_played_delta_set"]
        rule = m2.pf.add_fault("s2/save/incoming/*", "read", errno="corrupt")
        n = cut(m1)
        deadline = time.monotonic() + 60
        while not api(m2.site, "GET", "/status")["quarantined_delta_sets"]:
            assert time.monotonic() < deadline, log_tail(m2.site)
            time.sleep(0.1)
        # found at verification, before any of it was written: never applied
        s2 = api(m2.site, "GET", "/status")
        q = s2["quarantined_delta_sets"][0]
        assert q["delta_set"] == n and "damaged" in q["reason"], q
        assert "was not played" in q["reason"], q
        assert s2["last_played_delta_set"] == played < n, s2
        assert not (m2.path / "big").exists()
        assert m2.pf.stats()["faults"][str(rule)] >= 1, m2.pf.stats()
        m2.expect(f"delta set {n}")  # the ERROR line of each quarantine
        m2.pf.clear_faults()
        # asked for again and sent again by the primary (its destination never stopped)
        wait_converged(m1, m2, n)
        assert (m2.path / "big").read_bytes() == big
        assert_same_tree(m1.path, m2.path)
        d = api(m1.site, "GET", "/status")["destinations"][0]
        assert d["state"] == "replicating", d
        assert all(x["delta_set"] == n for x in
                   api(m2.site, "GET", "/status")["quarantined_delta_sets"])
        # more cuts keep working
        Workload(m1.path, "corrupt2").run(20)
        wait_converged(m1, m2, cut(m1))
        assert_same_tree(m1.path, m2.path)
    finally:
        for s in made:
            s.teardown(errors)
    assert not errors, "\n".join(errors)


def post_raw(site: Path, path: str, body: bytes) -> tuple[int, object]:
    """A control-port POST of raw bytes (as a peer sends chunks): (HTTP status, JSON)."""
    c = json.loads((Path(site) / "control.json").read_text())
    token = (Path(site) / "control.token").read_text().strip()
    conn = http.client.HTTPConnection(c["host"], c["port"], timeout=30)
    try:
        conn.request("POST", "/v1" + path, body=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        raise AssertionError(f"not a JSON answer ({resp.status}): {raw[:200]!r}") from None


def test_hostile_chunks_are_refused_with_a_clear_error(pair):
    """A peer POSTs chunks straight to the secondary's control port: one with a single
    flipped bit (in its header, extent list or data) and one of garbage. Each gets a 400 with
    a JSON error naming what is wrong; nothing is stored, and replication goes on."""
    from repfs.repl.chunk import encode_chunk
    m1, m2 = pair.m1, pair.m2
    wait_converged(m1, m2)
    s = api(m2.site, "GET", "/status")
    want = s["last_received_delta_set"] + 1
    good = encode_chunk(s["generation"], want, 0, [(100, 2)], os.urandom(2 * 4096))
    incoming = m2.site / "save" / "incoming"
    before = sorted(os.listdir(incoming)) if incoming.exists() else []
    for pos in (20, 46, len(good) - 5000):  # delta-set number, extent list, data
        bad = bytearray(good)
        bad[pos] ^= 0x01
        code, doc = post_raw(m2.site, "/repl/chunk", bytes(bad))
        assert code == 400, (pos, code, doc)
        assert "checksum mismatch" in doc["error"], (pos, doc)
    code, doc = post_raw(m2.site, "/repl/chunk", os.urandom(5000))
    assert code == 400 and "not a delta chunk" in doc["error"], (code, doc)
    # nothing stored: no partial delta set, no file, the same report
    info = api(m2.site, "GET", "/repl/receiver")
    assert info["partial"] is None, info
    assert info["last_received"] == want - 1
    assert (sorted(os.listdir(incoming)) if incoming.exists() else []) == before
    after = api(m2.site, "GET", "/status")
    assert after["last_played_delta_set"] == s["last_played_delta_set"]
    # the primary's delta set `want` arrives from its chunk 0 and plays
    (m1.path / "after-hostile").write_bytes(os.urandom(100_000))
    n = cut(m1)
    assert n == want
    wait_converged(m1, m2, n)
    assert_same_tree(m1.path, m2.path)


def test_flow_control_loses_nothing(mount_site, tmp_path):
    """With the secondary down, the primary's unshipped delta sets stay pinned; overwriting
    their blocks makes the pins copy them (copy-on-write), and once the pins hold the 2 MiB
    capacity, cutting pauses while the change log keeps coalescing. Nothing is lost: when
    the secondary comes back everything arrives. On-demand cuts respect it too."""
    # S1 gets a 2 MiB capacity before its first mount (the fixture puts sites at
    # tmp_path/NAME and skips mkfs for a site that exists)
    run_repfs("mkfs", tmp_path / "s1", "--size", "1G")
    set_chunk_capacity(tmp_path / "s1", "2M")
    m1 = mount_site("1G", name="s1")
    m2 = mount_site("1G", name="s2")
    admin(m1.path, "replicate", "policy", "--timeout", "0.3", "--hwm", "1M")
    start_replication(m1, m2)
    assert api(m1.site, "GET", "/status")["chunk_area_capacity_bytes"] == 2 << 20
    run_repfs("umount", m2.path)  # the secondary is down
    rng = random.Random(7)
    seen_flow = False
    max_usage = 0
    files = {}

    def rewrite(name: str, data: bytes) -> None:
        # in place (no truncation: the same blocks), so blocks of unshipped delta sets are
        # overwritten
        with open(m1.path / name, "r+b" if (m1.path / name).exists() else "wb") as f:
            f.write(data)
        files[name] = data

    for i in range(20):  # 20 MiB over four 1 MiB files, cut by the policy as it goes
        rewrite(f"f{i % 4}", rng.randbytes(1 << 20))
        time.sleep(0.1)
        st = api(m1.site, "GET", "/status")
        seen_flow |= st["flow_control"]
        max_usage = max(max_usage, st["chunk_area_bytes"])
    deadline = time.monotonic() + 10
    while not seen_flow and time.monotonic() < deadline:
        seen_flow = api(m1.site, "GET", "/status")["flow_control"]
        time.sleep(0.1)
    st = status(m1.path)  # through the CLI too
    assert seen_flow, f"no flow control with a 2 MiB capacity: {st['chunk_area_bytes']}"
    assert st["flow_control"]
    assert st["chunk_area_bytes"] >= 2 << 20
    assert "FLOW CONTROL" in admin(m1.path, "status").stdout
    # the change log keeps coalescing what could not be cut
    assert st["current_delta_set_blocks"] > 0
    assert st["destinations"][0]["lag_seconds"] > 0
    # bounded: cutting paused, so the pins did not copy all 20 MiB of overwrites (each pin
    # copies each of its blocks once at most)
    max_usage = max(max_usage, st["chunk_area_bytes"])
    assert max_usage < 10 << 20, f"the pins grew to {max_usage} bytes (capacity 2 MiB)"
    # the secondary comes back (read-only still): everything arrives
    run_repfs("mount", m2.site, m2.path)
    assert errno_of(lambda: open(m2.path / "x", "wb")) == errno.EROFS
    deadline = time.monotonic() + 90
    while True:
        st = api(m1.site, "GET", "/status")
        if not st["flow_control"] and st["current_delta_set_blocks"] == 0:
            break
        assert time.monotonic() < deadline, f"flow control never ended: {st}"
        time.sleep(0.2)
    wait_converged(m1, m2, timeout=90)  # all played: the pins are released
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    wait_converged(m1, m2, cut(m1), timeout=90)
    assert_same_tree(m1.path, m2.path)
    for name, data in files.items():
        assert (m2.path / name).read_bytes() == data
    assert api(m1.site, "GET", "/status")["chunk_area_bytes"] == 0
    # "Capacity is bounded: when it is full, cutting pauses" (issue 4): on-demand cuts
    # (`replicate deltaset`) while it is full must not grow it without bound either: each
    # fails with a clear error, the changes staying in the change log
    run_repfs("umount", m2.path)
    sizes = []
    refused = []
    for i in range(4):
        rewrite("g", os.urandom(3 << 20))  # a new file, then overwrites of its blocks
        r = admin(m1.path, "replicate", "deltaset", "--no-wait", check=False, timeout=30)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
        if r.returncode:
            assert "flow control" in r.stderr and "change log" in r.stderr, r.stderr
            refused.append(i)
        sizes.append(api(m1.site, "GET", "/status")["chunk_area_bytes"])
    assert refused and 0 not in refused, (refused, sizes)
    run_repfs("mount", m2.site, m2.path)
    admin(m1.path, "replicate", "policy", "--timeout", "0.3")
    deadline = time.monotonic() + 60
    while api(m1.site, "GET", "/status")["current_delta_set_blocks"]:
        assert time.monotonic() < deadline, "the change log never drained"
        time.sleep(0.2)
    wait_converged(m1, m2, timeout=90)  # all played: the pins are released
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    wait_converged(m1, m2, cut(m1), timeout=90)
    assert_same_tree(m1.path, m2.path)
    assert (m2.path / "g").read_bytes() == files["g"]
    # the flow-control WARNING is by design: the fixture requires it and ignores only it
    m1.expect_log("flow control:")
    # 12 MiB written with the secondary down and a 2 MiB capacity: the pins hold at most
    # one delta set beyond the capacity (the one whose overwrites filled it)
    assert max(sizes) <= (2 << 20) + (3 << 20) + (1 << 20), (
        f"on-demand cuts grew the pins to {max(sizes)} bytes (capacity 2 MiB): {sizes}")
