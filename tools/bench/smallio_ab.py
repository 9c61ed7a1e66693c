"""Same-run A/B of repfs trees on two small-I/O rows of issue 8, against pyfuse3's passthrough.

Run from the repository root, as root (page caches are dropped):

    .venv/bin/python tools/bench/smallio_ab.py --rounds 8 --tree before=/tmp/wt-a \\
        --tree after=/tmp/wt-b [--work seqread,rand4k] [--pt-getxattr]

Each `--tree LABEL=DIR` is a checkout of this repository (e.g. `git worktree add DIR COMMIT`);
its repfs daemon runs with PYTHONPATH=DIR. Every round runs, in a rotating order, passthrough
and each tree on a fresh mount in one temporary directory, with the workloads of `matrix.py`'s
smallio section: `seqread` (128 MiB written in 1 MiB writes, with an fsync for repfs, caches
dropped, read back cold in 1 MiB reads) and `rand4k` (fio 4 KiB random writes into a 64 MiB
file, at most 5 s), plus the daemon's CPU time per write. `--pt-getxattr` adds a target
"pt+getxattr": the same passthrough with a getxattr handler that answers ENODATA, as every
file system with extended attributes must (the kernel then asks it before every write).

Prints every round, then per target the median and the median of the per-round ratios to
passthrough. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fs as fsb  # tools/bench/fs.py (this directory is sys.path[0] when run as a script)

HERE = Path(__file__).resolve().parent
MiB = 1 << 20

_PT_GETXATTR = """\
import errno, sys
sys.path.insert(0, {here!r})
import pyfuse3
import passthroughfs as p
class Operations(p.Operations):
    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA)
p.Operations = Operations
p.main()
"""


def cpu_ms(pid: int) -> int:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) * 1000 // os.sysconf("SC_CLK_TCK")


def fio_randwrite(d: Path, mib: int, runtime: int) -> tuple[float, int]:
    r = fsb.run(["fio", "--name=rw", f"--directory={d}", "--filename=fio-4k.dat",
                 "--rw=randwrite", "--bs=4k", f"--size={mib}M", "--ioengine=psync",
                 f"--runtime={runtime}", "--output-format=json"], timeout=runtime * 20 + 600)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["write"]
    return float(job["iops"]), int(job["total_ios"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                   help="a repfs checkout to run (repeat); none: the installed repfs")
    p.add_argument("--work", default="seqread,rand4k")
    p.add_argument("--pt-getxattr", action="store_true")
    p.add_argument("--seq-mib", type=int, default=128)
    p.add_argument("--fio-mib", type=int, default=64)
    p.add_argument("--fio-runtime", type=int, default=5)
    a = p.parse_args(argv)
    work = [w for w in a.work.split(",") if w]
    for w in work:
        if w not in ("seqread", "rand4k"):
            p.error(f"unknown workload {w!r}")
    trees = {}
    for t in a.tree or ["repfs=" + str(HERE.parent.parent)]:
        label, _, d = t.partition("=")
        if not d or not (Path(d) / "repfs" / "__init__.py").is_file():
            p.error(f"--tree {t!r}: expected LABEL=DIR with DIR a repfs checkout")
        trees[label] = str(Path(d).resolve())
    labels = ["pt"] + (["pt+getxattr"] if a.pt_getxattr else []) + list(trees)

    root = Path(tempfile.mkdtemp(prefix="repfs-smallio-ab-")).resolve()
    (root / "pt_getxattr.py").write_text(_PT_GETXATTR.format(here=str(HERE)))
    res: dict[str, dict[str, list[float]]] = {lab: {} for lab in labels}
    live: list = []
    fsb.log(f"start {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load {fsb.loadavg()}; trees "
            + ", ".join(f"{k}={v}" for k, v in trees.items()))
    try:
        for r in range(a.rounds):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for lab in order:
                env_old = os.environ.get("PYTHONPATH")
                if lab.startswith("pt"):
                    fsb.PASSTHROUGH = (HERE / "passthroughfs.py" if lab == "pt"
                                       else root / "pt_getxattr.py")
                    t = fsb.Passthrough(root)
                else:
                    os.environ["PYTHONPATH"] = trees[lab]
                    t = fsb.Repfs(root, size="4G", writeback=False, name="ab")
                live.append(t)
                try:
                    t.setup()
                    t.start()
                    if env_old is None:
                        os.environ.pop("PYTHONPATH", None)
                    else:
                        os.environ["PYTHONPATH"] = env_old
                    time.sleep(0.2)
                    v = {}
                    if "seqread" in work:
                        f = t.dir / "seq.dat"
                        fsb.seq_write(f, a.seq_mib, fsync=not lab.startswith("pt"))
                        fsb.drop_caches()
                        v["seqread"] = fsb.seq_read(f, a.seq_mib)
                        f.unlink()
                    if "rand4k" in work:
                        os.sync()
                        c0 = cpu_ms(t.pid)
                        v["rand4k"], n = fio_randwrite(t.dir, a.fio_mib, a.fio_runtime)
                        v["cpu_us_per_write"] = (cpu_ms(t.pid) - c0) * 1000 / n
                    for k, x in v.items():
                        res[lab].setdefault(k, []).append(x)
                    fsb.log(f"round {r + 1} {lab:12s} readahead {fsb.readahead_kb(t.dir):>4s} KiB  "
                            + "  ".join(f"{k} {x:,.1f}" for k, x in v.items())
                            + f"  (load {fsb.loadavg()})")
                finally:
                    t.stop()
                    t.cleanup()
                    live.remove(t)
    finally:
        for t in live:
            t.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    fsb.log(f"end {time.strftime('%H:%M:%S')}, load {fsb.loadavg()}")
    for k in work:
        base = res["pt"][k]
        for lab in labels:
            xs = res[lab][k]
            per = [x / b for x, b in zip(xs, base)]
            fsb.log(f"{k:8s} {lab:12s} median {statistics.median(xs):10,.1f}   ratio to pt: "
                    f"median of rounds {statistics.median(per):.2f}, of medians "
                    f"{statistics.median(xs) / statistics.median(base):.2f}   (rounds "
                    + " ".join(f"{x:.2f}" for x in per) + ")")
    if "rand4k" in work:
        for lab in labels:
            fsb.log(f"daemon CPU per write {lab:12s} median "
                    f"{statistics.median(res[lab]['cpu_us_per_write']):.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
