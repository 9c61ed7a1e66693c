"""The paged bit map: one bit per volume block, kept as pages of packed bits (4 KiB, 32768
blocks: the span of one file-system bitmap block), so a bit map of a large volume costs only
the pages that hold set bits, and every operation works a page at a time with numpy.

`PagedBits` keeps its pages in memory: the change log's two tables (which
`repfs.repl.changelog.PagedBits` also keeps in LMDB, page by page) and the receiver's record
of the blocks of an initial copy. The snapshot store keeps its per-snapshot pages in LMDB
behind a cache, and the snapped layer reads the file system's own bitmap blocks; both use the
page functions here (`spans`, `get_range`, `by_page`, `assign`, `unpack`)."""

from __future__ import annotations

import numpy as np

PAGE_BITS = 32768
PAGE_BYTES = PAGE_BITS // 8


def spans(start: int, count: int):
    """Split blocks [start, start+count) by page: yields (page, first bit in the page, offset
    in the range, length)."""
    pos, end = start, start + count
    while pos < end:
        page, off = divmod(pos, PAGE_BITS)
        m = min(end - pos, PAGE_BITS - off)
        yield page, off, pos - start, m
        pos += m


def unpack(buf) -> np.ndarray:
    """A page of packed bits (bytes-like) as PAGE_BITS bools."""
    return np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little").astype(bool)


def get_range(page_of, start: int, count: int) -> np.ndarray:
    """Bits [start, start+count) of a paged bit map whose page p is `page_of(p)` (packed
    bytes, or None for a page of zeros). Only the bytes the range touches are unpacked."""
    out = np.zeros(count, dtype=bool)
    for page, off, at, m in spans(start, count):
        buf = page_of(page)
        if buf is not None:
            a, b = off >> 3, (off + m + 7) >> 3
            lo = off - (a << 3)
            out[at: at + m] = np.unpackbits(np.frombuffer(buf, dtype=np.uint8)[a:b],
                                            bitorder="little")[lo: lo + m]
    return out


def by_page(blocks: np.ndarray):
    """Yields (page, bit offsets in the page) for an array of block numbers."""
    pages = blocks // PAGE_BITS
    for page in np.unique(pages).tolist():
        yield page, blocks[pages == page] % PAGE_BITS


def assign(buf, offsets, value: bool) -> bool:
    """Set (value True) or clear the bits at `offsets` of page `buf` in place (a bytearray or
    a uint8 array); returns whether any bit of the page is set afterwards."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    if len(offsets) <= 16:  # a few bits (a 4 KiB write): no unpacking of the whole page
        for off in np.asarray(offsets).tolist():
            if value:
                arr[off >> 3] |= 1 << (off & 7)
            else:
                arr[off >> 3] &= 0xFF ^ (1 << (off & 7))
        return bool(value) or bool(arr.any())
    bits = np.unpackbits(arr, bitorder="little")
    bits[offsets] = value
    arr[:] = np.packbits(bits, bitorder="little")
    return bool(bits.any())


class PagedBits:
    """A paged bit map in memory; all-zero pages are not kept."""

    def __init__(self):
        self.pages: dict[int, np.ndarray] = {}  # page -> uint8[PAGE_BYTES]
        self.dirty: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.pages)

    def set_range(self, start: int, count: int) -> int:
        """Set bits [start, start+count); returns how many were newly set. Only the bytes
        the range touches are unpacked."""
        added = 0
        for page, off, _, m in spans(start, count):
            arr = self.pages.get(page)
            if arr is None:
                arr = self.pages[page] = np.zeros(PAGE_BYTES, dtype=np.uint8)
            a, b = off >> 3, (off + m + 7) >> 3
            bits = np.unpackbits(arr[a:b], bitorder="little")
            lo = off - (a << 3)
            added += m - int(bits[lo: lo + m].sum())
            bits[lo: lo + m] = 1
            arr[a:b] = np.packbits(bits, bitorder="little")
            self.dirty.add(page)
        return added

    def get_range(self, start: int, count: int) -> np.ndarray:
        return get_range(self.pages.get, start, count)

    def clear_blocks(self, blocks: np.ndarray) -> None:
        """Clear the bits of the given block numbers."""
        for page, offsets in by_page(blocks):
            arr = self.pages.get(page)
            if arr is None:
                continue
            if not assign(arr, offsets, False):
                del self.pages[page]
            self.dirty.add(page)

    def page_blocks(self, page: int) -> np.ndarray:
        arr = self.pages.get(page)
        if arr is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(unpack(arr)) + page * PAGE_BITS

    def count(self) -> int:
        return int(sum(np.unpackbits(a).sum() for a in self.pages.values()))

    def merge(self, other: "PagedBits") -> None:
        for page, arr in other.pages.items():
            mine = self.pages.get(page)
            if mine is None:
                self.pages[page] = arr.copy()
            else:
                mine |= arr
            self.dirty.add(page)
