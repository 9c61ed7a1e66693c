"""The issue-8 matrix: every target of issue 8 measured in one run, as one table of ratios.

Run from the repository root, as root (page caches are dropped for the cold reads):

    .venv/bin/python tools/bench/matrix.py --quick [--json FILE]     # 2-3 minutes
    .venv/bin/python tools/bench/matrix.py [--json FILE]             # 10-15 minutes

Five sections, each on fresh sites in one temporary directory (one disk), each measuring its
own baseline in the same run:

  snap    a file overwritten in place with an active snapshot vs with none: 1 MiB sequential
          writes + fsync at the end, and fio 4 KiB random writes with an fsync every 64
          writes; bytes the daemon wrote to storage per byte written (/proc/PID/io)
  repl    new data (1 MiB writes, fsync at the end) on a primary replicating to a local
          secondary that keeps up vs on a pair that does not replicate; bytes written per
          byte by the primary and (after it caught up) by the secondary daemon
  smallio repfs vs pyfuse3's passthrough example (tools/bench/passthroughfs.py): fio 4 KiB
          random writes (default mount and --writeback-cache), cold sequential reads, the
          small-file cycle; sequential 1 MiB writes + fsync vs the native file system
  stall   a 4 KiB write probe timing every write while several threads of 1 MiB writes with
          periodic fsync saturate the disk and the primary cuts a delta set every 0.5 s; the
          probe's longest write at each cut (p99) against the same load without replication
  rss     peak RSS (VmHWM) of the primary and the secondary daemon while one delta set of
          4 GiB (1 GiB with --quick) is cut, sent, received and played

Nothing here asserts on time (DESIGN.md, "Performance rules"); see tools/bench/README.md for
what each row means. Every mount is taken down and every daemon and child this run started
is stopped, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import bisect
import calendar
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import fs as fsb  # tools/bench/fs.py (this directory is sys.path[0] when run as a script)
import repl as rpb  # tools/bench/repl.py
from common import lazy_unmount, log, pid_alive, kill_pid, tool  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SECTIONS = ("snap", "repl", "smallio", "stall", "rss")
EXTRA_SECTIONS = ("rcp", "recovery")  # only with --only: issue 9's rcp.py (network
# namespaces, 4-15 min), issue 10's recovery.py (resync vs full copy and rsync, failover time)

# ----------------------------------------------------------------------------- what we start

_targets: list = []            # fs.py targets (Native, Passthrough, Repfs)
_children: list[subprocess.Popen] = []  # load generators


def cleanup_all(root: Path) -> None:
    """Whatever happened: no child, mount or daemon of ours stays behind."""
    # each is cleaned up once and forgotten: a pid checked again later could be reused
    while _children:
        c = _children.pop()
        if c.poll() is None:
            c.kill()
            c.wait()
    while _targets:
        t = _targets.pop()
        try:
            t.stop()
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=sys.stdout)
        try:
            t.cleanup()
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=sys.stdout)
    while rpb.Pair.all:
        p = rpb.Pair.all.pop()
        try:
            p.cleanup()
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=sys.stdout)
    for m in list(root.glob("**/*-mnt")) + list(root.glob("*/M1")) + list(root.glob("*/M2")):
        lazy_unmount(m)


def repfs_target(root: Path, name: str, size: str, writeback: bool = False):
    t = fsb.Repfs(root, size=size, writeback=writeback, name=name)
    _targets.append(t)
    t.setup()
    t.start()
    return t


def done_pair(p) -> None:
    """Unmount a site pair (repl.py), remove it and forget it."""
    try:
        p.down()
    finally:
        p.cleanup()
        rpb.Pair.all.remove(p)


def admin(mnt: Path, *args, timeout: float = 600) -> str:
    return rpb.run([tool("repfs-admin"), "--site", mnt, *args], timeout=timeout).stdout


# ----------------------------------------------------------------------------- measuring

def io(pid: int) -> dict:
    """/proc/PID/io of a process (all its threads, living and gone). write_bytes: bytes it
    caused to be written to storage, counted when page-cache pages turn dirty; wchar: bytes
    it passed to write calls (files, but also sockets and /dev/fuse replies)."""
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = int(v)
    return out


def write_bytes(pid: int) -> int:
    return io(pid)["write_bytes"]


# write_bytes counts a whole folio when its first byte turns dirty: with the large page-cache
# folios of recent kernels (ext4 since Linux 6.16), 4 KiB random writes to a file cached in
# large folios, with fsyncs in between, count tens to hundreds of times the bytes written
# (a plain process on ext4 here: 164x). For those rows the daemon's wchar is used instead.


def vm(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) in bytes."""
    return {k: v * 1024 for k, v in fsb.proc_mem(pid).items()}


def settle(s: float) -> None:
    os.sync()
    time.sleep(s)


def overwrite(path: Path, mib: int, buf: bytes, create: bool = False) -> float:
    """1 MiB pwrites over the first `mib` MiB (in place; a new file if create), fsync at the
    end; MiB/s including the fsync and the close."""
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        for i in range(mib):
            mv, off = memoryview(buf), i * MiB
            while mv:
                k = os.pwrite(fd, mv, off)
                mv, off = mv[k:], off + k
        os.fsync(fd)
    finally:
        os.close(fd)
    return mib / (time.perf_counter() - t0)


def fio_job(directory: Path, filename: str, rw: str, size_mb: int, runtime: int,
            *extra: str) -> dict:
    """One fio job (psync, 4 KiB); returns {'iops', 'bytes'} of its reads or writes."""
    cmd = ["fio", f"--name={rw}", f"--directory={directory}", f"--filename={filename}",
           f"--rw={rw}", "--bs=4k", f"--size={size_mb}M", "--ioengine=psync",
           f"--runtime={runtime}", "--time_based=0", "--output-format=json", *extra]
    out = fsb.run(cmd, timeout=runtime * 20 + 600).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {rw}: error {job['error']}")
    side = job["read" if "read" in rw else "write"]
    return {"iops": float(side["iops"]), "bytes": int(side["io_bytes"])}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------- the table

class Row:
    """One line of the table. `kind` says how the target is read:
    'ratio>=' value/baseline must be >= target; 'max' value must be <= target;
    'lt' value must be < target; 'info' no target (shown for context)."""

    def __init__(self, section, key, title, unit, *, kind, target=None, value=None,
                 base=None, base_note="", note="", error=None, higher_better=True):
        self.section, self.key, self.title, self.unit = section, key, title, unit
        self.kind, self.target = kind, target
        self.value, self.base, self.base_note = value, base, base_note
        self.note, self.error, self.higher_better = note, error, higher_better

    @property
    def ratio(self):
        if self.value is None or not self.base:
            return None
        return self.value / self.base

    @property
    def met(self):
        if self.error or self.kind == "info":
            return None
        if self.kind == "ratio>=":
            return None if self.ratio is None else self.ratio >= self.target
        if self.value is None:
            return None
        return self.value <= self.target if self.kind == "max" else self.value < self.target

    def target_cell(self) -> str:
        if self.kind == "ratio>=":
            return f">= {self.target:.2f}x"
        if self.kind in ("max", "lt"):
            op = "<=" if self.kind == "max" else "<"
            return f"{op} {fmt(self.target, self.unit)}"
        return "(info)"

    def result_cell(self) -> str:
        if self.error:
            return "ERROR" if not self.error.startswith("skipped") else "SKIPPED"
        m = self.met
        return "-" if m is None else ("met" if m else "MISSED")

    def as_json(self) -> dict:
        return {"section": self.section, "key": self.key, "title": self.title,
                "unit": self.unit, "value": self.value, "baseline": self.base,
                "baseline_is": self.base_note, "ratio": self.ratio, "target_kind": self.kind,
                "target": self.target, "met": self.met, "note": self.note,
                "error": self.error}


def fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "B":
        return f"{v / MiB:.0f} MiB"
    if unit == "x":
        return f"{v:.3f}"
    if unit == "ms":
        return f"{v:.1f} ms"
    s = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}"
    return f"{s} {unit}"


def table(rows: list[Row]) -> str:
    head = ["row", "measured", "baseline (same run)", "ratio", "target", "result"]
    body = []
    for r in rows:
        base = fmt(r.base, r.unit) + (f" ({r.base_note})" if r.base_note and r.base is not None
                                      else "")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        skipped = bool(r.error and r.error.startswith("skipped"))
        body.append([r.title, ("-" if skipped else "ERR") if r.error and r.value is None
                     else fmt(r.value, r.unit),
                     base, ratio, r.target_cell(), r.result_cell()])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    out = []
    for i, line in enumerate([head, *body]):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(line, widths))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def failed_rows(rows: list[Row], section: str, keys, e: BaseException) -> None:
    """A section that failed: its rows (those not measured yet) say so."""
    have = {r.key for r in rows}
    msg = f"{type(e).__name__}: {e}"
    for key, title, unit, kind, target in keys:
        if key not in have:
            rows.append(Row(section, key, title, unit, kind=kind, target=target, error=msg))


# ----------------------------------------------------------------------------- snap

SNAP_ROWS = [
    ("snap_seq", "overwrite 1 MiB seq + fsync, active snapshot vs none", "MiB/s", "ratio>=", 0.8),
    ("snap_rand", "overwrite 4 KiB random, fsync/64 writes, snapshot vs none", "IOPS",
     "ratio>=", 0.5),
    ("snap_seq_bpb", "  primary bytes written per byte, seq overwrite w/ snapshot", "x",
     "info", None),
    ("snap_rand_bpb", "  primary bytes written (wchar) per byte, 4k overwrite w/ snapshot", "x",
     "info", None),
]


def sec_snap(root: Path, a, rows: list[Row], raw: dict) -> None:
    gib = max(2, -(-(a.snap_mib + a.rand_mib) * 3 // 1024) + 1)
    t = repfs_target(root, "snap", f"{gib}G")
    buf = os.urandom(MiB)
    seqf, randf = t.dir / "seq.dat", t.dir / "rand.dat"
    overwrite(seqf, a.snap_mib, buf, create=True)
    overwrite(randf, a.rand_mib, buf, create=True)
    log(f"  site {gib} GiB, daemon pid {t.pid}; files written: {a.snap_mib} MiB sequential, "
        f"{a.rand_mib} MiB for fio")
    res = raw.setdefault("rounds", [])

    def timed(fn, counter):
        settle(a.settle)
        w0 = io(t.pid)[counter]
        rate, nbytes = fn()
        time.sleep(0.3)
        return rate, (io(t.pid)[counter] - w0) / nbytes

    def seq():
        return overwrite(seqf, a.snap_mib, buf), a.snap_mib * MiB

    def rand():
        j = fio_job(t.dir, "rand.dat", "randwrite", a.rand_mib, a.fio_runtime, "--fsync=64")
        return j["iops"], j["bytes"]

    for r in range(a.rounds):
        row = {}
        for name, fn, counter in (("seq", seq, "write_bytes"), ("rand", rand, "wchar")):
            row[name + "_none"], row[name + "_none_bpb"] = timed(fn, counter)
            admin(t.dir, "snapshot", "create", f"{name}{r}")
            row[name + "_snap"], row[name + "_snap_bpb"] = timed(fn, counter)
            admin(t.dir, "snapshot", "delete", f"{name}{r}")
        res.append(row)
        log(f"  round {r + 1}: seq overwrite {row['seq_none']:.1f} -> {row['seq_snap']:.1f} "
            f"MiB/s with a snapshot ({row['seq_none_bpb']:.2f} -> {row['seq_snap_bpb']:.2f} "
            f"bytes/byte); 4k random fsync/64 {row['rand_none']:.0f} -> {row['rand_snap']:.0f} "
            f"IOPS ({row['rand_none_bpb']:.2f} -> {row['rand_snap_bpb']:.2f} bytes/byte by "
            f"wchar); "
            f"load {fsb.loadavg()}")
    m = {k: med([x[k] for x in res]) for k in res[0]}
    _targets.remove(t)
    try:
        t.stop()
    finally:
        t.cleanup()
    (k1, t1, u1, kd1, g1), (k2, t2, u2, kd2, g2), (k3, t3, u3, kd3, g3), (k4, t4, u4, kd4, g4) \
        = SNAP_ROWS
    rows.append(Row("snap", k1, t1, u1, kind=kd1, target=g1, value=m["seq_snap"],
                    base=m["seq_none"], base_note="no snapshot"))
    rows.append(Row("snap", k2, t2, u2, kind=kd2, target=g2, value=m["rand_snap"],
                    base=m["rand_none"], base_note="no snapshot"))
    rows.append(Row("snap", k3, t3, u3, kind=kd3, target=g3, value=m["seq_snap_bpb"],
                    base=m["seq_none_bpb"], base_note="no snapshot",
                    note="copy-on-first-write saves a before-image: 2.0 is inherent"))
    rows.append(Row("snap", k4, t4, u4, kind=kd4, target=g4, value=m["rand_snap_bpb"],
                    base=m["rand_none_bpb"], base_note="no snapshot",
                    note="from wchar (bytes passed to write calls), not write_bytes: see "
                    "tools/bench/README.md"))


# ----------------------------------------------------------------------------- repl

REPL_ROWS = [
    ("repl_tp", "new data 1 MiB + fsync, replicating vs not", "MiB/s", "ratio>=", 0.8),
    ("repl_bpb1", "  primary bytes written per byte, replicating", "x", "max", 1.1),
    ("repl_bpb2", "  secondary bytes written per byte (until caught up)", "x", "max", 2.0),
]


def sec_repl(root: Path, a, rows: list[Row], raw: dict) -> None:
    buf = os.urandom(MiB)
    res = raw.setdefault("rounds", [])
    nbytes = a.repl_mib * MiB
    for r in range(a.rounds):
        row = {}
        for mode in ("plain", "repl"):
            p = rpb.fresh_pair(root, f"repl{r}-{mode}", a.site_size)
            try:
                if mode == "repl":
                    row["initial_copy_s"] = p.replicate()
                settle(a.settle)
                w0 = [write_bytes(x) for x in p.pids]
                st0 = p.c1.status()
                rate = overwrite(p.m1 / "new.dat", a.repl_mib, buf, create=True)
                row[mode] = rate
                if mode == "repl":
                    st = p.c1.status()
                    row["cuts_while_writing"] = st["last_cut_delta_set"] - st0["last_cut_delta_set"]
                    row["flow_control_at_end"] = st["flow_control"]
                    row["catch_up_s"] = rpb.wait_caught_up(p, a.drain_limit)
                    if row["catch_up_s"] is None:
                        raise RuntimeError(f"the secondary did not catch up within "
                                           f"{a.drain_limit:.0f} s")
                time.sleep(0.3)
                w1 = [write_bytes(x) for x in p.pids]
                row[mode + "_bpb"] = [(b - a_) / nbytes for a_, b in zip(w0, w1)]
                log(f"  round {r + 1} {mode:5s}: {rate:7.1f} MiB/s; bytes written per byte: "
                    f"primary {row[mode + '_bpb'][0]:.2f}, secondary {row[mode + '_bpb'][1]:.2f}"
                    + (f"  ({row['cuts_while_writing']} cuts while writing, caught up "
                       f"{row['catch_up_s']:.1f} s after the writer)" if mode == "repl" else ""))
            finally:
                done_pair(p)
        res.append(row)
    tp = med([x["repl"] for x in res]), med([x["plain"] for x in res])
    b1 = med([x["repl_bpb"][0] for x in res]), med([x["plain_bpb"][0] for x in res])
    b2 = med([x["repl_bpb"][1] for x in res])
    (k1, t1, u1, kd1, g1), (k2, t2, u2, kd2, g2), (k3, t3, u3, kd3, g3) = REPL_ROWS
    rows.append(Row("repl", k1, t1, u1, kind=kd1, target=g1, value=tp[0], base=tp[1],
                    base_note="not replicating"))
    rows.append(Row("repl", k2, t2, u2, kind=kd2, target=g2, value=b1[0], base=b1[1],
                    base_note="not replicating"))
    rows.append(Row("repl", k3, t3, u3, kind=kd3, target=g3, value=b2))


# ----------------------------------------------------------------------------- small I/O

SMALL_ROWS = [
    ("rand4k", "fio 4 KiB randwrite vs passthrough", "IOPS", "ratio>=", 0.5),
    ("rand4k_wb", "fio 4 KiB randwrite, --writeback-cache vs passthrough", "IOPS", "ratio>=", 0.8),
    ("seqread", "sequential read, cold, vs passthrough", "MiB/s", "ratio>=", 0.9),
    ("smallfiles", "small files create/write/close/stat/unlink vs passthrough", "files/s",
     "ratio>=", 1.0),
    ("seqwrite", "seq write 1 MiB + fsync at end vs native", "MiB/s", "ratio>=", 0.6),
]


def sec_smallio(root: Path, a, rows: list[Row], raw: dict) -> None:
    gib = max(4, -(-(a.seq_mib + a.fio_mib) * 2 // 1024) + 1)
    plan = [  # (label, target factory, workloads)
        ("native", lambda: fsb.Native(root), ("seqwrite",)),
        ("passthrough", lambda: fsb.Passthrough(root), ("seqread", "rand4k", "smallfiles")),
        ("repfs", lambda: fsb.Repfs(root, size=f"{gib}G", writeback=False, name="io"),
         ("seqwrite", "seqread", "rand4k", "smallfiles")),
        ("repfs+wbcache", lambda: fsb.Repfs(root, size=f"{gib}G", writeback=True,
                                            name="io-wb"), ("rand4k",)),
    ]
    res = raw.setdefault("rounds", [])
    for r in range(a.rounds):
        got: dict = {}
        for label, make, work in plan:
            t = make()
            _targets.append(t)
            try:
                t.setup()
                t.start()
                d = t.dir
                v = got[label] = {}
                if "seqwrite" in work or "seqread" in work:
                    # the passthrough example has no fsync handler: its fsync is a no-op, so
                    # it is no baseline for the fsync row (native is); here it only lays out
                    # the file for the cold read
                    settle(a.settle)
                    v["seqwrite"] = fsb.seq_write(d / "seq.dat", a.seq_mib,
                                                  fsync=label != "passthrough")
                if "seqread" in work:
                    fsb.drop_caches()
                    v["seqread"] = fsb.seq_read(d / "seq.dat", a.seq_mib)
                (d / "seq.dat").unlink(missing_ok=True)
                if "rand4k" in work:
                    settle(a.settle)
                    v["rand4k"] = fsb.fio(d, "randwrite", a.fio_mib, a.fio_runtime)
                    (d / "fio-4k.dat").unlink(missing_ok=True)
                if "smallfiles" in work:
                    settle(a.settle)
                    v["smallfiles"] = fsb.small_files(d / "small", a.files)
                log(f"  round {r + 1} {label:13s} " + ", ".join(
                    f"{k} {x:,.1f}" for k, x in v.items()) + f"  (load {fsb.loadavg()})")
            finally:
                try:
                    t.stop()
                finally:
                    t.cleanup()
                    _targets.remove(t)
        res.append(got)

    def m(label, key):
        return med([x.get(label, {}).get(key) for x in res])

    spec = {"rand4k": ("repfs", "rand4k", "passthrough", "rand4k"),
            "rand4k_wb": ("repfs+wbcache", "rand4k", "passthrough", "rand4k"),
            "seqread": ("repfs", "seqread", "passthrough", "seqread"),
            "smallfiles": ("repfs", "smallfiles", "passthrough", "smallfiles"),
            "seqwrite": ("repfs", "seqwrite", "native", "seqwrite")}
    for key, title, unit, kind, target in SMALL_ROWS:
        vl, vk, bl, bk = spec[key]
        rows.append(Row("smallio", key, title, unit, kind=kind, target=target,
                        value=m(vl, vk), base=m(bl, bk), base_note=bl))


# ----------------------------------------------------------------------------- stall

STALL_ROWS = [
    ("stall_writer", "writer stall at a cut under a saturating load, p99", "ms", "lt", 50.0),
    ("stall_daemon", "  daemon's cut_stall_ms p99 under that load", "ms", "lt", 50.0),
]

# The saturating load, in a child process (so its threads do not share the probe's GIL):
# N threads each pwrite 1 MiB blocks round a file of SPAN MiB, fsync every FSYNC writes.
_LOAD = r"""
import os, sys, threading, time
d, n, span, every, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
buf = os.urandom(1 << 20)
done = [0] * n
stop = time.monotonic() + secs
def w(i):
    fd = os.open(os.path.join(d, f"load{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    k = 0
    while time.monotonic() < stop:
        done[i] += os.pwrite(fd, buf, (k % span) << 20)
        k += 1
        if k % every == 0:
            os.fsync(fd)
    os.close(fd)
t0 = time.monotonic()
ts = [threading.Thread(target=w, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
print(sum(done), time.monotonic() - t0, flush=True)
"""


# The probe's stall at a cut: its longest write that ended from 50 ms before to 500 ms after
# the cut's time (the record's cut_ns is taken inside the cut, before its commit; a write held
# at the gate ends when the cut is done). The baseline is the same statistic over windows
# every 0.5 s of the run without replication.
WIN_BEFORE, WIN_AFTER = 0.05, 0.5


def window_max_ms(lat, wall, centers) -> list[float]:
    out = []
    for c in centers:
        i = bisect.bisect_left(wall, c - WIN_BEFORE)
        j = bisect.bisect_right(wall, c + WIN_AFTER)
        if j > i:
            out.append(max(lat[i:j]) * 1000)
    return out


class CutWatcher(threading.Thread):
    """Polls the primary's status every 0.1 s (on the plain pair too, for the same load) and
    keeps the `created` time (milliseconds) of every delta set it sees listed: a delta set
    is listed from its cut until every destination has played it."""

    def __init__(self, p):
        super().__init__(daemon=True)
        self.p = p
        self.seen: dict[int, float] = {}
        self.stop_ev = threading.Event()
        self.errors = 0

    def run(self):
        while not self.stop_ev.wait(0.1):
            try:
                st = self.p.c1.status()
            except Exception:  # noqa: BLE001
                self.errors += 1
                continue
            for d in st.get("outstanding_delta_sets") or []:
                c = d.get("created")
                if c and d["delta_set"] not in self.seen:
                    self.seen[d["delta_set"]] = (
                        calendar.timegm(time.strptime(c[:19], "%Y-%m-%dT%H:%M:%S"))
                        + int(c[20:23]) / 1000)

    def cut_times(self, w0: float, w1: float) -> list[float]:
        return sorted(t for t in self.seen.values() if w0 <= t <= w1)


def stall_run(p, a, repl: bool) -> dict:
    secs = a.stall_warmup + a.stall_s + 1.0
    child = subprocess.Popen([sys.executable, "-c", _LOAD, str(p.m1), str(a.load_threads),
                              str(a.load_span_mib), str(a.load_fsync_every), str(secs)],
                             stdout=subprocess.PIPE, text=True)
    _children.append(child)
    try:
        time.sleep(a.stall_warmup)
        before = p.c1.status() if repl else None
        watch = CutWatcher(p)
        watch.start()
        try:
            lat, ends, offset, _ = rpb.small_writer(p.m1 / "probe", a.stall_s, 64)
        finally:
            watch.stop_ev.set()
            watch.join()
        out, _ = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"load generator exited {child.returncode}")
    nb, dt = out.split()
    s = rpb.stall_stats(lat, ends, a.stall_s)
    s["load_mib_s"] = int(nb) / MiB / float(dt)
    wall = [e + offset for e in ends]
    w0, w1 = wall[0] - lat[0], wall[-1]
    if repl:
        st = p.c1.status()
        s["daemon_cut_stall_ms"] = st["cut_stall_ms"]
        s["cuts_status"] = st["last_cut_delta_set"] - before["last_cut_delta_set"]
        s["flow_control_at_end"] = st["flow_control"]
        centers = watch.cut_times(w0 + WIN_BEFORE, w1 - WIN_AFTER)
    else:
        centers = [w0 + WIN_BEFORE + 0.5 * k for k in range(int((w1 - w0) / 0.5))]
        centers = [c for c in centers if c <= w1 - WIN_AFTER]
    s["windows"] = len(centers)
    s["window_max_ms"] = window_max_ms(lat, wall, centers)
    s["window_p99_ms"] = rpb.pct(s["window_max_ms"], 99)
    return s


def sec_stall(root: Path, a, rows: list[Row], raw: dict) -> None:
    runs: dict[str, list[dict]] = {"plain": [], "repl": []}
    for rnd in range(a.rounds):  # (rounds interleaved: plain, repl, plain, repl, ...)
        for mode in ("plain", "repl"):
            p = rpb.fresh_pair(root, f"stall-{mode}-{rnd}", a.site_size)
            try:
                if mode == "repl":
                    p.replicate(timeout=0.5)
                s = stall_run(p, a, mode == "repl")
                runs[mode].append(s)
                log(f"  {mode:5s}: load {s['load_mib_s']:.1f} MiB/s; probe {s['writes']} writes, "
                    f"p50 {rpb.f2(s['p50_ms'])} ms, p99 {rpb.f2(s['p99_ms'])} ms, max "
                    f"{rpb.f1(s['max_ms'])} ms; longest write per "
                    + (f"cut p99 {rpb.f1(s['window_p99_ms'])} ms ({s['cuts_status']} cuts, "
                       f"{s['windows']} timed), daemon cut_stall_ms p50 "
                       f"{s['daemon_cut_stall_ms']['p50']} p99 "
                       f"{s['daemon_cut_stall_ms']['p99']}" if mode == "repl" else
                       f"0.5 s window p99 {rpb.f1(s['window_p99_ms'])} ms"))
            finally:
                done_pair(p)
    raw["plain"], raw["repl"] = runs["plain"][-1], runs["repl"][-1]
    raw["rounds"] = runs
    r, b = raw["repl"], raw["plain"]
    rw = [x["window_p99_ms"] for x in runs["repl"] if x["window_max_ms"]]
    note = (f"load {med([x['load_mib_s'] for x in runs['repl']]):.0f} MiB/s replicating, "
            f"{med([x['load_mib_s'] for x in runs['plain']]):.0f} not; "
            f"{r['cuts_status']} cuts, {r['windows']} timed (last round); probe p99 over all "
            f"writes {rpb.f1(med([x['p99_ms'] for x in runs['repl']]))} ms replicating, "
            f"{rpb.f1(med([x['p99_ms'] for x in runs['plain']]))} ms not"
            + (f"; medians of {a.rounds} rounds" if a.rounds > 1 else ""))
    (k1, t1, u1, kd1, g1), (k2, t2, u2, kd2, g2) = STALL_ROWS
    err = None if rw else "no cut of the primary fell within the probe's run"
    rows.append(Row("stall", k1, t1, u1, kind=kd1, target=g1, value=med(rw) if rw else None,
                    base=med([x["window_p99_ms"] for x in runs["plain"]]), base_note="no repl",
                    note=note, error=err, higher_better=False))
    rows.append(Row("stall", k2, t2, u2, kind=kd2, target=g2,
                    value=med([x["daemon_cut_stall_ms"]["p99"] for x in runs["repl"]]),
                    higher_better=False))


# ----------------------------------------------------------------------------- rss

RSS_ROWS = [
    ("rss_primary", "primary daemon peak RSS (VmHWM), {size} delta set", "B", "max", 256 * MiB),
    ("rss_secondary", "secondary daemon peak RSS (VmHWM), {size} delta set", "B", "max",
     256 * MiB),
]


def rss_rows(a):
    size = fsb._size(a.rss_mib)
    return [(k, t.format(size=size), u, kd, g) for k, t, u, kd, g in RSS_ROWS]


def sec_rss(root: Path, a, rows: list[Row], raw: dict) -> None:
    keys = rss_rows(a)
    # the primary's volume + a copy of the delta set there (chunk files before issue 8, pinned
    # before-images at worst) + the secondary's incoming data + its volume
    need = 4 * a.rss_mib * MiB + 2 * GiB
    free = shutil.disk_usage(root).free
    raw["free_bytes"], raw["needed_bytes"] = free, need
    if free < need:
        msg = (f"skipped: needs {need / GiB:.1f} GiB free on {root}, has {free / GiB:.1f} GiB "
               f"(use --rss-mib or --tmpdir)")
        log(f"  {msg}")
        for k, t, u, kd, g in keys:
            rows.append(Row("rss", k, t, u, kind=kd, target=g, error=msg))
        return
    size = f"{-(-a.rss_mib * 5 // 4 // 1024) + 1}G"
    p = rpb.fresh_pair(root, "rss", size)
    try:
        p.replicate(timeout=86400, hwm="1T")  # no cut but the one asked for below
        base = [vm(x) for x in p.pids]
        buf = os.urandom(MiB)
        st0 = p.c1.status()
        t0 = time.monotonic()
        per_file = 256
        left, i = a.rss_mib, 0
        while left > 0:
            n = min(per_file, left)
            overwrite(p.m1 / f"big{i}", n, buf, create=True)
            left -= n
            i += 1
        t_write = time.monotonic() - t0
        st1 = p.c1.status()
        if st1["last_cut_delta_set"] != st0["last_cut_delta_set"]:
            log(f"  NOTE: {st1['last_cut_delta_set'] - st0['last_cut_delta_set']} cut(s) "
                "happened while writing: the delta set is not one")
        blocks = st1["current_delta_set_blocks"]
        t1 = time.monotonic()
        admin(p.m1, "replicate", "deltaset", "--no-wait")
        caught = rpb.wait_caught_up(p, a.rss_limit)
        t_through = time.monotonic() - t1
        if caught is None:
            raise RuntimeError(f"the {fsb._size(a.rss_mib)} delta set was not played within "
                               f"{a.rss_limit:.0f} s")
        end = [vm(x) for x in p.pids]
        raw.update(blocks=blocks, write_s=t_write, through_s=t_through, before=base, after=end)
        log(f"  wrote {a.rss_mib} MiB in {t_write:.1f} s ({blocks} blocks in one delta set), "
            f"cut, sent and played in {t_through:.1f} s; VmHWM primary "
            f"{base[0]['VmHWM'] / MiB:.0f} -> {end[0]['VmHWM'] / MiB:.0f} MiB, secondary "
            f"{base[1]['VmHWM'] / MiB:.0f} -> {end[1]['VmHWM'] / MiB:.0f} MiB")
        for i, ((k, t, u, kd, g), b, e) in enumerate(zip(keys, base, end)):
            rows.append(Row("rss", k, t, u, kind=kd, target=g, value=e["VmHWM"],
                            base=b["VmHWM"], base_note="before", higher_better=False,
                            note="" if i else f"one delta set of {blocks} blocks, played "
                            f"{t_through:.0f} s after the cut"))
    finally:
        done_pair(p)


# ----------------------------------------------------------------------------- main

def git_commit() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return "?"
    d = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "-uno", "--", "repfs"],
                       capture_output=True, text=True).stdout.strip().splitlines()
    return r.stdout.strip() + (f" + uncommitted changes in {len(d)} file(s) under repfs/"
                               if d else "")


# ----------------------------------------------------------------------------- rcp (issue 9)

def sec_rcp(root: Path, a, rows: list[Row], raw: dict) -> None:
    """tools/bench/rcp.py in a child process (it makes and removes its own namespaces, sites
    and proxies; its output goes to this log), its table turned into rows."""
    out = root / "rcp.json"
    cmd = [sys.executable, str(HERE / "rcp.py"), *(["--quick"] if a.quick else []),
           "--tmpdir", str(root), "--json", str(out)]
    c = subprocess.Popen(cmd)
    _children.append(c)
    rc = c.wait()
    _children.remove(c)
    res = json.loads(out.read_text())
    raw.update(res)
    for title, value, ratio, target, unit in res.get("table", []):
        key = "rcp_" + "".join(ch if ch.isalnum() else "_" for ch in title.lower())[:40]
        if title.startswith(tuple(f"{s}: ERROR" for s in ("tput", "wan", "lag", "copy"))):
            rows.append(Row("rcp", key, title.split(":")[0], "", kind="info", error=title))
        elif isinstance(target, float):
            rows.append(Row("rcp", key, title, unit, kind="ratio>=", target=target,
                            value=value, base=value / ratio if ratio else None))
        elif target == "<= 1.05":
            rows.append(Row("rcp", key, title, "x", kind="max", target=1.05, value=value))
        elif target == "< 1.0 (faster)":
            rows.append(Row("rcp", key, title + ": time / rsync's", "x", kind="lt",
                            target=1.0, value=ratio))
        elif title.startswith("lag"):
            rows.append(Row("rcp", key, title.replace(": median / max", ", median"), "s",
                            kind="info", value=value, note=f"max {ratio} s"))
        else:
            rows.append(Row("rcp", key, title, unit, kind="info", value=value))
    if rc != 0:
        raise RuntimeError(f"rcp.py exited {rc} (see its output above)")


# ----------------------------------------------------------------------------- recovery (issue 10)

def sec_recovery(root: Path, a, rows: list[Row], raw: dict) -> None:
    """tools/bench/recovery.py in a child process (its own sites; its output goes to this
    log), its table turned into rows."""
    out = root / "recovery.json"
    cmd = [sys.executable, str(HERE / "recovery.py"), *(["--quick"] if a.quick else []),
           "--tmpdir", str(root), "--json", str(out)]
    c = subprocess.Popen(cmd)
    _children.append(c)
    rc = c.wait()
    _children.remove(c)
    res = json.loads(out.read_text())
    raw.update(res)
    for title, value, ratio, target, unit in res.get("table", []):
        key = "recovery_" + "".join(ch if ch.isalnum() else "_" for ch in title.lower())[:40]
        if value is None:
            rows.append(Row("recovery", key, title.split(":")[0], "", kind="info", error=title))
        elif target == "<= 1.05":
            rows.append(Row("recovery", key, title, "x", kind="max", target=1.05, value=value))
        elif target == ">= 10":
            rows.append(Row("recovery", key, title, "x", kind="ratio>=", target=10.0,
                            value=value, base=1.0))
        elif target == "< 1":  # (seconds, shown in ms)
            rows.append(Row("recovery", key, title, "ms", kind="lt", target=1000.0,
                            value=value * 1000,
                            note=f"{ratio:.2f}x the first size's" if ratio else ""))
        elif unit == "s" and value < 10:
            rows.append(Row("recovery", key, title, "ms", kind="info", value=value * 1000))
        else:
            rows.append(Row("recovery", key, title, unit, kind="info", value=value))
    if rc != 0:
        raise RuntimeError(f"recovery.py exited {rc} (see its output above)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sections: " + ", ".join(SECTIONS) + ". See "
                                "tools/bench/README.md for every row.")
    p.add_argument("--quick", action="store_true", help="2-3 minutes: smaller sizes, one "
                   "round, a 1 GiB delta set for the RSS row")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated subset of " + ",".join(SECTIONS + EXTRA_SECTIONS)
                   + " (rcp and recovery only when named)")
    p.add_argument("--rounds", type=int, help="rounds of the throughput comparisons and "
                   "of the stall runs (median; default 2, --quick 1)")
    p.add_argument("--rss-mib", type=int, help="size of the delta set for the RSS row in MiB "
                   "(default 4096, --quick 1024)")
    p.add_argument("--tmpdir", help="where to make the temp directory (default $TMPDIR or "
                   "/tmp); everything runs on the file system holding it")
    p.add_argument("--json", help="also write every row and raw number to this file")
    a = p.parse_args(argv)
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    for x in only:
        if x not in SECTIONS + EXTRA_SECTIONS:
            p.error(f"unknown section {x!r} (choose from "
                    f"{', '.join(SECTIONS + EXTRA_SECTIONS)})")
    if a.rounds is not None and a.rounds < 1:
        p.error("--rounds must be at least 1")
    if a.rss_mib is not None and a.rss_mib < 1:
        p.error("--rss-mib must be at least 1")
    q = a.quick
    for k, full, quick in (("rounds", 2, 1), ("rss_mib", 4096, 1024)):
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    a.site_size = "4G"
    a.settle = 1.0 if q else 2.0
    a.snap_mib, a.rand_mib = (512, 64) if q else (2048, 256)
    a.fio_runtime = 5 if q else 20
    a.repl_mib = 512 if q else 2048
    a.drain_limit = 120.0 if q else 300.0
    a.seq_mib, a.fio_mib, a.files = (128, 64, 1000) if q else (1024, 256, 10000)
    a.stall_s, a.stall_warmup = (10.0, 2.0) if q else (30.0, 3.0)
    a.load_threads, a.load_span_mib, a.load_fsync_every = 3, 128, 16
    a.rss_limit = 600.0 if q else 1800.0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not shutil.which("fio") or not shutil.which("fusermount3"):
        log("matrix.py: needs fio and fusermount3 on PATH")
        return 2
    root = Path(tempfile.mkdtemp(prefix="repfs-matrix-", dir=a.tmpdir)).resolve()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    head = [f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}",
            f"cwd:     {os.getcwd()}", f"date:    {started}", *fsb.machine(),
            f"tmpdir:  {root}: {fsb.fs_of(root)}",
            f"load:    {fsb.loadavg()} (1/5/15 min load average at the start)",
            f"commit:  {git_commit()}", f"repfs:   {fsb.repfs_source()}",
            f"sizes:   rounds {a.rounds}; snap {a.snap_mib} MiB seq + {a.rand_mib} MiB fio "
            f"<= {a.fio_runtime} s; repl {a.repl_mib} MiB; small I/O seq {a.seq_mib} MiB, fio "
            f"{a.fio_mib} MiB, {a.files} files; stall {a.stall_s:.0f} s under {a.load_threads}"
            f" writers; rss delta set {fsb._size(a.rss_mib)}"]
    for line in head:
        log(line)
    if os.geteuid() != 0:
        log("WARNING: not root: caches cannot be dropped, the cold read is cache-warm")

    rows: list[Row] = []
    raw: dict = {}
    fns = {"snap": (sec_snap, SNAP_ROWS), "repl": (sec_repl, REPL_ROWS),
           "smallio": (sec_smallio, SMALL_ROWS), "stall": (sec_stall, STALL_ROWS),
           "rss": (sec_rss, None), "rcp": (sec_rcp, [("rcp_run", "rcp.py", "", "info", None)]),
           "recovery": (sec_recovery, [("recovery_run", "recovery.py", "", "info", None)])}
    interrupted = False
    try:
        for name in SECTIONS + EXTRA_SECTIONS:
            if name not in only:
                continue
            fn, keys = fns[name]
            log(f"\n== {name} ==  ({time.strftime('%H:%M:%S')}, load average {fsb.loadavg()})")
            t0 = time.monotonic()
            try:
                fn(root, a, rows, raw.setdefault(name, {}))
            except Exception as e:  # noqa: BLE001 - one failed section must not stop the run
                log(f"  {name} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stdout)
                failed_rows(rows, name, keys or rss_rows(a), e)
                raw[name]["_error"] = f"{type(e).__name__}: {e}"
            finally:
                cleanup_all(root)
            log(f"  ({name}: {time.monotonic() - t0:.0f} s)")
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: tearing down")
    finally:
        cleanup_all(root)
        shutil.rmtree(root, ignore_errors=True)

    log("\n== issue 8 matrix (ratios are measured / baseline, both from this run) ==")
    log(table(rows))
    seen = set()
    for r in rows:  # one line per distinct error of a section
        if r.error and (r.section, r.error) not in seen:
            seen.add((r.section, r.error))
            log(f"  {r.section}: {r.error}")
    for r in rows:
        if r.note and not r.error:
            log(f"  {r.key}: {r.note}")
    log("  bytes written per byte: write_bytes of the daemon's /proc/PID/io over the run / "
        "bytes the application wrote")
    log("  stall rows: lower is better; the writer's stall at a cut is the probe's longest write "
        "from 50 ms before to 500 ms\n  after each cut, the baseline the same over windows every "
        "0.5 s under the same load without replication")
    if fsb._caches_warm:
        log("  NOTE: caches could not be dropped; reads are cache-warm")
    log(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S %Z')} (started {started}); load "
        f"average now {fsb.loadavg()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": getattr(sys, "orig_argv", sys.argv), "date": started,
                       "header": head, "args": vars(a), "rows": [r.as_json() for r in rows],
                       "raw": raw}, f, indent=1, default=str)
    if interrupted:
        return 130
    return 1 if any(r.error and not r.error.startswith("skipped") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
