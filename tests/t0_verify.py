"""Tier 0: the pure parts of repfs/repl/verify.py: the tree's ranges, their hashes, the
owners of differing blocks on a real file system core (no mount)."""

from __future__ import annotations

import numpy as np

from repfs.repl import verify as V
from repfs.repl.verify import VerifyError, batches, check_ranges, hash_ranges, split, top_ranges

BS = 4096


def test_ranges_cover_the_volume_once():
    for nblocks in (1, 63, 64, 65, 16384, 1000003, 64 * V.TOP_RANGE + 5):
        top = top_ranges(nblocks)
        assert sum(c for _, c in top) == nblocks
        assert all(s + c == s2 for (s, c), (s2, _) in zip(top, top[1:]))
        assert all(0 < c <= V.TOP_RANGE for _, c in top)
        assert len(top) <= max(V.FANOUT, -(-nblocks // V.TOP_RANGE))
        for s, c in top[:3]:
            kids = split(s, c)
            assert kids[0][0] == s and sum(k for _, k in kids) == c
            assert all(a + k == b for (a, k), (b, _) in zip(kids, kids[1:]))
            assert len(kids) <= max(V.FANOUT, V.LEAF)
            if c <= V.LEAF:
                assert all(k == 1 for _, k in kids)
    for parts in batches(top_ranges(64 * V.TOP_RANGE) + [(0, 1)] * 3000):
        assert len(parts) <= V.MAX_RANGES
        assert len(parts) == 1 or sum(c for _, c in parts) <= V.MAX_REQUEST_BLOCKS


class Vol:
    """A volume in memory with a bitmap of the blocks in use."""

    def __init__(self, nblocks: int, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.data = bytearray(rng.integers(0, 256, nblocks * BS, dtype=np.uint8).tobytes())
        self.used = rng.random(nblocks) < 0.5

    def read(self, s, n):
        return bytes(self.data[s * BS:(s + n) * BS])

    def in_use(self, s, n):
        return self.used[s:s + n]

    def hashes(self, ranges):
        return hash_ranges(self.read, self.in_use, ranges)


def test_hashes_see_blocks_in_use_and_the_bitmap_but_not_free_blocks():
    a, b = Vol(1000), Vol(1000)
    ranges = top_ranges(1000)
    assert a.hashes(ranges) == b.hashes(ranges)
    free = int(np.flatnonzero(~b.used)[7])
    b.data[free * BS] ^= 1  # a free block differs: no difference
    assert a.hashes(ranges) == b.hashes(ranges)
    used = int(np.flatnonzero(b.used)[7])
    b.data[used * BS + 4095] ^= 0x80  # a block in use differs: its range alone
    got = [r for r, x, y in zip(ranges, a.hashes(ranges), b.hashes(ranges)) if x != y]
    assert len(got) == 1 and got[0][0] <= used < got[0][0] + got[0][1]
    b.data[used * BS + 4095] ^= 0x80
    b.used[free] = True  # in use on one side only (same bytes otherwise)
    got = [r for r, x, y in zip(ranges, a.hashes(ranges), b.hashes(ranges)) if x != y]
    assert len(got) == 1 and got[0][0] <= free < got[0][0] + got[0][1]


def test_check_ranges_refuses_what_is_outside_or_too_much():
    assert check_ranges([(0, 4), (10, 1)], 100) == [(0, 4), (10, 1)]
    for bad, nblocks in (([(0, 0)], 100), ([(99, 2)], 100),
                         ([(0, V.MAX_REQUEST_BLOCKS), (0, 1)], V.MAX_REQUEST_BLOCKS * 2)):
        try:
            check_ranges(bad, nblocks)
        except VerifyError as e:
            assert e.kind == "invalid"
        else:
            raise AssertionError(bad)


def test_owners_name_files_inodes_and_areas(core_fs):
    fs = core_fs
    root = fs.iget(1)
    d = fs.mkdir(1, b"dir", 0o755)
    f = fs.create(d.ino, b"f", 0o644)
    fs.write(f.ino, 0, b"x" * (3 * BS))
    fs.link(f.ino, 1, b"hard")
    fs.commit()
    from repfs.snap.diff import _Side
    blocks = _Side(fs).blocks(fs.iget(f.ino))
    sb = fs.sb
    iblk = sb.itable_start + f.ino // V.INODES_PER_BLOCK
    probe = np.array(sorted({0, sb.bbitmap_start, iblk, int(blocks[1]), sb.nblocks - 1}),
                     dtype=np.int64)
    inos: set[int] = set()
    own = V.owners(fs, probe, inos)
    assert own[0] == ["superblock"]
    assert own[sb.bbitmap_start] == ["block bitmap"]
    assert sorted(own[int(blocks[1])]) == ["/dir/f", "/hard"]
    assert "inode of /dir/f" in own[iblk] and "inode table" in own[iblk]
    assert own[sb.nblocks - 1] == []
    assert f.ino in inos
    runs = V.describe_runs(probe, own)
    assert [r["start"] for r in runs] == probe.tolist()
    assert root  # (the root was read)
