"""Snapshot benchmark: create time, copy-on-write cost, delta L->M time.

Run from the repository root (as root, so page caches can be dropped for the cold delta):

    .venv/bin/python tools/bench/snap.py [--quick] [--tmpdir DIR] [--settle S]

Results and their reading: docs/performance-snapshots.md.

In one invocation it measures (issue 3, item 8; DESIGN.md "Performance rules"):

1. snapshot create time on a 1 GiB and on a 1 TiB sparse volume: through the real daemon
   (`repfs mkfs` + `repfs mount` + `repfs-admin --site MNT snapshot create NAME`, the whole
   command timed; and the same control request sent from this process, which leaves out the
   interpreter start of repfs-admin), and at the core level (fs.checkpoint() +
   store.create() on an unmounted site). Median and p95 over N creates each. Creation is
   O(1) in the volume size, so the 1 GiB and 1 TiB columns should match.
2. write throughput through the real mount with one active snapshot relative to none: a file
   is written and fsync'd, then overwritten in place with 1 MiB writes + fsync (a) with no
   snapshot (the baseline), (b) right after a snapshot (first writes: each block pays one
   copy into the save volume), (c) once more (rewrites of already-saved blocks: no copies),
   (d) once more after deleting the snapshot (a second baseline). Every pass starts after a
   sync and a short pause (--settle), so no pass pays for the previous one's disk writes.
   Daemon CPU per GiB is printed too: it is steadier than wall time on a shared machine.
   Targets: first writes >= 0.5x, rewrites >= 0.9x.
3. delta L->M time at the core level: a 2 GiB file system filled with ~1.5 GiB of file
   data; snapshot L, overwrite a random 0% / 1% / 10% of the file blocks in place, snapshot
   M, then consume layer.delta(L, M) fully (cold: page cache dropped; and warm), counting
   blocks. The time should scale with the changed blocks, not the volume; one extra row does
   1% on a 1 TiB sparse volume holding the same data.

Nothing here asserts on time. Mounts are always taken down (`repfs umount`, and in any case
`fusermount3 -u -z`), daemons we started are stopped, and the temp directory is removed,
also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from common import pid_alive, wait_gone, kill_pid, log, tool  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
BS = 4096




# ----------------------------------------------------------------------------- processes



def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
    return r










def drop_caches(warned=[False]) -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        if not warned[0]:
            log(f"WARNING: cannot drop caches ({e.strerror}); 'cold' numbers are cache-warm")
            warned[0] = True
        return False


class Mount:
    """A site made with `repfs mkfs` and mounted with `repfs mount` (the real daemon)."""

    all: list["Mount"] = []

    def __init__(self, root: Path, tag: str, size: str, *, writeback: bool = False):
        self.site = root / f"{tag}-site"
        self.dir = root / f"{tag}-mnt"
        self.size = size
        self.writeback = writeback
        self.pid: int | None = None
        self.pids: list[int] = []
        Mount.all.append(self)

    def mkfs(self) -> None:
        run([tool("repfs"), "mkfs", str(self.site), "--size", self.size])
        self.dir.mkdir(exist_ok=True)

    def mount(self) -> float:
        cmd = [tool("repfs"), "mount", str(self.site), str(self.dir)]
        if self.writeback:
            cmd.append("--writeback-cache")
        t0 = time.perf_counter()
        run(cmd, timeout=300)
        dt = time.perf_counter() - t0
        self.pid = int((self.site / "repfs.pid").read_text().split()[0])
        self.pids.append(self.pid)
        return dt

    def umount(self) -> None:
        if self.pid is None:
            return
        r = subprocess.run([tool("repfs"), "umount", str(self.dir), "--timeout", "300"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            log(f"  (repfs umount {self.dir} failed: {r.stderr.strip()}; lazy unmount)")
        self.cleanup_mount()
        self.pid = None

    def cleanup_mount(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.dir)], capture_output=True)
        for pid in self.pids:
            if pid_alive(pid) and not wait_gone(pid, 30):
                kill_pid(pid)

    def admin(self, *args: str) -> float:
        """Run repfs-admin against the mount point; wall time of the whole command."""
        cmd = [tool("repfs-admin"), "--site", str(self.dir), *args]
        t0 = time.perf_counter()
        run(cmd, timeout=600)
        return time.perf_counter() - t0

    def target(self):
        """The control port of this site's daemon, for requests from this process."""
        from repfs.cli.admin import Target
        from repfs.site import Site
        site = Site(self.site)
        addr = site.control_address()
        token = (site.path / "control.token").read_text().strip()
        return Target(site, addr, token)


# ----------------------------------------------------------------------------- statistics

def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def median(xs) -> float:
    return statistics.median(xs)


def p95(xs) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


def ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i])
                               for i, c in enumerate(r))
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows])


# ----------------------------------------------------------------------------- 1. create

def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_create(root: Path, n: int) -> list[list[str]]:
    """Both volumes are mounted at once and the creates alternate between them, so a load
    change on the machine hits both columns alike."""
    from repfs.cli.admin import call
    from repfs.site import Site
    tags = (("1G", "1GiB"), ("1T", "1TiB"))
    mounts = {}
    res = {tag: dict(cli=[], list=[], http=[], core=[], dcpu=0.0, ccpu=0.0) for _, tag in tags}
    for size, tag in tags:
        m = Mount(root, f"create-{tag}", size)
        m.mkfs()
        mt = m.mount()
        log(f"[create] {tag}: site made ({du(m.site)} on disk), mounted in {mt:.2f} s "
            f"(daemon pid {m.pid})")
        mounts[tag] = m
        for i in range(2):  # warm-up, not counted
            m.admin("snapshot", "create", f"warm-{i}")
    for i in range(n):
        for _, tag in tags:
            res[tag]["cli"].append(mounts[tag].admin("snapshot", "create", f"cli-{i}"))
            res[tag]["list"].append(mounts[tag].admin("snapshot", "list"))
    targets = {tag: mounts[tag].target() for _, tag in tags}
    for i in range(n):
        for _, tag in tags:
            m = mounts[tag]
            c0 = proc_cpu(m.pid)
            t0 = time.perf_counter()
            call(targets[tag], "POST", "/snapshots", {"name": f"http-{i}"})
            res[tag]["http"].append(time.perf_counter() - t0)
            res[tag]["dcpu"] += proc_cpu(m.pid) - c0
    for _, tag in tags:
        snaps = call(targets[tag], "GET", "/snapshots")
        assert len(snaps) == 2 + 2 * n, len(snaps)
        mounts[tag].umount()
    log(f"[create] {2 + 2 * n} snapshots on each via the daemon; core level next")
    sites, cores = {}, {}
    try:
        for _, tag in tags:
            site = Site(mounts[tag].site)
            site.lock()
            sites[tag] = site
            cores[tag] = site.open_fs()
        for i in range(n):
            for _, tag in tags:
                fs = cores[tag]
                store = snap_layer(fs.dev).store
                c0 = time.process_time()
                t0 = time.perf_counter()
                fs.checkpoint()
                store.create(f"core-{i}")
                res[tag]["core"].append(time.perf_counter() - t0)
                res[tag]["ccpu"] += time.process_time() - c0
    finally:
        for tag, fs in cores.items():
            fs.close()
            fs.dev.close()
        for site in sites.values():
            site.unlock()
    for _, tag in tags:
        log(f"[create] {tag}: done; site now {du(mounts[tag].site)} on disk")
        shutil.rmtree(mounts[tag].site, ignore_errors=True)
    rows = []
    labels = [("cli", "repfs-admin snapshot create (whole command)", None),
              ("list", "  for reference: repfs-admin snapshot list", None),
              ("http", "control request POST /v1/snapshots (daemon)", "dcpu"),
              ("core", "core: fs.checkpoint() + store.create()", "ccpu")]
    for key, label, cpu in labels:
        a, b = res["1GiB"][key], res["1TiB"][key]
        cpus = [ms(res[t][cpu] / n) if cpu else "-" for t in ("1GiB", "1TiB")]
        rows.append([label, ms(median(a)), ms(p95(a)), cpus[0], ms(median(b)), ms(p95(b)),
                     cpus[1], f"{median(b) / median(a):.2f}"])
    return rows


def snap_layer(dev):
    """The SnapLayer in the volume stack (site.open_fs().dev, or a layer under it: later
    issues stack more layers, e.g. the replication change log, on top)."""
    from repfs.snap.layer import SnapLayer
    d = dev
    while d is not None and not isinstance(d, SnapLayer):
        d = getattr(d, "lower", None)
    if d is None:
        raise RuntimeError(f"no SnapLayer under {type(dev).__name__}")
    return d


def du(path: Path) -> str:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return f"{total / MiB:.1f} MiB"


# ----------------------------------------------------------------------------- 2. COW writes

def overwrite(path: Path, size_mb: int, create: bool = False) -> float:
    """1 MiB writes over the file (in place; or a new file if create), then fsync; MiB/s
    including the fsync and the close."""
    buf = os.urandom(MiB)
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        for i in range(size_mb):
            mv = memoryview(buf)
            off = i * MiB
            while mv:
                k = os.pwrite(fd, mv, off)
                mv = mv[k:]
                off += k
        os.fsync(fd)
    finally:
        os.close(fd)
    return size_mb / (time.perf_counter() - t0)


def bench_cow(root: Path, size_mb: int, rounds: int, writeback: bool, settle: float) -> dict:
    from repfs.cli.admin import call
    tag = "cow-wb" if writeback else "cow"
    m = Mount(root, tag, f"{max(2, -(-size_mb * 3 // 1024))}G", writeback=writeback)
    m.mkfs()
    m.mount()
    mode = "--writeback-cache" if writeback else "default mount"
    try:
        t = m.target()
        f = m.dir / "big.dat"
        cpu = {"none": [], "first": [], "rewrite": [], "after": []}

        def timed(kind: str) -> float:
            os.sync()  # every pass starts from a quiet disk: nothing of the last one pending
            time.sleep(settle)
            c0 = proc_cpu(m.pid)
            rate = overwrite(f, size_mb)
            cpu[kind].append((proc_cpu(m.pid) - c0) / (size_mb / 1024))
            return rate

        fill = overwrite(f, size_mb, create=True)
        log(f"[cow {mode}] wrote a {size_mb} MiB file (new blocks): {fill:.1f} MiB/s")
        none, first, rewrite, after, saved = [], [], [], [], []
        for r in range(rounds):
            none.append(timed("none"))
            m.admin("snapshot", "create", f"s{r}")
            first.append(timed("first"))
            info = {s["name"]: s for s in call(t, "GET", "/snapshots")}[f"s{r}"]
            saved.append(info["saved_blocks"])
            rewrite.append(timed("rewrite"))
            info2 = {s["name"]: s for s in call(t, "GET", "/snapshots")}[f"s{r}"]
            if info2["saved_blocks"] != info["saved_blocks"]:
                log(f"  NOTE: the rewrite pass saved {info2['saved_blocks'] - info['saved_blocks']}"
                    " more before-images")
            m.admin("snapshot", "delete", f"s{r}")
            after.append(timed("after"))
            log(f"[cow {mode}] round {r + 1}/{rounds}: none {none[-1]:.1f}, first write "
                f"{first[-1]:.1f}, rewrite {rewrite[-1]:.1f}, none after delete "
                f"{after[-1]:.1f} MiB/s; daemon CPU s/GiB "
                f"{cpu['none'][-1]:.2f} / {cpu['first'][-1]:.2f} / {cpu['rewrite'][-1]:.2f}; "
                f"{saved[-1]} before-images saved (file has {size_mb * MiB // BS} blocks); "
                f"load {loadavg()}")
    finally:
        m.umount()
        shutil.rmtree(m.site, ignore_errors=True)
    return dict(mode=mode, fill=fill, none=none, first=first, rewrite=rewrite, after=after,
                saved=saved,
                blocks=size_mb * MiB // BS, cpu=cpu)


# ----------------------------------------------------------------------------- 3. delta

def bench_delta(root: Path, vol_bytes: int, data_bytes: int, fracs, seed: int,
                label: str) -> list[dict]:
    from repfs.site import Site
    path = root / f"delta-{label}"
    site = Site.create(path, vol_bytes)
    site.lock()
    out = []
    try:
        fs = site.open_fs()
        layer = snap_layer(fs.dev)
        store = layer.store
        try:
            file_mb = 128
            nfiles = max(1, data_bytes // (file_mb * MiB))
            inos = []
            buf = os.urandom(MiB)
            t0 = time.perf_counter()
            for k in range(nfiles):
                ino = fs.create(1, f"f{k:03d}".encode(), stat.S_IFREG | 0o644).ino
                inos.append(ino)
                for i in range(file_mb):
                    fs.write(ino, i * MiB, buf)
                    if fs.commit_due():
                        fs.commit()
            fs.checkpoint()
            dt = time.perf_counter() - t0
            fblocks = file_mb * MiB // BS
            total = nfiles * fblocks
            log(f"[delta {label}] filled {nfiles} x {file_mb} MiB = {total} file blocks "
                f"({total * BS / GiB:.2f} GiB) in {dt:.1f} s (core level)")
            rng = np.random.default_rng(seed)
            blk = os.urandom(BS)
            for j, frac in enumerate(fracs):
                L = store.create(f"L{j}")  # right after fs.checkpoint(): a consistency point
                k = int(round(total * frac))
                pick = np.sort(rng.choice(total, k, replace=False)) if k else np.empty(0, int)
                cow0 = layer.cow_blocks
                t0 = time.perf_counter()
                for g in pick.tolist():
                    fs.write(inos[g // fblocks], (g % fblocks) * BS, blk)
                    if fs.commit_due():
                        fs.commit()
                fs.checkpoint()
                wdt = time.perf_counter() - t0
                M = store.create(f"M{j}")
                cold = drop_caches()
                t0 = time.perf_counter()
                nb = ne = nbytes = 0
                for (s, c), data in layer.delta(L, M):
                    nb += c
                    ne += 1
                    nbytes += len(data)
                cold_dt = time.perf_counter() - t0
                c0 = time.process_time()
                t0 = time.perf_counter()
                nb2 = 0
                for (s, c), data in layer.delta(L, M):
                    nb2 += c
                warm_dt = time.perf_counter() - t0
                warm_cpu = time.process_time() - c0
                t0 = time.perf_counter()
                nb3 = 0
                for (s, c), data in layer.delta(L, None):
                    nb3 += c
                live_dt = time.perf_counter() - t0
                assert nb == nb2 == nb3 == nbytes // BS, (nb, nb2, nb3, nbytes)
                row = dict(label=label, frac=frac, written=k, cow=layer.cow_blocks - cow0,
                           write_s=wdt, blocks=nb, extents=ne, cold=cold_dt if cold else None,
                           warm=warm_dt, warm_cpu=warm_cpu, live=live_dt, pages=len(store.bit_pages(L)))
                out.append(row)
                log(f"[delta {label}] {frac:.0%}: wrote {k} blocks in {wdt:.1f} s "
                    f"({row['cow']} copied); delta L->M {nb} blocks in {ne} extents: "
                    f"cold {cold_dt:.3f} s, warm {warm_dt:.3f} s, L->live {live_dt:.3f} s")
                layer.delete(L)
                layer.delete(M)
        finally:
            fs.close()
            fs.dev.close()
    finally:
        site.unlock()
        shutil.rmtree(path, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- main

def machine() -> list[str]:
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
    return [f"nproc {os.cpu_count()} ({cpu}), RAM {mem}",
            f"kernel {platform.release()} ({platform.machine()})",
            f"python {platform.python_version()} ({sys.executable})"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 5 creates, 64 MiB file x 1 round, 384 MiB of delta data")
    p.add_argument("--tmpdir", default=None, help="where the temp directory goes")
    p.add_argument("--creates", type=int, default=None, help="creates per volume (20)")
    p.add_argument("--size-mb", type=int, default=None, help="COW file size (512)")
    p.add_argument("--rounds", type=int, default=None, help="COW rounds (3)")
    p.add_argument("--settle", type=float, default=None,
                   help="seconds to wait (after a sync) before each timed COW pass (5)")
    p.add_argument("--no-wbcache", action="store_true",
                   help="skip the COW run on a --writeback-cache mount")
    a = p.parse_args(argv)
    n_create = a.creates or (5 if a.quick else 20)
    size_mb = a.size_mb or (64 if a.quick else 512)
    rounds = a.rounds or (1 if a.quick else 3)
    settle = a.settle if a.settle is not None else (1.0 if a.quick else 5.0)
    vol, data = (512 * MiB, 384 * MiB) if a.quick else (2 * GiB, 1536 * MiB)
    fracs = (0.0, 0.01, 0.10)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    log("repfs snapshot benchmark")
    log("command: " + shlex.join([sys.executable] + sys.argv))
    log("date:    " + time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    for line in machine():
        log("machine: " + line)
    root = Path(tempfile.mkdtemp(prefix="repfs-snapbench-", dir=a.tmpdir)).resolve()
    st = os.statvfs(root)
    log(f"temp:    {root} ({st.f_bavail * st.f_frsize / GiB:.0f} GiB free)")
    log(f"load:    {loadavg()} (1/5/15 min; anything else running skews the numbers)")
    log()
    status = 0
    sections = []
    try:
        # 1
        rows = bench_create(root, n_create)
        sections.append((f"1. snapshot create, ms (n={n_create} each, idle file system; cpu = mean CPU ms "
                         "per create: the daemon's for the control request, this process's "
                         "for the core)",
                         table(["", "1GiB med", "1GiB p95", "1GiB cpu", "1TiB med", "1TiB p95",
                                "1TiB cpu", "1TiB/1GiB med"], rows)))
        log(f"[load {loadavg()}]")
        log()
        # 2
        cow = [bench_cow(root, size_mb, rounds, False, settle)]
        if not a.no_wbcache and not a.quick:
            cow.append(bench_cow(root, size_mb, rounds, True, settle))
        rows = []
        for c in cow:
            nm, fw, rw = median(c["none"]), median(c["first"]), median(c["rewrite"])
            rows.append([c["mode"], f"{c['fill']:.1f}", f"{nm:.1f}", f"{fw:.1f}", f"{rw:.1f}",
                         f"{median(c['after']):.1f}",
                         f"{fw / nm:.2f}", f"{rw / nm:.2f}",
                         f"{min(c['saved'])}/{c['blocks']}",
                         " / ".join(f"{median(c['cpu'][k]):.2f}"
                                    for k in ("none", "first", "rewrite"))])
        sections.append((f"2. overwrite in place through the mount, {size_mb} MiB file, 1 MiB "
                         f"writes + fsync, MiB/s (median of {rounds}; each pass after sync + {settle:g} s; "
                         "'none again' = no snapshot, after its delete); targets: first >= 0.5x,"
                         " rewrite >= 0.9x",
                         table(["mount", "new file", "none", "first write", "rewrite", "none again",
                                "first/none", "rewrite/none", "copied",
                                "daemon CPU s/GiB none/first/rewrite"], rows)))
        log(f"[load {loadavg()}]")
        log()
        # 3
        drows = bench_delta(root, vol, data, fracs, 1, f"{vol // MiB}MiB")
        drows += bench_delta(root, 1 << 40, data, (0.01,), 2, "1TiB")
        rows = []
        for d in drows:
            rate = lambda t: f"{d['blocks'] / t:,.0f}" if t and d["blocks"] else "-"
            rows.append([d["label"], f"{d['frac']:.0%}", f"{d['written']}", f"{d['blocks']}",
                         f"{d['extents']}",
                         f"{d['cold']:.3f}" if d["cold"] is not None else "-", rate(d["cold"]),
                         f"{d['warm']:.3f}", rate(d["warm"]), f"{d['warm_cpu']:.3f}",
                         f"{d['live']:.3f}",
                         f"{d['written'] / d['write_s']:,.0f}" if d["written"] else "-"])
        sections.append((f"3. delta L->M, core level (layer.delta consumed fully); "
                         f"{data / GiB:.2f} GiB of file data",
                         table(["volume", "changed", "written", "delta blocks", "extents",
                                "cold s", "cold blk/s", "warm s", "warm blk/s", "warm cpu s",
                                "L->live s",
                                "COW write blk/s"], rows)))
        log(f"[load {loadavg()}]")
    except BaseException as e:
        status = 1
        if isinstance(e, KeyboardInterrupt):
            log("interrupted")
        elif isinstance(e, SystemExit):
            log(f"stopped ({e.code})")
            status = e.code if isinstance(e.code, int) else 1
        else:
            traceback.print_exc()
    finally:
        for m in Mount.all:
            try:
                m.cleanup_mount()
            except Exception:
                traceback.print_exc()
        shutil.rmtree(root, ignore_errors=True)
    log()
    log("=" * 78)
    for title, text in sections:
        log(title)
        log(text)
        log()
    if status:
        log("INCOMPLETE: the run failed; see above")
    return status


if __name__ == "__main__":
    sys.exit(main())
