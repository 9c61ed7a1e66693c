"""The metadata block cache and its transaction state.

Metadata blocks (bitmaps, inode table, directory, indirect, xattr and symlink blocks) are read
and modified through this cache; file data never is (it goes straight to the device below,
see ``repfs.fs.core``). A modified block stays in ``dirty`` until the transaction commits;
``begin_commit`` moves the dirty set aside into ``committing`` (still readable, copied on the
next modification) and ``end_commit`` moves it into the clean LRU cache once it is in the
volume. The clean cache is bounded, so memory does not grow with the volume.
"""

from __future__ import annotations

from collections import OrderedDict

from .format import BLOCK_SIZE

_ZERO = bytes(BLOCK_SIZE)


class MetaCache:
    def __init__(self, dev, capacity_blocks: int = 16384):
        self.dev = dev
        self.capacity = capacity_blocks
        self.dirty: dict[int, bytearray] = {}
        self.committing: dict[int, bytearray] = {}
        self.clean: OrderedDict[int, bytes] = OrderedDict()

    def read(self, blk: int):
        """The current content of a block. Treat it as read-only."""
        buf = self.dirty.get(blk)
        if buf is not None:
            return buf
        buf = self.committing.get(blk)
        if buf is not None:
            return buf
        buf = self.clean.get(blk)
        if buf is not None:
            self.clean.move_to_end(blk)
            return buf
        buf = self.dev.read(blk, 1)
        self._add_clean(blk, buf)
        return buf

    def modify(self, blk: int) -> bytearray:
        """A writable buffer of the block, part of the running transaction."""
        buf = self.dirty.get(blk)
        if buf is None:
            buf = bytearray(self.read(blk))
            self.clean.pop(blk, None)
            self.dirty[blk] = buf
        return buf

    def new(self, blk: int) -> bytearray:
        """A zeroed buffer for a freshly allocated metadata block."""
        self.clean.pop(blk, None)
        buf = self.dirty[blk] = bytearray(BLOCK_SIZE)
        return buf

    def discard(self, blk: int) -> None:
        """The block was freed: its content no longer matters and need not be journaled."""
        self.dirty.pop(blk, None)
        self.clean.pop(blk, None)

    def _add_clean(self, blk: int, buf) -> None:
        self.clean[blk] = buf
        if len(self.clean) > self.capacity:
            self.clean.popitem(last=False)

    def begin_commit(self) -> dict[int, bytearray]:
        assert not self.committing
        self.committing, self.dirty = self.dirty, {}
        return self.committing

    def end_commit(self) -> None:
        for blk, buf in self.committing.items():
            if blk not in self.dirty:
                self._add_clean(blk, bytes(buf))
        self.committing = {}

    def invalidate(self) -> None:
        """Drop every clean block (the volume changed underneath, e.g. a restore)."""
        self.clean.clear()
