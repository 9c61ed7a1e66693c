"""Bitmap allocation of blocks and inodes.

The bitmaps live in volume blocks and are read and modified through the metadata cache, one
4 KiB bitmap block (32768 bits) at a time, with numpy doing the bit work. A next-fit cursor
keeps sequential files contiguous; nothing is held in memory per block of the volume.

Freed blocks are not reusable until the transaction that freed them has committed: they are
queued in ``pending``, cleared in the closing transaction's bitmap by ``apply_pending`` and
held as used in the running one (``quarantine``) until that commit point has passed. Otherwise a
crash could leave a committed file pointing at a block that new, uncommitted data overwrote.
"""

from __future__ import annotations

import errno

import numpy as np

from ..extents import runs
from .errors import FSError
from .format import BLOCK_SIZE, INODES_PER_BLOCK

BITS_PER_BLOCK = BLOCK_SIZE * 8


NoSpace = FSError  # raised with errno ENOSPC


def _set_bits(buf, off: int, n: int, value: bool) -> None:
    """Set or clear bits [off, off+n) of a bytearray: whole bytes at once, ends bit by bit."""
    end = off + n
    while off < end and off & 7:
        _one(buf, off, value)
        off += 1
    nbytes = (end - off) >> 3
    if nbytes:
        a = off >> 3
        buf[a: a + nbytes] = (b"\xff" if value else b"\0") * nbytes
        off += nbytes << 3
    while off < end:
        _one(buf, off, value)
        off += 1


def _one(buf, b: int, value: bool) -> None:
    if value:
        buf[b >> 3] |= 1 << (b & 7)
    else:
        buf[b >> 3] &= ~(1 << (b & 7)) & 0xFF


class Bitmap:
    """A bitmap spread over consecutive metadata blocks, covering `nbits` bits."""

    def __init__(self, meta, start_block: int, nbits: int, first_usable: int):
        self.meta = meta
        self.start = start_block
        self.nbits = nbits
        self.first = first_usable
        self.cursor = first_usable

    def _bits(self, idx: int) -> np.ndarray:
        return np.frombuffer(self.meta.read(self.start + idx), dtype=np.uint8)

    def test(self, bit: int) -> bool:
        buf = self.meta.read(self.start + bit // BITS_PER_BLOCK)
        off = bit % BITS_PER_BLOCK
        return bool(buf[off >> 3] >> (off & 7) & 1)

    def set_range(self, bit: int, count: int, value: bool) -> None:
        """Set or clear `count` bits from `bit`; the caller knows they are all the other value."""
        while count:
            idx, off = divmod(bit, BITS_PER_BLOCK)
            n = min(count, BITS_PER_BLOCK - off)
            _set_bits(self.meta.modify(self.start + idx), off, n, value)
            bit += n
            count -= n

    def find_free(self, want: int, goal: int | None = None) -> list[tuple[int, int]]:
        """Up to `want` free bits as extents (start, count), searching next-fit from `goal`.

        Does not mark them; returns fewer than `want` only when the bitmap is full. Whole
        bytes of set bits are skipped with numpy; only bytes with a free bit are looked into.
        """
        if goal is None or not (self.first <= goal < self.nbits):
            goal = self.cursor
        if want == 1:  # the common case: a free bit in the goal's own byte, or else in
            # the cursor's (random writes: the goal is usually taken), without numpy
            for at in (goal, self.cursor):
                idx, off = divmod(at, BITS_PER_BLOCK)
                free = ~self.meta.read(self.start + idx)[off >> 3] & (0xFF << (off & 7)) & 0xFF
                if free:
                    b = at - (off & 7) + (free & -free).bit_length() - 1
                    if b < self.nbits:
                        self.cursor = b + 1 if b + 1 < self.nbits else self.first
                        return [(b, 1)]
        nblk = -(-self.nbits // BITS_PER_BLOCK)
        got: list[int] = []
        start_idx = goal // BITS_PER_BLOCK
        for step in range(nblk + 1):
            idx = (start_idx + step) % nblk
            lo = idx * BITS_PER_BLOCK
            lo_bit = max(self.first - lo, 0)
            hi_bit = min(self.nbits - lo, BITS_PER_BLOCK)
            if step == 0:
                lo_bit = max(lo_bit, goal - lo)
            elif step == nblk:  # wrapped around to the goal's block: search below the goal
                hi_bit = min(hi_bit, goal - lo)
            if hi_bit <= lo_bit:
                continue
            raw = self._bits(idx)
            b0, b1 = lo_bit >> 3, (hi_bit + 7) >> 3
            cand = np.flatnonzero(raw[b0:b1] != 0xFF)
            if not len(cand):
                continue
            need = want - len(got)
            if need <= 64:  # small: look into candidate bytes one by one
                # each candidate byte has a free bit (only the first and the last may hold
                # theirs outside [lo_bit, hi_bit)), so need + 2 of them are enough
                for c in cand[: need + 2].tolist():
                    byte = int(raw[b0 + c])
                    base = (b0 + c) << 3
                    for k in range(8):
                        b = base + k
                        if not byte >> k & 1 and lo_bit <= b < hi_bit:
                            got.append(lo + b)
                            if len(got) == want:
                                break
                    if len(got) == want:
                        break
            else:
                first = b0 + int(cand[0])
                bits = np.unpackbits(raw[first:b1], bitorder="little")
                free = np.flatnonzero(bits == 0) + (first << 3)
                free = free[(free >= lo_bit) & (free < hi_bit)][:need]
                got.extend((free + lo).tolist())
            if len(got) == want:
                break
        if not got:
            return []
        if got[-1] - got[0] == len(got) - 1:  # one run (found in increasing order)
            out = [(got[0], len(got))]
        else:
            out = [(s, n) for _, s, n in runs(np.array(got, dtype=np.int64))]
        last_s, last_n = out[-1]
        self.cursor = last_s + last_n if last_s + last_n < self.nbits else self.first
        return out

    def count_set(self) -> int:
        nblk = -(-self.nbits // BITS_PER_BLOCK)
        total = 0
        for idx in range(nblk):
            bits = np.unpackbits(self._bits(idx), bitorder="little")
            hi = min(self.nbits - idx * BITS_PER_BLOCK, BITS_PER_BLOCK)
            total += int(bits[:hi].sum())
        return total


class Allocator:
    """Allocates volume blocks and inode numbers; keeps the superblock's free counts exact."""

    def __init__(self, meta, sb, reserve_blocks: int):
        self.sb = sb
        self.blocks = Bitmap(meta, sb.bbitmap_start, sb.nblocks, sb.data_start)
        self.inodes = Bitmap(meta, sb.ibitmap_start, sb.ninodes, 1)
        self.reserve = reserve_blocks
        self.pending: list[tuple[int, int]] = []  # freed, reusable after commit
        self.held: list[tuple[int, int]] = []  # freed by the committing transaction

    def alloc_blocks(self, count: int, goal: int | None = None, *, data: bool = True):
        """Allocate `count` blocks as extents. Data allocations leave the metadata reserve."""
        floor = self.reserve if data else 0
        if self.sb.free_blocks - count < floor:
            raise NoSpace(errno.ENOSPC)
        extents = self.blocks.find_free(count, goal)
        got = sum(n for _, n in extents)
        if got < count:  # the free count and the bitmap disagree: never hand out less
            raise NoSpace(errno.ENOSPC)
        for s, n in extents:
            self.blocks.set_range(s, n, True)
        self.sb.free_blocks -= count
        return extents

    def free_blocks(self, extents) -> None:
        self.pending.extend(extents)

    def apply_pending(self) -> list[tuple[int, int]]:
        """At commit: the freed blocks become free in this transaction. Returns them."""
        freed = self.pending
        for s, n in freed:
            self.blocks.set_range(s, n, False)
            self.sb.free_blocks += n
        self.pending = []
        return freed

    def quarantine(self, extents) -> None:
        """Hold blocks (free in the closing transaction) as used in the running one until the
        closing transaction's commit point has passed."""
        for s, n in extents:
            self.blocks.set_range(s, n, True)
            self.sb.free_blocks -= n
        self.held = list(extents)

    def release_quarantine(self) -> None:
        for s, n in getattr(self, "held", ()):
            self.blocks.set_range(s, n, False)
            self.sb.free_blocks += n
        self.held = []

    def alloc_inode(self) -> int:
        if self.sb.free_inodes <= 0:
            raise NoSpace(errno.ENOSPC)
        ext = self.inodes.find_free(1)
        if not ext:
            raise NoSpace(errno.ENOSPC)
        ino = ext[0][0]
        self.inodes.set_range(ino, 1, True)
        self.sb.free_inodes -= 1
        # Inode-table blocks count as valid data (block bitmap) once an inode in them was
        # used, so snapshots and replication skip the never-used part of the table.
        tblk = self.sb.itable_start + ino // INODES_PER_BLOCK
        if not self.blocks.test(tblk):
            self.blocks.set_range(tblk, 1, True)
        return ino

    def free_inode(self, ino: int) -> None:
        self.inodes.set_range(ino, 1, False)
        self.sb.free_inodes += 1
