"""Replication benchmark: what local replication costs the primary, and how far behind it runs.

Run from the repository root:

    .venv/bin/python tools/bench/repl.py [--quick] [--json FILE]

Three measurements, each on fresh sites (`repfs mkfs S1/S2 --size 4G`, `repfs mount`), both
sites mounted in every case, so that the only difference is whether replication runs:

  1. throughput  1 MiB writes + fsync into several files on the primary's mount, first on a
                 site pair with no replication, then on a pair where `replicate start --to S2`
                 ran (default policy: a cut every 5 s or 64 MiB). Alternating rounds; MiB/s and
                 the ratio replicating / not (the target is >= 0.8x).
  2. cut stall   a writer doing 4 KiB writes in a tight loop (no fsync), timing every write,
                 while the primary cuts a delta set every ~0.5 s (`replicate policy --timeout
                 0.5`); the same writer on a pair with no replication is the baseline. Prints
                 the write latency p50/p99/max, the largest gap between writes, the daemon's own
                 `cut_stall_ms`, and the writer's stall at each cut (the longest write that
                 ended within 30 ms of the cut, cut times taken from the daemon log's "delta set
                 N ready ... (X s after the cut)" lines). The target is a stall under 50 ms.
  3. lag         a paced writer (1 MiB writes, 20 MiB/s) for 30 s, with the default policy and
                 with `--timeout 1`; `status` is sampled every second (over the control port,
                 not a new repfs-admin process each time) for destinations[0].lag_seconds,
                 last_cut / acked / played delta set, the chunk area and flow control; then
                 how long the secondary takes to catch up after the writer stops.

Nothing here asserts on time (DESIGN.md, "Performance rules"). All mounts are taken down
(`repfs umount`, and in any case `fusermount3 -u -z` on every mount point still mounted),
daemons we started are stopped, and the temp directory is removed, also on failure, Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import json
import os
import platform
import re
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
from datetime import datetime
from pathlib import Path
from common import mounted, lazy_unmount, pid_alive, wait_gone, kill_pid, log, tool  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10

# ----------------------------------------------------------------------------- utilities






def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
    return r












def pct(values, p: float):
    """Nearest-rank percentile of a list (None when empty)."""
    if not len(values):
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def f1(v, unit="") -> str:
    return "-" if v is None else f"{v:.1f}{unit}"


def f2(v, unit="") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def machine() -> list[str]:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import pyfuse3  # noqa: PLC0415
        pyfuse = pyfuse3.__version__
    except Exception:  # noqa: BLE001
        pyfuse = "?"
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return [f"machine: nproc {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {cpu}, "
            f"RAM {mem}",
            f"kernel:  {platform.system()} {platform.release()}",
            f"python:  {platform.python_implementation()} {platform.python_version()} "
            f"({sys.executable}), pyfuse3 {pyfuse}"]


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def fs_of(path: Path) -> str:
    r = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    if len(lines) >= 2:
        f = lines[-1].split()
        return f"{f[1]} on {f[0]}"
    return "?"


# ----------------------------------------------------------------------------- site pairs

class Control:
    """GET /v1/status on a daemon's control port (cheaper than a repfs-admin process per
    sample; it returns the same document as `repfs-admin --json status`)."""

    def __init__(self, site: Path):
        c = json.loads((site / "control.json").read_text())
        self.addr = (c["host"], int(c["port"]))
        self.token = (site / "control.token").read_text().strip()

    def status(self) -> dict:
        conn = http.client.HTTPConnection(*self.addr, timeout=30)
        try:
            conn.request("GET", "/v1/status", headers={"Authorization": f"Bearer {self.token}"})
            r = conn.getresponse()
            body = r.read()
        finally:
            conn.close()
        if r.status != 200:
            raise RuntimeError(f"status: HTTP {r.status}: {body[:200]!r}")
        return json.loads(body)


class Pair:
    """Two fresh sites S1, S2 made and mounted; `replicate()` makes S2 S1's secondary."""

    all: list["Pair"] = []

    def __init__(self, root: Path, tag: str, size: str):
        self.dir = root / tag
        self.dir.mkdir()
        self.s1, self.s2 = self.dir / "S1", self.dir / "S2"
        self.m1, self.m2 = self.dir / "M1", self.dir / "M2"
        self.size = size
        self.pids: list[int] = []
        self.replicating = False
        Pair.all.append(self)

    def up(self) -> None:
        repfs = tool("repfs")
        for s, m in ((self.s1, self.m1), (self.s2, self.m2)):
            run([repfs, "mkfs", s, "--size", self.size])
            m.mkdir()
            run([repfs, "mount", s, m], timeout=120)
            self.pids.append(int((s / "repfs.pid").read_text().split()[0]))
        self.c1 = Control(self.s1)

    def admin(self, *args, timeout=600) -> str:
        return run([tool("repfs-admin"), "--site", self.m1, *args], timeout=timeout).stdout

    def replicate(self, timeout: float | None = None, hwm: str | None = None) -> float:
        """Start replication to S2 (waits for the initial copy); returns its duration."""
        t0 = time.monotonic()
        self.admin("replicate", "start", "--to", self.s2)
        dt = time.monotonic() - t0
        self.replicating = True
        pol = []
        if timeout is not None:
            pol += ["--timeout", str(timeout)]
        if hwm is not None:
            pol += ["--hwm", hwm]
        if pol:
            self.admin("replicate", "policy", *pol)
        return dt

    @property
    def pid1(self) -> int:
        return self.pids[0]

    def down(self) -> None:
        """Clean unmount (primary first), else lazy unmount and stop the daemon."""
        repfs = tool("repfs")
        for m, pid in zip((self.m1, self.m2), self.pids):
            if mounted(m):
                r = subprocess.run([repfs, "umount", str(m), "--timeout", "180"],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    log(f"  ({m}: repfs umount failed: {(r.stderr or r.stdout).strip()}; "
                        "lazy unmount)")
            lazy_unmount(m)
            if not wait_gone(pid, 60):
                kill_pid(pid)

    def cleanup(self) -> None:
        for m in (self.m1, self.m2):
            lazy_unmount(m)
        for pid in self.pids:
            if pid_alive(pid):
                kill_pid(pid)
        shutil.rmtree(self.dir, ignore_errors=True)


def fresh_pair(root: Path, tag: str, size: str) -> Pair:
    p = Pair(root, tag, size)
    p.up()
    return p


def dest(st: dict) -> dict:
    return (st.get("destinations") or [{}])[0]


def wait_caught_up(pair: Pair, limit: float) -> float | None:
    """Seconds until the secondary has played every change (lag 0, nothing accumulating);
    None if it did not within `limit`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        st = pair.c1.status()
        d = dest(st)
        if (st.get("current_delta_set_blocks") == 0 and d.get("lag_seconds") == 0.0
                and d.get("played_delta_set") == st.get("last_cut_delta_set")):
            return time.monotonic() - t0
        time.sleep(0.2)
    return None


# ----------------------------------------------------------------------------- log parsing

_READY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \d+ INFO repfs\.repl\.deltaset: "
                    r"delta set (\d+) ready: (\d+) blocks in (\d+) chunks \(([\d.]+) s after the cut\)")


def cuts_from_log(site: Path) -> list[dict]:
    """The cuts the daemon logged: wall-clock time the cut ended (the ready time minus the
    copy time, ~10 ms precision), delta-set number and blocks."""
    out = []
    try:
        text = (site / "repfs.log").read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = _READY.match(line)
        if not m:
            continue
        ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.append({"n": int(m.group(2)), "blocks": int(m.group(3)),
                    "copy_s": float(m.group(5)), "cut_end": ts - float(m.group(5))})
    return out


# ----------------------------------------------------------------------------- 1. throughput

def write_files(d: Path, files: int, mib_each: int, buf: bytes) -> float:
    """1 MiB writes, fsync and close per file; MiB/s over the whole run."""
    t0 = time.perf_counter()
    for i in range(files):
        fd = os.open(d / f"w{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            for _ in range(mib_each):
                mv = memoryview(buf)
                while mv:
                    mv = mv[os.write(fd, mv):]
            os.fsync(fd)
        finally:
            os.close(fd)
    return files * mib_each / (time.perf_counter() - t0)


def bench_throughput(root: Path, a, out: dict) -> None:
    log(f"\n(load average {loadavg()})")
    log(f"\n== 1. write throughput: {a.tp_files} files x {a.tp_mib // a.tp_files} MiB, 1 MiB "
        f"writes + fsync per file, {a.rounds} round(s), fresh sites each run ==")
    buf = os.urandom(MiB)
    rows = out.setdefault("rounds", [])
    for r in range(a.rounds):
        row = {}
        for mode in ("plain", "repl"):
            p = fresh_pair(root, f"tp{r}-{mode}", a.site_size)
            try:
                if mode == "repl":
                    row["initial_copy_s"] = p.replicate()
                c0 = [cpu_s(x) for x in p.pids]
                rate = write_files(p.m1, a.tp_files, a.tp_mib // a.tp_files, buf)
                c1 = [cpu_s(x) for x in p.pids]
                row[mode] = rate
                row[mode + "_cpu_s"] = [b - a_ for a_, b in zip(c0, c1)]
                if mode == "repl":
                    st = p.c1.status()
                    row["cuts_during"] = st["last_cut_delta_set"] - 1
                    row["stall"] = st["cut_stall_ms"]
                    row["flow_control_at_end"] = st["flow_control"]
                    row["catch_up_s"] = wait_caught_up(p, a.drain_limit)
                    st = p.c1.status()
                    row["delta_sets"] = st["last_cut_delta_set"] - 1
                log(f"  round {r + 1} {mode:5s}: {rate:7.1f} MiB/s; daemon CPU while writing: "
                    f"primary {row[mode + '_cpu_s'][0]:.1f} s, secondary "
                    f"{row[mode + '_cpu_s'][1]:.1f} s" + (
                    f"  ({row['cuts_during']} cuts while writing; secondary caught up "
                    f"{f1(row['catch_up_s'], ' s')} after the writer finished; daemon "
                    f"cut_stall_ms p50 {row['stall']['p50']} p99 {row['stall']['p99']})"
                    if mode == "repl" else ""))
            finally:
                p.down()
                p.cleanup()
        row["ratio"] = row["repl"] / row["plain"]
        rows.append(row)


# ----------------------------------------------------------------------------- 2. cut stall

def small_writer(path: Path, seconds: float, span_mib: int):
    """4 KiB pwrites at increasing offsets (wrapping at span_mib, so later passes overwrite
    blocks, some not yet copied into a delta set: the priority copy), timing each one."""
    buf = os.urandom(4 * KiB)
    wrap = span_mib * MiB
    lat = []
    ends = []
    pc = time.perf_counter
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    wall0, pc0 = time.time(), pc()
    off = 0
    try:
        stop = pc0 + seconds
        t = pc0
        while t < stop:
            t0 = t
            os.pwrite(fd, buf, off)
            t = pc()
            lat.append(t - t0)
            ends.append(t)
            off += 4 * KiB
            if off >= wrap:
                off = 0
    finally:
        os.close(fd)
    return lat, ends, wall0 - pc0, off


def stall_stats(lat, ends, elapsed) -> dict:
    lat_ms = [x * 1000 for x in lat]
    gaps = [(b - a) * 1000 for a, b in zip(ends, ends[1:])]
    return {"writes": len(lat), "rate_per_s": len(lat) / elapsed,
            "p50_ms": pct(lat_ms, 50), "p99_ms": pct(lat_ms, 99), "p999_ms": pct(lat_ms, 99.9),
            "max_ms": max(lat_ms) if lat_ms else None,
            "max_gap_ms": max(gaps) if gaps else None,
            "over_50ms": sum(1 for x in lat_ms if x > 50),
            "over_10ms": sum(1 for x in lat_ms if x > 10)}


def bench_stall(root: Path, a, out: dict) -> None:
    log(f"\n(load average {loadavg()})")
    log(f"\n== 2. writer stall at a cut: 4 KiB pwrite loop (no fsync, wrapping at "
        f"{a.stall_span_mib} MiB) for {a.stall_s:.0f} s; replicating pair with policy "
        f"--timeout {a.stall_timeout} ==")
    for mode in ("plain", "repl"):
        p = fresh_pair(root, f"stall-{mode}", a.site_size)
        try:
            if mode == "repl":
                p.replicate(timeout=a.stall_timeout)
                before = p.c1.status()
            t0 = time.monotonic()
            lat, ends, offset, _ = small_writer(p.m1 / "small", a.stall_s, a.stall_span_mib)
            elapsed = time.monotonic() - t0
            s = stall_stats(lat, ends, elapsed)
            if mode == "repl":
                st = p.c1.status()
                s["daemon_cut_stall_ms"] = st["cut_stall_ms"]
                s["cuts_status"] = st["last_cut_delta_set"] - before["last_cut_delta_set"]
                time.sleep(1.0)  # let the last copy finish and be logged
                w0, w1 = ends[0] - lat[0] + offset, ends[-1] + offset
                cuts = [c for c in cuts_from_log(p.s1) if w0 <= c["cut_end"] <= w1 + 0.05]
                s["cuts_logged"] = len(cuts)
                s["cut_blocks_p50"] = pct([c["blocks"] for c in cuts], 50)
                s["copy_s_p50"] = pct([c["copy_s"] for c in cuts], 50)
                s["copy_s_max"] = max((c["copy_s"] for c in cuts), default=None)
                if len(cuts) > 1:
                    iv = [b["cut_end"] - x["cut_end"] for x, b in zip(cuts, cuts[1:])]
                    s["cut_interval_s_p50"] = pct(iv, 50)
                # the writer's stall at each cut: the longest write that ended within 30 ms of
                # the cut's end (the gate opens when the cut is done)
                wall_ends = [e + offset for e in ends]
                per_cut = []
                for c in cuts:
                    i = bisect.bisect_left(wall_ends, c["cut_end"] - 0.03)
                    j = bisect.bisect_right(wall_ends, c["cut_end"] + 0.03)
                    if j > i:
                        per_cut.append(max(lat[i:j]) * 1000)
                s["writer_stall_per_cut_ms"] = {"p50": pct(per_cut, 50), "p99": pct(per_cut, 99),
                                                "max": max(per_cut) if per_cut else None,
                                                "cuts": len(per_cut)}
                # how many of the slow writes are at a cut
                slow = [k for k, x in enumerate(lat) if x > 0.02]
                near = 0
                cut_ends = sorted(c["cut_end"] for c in cuts)
                for k in slow:
                    e = wall_ends[k]
                    q = bisect.bisect_left(cut_ends, e - 0.03)
                    if q < len(cut_ends) and cut_ends[q] <= e + 0.03:
                        near += 1
                s["slow_20ms"] = len(slow)
                s["slow_20ms_at_cut"] = near
            out[mode] = s
            log(f"  {mode:5s}: {s['writes']} writes ({s['rate_per_s']:.0f}/s), latency p50 "
                f"{f2(s['p50_ms'])} ms, p99 {f2(s['p99_ms'])} ms, max {f1(s['max_ms'])} ms, "
                f"max gap {f1(s['max_gap_ms'])} ms"
                + (f"; {s['cuts_status']} cuts" if mode == "repl" else ""))
        finally:
            p.down()
            p.cleanup()


# ----------------------------------------------------------------------------- 3. lag

class Sampler(threading.Thread):
    def __init__(self, pair: Pair, every: float):
        super().__init__(daemon=True)
        self.pair, self.every = pair, every
        self.samples: list[dict] = []
        self.stop_ev = threading.Event()
        self.errors = 0

    def run(self):
        t0 = time.monotonic()
        nxt = t0
        while not self.stop_ev.is_set():
            try:
                st = self.pair.c1.status()
                d = dest(st)
                self.samples.append({
                    "t": time.monotonic() - t0, "lag": d.get("lag_seconds"),
                    "cut": st["last_cut_delta_set"], "acked": d.get("acked_delta_set"),
                    "played": d.get("played_delta_set"),
                    "cur_blocks": st["current_delta_set_blocks"],
                    "chunk_area": st["chunk_area_bytes"], "flow": st["flow_control"],
                    "send_rate": st["send_rate_bytes_per_s"]})
            except Exception:  # noqa: BLE001
                self.errors += 1
            nxt += self.every
            self.stop_ev.wait(max(0.0, nxt - time.monotonic()))


def paced_writer(d: Path, rate_mib: float, seconds: float, buf: bytes) -> dict:
    """1 MiB writes on a fixed schedule (rate_mib per second), a new file every 64 MiB."""
    interval = 1.0 / rate_mib
    t0 = time.monotonic()
    n = 0
    late = 0.0
    fd = -1
    try:
        while True:
            due = t0 + n * interval
            if due - t0 >= seconds:
                break
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                late = max(late, now - due)
            if n % 64 == 0:
                if fd >= 0:
                    os.close(fd)
                fd = os.open(d / f"lag{n // 64}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                             | os.O_CLOEXEC, 0o644)
            mv = memoryview(buf)
            while mv:
                mv = mv[os.write(fd, mv):]
            n += 1
    finally:
        if fd >= 0:
            os.close(fd)
    dt = time.monotonic() - t0
    return {"mib": n, "seconds": dt, "achieved_mib_s": n / dt, "max_behind_s": late}


def bench_lag(root: Path, a, out: dict) -> None:
    log(f"\n(load average {loadavg()})")
    log(f"\n== 3. steady-state lag: paced writer {a.lag_rate} MiB/s (1 MiB writes, no fsync) "
        f"for {a.lag_s:.0f} s; status sampled every 1 s ==")
    buf = os.urandom(MiB)
    for label, timeout in (("default (5 s / 64 MiB)", None), ("--timeout 1", 1.0)):
        p = fresh_pair(root, "lag-" + ("default" if timeout is None else f"t{timeout:g}"),
                       a.site_size)
        try:
            p.replicate(timeout=timeout)
            base = p.c1.status()["last_cut_delta_set"]
            sm = Sampler(p, 1.0)
            sm.start()
            w = paced_writer(p.m1, a.lag_rate, a.lag_s, buf)
            t_end = sm.samples[-1]["t"] if sm.samples else 0.0
            catch = wait_caught_up(p, a.drain_limit)
            sm.stop_ev.set()
            sm.join()
            during = [s for s in sm.samples if s["t"] <= t_end + 0.01]
            lags = [s["lag"] for s in during if s["lag"] is not None]
            backlog = [s["cut"] - s["played"] for s in during if s["played"] is not None]
            half = len(during) // 2
            # keeping up: the played delta set follows the cut one, the backlog (cut - played)
            # stays bounded, and it is not larger in the second half than in the first
            b1 = backlog[:half] or [0]
            b2 = backlog[half:] or [0]
            r = {"policy": label, "writer": w, "samples": len(during),
                 "lag_median_s": statistics.median(lags) if lags else None,
                 "lag_p90_s": pct(lags, 90), "lag_max_s": max(lags) if lags else None,
                 "cuts": (during[-1]["cut"] - base) if during else None,
                 "backlog_max": max(backlog) if backlog else None,
                 "backlog_mean_1st_half": statistics.mean(b1),
                 "backlog_mean_2nd_half": statistics.mean(b2),
                 "played_last": during[-1]["played"] if during else None,
                 "cut_last": during[-1]["cut"] if during else None,
                 "chunk_area_max_mib": max((s["chunk_area"] for s in during), default=0) / MiB,
                 "flow_control_seen": any(s["flow"] for s in during),
                 "send_rate_median_mib_s": (statistics.median([s["send_rate"] for s in during])
                                            / MiB) if during else None,
                 "catch_up_s": catch, "sampler_errors": sm.errors,
                 "stall": p.c1.status()["cut_stall_ms"],
                 "series": sm.samples}
            r["keeps_up"] = (catch is not None and r["backlog_max"] is not None
                             and r["backlog_max"] <= 3
                             and r["backlog_mean_2nd_half"] <= r["backlog_mean_1st_half"] + 1)
            out[label] = r
            log(f"  {label:22s}: writer {w['achieved_mib_s']:.1f} MiB/s; lag median "
                f"{f1(r['lag_median_s'], ' s')}, max {f1(r['lag_max_s'], ' s')}; {r['cuts']} cuts; "
                f"backlog (cut-played) max {r['backlog_max']}; caught up "
                f"{f1(catch, ' s')} after the writer stopped")
            log("    t(s) lag(s) cut played cur_blocks chunk_area(MiB) send(MiB/s)")
            for s in sm.samples:
                log(f"    {s['t']:4.0f} {f1(s['lag']):>6s} {s['cut']:3d} {s['played']!s:>6s} "
                    f"{s['cur_blocks']:10d} {s['chunk_area'] / MiB:15.1f} "
                    f"{s['send_rate'] / MiB:11.1f}{'  FLOW CONTROL' if s['flow'] else ''}")
        finally:
            p.down()
            p.cleanup()


# ----------------------------------------------------------------------------- report

def report(a, res: dict) -> None:
    log("\n" + "=" * 78)
    log("RESULTS")
    tp = res.get("throughput", {}).get("rounds", [])
    if tp:
        log(f"\n(1) write throughput on the primary, {a.tp_mib} MiB in {a.tp_files} files, "
            "1 MiB writes + fsync (MiB/s, higher is better)")
        log("  round   no replication   replicating   ratio   cuts   catch-up after writer"
            "   daemon CPU s while writing (primary+secondary): no repl / repl")
        for i, r in enumerate(tp):
            log(f"  {i + 1:5d}   {r['plain']:14.1f}   {r['repl']:11.1f}   {r['ratio']:5.2f}x"
                f"  {r.get('cuts_during', '-'):>5}   {f1(r.get('catch_up_s'), ' s'):>8s}"
                f"                {'+'.join(f'{x:.1f}' for x in r['plain_cpu_s'])} / "
                f"{'+'.join(f'{x:.1f}' for x in r['repl_cpu_s'])}")
        pl = statistics.median([r["plain"] for r in tp])
        rp = statistics.median([r["repl"] for r in tp])
        ratio = statistics.median([r["ratio"] for r in tp])
        log(f"  median  {pl:14.1f}   {rp:11.1f}   {ratio:5.2f}x   target >= 0.80x: "
            f"{'MET' if ratio >= 0.8 else 'MISSED'}")
        res["throughput"]["median_ratio"] = ratio
    st = res.get("stall", {})
    if st.get("repl"):
        r, b = st["repl"], st.get("plain", {})
        log(f"\n(2) writer stall at a cut: 4 KiB writes for {a.stall_s:.0f} s, policy --timeout "
            f"{a.stall_timeout} (ms, lower is better)")
        log("                          no replication   replicating")
        for k, lab in (("writes", "writes"), ("rate_per_s", "writes/s"),
                       ("p50_ms", "latency p50"), ("p99_ms", "latency p99"),
                       ("p999_ms", "latency p99.9"), ("max_ms", "latency max"),
                       ("max_gap_ms", "max gap between writes"), ("over_10ms", "writes > 10 ms"),
                       ("over_50ms", "writes > 50 ms")):
            bv, rv = b.get(k), r.get(k)
            fmt = (lambda v: "-" if v is None else (f"{v:.0f}" if k in ("writes", "rate_per_s",
                                                                        "over_10ms", "over_50ms")
                                                    else f"{v:.2f}"))
            log(f"  {lab:24s} {fmt(bv):>14s}   {fmt(rv):>11s}")
        d = r["daemon_cut_stall_ms"]
        w = r["writer_stall_per_cut_ms"]
        log(f"  cuts during the run: {r['cuts_status']} (status), {r['cuts_logged']} in the log; "
            f"median interval {f2(r.get('cut_interval_s_p50'), ' s')}, median "
            f"{r['cut_blocks_p50']} blocks per delta set, copy after the cut p50 "
            f"{f2(r['copy_s_p50'], ' s')} max {f2(r['copy_s_max'], ' s')}")
        log(f"  daemon cut_stall_ms:           p50 {d['p50']}  p99 {d['p99']}  (count {d['count']})")
        log(f"  writer's stall at each cut:    p50 {f1(w['p50'])}  p99 {f1(w['p99'])}  max "
            f"{f1(w['max'])}  ({w['cuts']} cuts matched)")
        log(f"  writes > 20 ms: {r['slow_20ms']}, of which {r['slow_20ms_at_cut']} ended within "
            "30 ms of a cut")
        def verdict(v):
            return "-" if v is None else ("met" if v < 50 else "MISSED")
        log(f"  target (stall < 50 ms): daemon p50 {verdict(d['p50'])}, p99 {verdict(d['p99'])}; "
            f"writer per cut p50 {verdict(w['p50'])}, p99 {verdict(w['p99'])}")
    lg = res.get("lag", {})
    if lg:
        log(f"\n(3) steady-state lag: {a.lag_rate} MiB/s for {a.lag_s:.0f} s (lag = "
            "destinations[0].lag_seconds, sampled every 1 s)")
        log("  policy                   writer MiB/s  lag median  lag max  cuts  backlog max  "
            "chunk area max  flow ctl  catch-up   keeps up  cut stall p50/p99 ms")
        for lab, r in lg.items():
            log(f"  {lab:24s} {r['writer']['achieved_mib_s']:12.1f}  {f1(r['lag_median_s'], ' s'):>10s}"
                f"  {f1(r['lag_max_s'], ' s'):>7s}  {r['cuts']!s:>4s}  {r['backlog_max']!s:>11s}"
                f"  {r['chunk_area_max_mib']:10.0f} MiB  {'yes' if r['flow_control_seen'] else 'no':>8s}"
                f"  {f1(r['catch_up_s'], ' s'):>8s}   {'yes' if r['keeps_up'] else 'NO':>8s}"
                f"  {r['stall']['p50']}/{r['stall']['p99']}")
        log("  backlog = last_cut_delta_set - destinations[0].played_delta_set; keeps up = caught "
            "up after the writer stopped, backlog <= 3 and not growing")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (about 1.5 minutes; full run 6-7 minutes)")
    p.add_argument("--only", default="throughput,stall,lag",
                   help="comma-separated subset of throughput,stall,lag")
    p.add_argument("--tmpdir", help="where to make the temp directory (default $TMPDIR or /tmp)")
    p.add_argument("--json", help="also write every number to this file")
    a = p.parse_args(argv)
    q = a.quick
    a.site_size = "4G"
    a.tp_mib, a.tp_files, a.rounds = (256, 4, 1) if q else (1024, 4, 3)
    a.stall_s, a.stall_timeout, a.stall_span_mib = (10.0 if q else 30.0), 0.5, 64
    a.lag_rate, a.lag_s = 20, (10.0 if q else 30.0)
    a.drain_limit = 60.0 if q else 120.0
    only = {x.strip() for x in a.only.split(",") if x.strip()}

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="repfs-replbench-", dir=a.tmpdir)).resolve()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    log(f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}")
    log(f"cwd:     {os.getcwd()}")
    log(f"date:    {started}")
    for line in machine():
        log(line)
    log(f"tmpdir:  {root}: {fs_of(root)}")
    log(f"load:    {loadavg()} (1/5/15 min load average at the start)")
    log(f"repfs:   {tool('repfs')}; sites {a.site_size} each, fresh pair per run")

    res: dict = {}
    failed = False
    try:
        for name, fn in (("throughput", bench_throughput), ("stall", bench_stall),
                         ("lag", bench_lag)):
            if name not in only:
                continue
            try:
                fn(root, a, res.setdefault(name, {}))
            except Exception as e:  # noqa: BLE001
                failed = True
                log(f"  {name} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stdout)
                res[name]["_error"] = str(e)
    finally:
        for pr in Pair.all:  # whatever happened: no mount or daemon of ours stays behind
            try:
                pr.cleanup()
            except Exception:  # noqa: BLE001
                traceback.print_exc(file=sys.stdout)
        for m in list(root.glob("*/M1")) + list(root.glob("*/M2")):
            lazy_unmount(m)
        shutil.rmtree(root, ignore_errors=True)

    try:
        report(a, res)
    except Exception:  # noqa: BLE001
        failed = True
        traceback.print_exc(file=sys.stdout)
    log(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S %Z')} (started {started}); "
        f"load average now {loadavg()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": getattr(sys, "orig_argv", sys.argv), "date": started,
                       "machine": machine(), "results": res}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
