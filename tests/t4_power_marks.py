"""Tier 4: power cuts aimed at the change log's intent marks (issue 8: no durable commit on the
trio thread).

A write into a region without a durable intent mark is held by the snapped volume while a
worker thread commits the mark, and the snapped volume commits any marks still asked for
before it releases held writes (repfs/repl/changelog.py). The invariant is the change log's
(invariant 3): after a crash, every block that differs from the last delta-set boundary is
marked. The child process below drives the core API on a site on powerfs (tests/powerfs.py):
after a cut, it writes random bytes into blocks that were zero (free, far from the file
system's metadata), across many 8 MiB regions, with flushes, releases of held writes and a
further cut now and then, until powerfs cuts the power at the N-th write or sync of the LMDB
environment (where the marks are committed) or of the volume image. After powerfs comes back
with a random part of what was not synced, every block of that area that is not zero on the
volume must be marked by the reopened change log, or listed by a delta set cut after the
first one; and the site's fsck is clean.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from repfs.site import Site
from tests.conftest import fsck_clean
from tests.powerfs import PowerFS
from tests.t1_changelog import Stack, block_list, logging_stack
from tests.t4_power import ROUNDS, SEED

ROOT_DIR = Path(__file__).resolve().parent.parent
BS = 4096
VOL = 512 << 20  # 64 intent regions of 8 MiB
AREA = (VOL // BS // 2, VOL // BS)  # blocks the file system does not use (a new site's free space)
# (what, powerfs path, operations, the N of "before the N-th": at most)
AIMS = [("LMDB (the marks)", "site/meta.lmdb/*", "write|fsync", 8),
        ("volume image", "site/volume.img", "write|fsync", 400)]

CHILD = r"""
import sys
sys.path.insert(0, {root!r})
from tests.t4_power_marks import child_main
child_main({args!r})
"""


def child_main(args: dict) -> None:
    """Cut a delta set, say so, wait for the test to arm the power cut, then scribble into
    the area until the power goes (an OSError) or the writes run out."""
    fs, clog, sets = logging_stack(args["site"])
    lo, hi = AREA  # (zero: a new site's image is sparse, and mkfs writes only its start)
    # one region per mark commit (none marked ahead), so that many commits race the writes
    clog.INTENT_AHEAD = 0
    fs.checkpoint()
    first = sets.cut()
    sys.stdout.write(json.dumps({"first": first}) + "\n")
    sys.stdout.flush()
    sys.stdin.readline()  # armed
    rng = random.Random(args["seed"])
    # first one write into each region of the area, in a random order: each meets a region
    # without a mark (the race the hold exists for)
    regions = list(range(lo // 2048, hi // 2048))
    rng.shuffle(regions)
    for r in regions:
        n = rng.choice([1, 8, 64])
        clog.write(r * 2048 + rng.randrange(2048 - n), rng.randbytes(n * BS))
    for i in range(400):
        n = rng.choice([1, 1, 2, 8, 64, 256])
        s = rng.randrange(lo, hi - n)
        clog.write(s, rng.randbytes(n * BS))
        r = rng.random()
        if r < 0.03:
            clog.flush()  # the snapped volume releases held writes: the marks first
        elif r < 0.06:
            clog.release_held()  # the same without a sync of the volume
        elif r < 0.065:
            fs.checkpoint()
            sets.cut()  # the intent log emptied and the touched regions carried over


def test_power_cut_aimed_at_the_intent_marks(tmp_path):
    rng = random.Random(9101 + SEED)
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    pf = PowerFS(tmp_path / "disk", tmp_path / "pf")
    site = pf.mnt / "site"
    hits: dict[str, int] = {}
    try:
        pf.start()
        Site.create(site, VOL)
        pf.sync()
        rounds = ROUNDS if ROUNDS == 1 else 2 * ROUNDS  # (the suite: one, at the marks)
        for rnd in range(rounds):
            aim, path, ops, most = AIMS[rnd % len(AIMS)]
            # what was not synced: all of it (as after a kill -9: a write that reached the
            # volume before its mark shows for sure) or a random part (a missing sync shows)
            keep = rng.choice(["all", "random"] if rnd % len(AIMS) == 0 else ["none", "random"])
            code = CHILD.format(root=str(ROOT_DIR),
                                args={"site": str(site), "seed": rng.randrange(1 << 30)})
            child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT_DIR)
            try:
                line = child.stdout.readline()
                assert line, f"the child failed before its cut: {child.communicate()[1][-3000:]}"
                first = json.loads(line)["first"]
                # a slow LMDB sync widens the window the hold exists for: the writes into
                # regions whose mark is being committed
                pf.add_fault("site/meta.lmdb/*", "fsync", delay=0.02)
                pf.arm_cut(path, ops, skip=rng.randrange(most), keep=keep,
                           seed=rng.randrange(1 << 30))
                child.stdin.write("go\n")
                child.stdin.flush()
                child.wait(120)
                fired = pf.stats()["frozen"]
                if not fired:  # the writes ran out first: cut now
                    pf.freeze(keep, rng.randrange(1 << 30))
                out = pf.stats()["cut"]
            finally:
                if child.poll() is None:
                    child.kill()
                child.communicate()  # (closes its pipes)
            hits[aim] = hits.get(aim, 0) + bool(fired)
            pf.clear_faults()
            pf.stop()
            pf.start()
            fsck_clean(site)
            st = Stack(site, create=False)
            try:
                nb = st.clog.nblocks
                marks = st.clog.new.get_range(0, nb).copy()
                for rec in st.sets.records():
                    if rec["number"] > first:
                        marks[sorted(block_list(st.sets, rec["number"]))] = True
                lo, hi = AREA
                raw = np.fromfile(site / "volume.img", dtype=np.uint8,
                                  count=(hi - lo) * BS, offset=lo * BS)
                changed = lo + np.flatnonzero(raw.reshape(-1, BS).any(axis=1))
                lost = changed[~marks[changed]]
                assert not len(lost), (
                    f"round {rnd} (cut aimed at {aim}, {out}): {len(lost)} of "
                    f"{len(changed)} changed blocks are not marked, e.g. {lost[:8].tolist()}")
                print(f"round {rnd}: cut aimed at {aim} {'fired' if fired else 'not reached'};"
                      f" {len(changed)} changed blocks on the volume, all marked", flush=True)
                # the next round starts from zeros in the area again: the delta sets and
                # marks go with a new site
            finally:
                st.close()
            if rnd + 1 < rounds:
                pf.stop()
                pf.start()
                Site.create(site, VOL, force=True)
                pf.sync()
    finally:
        pf.stop()
    print(f"cuts that fired by aim: {hits}")
    assert hits.get("LMDB (the marks)"), f"no cut landed on an LMDB write or sync: {hits}"
