"""Extended attributes of an inode, stored in volume blocks (layout: ``format``, "extended
attributes").

All of an inode's attributes form one stream of packed entries: its first bytes live in the
root block (``Inode.xattr``), the rest in an "xattr file" whose block map is rooted in the root
block and handled by ``BlockMap`` like a file's. Every block goes through the metadata cache,
so changes are journaled with the transaction, and snapshots and replication see them like
any metadata. A change makes the new stream (appending a new attribute just extends it;
replacing or removing one packs it again) and writes only the blocks whose content differs, so
a commit holds at most the blocks of one inode's stream: ``XATTR_TOTAL_MAX`` (8 MiB, 2048 blocks).

The parsed attributes of recently used inodes are kept in memory (bounded by
``CACHE_BYTES``), so a getxattr, or a setxattr that adds a name, costs O(size of the entry),
not O(attributes of the inode). The cache lives and dies with this object, which the core
makes anew whenever the volume changes underneath (``FileSystem.reload``).

The root block may use the allocator's metadata reserve (as one xattr block always could); the
blocks of the xattr file are user data and leave the reserve alone.
"""

from __future__ import annotations

import errno
from collections import OrderedDict

import numpy as np

from .errors import FSError
from .format import (
    BLOCK_SIZE, FORMAT_VERSION, XATTR_INLINE, XATTR_LIST_MAX, XATTR_TOTAL_MAX, FormatError,
    XattrRoot, is_xattr_root, pack_xattr_stream, unpack_xattr_stream, unpack_xattrs,
    xattr_file_blocks, xattr_inline, xattr_list_size,
)

BS = BLOCK_SIZE
XATTR_CREATE = 1
XATTR_REPLACE = 2


class XattrMap:
    """The block map of an xattr file, shaped as BlockMap expects an inode: `map` holds the
    root block's 15 pointers, `blocks` counts the blocks BlockMap allocates (+) or frees (-)."""

    __slots__ = ("map", "blocks")

    def __init__(self, ptrs):
        self.map = list(ptrs)
        self.blocks = 0


class _State:
    """An inode's attributes as stored: `attrs` in stream order, the packed `stream`, the
    listxattr size `names`, the root block `blk` they were read from, and the root's map
    (`legacy`: the root is a version-1 block)."""

    __slots__ = ("blk", "attrs", "stream", "names", "map", "legacy")

    def __init__(self, blk, attrs, stream, names, ptrs, legacy=False):
        self.blk = blk
        self.attrs = attrs
        self.stream = stream
        self.names = names
        self.map = ptrs
        self.legacy = legacy


class Xattrs:
    CACHE_BYTES = 32 << 20  # stream bytes of the cached inodes (their values are held twice)
    CACHE_INODES = 1024

    def __init__(self, meta, alloc, bmap):
        self.meta = meta
        self.alloc = alloc
        self.bmap = bmap
        self._cache: OrderedDict[int, _State] = OrderedDict()
        self._cached_bytes = 0

    # ------------------------------------------------------------------ reading

    def _root(self, inode) -> XattrRoot | None:
        """The inode's root header from the volume; None for a version-1 block."""
        buf = self.meta.read(inode.xattr)
        return XattrRoot.unpack(buf) if is_xattr_root(buf) else None

    def _read(self, inode) -> _State:
        """The inode's attributes from the volume. Damage raises FSError(EIO)."""
        if not inode.xattr:
            return _State(0, {}, b"", 0, [0] * 15)
        try:
            buf = self.meta.read(inode.xattr)
            if not is_xattr_root(buf):
                attrs = unpack_xattrs(buf)
                return _State(inode.xattr, attrs, pack_xattr_stream(attrs),
                              xattr_list_size(attrs), [0] * 15, legacy=True)
            root = XattrRoot.unpack(buf)
            stream = self._stream(root, buf)
            attrs = unpack_xattr_stream(stream, root.count)
            return _State(inode.xattr, attrs, stream, xattr_list_size(attrs), root.map)
        except FormatError as e:
            raise FSError(errno.EIO, f"inode {inode.ino}: {e}") from None

    def _stream(self, root: XattrRoot, buf) -> bytes:
        parts = [bytes(xattr_inline(buf)[: min(root.length, XATTR_INLINE)])]
        nb = root.file_blocks
        if nb:
            phys = self.bmap.lookup(XattrMap(root.map), 0, nb)
            if not phys.all():
                raise FormatError("the xattr file has a hole")
            sb = self.alloc.sb
            if int(phys.min()) < sb.data_start or int(phys.max()) >= sb.nblocks:
                raise FormatError("the xattr file points outside the data area")
            parts += [self.meta.read(p) for p in phys.tolist()]
        return b"".join(parts)[: root.length]

    def _state(self, inode) -> _State:
        st = self._cache.get(inode.ino)
        if st is not None and st.blk == inode.xattr:
            self._cache.move_to_end(inode.ino)
            return st
        st = self._read(inode)
        self._remember(inode.ino, st)
        return st

    def _remember(self, ino: int, st: _State) -> None:
        self._forget(ino)
        if not st.blk:
            return
        self._cache[ino] = st
        self._cached_bytes += len(st.stream)
        while self._cache and (self._cached_bytes > self.CACHE_BYTES
                               or len(self._cache) > self.CACHE_INODES):
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old.stream)

    def _forget(self, ino: int) -> None:
        old = self._cache.pop(ino, None)
        if old is not None:
            self._cached_bytes -= len(old.stream)

    def load(self, inode) -> dict[bytes, bytes]:
        """All of the inode's attributes, read from the volume (fsck)."""
        return dict(self._read(inode).attrs)

    def get(self, inode, name: bytes) -> bytes | None:
        if not inode.xattr:  # the common case: the kernel asks for security.capability
            return None      # before every write
        return self._state(inode).attrs.get(name)

    def names(self, inode) -> list[bytes]:
        return list(self._state(inode).attrs) if inode.xattr else []

    def blocks(self, inode) -> np.ndarray:
        """Every block the inode's attributes occupy: the root, the xattr file's indirect and
        data blocks (fsck, snapshot diff)."""
        if not inode.xattr:
            return np.zeros(0, dtype=np.int64)
        out = [np.array([inode.xattr], dtype=np.int64)]
        try:
            root = self._root(inode)
        except FormatError:  # a damaged root: fsck's check_xattrs reports it
            root = None
        if root is not None:
            for _, _, phys in self.bmap.walk(XattrMap(root.map)):
                out.append(np.atleast_1d(np.asarray(phys, dtype=np.int64)))
        return np.concatenate(out)

    # ------------------------------------------------------------------ changing

    def set(self, inode, name: bytes, value: bytes, flags: int = 0) -> None:
        """Set one attribute (XATTR_CREATE: EEXIST if it exists; XATTR_REPLACE: ENODATA if
        not). ENOSPC, before anything changed, past the limits or when the volume is full."""
        st = self._state(inode)
        old = st.attrs.get(name)
        if flags & XATTR_CREATE and old is not None:
            raise FSError(errno.EEXIST)
        if flags & XATTR_REPLACE and old is None:
            raise FSError(errno.ENODATA)
        value = bytes(value)
        attrs = dict(st.attrs)
        attrs[name] = value
        names = st.names
        if old is None:
            names += len(name) + 1
            if names > XATTR_LIST_MAX:
                raise FSError(errno.ENOSPC, "the names of one inode's extended attributes "
                                            "would exceed 64 KiB, all that listxattr returns")
            stream = st.stream + pack_xattr_stream({name: value})  # appended: order kept
        else:
            stream = pack_xattr_stream(attrs)
        if len(stream) > XATTR_TOTAL_MAX:
            raise FSError(errno.ENOSPC, "the extended attributes of one inode would exceed "
                                        f"{XATTR_TOTAL_MAX >> 20} MiB")
        self._write(inode, st, attrs, stream, names)

    def remove(self, inode, name: bytes) -> None:
        st = self._state(inode)
        if name not in st.attrs:
            raise FSError(errno.ENODATA)
        attrs = dict(st.attrs)
        del attrs[name]
        if not attrs:
            self.free(inode)
            return
        self._write(inode, st, attrs, pack_xattr_stream(attrs), st.names - len(name) - 1)

    def _write(self, inode, st: _State, attrs, stream: bytes, names: int) -> None:
        """Store the new stream: allocate or free blocks of the xattr file, then write the
        blocks whose content changed."""
        need = xattr_file_blocks(len(stream))
        have = 0 if st.legacy or not inode.xattr else xattr_file_blocks(len(st.stream))
        xmap = XattrMap(st.map)
        new_root = 0 if inode.xattr else 1
        grow = need - have
        sb = self.alloc.sb
        if grow > 0:
            overhead = self.bmap.indirect_needed(xmap, have, grow, np.ones(grow, dtype=bool))
            if sb.free_blocks - new_root - grow - overhead < self.alloc.reserve:
                raise FSError(errno.ENOSPC)
        elif new_root and sb.free_blocks < 1:
            raise FSError(errno.ENOSPC)
        if new_root:
            (blk, _), = self.alloc.alloc_blocks(1, None, data=False)
            self.meta.new(blk)
            inode.xattr = blk
            inode.blocks += 1
        if grow > 0:
            self.bmap.ensure(xmap, have, grow, data=True, goal=inode.xattr + 1)
        elif grow < 0:
            self.bmap.truncate(xmap, need, discard=True)
        inode.blocks += xmap.blocks
        old = st.stream
        if need:
            phys = self.bmap.lookup(xmap, 0, need).tolist()
            for i, p in enumerate(phys):
                a = XATTR_INLINE + i * BS
                chunk = stream[a: a + BS]  # bytes slices: their == is one memcmp
                if i >= have:
                    self.meta.new(p)[: len(chunk)] = chunk
                elif chunk != old[a: a + BS]:
                    buf = self.meta.modify(p)
                    buf[: len(chunk)] = chunk
                    buf[len(chunk):] = bytes(BS - len(chunk))  # zeros past the end
        if (new_root or st.legacy or len(stream) != len(st.stream) or names != st.names
                or len(attrs) != len(st.attrs) or xmap.map != st.map
                or stream[:XATTR_INLINE] != old[:XATTR_INLINE]):
            root = XattrRoot(count=len(attrs), length=len(stream), names=names, map=xmap.map)
            self.meta.modify(inode.xattr)[:] = root.pack(stream)
        if sb.version < FORMAT_VERSION:  # a version-1 volume now holds a version-2 root
            sb.version = FORMAT_VERSION
        self._remember(inode.ino, _State(inode.xattr, attrs, stream, names, xmap.map))

    def free(self, inode) -> None:
        """Free every block of the inode's attributes."""
        self._forget(inode.ino)
        if not inode.xattr:
            return
        try:
            root = self._root(inode)
        except FormatError:  # damaged: free the root; fsck finds what it pointed to leaked
            root = None
        if root is not None:
            xmap = XattrMap(root.map)
            self.bmap.truncate(xmap, 0, discard=True)
            inode.blocks += xmap.blocks
        self.alloc.free_blocks([(inode.xattr, 1)])
        self.meta.discard(inode.xattr)
        inode.xattr = 0
        inode.blocks -= 1
