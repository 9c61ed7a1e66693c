"""File-system benchmark: repfs against the native file system and pyfuse3's passthrough example.

Run from the repository root (as root, so page caches can be dropped):

    .venv/bin/python tools/bench/fs.py [--quick] [--size-mb N] [--files N] [--dir-entries N]

Every workload runs, in one invocation, on four targets that all live in one temporary
directory on the same disk:

  native         a plain directory on the disk's file system
  passthrough    pyfuse3's own examples/passthroughfs.py (tools/bench/passthroughfs.py)
                 mirroring a directory on that file system
  repfs          `repfs mkfs` + `repfs mount` of a site in the temp directory
  repfs+wbcache  the same, mounted with --writeback-cache

and prints one table with ratios against the baselines measured in the same run (DESIGN.md,
"Performance rules"). Then it measures the repfs daemon's memory on a 1 GiB and a 1 TiB
(sparse) site. Nothing here asserts on time; see tools/bench/README.md for what each number
means. Mounts are always taken down (fusermount3 -u, then -u -z) and the temp directory
removed, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from common import mounted, lazy_unmount, pid_alive, wait_gone, kill_pid  # noqa: E402

HERE = Path(__file__).resolve().parent
PASSTHROUGH = HERE / "passthroughfs.py"
MiB = 1 << 20

# ----------------------------------------------------------------------------- utilities

_caches_warm = False  # set when /proc/sys/vm/drop_caches cannot be written (not root)


def log(msg: str) -> None:
    print(msg, flush=True)


def drop_caches() -> None:
    """Write back and drop the page, dentry and inode caches, so reads go to the disk (for
    the FUSE targets: through the daemon, which reads the disk)."""
    global _caches_warm
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        if not _caches_warm:
            log(f"WARNING: cannot drop caches ({e.strerror}); read numbers are cache-warm")
        _caches_warm = True












def proc_mem(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def fmt_mem(kib) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
    return r


def repfs_cmd() -> str:
    sib = Path(sys.executable).parent / "repfs"
    if sib.exists():
        return str(sib)
    found = shutil.which("repfs")
    if not found:
        raise SystemExit("repfs is not on PATH (activate the venv or run with .venv/bin/python)")
    return found


# ----------------------------------------------------------------------------- targets

class Target:
    """Something to run workloads in. `dir` is where they run; `backing`, if set, is a plain
    directory on the native file system that shows up as `dir` (used to create the big
    directory for the listing without timing, and without going through a slow daemon)."""

    label = ""
    backing: Path | None = None

    def __init__(self, root: Path):
        self.root = root

    def setup(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...

    def fresh(self) -> None:
        """Make the next access cold: a fresh mount (FUSE targets) and dropped caches."""
        self.stop()
        self.start()
        drop_caches()

    @property
    def pid(self) -> int | None:
        return None

    def cleanup(self) -> None: ...


class Native(Target):
    label = "native"

    def __init__(self, root):
        super().__init__(root)
        self.dir = self.backing = root / "native"

    def setup(self):
        self.dir.mkdir()

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class Passthrough(Target):
    label = "passthrough"

    def __init__(self, root):
        super().__init__(root)
        self.src = self.backing = root / "pt-src"
        self.dir = root / "pt-mnt"
        self.proc: subprocess.Popen | None = None
        self.started: list[int] = []

    def setup(self):
        self.src.mkdir()
        self.dir.mkdir()

    def start(self):
        logf = open(self.root / "passthrough.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(PASSTHROUGH), str(self.src), str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True)
        logf.close()
        self.started.append(self.proc.pid)
        deadline = time.monotonic() + 30
        while not mounted(self.dir):
            if self.proc.poll() is not None:
                raise RuntimeError(f"passthroughfs exited ({self.proc.returncode}) before "
                                   f"mounting; see {self.root / 'passthrough.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError("passthroughfs did not mount within 30 s")
            time.sleep(0.05)

    def stop(self):
        if self.proc is None:
            return
        r = subprocess.run(["fusermount3", "-u", str(self.dir)], capture_output=True)
        if r.returncode != 0:
            lazy_unmount(self.dir)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            lazy_unmount(self.dir)
            kill_pid(self.proc.pid)
            self.proc.wait()
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def cleanup(self):
        lazy_unmount(self.dir)
        for pid in self.started:
            if pid_alive(pid):
                kill_pid(pid)
        shutil.rmtree(self.src, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class Repfs(Target):
    def __init__(self, root, *, size: str, writeback: bool, name: str | None = None):
        super().__init__(root)
        self.label = name or ("repfs+wbcache" if writeback else "repfs")
        tag = self.label.replace("+", "-")
        self.site = root / f"{tag}-site"
        self.dir = root / f"{tag}-mnt"
        self.size = size
        self.writeback = writeback
        self._pid: int | None = None
        self.started: list[int] = []

    def setup(self):
        run([repfs_cmd(), "mkfs", str(self.site), "--size", self.size])
        self.dir.mkdir()

    def start(self):
        cmd = [repfs_cmd(), "mount", str(self.site), str(self.dir)]
        if self.writeback:
            cmd.append("--writeback-cache")
        run(cmd, timeout=120)
        self._pid = int((self.site / "repfs.pid").read_text().split()[0])
        self.started.append(self._pid)

    def stop(self):
        if self._pid is None:
            return
        r = subprocess.run([repfs_cmd(), "umount", str(self.dir), "--timeout", "300"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            log(f"  ({self.label}: repfs umount failed: {r.stderr.strip()}; lazy unmount)")
            lazy_unmount(self.dir)
            if not wait_gone(self._pid, 60):
                kill_pid(self._pid)
        self._pid = None

    @property
    def pid(self):
        return self._pid

    def cleanup(self):
        lazy_unmount(self.dir)
        for pid in self.started:
            if pid_alive(pid):
                kill_pid(pid)
        shutil.rmtree(self.site, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- workloads

def seq_write(path: Path, size_mb: int, fsync: bool = True) -> float:
    """dd-style: 1 MiB writes, then fsync (unless fsync=False); MiB/s including the fsync
    and the close."""
    buf = os.urandom(MiB)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for _ in range(size_mb):
            mv = memoryview(buf)
            while mv:
                mv = mv[os.write(fd, mv):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return size_mb / (time.perf_counter() - t0)


def seq_read(path: Path, size_mb: int) -> float:
    buf = bytearray(MiB)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    dt = time.perf_counter() - t0
    if total != size_mb * MiB:
        raise RuntimeError(f"read {total} bytes, expected {size_mb * MiB}")
    return total / MiB / dt


def fio(directory: Path, rw: str, size_mb: int, runtime: int) -> float:
    cmd = ["fio", f"--name={rw}", f"--directory={directory}", "--filename=fio-4k.dat",
           f"--rw={rw}", "--bs=4k", f"--size={size_mb}M", "--ioengine=psync",
           f"--runtime={runtime}", "--time_based=0", "--output-format=json"]
    r = run(cmd, timeout=runtime * 20 + 600)
    out = r.stdout
    data = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {rw}: error {job['error']}")
    return float(job["read" if "read" in rw else "write"]["iops"])


def small_files(directory: Path, n: int) -> float:
    """One op = create + write 4 KiB + close + stat + unlink of one file; ops/s."""
    directory.mkdir()
    buf = os.urandom(4096)
    paths = [str(directory / f"f{i:07d}") for i in range(n)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, flags, 0o644)
        os.write(fd, buf)
        os.close(fd)
        os.stat(p)
        os.unlink(p)
    dt = time.perf_counter() - t0
    directory.rmdir()
    return n / dt


def make_entries(directory: Path, n: int) -> float:
    """Create n empty files (setup for the listing; reported but not part of the table)."""
    directory.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    mode = stat.S_IFREG | 0o644
    for i in range(n):
        p = directory / f"entry-{i:07d}"
        try:
            os.mknod(p, mode)
        except PermissionError:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    os.sync()
    return time.perf_counter() - t0


# Runs in a child process so a listing that takes too long (the passthrough example re-reads
# and re-stats the whole directory for every readdir request) can be killed at a time limit.
_LIST_CHILD = r"""
import os, sys, time
d, mode = sys.argv[1], sys.argv[2]
n = 0
t0 = time.perf_counter()
if mode == "scandir":
    with os.scandir(d) as it:
        for e in it:
            n += 1
            if n % 1000 == 0:
                print(n, flush=True)
else:
    names = os.listdir(d)
    for name in names:
        os.lstat(os.path.join(d, name))
        n += 1
        if n % 1000 == 0:
            print(n, flush=True)
print("done", n, time.perf_counter() - t0, flush=True)
"""


def listing(directory: Path, mode: str, expect: int, timeout: float):
    """(entries/s, timed out?, entries done, expected, limit). On a time-out the rate is
    entries done / limit."""
    p = subprocess.Popen([sys.executable, "-c", _LIST_CHILD, str(directory), mode],
                         stdout=subprocess.PIPE, text=True)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout + 1.0  # + interpreter start-up
    done, buf = 0, ""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                p.kill()
                p.wait()
                return done / timeout, True, done, expect, timeout
            if not sel.select(timeout=min(left, 1.0)):
                continue
            chunk = os.read(p.stdout.fileno(), 65536).decode()
            if not chunk:
                p.wait()
                raise RuntimeError(f"listing child exited ({p.returncode}) after {done} entries")
            buf += chunk
            *lines, buf = buf.split("\n")
            for line in lines:
                f = line.split()
                if f and f[0] == "done":
                    n, dt = int(f[1]), float(f[2])
                    p.wait()
                    if n < expect:
                        raise RuntimeError(f"{mode} saw {n} entries, expected {expect}")
                    return n / dt, False, n, expect, timeout
                if f:
                    done = int(f[0])
    finally:
        sel.close()
        if p.poll() is None:
            p.kill()
            p.wait()


# ----------------------------------------------------------------------------- the run

class Result:
    """A rate. partial: a listing stopped at the time limit, value = entries done / limit.
    upper: nothing was done within the limit, value = all entries / limit is an upper bound."""

    def __init__(self, value=None, *, partial=False, upper=False, error=None, note=""):
        self.value, self.partial, self.upper = value, partial, upper
        self.error, self.note = error, note

    def cell(self) -> str:
        if self.error:
            return "ERR"
        if self.value is None:
            return "-"
        s = f"{self.value:,.0f}" if self.value >= 100 else f"{self.value:.1f}"
        if self.upper:
            return "<" + s
        return s + ("*" if self.partial else "")

    def as_json(self):
        return {"value": self.value, "partial": self.partial, "upper_bound": self.upper,
                "error": self.error, "note": self.note}


def measure(results: dict, key: str, fn, *args, **kw) -> None:
    t0 = time.perf_counter()
    try:
        v = fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - one failed workload must not stop the run
        results[key] = Result(error=f"{type(e).__name__}: {e}")
        log(f"  {key:24s} FAILED: {e}")
        traceback.print_exc(file=sys.stdout)
        return
    if isinstance(v, tuple):
        rate, partial, n, expect, limit = v
        if partial and n == 0:
            results[key] = Result(expect / limit, partial=True, upper=True,
                                  note=f"nothing done within {limit:.0f} s")
        else:
            results[key] = Result(rate, partial=partial,
                                  note=f"timed out after {n} entries" if partial else "")
    else:
        rate = v
        results[key] = Result(rate)
    log(f"  {key:24s} {results[key].cell():>12s}   ({time.perf_counter() - t0:.1f} s)")


def readahead_kb(path: Path) -> str:
    """The readahead of the file system holding `path` (its bdi's read_ahead_kb; repfs raises
    its mount's to 512 KiB, the FUSE default is 128), or '?'."""
    try:
        st = os.stat(path)
        return (Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
                / "read_ahead_kb").read_text().strip()
    except OSError:
        return "?"


def run_target(t: Target, a, results: dict, mem: dict) -> None:
    log(f"\n== {t.label} ==  ({time.strftime('%H:%M:%S')}, load average {loadavg()})")
    t.setup()
    t.start()
    d = t.dir
    if t.pid:
        time.sleep(0.2)  # (repfs sets its readahead right after the mount's INIT)
    log(f"  readahead {readahead_kb(d)} KiB")
    big = d / "seq.dat"
    # first without fsync (the cost of the write path alone; the passthrough example has no
    # fsync handler, so its "fsync" below is a no-op), thrown away untimed
    measure(results, "seqwrite_nosync", seq_write, d / "seq-nosync.dat", a.size_mb, False)
    try:
        (d / "seq-nosync.dat").unlink()
    except OSError:
        pass
    os.sync()
    measure(results, "seqwrite", seq_write, big, a.size_mb)
    drop_caches()
    measure(results, "seqread", seq_read, big, a.size_mb)
    try:
        big.unlink()
    except OSError:
        pass
    measure(results, "randwrite", fio, d, "randwrite", a.fio_size_mb, a.fio_runtime)
    drop_caches()
    measure(results, "randread", fio, d, "randread", a.fio_size_mb, a.fio_runtime)
    try:
        (d / "fio-4k.dat").unlink()
    except OSError:
        pass
    measure(results, "smallfiles", small_files, d / "small", a.files)
    if t.pid:
        mem["after_workloads"] = proc_mem(t.pid)
        log(f"  daemon pid {t.pid} after the workloads: VmRSS {fmt_mem(mem['after_workloads']['VmRSS'])}"
            f", VmHWM {fmt_mem(mem['after_workloads']['VmHWM'])}")
    # the big directory: created once (not in the table), listed cold
    where = t.backing if t.backing is not None else d
    if t.backing is not None:
        t.stop()  # create underneath the passthrough daemon only while it is not mounted
    dt = make_entries(where / "bigdir", a.dir_entries)
    how = "through the mount" if t.backing is None else f"directly in {where.name}/"
    log(f"  (set-up, not timed: created {a.dir_entries} entries {how} in {dt:.1f} s)")
    if t.backing is not None:
        t.start()
    for mode, key in (("scandir", "list_scandir"), ("lstat", "list_lstat")):
        t.fresh()
        measure(results, key, listing, d / "bigdir", mode, a.dir_entries, a.list_timeout)
    if t.pid:
        mem["after_listing"] = proc_mem(t.pid)
        log(f"  daemon pid {t.pid} after the last listing (fresh mount): VmRSS "
            f"{fmt_mem(mem['after_listing']['VmRSS'])}, VmHWM {fmt_mem(mem['after_listing']['VmHWM'])}")


def rss_vs_size(root: Path) -> dict:
    """Mount an empty 1 GiB and an empty 1 TiB (sparse) site, do the same few writes on each,
    and read the daemon's memory: it must not depend on the volume size."""
    out = {}
    for size in ("1G", "1T"):
        t = Repfs(root, size=size, writeback=False, name=f"rss-{size}")
        try:
            t.setup()
            t.start()
            m = {"after_mount": proc_mem(t.pid)}
            buf = os.urandom(MiB)
            (t.dir / "dir").mkdir()
            for i in range(8):
                with open(t.dir / "dir" / f"file{i}", "wb") as f:
                    for _ in range(4):
                        f.write(buf)
                    f.flush()
                    os.fsync(f.fileno())
            for i in range(100):
                (t.dir / "dir" / f"small{i}").write_bytes(buf[:4096])
            os.sync()
            time.sleep(0.5)
            m["after_writes"] = proc_mem(t.pid)
            img = t.site / "volume.img"
            m["image_apparent"] = img.stat().st_size
            m["image_allocated"] = img.stat().st_blocks * 512
            out[size] = m
        except Exception as e:  # noqa: BLE001
            out[size] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc(file=sys.stdout)
        finally:
            try:
                t.stop()
            finally:
                t.cleanup()
    return out


ROWS = [
    ("seqwrite_nosync", "seq write {size} 1MiB, no fsync", "MiB/s"),
    ("seqwrite", "seq write {size} 1MiB+fsync", "MiB/s"),
    ("seqread", "seq read {size}, cold", "MiB/s"),
    ("randwrite", "fio 4k randwrite {fio}", "IOPS"),
    ("randread", "fio 4k randread {fio}, cold", "IOPS"),
    ("smallfiles", "small files x{files} (4 KiB cycle)", "files/s"),
    ("list_scandir", "list {entries} entries: scandir", "entries/s"),
    ("list_lstat", "list {entries}: listdir+lstat", "entries/s"),
]
LABELS = ["native", "passthrough", "repfs", "repfs+wbcache"]


def _size(mb: int) -> str:
    return f"{mb // 1024} GiB" if mb % 1024 == 0 else f"{mb} MiB"


def ratio(a: Result | None, b: Result | None) -> str:
    if not a or not b or a.value is None or b.value is None or a.error or b.error or not b.value:
        return "-"
    if a.upper and b.upper:
        return "-"
    pre = "<" if a.upper else ">" if b.upper else ""
    star = "*" if (a.partial or b.partial) and not pre else ""
    return f"{pre}{a.value / b.value:.2f}x{star}"


def table(all_results: dict, a) -> str:
    names = {"size": _size(a.size_mb), "fio": _size(a.fio_size_mb), "files": f"{a.files:,}",
             "entries": f"{a.dir_entries:,}"}
    head = ["workload", "unit", *LABELS, "repfs/pt", "repfs/native", "wb/pt"]
    rows = []
    for key, title, unit in ROWS:
        r = {lab: all_results.get(lab, {}).get(key) for lab in LABELS}
        rows.append([title.format(**names), unit,
                     *[(r[lab].cell() if r[lab] else "-") for lab in LABELS],
                     ratio(r["repfs"], r["passthrough"]), ratio(r["repfs"], r["native"]),
                     ratio(r["repfs+wbcache"], r["passthrough"])])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = []
    for i, row in enumerate([head, *rows]):
        lines.append("  ".join(str(c).ljust(w) if j < 2 else str(c).rjust(w)
                               for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> list[str]:
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() \
                .splitlines()[0]
        except (OSError, IndexError):
            return "?"
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    try:
        import pyfuse3
        pyfuse3_v = pyfuse3.__version__
    except Exception:  # noqa: BLE001
        pyfuse3_v = "?"
    return [
        f"nproc:   {len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()}), {cpu}, RAM {mem}",
        f"kernel:  {platform.release()} ({platform.machine()})",
        f"python:  {platform.python_version()} ({sys.executable}); pyfuse3 {pyfuse3_v}",
        f"tools:   {first(['fio', '--version'])}; {first(['fusermount3', '-V'])}",
    ]


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def repfs_source() -> str:
    """Which repfs the mounts run: its package directory and a fingerprint of its sources
    (a benchmark of a work tree that changes during the run measures more than one repfs)."""
    import hashlib
    r = subprocess.run([sys.executable, "-c", "import repfs, os; print(os.path.dirname("
                        "repfs.__file__))"], capture_output=True, text=True)
    pkg = Path(r.stdout.strip() or ".")
    h = hashlib.sha256()
    newest = 0.0
    files = sorted(pkg.rglob("*.py"))
    for f in files:
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
        newest = max(newest, f.stat().st_mtime)
    return (f"{pkg} ({len(files)} files, sha256 {h.hexdigest()[:12]}, newest change "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(newest))})")


def fs_of(path: Path) -> str:
    best, desc = "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4]
            if (str(path) + "/").startswith(mp.rstrip("/") + "/") and len(mp) >= len(best):
                fstype, dev = right.split()[:2]
                best, desc = mp, f"{fstype} on {dev} (mounted at {mp})"
    return desc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 128 MiB, 64 MiB fio for 5 s, 1000 files, 5000 entries")
    p.add_argument("--size-mb", type=int, help="sequential file size in MiB (default 1024)")
    p.add_argument("--files", type=int, help="small-file cycles (default 10000)")
    p.add_argument("--dir-entries", type=int, help="entries in the listed directory "
                   "(default 100000)")
    p.add_argument("--fio-size-mb", type=int, help="fio file size in MiB (default 256)")
    p.add_argument("--fio-runtime", type=int, help="fio runtime cap in s (default 20)")
    p.add_argument("--list-timeout", type=float, help="time limit per listing in s "
                   "(default 180)")
    p.add_argument("--targets", default=",".join(LABELS),
                   help=f"comma-separated subset of {','.join(LABELS)}")
    p.add_argument("--no-rss-sizes", action="store_true",
                   help="skip the 1 GiB vs 1 TiB daemon memory comparison")
    p.add_argument("--tmpdir", help="where to make the temp directory (default: $TMPDIR or "
                   "/tmp); everything runs on the file system holding it")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    q = a.quick
    for k, full, quick in (("size_mb", 1024, 128), ("files", 10000, 1000),
                           ("dir_entries", 100000, 5000), ("fio_size_mb", 256, 64),
                           ("fio_runtime", 20, 5), ("list_timeout", 180.0, 60.0)):
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    wanted = [x.strip() for x in a.targets.split(",") if x.strip()]
    for w in wanted:
        if w not in LABELS:
            p.error(f"unknown target {w!r}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="repfs-bench-", dir=a.tmpdir)).resolve()
    # room for the sequential file, the fio file, the entries' inodes and metadata
    site_gib = max(4, -(-(a.size_mb + a.fio_size_mb) * 2 // 1024) + 1)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    log(f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}")
    log(f"cwd:     {os.getcwd()}")
    log(f"date:    {started}")
    for line in machine():
        log(line)
    log(f"tmpdir:  {root}: {fs_of(root)}")
    log(f"load:    {loadavg()} (1/5/15 min load average at the start)")
    src_before = repfs_source()
    log(f"repfs:   {src_before}")
    log(f"sizes:   seq {_size(a.size_mb)}, fio {_size(a.fio_size_mb)} for <= {a.fio_runtime} s, "
        f"{a.files} small files, {a.dir_entries} dir entries, listing limit {a.list_timeout:.0f} s, "
        f"repfs sites {site_gib} GiB")
    if os.geteuid() != 0:
        log("WARNING: not root: caches cannot be dropped, read numbers will be cache-warm")

    all_results: dict[str, dict] = {}
    mem: dict[str, dict] = {}
    size_rss: dict = {}
    targets: list[Target] = []
    try:
        for lab in LABELS:
            if lab not in wanted:
                continue
            if lab == "native":
                t = Native(root)
            elif lab == "passthrough":
                t = Passthrough(root)
            else:
                t = Repfs(root, size=f"{site_gib}G", writeback=(lab == "repfs+wbcache"))
            targets.append(t)
            res = all_results[lab] = {}
            m = mem[lab] = {}
            try:
                run_target(t, a, res, m)
            except Exception as e:  # noqa: BLE001
                log(f"  {lab} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stdout)
                res.setdefault("_error", Result(error=str(e)))
            finally:
                try:
                    t.stop()
                finally:
                    t.cleanup()
        if not a.no_rss_sizes:
            log("\n== repfs daemon memory vs volume size ==")
            size_rss = rss_vs_size(root)
    finally:
        for t in targets:  # whatever happened: no mount and no daemon of ours stays behind
            try:
                t.cleanup()
            except Exception:  # noqa: BLE001
                traceback.print_exc(file=sys.stdout)
        for d in root.glob("*-mnt"):
            lazy_unmount(d)
        shutil.rmtree(root, ignore_errors=True)

    log("\n== results (higher is better everywhere; ratios are repfs/baseline) ==")
    log(table(all_results, a))
    log("  * = the listing hit the time limit; the rate is entries done / limit. "
        "<N = nothing done within the limit\n  (N = all entries / limit, an upper bound).")
    log("  fsync: native and repfs write the data to disk; pyfuse3's passthrough example has no "
        "fsync handler (ENOSYS),\n  so its 'fsync' returns at once and its data stays in "
        "the page cache of the file system below.")
    if _caches_warm:
        log("  NOTE: caches could not be dropped; reads are cache-warm")
    errors = [(lab, k, r.error) for lab, rs in all_results.items() for k, r in rs.items()
              if r.error]
    for lab, k, err in errors:
        log(f"  ERR {lab} {k}: {err}")
    log("\n== daemon memory (VmRSS / VmHWM peak) ==")
    for lab in LABELS:
        for phase, title in (("after_workloads", "after seq/fio/small-file workloads"),
                             ("after_listing", f"after listing {a.dir_entries:,} entries "
                                               f"(fresh mount)")):
            v = mem.get(lab, {}).get(phase)
            if v:
                log(f"  {lab:14s} {title:48s} {fmt_mem(v.get('VmRSS'))} / {fmt_mem(v.get('VmHWM'))}")
    if size_rss:
        log("\n== repfs daemon memory vs volume size (same few writes on each) ==")
        for size, m in size_rss.items():
            if "error" in m:
                log(f"  {size} site: ERR {m['error']}")
                continue
            log(f"  {size:>2s} site: after mount {fmt_mem(m['after_mount']['VmRSS'])}, after "
                f"writing 32 MiB + 100 small files {fmt_mem(m['after_writes']['VmRSS'])} "
                f"(peak {fmt_mem(m['after_writes']['VmHWM'])}); volume.img "
                f"{m['image_apparent'] / 2**30:,.0f} GiB apparent, "
                f"{m['image_allocated'] / MiB:.1f} MiB allocated")
    src_after = repfs_source()
    if src_after != src_before:
        log(f"\nWARNING: the repfs sources changed during the run: now {src_after}; "
            f"mounts started at different times ran different code")
    log(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S %Z')} (started {started}); "
        f"load average now {loadavg()}")

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": getattr(sys, "orig_argv", sys.argv), "date": started,
                       "machine": machine(), "args": vars(a),
                       "results": {lab: {k: r.as_json() for k, r in rs.items()}
                                   for lab, rs in all_results.items()},
                       "memory_kib": mem, "memory_vs_size_kib": size_rss}, f, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
