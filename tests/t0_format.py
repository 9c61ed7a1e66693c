"""t0: the on-volume format (repfs.fs.format) as pure functions: no disk at all."""

from __future__ import annotations

import random
import stat
import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from repfs.fs import format as fmt
from repfs.fs.format import (
    BLOCK_SIZE, BUCKET_CAPACITY, BUCKET_HDR_SIZE, DIRENT_HDR_SIZE, FORMAT_VERSION, HASH_BITS,
    INODE_SIZE, INODES_PER_BLOCK, MAX_FILE_BLOCKS, MAX_FILE_SIZE, XATTR_CAPACITY, DirHeader,
    FormatError, Inode, Superblock, bucket_header, dirent_size, iter_bucket, name_hash,
    pack_dirent, pack_xattrs, set_bucket_header, unpack_xattrs, xattrs_size,
)

SB_FIELDS = ("nblocks", "ninodes", "bbitmap_start", "bbitmap_blocks", "ibitmap_start",
             "ibitmap_blocks", "itable_start", "itable_blocks", "data_start", "free_blocks",
             "free_inodes", "orphan_head", "next_generation", "created_ns", "commit_seq",
             "uuid", "label", "version")


def _sample_sb(**kw) -> Superblock:
    sb = Superblock.layout(65536, 16384, label="vol-α", created_ns=-123456789)
    sb.orphan_head = 77
    sb.next_generation = 0xFFFFFFFE
    sb.commit_seq = 2**63 + 5
    sb.free_blocks -= 1000
    sb.free_inodes -= 3
    for k, v in kw.items():
        setattr(sb, k, v)
    return sb


# ------------------------------------------------------------------------- superblock


def test_superblock_roundtrip_every_field():
    sb = _sample_sb()
    raw = sb.pack()
    assert len(raw) == BLOCK_SIZE
    back = Superblock.unpack(raw)
    for f in SB_FIELDS:
        assert getattr(back, f) == getattr(sb, f), f
    # packing again gives the same bytes (deterministic, checksum included)
    assert back.pack() == raw


def test_superblock_roundtrip_label_limits():
    sb = _sample_sb(label="x" * 64)
    assert Superblock.unpack(sb.pack()).label == "x" * 64
    sb = _sample_sb(label="")
    assert Superblock.unpack(sb.pack()).label == ""


def test_superblock_unpack_accepts_trailing_garbage_after_checksum():
    # only the fields and their checksum are covered; the rest of block 0 is padding
    raw = bytearray(_sample_sb().pack())
    raw[-1] = 0xAA
    assert Superblock.unpack(bytes(raw)).nblocks == 65536


@pytest.mark.parametrize("nblocks,ninodes", [
    (64, 16), (65536, 16384), (32768, 64), (32769, 64), (2**32 - 1, 2**25), (100000, 32769),
])
def test_layout_geometry(nblocks, ninodes):
    sb = Superblock.layout(nblocks, ninodes)
    bits = BLOCK_SIZE * 8
    assert sb.bbitmap_start == 1
    assert sb.bbitmap_blocks * bits >= nblocks > (sb.bbitmap_blocks - 1) * bits
    assert sb.ibitmap_start == sb.bbitmap_start + sb.bbitmap_blocks
    assert sb.ibitmap_blocks * bits >= ninodes > (sb.ibitmap_blocks - 1) * bits
    assert sb.itable_start == sb.ibitmap_start + sb.ibitmap_blocks
    assert sb.itable_blocks * INODES_PER_BLOCK >= ninodes
    assert (sb.itable_blocks - 1) * INODES_PER_BLOCK < ninodes
    assert sb.data_start == sb.itable_start + sb.itable_blocks
    assert sb.free_blocks == nblocks - sb.data_start
    assert sb.free_inodes == ninodes - 1
    assert sb.version == FORMAT_VERSION
    if sb.data_start < nblocks:
        assert Superblock.unpack(sb.pack()).data_start == sb.data_start


def test_layout_gives_distinct_uuids():
    assert Superblock.layout(100, 16).uuid != Superblock.layout(100, 16).uuid


def test_bad_magic():
    raw = bytearray(_sample_sb().pack())
    raw[0:8] = b"EXT4FSXX"
    with pytest.raises(FormatError, match="magic"):
        Superblock.unpack(bytes(raw))
    with pytest.raises(FormatError):
        Superblock.unpack(bytes(BLOCK_SIZE))


@pytest.mark.parametrize("offset", [8, 12, 16, 40, 100, 150, 180, 207, 208, 215])
def test_any_flipped_byte_fails_the_checksum(offset):
    raw = bytearray(_sample_sb().pack())
    raw[offset] ^= 0x01
    with pytest.raises(FormatError, match="checksum"):
        Superblock.unpack(bytes(raw))


def test_every_byte_of_fields_is_covered_by_the_checksum():
    raw = _sample_sb().pack()
    body_len = fmt._SB.size + fmt._SB_CSUM.size
    for off in range(8, body_len):  # past the magic (checked first)
        bad = bytearray(raw)
        bad[off] ^= 0x80
        with pytest.raises(FormatError):
            Superblock.unpack(bytes(bad))


def _repack(fields_tuple) -> bytes:
    body = fmt._SB.pack(*fields_tuple)
    out = body + fmt._SB_CSUM.pack(xxhash.xxh3_64_intdigest(body))
    return out + bytes(BLOCK_SIZE - len(out))


def test_version_mismatch_with_valid_checksum():
    sb = _sample_sb(version=FORMAT_VERSION + 1)
    raw = sb.pack()  # the checksum is right; only the version is foreign
    with pytest.raises(FormatError, match="version"):
        Superblock.unpack(raw)
    sb = _sample_sb(version=0)
    with pytest.raises(FormatError, match="version"):
        Superblock.unpack(sb.pack())


def test_block_size_mismatch_with_valid_checksum():
    f = list(fmt._SB.unpack(_sample_sb().pack()[: fmt._SB.size]))
    f[2] = 8192
    with pytest.raises(FormatError, match="block size"):
        Superblock.unpack(_repack(f))


def test_inconsistent_geometry_with_valid_checksum():
    f = list(fmt._SB.unpack(_sample_sb().pack()[: fmt._SB.size]))
    g = list(f)
    g[11] = g[3]  # data_start == nblocks
    with pytest.raises(FormatError, match="geometry"):
        Superblock.unpack(_repack(g))
    g = list(f)
    g[10] += 1  # itable does not end where data starts
    with pytest.raises(FormatError, match="geometry"):
        Superblock.unpack(_repack(g))


# ------------------------------------------------------------------------- inodes


def _rand_inode(rng: random.Random, ino: int) -> Inode:
    return Inode(
        ino, mode=rng.choice([stat.S_IFREG | 0o644, stat.S_IFDIR | 0o2755,
                              stat.S_IFLNK | 0o777, stat.S_IFCHR | 0o600]),
        uid=rng.randrange(2**32), gid=rng.randrange(2**32), nlink=rng.randrange(65001),
        flags=rng.randrange(2), generation=rng.randrange(2**32), size=rng.randrange(2**63),
        blocks=rng.randrange(2**64), rdev=rng.randrange(2**64),
        atime_ns=rng.randrange(-2**63, 2**63), mtime_ns=rng.randrange(-2**63, 2**63),
        ctime_ns=rng.randrange(-2**63, 2**63), crtime_ns=rng.randrange(-2**63, 2**63),
        parent=rng.randrange(2**32), xattr=rng.randrange(2**32),
        orphan_next=rng.randrange(2**32), map=[rng.randrange(2**32) for _ in range(15)],
    )


INODE_FIELDS = ("mode", "uid", "gid", "nlink", "flags", "generation", "size", "blocks", "rdev",
                "atime_ns", "mtime_ns", "ctime_ns", "crtime_ns", "parent", "xattr",
                "orphan_next", "map")


def test_inode_size_fits_slot():
    assert fmt._INODE.size <= INODE_SIZE
    assert INODES_PER_BLOCK * INODE_SIZE == BLOCK_SIZE


def test_inode_roundtrip_full_block():
    rng = random.Random(7)
    buf = bytearray(BLOCK_SIZE)
    inodes = [_rand_inode(rng, 32 + i) for i in range(INODES_PER_BLOCK)]
    for i, ino in enumerate(inodes):
        ino.pack_into(buf, i * INODE_SIZE)
    for i, ino in enumerate(inodes):
        back = Inode.unpack_from(ino.ino, bytes(buf), i * INODE_SIZE)
        assert back.ino == ino.ino
        for f in INODE_FIELDS:
            assert getattr(back, f) == getattr(ino, f), f
        # in-memory state is not stored
        assert back.dirty is False and back.lookups == 0


def test_inode_pack_does_not_touch_neighbours():
    buf = bytearray(b"\xee" * BLOCK_SIZE)
    Inode(5, mode=stat.S_IFREG | 0o600, size=3).pack_into(buf, 5 * INODE_SIZE)
    assert buf[: 5 * INODE_SIZE] == b"\xee" * (5 * INODE_SIZE)
    tail = 5 * INODE_SIZE + fmt._INODE.size
    assert buf[tail:] == b"\xee" * (BLOCK_SIZE - tail)


def test_inode_limits_rejected():
    buf = bytearray(BLOCK_SIZE)
    with pytest.raises(struct.error):
        Inode(1, mode=2**32).pack_into(buf, 0)
    with pytest.raises(struct.error):
        Inode(1, map=[2**32] + [0] * 14).pack_into(buf, 0)


def test_zero_slot_is_a_free_inode():
    back = Inode.unpack_from(9, bytes(BLOCK_SIZE), 9 * INODE_SIZE)
    assert back.mode == 0 and back.nlink == 0 and back.map == [0] * 15


def test_inode_map_default_not_shared():
    a, b = Inode(1), Inode(2)
    a.map[0] = 99
    assert b.map[0] == 0


def test_file_size_limits_consistent():
    assert MAX_FILE_SIZE == 4 << 40
    assert MAX_FILE_SIZE // BLOCK_SIZE <= MAX_FILE_BLOCKS
    assert MAX_FILE_BLOCKS == 12 + 1024 + 1024**2 + 1024**3


# ------------------------------------------------------------------------- xattrs


def test_xattr_roundtrip():
    attrs = {b"user.a": b"", b"user.bin": bytes(range(256)), b"trusted.x": b"\0\0\0",
             b"security.selinux": b"system_u:object_r:tmp_t:s0\0"}
    buf = pack_xattrs(attrs)
    assert len(buf) == BLOCK_SIZE
    assert unpack_xattrs(buf) == attrs
    assert list(unpack_xattrs(buf)) == list(attrs)  # order kept


def test_xattr_empty():
    assert unpack_xattrs(pack_xattrs({})) == {}
    assert unpack_xattrs(bytes(BLOCK_SIZE)) == {}
    assert xattrs_size({}) == 0


def test_xattr_exactly_full_block():
    name = b"user.big"
    overhead = xattrs_size({name: b""})
    value = bytes(random.Random(1).randrange(256) for _ in range(XATTR_CAPACITY - overhead))
    attrs = {name: value}
    assert xattrs_size(attrs) == XATTR_CAPACITY
    buf = pack_xattrs(attrs)
    assert len(buf) == BLOCK_SIZE
    assert unpack_xattrs(buf) == attrs


def test_xattr_size_accounting():
    attrs = {b"user.%d" % i: b"v" * i for i in range(50)}
    assert xattrs_size(attrs) == sum(3 + len(k) + len(v) for k, v in attrs.items())
    assert unpack_xattrs(pack_xattrs(attrs)) == attrs


def test_xattr_many_small():
    attrs = {}
    i = 0
    while True:
        k, v = b"user.k%04d" % i, b"%d" % i
        if xattrs_size({**attrs, k: v}) > XATTR_CAPACITY:
            break
        attrs[k] = v
        i += 1
    assert len(attrs) > 200
    assert unpack_xattrs(pack_xattrs(attrs)) == attrs


def test_xattr_v2_stream_roundtrip_and_root():
    attrs = {b"user.a": b"", b"user.big": bytes(65536), b"trusted.x": b"\0" * 3,
             b"security.selinux": b"system_u:object_r:tmp_t:s0\0"}
    stream = fmt.pack_xattr_stream(attrs)
    assert len(stream) == sum(fmt.XATTR_ENTRY_HDR + len(k) + len(v) for k, v in attrs.items())
    assert list(fmt.unpack_xattr_stream(stream, len(attrs)).items()) == list(attrs.items())
    root = fmt.XattrRoot(count=4, length=len(stream), names=fmt.xattr_list_size(attrs),
                         map=list(range(100, 115)))
    buf = root.pack(stream)
    assert len(buf) == BLOCK_SIZE and fmt.is_xattr_root(buf)
    assert fmt.XattrRoot.unpack(buf) == root
    assert bytes(fmt.xattr_inline(buf)) == stream[: fmt.XATTR_INLINE]
    assert root.file_blocks == -(-(len(stream) - fmt.XATTR_INLINE) // BLOCK_SIZE)
    assert fmt.xattr_file_blocks(fmt.XATTR_INLINE) == 0
    assert fmt.xattr_file_blocks(fmt.XATTR_INLINE + 1) == 1


def test_xattr_v1_block_is_never_taken_for_a_v2_root():
    # the magic's bytes 2-3, read as version 1's "bytes used", exceed any block's capacity
    assert struct.unpack_from("<H", fmt.XATTR_MAGIC, 2)[0] > XATTR_CAPACITY
    full = pack_xattrs({b"user.x": b"v" * (XATTR_CAPACITY - 3 - 6)})
    assert not fmt.is_xattr_root(full) and not fmt.is_xattr_root(pack_xattrs({}))
    with pytest.raises(FormatError):
        fmt.XattrRoot.unpack(full)


def test_xattr_root_fields_out_of_range_are_refused():
    stream = fmt.pack_xattr_stream({b"user.a": b"1"})
    good = fmt.XattrRoot(count=1, length=len(stream), names=7)
    assert fmt.XattrRoot.unpack(good.pack(stream)) == good
    for bad in (dict(length=fmt.XATTR_TOTAL_MAX + 1), dict(names=fmt.XATTR_LIST_MAX + 1),
                dict(count=len(stream)), dict(count=5)):
        root = fmt.XattrRoot(**{**dict(count=1, length=len(stream), names=7), **bad})
        with pytest.raises(FormatError, match="damaged"):
            fmt.XattrRoot.unpack(root.pack(stream))
    with pytest.raises(FormatError):
        fmt.XattrRoot.unpack(good.pack(stream)[:40])


@pytest.mark.parametrize("cut", [1, 4, 5, 7, 30])
def test_xattr_v2_stream_damage_is_a_format_error(cut):
    stream = fmt.pack_xattr_stream({b"user.a": b"1" * 20, b"user.b": b"2"})
    with pytest.raises(FormatError):
        fmt.unpack_xattr_stream(stream[:-cut], 2)
    with pytest.raises(FormatError):  # more bytes than the entries take
        fmt.unpack_xattr_stream(stream + b"\0" * cut, 2)
    with pytest.raises(FormatError):  # a name twice
        fmt.unpack_xattr_stream(fmt.pack_xattr_stream({b"user.a": b""}) * 2, 2)


@given(st.binary(max_size=600), st.integers(0, 40))
def test_xattr_v2_stream_decoder_fuzz(raw, count):
    try:
        attrs = fmt.unpack_xattr_stream(raw, count)
    except FormatError:
        return
    assert len(attrs) == count
    assert fmt.pack_xattr_stream(attrs) == raw


@given(st.binary(max_size=120), st.booleans())
def test_xattr_root_decoder_fuzz(raw, with_magic):
    raw = raw.ljust(BLOCK_SIZE, b"\0")
    if with_magic:
        raw = fmt.XATTR_MAGIC + raw[4:]
    try:
        root = fmt.XattrRoot.unpack(raw)
    except FormatError:
        return
    assert raw[:4] == fmt.XATTR_MAGIC and len(root.map) == 15
    assert root.length <= fmt.XATTR_TOTAL_MAX and root.names <= fmt.XATTR_LIST_MAX
    assert root.file_blocks <= fmt.XATTR_TOTAL_MAX // BLOCK_SIZE


def test_version_1_volumes_are_read():
    assert fmt.READABLE_VERSIONS == (1, 2) and FORMAT_VERSION == 2
    sb = Superblock.unpack(_sample_sb(version=1).pack())
    assert sb.version == 1


# ------------------------------------------------------------------------- directories


def test_dir_header_roundtrip_and_magic():
    buf = bytearray(BLOCK_SIZE)
    h = DirHeader(depth=16, count=123456789, bytes=2**40, nblocks=70000, free_head=65600)
    h.pack_into(buf)
    assert DirHeader.unpack_from(bytes(buf)) == h
    buf[0] ^= 1
    with pytest.raises(FormatError):
        DirHeader.unpack_from(bytes(buf))
    with pytest.raises(FormatError):
        DirHeader.unpack_from(bytes(BLOCK_SIZE))


def test_name_hash_range_and_determinism():
    seen = set()
    for i in range(2000):
        n = b"name-%d" % i
        h = name_hash(n)
        assert 0 <= h < 2**HASH_BITS
        assert h == name_hash(n)
        seen.add(h)
    assert len(seen) == 2000
    assert name_hash(b"x" * 255) < 2**HASH_BITS


def test_bucket_entries_roundtrip():
    buf = bytearray(BLOCK_SIZE)
    names = [b"a", b"x" * 255, "é".encode(), b"\xff\xfe"]
    off = BUCKET_HDR_SIZE
    for i, n in enumerate(names):
        off = pack_dirent(buf, off, name_hash(n), 100 + i, i, n)
    used = off - BUCKET_HDR_SIZE
    assert used == sum(dirent_size(n) for n in names)
    set_bucket_header(buf, len(names), used, 9)
    assert bucket_header(buf) == (len(names), used, 9)
    got = list(iter_bucket(bytes(buf)))
    assert [g[4] for g in got] == names
    assert [g[2] for g in got] == [100, 101, 102, 103]
    assert [g[3] for g in got] == [0, 1, 2, 3]
    assert [g[1] for g in got] == [name_hash(n) for n in names]
    assert got[0][0] == BUCKET_HDR_SIZE
    assert dirent_size(b"x" * 255) == DIRENT_HDR_SIZE + 255 <= BUCKET_CAPACITY
