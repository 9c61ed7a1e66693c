"""Tier 1: the change log (repfs/repl/changelog.ChangeLogLayer) and delta sets
(repfs/repl/deltaset.DeltaSets: cut, pinning snapshot, stream, release, retention, flow
control) on a real site's volume stack, without a daemon or a mount.

The stack is the one a site builds (``Site.open_fs()``): FileSystem -> ChangeLogLayer ->
SnapLayer -> Volume. A thin recording layer is slipped in under the change log so each test
knows exactly which blocks the file system wrote in each interval. A cut is what the daemon
does: ``fs.checkpoint()`` (the consistency point), then ``sets.cut()``; a send is
``sets.stream(rec)``, whose ``chunks()`` are decoded here with the receiver's decoder, while
writes may go on between the chunks (and between cuts, overwriting blocks of delta sets not
yet shipped: the pinning snapshot's copy-on-write must keep their state at the boundary).

Crashes are real: a child process builds the stack, writes, and kills itself with SIGKILL
(nothing flushed or closed); the test then reopens the site and checks invariant 3 — the
change log marks every block that differs from what was last cut (over-marking allowed,
under-marking never) — and that the delta sets cut before the crash are still whole.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

from repfs.fs.format import ROOT_INO
from repfs.repl import keys as K
from repfs.repl.changelog import ChangeLogLayer
from repfs.repl.chunk import data_checksum, decode_chunk, decode_set_header
from repfs.repl.deltaset import PIN_PREFIX, DeltaSets
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

    def write(self, start, data, meta=False, **kw):  # (kw: the snapped volume's `hold`)
        self.written.update(range(start, start + len(data) // BS))
        self.lower.write(start, data, meta, **kw)

    def take(self) -> set[int]:
        out, self.written = self.written, set()
        return out


def read_stream(sets: DeltaSets, n: int, between=None) -> tuple[list[tuple[int, bytes]], object]:
    """All (block, content) of delta set `n` as the sender streams it, in order, and its
    verified header; `between()` runs after each chunk (writes while the set is sent)."""
    rec = sets.record(n)
    stream = sets.stream(rec)
    out, sums, nchunks = [], [], 0
    for raw in stream.chunks():
        c = decode_chunk(raw)
        assert c.number == nchunks, "chunks out of order"
        assert (c.generation, c.delta_set) == (rec["generation"], n)
        pos = 0
        for s, cnt in c.extents:
            for i in range(cnt):
                out.append((s + i, c.data[pos: pos + BS]))
                pos += BS
        sums.append(c.checksum)
        nchunks += 1
        if between is not None:
            between()
    hdr = decode_set_header(stream.header())
    assert (hdr.generation, hdr.delta_set) == (rec["generation"], n)
    assert hdr.chunks == nchunks
    assert hdr.blocks == len(out) == rec["blocks"]
    assert hdr.data_checksum == data_checksum(sums)
    return out, hdr


def raw_stream(sets: DeltaSets, n: int) -> tuple[list[bytes], bytes]:
    """Delta set n's encoded chunks and header, as sent."""
    stream = sets.stream(sets.record(n))
    raws = list(stream.chunks())
    return raws, stream.header()


def digest(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


class Image:
    """The volume's blocks at one instant, with a digest per block for fast comparison."""

    def __init__(self, dev):
        self.raw = dev.read(0, dev.nblocks)
        mv = memoryview(self.raw)
        self.digests = np.array([digest(mv[i * BS:(i + 1) * BS]) for i in range(dev.nblocks)],
                                dtype=np.uint64)

    def __getitem__(self, b: int) -> bytes:
        return self.raw[b * BS:(b + 1) * BS]


def image(dev) -> Image:
    return Image(dev)


def block_list(sets: DeltaSets, n: int) -> set[int]:
    """Delta set n's block list as the cut recorded it (LMDB dsbits)."""
    bits = sets.block_list(n)
    return set(np.flatnonzero(bits.get_range(0, sets.clog.nblocks)).tolist())


class Stack:
    """A site's stack with logging enabled, a recorder under the change log, and DeltaSets."""

    def __init__(self, path: Path, create: bool = True, **kw):
        self.site = Site.create(path, VOL) if create else Site(path)
        self.fs = self.site.open_fs()
        self.clog: ChangeLogLayer = self.fs.dev
        self.snap = self.clog.lower  # the snapped volume: pinning snapshots
        self.rec = Recorder(self.snap)
        self.clog.lower = self.rec
        self.fs.checkpoint()
        self.clog.enabled = True
        self.sets = DeltaSets(self.clog.env, self.clog, self.site.path, self.snap, **kw)
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

    def overwrite_all(self, ino: int, piece: int = 64 << 10) -> None:
        """Rewrite a whole file with new bytes, in pieces, out of order."""
        size = self.fs.getattr(ino).size
        offs = list(range(0, size, piece))
        self.rng.shuffle(offs)
        for off in offs:
            self.fs.write(ino, off, self.rng.randbytes(min(piece, size - off)))

    def cut(self) -> tuple[int, set[int], Image]:
        """Consistency point and cut. Returns the delta set number, the blocks written in
        its interval and the volume image at its boundary."""
        self.fs.checkpoint()
        written = self.rec.take()
        boundary = image(self.clog)
        marked = self.clog.changed_blocks  # (more than `written` after a crash: recovered)
        n = self.sets.cut()
        rec = self.sets.record(n)
        assert rec["state"] == "ready" and rec["blocks"] == marked
        assert self.clog.changed_blocks == 0 and not self.clog.new
        pin = self.sets.pin(n)
        if marked:
            assert rec["pinned"] and pin is not None and pin.interest is not None
        else:
            assert not rec["pinned"] and pin is None  # an empty delta set pins nothing
        return n, written, boundary

    def close(self) -> None:
        self.fs.close()
        self.fs.dev.close()


def check_set(stack: Stack, n: int, written: set[int], before: Image, boundary: Image,
              between=None) -> list[tuple[int, bytes]]:
    entries, hdr = read_stream(stack.sets, n, between)
    assert hdr.delta_set == n
    blocks = [b for b, _ in entries]
    assert blocks == sorted(blocks)
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
        applied[b] = digest(data)
    diff = np.flatnonzero(applied != boundary.digests)
    assert not len(diff), f"delta set {n} does not carry blocks {diff[:10].tolist()}"
    return entries


# ----------------------------------------------------------------------------- delta sets


def test_delta_sets_are_exact_while_unshipped_blocks_are_overwritten(tmp_path):
    """The model test: delta sets are cut while earlier ones are still unshipped, the
    workload keeps overwriting their blocks (between cuts and between the chunks of a send),
    and every delta set streams exactly the volume's state at its boundary: the previous
    boundary plus the delta set is this boundary."""
    st = Stack(tmp_path / "s")
    prev = image(st.clog)
    numbers = []
    pending = []  # cut, not yet streamed: (n, written, boundary)
    copied = 0  # blocks the pinning snapshots had to copy (overwritten before shipping)

    def between():
        for _ in range(2):
            st.op()

    for rnd in range(6):
        # several MiB per interval, so a send takes many chunks and writes land in between
        big = [st.new_file(1 << 20) for _ in range(3)]
        for _ in range(40):
            st.op()
        n, written, boundary = st.cut()
        numbers.append(n)
        pending.append((n, written, boundary))
        # overwrite blocks of the delta sets not yet shipped
        alive = [f for f in big if f in st.files]  # (the workload may unlink them)
        st.overwrite_all(alive[rnd % len(alive)] if alive else st.rng.choice(st.files))
        for _ in range(20):
            st.op()
        if rnd % 2 == 1:  # ship two at a time: one delta set stays unshipped across a cut
            copied = max(copied, sum(p.save.size for p in st.sets.pins()))
            assert st.sets.usage() == sum(p.save.size for p in st.sets.pins()) * BS
            for m, w, b in pending:
                # deterministic: a resumed send makes the same chunks again (it skips those
                # the receiver holds and still computes the header over all of them)
                first = raw_stream(st.sets, m)
                between()
                check_set(st, m, w, prev, b, between=between if m % 2 else None)
                assert raw_stream(st.sets, m) == first, f"delta set {m} streams differently"
                prev = b
            st.sets.prune(m, retention_s=3600)  # every destination played them
            assert not st.sets.pins() and st.sets.usage() == 0
            pending = []
    assert numbers == list(range(numbers[0], numbers[0] + 6))
    assert copied > 0, "the workload never overwrote an unshipped block: test too weak"
    # the last interval's writes (made during the sends) go into the next delta set
    n, written, boundary = st.cut()
    check_set(st, n, written, prev, boundary)
    st.close()


def test_only_blocks_overwritten_before_shipping_are_copied_once(tmp_path):
    """A delta set whose blocks are not overwritten costs no copy (each byte is written once);
    each block overwritten before it was shipped is copied once into the pinning snapshot,
    however often it is overwritten, and the delta set still holds its content at the
    boundary."""
    st = Stack(tmp_path / "s")
    prev = image(st.clog)
    ino = st.new_file(4 << 20)
    n, written, boundary = st.cut()
    pin = st.sets.pin(n)
    check_set(st, n, written, prev, boundary)
    assert pin.save.size == 0 and st.sets.usage() == 0, "nothing was overwritten: no copy"
    st.sets.prune(n, retention_s=3600)
    prev = boundary
    # interval 2: rewrite the file entirely
    st.fs.write(ino, 0, st.rng.randbytes(4 << 20))
    n, written, boundary = st.cut()
    pin = st.sets.pin(n)
    data = set(st.fs.bmap.lookup(st.fs.getattr(ino), 0, 1024).tolist())
    assert data <= written
    # before any chunk is sent: overwrite everything again, in pieces, out of order
    st.overwrite_all(ino)
    st.fs.commit()
    saved = pin.saved
    assert saved >= len(data), "the overwritten blocks of the delta set were not copied"
    assert saved <= len(written)  # only blocks of the delta set, each once
    used = st.sets.usage()
    assert used >= len(data) * BS
    st.overwrite_all(ino, piece=BS * 3)  # and again: already copied, nothing more
    st.fs.commit()
    assert pin.saved <= len(written) and pin.saved - saved <= 4  # (the file's inode block)
    check_set(st, n, written, prev, boundary)
    st.sets.prune(n, retention_s=3600)
    assert st.sets.pin(n) is None and not pin.save.path.exists() and st.sets.usage() == 0
    # the overwrites are in the next delta set, with their final content
    n2, written2, boundary2 = st.cut()
    check_set(st, n2, written2, boundary, boundary2)
    assert st.fs.read(ino, 0, 4 << 20) == b"".join(
        boundary2[b] for b in st.fs.bmap.lookup(st.fs.getattr(ino), 0, 1024).tolist())
    st.close()


def test_a_block_written_many_times_is_shipped_once(tmp_path):
    st = Stack(tmp_path / "s")
    prev = image(st.clog)
    ino = st.new_file(8 * BS)
    n, written, boundary = st.cut()
    check_set(st, n, written, prev, boundary)
    prev = boundary
    for i in range(200):
        st.fs.write(ino, (i % 3) * BS + 17, b"%05d" % i)
        if i % 50 == 0:
            st.fs.commit()
    assert st.clog.changed_blocks == len(st.clog.new.get_range(0, st.clog.nblocks).nonzero()[0])
    n, written, boundary = st.cut()
    entries = check_set(st, n, written, prev, boundary)
    data_blocks = set(st.fs.bmap.lookup(st.fs.getattr(ino), 0, 3).tolist())
    shipped = [b for b, _ in entries]
    assert data_blocks <= set(shipped)
    assert len(shipped) == len(set(shipped)) == st.sets.record(n)["blocks"]
    assert block_list(st.sets, n) == set(shipped)
    # a cut with no writes is an empty (but complete and verifiable) delta set
    n2, written2, boundary2 = st.cut()
    assert written2 == set()
    entries2, hdr2 = read_stream(st.sets, n2)
    assert entries2 == [] and hdr2.chunks == 0 and hdr2.blocks == 0
    assert st.sets.held(st.sets.record(n2))
    st.close()


def test_a_clean_close_keeps_the_exact_blocks_not_whole_regions(tmp_path):
    """After a clean close the next open finds exactly the blocks written since the cut (the
    table written whole, the intent log emptied), not the whole 8 MiB regions the intent
    marks cover (and those marked ahead of each write): what a resync reads and sends. A
    kill -9 still over-marks (the marks are there for it: t4 tests)."""
    st = Stack(tmp_path / "s")
    try:
        st.cut()
        for _ in range(60):
            st.op()
        st.fs.checkpoint()
        written = st.rec.take()
        marked = set(np.flatnonzero(st.clog.new.get_range(0, st.clog.nblocks)).tolist())
        assert written and written <= marked
    finally:
        st.close()
    st = Stack(tmp_path / "s", create=False)
    try:
        again = set(np.flatnonzero(st.clog.new.get_range(0, st.clog.nblocks)).tolist())
        assert again == marked, (len(again), len(marked))
        assert len(again) < K.REGION_BLOCKS  # (not one whole region: they were over-marked)
    finally:
        st.close()


def test_cut_numbers_mailbox_and_pins_survive_a_clean_reopen(tmp_path):
    st = Stack(tmp_path / "s")
    prev = image(st.clog)
    st.new_file(1 << 20)
    n1, w1, b1 = st.cut()
    check_set(st, n1, w1, prev, b1)
    st.sets.prune(n1, retention_s=3600)
    ino = st.new_file(1 << 20)
    n2, w2, b2 = st.cut()  # not shipped when the site closes
    assert n2 == n1 + 1 and st.sets.last_cut == n2
    st.close()
    st2 = Stack(tmp_path / "s", create=False)
    assert st2.sets.last_cut == n2
    assert [r["number"] for r in st2.sets.records()] == [n1, n2]
    assert all(r["state"] == "ready" for r in st2.sets.records())
    assert not st2.sets.held(st2.sets.record(n1)) and st2.sets.held(st2.sets.record(n2))
    # the pin is attached again: it keeps exactly delta set n2's blocks
    assert [p.name for p in st2.sets.pins()] == [f"{PIN_PREFIX}{n2}"]
    pin = st2.sets.pin(n2)
    assert pin.interest is not None
    assert set(np.flatnonzero(pin.interest.get_range(0, st2.clog.nblocks)).tolist()) == w2
    # overwrites after the reopen are copied, and the delta set is still its boundary
    st2.files = [ino]
    st2.overwrite_all(ino)
    st2.fs.commit()
    assert pin.saved >= 256
    check_set(st2, n2, w2, b1, b2)
    n3, _, _ = st2.cut()
    assert n3 == n2 + 1
    st2.close()


def test_flow_control_by_usage_and_by_outstanding_sets(tmp_path):
    st = Stack(tmp_path / "s", capacity_bytes=3 << 20, max_outstanding=3)
    assert st.sets.flow_control() is None
    a = st.new_file(2 << 20)
    n1, _, _ = st.cut()
    assert st.sets.flow_control() is None and st.sets.usage() == 0  # nothing copied
    st.overwrite_all(a)  # delta set n1's blocks, not shipped: copied into its pin
    st.fs.commit()
    assert (2 << 20) <= st.sets.usage() < 3 << 20
    n2, _, _ = st.cut()
    assert st.sets.flow_control() is None
    st.overwrite_all(a)  # now n2's blocks
    st.fs.commit()
    assert st.sets.usage() >= 4 << 20
    why = st.sets.flow_control()
    assert why and "bytes" in why, why
    # releasing what every destination played frees the space
    st.sets.prune(n1, retention_s=3600)
    assert st.sets.usage() < 3 << 20 and st.sets.flow_control() is None
    # a third and a fourth unreleased delta set, nothing overwritten: the count stops cutting
    st.new_file(BS)
    st.cut()
    assert st.sets.flow_control() is None
    st.cut()  # an empty delta set pins nothing and does not count
    assert len(st.sets.pins()) == 2 and st.sets.flow_control() is None
    st.new_file(BS)
    n5, _, _ = st.cut()
    assert len(st.sets.pins()) == 3
    why = st.sets.flow_control()
    assert why and "3 delta sets" in why, why
    st.sets.prune(n5, retention_s=3600)
    assert st.sets.flow_control() is None and not st.sets.pins()
    st.close()


def test_retention_forgets_block_lists_only_when_played_by_all_and_old(tmp_path):
    st = Stack(tmp_path / "s")
    st.new_file(1 << 20)
    n1, w1, _ = st.cut()
    st.new_file(1 << 20)
    n2, w2, _ = st.cut()
    pin1, pin2 = st.sets.pin(n1), st.sets.pin(n2)
    # played by every destination: the pin goes, the block list stays for the retention
    st.sets.prune(n1, retention_s=3600)
    assert st.sets.pin(n1) is None and not pin1.save.path.exists()
    assert st.sets.pin(n2) is pin2 and pin2.save.path.exists()
    r1 = st.sets.record(n1)
    assert r1 is not None and not r1["pinned"] and not st.sets.held(r1)
    assert block_list(st.sets, n1) == w1
    # the retention period passed, but n2 is not played by every destination: kept
    st.sets.prune(n1, retention_s=0)
    assert st.sets.record(n1) is None and block_list(st.sets, n1) == set()
    assert st.sets.record(n2)["pinned"] and block_list(st.sets, n2) == w2
    assert st.sets.pin(n2) is pin2
    st.sets.prune(n2, retention_s=3600)
    assert st.sets.record(n2) is not None and st.sets.pin(n2) is None
    assert block_list(st.sets, n2) == w2
    st.sets.prune(n2, retention_s=0)
    assert st.sets.records() == []
    with st.clog.env.begin(db=st.sets.db_bits) as txn:
        assert txn.cursor().first() is False  # the block lists are gone too
    assert not [p for p in st.snap.store.queue if p.name.startswith(PIN_PREFIX)]
    st.close()


# ----------------------------------------------------------------------------- crash safety

CHILD = r"""
import json, os, random, signal, sys
sys.path.insert(0, {root!r})
from tests.t1_changelog import child_main
child_main({args!r})
"""


def logging_stack(path):
    """Open site `path`'s file system with its change log on and its delta sets (in a
    child process of a kill or power-cut test): (file system, change log, delta sets)."""
    site = Site(path)
    fs = site.open_fs()
    clog = fs.dev
    fs.checkpoint()
    clog.enabled = True
    return fs, clog, DeltaSets(clog.env, clog, site.path, clog.lower)


def child_main(args: dict) -> None:
    """In a child process: build the stack, write, cut as asked, report, then SIGKILL (or,
    with `final`, get killed inside a cut's transaction or inside a release)."""
    fs, clog, sets = logging_stack(args["site"])
    rng = random.Random(args["seed"])
    report = {"last_ready": sets.last_cut, "pinned": {}}
    written = set()

    def raw_writes(count, lo=1, hi=None, scribble=False):
        """Write random extents in [lo, hi): with their own content (the file system stays
        valid), or with random bytes (`scribble`, for free blocks: the content changes)."""
        hi = clog.nblocks if hi is None else hi
        for _ in range(count):
            n = rng.choice([1, 1, 3, 17, 300])
            s = rng.randrange(lo, hi - n)
            clog.write(s, rng.randbytes(n * BS) if scribble else clog.read(s, n))
            written.update(range(s, s + n))

    def cut():
        fs.checkpoint()
        blocks = np.flatnonzero(clog.new.get_range(0, clog.nblocks))
        raw = b"".join(clog.read(int(b), 1) for b in blocks)  # the boundary's content
        n = sets.cut()
        report["last_ready"] = n
        report["pinned"][str(n)] = [[int(b), digest(raw[i * BS:(i + 1) * BS])]
                                    for i, b in enumerate(blocks)]
        written.clear()

    for step in args["steps"]:
        kind = step[0]
        if kind == "write":
            raw_writes(*step[1:])
        elif kind == "scribble":
            raw_writes(*step[1:], scribble=True)
        elif kind == "flush":
            clog.flush()
        elif kind == "persist":
            clog.persist()
        elif kind == "cut":
            cut()
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
    # a write into a region whose intent mark is not yet durable is held in memory until
    # the change log's worker has committed the mark (a kill before that loses the write,
    # which then needs no mark): wait for the worker, so every write may be on the volume
    # and must be marked (tests/t4_power_marks.py kills in the middle instead)
    while clog._want:
        time.sleep(0.005)
    report["must_be_marked"] = sorted(written)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()

    def die(*_a, **_k):
        os.kill(os.getpid(), signal.SIGKILL)

    final = args.get("final")
    if final == "kill-in-cut":
        # inside the cut's LMDB transaction, after the change log was emptied in it and
        # before the commit: the cut must leave no trace (no delta set, every mark kept)
        real = clog.clear_tables

        def clear_then_die(txn):
            real(txn)
            die()

        clog.clear_tables = clear_then_die
        fs.checkpoint()
        sets.cut()
    elif final == "kill-in-release":
        # every destination played the oldest delta set: its record says released, and
        # the daemon dies before its pinning snapshot is deleted
        sets.layer.delete = die
        sets.release(sets.record(min(int(k) for k in report["pinned"])))
    die()


def crash_child(site: Path, seed: int, steps: list, final: str | None = None) -> dict:
    code = CHILD.format(root=str(ROOT_DIR), args={"site": str(site), "seed": seed,
                                                   "steps": steps, "final": final})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=ROOT_DIR)
    assert r.returncode == -signal.SIGKILL, f"child exited {r.returncode}: {r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def reopen_marks(site_path: Path) -> tuple[np.ndarray, Stack]:
    """Reopen after the crash the way a mount does (the stack, then DeltaSets' recovery)."""
    st = Stack(site_path, create=False)
    marks = st.clog.new.get_range(0, st.clog.nblocks)
    return marks, st


def check_pinned(st: Stack, n: int, expect: list) -> None:
    """Delta set n, cut before the crash, is still pinned whole: its pin keeps exactly its
    block list, and it streams each block's content at its boundary."""
    rec = st.sets.record(n)
    assert rec is not None and rec["state"] == "ready" and rec["pinned"], rec
    blocks = {b for b, _ in expect}
    assert rec["blocks"] == len(blocks) and block_list(st.sets, n) == blocks
    pin = st.sets.pin(n)
    assert pin is not None and pin.interest is not None, "the pin was not attached again"
    assert set(np.flatnonzero(pin.interest.get_range(0, st.clog.nblocks)).tolist()) == blocks
    entries, _ = read_stream(st.sets, n)
    got = [[b, digest(data)] for b, data in entries]
    bad = [b for (b, d), (_, e) in zip(got, expect) if d != e]
    assert [b for b, _ in got] == [b for b, _ in expect]
    assert not bad, f"delta set {n} lost its boundary content of {len(bad)} blocks after " \
                    f"kill -9, e.g. {bad[:8]}"


# Writes after a cut go to the volume's last 2 MiB only (HIGH), away from the blocks written
# before it (LOW), so the write-intent regions of the later writes (whole 8 MiB regions,
# over-marking being allowed) cannot hide a lost mark of an earlier block. "scribble" writes
# random bytes (into blocks the file system does not use), so a lost before-image shows.
LOW = (8192, 30000)
HIGH = (40960 - 512, 40960)
SCENARIOS = {
    # writes only, nothing ever flushed
    "no-flush": [["write", 200]],
    # a flush in the middle: the tables are durable, later writes only have intent marks
    "flush-between": [["write", 100], ["flush"], ["write", 100]],
    # a cut, then more writes: only these need marking
    "after-cut": [["write", 100], ["cut"], ["write", 80]],
    # killed right after the cut, the pinned blocks not yet overwritten
    "right-after-cut": [["scribble", 150, *LOW], ["cut"], ["write", 30, *HIGH]],
    # the pinned blocks overwritten, nothing flushed since (the writes were held)
    "pinned-overwritten": [["scribble", 300, *LOW], ["cut"], ["scribble", 200, *LOW],
                           ["write", 30, *HIGH]],
    # the pinned blocks overwritten and flushed (the volume holds the new content, the pin's
    # save volume the old), then more writes
    "pinned-overwritten-flushed": [["scribble", 300, *LOW], ["cut"], ["scribble", 200, *LOW],
                                   ["flush"], ["write", 30, *HIGH]],
    "pinned-overwritten-persisted": [["write", 300, *LOW], ["cut"], ["scribble", 100, *LOW],
                                     ["persist"]],
    # two unshipped delta sets, both overwritten, a file-system checkpoint (which flushes)
    "two-pins-overwritten": [["scribble", 200, *LOW], ["cut"], ["scribble", 200, *LOW],
                             ["flush"], ["cut"], ["scribble", 200, *LOW], ["fscheckpoint"],
                             ["write", 20, *HIGH]],
    # killed inside a group commit, after its commit point: the blocks the mount's redo-log
    # replay writes differ from the last delta set, so they must be marked too
    "redo-log-replay": [["fsfile", 8 << 20], ["cut"], ["fsfile", 300_000],
                        ["journal-only-commit"]],
}


def check_after_crash(site_path: Path, report: dict, name: str) -> Stack:
    must = np.array(report["must_be_marked"], dtype=np.int64)
    marks, st = reopen_marks(site_path)
    try:
        missing = must[~marks[must]] if len(must) else must
        assert not len(missing), (
            f"{name}: after kill -9 the change log lost {len(missing)} of {len(must)} "
            f"written blocks (under-marking), e.g. {missing[:8].tolist()}")
        assert st.sets.last_cut == report["last_ready"]
        assert all(r["state"] == "ready" for r in st.sets.records())
        assert [r["number"] for r in st.sets.records()] == sorted(map(int, report["pinned"]))
        # the next cut ships every one of them, with its content at the boundary
        n, _, boundary = st.cut()
        assert n == report["last_ready"] + 1
        entries, _ = read_stream(st.sets, n)
        shipped = {b for b, _ in entries}
        assert set(must.tolist()) <= shipped
        for b, data in entries:
            assert data == boundary[b]
    except BaseException:
        st.close()
        raise
    return st


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_change_log_marks_every_written_block_after_kill_9(tmp_path, name):
    site_path = tmp_path / "s"
    Site.create(site_path, VOL)
    seed = sum(map(ord, name))
    report = crash_child(site_path, seed, SCENARIOS[name])
    assert report["must_be_marked"], "the child wrote nothing"
    st = check_after_crash(site_path, report, name)
    try:
        # the delta sets cut before the crash are whole: pinned again, their boundary intact
        for n, expect in report["pinned"].items():
            check_pinned(st, int(n), expect)
    finally:
        st.close()


def test_a_cut_killed_before_its_commit_leaves_no_trace(tmp_path):
    """kill -9 inside a cut's transaction: no delta set, no pin, every change still marked
    (the cut's save volume, made before the transaction, is a leftover the next cut reuses);
    the delta set cut before is untouched."""
    site_path = tmp_path / "s"
    Site.create(site_path, VOL)
    report = crash_child(site_path, 7, [["scribble", 150, *LOW], ["cut"],
                                        ["scribble", 150, *LOW], ["flush"],
                                        ["write", 30, *HIGH]], final="kill-in-cut")
    (n1,) = map(int, report["pinned"])
    st = check_after_crash(site_path, report, "kill-in-cut")
    try:
        check_pinned(st, n1, report["pinned"][str(n1)])
        assert [p.name for p in st.sets.pins()] == [f"{PIN_PREFIX}{n1}", f"{PIN_PREFIX}{n1 + 1}"]
        assert sorted(p.name for p in st.snap.store.queue) == [p.name for p in st.sets.pins()]
        saves = sorted(f.name for f in (site_path / "save").glob("*.save"))
        assert saves == sorted(f"{p.id}.save" for p in st.sets.pins())
    finally:
        st.close()


def test_a_release_killed_before_its_pin_is_deleted_is_finished_at_reopen(tmp_path):
    """Every destination played the oldest delta set; kill -9 after its record says released
    and before its pinning snapshot is deleted: reopening deletes the pin (else it would
    keep copying every overwritten block as a full, invisible snapshot); the younger delta
    set stays pinned and whole."""
    site_path = tmp_path / "s"
    Site.create(site_path, VOL)
    report = crash_child(site_path, 8, [["scribble", 150, *LOW], ["cut"],
                                        ["scribble", 150, *LOW], ["flush"], ["cut"],
                                        ["scribble", 100, *LOW], ["flush"],
                                        ["write", 20, *HIGH]], final="kill-in-release")
    n1, n2 = sorted(map(int, report["pinned"]))
    marks, st = reopen_marks(site_path)
    try:
        assert marks[report["must_be_marked"]].all()
        rec = st.sets.record(n1)
        assert rec is not None and not rec["pinned"] and not st.sets.held(rec)
        assert st.sets.pin(n1) is None, "a released pin was left behind at reopen"
        assert [p.name for p in st.snap.store.queue] == [f"{PIN_PREFIX}{n2}"]
        check_pinned(st, n2, report["pinned"][str(n2)])
        assert sorted(f.name for f in (site_path / "save").glob("*.save")) == [
            f"{st.sets.pin(n2).id}.save"]
    finally:
        st.close()


def test_repeated_crashes_never_lose_marks(tmp_path):
    """Several crashes in a row, each in a random phase; the marks accumulate until a cut."""
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
    """After kill -9 the marks may exceed the writes (whole intent regions), but only in
    regions that were written."""
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


def test_a_cut_left_unready_below_a_ready_one_is_made_ready_at_open(tmp_path):
    """Review of d22669a: delta set n's "ready" commit failed after its syncs (the
    primary retries it at its next cut); a one-step ready cut n + 1 (replicate start) came
    before that, then a crash. At open n is durable (n + 1's syncs came after its boundary):
    it is made ready, not undone behind n + 1 (which stepped last_cut back below a ready
    delta set, and the cut after next failed on a pin's name)."""
    from repfs.repl.deltaset import undo_unready
    from repfs.snap.store import open_env
    p = tmp_path / "s"
    st = Stack(p)
    for _ in range(10):
        st.op()
    st.cut()
    for _ in range(10):
        st.op()
    txn = st.fs.prepare_commit()  # Primary.cut up to its syncs; cut_ready(n) fails
    meta = sorted(txn[1]) if txn else []
    n = st.sets.cut_begin(meta)
    if txn:
        st.fs.write_commit(txn)
        st.sets.cut_written(n, meta)
        st.fs.finish_commit()
    st.fs.clear_journal()
    for _ in range(10):
        st.op()
    st.fs.checkpoint()
    m = st.sets.cut()  # replicate start's cut: ready in one step
    assert m == n + 1 and st.sets.record(n)["state"] == "cut"
    st.close()
    env = open_env(p)
    try:
        assert undo_unready(env) == []
    finally:
        env.close()
    st = Stack(p, create=False)
    try:
        assert st.sets.last_cut == m
        assert [(r["number"], r["state"]) for r in st.sets.records()][-2:] == [
            (n, "ready"), (m, "ready")]
        for _ in range(5):
            st.op()
        st.fs.checkpoint()
        assert st.sets.cut() == m + 1
    finally:
        st.close()
