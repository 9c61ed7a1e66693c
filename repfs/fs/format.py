"""The repfs on-volume format, declared in one place.

A repfs volume is an array of 4 KiB blocks (``repfs.volume``). Block numbers are unsigned
32-bit integers, so a volume holds at most 2**32 blocks (16 TiB); block 0 is the superblock
and therefore doubles as the "no block" sentinel in every block pointer.

Layout (all regions are whole blocks, in this order)::

    block 0                      superblock
    [bbitmap_start, +blocks)     block allocation bitmap: bit b set <=> block b holds valid data
                                 (metadata regions included). It is also the "meta bit map" of the
                                 snapshot facility: blocks whose bit is clear are never copied.
    [ibitmap_start, +blocks)     inode allocation bitmap: bit i set <=> inode i is in use
                                 (bit 0, "inode 0", is always set and never used)
    [itable_start, +blocks)      inode table, 16 inodes of 256 bytes per block; inode i lives
                                 at block itable_start + i // 16, offset (i % 16) * 256
    [data_start, nblocks)        data: file contents, directory blocks, indirect blocks, xattr
                                 blocks and symlink targets, allocated through the bitmap

Bits in bitmaps are little-endian within a byte: bit n is ``byte[n >> 3] >> (n & 7) & 1``.
All integers are little-endian.

Every revision of this format carries its number in the superblock: mkfs writes
``FORMAT_VERSION``; tools read the revisions in ``READABLE_VERSIONS`` and refuse any other.
Revision 2 changed only the xattr layout (see "extended attributes" below); a revision-1 volume
is read as it is and becomes revision 2 when it first gets a revision-2 xattr root block.
The redo log (journal) is not part of the volume: it is the file ``SITE/journal`` (see
``repfs.fs.journal``), so replicated blocks never carry journal traffic.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass, field

import xxhash

BLOCK_SIZE = 4096
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SUPER_MAGIC = b"REPFSVOL"

INODE_SIZE = 256
INODES_PER_BLOCK = BLOCK_SIZE // INODE_SIZE
ROOT_INO = 1  # the FUSE root inode number; inode 0 is reserved

PTRS_PER_BLOCK = BLOCK_SIZE // 4  # uint32 block pointers in an indirect block
N_DIRECT = 12
# Block map of a file: 12 direct pointers, then one single, one double and one triple
# indirect pointer. Logical blocks covered by each level:
MAP_LEVEL_SPAN = (N_DIRECT, PTRS_PER_BLOCK, PTRS_PER_BLOCK**2, PTRS_PER_BLOCK**3)
MAX_FILE_BLOCKS = sum(MAP_LEVEL_SPAN)
# The largest file size we accept: 4 TiB (just under what the map can address). A write or
# truncate past it fails with EFBIG before anything is allocated.
MAX_FILE_SIZE = 4 << 40
assert MAX_FILE_SIZE // BLOCK_SIZE <= MAX_FILE_BLOCKS

MAX_NAME = 255  # bytes in one directory entry name
MAX_SYMLINK = BLOCK_SIZE - 1  # a symlink target fits one block
LINK_MAX = 65000  # as ext4
MAX_VOLUME_BLOCKS = 2**32 - 1
MIN_VOLUME_BLOCKS = 64


# --------------------------------------------------------------------------- superblock

_SB = struct.Struct(
    "<8s"  # magic               SUPER_MAGIC
    "I"  # version               FORMAT_VERSION
    "I"  # block_size            always 4096
    "Q"  # nblocks               blocks in the volume
    "Q"  # ninodes               inodes in the inode table (numbers 1..ninodes-1 usable)
    "Q"  # bbitmap_start         first block of the block bitmap
    "Q"  # bbitmap_blocks
    "Q"  # ibitmap_start         first block of the inode bitmap
    "Q"  # ibitmap_blocks
    "Q"  # itable_start          first block of the inode table
    "Q"  # itable_blocks
    "Q"  # data_start            first block that the allocator may hand out
    "Q"  # free_blocks           blocks whose bitmap bit is clear (exact at every commit)
    "Q"  # free_inodes           inodes whose bitmap bit is clear (exact at every commit)
    "I"  # orphan_head           first inode of the orphan list (unlinked but still open), 0: none
    "I"  # next_generation       generation number for the next inode allocated
    "q"  # created_ns            mkfs time
    "Q"  # commit_seq            sequence number of the last committed transaction
    "16s"  # uuid                volume identity
    "64s"  # label               NUL-padded UTF-8
)
_SB_CSUM = struct.Struct("<Q")  # xxh3_64 of the packed fields above, stored right after them


class FormatError(Exception):
    """The volume does not hold a repfs file system this version understands."""


@dataclass
class Superblock:
    nblocks: int
    ninodes: int
    bbitmap_start: int
    bbitmap_blocks: int
    ibitmap_start: int
    ibitmap_blocks: int
    itable_start: int
    itable_blocks: int
    data_start: int
    free_blocks: int
    free_inodes: int
    orphan_head: int = 0
    next_generation: int = 1
    created_ns: int = 0
    commit_seq: int = 0
    uuid: bytes = field(default_factory=lambda: uuidlib.uuid4().bytes)
    label: str = ""
    version: int = FORMAT_VERSION

    @classmethod
    def layout(cls, nblocks: int, ninodes: int, *, label: str = "", created_ns: int = 0):
        """Compute the geometry of a new volume."""
        bbitmap_blocks = -(-nblocks // (BLOCK_SIZE * 8))
        ibitmap_blocks = -(-ninodes // (BLOCK_SIZE * 8))
        itable_blocks = -(-ninodes // INODES_PER_BLOCK)
        bbitmap_start = 1
        ibitmap_start = bbitmap_start + bbitmap_blocks
        itable_start = ibitmap_start + ibitmap_blocks
        data_start = itable_start + itable_blocks
        return cls(
            nblocks=nblocks, ninodes=ninodes,
            bbitmap_start=bbitmap_start, bbitmap_blocks=bbitmap_blocks,
            ibitmap_start=ibitmap_start, ibitmap_blocks=ibitmap_blocks,
            itable_start=itable_start, itable_blocks=itable_blocks,
            data_start=data_start, free_blocks=nblocks - data_start, free_inodes=ninodes - 1,
            label=label, created_ns=created_ns,
        )

    def pack(self) -> bytes:
        body = _SB.pack(
            SUPER_MAGIC, self.version, BLOCK_SIZE, self.nblocks, self.ninodes,
            self.bbitmap_start, self.bbitmap_blocks, self.ibitmap_start, self.ibitmap_blocks,
            self.itable_start, self.itable_blocks, self.data_start, self.free_blocks,
            self.free_inodes, self.orphan_head, self.next_generation, self.created_ns,
            self.commit_seq, self.uuid, self.label.encode()[:64],
        )
        out = body + _SB_CSUM.pack(xxhash.xxh3_64_intdigest(body))
        return out + bytes(BLOCK_SIZE - len(out))

    @classmethod
    def unpack(cls, block: bytes) -> "Superblock":
        if block[:8] != SUPER_MAGIC:
            raise FormatError("not a repfs volume (bad superblock magic)")
        if len(block) < _SB.size + _SB_CSUM.size:
            raise FormatError("truncated superblock")
        body = block[: _SB.size]
        (csum,) = _SB_CSUM.unpack_from(block, _SB.size)
        if csum != xxhash.xxh3_64_intdigest(body):
            raise FormatError("superblock checksum mismatch: the volume image is damaged")
        f = _SB.unpack(body)
        if f[1] not in READABLE_VERSIONS:
            raise FormatError(f"unsupported repfs format version {f[1]} (this is {FORMAT_VERSION})")
        if f[2] != BLOCK_SIZE:
            raise FormatError(f"unsupported block size {f[2]}")
        sb = cls(
            nblocks=f[3], ninodes=f[4], bbitmap_start=f[5], bbitmap_blocks=f[6],
            ibitmap_start=f[7], ibitmap_blocks=f[8], itable_start=f[9], itable_blocks=f[10],
            data_start=f[11], free_blocks=f[12], free_inodes=f[13], orphan_head=f[14],
            next_generation=f[15], created_ns=f[16], commit_seq=f[17], uuid=f[18],
            label=f[19].rstrip(b"\0").decode(errors="replace"), version=f[1],
        )
        if sb.data_start >= sb.nblocks or sb.itable_start + sb.itable_blocks != sb.data_start:
            raise FormatError("superblock geometry is inconsistent")
        sb._check_geometry()
        return sb

    def _check_geometry(self) -> None:
        """Everything the core indexes with: regions in order inside the volume, bitmaps that
        cover every block and inode, counts within their totals (a superblock whose checksum
        holds can still carry values no mkfs wrote; found by tests/t0_fuzz.py)."""
        bits = BLOCK_SIZE * 8
        if not (MIN_VOLUME_BLOCKS <= self.nblocks <= MAX_VOLUME_BLOCKS
                and 16 <= self.ninodes < 2**32
                and 1 <= self.bbitmap_start
                and self.bbitmap_start + self.bbitmap_blocks <= self.ibitmap_start
                and self.ibitmap_start + self.ibitmap_blocks <= self.itable_start
                and self.bbitmap_blocks * bits >= self.nblocks
                and self.ibitmap_blocks * bits >= self.ninodes
                and self.itable_blocks * INODES_PER_BLOCK >= self.ninodes):
            raise FormatError("superblock geometry is inconsistent")
        if (self.free_blocks > self.nblocks - self.data_start
                or self.free_inodes > self.ninodes - 1 or self.orphan_head >= self.ninodes):
            raise FormatError("superblock counts are out of range")


# --------------------------------------------------------------------------- inodes

_INODE = struct.Struct(
    "<I"  # mode          file type and permission bits (st_mode); 0 only for a free inode
    "I"  # uid
    "I"  # gid
    "I"  # nlink          directory entries naming this inode (+1 for '.' and per subdir '..')
    "I"  # flags          reserved, 0
    "I"  # generation     raised each time the inode number is reused (NFS-style handles)
    "Q"  # size           bytes
    "Q"  # blocks         4 KiB blocks held: data, indirect, xattr and directory blocks
    "Q"  # rdev           device number of character and block devices
    "q"  # atime_ns       nanoseconds since the epoch
    "q"  # mtime_ns
    "q"  # ctime_ns
    "q"  # crtime_ns      creation (birth) time
    "I"  # parent         directories: inode of the parent directory ('..'); root: itself;
    #                     other inodes: a hint, the directory that got its newest name (made,
    #                     linked or renamed into; 0 on volumes from before the hint): it may
    #                     be stale after an unlink (snapshot diff checks it; repfs/snap/diff.py)
    "I"  # xattr          root block of the extended attributes, 0: none
    "I"  # orphan_next    next inode on the superblock's orphan list, 0: end
    "I"  # reserved
    "15I"  # map          12 direct, 1 single, 1 double, 1 triple indirect block pointer
)
assert _INODE.size <= INODE_SIZE

# The ranges of the inode fields that requests set. Times are signed 64-bit nanoseconds since
# the epoch (1677-09-21 to 2262-04-11): a time outside that range is clamped to it where it
# enters the file system (as ext4 clamps to its own range), never refused and never left to
# fail at the commit. uid and gid are 32-bit, but (uint32)-1 means "no change" to chown(2).
TIME_MIN_NS = -(2**63)
TIME_MAX_NS = 2**63 - 1
ID_MAX = 2**32 - 2
RDEV_MAX = 2**64 - 1


def clamp_time_ns(t: int) -> int:
    """A time in nanoseconds, clamped to the range an inode can hold."""
    return TIME_MIN_NS if t < TIME_MIN_NS else TIME_MAX_NS if t > TIME_MAX_NS else t


@dataclass(slots=True)
class Inode:
    ino: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 0
    flags: int = 0
    generation: int = 0
    size: int = 0
    blocks: int = 0
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    crtime_ns: int = 0
    parent: int = 0
    xattr: int = 0
    orphan_next: int = 0
    map: list = field(default_factory=lambda: [0] * 15)
    # in-memory only:
    dirty: bool = False
    lookups: int = 0  # the kernel's lookup count

    def pack_into(self, buf, offset: int) -> None:
        _INODE.pack_into(
            buf, offset, self.mode, self.uid, self.gid, self.nlink, self.flags, self.generation,
            # the block count is advisory (st_blocks; fsck repairs it): a damaged one counted
            # past either end must not fail the commit (found by tests/t1_fuzz_core.py)
            self.size, min(max(self.blocks, 0), 2**64 - 1), self.rdev, clamp_time_ns(self.atime_ns),
            clamp_time_ns(self.mtime_ns), clamp_time_ns(self.ctime_ns),
            clamp_time_ns(self.crtime_ns), self.parent, self.xattr, self.orphan_next, 0, *self.map,
        )

    @classmethod
    def unpack_from(cls, ino: int, buf, offset: int) -> "Inode":
        f = _INODE.unpack_from(buf, offset)
        return cls(
            ino, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11],
            f[12], f[13], f[14], f[15], list(f[17:32]),
        )


# --------------------------------------------------------------------------- directories
#
# A directory is a file (its blocks reached through its block map like any file's) holding an
# extendible hash table:
#
#   logical block 0          header (_DIR_HDR)
#   logical blocks 1..2**d   primary buckets; bucket b holds the names whose 62-bit hash h has
#                            h >> (62 - d) == b, so bucket order is hash order
#   further blocks           overflow blocks chained from a bucket, and free overflow blocks
#
# Each bucket block starts with _BUCKET_HDR, followed by packed entries (_DIRENT + name).
# readdir returns entries in hash order, and the offset of an entry is 3 + its hash (1 and 2
# are '.' and '..'), so offsets stay valid while the directory changes. When the entries'
# bytes exceed 3/4 of the primary buckets, the table doubles (d += 1) and is rewritten.

DIR_MAGIC = 0x52444952  # "RDIR"
_DIR_HDR = struct.Struct(
    "<I"  # magic
    "I"  # depth        d: 2**d primary buckets
    "Q"  # count        entries (without '.' and '..')
    "Q"  # bytes        sum of packed entry sizes
    "I"  # nblocks      logical blocks in use (header + buckets + overflow, used or free)
    "I"  # free_head    logical block of the first free overflow block, 0: none
)
_BUCKET_HDR = struct.Struct(
    "<H"  # count        entries in this block
    "H"  # used         bytes used by entries after the header
    "I"  # next         logical block of the next overflow block in this chain, 0: end
)
_DIRENT = struct.Struct(
    "<Q"  # hash         62-bit xxh64 of the name (name_hash)
    "I"  # ino
    "B"  # type         file type (mode >> 12)
    "B"  # namelen      followed by the name bytes
)
DIRENT_HDR_SIZE = _DIRENT.size
BUCKET_HDR_SIZE = _BUCKET_HDR.size
BUCKET_CAPACITY = BLOCK_SIZE - BUCKET_HDR_SIZE
HASH_BITS = 62
DIR_MAX_DEPTH = 24  # 2**24 primary buckets (64 GiB of directory) at most
DIR_OFFSET_BASE = 3  # readdir offset of an entry = DIR_OFFSET_BASE + hash


def name_hash(name: bytes) -> int:
    return xxhash.xxh64_intdigest(name) >> (64 - HASH_BITS)


@dataclass
class DirHeader:
    depth: int = 0
    count: int = 0
    bytes: int = 0
    nblocks: int = 2
    free_head: int = 0

    def pack_into(self, buf) -> None:
        _DIR_HDR.pack_into(buf, 0, DIR_MAGIC, self.depth, self.count, self.bytes,
                           self.nblocks, self.free_head)

    @classmethod
    def unpack_from(cls, buf) -> "DirHeader":
        magic, depth, count, nbytes, nblocks, free_head = _DIR_HDR.unpack_from(buf, 0)
        if magic != DIR_MAGIC:
            raise FormatError("directory header has a bad magic number")
        # a depth past the table's limit, or fewer blocks than its buckets, would make readdir
        # and fsck loop over up to 2**(2**32) buckets (found by tests/t0_fuzz.py)
        if depth > DIR_MAX_DEPTH or nblocks < 1 + (1 << depth):
            raise FormatError(f"directory header is damaged (depth {depth}, {nblocks} blocks)")
        if free_head and not (1 << depth) < free_head < nblocks:
            raise FormatError(f"directory header is damaged (free list at block {free_head})")
        return cls(depth, count, nbytes, nblocks, free_head)


def bucket_header(buf) -> tuple[int, int, int]:
    """(count, used, next) of a bucket block."""
    return _BUCKET_HDR.unpack_from(buf, 0)


def set_bucket_header(buf, count: int, used: int, nxt: int) -> None:
    _BUCKET_HDR.pack_into(buf, 0, count, used, nxt)


def dirent_size(name: bytes) -> int:
    return DIRENT_HDR_SIZE + len(name)


def iter_bucket(buf):
    """Yield (offset, hash, ino, type, name) for each entry in a bucket block; FormatError
    when the entries do not fill exactly the bytes the bucket header says are used."""
    count, used, _ = _BUCKET_HDR.unpack_from(buf, 0)
    off = BUCKET_HDR_SIZE
    end = BUCKET_HDR_SIZE + used
    if end > BLOCK_SIZE or count * (DIRENT_HDR_SIZE + 1) > used:
        raise FormatError(f"directory bucket is damaged ({count} entries in {used} bytes)")
    unpack = _DIRENT.unpack_from
    hsize = DIRENT_HDR_SIZE
    for _ in range(count):
        if off + hsize > end:
            raise FormatError("directory entry runs past the bytes its bucket uses")
        h, ino, typ, nlen = unpack(buf, off)
        if nlen == 0 or off + hsize + nlen > end:
            raise FormatError("directory entry runs past the bytes its bucket uses")
        name = bytes(buf[off + hsize: off + hsize + nlen])
        yield off, h, ino, typ, name
        off += hsize + nlen


def pack_dirent(buf, off: int, h: int, ino: int, typ: int, name: bytes) -> int:
    _DIRENT.pack_into(buf, off, h, ino, typ, len(name))
    end = off + DIRENT_HDR_SIZE + len(name)
    buf[off + DIRENT_HDR_SIZE: end] = name
    return end


# --------------------------------------------------------------------------- extended attributes
#
# ``Inode.xattr`` is the inode's xattr root block, 0: the inode has no attributes. Names carry
# their namespace prefix ("user.", "trusted.", "security."). The attributes of an inode form one
# byte stream of packed entries (_XENT2 + name + value), kept in the order they were first set:
#
#   root block        _XROOT (XATTR_MAGIC, count, length, names, map of the "xattr file"),
#                     then the first XATTR_INLINE bytes of the stream
#   xattr file        the rest of the stream: logical block i holds stream bytes
#                     [XATTR_INLINE + i*4096, +4096), mapped by the root's 15 pointers exactly as
#                     Inode.map maps a file (12 direct, single, double, triple indirect); no hole
#                     below the stream's end, no block mapped past it; bytes past the end are 0
#
# A change rewrites the stream and writes only the blocks whose content differs (all go
# through the metadata cache and the redo log). Limits, as Linux: a name, prefix included, is at
# most XATTR_NAME_MAX bytes (ERANGE), a value at most XATTR_SIZE_MAX bytes (E2BIG);
# the names of one inode with their NUL terminators at most XATTR_LIST_MAX bytes, which is
# all listxattr(2) can return (ENOSPC beyond); the stream at most XATTR_TOTAL_MAX bytes (ENOSPC).
#
# Format version 1 stored one block (_XHDR, then _XENT + name + value; at most 4092 bytes). Such
# a block is still read: it never starts with XATTR_MAGIC (its bytes 2-3 are the bytes used,
# <= 4092, while the magic's are 0x5441 = 21569). The inode's next xattr change rewrites it, in
# place, in the layout above, which makes the volume version 2.

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
XATTR_TOTAL_MAX = 8 << 20
XATTR_MAGIC = b"RXAT"

_XROOT = struct.Struct(
    "<4s"  # magic        XATTR_MAGIC
    "I"  # count          entries
    "I"  # length         bytes in the stream of packed entries
    "I"  # names          listxattr size: sum of (name length + 1)
    "I"  # reserved       0
    "15I"  # map          block map of the xattr file, as Inode.map
)
_XENT2 = struct.Struct("<BI")  # name length, value length; then name, value
XATTR_INLINE = BLOCK_SIZE - _XROOT.size
XATTR_ENTRY_HDR = _XENT2.size


@dataclass
class XattrRoot:
    count: int = 0
    length: int = 0
    names: int = 0
    map: list = field(default_factory=lambda: [0] * 15)

    @property
    def file_blocks(self) -> int:
        """Logical blocks of the xattr file that hold the stream past the root block."""
        return xattr_file_blocks(self.length)

    def pack(self, stream: bytes) -> bytearray:
        """The root block: this header and the stream's first XATTR_INLINE bytes."""
        buf = bytearray(BLOCK_SIZE)
        _XROOT.pack_into(buf, 0, XATTR_MAGIC, self.count, self.length, self.names, 0, *self.map)
        head = stream[:XATTR_INLINE]
        buf[_XROOT.size: _XROOT.size + len(head)] = head
        return buf

    @classmethod
    def unpack(cls, buf) -> "XattrRoot":
        if len(buf) < _XROOT.size:
            raise FormatError("xattr root block is truncated")
        f = _XROOT.unpack_from(buf, 0)
        if f[0] != XATTR_MAGIC:
            raise FormatError("xattr root block has a bad magic number")
        count, length, names = f[1], f[2], f[3]
        if (length > XATTR_TOTAL_MAX or names > XATTR_LIST_MAX
                or count * (XATTR_ENTRY_HDR + 1) > length or count * 2 > names):
            raise FormatError(f"xattr root block is damaged ({count} entries, {length} bytes, "
                              f"{names} bytes of names)")
        return cls(count, length, names, list(f[5:20]))


def is_xattr_root(buf) -> bool:
    """True for a version-2 root block, False for a version-1 xattr block."""
    return bytes(buf[:4]) == XATTR_MAGIC


def xattr_inline(buf) -> memoryview:
    """The part of the stream held in a root block."""
    return memoryview(buf)[_XROOT.size:]


def xattr_file_blocks(length: int) -> int:
    return -(-max(0, length - XATTR_INLINE) // BLOCK_SIZE)


def xattr_list_size(names) -> int:
    """Bytes listxattr(2) returns for these names."""
    return sum(len(n) + 1 for n in names)


def pack_xattr_stream(attrs: dict[bytes, bytes]) -> bytes:
    parts = []
    hdr = _XENT2.pack
    for k, v in attrs.items():
        parts += (hdr(len(k), len(v)), k, v)
    return b"".join(parts)


def unpack_xattr_stream(stream, count: int) -> dict[bytes, bytes]:
    """The entries of a stream; FormatError if it does not hold `count` well-formed entries."""
    out = {}
    off = 0
    end = len(stream)
    unpack = _XENT2.unpack_from
    hsize = _XENT2.size
    mv = memoryview(stream)
    for _ in range(count):
        if off + hsize > end:
            raise FormatError("xattr stream ends inside an entry header")
        nlen, vlen = unpack(mv, off)
        off += hsize
        if nlen == 0 or off + nlen + vlen > end:
            raise FormatError("xattr entry runs past the end of the stream")
        name = bytes(mv[off: off + nlen])
        if name in out:
            raise FormatError(f"xattr {name!r} is stored twice")
        out[name] = bytes(mv[off + nlen: off + nlen + vlen])
        off += nlen + vlen
    if off != end:
        raise FormatError(f"xattr stream holds {end - off} bytes after its {count} entries")
    return out


# Version 1: one block per inode: _XHDR, then entries (_XENT + name + value), at most
# XATTR_CAPACITY bytes. Read only (volumes made by version 1); tests make such blocks.
_XHDR = struct.Struct("<HH")  # count, used bytes after the header
_XENT = struct.Struct("<BH")  # name length, value length
XATTR_CAPACITY = BLOCK_SIZE - _XHDR.size


def unpack_xattrs(buf) -> dict[bytes, bytes]:
    """The entries of a version-1 xattr block; FormatError if they do not fit its bytes used."""
    if len(buf) < _XHDR.size:
        raise FormatError("version-1 xattr block is truncated")
    count, used = _XHDR.unpack_from(buf, 0)
    end = _XHDR.size + used
    if used > XATTR_CAPACITY or end > len(buf):
        raise FormatError("version-1 xattr block is overfull")
    off = _XHDR.size
    out = {}
    for _ in range(count):
        if off + _XENT.size > end:
            raise FormatError("version-1 xattr entry header runs past the bytes used")
        nlen, vlen = _XENT.unpack_from(buf, off)
        off += _XENT.size
        if nlen == 0 or off + nlen + vlen > end:
            raise FormatError("version-1 xattr entry runs past the bytes used")
        name = bytes(buf[off: off + nlen])
        off += nlen
        out[name] = bytes(buf[off: off + vlen])
        off += vlen
    return out


def xattrs_size(attrs: dict[bytes, bytes]) -> int:
    """Bytes the entries take in a version-1 block (after its header)."""
    return sum(_XENT.size + len(k) + len(v) for k, v in attrs.items())


def pack_xattrs(attrs: dict[bytes, bytes]) -> bytearray:
    """A version-1 xattr block."""
    if xattrs_size(attrs) > XATTR_CAPACITY:
        raise ValueError("version-1 xattrs must fit one block")
    buf = bytearray(BLOCK_SIZE)
    off = _XHDR.size
    for k, v in attrs.items():
        _XENT.pack_into(buf, off, len(k), len(v))
        off += _XENT.size
        buf[off: off + len(k)] = k
        off += len(k)
        buf[off: off + len(v)] = v
        off += len(v)
    _XHDR.pack_into(buf, 0, len(attrs), off - _XHDR.size)
    return buf
