"""Directories: an extendible hash table in the directory's own blocks (format in format.py).

Lookup, insert and remove read one bucket chain (usually one block), so they cost the same
with 10 or 100,000 entries; readdir walks buckets in hash order, and an entry's readdir offset
is derived from its hash, so it stays valid across inserts, removals and table doubling.
"""

from __future__ import annotations

from .alloc import NoSpace
from .format import (
    BLOCK_SIZE, BUCKET_CAPACITY, BUCKET_HDR_SIZE, HASH_BITS, DirHeader, FormatError,
    bucket_header, dirent_size, iter_bucket, name_hash, pack_dirent, set_bucket_header,
)

MAX_DEPTH = 24
GROW_FILL = 0.75  # double the table when entries fill this share of the primary buckets


class Directories:
    def __init__(self, meta, bmap):
        self.meta = meta
        self.bmap = bmap

    # ---------------------------------------------------------------- block access

    def _phys(self, dinode, lblk: int) -> int:
        p = self.bmap.contiguous(dinode, lblk, 1)  # one block: no numpy on this hot path
        if p == 0:  # a FormatError like every other damage (t1_fuzz_core)
            raise FormatError(f"directory {dinode.ino}: logical block {lblk} is not mapped")
        return p

    def _read(self, dinode, lblk: int):
        return self.meta.read(self._phys(dinode, lblk))

    def _modify(self, dinode, lblk: int) -> bytearray:
        return self.meta.modify(self._phys(dinode, lblk))

    def header(self, dinode) -> DirHeader:
        hdr = DirHeader.unpack_from(self._read(dinode, 0))
        if hdr.nblocks * BLOCK_SIZE != dinode.size:
            raise FormatError(f"directory {dinode.ino}: its header says {hdr.nblocks} blocks, "
                              f"its inode {dinode.size} bytes")
        return hdr

    def _put_header(self, dinode, hdr: DirHeader) -> None:
        hdr.pack_into(self._modify(dinode, 0))

    @staticmethod
    def _bucket(h: int, depth: int) -> int:
        return h >> (HASH_BITS - depth)

    # ---------------------------------------------------------------- create

    def init_dir(self, dinode) -> None:
        """Lay out an empty directory: header and one bucket (depth 0)."""
        phys, _ = self.bmap.ensure(dinode, 0, 2, data=False)
        for p in phys.tolist():
            self.meta.new(p)
        DirHeader().pack_into(self.meta.modify(int(phys[0])))
        set_bucket_header(self.meta.modify(int(phys[1])), 0, 0, 0)
        dinode.size = 2 * 4096

    # ---------------------------------------------------------------- queries

    def _chain(self, dinode, hdr: DirHeader, b: int):
        """Yield (lblk, buffer) along bucket b's chain."""
        lblk = 1 + b
        hops = 0
        while lblk:
            buf = self._read(dinode, lblk)
            yield lblk, buf
            lblk = bucket_header(buf)[2]
            hops += 1
            # overflow blocks follow the primary buckets; a chain longer than the directory
            # loops (both found by tests/t0_fuzz.py: a damaged link hung lookup and readdir)
            if lblk and not ((1 << hdr.depth) < lblk < hdr.nblocks and hops < hdr.nblocks):
                raise FormatError(f"directory {dinode.ino}: bucket chain {b} is damaged")

    def lookup(self, dinode, name: bytes):
        """(ino, type) of the entry, or None."""
        found = self._find(dinode, self.header(dinode), name)
        return None if found is None else found[3:]

    def is_empty(self, dinode) -> bool:
        return self.header(dinode).count == 0

    def iter_from(self, dinode, after: int | None):
        """Yield (hash, name, ino, type) in hash order, for hashes greater than `after`.

        The directory must not change while the generator is consumed (FUSE's readdir
        consumes it within one synchronous handler call); the next call resumes by hash.
        """
        hdr = self.header(dinode)
        start = 0 if after is None else self._bucket(after, hdr.depth)
        for b in range(start, 1 << hdr.depth):
            entries = []
            for _, buf in self._chain(dinode, hdr, b):
                for _, eh, ino, typ, name in iter_bucket(buf):
                    if after is None or eh > after:
                        entries.append((eh, name, ino, typ))
            entries.sort()
            yield from entries

    def all_entries(self, dinode):
        """Every (hash, name, ino, type, lblk) in table order (for fsck and growing)."""
        hdr = self.header(dinode)
        for b in range(1 << hdr.depth):
            for lblk, buf in self._chain(dinode, hdr, b):
                for _, eh, ino, typ, name in iter_bucket(buf):
                    yield eh, name, ino, typ, b

    # ---------------------------------------------------------------- changes

    def add(self, dinode, name: bytes, ino: int, typ: int) -> None:
        """Insert an entry; the caller has checked that the name is not present."""
        hdr = self.header(dinode)
        size = dirent_size(name)
        nb = 1 << hdr.depth
        if (hdr.bytes + size > GROW_FILL * nb * BUCKET_CAPACITY and hdr.depth < MAX_DEPTH):
            if self._grow(dinode, hdr):
                hdr = self.header(dinode)
        h = name_hash(name)
        last = None
        for lblk, buf in self._chain(dinode, hdr, self._bucket(h, hdr.depth)):
            count, used, _ = bucket_header(buf)
            if used + size <= BUCKET_CAPACITY:
                w = self._modify(dinode, lblk)
                pack_dirent(w, BUCKET_HDR_SIZE + used, h, ino, typ, name)
                count, used, nxt = bucket_header(w)
                set_bucket_header(w, count + 1, used + size, nxt)
                break
            last = lblk
        else:
            new = self._overflow_block(dinode, hdr)
            w = self._modify(dinode, new)
            pack_dirent(w, BUCKET_HDR_SIZE, h, ino, typ, name)
            set_bucket_header(w, 1, size, 0)
            lw = self._modify(dinode, last)
            c, u, _ = bucket_header(lw)
            set_bucket_header(lw, c, u, new)
        hdr.count += 1
        hdr.bytes += size
        self._put_header(dinode, hdr)

    def _overflow_block(self, dinode, hdr: DirHeader) -> int:
        if hdr.free_head:
            lblk = hdr.free_head
            hdr.free_head = bucket_header(self._read(dinode, lblk))[2]
            return lblk
        lblk = hdr.nblocks
        try:
            phys, _ = self.bmap.ensure(dinode, lblk, 1, data=False)
        except NoSpace:
            self.bmap.truncate(dinode, hdr.nblocks, discard=True)  # no indirect block left behind
            raise
        self.meta.new(int(phys[0]))
        hdr.nblocks += 1
        dinode.size = hdr.nblocks * 4096
        return lblk

    def _find(self, dinode, hdr, name: bytes):
        h = name_hash(name)
        prev = None
        for lblk, buf in self._chain(dinode, hdr, self._bucket(h, hdr.depth)):
            for off, eh, ino, typ, ename in iter_bucket(buf):
                if eh == h and ename == name:
                    return prev, lblk, off, ino, typ
            prev = lblk
        return None

    def remove(self, dinode, name: bytes) -> int:
        """Remove an entry and return its inode number (KeyError if absent)."""
        hdr = self.header(dinode)
        found = self._find(dinode, hdr, name)
        if found is None:
            raise KeyError(name)
        prev, lblk, off, ino, _ = found
        w = self._modify(dinode, lblk)
        count, used, nxt = bucket_header(w)
        size = dirent_size(name)
        end = BUCKET_HDR_SIZE + used
        w[off: end - size] = w[off + size: end]
        w[end - size: end] = bytes(size)
        count -= 1
        set_bucket_header(w, count, used - size, nxt)
        if count == 0 and prev is not None:  # an empty overflow block goes to the free list
            pw = self._modify(dinode, prev)
            c, u, _ = bucket_header(pw)
            set_bucket_header(pw, c, u, nxt)
            set_bucket_header(w, 0, 0, hdr.free_head)
            hdr.free_head = lblk
        hdr.count -= 1
        hdr.bytes -= size
        self._put_header(dinode, hdr)
        return ino

    def replace(self, dinode, name: bytes, ino: int, typ: int) -> int:
        """Point an existing entry at another inode; returns the old inode number."""
        hdr = self.header(dinode)
        found = self._find(dinode, hdr, name)
        if found is None:
            raise KeyError(name)
        _, lblk, off, old, _ = found
        w = self._modify(dinode, lblk)
        pack_dirent(w, off, name_hash(name), ino, typ, name)
        return old

    # ---------------------------------------------------------------- growing

    def _grow(self, dinode, hdr: DirHeader) -> bool:
        """Double the table and rewrite it. False (nothing changed) when space is short."""
        depth = hdr.depth + 1
        nb = 1 << depth
        # decide on space before reading anything, so a full volume does not make every
        # insert read the whole table
        estimate = 1 + nb + hdr.bytes // BUCKET_CAPACITY + 1
        if self.bmap.alloc.sb.free_blocks < estimate - hdr.nblocks + 8:
            return False
        buckets: list[list] = [[] for _ in range(nb)]
        for eh, name, ino, typ, _ in self.all_entries(dinode):
            buckets[eh >> (HASH_BITS - depth)].append((eh, name, ino, typ))
        # pack each bucket into one primary block plus overflow blocks
        images: list[bytearray] = [bytearray(4096)]  # the header
        images.extend(bytearray(4096) for _ in range(nb))
        for b, bucket in enumerate(buckets):
            i = 1 + b
            count = used = 0
            for eh, name, ino, typ in bucket:
                size = dirent_size(name)
                if used + size > BUCKET_CAPACITY:
                    images.append(bytearray(4096))
                    set_bucket_header(images[i], count, used, len(images) - 1)
                    i, count, used = len(images) - 1, 0, 0
                pack_dirent(images[i], BUCKET_HDR_SIZE + used, eh, ino, typ, name)
                count += 1
                used += size
            set_bucket_header(images[i], count, used, 0)
        total = len(images)
        try:
            if self.bmap.alloc.sb.free_blocks < total - hdr.nblocks + 8:
                return False
            phys, _ = self.bmap.ensure(dinode, 0, total, data=False)
        except NoSpace:
            self.bmap.truncate(dinode, hdr.nblocks, discard=True)
            return False
        new_hdr = DirHeader(depth=depth, count=hdr.count, bytes=hdr.bytes, nblocks=total)
        new_hdr.pack_into(images[0])
        for p, img in zip(phys.tolist(), images):
            self.meta.new(p)[:] = img
        if total < hdr.nblocks:
            self.bmap.truncate(dinode, total, discard=True)
        dinode.size = total * 4096
        return True
