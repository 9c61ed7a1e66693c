"""File block maps: logical block -> volume block, with holes (pointer 0).

The map of an inode is a radix tree rooted in ``Inode.map``: 12 direct pointers, then a single,
double and triple indirect tree of 1024-pointer blocks (``format.MAP_LEVEL_SPAN``). Every
operation works on ranges: a range is cut into segments that fall in one leaf (the direct
pointers or one bottom-level indirect block), and each segment is handled as a numpy slice, so
no Python loop runs per data block.
"""

from __future__ import annotations

import struct

import numpy as np

from ..extents import runs
from .format import MAP_LEVEL_SPAN, N_DIRECT, PTRS_PER_BLOCK, FormatError

_LEVEL_START = [0]
for _span in MAP_LEVEL_SPAN[:-1]:
    _LEVEL_START.append(_LEVEL_START[-1] + _span)


def _level_of(lblk: int) -> int:
    for k in (3, 2, 1):
        if lblk >= _LEVEL_START[k]:
            return k
    return 0


def _extents_to_array(extents) -> np.ndarray:
    return np.concatenate([np.arange(s, s + n, dtype=np.uint32) for s, n in extents])


def _segments(first: int, count: int):
    """Yield (level, lblk, n): pieces of [first, first+count) that each lie in one leaf."""
    end = first + count
    pos = first
    while pos < end:
        k = _level_of(pos)
        if k == 0:
            n = min(end, N_DIRECT) - pos
        else:
            rel = pos - _LEVEL_START[k]
            n = min(end - pos, PTRS_PER_BLOCK - rel % PTRS_PER_BLOCK)
        yield k, pos, n
        pos += n


_U32 = struct.Struct("<I")


def _digits(rel: int, depth: int) -> list[int]:
    """Indices from the top indirect block down to the leaf for a relative logical block."""
    out = []
    for d in range(depth - 1, -1, -1):
        out.append(rel // PTRS_PER_BLOCK**d % PTRS_PER_BLOCK)
    return out


class BlockMap:
    def __init__(self, meta, alloc):
        self.meta = meta
        self.alloc = alloc

    # Every pointer read from an inode or an indirect block is checked against the data area
    # before it is followed, written through or freed: a damaged map must fail the request
    # (EIO), not read the inode table as an indirect block, write a file's data over it, or
    # free the bitmap's own blocks (found by tests/t1_fuzz_core.py).

    def _damaged(self, inode) -> FormatError:
        return FormatError(f"inode {getattr(inode, 'ino', '?')}: its block map points outside "
                           f"the data area")

    def _ptr(self, inode, ptr: int) -> int:
        sb = self.alloc.sb
        if ptr and not sb.data_start <= ptr < sb.nblocks:
            raise self._damaged(inode)
        return ptr

    def _ptrs(self, inode, arr: np.ndarray) -> np.ndarray:
        if len(arr):
            sb = self.alloc.sb
            hi = int(arr.max())
            if hi >= sb.nblocks or (hi and int(arr[arr != 0].min()) < sb.data_start):
                raise self._damaged(inode)
        return arr

    def _ptr_block(self, inode, ptr: int) -> np.ndarray:
        """The pointers held by indirect block `ptr` (checked)."""
        return self._ptrs(inode, np.frombuffer(self.meta.read(self._ptr(inode, ptr)),
                                               dtype=np.uint32))

    # ------------------------------------------------------------------ lookups

    def _leaf_block(self, inode, k: int, lblk: int) -> tuple[int, int]:
        """(leaf indirect block or 0 for a hole, index in it) for level k >= 1."""
        rel = lblk - _LEVEL_START[k]
        digits = _digits(rel, k)
        ptr = self._ptr(inode, inode.map[N_DIRECT + k - 1])
        for d in digits[:-1]:
            if ptr == 0:
                return 0, digits[-1]
            ptr = self._ptr(inode, _U32.unpack_from(self.meta.read(ptr), 4 * d)[0])
        return ptr, digits[-1]

    def contiguous(self, inode, first: int, count: int) -> int:
        """The volume block of logical block `first` if the whole range is mapped to
        consecutive volume blocks within one leaf, else 0 (a hole, a break, or a range
        across leaves: use lookup). The small-I/O path: no numpy, whose per-call cost is
        several times a 4 KiB pwrite's for ranges this short."""
        if first < N_DIRECT:
            if first + count > N_DIRECT:
                return 0
            ptrs = inode.map[first: first + count]
        else:
            k = _level_of(first)
            rel = first - _LEVEL_START[k]
            idx = rel % PTRS_PER_BLOCK
            if idx + count > PTRS_PER_BLOCK:
                return 0
            leaf, idx = self._leaf_block(inode, k, first)
            if not leaf:
                return 0
            ptrs = struct.unpack_from(f"<{count}I", self.meta.read(leaf), 4 * idx)
        p = ptrs[0]
        if not p or (count > 1 and ptrs[-1] - p != count - 1):
            return 0
        if count > 2 and list(ptrs) != list(range(p, p + count)):
            return 0
        sb = self.alloc.sb
        if not sb.data_start <= p or p + count > sb.nblocks:
            raise self._damaged(inode)
        return p

    def extents(self, inode, first: int, count: int) -> list[tuple[int, int]] | None:
        """The range as volume extents [(start, n)] in logical order when it has no hole and
        each of its leaf segments is one consecutive run (a file written sequentially: a
        large read crosses a leaf boundary, where the indirect block sits between two runs),
        else None (use lookup). Like contiguous: no numpy."""
        out: list[tuple[int, int]] = []
        for _, pos, n in _segments(first, count):
            p = self.contiguous(inode, pos, n)
            if not p:
                return None
            if out and out[-1][0] + out[-1][1] == p:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((p, n))
        return out

    def lookup(self, inode, first: int, count: int) -> np.ndarray:
        """Volume block of each logical block in the range (0 for a hole)."""
        out = np.zeros(count, dtype=np.uint32)
        for k, pos, n in _segments(first, count):
            o = pos - first
            if k == 0:
                out[o: o + n] = inode.map[pos: pos + n]
                continue
            leaf, idx = self._leaf_block(inode, k, pos)
            if leaf:
                out[o: o + n] = np.frombuffer(self.meta.read(leaf), dtype=np.uint32)[idx: idx + n]
        return self._ptrs(inode, out)

    def indirect_needed(self, inode, first: int, count: int, holes: np.ndarray) -> int:
        """How many indirect blocks `ensure` would allocate to fill the holes of the range."""
        missing = set()
        for k, pos, n in _segments(first, count):
            o = pos - first
            if k == 0 or not holes[o: o + n].any():
                continue
            digits = _digits(pos - _LEVEL_START[k], k)
            ptr = self._ptr(inode, inode.map[N_DIRECT + k - 1])
            if ptr == 0:
                missing.update((k, tuple(digits[:d])) for d in range(k))
                continue
            for depth, d in enumerate(digits[:-1]):
                child = self._ptr(inode, int(np.frombuffer(self.meta.read(ptr),
                                                           dtype=np.uint32)[d]))
                if child == 0:
                    missing.update((k, tuple(digits[:dd])) for dd in range(depth + 1, k))
                    break
                ptr = child
        return len(missing)

    # ------------------------------------------------------------------ allocation

    def _new_meta_block(self, inode, goal) -> int:
        (s, _), = self.alloc.alloc_blocks(1, goal, data=False)
        self.meta.new(s)
        inode.blocks += 1
        return s

    def _leaf_for_write(self, inode, k: int, lblk: int, goal) -> tuple[bytearray, int]:
        rel = lblk - _LEVEL_START[k]
        digits = _digits(rel, k)
        slot = N_DIRECT + k - 1
        ptr = self._ptr(inode, inode.map[slot])
        if ptr == 0:
            ptr = inode.map[slot] = self._new_meta_block(inode, goal)
        for d in digits[:-1]:
            arr = np.frombuffer(self.meta.read(ptr), dtype=np.uint32)
            child = self._ptr(inode, int(arr[d]))
            if child == 0:
                child = self._new_meta_block(inode, goal)
                np.frombuffer(self.meta.modify(ptr), dtype=np.uint32)[d] = child
            ptr = child
        return self.meta.modify(ptr), digits[-1]

    def ensure_one(self, inode, lblk: int) -> tuple[int, bool]:
        """ensure() of one data block, without numpy (the small-I/O path): (volume block,
        newly allocated). Same placement as ensure: after the block before it if that is
        mapped, else next-fit. Raises alloc.NoSpace when the volume is full."""
        if lblk < N_DIRECT:
            p = self._ptr(inode, inode.map[lblk])
            if p:
                return p, False
            prev = inode.map[lblk - 1] if lblk else 0
            (s, _), = self.alloc.alloc_blocks(1, prev + 1 if prev else None)
            inode.map[lblk] = s
            inode.blocks += 1
            return s, True
        k = _level_of(lblk)
        leaf, idx = self._leaf_block(inode, k, lblk)
        if leaf:
            ro = self.meta.read(leaf)
            p = self._ptr(inode, _U32.unpack_from(ro, 4 * idx)[0])
            if p:
                return p, False
            prev = (self._ptr(inode, _U32.unpack_from(ro, 4 * idx - 4)[0]) if idx
                    else self.contiguous(inode, lblk - 1, 1))
            goal = prev + 1 if prev else None
            buf = self.meta.modify(leaf)
        else:
            prev = self.contiguous(inode, lblk - 1, 1)
            goal = prev + 1 if prev else None
            buf, idx = self._leaf_for_write(inode, k, lblk, goal)
        (s, _), = self.alloc.alloc_blocks(1, goal)
        _U32.pack_into(buf, 4 * idx, s)
        inode.blocks += 1
        return s, True

    def fill_holes(self, inode, first: int, count: int):
        """If [first, first+count) lies within one leaf and is all holes (the kernel's
        writeback of fresh pages), allocate its data blocks and return them as extents
        (start, n) in logical order; else None, changing nothing. Per extent, not per block,
        and no numpy. Raises alloc.NoSpace when the volume is full."""
        if first < N_DIRECT:
            if first + count > N_DIRECT or any(inode.map[first: first + count]):
                return None
            prev = inode.map[first - 1] if first else 0
            extents = self.alloc.alloc_blocks(count, prev + 1 if prev else None)
            at = first
            for s, n in extents:
                inode.map[at: at + n] = range(s, s + n)
                at += n
        else:
            k = _level_of(first)
            idx = (first - _LEVEL_START[k]) % PTRS_PER_BLOCK
            if idx + count > PTRS_PER_BLOCK:
                return None
            leaf, idx = self._leaf_block(inode, k, first)
            if leaf and any(struct.unpack_from(f"<{count}I", self.meta.read(leaf), 4 * idx)):
                return None
            prev = self.contiguous(inode, first - 1, 1)
            goal = prev + 1 if prev else None
            buf, idx = self._leaf_for_write(inode, k, first, goal)
            extents = self.alloc.alloc_blocks(count, goal)
            at = 4 * idx
            for s, n in extents:
                struct.pack_into(f"<{n}I", buf, at, *range(s, s + n))
                at += 4 * n
        inode.blocks += count
        return extents

    def ensure(self, inode, first: int, count: int, *, data: bool = True, goal=None):
        """Map every logical block of the range, allocating holes.

        Returns (volume blocks, mask of blocks newly allocated by this call). Raises
        alloc.NoSpace when the volume is full; blocks mapped before that stay mapped.
        """
        phys = np.zeros(count, dtype=np.uint32)
        new = np.zeros(count, dtype=bool)
        if goal is None and first > 0:
            prev = int(self.lookup(inode, first - 1, 1)[0])
            goal = prev + 1 if prev else None
        for k, pos, n in _segments(first, count):
            o = pos - first
            if k == 0:
                cur = np.array(inode.map[pos: pos + n], dtype=np.uint32)
                holes = np.flatnonzero(cur == 0)
                if len(holes):
                    blocks = _extents_to_array(self.alloc.alloc_blocks(len(holes), goal, data=data))
                    inode.blocks += len(holes)
                    cur[holes] = blocks
                    inode.map[pos: pos + n] = cur.tolist()
                    new[o + holes] = True
                phys[o: o + n] = cur
            else:
                cur_ro = self.lookup(inode, pos, n)
                holes = np.flatnonzero(cur_ro == 0)
                if len(holes):
                    buf, idx = self._leaf_for_write(inode, k, pos, goal)
                    leaf = np.frombuffer(buf, dtype=np.uint32)
                    seg_goal = goal
                    blocks = _extents_to_array(
                        self.alloc.alloc_blocks(len(holes), seg_goal, data=data))
                    inode.blocks += len(holes)
                    leaf[idx + holes] = blocks
                    cur_ro = leaf[idx: idx + n].copy()
                    new[o + holes] = True
                phys[o: o + n] = cur_ro
            if n and phys[o + n - 1]:
                goal = int(phys[o + n - 1]) + 1
        return phys, new

    def unmap(self, inode, first: int, mask: np.ndarray) -> None:
        """Make the logical blocks first+i with mask[i] holes again and free their blocks."""
        count = len(mask)
        for k, pos, n in _segments(first, count):
            o = pos - first
            sel = np.flatnonzero(mask[o: o + n])
            if not len(sel):
                continue
            if k == 0:
                cur = np.array(inode.map[pos: pos + n], dtype=np.uint32)
                self._free_data(inode, cur[sel].copy(), False)
                cur[sel] = 0
                inode.map[pos: pos + n] = cur.tolist()
                continue
            leaf, idx = self._leaf_block(inode, k, pos)
            if not leaf:
                continue
            arr = np.frombuffer(self.meta.modify(leaf), dtype=np.uint32)
            self._free_data(inode, arr[idx + sel].copy(), False)
            arr[idx + sel] = 0

    # ------------------------------------------------------------------ freeing

    def _free_data(self, inode, blocks: np.ndarray, discard: bool) -> None:
        blocks = self._ptrs(inode, blocks[blocks != 0])
        if not len(blocks):
            return
        blocks = np.sort(blocks)
        self.alloc.free_blocks([(s, n) for _, s, n in runs(blocks)])
        inode.blocks -= len(blocks)
        if discard:
            for b in blocks.tolist():
                self.meta.discard(b)

    def _free_direct(self, inode, keep: int, discard: bool) -> None:
        """Free the direct pointers >= keep: at most 12, so plain Python (a small file's
        unlink or truncate need no numpy)."""
        ptrs = sorted(self._ptr(inode, p) for p in inode.map[keep:N_DIRECT] if p)
        inode.map[keep:N_DIRECT] = [0] * (N_DIRECT - keep)
        if not ptrs:
            return
        extents = []
        for p in ptrs:
            if extents and extents[-1][0] + extents[-1][1] == p:
                extents[-1][1] += 1
            else:
                extents.append([p, 1])
        self.alloc.free_blocks([(s, n) for s, n in extents])
        inode.blocks -= len(ptrs)
        if discard:
            for b in ptrs:
                self.meta.discard(b)

    def _free_meta(self, inode, blk: int) -> None:
        self.alloc.free_blocks([(blk, 1)])
        self.meta.discard(blk)
        inode.blocks -= 1

    def _free_tree(self, inode, ptr: int, depth: int, discard: bool) -> None:
        arr = self._ptr_block(inode, ptr)
        if depth == 1:
            self._free_data(inode, arr.copy(), discard)
        else:
            for child in arr[arr != 0].tolist():
                self._free_tree(inode, child, depth - 1, discard)
        self._free_meta(inode, ptr)

    def _cut_tree(self, inode, ptr: int, depth: int, keep: int, discard: bool) -> bool:
        """Free entries of the subtree at relative logical block >= keep; True if now empty."""
        self._ptr(inode, ptr)
        if depth == 1:
            if not np.frombuffer(self.meta.read(ptr), dtype=np.uint32)[keep:].any():
                return not np.frombuffer(self.meta.read(ptr), dtype=np.uint32).any()
            arr = np.frombuffer(self.meta.modify(ptr), dtype=np.uint32)
            self._free_data(inode, arr[keep:].copy(), discard)
            arr[keep:] = 0
            return not arr.any()
        span = PTRS_PER_BLOCK ** (depth - 1)
        ci, crel = divmod(keep, span)
        ro = self._ptr_block(inode, ptr)
        start = ci + 1 if crel else ci
        later = ro[start:]
        if crel and ro[ci]:
            child = int(ro[ci])
            if self._cut_tree(inode, child, depth - 1, crel, discard):
                self._free_meta(inode, child)
                np.frombuffer(self.meta.modify(ptr), dtype=np.uint32)[ci] = 0
        if later.any():
            for child in later[later != 0].tolist():
                self._free_tree(inode, child, depth - 1, discard)
            np.frombuffer(self.meta.modify(ptr), dtype=np.uint32)[start:] = 0
        return not np.frombuffer(self.meta.read(ptr), dtype=np.uint32).any()

    def truncate(self, inode, keep: int, *, discard: bool = False) -> None:
        """Unmap and free every logical block >= keep (and indirect blocks left empty).

        `discard` also drops freed data blocks from the metadata cache (directories and
        symlinks keep their content there).
        """
        if keep < N_DIRECT:
            self._free_direct(inode, keep, discard)
        for k in (1, 2, 3):
            slot = N_DIRECT + k - 1
            ptr = inode.map[slot]
            if ptr == 0:
                continue
            start = _LEVEL_START[k]
            if keep <= start:
                self._free_tree(inode, ptr, k, discard)
                inode.map[slot] = 0
            elif keep < start + MAP_LEVEL_SPAN[k]:
                if self._cut_tree(inode, ptr, k, keep - start, discard):
                    self._free_meta(inode, ptr)
                    inode.map[slot] = 0

    # ------------------------------------------------------------------ walking (fsck)

    def walk(self, inode):
        """Yield ('data', lblk_array, phys_array) and ('meta', None, block) for the whole map."""
        d = np.array(inode.map[:N_DIRECT], dtype=np.uint32)
        nz = np.flatnonzero(d)
        if len(nz):
            yield "data", nz, d[nz]
        for k in (1, 2, 3):
            ptr = inode.map[N_DIRECT + k - 1]
            if ptr:
                yield from self._walk_tree(ptr, k, _LEVEL_START[k])

    def _walk_tree(self, ptr: int, depth: int, base: int):
        yield "meta", None, ptr
        sb = self.alloc.sb
        if not sb.data_start <= ptr < sb.nblocks:
            raise FormatError(f"indirect block {ptr} is outside the data area")
        arr = np.frombuffer(self.meta.read(ptr), dtype=np.uint32).copy()
        nz = np.flatnonzero(arr)
        if depth == 1:
            if len(nz):
                yield "data", nz + base, arr[nz]
            return
        span = PTRS_PER_BLOCK ** (depth - 1)
        for i in nz.tolist():
            yield from self._walk_tree(int(arr[i]), depth - 1, base + i * span)
