"""Same-run A/B of repfs checkouts on replication over RCP (127.0.0.1): one primary/secondary
pair per tree, each pair's daemons started with PYTHONPATH=that tree, then rounds in which
raw TCP (a trio socket pair, as rcp.py's tput section) is measured once and each pair ships
one delta set of --mib MiB (the order of the trees alternates); the medians of acked MiB/s,
the ratio to the round's raw TCP, each daemon's CPU seconds per GiB and its minor page faults
per MiB shipped.

    .venv/bin/python tools/bench/rcp_ab.py --tree base=/tmp/wt-base --tree new=. [--rounds 6]

As root, from the repository root (for `git worktree add /tmp/wt-base COMMIT`). Nothing here
asserts on time; every mount and daemon is taken down at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import rcp  # noqa: E402  (tools/bench/rcp.py: pair, replicate_to, ship, tcp_rate)

MiB = 1 << 20


def minflt(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[7])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="LABEL=DIR (two or more)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--mib", type=int, default=256, help="MiB per delta set")
    ap.add_argument("--tcp-mib", type=int, default=1024)
    ap.add_argument("--tmpdir")
    a = ap.parse_args(argv)
    trees = {}
    for t in a.tree:
        label, sep, path = t.partition("=")
        if not sep or not (Path(path) / "repfs" / "__init__.py").is_file():
            ap.error(f"--tree {t!r}: want LABEL=DIR of a repfs checkout")
        trees[label] = str(Path(path).resolve())
    if os.geteuid() != 0:
        ap.error("needs root (mounts)")
    rcp.log(f"trees {trees}; {a.rounds} rounds of {a.mib} MiB; load {rcp.loadavg()}")
    root = Path(tempfile.mkdtemp(prefix="repfs-bench-rcpab-", dir=a.tmpdir))
    buf = os.urandom(MiB)
    pairs, res, tcp = {}, {t: [] for t in trees}, []
    saved = os.environ.get("PYTHONPATH")
    try:
        for label, path in trees.items():
            os.environ["PYTHONPATH"] = path
            p, ss = pairs[label] = rcp.pair(root, label,
                                            f"{a.rounds * a.mib // 1024 + 3}G")
            rcp.replicate_to(p, [s.address for s in ss])
            rcp.ship(p, 16, buf, "warm-up", ss)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        for r in range(a.rounds):
            tcp.append(rcp.tcp_rate(a.tcp_mib, "127.0.0.1"))
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for label in order:
                p, ss = pairs[label]
                f0 = [minflt(s.pid) for s in (p, *ss)]
                x = rcp.ship(p, a.mib, buf, f"r{r}", ss)
                x["minflt_per_mib"] = [(minflt(s.pid) - f) / a.mib
                                       for s, f in zip((p, *ss), f0)]
                x["tcp_mib_s"] = tcp[-1]
                res[label].append(x)
                rcp.log(f"round {r + 1} {label}: {x['acked_mib_s']:.0f} MiB/s cut->acked "
                        f"({x['acked_mib_s'] / tcp[-1]:.2f}x of raw TCP {tcp[-1]:.0f}); CPU s "
                        f"per GiB primary {x['cpu_s_per_gib'][0]:.2f}, secondary "
                        f"{x['cpu_s_per_gib'][1]:.2f}; page faults per MiB "
                        f"{x['minflt_per_mib'][0]:.0f} / {x['minflt_per_mib'][1]:.0f}; load "
                        f"{rcp.loadavg()}")
        med = statistics.median
        rcp.log(f"\nmedians of {a.rounds} rounds (raw TCP 127.0.0.1 {med(tcp):.0f} MiB/s; "
                f"load at the end {rcp.loadavg()}):")
        for label, xs in res.items():
            rcp.log(f"  {label:10s} {med(x['acked_mib_s'] for x in xs):6.0f} MiB/s  "
                    f"{med(x['acked_mib_s'] / x['tcp_mib_s'] for x in xs):.2f}x  CPU s/GiB "
                    f"primary {med(x['cpu_s_per_gib'][0] for x in xs):.2f} secondary "
                    f"{med(x['cpu_s_per_gib'][1] for x in xs):.2f}  page faults/MiB "
                    f"{med(x['minflt_per_mib'][0] for x in xs):.0f} / "
                    f"{med(x['minflt_per_mib'][1] for x in xs):.0f}")
    finally:
        rcp.cleanup_all()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
