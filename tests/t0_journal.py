"""t0: the redo log (repfs.fs.journal) on a temporary file."""

from __future__ import annotations

import os
import random

import pytest

from repfs.fs import journal as jmod
from repfs.fs.core import FileSystem
from repfs.fs.format import BLOCK_SIZE
from repfs.fs.journal import Journal
from tests.memdev import MemDev

ZERO = bytes(BLOCK_SIZE)




def rand_blocks(rng: random.Random, n: int, maxblk: int = 2**32 - 1) -> dict[int, bytes]:
    nums = rng.sample(range(maxblk), n) if maxblk > n else list(range(n))
    return {b: rng.randbytes(BLOCK_SIZE) for b in nums}


@pytest.fixture
def jpath(tmp_path):
    return tmp_path / "journal"


def test_empty_journal_reads_none(jpath):
    j = Journal(jpath)
    assert j.read() is None
    assert jpath.exists() and jpath.stat().st_size == 0
    j.close()
    j.close()  # idempotent
    assert j.fd == -1


@pytest.mark.parametrize("n", [0, 1, 5, 1020, 1021, 1022, 3000])
def test_roundtrip(jpath, n):
    rng = random.Random(n)
    blocks = rand_blocks(rng, n)
    j = Journal(jpath)
    j.write(12345678901, blocks)
    seq, got = j.read()
    assert seq == 12345678901
    assert got == blocks
    j.close()
    # a new handle (after a crash) reads the same record
    j2 = Journal(jpath, readonly=True)
    assert j2.read() == (seq, blocks)
    j2.close()


def test_accepts_bytearray_and_memoryview_blocks(jpath):
    j = Journal(jpath)
    data = {3: bytearray(b"a" * BLOCK_SIZE), 1: memoryview(b"b" * BLOCK_SIZE)}
    j.write(1, data)
    assert j.read() == (1, {1: b"b" * BLOCK_SIZE, 3: b"a" * BLOCK_SIZE})
    j.close()


def test_later_record_replaces_earlier_even_if_smaller(jpath):
    rng = random.Random(2)
    j = Journal(jpath)
    big = rand_blocks(rng, 50)
    small = rand_blocks(rng, 2)
    j.write(1, big)
    j.write(2, small)
    assert j.read() == (2, small)
    j.close()


def _record_len(count: int) -> int:
    return jmod._header_len(count) + count * BLOCK_SIZE + jmod._TRAILER.size


@pytest.mark.parametrize("cut", [0, 5, 19, 4095, 4096, 4097, 8191, 3 * 4096 + 100, -17, -1])
def test_torn_record_reads_none(jpath, cut):
    rng = random.Random(3)
    blocks = rand_blocks(rng, 3)
    j = Journal(jpath)
    j.write(7, blocks)
    total = _record_len(3)
    assert jpath.stat().st_size == total
    keep = cut if cut >= 0 else total + cut
    os.truncate(jpath, keep)
    assert j.read() is None
    j.close()


def test_torn_overwrite_of_older_longer_record_reads_none(jpath):
    # a new, shorter record torn half way must not be mistaken for the old one or be
    # accepted with the old record's tail
    rng = random.Random(4)
    j = Journal(jpath)
    j.write(1, rand_blocks(rng, 10))
    old = jpath.read_bytes()
    new_blocks = rand_blocks(rng, 2)
    j.write(2, new_blocks)
    new = jpath.read_bytes()
    total_new = _record_len(2)
    for cut in (100, 4096 + 10, total_new - 1):
        torn = new[:cut] + old[cut:]
        jpath.write_bytes(torn)
        assert j.read() is None, cut
    j.close()


@pytest.mark.parametrize("where", ["magic", "seq", "count", "number", "data", "csum",
                                   "tmagic"])
def test_corruption_reads_none(jpath, where):
    rng = random.Random(5)
    blocks = rand_blocks(rng, 4)
    j = Journal(jpath)
    j.write(9, blocks)
    raw = bytearray(jpath.read_bytes())
    total = len(raw)
    off = {"magic": 0, "seq": 9, "count": 16, "number": 21, "data": 4096 + 5000,
           "csum": total - 16, "tmagic": total - 3}[where]
    raw[off] ^= 0x40
    jpath.write_bytes(raw)
    assert j.read() is None
    j.close()


def test_huge_count_in_header_is_not_trusted(jpath):
    j = Journal(jpath)
    j.write(1, {5: ZERO})
    raw = bytearray(jpath.read_bytes())
    jmod._HDR.pack_into(raw, 0, jmod._MAGIC, 1, 2**31)
    jpath.write_bytes(raw)
    assert j.read() is None
    j.close()


def test_clear(jpath):
    j = Journal(jpath)
    j.write(3, {1: b"x" * BLOCK_SIZE})
    j.clear()
    assert j.read() is None
    assert jpath.stat().st_size == 0
    # usable again afterwards
    j.write(4, {2: b"y" * BLOCK_SIZE})
    assert j.read() == (4, {2: b"y" * BLOCK_SIZE})
    j.close()


def test_replay_applies_whole_record_and_clears(jpath):
    rng = random.Random(6)
    dev = MemDev(1000)
    dev.write(10, b"o" * BLOCK_SIZE)
    blocks = rand_blocks(rng, 20, maxblk=1000)
    blocks[10] = b"n" * BLOCK_SIZE
    j = Journal(jpath)
    j.write(5, blocks)
    assert FileSystem.replay_journal(dev, j) == len(blocks)
    for b, data in blocks.items():
        assert dev.read(b, 1) == data
    assert dev.flushes >= 1
    assert j.read() is None
    # idempotent: nothing left to replay
    assert FileSystem.replay_journal(dev, j) == 0
    j.close()


def test_replay_of_torn_record_changes_nothing(jpath):
    dev = MemDev(100)
    dev.write(3, b"o" * BLOCK_SIZE)
    j = Journal(jpath)
    j.write(5, {3: b"n" * BLOCK_SIZE, 4: b"m" * BLOCK_SIZE})
    os.truncate(jpath, jpath.stat().st_size - 1)
    assert FileSystem.replay_journal(dev, j) == 0
    assert dev.read(3, 1) == b"o" * BLOCK_SIZE
    assert dev.read(4, 1) == ZERO
    j.close()


def test_replay_twice_same_result(jpath):
    # a crash during replay (before clear) replays again: the result is the same
    rng = random.Random(7)
    blocks = rand_blocks(rng, 8, maxblk=64)
    j = Journal(jpath)
    j.write(1, blocks)
    dev1 = MemDev(64)
    for b, data in blocks.items():  # partially applied already
        dev1.write(b, data)
        break
    rec = j.read()
    assert rec == (1, blocks)
    FileSystem.replay_journal(dev1, j)
    dev2 = MemDev(64)
    j.write(1, blocks)
    FileSystem.replay_journal(dev2, j)
    FileSystem.replay_journal(dev2, j)
    assert dev1.blocks == dev2.blocks
    j.close()
