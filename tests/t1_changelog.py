"""Tier 1: the change log (repfs/repl/changelog.ChangeLogLayer) and delta-set cutting
(repfs/repl/deltaset.DeltaSets) on a real site's volume stack, without a daemon or a mount.

The stack is the one a site builds (``Site.open_fs()``): FileSystem -> ChangeLogLayer ->
SnapLayer -> Volume. A thin recording layer is slipped in under the change log so each test
knows exactly which blocks the file system wrote in each interval. A cut is what the daemon
does: ``fs.checkpoint()`` (the consistency point), ``sets.cut()``, then ``sets.copy_step()``
until it returns True, while writes may go on between the steps.

Crashes are real: a child process builds the stack, writes, and kills itself with SIGKILL
(nothing flushed or closed); the test then reopens the site and checks invariant 3 — the
change log marks every block that differs from what was last cut (over-marking allowed,
under-marking never).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from repfs.fs.format import ROOT_INO
from repfs.repl import keys as K
from repfs.repl.changelog import ChangeLogLayer
from repfs.repl.chunk import (
    chunk_size, data_checksum, decode_chunk, decode_set_header, is_set_header,
)
from repfs.repl.deltaset import DeltaSets
from repfs.site import Site
from repfs.volume import Layer

BS = 4096
VOL = 160 << 20  # 40960 blocks: two change-log pages, 40 write-intent regions
ROOT_DIR = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers


class Recorder(Layer):
    """Remembers every block written through it (slipped in under the change log)."""

    def __init__(self, lower):
        super().__init__(lower)
        self.written: set[int] = set()

    def write(self, start, data, meta=False):
        self.written.update(range(start, start + len(data) // BS))
        self.lower.write(start, data, meta)

    def take(self) -> set[int]:
        out, self.written = self.written, set()
        return out


def read_set(path: Path) -> tuple[list[tuple[int, bytes]], object]:
    """All (block, content) of a delta-set file in order, and its verified header."""
    raw = path.read_bytes()
    off, out, sums, nchunks = 0, [], [], 0
    gen = ds = None
    while not is_set_header(raw, off):
        size = chunk_size(raw, off)
        c = decode_chunk(raw[off: off + size])
        assert c.number == nchunks, "chunks out of order"
        gen = c.generation if gen is None else gen
        ds = c.delta_set if ds is None else ds
        assert (c.generation, c.delta_set) == (gen, ds)
        pos = 0
        for s, n in c.extents:
            for i in range(n):
                out.append((s + i, c.data[pos: pos + BS]))
                pos += BS
        sums.append(c.checksum)
        nchunks += 1
        off += size
    hdr = decode_set_header(raw[off:])
    assert hdr.chunks == nchunks
    assert hdr.blocks == len(out)
    assert hdr.data_checksum == data_checksum(sums)
    if ds is not None:
        assert hdr.delta_set == ds and hdr.generation == gen
    return out, hdr


class Image:
    """The volume's blocks at one instant, with a digest per block for fast comparison."""

    def __init__(self, dev):
        self.raw = dev.read(0, dev.nblocks)
        mv = memoryview(self.raw)
        self.digests = np.array([xxhash.xxh3_64_intdigest(mv[i * BS:(i + 1) * BS])
                                 for i in range(dev.nblocks)], dtype=np.uint64)

    def __getitem__(self, b: int) -> bytes:
        return self.raw[b * BS:(b + 1) * BS]


def image(dev) -> Image:
    return Image(dev)


class Stack:
    """A site's stack with logging enabled, a recorder under the change log, and DeltaSets."""

    def __init__(self, path: Path, create: bool = True):
        self.site = Site.create(path, VOL) if create else Site(path)
        self.fs = self.site.open_fs()
        self.clog: ChangeLogLayer = self.fs.dev
        self.rec = Recorder(self.clog.lower)
        self.clog.lower = self.rec
        self.fs.checkpoint()
        self.clog.enabled = True
        self.sets = DeltaSets(env=self.clog.env, clog=self.clog, site_path=self.site.path)
        self.rng = random.Random(str(path))
        self.files: list[int] = []
        self.serial = 0
        self.tag = os.urandom(4).hex()

    # a random file-system workload (whole files of random bytes, overwrites, truncates...)
    def new_file(self, size: int) -> int:
        self.serial += 1
        ino = self.fs.create(ROOT_INO, f"f{self.tag}-{self.serial}".encode(), 0o644).ino
        self.fs.release(ino)
        self.fs.forget(ino, 1)
        if size:
            self.fs.write(ino, 0, self.rng.randbytes(size))
        self.files.append(ino)
        return ino

    def op(self) -> None:
        r = self.rng.random()
        if not self.files or r < 0.2:
            self.new_file(self.rng.choice([0, 100, BS, 5 * BS + 7, 64 << 10, 300 << 10]))
        elif r < 0.6:
            ino = self.rng.choice(self.files)
            size = self.fs.getattr(ino).size
            off = self.rng.randrange(0, size + 1) if size else 0
            self.fs.write(ino, off, self.rng.randbytes(self.rng.choice([1, 100, BS, 3 * BS,
                                                                         40 << 10])))
        elif r < 0.7:
            ino = self.rng.choice(self.files)
            size = self.fs.getattr(ino).size
            self.fs.setattr(ino, size=self.rng.randrange(0, size + 1) if size else 0)
        elif r < 0.8 and len(self.files) > 3:
            ino = self.files.pop(self.rng.randrange(len(self.files)))
            name = next(n for n, i, _ in self.fs.readdir(ROOT_INO, 0) if i.ino == ino)
            self.fs.unlink(ROOT_INO, name)
        elif r < 0.9:
            ino = self.rng.choice(self.files)
            self.fs.setxattr(ino, b"user.k%d" % self.rng.randrange(4), self.rng.randbytes(20))
        else:
            self.fs.commit()

    def cut_and_copy(self, interleave: int = 0) -> tuple[int, set[int], Image]:
        """Consistency point, cut, then copy with `interleave` workload ops between copy
        steps. Returns the delta set number, the blocks written in its interval and the
        volume image at its boundary."""
        self.fs.checkpoint()
        written = self.rec.take()
        boundary = image(self.clog)
        n = self.sets.cut()
        done = self.clog.old is None
        while not done:
            for _ in range(interleave):
                self.op()
            done = self.sets.copy_step()
        assert self.sets.record(n)["state"] == "ready"
        assert not self.sets.cutting and self.clog.old is None
        return n, written, boundary

    def close(self) -> None:
        self.fs.close()
        self.fs.dev.close()


def check_set(stack: Stack, n: int, written: set[int], before: np.ndarray,
              boundary: np.ndarray) -> None:
    entries, hdr = read_set(stack.sets.path(n))
    assert hdr.delta_set == n
    blocks = [b for b, _ in entries]
    assert len(blocks) == len(set(blocks)), "a block is shipped more than once in a delta set"
    assert set(blocks) == written, (
        f"delta set {n}: {len(set(blocks) - written)} blocks never written, "
        f"{len(written - set(blocks))} written blocks missing")
    for b, data in entries:
        assert data == boundary[b], f"delta set {n}: block {b} is not its content at the " \
                                    "boundary"
    # the essential property: the previous boundary plus the delta set is this boundary
    applied = before.digests.copy()
    for b, data in entries:
        applied[b] = xxhash.xxh3_64_intdigest(data)
    diff = np.flatnonzero(applied != boundary.digests)
    assert not len(diff), f"delta set {n} does not carry blocks {diff[:10].tolist()}"
    rec = stack.sets.record(n)
    assert rec["blocks"] == len(blocks) and rec["chunks"] == hdr.chunks


# ----------------------------------------------------------------------------- delta sets


def test_delta_sets_are_exact_with_priority_copy(tmp_path):
    st = Stack(tmp_path / "s")
    prev = image(st.clog)
    hits = []
    real_cut = st.sets.cut

    def cut():  # count priority copies (writes that hit blocks not yet copied)
        n = real_cut()
        pc = st.clog.priority_copy
        if pc is not None:
            def counting(blocks):
                hits.append(len(blocks))
                pc(blocks)
            st.clog.priority_copy = counting
        return n

    st.sets.cut = cut
    numbers = []
    for rnd in range(6):
        # several MiB per interval, so the copy takes many steps and writes land in between
        for _ in range(3):
            st.new_file(1 << 20)
        for _ in range(40):
            st.op()
        n, written, boundary = st.cut_and_copy(interleave=3 if rnd % 2 == 0 else 0)
        numbers.append(n)
        check_set(st, n, written, prev, boundary)
        prev = boundary
    assert numbers == list(range(numbers[0], numbers[0] + 6))
    assert sum(hits) > 0, "the workload never hit a block not yet copied: test too weak"
    # the last interval's writes (made during the copy) go into the next delta set
    n, written, boundary = st.cut_and_copy()
    check_set(st, n, written, prev, boundary)
    st.close()


def test_priority_copy_preserves_every_overwritten_block(tmp_path):
    """Every block of the old table is overwritten before the background copy reaches it:
    the delta set still holds the contents at the boundary."""
    st = Stack(tmp_path / "s")
    prev = image(st.clog)
    ino = st.new_file(4 << 20)
    st.fs.commit()
    n, written, boundary = st.cut_and_copy()
    check_set(st, n, written, prev, boundary)
    prev = boundary
    # interval 2: rewrite the file entirely
    st.fs.write(ino, 0, st.rng.randbytes(4 << 20))
    st.fs.checkpoint()
    written = st.rec.take()
    boundary = image(st.clog)
    n = st.sets.cut()
    # before any copy step: overwrite everything again, in pieces, out of order
    offs = list(range(0, 4 << 20, 64 << 10))
    st.rng.shuffle(offs)
    for off in offs:
        st.fs.write(ino, off, st.rng.randbytes(64 << 10))
    st.fs.commit()
    assert st.clog.old is not None
    while not st.sets.copy_step():
        pass
    check_set(st, n, written, prev, boundary)
    # the overwrites are in the next delta set, with their final content
    n2, written2, boundary2 = st.cut_and_copy()
    check_set(st, n2, written2, boundary, boundary2)
    assert st.fs.read(ino, 0, 4 << 20) == b"".join(
        boundary2[b] for b in st.fs.bmap.lookup(st.fs.getattr(ino), 0, 1024).tolist())
    st.close()


def test_a_block_written_many_times_is_shipped_once(tmp_path):
    st = Stack(tmp_path / "s")
    prev = image(st.clog)
    ino = st.new_file(8 * BS)
    n, written, boundary = st.cut_and_copy()
    check_set(st, n, written, prev, boundary)
    prev = boundary
    for i in range(200):
        st.fs.write(ino, (i % 3) * BS + 17, b"%05d" % i)
        if i % 50 == 0:
            st.fs.commit()
    assert st.clog.changed_blocks == len(st.clog.new.get_range(0, st.clog.nblocks).nonzero()[0])
    n, written, boundary = st.cut_and_copy()
    entries, _ = read_set(st.sets.path(n))
    data_blocks = set(st.fs.bmap.lookup(st.fs.getattr(ino), 0, 3).tolist())
    shipped = [b for b, _ in entries]
    assert data_blocks <= set(shipped)
    assert len(shipped) == len(set(shipped))
    check_set(st, n, written, prev, boundary)
    # a cut with no writes is an empty (but complete and verifiable) delta set
    n2, written2, boundary2 = st.cut_and_copy()
    assert written2 == set()
    entries2, hdr2 = read_set(st.sets.path(n2))
    assert entries2 == [] and hdr2.chunks == 0 and hdr2.blocks == 0
    st.close()


def test_cut_numbers_and_mailbox_survive_a_clean_reopen(tmp_path):
    st = Stack(tmp_path / "s")
    st.new_file(1 << 20)
    n1, _, _ = st.cut_and_copy()
    st.new_file(1 << 20)
    n2, _, _ = st.cut_and_copy()
    assert n2 == n1 + 1 and st.sets.last_cut == n2
    st.close()
    st2 = Stack(tmp_path / "s", create=False)
    assert st2.sets.last_cut == n2
    assert [r["number"] for r in st2.sets.records()] == [n1, n2]
    assert all(r["state"] == "ready" for r in st2.sets.records())
    st2.new_file(BS)
    n3, _, _ = st2.cut_and_copy()
    assert n3 == n2 + 1
    st2.close()


def test_flow_control_and_retention(tmp_path):
    st = Stack(tmp_path / "s")
    st.sets.capacity = 3 << 20
    assert not st.sets.flow_control()
    st.new_file(2 << 20)
    n1, _, _ = st.cut_and_copy()
    assert not st.sets.flow_control()
    st.new_file(2 << 20)
    n2, _, _ = st.cut_and_copy()
    assert st.sets.usage() >= 4 << 20
    assert st.sets.flow_control()
    # chunk data goes once acknowledged by all; block lists stay for the retention period
    st.sets.prune(n1, retention_s=3600)
    assert not st.sets.path(n1).exists() and st.sets.path(n2).exists()
    assert st.sets.record(n1) is not None
    assert not st.sets.flow_control()
    st.sets.prune(n2, retention_s=0)
    assert not st.sets.path(n2).exists()
    assert st.sets.record(n1) is None and st.sets.record(n2) is None
    with st.clog.env.begin(db=st.sets.db_bits) as txn:
        assert txn.cursor().first() is False  # the block lists are gone too
    st.close()


# ----------------------------------------------------------------------------- crash safety

CHILD = r"""
import json, os, random, signal, sys
sys.path.insert(0, {root!r})
from tests.t1_changelog import child_main
child_main({args!r})
"""


def child_main(args: dict) -> None:
    """In a child process: build the stack, write, cut as asked, report, then SIGKILL."""
    site = Site(args["site"])
    fs = site.open_fs()
    clog = fs.dev
    fs.checkpoint()
    clog.enabled = True
    sets = DeltaSets(env=clog.env, clog=clog, site_path=site.path)
    rng = random.Random(args["seed"])
    report = {"after_ready_cut": [], "last_ready": 0}
    written = set()

    def raw_writes(count, lo=1, hi=None):
        """Rewrite random extents in [lo, hi) with their own content (the file system stays
        valid)."""
        hi = clog.nblocks if hi is None else hi
        for _ in range(count):
            n = rng.choice([1, 1, 3, 17, 300])
            s = rng.randrange(lo, hi - n)
            clog.write(s, clog.read(s, n))
            written.update(range(s, s + n))

    for step in args["steps"]:
        kind = step[0]
        if kind == "write":
            raw_writes(*step[1:])
        elif kind == "flush":
            clog.flush()
        elif kind == "persist":
            clog.persist()
        elif kind == "cut":  # cut, copy `step[1]` steps (None: all)
            fs.checkpoint()
            sets.cut()
            steps = step[1]
            if steps is None:
                while not sets.copy_step():
                    pass
                report["last_ready"] = sets.last_cut
                written.clear()
            else:
                for _ in range(steps):
                    sets.copy_step()
        elif kind == "fscheckpoint":
            fs.checkpoint()
        elif kind == "fsfile":  # a new file through the file system (metadata in the cache)
            ino = fs.create(ROOT_INO, b"crash-%d" % rng.randrange(1 << 30), 0o644).ino
            fs.write(ino, 0, rng.randbytes(step[1]))
            fs.release(ino)
        elif kind == "journal-only-commit":
            # a group commit killed after its commit point (the redo-log record is durable)
            # and before its blocks reached the volume: mounting replays them
            seq, blocks = fs.prepare_commit()
            fs.dev.flush()
            fs.journal.write(seq, blocks)
            written.update(int(b) for b in blocks)
    report["must_be_marked"] = sorted(written)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def crash_child(site: Path, seed: int, steps: list) -> dict:
    code = CHILD.format(root=str(ROOT_DIR), args={"site": str(site), "seed": seed,
                                                   "steps": steps})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=ROOT_DIR)
    assert r.returncode == -signal.SIGKILL, f"child exited {r.returncode}: {r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def reopen_marks(site_path: Path) -> tuple[np.ndarray, Stack]:
    """Reopen after the crash the way a mount does (the stack, then DeltaSets' recovery)."""
    st = Stack(site_path, create=False)
    marks = st.clog.new.get_range(0, st.clog.nblocks)
    return marks, st


# Writes after a cut go to the volume's last 2 MiB only (HIGH), away from the blocks written
# before it (LOW), so the write-intent regions of the later writes (whole 4 MiB regions,
# over-marking being allowed) cannot hide a lost mark of an earlier block.
LOW = (8192, 30000)
HIGH = (40960 - 512, 40960)
SCENARIOS = {
    # writes only, nothing ever flushed
    "no-flush": [["write", 200]],
    # a flush in the middle: the tables are durable, later writes only have intent marks
    "flush-between": [["write", 100], ["flush"], ["write", 100]],
    # a complete cut, then more writes: only these need marking
    "after-ready-cut": [["write", 100], ["cut", None], ["write", 80]],
    # killed right after the cut (table swap), before any copying
    "cut-no-copy": [["write", 150, *LOW], ["cut", 0], ["write", 30, *HIGH]],
    # killed during the background copy, nothing persisted since the cut
    "mid-copy": [["write", 300, *LOW], ["cut", 2], ["write", 30, *HIGH]],
    # killed during the background copy after the change log was persisted (a group commit)
    "mid-copy-persisted": [["write", 300, *LOW], ["cut", 2], ["write", 5, *HIGH], ["flush"],
                           ["write", 30, *HIGH]],
    "mid-copy-persisted-nowrites": [["write", 300, *LOW], ["cut", 3], ["persist"]],
    # priority copies during the copy, then a file-system checkpoint (which flushes)
    "mid-copy-checkpoint": [["write", 300, *LOW], ["write", 20, *HIGH], ["cut", 1],
                            ["write", 100, *HIGH], ["fscheckpoint"], ["write", 20, *HIGH]],
    # killed inside a group commit, after its commit point: the blocks the mount's redo-log
    # replay writes differ from the last delta set, so they must be marked too
    "redo-log-replay": [["fsfile", 8 << 20], ["cut", None], ["fsfile", 300_000],
                        ["journal-only-commit"]],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_change_log_marks_every_written_block_after_kill_9(tmp_path, name):
    site_path = tmp_path / "s"
    Site.create(site_path, VOL)
    seed = sum(map(ord, name))
    report = crash_child(site_path, seed, SCENARIOS[name])
    must = np.array(report["must_be_marked"], dtype=np.int64)
    assert len(must), "the child wrote nothing"
    marks, st = reopen_marks(site_path)
    try:
        missing = must[~marks[must]] if len(must) else must
        assert not len(missing), (
            f"{name}: after kill -9 the change log lost {len(missing)} of {len(must)} "
            f"written blocks (under-marking), e.g. {missing[:8].tolist()}")
        assert st.sets.last_cut == report["last_ready"]
        assert not st.sets.cutting
        assert all(r["state"] == "ready" for r in st.sets.records())
        # the next cut ships every one of them
        n, _, boundary = st.cut_and_copy()
        assert n == report["last_ready"] + 1
        entries, _ = read_set(st.sets.path(n))
        shipped = {b for b, _ in entries}
        assert set(must.tolist()) <= shipped
        for b, data in entries:
            assert data == boundary[b]
    finally:
        st.close()


def test_repeated_crashes_never_lose_marks(tmp_path):
    """Several crashes in a row, each in a random phase; the marks accumulate until a cut
    completes."""
    site_path = tmp_path / "s"
    Site.create(site_path, VOL)
    rng = random.Random(99)
    pending: set[int] = set()
    for i in range(5):
        steps = [["write", rng.randrange(20, 200)]]
        if rng.random() < 0.5:
            steps.append(["flush"])
        steps.append(["write", rng.randrange(1, 50)])
        report = crash_child(site_path, 1000 + i, steps)
        pending |= set(report["must_be_marked"])
        st = Stack(site_path, create=False)
        marks = st.clog.new.get_range(0, st.clog.nblocks)
        lost = [b for b in pending if not marks[b]]
        st.close()
        assert not lost, f"crash {i}: {len(lost)} blocks written before a crash lost their mark"


def test_intent_regions_cover_unflushed_writes_only_within_their_region(tmp_path):
    """After kill -9 the marks may exceed the writes (whole 4 MiB intent regions), but only
    in regions that were written."""
    site_path = tmp_path / "s"
    Site.create(site_path, VOL)
    report = crash_child(site_path, 5, [["write", 40]])
    must = np.array(report["must_be_marked"], dtype=np.int64)
    marks, st = reopen_marks(site_path)
    try:
        regions = set((must // K.REGION_BLOCKS).tolist())
        # blocks the child's checkpoint wrote (superblock, bitmaps) may be marked too: allow the
        # file system's first region
        allowed = regions | {0}
        marked_regions = set((np.flatnonzero(marks) // K.REGION_BLOCKS).tolist())
        assert marked_regions <= allowed, "marks outside any written region"
        assert marks[must].all()
    finally:
        st.close()
