"""t0: block and inode allocation (repfs.fs.alloc) over an in-memory device."""

from __future__ import annotations

import errno
import random

import numpy as np
import pytest

from repfs.extents import mapped_runs, runs
from repfs.fs.alloc import BITS_PER_BLOCK, Allocator, Bitmap
from repfs.fs.cache import MetaCache
from repfs.fs.errors import FSError
from repfs.fs.format import BLOCK_SIZE, INODES_PER_BLOCK, Superblock
from tests.memdev import MemDev

ZERO = bytes(BLOCK_SIZE)




def make_bitmap(nbits: int, first: int = 0):
    nblk = -(-nbits // BITS_PER_BLOCK)
    meta = MetaCache(MemDev(nblk + 1))
    return Bitmap(meta, 1, nbits, first), meta


def set_bits_ref(bm: Bitmap) -> set[int]:
    return {b for b in range(bm.nbits) if bm.test(b)}


# ------------------------------------------------------------------------- runs


def test_runs_empty_and_single():
    assert runs(np.zeros(0, dtype=np.uint32)) == []
    assert runs(np.array([7], dtype=np.uint32)) == [(0, 7, 1)]


def test_runs_breaks():
    vals = np.array([5, 6, 7, 10, 11, 3, 3, 4], dtype=np.uint32)
    assert runs(vals) == [(0, 5, 3), (3, 10, 2), (5, 3, 1), (6, 3, 2)]


def test_runs_do_not_wrap_at_uint32_limit():
    vals = np.array([2**32 - 2, 2**32 - 1, 0, 1], dtype=np.uint32)
    assert runs(vals) == [(0, 2**32 - 2, 2), (2, 0, 2)]


def test_runs_random_against_reference():
    rng = random.Random(3)
    for _ in range(200):
        vals = sorted(rng.sample(range(500), rng.randrange(1, 100)))
        got = runs(np.array(vals, dtype=np.uint32))
        # rebuild the list from the runs
        rebuilt = [s + i for _, s, n in got for i in range(n)]
        assert rebuilt == vals
        assert [i for i, _, _ in got] == [sum(n for _, _, n in got[:k]) for k in range(len(got))]
        for (_, s1, n1), (_, s2, _) in zip(got, got[1:]):
            assert s1 + n1 != s2  # maximal


def test_mapped_runs():
    phys = np.array([0, 10, 11, 0, 12, 13, 20, 0, 0], dtype=np.uint32)
    # 12 follows 11 on the volume but a hole lies between them in the file: two runs
    assert mapped_runs(phys) == [(1, 10, 2), (4, 12, 2), (6, 20, 1)]
    assert mapped_runs(np.zeros(5, dtype=np.uint32)) == []
    assert mapped_runs(np.array([9, 8, 7], dtype=np.uint32)) == [(0, 9, 1), (1, 8, 1), (2, 7, 1)]
    assert mapped_runs(np.array([2**32 - 1, 1], dtype=np.uint32)) == [(0, 2**32 - 1, 1),
                                                                       (1, 1, 1)]


def test_mapped_runs_random_against_reference():
    rng = random.Random(4)
    for _ in range(200):
        n = rng.randrange(1, 60)
        phys = [0] * n
        nxt = rng.randrange(1, 1000)
        for i in range(n):
            r = rng.random()
            if r < 0.3:
                continue
            if r < 0.5:
                nxt = rng.randrange(1, 1000)
            phys[i] = nxt
            nxt += 1
        ref = []
        for i, p in enumerate(phys):
            if p and ref and ref[-1][0] + ref[-1][2] == i and ref[-1][1] + ref[-1][2] == p:
                ref[-1] = (ref[-1][0], ref[-1][1], ref[-1][2] + 1)
            elif p:
                ref.append((i, p, 1))
        assert mapped_runs(np.array(phys, dtype=np.uint32)) == ref


# ------------------------------------------------------------------------- Bitmap


def test_set_range_and_test_across_block_boundary():
    bm, _ = make_bitmap(3 * BITS_PER_BLOCK)
    bm.set_range(BITS_PER_BLOCK - 5, 10, True)
    assert set_bits_ref(bm) == set(range(BITS_PER_BLOCK - 5, BITS_PER_BLOCK + 5))
    assert bm.count_set() == 10
    bm.set_range(BITS_PER_BLOCK - 2, 4, False)
    assert bm.count_set() == 6
    assert not bm.test(BITS_PER_BLOCK) and bm.test(BITS_PER_BLOCK + 2)


def test_bit_order_is_little_endian_within_byte():
    bm, meta = make_bitmap(64)
    bm.set_range(3, 1, True)
    bm.set_range(9, 1, True)
    raw = meta.read(1)
    assert raw[0] == 0b00001000 and raw[1] == 0b00000010


def test_find_free_does_not_mark():
    bm, _ = make_bitmap(1000)
    assert bm.find_free(10) == [(0, 10)]
    assert bm.count_set() == 0


def test_find_free_respects_first_usable_and_nbits():
    bm, _ = make_bitmap(100, first=40)
    got = bm.find_free(1000, goal=0)  # goal below first -> cursor
    assert got == [(40, 60)]
    assert sum(n for _, n in got) == 60


def test_find_free_next_fit_cursor():
    bm, _ = make_bitmap(1000, first=10)
    a = bm.find_free(5)
    assert a == [(10, 5)]
    bm.set_range(10, 5, True)
    b = bm.find_free(5)
    assert b == [(15, 5)]
    # the cursor moved on even though nothing was marked: next-fit
    c = bm.find_free(5)
    assert c == [(20, 5)]


def test_find_free_goal():
    bm, _ = make_bitmap(5000)
    bm.set_range(0, 100, True)
    assert bm.find_free(3, goal=2000) == [(2000, 3)]
    assert bm.find_free(3, goal=50) == [(100, 3)]


def test_find_free_skips_used_bits_and_splits_extents():
    bm, _ = make_bitmap(200)
    bm.set_range(0, 200, True)
    for s, n in [(10, 3), (20, 1), (50, 5)]:
        bm.set_range(s, n, False)
    assert bm.find_free(9, goal=0) == [(10, 3), (20, 1), (50, 5)]
    assert bm.find_free(4, goal=0) == [(10, 3), (20, 1)]


def test_find_free_wraparound_within_one_block():
    bm, _ = make_bitmap(1000, first=8)
    bm.set_range(8, 992, True)
    bm.set_range(20, 4, False)  # free bits only below the goal
    got = bm.find_free(4, goal=500)
    assert got == [(20, 4)]
    # the goal itself and bits above it are re-checked only once
    assert bm.find_free(5, goal=500) == [(20, 4)]


def test_find_free_wraparound_multi_block():
    nbits = 3 * BITS_PER_BLOCK + 123
    bm, _ = make_bitmap(nbits, first=17)
    bm.set_range(17, nbits - 17, True)
    free = [17, 18, BITS_PER_BLOCK + 7, 2 * BITS_PER_BLOCK + 100, nbits - 1]
    for b in free:
        bm.set_range(b, 1, False)
    goal = 2 * BITS_PER_BLOCK + 5000  # beyond some of them: wrap to find the rest
    got = bm.find_free(10, goal=goal)
    got_bits = [s + i for s, n in got for i in range(n)]
    assert sorted(got_bits) == free
    assert len(got_bits) == len(set(got_bits))
    # the search starts at the goal: the first bit found is the first free one after it
    assert got_bits[0] == nbits - 1
    # below-the-goal part of the goal's block is searched last
    assert got_bits[-1] == 2 * BITS_PER_BLOCK + 100


def test_find_free_full_bitmap():
    for nbits in (100, BITS_PER_BLOCK, 2 * BITS_PER_BLOCK + 5):
        bm, _ = make_bitmap(nbits, first=1)
        bm.set_range(1, nbits - 1, True)
        assert bm.find_free(1) == []
        assert bm.find_free(1, goal=nbits // 2) == []
        bm.set_range(0, 1, False)  # below first_usable: never handed out
        assert bm.find_free(1) == []


def test_find_free_last_bit():
    nbits = 2 * BITS_PER_BLOCK + 3
    bm, _ = make_bitmap(nbits)
    bm.set_range(0, nbits - 1, True)
    assert bm.find_free(1, goal=5) == [(nbits - 1, 1)]
    assert bm.find_free(2) == [(nbits - 1, 1)]


def test_find_free_random_against_reference():
    rng = random.Random(11)
    for trial in range(30):
        nbits = rng.choice([64, 1000, BITS_PER_BLOCK + 77, 2 * BITS_PER_BLOCK])
        first = rng.randrange(0, 40)
        bm, _ = make_bitmap(nbits, first)
        used = set()
        for _ in range(20):
            s = rng.randrange(first, nbits)
            n = rng.randrange(1, min(3000, nbits - s) + 1)
            newly = np.array([b for b in range(s, s + n) if b not in used], dtype=np.uint32)
            for _, start, cnt in runs(newly):
                bm.set_range(start, cnt, True)
            used.update(newly.tolist())
        free = sorted(set(range(first, nbits)) - used)
        want = rng.randrange(1, 3000)
        goal = rng.randrange(0, nbits)
        got = bm.find_free(want, goal)
        got_bits = [s + i for s, n in got for i in range(n)]
        assert len(got_bits) == min(want, len(free)), trial
        assert len(set(got_bits)) == len(got_bits)
        assert set(got_bits) <= set(free)
        assert all(n > 0 for _, n in got)


# ------------------------------------------------------------------------- Allocator


def make_alloc(nblocks=2000, ninodes=64, reserve=10):
    sb = Superblock.layout(nblocks, ninodes)
    meta = MetaCache(MemDev(nblocks))
    # as mkfs: metadata regions valid, inode 0 reserved
    Bitmap(meta, sb.bbitmap_start, nblocks, 0).set_range(0, sb.itable_start, True)
    Bitmap(meta, sb.ibitmap_start, ninodes, 0).set_range(0, 1, True)
    return Allocator(meta, sb, reserve), sb


def test_alloc_blocks_marks_and_counts():
    a, sb = make_alloc()
    free0 = sb.free_blocks
    ext = a.alloc_blocks(30)
    assert sum(n for _, n in ext) == 30
    for s, n in ext:
        assert s >= sb.data_start
        for b in range(s, s + n):
            assert a.blocks.test(b)
    assert sb.free_blocks == free0 - 30
    ext2 = a.alloc_blocks(5)
    bits1 = {s + i for s, n in ext for i in range(n)}
    bits2 = {s + i for s, n in ext2 for i in range(n)}
    assert not bits1 & bits2


def test_alloc_blocks_goal_contiguous():
    a, sb = make_alloc()
    (s, n), = a.alloc_blocks(10, goal=sb.data_start + 500)
    assert (s, n) == (sb.data_start + 500, 10)
    (s2, _), = a.alloc_blocks(1, goal=s + n)
    assert s2 == s + n


def test_freed_blocks_not_reusable_before_apply_pending():
    a, sb = make_alloc(nblocks=300, reserve=0)
    total = sb.free_blocks
    ext = a.alloc_blocks(total)
    assert sb.free_blocks == 0
    victim = ext[0][0]
    a.free_blocks([(victim, 1)])
    assert a.pending == [(victim, 1)]
    assert sb.free_blocks == 0
    assert a.blocks.test(victim)  # still set in the bitmap
    with pytest.raises(FSError) as ei:
        a.alloc_blocks(1, data=False)
    assert ei.value.errno == errno.ENOSPC
    assert a.blocks.find_free(1) == []
    a.apply_pending()
    assert a.pending == [] and sb.free_blocks == 1
    assert not a.blocks.test(victim)
    assert a.alloc_blocks(1) == [(victim, 1)]
    assert sb.free_blocks == 0


def test_pending_frees_interleaved_with_allocation():
    a, sb = make_alloc(nblocks=400, reserve=0)
    free0 = sb.free_blocks
    ext = a.alloc_blocks(100)
    blocks = [s + i for s, n in ext for i in range(n)]
    a.free_blocks([(b, 1) for b in blocks[::2]])
    new = a.alloc_blocks(sb.free_blocks)
    new_bits = {s + i for s, n in new for i in range(n)}
    assert not new_bits & set(blocks)  # nothing freed in this transaction was handed out
    a.apply_pending()
    assert sb.free_blocks == 50
    again = a.alloc_blocks(50)
    assert {s + i for s, n in again for i in range(n)} == set(blocks[::2])
    assert sb.free_blocks == 0 and free0 == 100 + len(new_bits) + 0


def test_enospc_leaves_state_unchanged():
    a, sb = make_alloc(nblocks=500, reserve=10)
    free0 = sb.free_blocks
    snapshot = a.blocks.count_set()
    with pytest.raises(FSError) as ei:
        a.alloc_blocks(free0 - 10 + 1)
    assert ei.value.errno == errno.ENOSPC
    assert sb.free_blocks == free0 and a.blocks.count_set() == snapshot
    # exactly down to the reserve works for data
    a.alloc_blocks(free0 - 10)
    with pytest.raises(FSError):
        a.alloc_blocks(1)
    # metadata may use the reserve
    a.alloc_blocks(10, data=False)
    assert sb.free_blocks == 0
    with pytest.raises(FSError) as ei:
        a.alloc_blocks(1, data=False)
    assert ei.value.errno == errno.ENOSPC


def test_alloc_refuses_when_count_and_bitmap_disagree():
    a, sb = make_alloc(nblocks=300, reserve=0)
    a.alloc_blocks(sb.free_blocks)
    sb.free_blocks = 5  # a lying count must not make it hand out used blocks
    with pytest.raises(FSError):
        a.alloc_blocks(1)


def test_alloc_inode_and_table_block_marking():
    a, sb = make_alloc(nblocks=2000, ninodes=64)
    free0 = sb.free_inodes
    got = [a.alloc_inode() for _ in range(40)]
    assert got == list(range(1, 41))
    assert sb.free_inodes == free0 - 40
    for ino in got:
        assert a.inodes.test(ino)
        assert a.blocks.test(sb.itable_start + ino // INODES_PER_BLOCK)
    # the never-used table block (inodes 48..63) stays unmarked
    assert not a.blocks.test(sb.itable_start + 3)
    a.free_inode(7)
    assert sb.free_inodes == free0 - 39
    assert not a.inodes.test(7)
    while True:
        ino = a.alloc_inode()
        if ino == 7:
            break
    assert a.inodes.test(7)


def test_alloc_inode_enospc():
    a, sb = make_alloc(ninodes=16)
    got = {a.alloc_inode() for _ in range(15)}
    assert got == set(range(1, 16)) and sb.free_inodes == 0
    with pytest.raises(FSError) as ei:
        a.alloc_inode()
    assert ei.value.errno == errno.ENOSPC
    a.free_inode(9)
    assert a.alloc_inode() == 9
    # count says free but bitmap is full: still ENOSPC, never inode 0
    sb.free_inodes = 3
    with pytest.raises(FSError):
        a.alloc_inode()
