"""t0: file block maps (repfs.fs.blockmap) over an in-memory device and allocator."""

from __future__ import annotations

import errno
import random
import stat

import numpy as np
import pytest

from repfs.extents import mapped_runs
from repfs.fs.alloc import Allocator
from repfs.fs.blockmap import BlockMap
from repfs.fs.cache import MetaCache
from repfs.fs.errors import FSError
from repfs.fs.format import (
    BLOCK_SIZE, MAX_FILE_BLOCKS, MAX_FILE_SIZE, N_DIRECT, PTRS_PER_BLOCK, Inode, Superblock,
)
from tests.memdev import MemDev

ZERO = bytes(BLOCK_SIZE)
L1 = N_DIRECT  # first single-indirect block
L2 = L1 + PTRS_PER_BLOCK  # first double-indirect block
L3 = L2 + PTRS_PER_BLOCK**2  # first triple-indirect block
TIB = (1 << 40) // BLOCK_SIZE




class Env:
    def __init__(self, nblocks: int = 1 << 20, reserve: int = 0):
        self.sb = Superblock.layout(nblocks, 64)
        self.meta = MetaCache(MemDev(nblocks))
        self.alloc = Allocator(self.meta, self.sb, reserve)
        self.bmap = BlockMap(self.meta, self.alloc)
        self.inode = Inode(5, mode=stat.S_IFREG | 0o644)
        self.free0 = self.sb.free_blocks

    def mapping(self, inode=None):
        """(data dict lblk -> phys, list of indirect blocks) from a full walk."""
        inode = inode or self.inode
        data, meta = {}, []
        for kind, lblks, phys in self.bmap.walk(inode):
            if kind == "data":
                for lb, p in zip(np.asarray(lblks).tolist(), np.asarray(phys).tolist()):
                    assert lb not in data
                    data[lb] = p
            else:
                meta.append(int(phys))
        return data, meta

    def check(self, model: dict[int, int], inode=None, *, allow_empty_indirect=False) -> None:
        inode = inode or self.inode
        data, meta = self.mapping(inode)
        assert data == model
        assert inode.blocks == len(data) + len(meta)
        used = list(data.values()) + meta
        assert len(set(used)) == len(used), "a volume block is mapped twice"
        pending = {s + i for s, n in self.alloc.pending for i in range(n)}
        assert not pending & set(used), "a mapped block was freed"
        for b in used:
            assert self.sb.data_start <= b < self.sb.nblocks
            assert self.alloc.blocks.test(b)
        for m in meta if not allow_empty_indirect else ():  # no empty indirect block is kept
            assert np.frombuffer(self.meta.read(m), dtype=np.uint32).any(), m
        # every allocation is either mapped or waiting to be freed
        assert self.free0 - self.sb.free_blocks == len(used) + len(pending)
        # lookups agree with the model, range by range
        for lb, p in list(model.items())[:200]:
            assert int(self.bmap.lookup(inode, lb, 1)[0]) == p


def ensure_model(env: Env, model: dict, first: int, count: int, inode=None):
    inode = inode or env.inode
    phys, new = env.bmap.ensure(inode, first, count)
    assert len(phys) == count and len(new) == count
    assert (phys != 0).all()
    for i in range(count):
        lb = first + i
        if lb in model:
            assert not new[i] and int(phys[i]) == model[lb]
        else:
            assert new[i]
            model[lb] = int(phys[i])
    return phys, new


def truncate_model(env: Env, model: dict, keep: int, inode=None):
    env.bmap.truncate(inode or env.inode, keep)
    for lb in [lb for lb in model if lb >= keep]:
        del model[lb]


# ------------------------------------------------------------------------- lookups


def test_empty_map_is_all_holes():
    env = Env()
    for first in (0, L1 - 1, L2 - 3, L3 - 5, TIB, MAX_FILE_BLOCKS - 10):
        assert not env.bmap.lookup(env.inode, first, 10).any()
    assert env.inode.blocks == 0


def test_direct_blocks():
    env = Env()
    model = {}
    phys, new = ensure_model(env, model, 0, N_DIRECT)
    assert new.all()
    assert env.inode.map[:N_DIRECT] == phys.tolist()
    assert env.inode.map[N_DIRECT:] == [0, 0, 0]
    assert env.inode.blocks == N_DIRECT
    # contiguous on the volume
    assert mapped_runs(phys) == [(0, int(phys[0]), N_DIRECT)]
    env.check(model)


@pytest.mark.parametrize("first,count,meta_blocks", [
    (L1 - 2, 4, 1),  # direct -> single
    (L2 - 2, 4, 3),  # single -> double (single leaf, double root + leaf)
    (L2 + PTRS_PER_BLOCK - 2, 4, 3),  # two double leaves
    (L3 - 2, 4, 5),  # double -> triple (double root+leaf, triple root+mid+leaf)
    (L3 + PTRS_PER_BLOCK**2 - 1, 2, 5),  # two triple mid blocks
    (MAX_FILE_BLOCKS - 3, 3, 3),  # the very last blocks
])
def test_ranges_across_level_boundaries(first, count, meta_blocks):
    env = Env()
    model = {}
    ensure_model(env, model, first, count)
    data, meta = env.mapping()
    assert len(meta) == meta_blocks
    assert env.inode.blocks == count + meta_blocks
    env.check(model)
    # a lookup straddling the range reports holes around it
    end = min(first + count + 1, MAX_FILE_BLOCKS)
    look = env.bmap.lookup(env.inode, first - 1, end - first + 1)
    assert look[0] == 0 and (look[1:count + 1] != 0).all() and not look[count + 1:].any()
    truncate_model(env, model, first)
    assert env.inode.blocks == 0 and env.inode.map == [0] * 15
    env.check(model)


def test_holes_between_mapped_blocks():
    env = Env()
    model = {}
    for lb in (0, 7, 13, L2 + 5, L3 + 99):
        ensure_model(env, model, lb, 1)
    env.check(model)
    look = env.bmap.lookup(env.inode, 0, 20)
    assert np.flatnonzero(look).tolist() == [0, 7, 13]
    assert env.bmap.lookup(env.inode, L2, 10)[5] == model[L2 + 5]
    assert env.bmap.lookup(env.inode, L2, 10).tolist().count(0) == 9


def test_sparse_near_one_tib():
    env = Env()
    model = {}
    lb = TIB - 1  # the last block before 1 TiB, deep in the triple-indirect tree
    assert lb > L3
    ensure_model(env, model, lb, 2)  # crosses the 1 TiB boundary
    data, meta = env.mapping()
    assert len(meta) == 3  # triple root, one mid block, one leaf
    assert env.inode.blocks == 2 + len(meta)
    env.check(model)
    # everything else stays a hole, including both neighbours
    assert env.bmap.lookup(env.inode, lb - 1, 4).tolist()[::3] == [0, 0]
    assert not env.bmap.lookup(env.inode, 0, 64).any()
    truncate_model(env, model, lb + 1)
    env.check(model)
    assert env.inode.blocks == 1 + 3
    truncate_model(env, model, 0)
    env.check(model)
    assert env.inode.blocks == 0


def test_largest_file_last_block():
    env = Env()
    model = {}
    last = MAX_FILE_SIZE // BLOCK_SIZE - 1
    ensure_model(env, model, last, 1)
    env.check(model)
    assert env.inode.map[14] != 0 and env.inode.map[:14] == [0] * 14


def test_ensure_is_idempotent_and_fills_only_holes():
    env = Env()
    model = {}
    ensure_model(env, model, 3, 5)
    ensure_model(env, model, L1 + 10, 5)
    free = env.sb.free_blocks
    phys, new = ensure_model(env, model, 0, L1 + 20)
    assert int(new.sum()) == L1 + 20 - 10
    assert env.sb.free_blocks == free - (L1 + 20 - 10)
    phys2, new2 = env.bmap.ensure(env.inode, 0, L1 + 20)
    assert not new2.any() and (phys2 == phys).all()
    env.check(model)


def test_large_range_is_mostly_contiguous():
    env = Env()
    model = {}
    n = 3 * PTRS_PER_BLOCK + L2
    phys, _ = ensure_model(env, model, 0, n)
    env.check(model)
    # data blocks come out in a few long runs (indirect blocks interrupt them), never per block
    assert len(mapped_runs(phys)) < 12


def test_truncate_partial_leaves_and_indirect_blocks():
    env = Env()
    model = {}
    ensure_model(env, model, 0, L2 + 3 * PTRS_PER_BLOCK)
    # keep part of the second double-indirect leaf
    truncate_model(env, model, L2 + PTRS_PER_BLOCK + 17)
    env.check(model)
    data, meta = env.mapping()
    assert len(meta) == 1 + 1 + 2  # single, double root, two leaves
    truncate_model(env, model, L2 + PTRS_PER_BLOCK)  # exactly at a leaf boundary
    env.check(model)
    assert len(env.mapping()[1]) == 1 + 1 + 1
    truncate_model(env, model, L2 + 1)
    env.check(model)
    truncate_model(env, model, L2)  # the double tree goes away
    env.check(model)
    assert env.inode.map[13] == 0
    truncate_model(env, model, L1 + 1)
    assert env.inode.map[12] != 0
    truncate_model(env, model, L1)
    assert env.inode.map[12] == 0
    truncate_model(env, model, 5)
    env.check(model)
    assert env.inode.blocks == 5


def test_truncate_beyond_end_and_of_holes_is_harmless():
    env = Env()
    model = {}
    ensure_model(env, model, L3 + 5, 1)
    before = env.sb.free_blocks
    truncate_model(env, model, L3 + 1000)
    truncate_model(env, model, MAX_FILE_BLOCKS)
    assert env.alloc.pending == []
    assert env.sb.free_blocks == before
    env.check(model)


def test_truncate_frees_into_pending_only():
    env = Env()
    model = {}
    ensure_model(env, model, 0, 100)
    free_before = env.sb.free_blocks
    truncate_model(env, model, 0)
    freed = sum(n for _, n in env.alloc.pending)
    assert freed == 100 + 1  # data plus the single-indirect block
    assert env.sb.free_blocks == free_before  # not free until the commit
    env.alloc.apply_pending()
    assert env.sb.free_blocks == free_before + 101 == env.free0


def test_discard_drops_cached_content():
    env = Env()
    phys, _ = env.bmap.ensure(env.inode, 0, 2, data=False)
    for p in phys.tolist():
        env.meta.new(p)[:4] = b"dir!"
    env.bmap.truncate(env.inode, 0, discard=True)
    for p in phys.tolist():
        assert p not in env.meta.dirty


def test_enospc_keeps_map_consistent():
    env = Env(nblocks=400)
    model = {}
    free = env.sb.free_blocks
    with pytest.raises(FSError) as ei:
        env.bmap.ensure(env.inode, 0, free + 50)
    assert ei.value.errno == errno.ENOSPC
    # whatever got mapped is accounted for; nothing leaked (an indirect block allocated
    # before the data allocation failed may stay, empty)
    data, meta = env.mapping()
    model.update(data)
    env.check(model, allow_empty_indirect=True)
    truncate_model(env, model, 0)
    env.alloc.apply_pending()
    env.check(model)
    assert env.sb.free_blocks == env.free0


def test_two_inodes_never_share_blocks():
    env = Env()
    other = Inode(6, mode=stat.S_IFREG | 0o644)
    m1, m2 = {}, {}
    rng = random.Random(5)
    for _ in range(40):
        lb = rng.choice([0, 11, 12, L2 - 1, L2, L3, TIB]) + rng.randrange(0, 30)
        ensure_model(env, m1, lb, rng.randrange(1, 20))
        ensure_model(env, m2, lb, rng.randrange(1, 20), inode=other)
    d1, meta1 = env.mapping()
    d2, meta2 = env.mapping(other)
    all_blocks = list(d1.values()) + meta1 + list(d2.values()) + meta2
    assert len(set(all_blocks)) == len(all_blocks)


ZONES = [(0, 40), (L2 - 60, 120), (L2 + PTRS_PER_BLOCK - 30, 60), (L3 - 40, 80),
         (L3 + PTRS_PER_BLOCK**2 - 40, 80), (TIB - 20, 40), (MAX_FILE_BLOCKS - 50, 50)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_ensure_truncate_against_model(seed):
    rng = random.Random(seed)
    env = Env()
    model: dict[int, int] = {}
    for step in range(150):
        zs, zn = rng.choice(ZONES)
        if rng.random() < 0.7:
            first = zs + rng.randrange(zn)
            count = rng.randrange(1, min(zs + zn - first, 70) + 1)
            ensure_model(env, model, first, count)
        else:
            keep = rng.choice([0, zs + rng.randrange(zn + 1)])
            truncate_model(env, model, keep)
        if step % 10 == 0:
            env.alloc.apply_pending()
        env.check(model)
        # random range lookups match the model
        first = max(0, rng.choice(ZONES)[0] + rng.randrange(-5, 40))
        count = min(rng.randrange(1, 90), MAX_FILE_BLOCKS - first)
        got = env.bmap.lookup(env.inode, first, count).tolist()
        assert got == [model.get(first + i, 0) for i in range(count)], (seed, step)
    truncate_model(env, model, 0)
    env.alloc.apply_pending()
    env.check(model)
    assert env.inode.blocks == 0 and env.inode.map == [0] * 15
    assert env.sb.free_blocks == env.free0


def _one_leaf(first: int, count: int) -> bool:
    """Whether [first, first+count) lies in the direct pointers or in one indirect leaf."""
    if first + count <= N_DIRECT:
        return True
    return first >= N_DIRECT and (first - L1) // PTRS_PER_BLOCK == (
        first + count - 1 - L1) // PTRS_PER_BLOCK and not (first < L2 <= first + count - 1) \
        and not (first < L3 <= first + count - 1)


def zoned_map(rng, longest: int, mapped: float):
    """A block map over ZONES built piece by piece: pieces of 1 to `longest - 1` blocks,
    each mapped with probability `mapped` (else a hole). Returns (Env, model)."""
    env = Env()
    model: dict[int, int] = {}
    for zs, zn in ZONES:
        pos = zs
        while pos < zs + zn:
            n = rng.randrange(1, longest)
            if rng.random() < mapped:
                ensure_model(env, model, pos, min(n, zs + zn - pos))
            pos += n
    return env, model


@pytest.mark.parametrize("seed", [1, 2])
def test_contiguous_agrees_with_lookup(seed):
    """contiguous() (the small-I/O path, no numpy) gives the first volume block exactly when
    the range is mapped to consecutive blocks within one leaf, else 0; also for holes, breaks
    and ranges across leaves and levels."""
    rng = random.Random(seed)
    env, model = zoned_map(rng, 9, 0.75)  # mapped in pieces with holes between them
    hits = 0
    for _ in range(3000):
        zs, zn = rng.choice(ZONES)
        first = zs + rng.randrange(zn)
        count = rng.randrange(1, min(zs + zn - first, 40) + 1)
        phys = [model.get(first + i, 0) for i in range(count)]
        want = (phys[0] if phys[0] and phys == list(range(phys[0], phys[0] + count))
                and _one_leaf(first, count) else 0)
        assert env.bmap.contiguous(env.inode, first, count) == want, (first, count)
        hits += bool(want)
    assert hits > 300  # the case it exists for is covered, not only the fallbacks


def _leaf_id(lblk: int):
    """Which leaf holds logical block lblk (the direct pointers or one indirect leaf)."""
    if lblk < N_DIRECT:
        return (0, 0)
    for k, start in ((3, L3), (2, L2), (1, L1)):
        if lblk >= start:
            return (k, (lblk - start) // PTRS_PER_BLOCK)


@pytest.mark.parametrize("seed", [1, 2])
def test_extents_agrees_with_lookup(seed):
    """extents() (large reads of a sequential file, no numpy) gives the range's volume
    extents exactly when it has no hole and each of its leaf segments is one consecutive
    run, else None; it is what large sequential reads across a leaf boundary use."""
    rng = random.Random(seed)
    env, model = zoned_map(rng, 40, 0.8)  # sequential runs (leaf blocks between) and holes
    multi = hits = 0
    for _ in range(2000):
        zs, zn = rng.choice(ZONES)
        first = zs + rng.randrange(zn)
        count = rng.randrange(1, zs + zn - first + 1)
        phys = [model.get(first + i, 0) for i in range(count)]
        want = []
        ok = all(phys)
        i = 0
        while ok and i < count:  # one consecutive run per leaf segment, merged if adjacent
            j = i
            while j + 1 < count and _leaf_id(first + j + 1) == _leaf_id(first + i):
                j += 1
            seg = phys[i: j + 1]
            ok = seg == list(range(seg[0], seg[0] + len(seg)))
            if want and want[-1][0] + want[-1][1] == seg[0]:
                want[-1] = (want[-1][0], want[-1][1] + len(seg))
            else:
                want.append((seg[0], len(seg)))
            i = j + 1
        got = env.bmap.extents(env.inode, first, count)
        assert got == (want if ok else None), (first, count)
        hits += got is not None
        multi += got is not None and len(got) > 1
    assert hits > 200 and multi > 20  # both the merged and the split case are covered


@pytest.mark.parametrize("seed", [1, 2])
def test_fill_holes_maps_a_run_of_holes_or_changes_nothing(seed):
    """fill_holes() (the path for fresh pages written back by the kernel) maps a range that
    is all holes within one leaf, in logical order, exactly as the model expects; any other
    range (a mapped block in it, across leaves) is refused and nothing changes."""
    rng = random.Random(seed)
    env = Env()
    model: dict[int, int] = {}
    filled = refused = 0
    for _ in range(400):
        zs, zn = rng.choice(ZONES)
        first = zs + rng.randrange(zn)
        count = rng.randrange(2, min(zs + zn - first, 40) + 2)
        if first + count > MAX_FILE_BLOCKS:
            continue
        before = (list(env.inode.map), env.inode.blocks, env.sb.free_blocks)
        extents = env.bmap.fill_holes(env.inode, first, count)
        holes = all(first + i not in model for i in range(count))
        if extents is None:
            assert not holes or not _one_leaf(first, count), (first, count)
            assert (list(env.inode.map), env.inode.blocks, env.sb.free_blocks) == before
            refused += 1
            continue
        assert holes and _one_leaf(first, count)
        got = [s + i for s, n in extents for i in range(n)]
        assert len(got) == count
        for i, p in enumerate(got):
            model[first + i] = p
        filled += 1
        env.check(model)
    assert filled > 20 and refused > 20
