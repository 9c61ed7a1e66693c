"""Make a new repfs file system on a volume."""

from __future__ import annotations

import stat
import time

from .core import FileSystem
from .journal import Journal
from .format import (
    BLOCK_SIZE, MAX_VOLUME_BLOCKS, MIN_VOLUME_BLOCKS, ROOT_INO, FormatError, Inode, Superblock,
)

BYTES_PER_INODE = 16384
MAX_DEFAULT_INODES = 1 << 25


def default_inodes(nblocks: int) -> int:
    return max(64, min(nblocks * BLOCK_SIZE // BYTES_PER_INODE, MAX_DEFAULT_INODES))


def mkfs(dev, journal_path, *, ninodes: int | None = None, label: str = "") -> Superblock:
    """Write an empty file system (root directory only) onto `dev`, which must be zeroed."""
    nblocks = dev.nblocks
    if nblocks < MIN_VOLUME_BLOCKS:
        raise FormatError(f"volume too small: {nblocks} blocks (at least {MIN_VOLUME_BLOCKS})")
    if nblocks > MAX_VOLUME_BLOCKS:
        raise FormatError("volume too large: at most 2**32-1 blocks of 4 KiB (16 TiB)")
    if ninodes is None:
        ninodes = default_inodes(nblocks)
    if ninodes < 16 or ninodes >= 2**32:
        raise FormatError(f"inode count {ninodes} out of range (16 .. 2**32-1)")
    if len(label.encode()) > 64:
        raise FormatError("label longer than 64 bytes")
    sb = Superblock.layout(nblocks, ninodes, label=label, created_ns=time.time_ns())
    if sb.data_start + 16 > nblocks:
        raise FormatError("volume too small for its inode table; give fewer --inodes")
    # bitmaps: superblock, both bitmaps valid; inode-table blocks become valid when used
    _set_bits(dev, sb.bbitmap_start, 0, sb.itable_start)
    _set_bits(dev, sb.ibitmap_start, 0, 1)  # inode 0 is never used
    dev.write(0, sb.pack())
    dev.flush()
    stale = Journal(journal_path)  # a redo log of an earlier file system must not replay here
    stale.clear()
    stale.close()
    fs = FileSystem(dev, journal_path)
    ino = fs.alloc.alloc_inode()
    assert ino == ROOT_INO
    now = time.time_ns()
    root = Inode(ROOT_INO, mode=stat.S_IFDIR | 0o755, nlink=2, generation=0, atime_ns=now,
                 mtime_ns=now, ctime_ns=now, crtime_ns=now, parent=ROOT_INO)
    fs.inodes[ROOT_INO] = root
    fs.dirs.init_dir(root)
    fs._dirty(root)
    fs.close()
    return fs.sb


def _set_bits(dev, bitmap_start: int, first: int, count: int) -> None:
    bits_per_block = BLOCK_SIZE * 8
    bit = first
    end = first + count
    while bit < end:
        idx, off = divmod(bit, bits_per_block)
        n = min(end - bit, bits_per_block - off)
        buf = bytearray(dev.read(bitmap_start + idx, 1))
        for b in range(off, off + n):  # mkfs only, over metadata-region bits
            buf[b >> 3] |= 1 << (b & 7)
        dev.write(bitmap_start + idx, buf)
        bit += n
