"""How much pipelining the sends buys: 1 MiB delta chunks (and initial-copy records) sent to a
real secondary daemon over loopback, stop-and-wait (window 1) against windows of requests in
flight (repfs/repl/transport.py). Prints MiB/s per window and the ratio to window 1.

    .venv/bin/python tools/bench/pipeline.py [--mb 64] [--windows 1,2,4,8,16] [--rounds 8]

It makes one site in a temporary directory, mounts it, attaches it as the secondary of a
made-up primary (this script plays the primary), sends an initial copy of the site's own
volume (so what is played leaves it as it was), then delta sets of the site's own blocks,
each committed and played. The chunks are read from the volume image as they are sent, as
the send task reads them. The site is unmounted and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from repfs.repl.chunk import (  # noqa: E402
    BS, SetHeader, data_checksum, encode_chunk, encode_set_header, encoded_checksum,
)
from repfs.repl.transport import ReceiverClient  # noqa: E402
from repfs.site import Site  # noqa: E402
from tools.bench.common import lazy_unmount, log, tool  # noqa: E402

CHUNK_BLOCKS = 256  # 1 MiB of data per chunk, as the primary cuts them
GEN = 1


def pieces(fd: int, first: int, count: int):
    """(start, data) of `count` 1 MiB pieces of the volume from block `first`, read lazily."""
    for i in range(count):
        start = first + i * CHUNK_BLOCKS
        yield start, os.pread(fd, CHUNK_BLOCKS * BS, start * BS)


def wait_played(client: ReceiverClient, n: int) -> None:
    deadline = time.monotonic() + 120
    while client.info()["last_played"] < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"delta set {n} was not played within 120 s")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=64, help="MiB per delta set (and copy) sent")
    ap.add_argument("--windows", default="1,2,4,8,16", help="windows to compare")
    ap.add_argument("--rounds", type=int, default=8, help="delta sets per window (median)")
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    count = args.mb
    log(f"command: {' '.join(sys.argv)}")
    log(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, nproc {os.cpu_count()}, "
        f"Python {sys.version.split()[0]}")
    repfs = tool("repfs")
    tmp = Path(tempfile.mkdtemp(prefix="repfs-pipeline-", dir=args.tmpdir))
    site_dir, mnt = tmp / "b", tmp / "b-mnt"
    mnt.mkdir()
    size_blocks = max(4 * count * CHUNK_BLOCKS, 1 << 18)
    try:
        subprocess.run([repfs, "mkfs", str(site_dir), "--size", str(size_blocks * BS)],
                       check=True, capture_output=True)
        subprocess.run([repfs, "mount", str(site_dir), str(mnt)], check=True)
        client = ReceiverClient(Site(site_dir))
        info = client.info()
        nblocks = info["volume_blocks"]
        client.attach({"uuid": "ab" * 16, "site": str(tmp / "made-up-primary")}, GEN, nblocks,
                      True)
        fd = os.open(site_dir / "volume.img", os.O_RDONLY)
        try:
            results: dict[str, dict[int, list[float]]] = {"chunk": {}, "copy": {}}
            # the initial copy: the first count * len(windows) MiB, one slice per window
            for k, w in enumerate(windows):
                first = k * count * CHUNK_BLOCKS
                t0 = time.perf_counter()
                n = client.send_copies(((GEN, s, d) for s, d in pieces(fd, first, count)),
                                       window=w)
                results["copy"][w] = [count / (time.perf_counter() - t0)]
                assert n == count
            copied = len(windows) * count * CHUNK_BLOCKS
            client.start_playback(1, GEN, copied)
            wait_played(client, 1)
            ds = 1
            for r in range(args.rounds):
                for w in windows:
                    ds += 1
                    sums = []

                    def chunks():
                        for i, (s, d) in enumerate(pieces(fd, 0, count)):
                            raw = encode_chunk(GEN, ds, i, [(s, CHUNK_BLOCKS)], d)
                            sums.append(encoded_checksum(raw))
                            yield raw

                    t0 = time.perf_counter()
                    assert client.send_chunks(chunks(), window=w) == count
                    results["chunk"].setdefault(w, []).append(
                        count / (time.perf_counter() - t0))
                    hdr = encode_set_header(SetHeader(GEN, ds, count, count * CHUNK_BLOCKS,
                                                      data_checksum(sums)))
                    client.commit(hdr, {})
                    wait_played(client, ds)
        finally:
            os.close(fd)
            client.close()
        log(f"1 MiB requests to a secondary daemon over loopback, {count} MiB per send; "
            f"'x window {windows[0]}': the median of each round's ratio to window "
            f"{windows[0]} in the same round")
        log(f"{'what':<30}{'window':>7}{'MiB/s min':>11}{'median':>8}{'max':>7}"
            f"{'x window ' + str(windows[0]):>12}")
        for what, label in (("chunk", f"delta chunks ({args.rounds} rounds)"),
                            ("copy", "initial-copy records (1 run)")):
            base = results[what][windows[0]]
            for w in windows:
                v = results[what][w]
                ratio = statistics.median(x / b for x, b in zip(v, base))
                log(f"{label:<30}{w:>7}{min(v):>11.0f}{statistics.median(v):>8.0f}"
                    f"{max(v):>7.0f}{ratio:>11.2f}x")
    finally:
        subprocess.run([repfs, "umount", str(mnt)], capture_output=True)
        lazy_unmount(mnt)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
