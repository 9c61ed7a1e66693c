"""Delta chunks and delta-set headers: the replication wire and save-volume format.

Pure encode/decode functions (no I/O), so they can be unit-tested and fuzzed alone.

A delta set is the set of blocks that changed between two consistency points, with their
content at the later one. It travels as delta chunks followed by one delta-set header
(the header comes last: FIG. 9 text; invariant 4).

Chunk::

    _CHUNK_HDR   magic "RDCHUNK1", generation u64, delta set u64, chunk number u32,
                 extent count u32, block count u32, checksum u64
    extents      count x (start u32, length u32)
    data         block count x 4 KiB, the extents' blocks in order

The checksum is xxh3-64 over the header (with the checksum field zero), the extents and the
data. A chunk holds at most MAX_CHUNK_BLOCKS blocks.

A received chunk whose blocks were partly free at the secondary's last played boundary is
stored as a *direct record* (issue 8: each new byte written once on the secondary): those
blocks went straight into the volume, and the record keeps only the rest::

    _DIRECT_HDR  magic "RDDIRCT1", direct run count u32, stored block count u32
    runs         count x (start u32, length u32): the blocks written into the volume, in the
                 chunk's block order, each inside one of its extents
    chunk        the received chunk's header and extents, unchanged (its checksum included)
    data         the chunk's other blocks, in order

`join_direct` rebuilds the received chunk from a record and the volume, so the one check of
`decode_chunk` (the chunk's checksum over every block) verifies the direct blocks too.

Delta-set header::

    magic "RDSETHD1", generation u64, delta set u64, chunks u32, blocks u64,
    data checksum u64 (xxh3-64 over the chunks' checksums in chunk order), header checksum u64
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import xxhash

BS = 4096
MAX_CHUNK_BLOCKS = 256
MAX_EXTENTS = 4096

_CHUNK_MAGIC = b"RDCHUNK1"
_CHUNK_HDR = struct.Struct("<8sQQIIIQ")
_EXTENT = struct.Struct("<II")
_DIRECT_MAGIC = b"RDDIRCT1"
_DIRECT_HDR = struct.Struct("<8sII")
_SET_MAGIC = b"RDSETHD1"
_SET_HDR = struct.Struct("<8sQQIQQQ")
SET_HEADER_SIZE = _SET_HDR.size


class ChunkError(ValueError):
    """A chunk or header fails to decode or verify; nothing of it may be applied."""


@dataclass
class Chunk:
    generation: int
    delta_set: int
    number: int
    extents: list[tuple[int, int]]
    data: bytes  # (decode_chunk: a memoryview of the buffer it decoded)
    checksum: int = 0
    direct: list = field(default_factory=list)  # runs stored in the volume (a direct record)

    @property
    def blocks(self) -> int:
        return sum(n for _, n in self.extents)


def _sealed_checksum(head, *parts) -> int:
    """xxh3-64 over a record's header, whose last 8 bytes (the checksum field) count as zero,
    and then `parts`: the one checksum of chunks and copy records, encoded or checked."""
    h = xxhash.xxh3_64()
    h.update(memoryview(head)[:-8])
    h.update(bytes(8))
    for part in parts:
        h.update(part)
    return h.intdigest()


def encode_chunk(generation: int, delta_set: int, number: int,
                 extents: list[tuple[int, int]], data) -> bytes:
    blocks = sum(n for _, n in extents)
    if len(data) != blocks * BS:
        raise ChunkError("chunk data does not match its extents")
    if blocks > MAX_CHUNK_BLOCKS or len(extents) > MAX_EXTENTS:
        raise ChunkError("chunk too large")
    ext = b"".join(struct.pack("<II", s, n) for s, n in extents)
    head = bytearray(_CHUNK_HDR.pack(_CHUNK_MAGIC, generation, delta_set, number,
                                     len(extents), blocks, 0))
    struct.pack_into("<Q", head, _CHUNK_HDR.size - 8, _sealed_checksum(head, ext, data))
    return b"".join((head, ext, data))


def encode_chunk_parts(generation: int, delta_set: int, number: int,
                       extents: list[tuple[int, int]], parts) -> memoryview:
    """`encode_chunk` with the data given as buffers in order (`parts`, whole blocks
    together), returned as a memoryview (format "B") of a new buffer. The data is copied
    once, into the chunk, with numpy, which lets go of the GIL, into memory that is not
    zeroed first (issue 8: the sender joined each chunk's reads, then the header to the
    join: three copies of every byte, each holding the GIL against the FUSE requests that
    the daemon's trio thread serves)."""
    blocks = sum(n for _, n in extents)
    parts = [memoryview(p).cast("B") for p in parts]
    if sum(p.nbytes for p in parts) != blocks * BS:
        raise ChunkError("chunk data does not match its extents")
    if blocks > MAX_CHUNK_BLOCKS or len(extents) > MAX_EXTENTS:
        raise ChunkError("chunk too large")
    hsize = _CHUNK_HDR.size + 8 * len(extents)
    arr = np.empty(hsize + blocks * BS, dtype=np.uint8)
    out = memoryview(arr)
    _CHUNK_HDR.pack_into(out, 0, _CHUNK_MAGIC, generation, delta_set, number, len(extents),
                         blocks, 0)
    off = _CHUNK_HDR.size
    for s, n in extents:
        _EXTENT.pack_into(out, off, s, n)
        off += 8
    for p in parts:
        np.copyto(arr[off: off + p.nbytes], np.frombuffer(p, dtype=np.uint8))
        off += p.nbytes
    struct.pack_into("<Q", out, _CHUNK_HDR.size - 8,
                     _sealed_checksum(out[:_CHUNK_HDR.size], out[_CHUNK_HDR.size:]))
    return out


def encoded_checksum(buf, offset: int = 0) -> int:
    """The checksum field of an encoded chunk."""
    return _CHUNK_HDR.unpack_from(buf, offset)[6]


def chunk_size(buf, offset: int = 0) -> int:
    """Total encoded size of the chunk starting at `offset` (from its header alone)."""
    if len(buf) - offset < _CHUNK_HDR.size:
        raise ChunkError("truncated chunk header")
    magic, _, _, _, next_, blocks, _ = _CHUNK_HDR.unpack_from(buf, offset)
    if magic != _CHUNK_MAGIC:
        raise ChunkError("not a delta chunk (bad magic)")
    if next_ > MAX_EXTENTS or blocks > MAX_CHUNK_BLOCKS:
        raise ChunkError("chunk header out of range")
    return _CHUNK_HDR.size + 8 * next_ + blocks * BS


def record_size(buf, offset: int = 0) -> int:
    """Total size of the stored record (a chunk or a direct record) at `offset`, from its
    headers alone."""
    if bytes(buf[offset: offset + 8]) != _DIRECT_MAGIC:
        return chunk_size(buf, offset)
    nruns, stored = _direct_head(buf, offset)
    inner = offset + _DIRECT_HDR.size + 8 * nruns
    size = chunk_size(buf, inner)
    blocks = _CHUNK_HDR.unpack_from(buf, inner)[5]
    if stored > blocks:
        raise ChunkError("direct record stores more blocks than its chunk has")
    return inner - offset + size - (blocks - stored) * BS


def _direct_head(buf, offset: int) -> tuple[int, int]:
    if len(buf) - offset < _DIRECT_HDR.size:
        raise ChunkError("truncated direct record header")
    _, nruns, stored = _DIRECT_HDR.unpack_from(buf, offset)
    if nruns > MAX_CHUNK_BLOCKS or stored > MAX_CHUNK_BLOCKS:
        raise ChunkError("direct record header out of range")
    if len(buf) - offset < _DIRECT_HDR.size + 8 * nruns + _CHUNK_HDR.size:
        raise ChunkError("truncated direct record")
    return nruns, stored


def _chunk_offset(buf, offset: int = 0) -> int:
    """Where the chunk header of the record at `offset` starts."""
    if bytes(buf[offset: offset + 8]) != _DIRECT_MAGIC:
        return offset
    return offset + _DIRECT_HDR.size + 8 * _direct_head(buf, offset)[0]


def direct_pieces(extents, runs) -> list[tuple[int, int, bool]]:
    """The chunk's blocks in order as (start, count, direct) pieces: `runs` (in the chunk's
    block order) are direct, the rest of each extent is stored. Raises ChunkError if a run is
    not inside the extents in order."""
    out, i = [], 0
    for s, n in extents:
        cur, end = s, s + n
        while i < len(runs) and cur <= runs[i][0] and runs[i][0] + runs[i][1] <= end:
            rs, rn = runs[i]
            if rn <= 0:
                raise ChunkError("an empty direct run")
            if rs > cur:
                out.append((cur, rs - cur, False))
            out.append((rs, rn, True))
            cur = rs + rn
            i += 1
        if cur < end:
            out.append((cur, end - cur, False))
    if i != len(runs):
        raise ChunkError("a direct run lies outside its chunk's extents")
    return out


def encode_direct(chunk, runs) -> list:
    """The stored record of received chunk `chunk` (its encoded bytes) whose blocks in `runs`
    were written straight into the volume: buffers to write one after the other."""
    mv = memoryview(chunk).cast("B")
    next_ = _CHUNK_HDR.unpack_from(mv, 0)[4]
    hsize = _CHUNK_HDR.size + 8 * next_
    extents = [_EXTENT.unpack_from(mv, _CHUNK_HDR.size + 8 * i) for i in range(next_)]
    parts, pos, stored = [], hsize, 0
    for _, n, direct in direct_pieces(extents, runs):
        if not direct:
            parts.append(mv[pos: pos + n * BS])
            stored += n
        pos += n * BS
    head = _DIRECT_HDR.pack(_DIRECT_MAGIC, len(runs), stored) + b"".join(
        _EXTENT.pack(s, n) for s, n in runs)
    return [head, mv[:hsize], *parts]


@dataclass
class StoredPieces:
    """A stored record taken apart, unverified: the chunk's header and extents (`head`), its
    blocks in order as (start, count, direct) `pieces`, and the stored blocks' data."""
    head: memoryview
    extents: list[tuple[int, int]]
    runs: list[tuple[int, int]]
    pieces: list[tuple[int, int, bool]]
    data: memoryview
    blocks: int


def split_record(record) -> StoredPieces:
    """Take a stored record (a chunk or a direct record) apart; raises ChunkError if its
    headers and sizes disagree (nothing is verified against the checksum here)."""
    mv = memoryview(record).cast("B")
    if bytes(mv[:8]) == _DIRECT_MAGIC:
        nruns, stored = _direct_head(mv, 0)
        runs = [_EXTENT.unpack_from(mv, _DIRECT_HDR.size + 8 * i) for i in range(nruns)]
        inner = _DIRECT_HDR.size + 8 * nruns
    else:
        runs, inner, stored = [], 0, None
    chunk_size(mv, inner)
    next_, blocks = _CHUNK_HDR.unpack_from(mv, inner)[4:6]
    hsize = _CHUNK_HDR.size + 8 * next_
    if stored is None:
        stored = blocks
    if len(mv) != inner + hsize + stored * BS:
        raise ChunkError("stored record is not the size its headers say")
    extents = [_EXTENT.unpack_from(mv, inner + _CHUNK_HDR.size + 8 * i) for i in range(next_)]
    pieces = direct_pieces(extents, runs)
    if sum(n for _, n, _ in pieces) != blocks or sum(
            n for _, n, d in pieces if not d) != stored:
        raise ChunkError("stored record's blocks do not add up")
    return StoredPieces(mv[inner: inner + hsize], extents, runs, pieces, mv[inner + hsize:],
                        blocks)


def join_direct(record, read) -> tuple[memoryview, list[tuple[int, int]]]:
    """The received chunk that stored `record` was, and its direct runs ([] for a plain
    chunk, returned as it is). The direct blocks are read with `read(start, count)` (the
    volume); `decode_chunk` of the result verifies them with the rest."""
    mv = memoryview(record).cast("B")
    if bytes(mv[:8]) != _DIRECT_MAGIC:
        return mv, []
    sp = split_record(mv)
    hsize = len(sp.head)
    view = memoryview(np.empty(hsize + sp.blocks * BS, dtype=np.uint8))
    view[:hsize] = sp.head
    pos, src = hsize, 0
    for s, n, direct in sp.pieces:
        if direct:
            view[pos: pos + n * BS] = read(s, n)
        else:
            view[pos: pos + n * BS] = sp.data[src: src + n * BS]
            src += n * BS
        pos += n * BS
    return view, sp.runs


def peek_extents(buf, offset: int = 0) -> list[tuple[int, int]]:
    """The extents of the chunk at `offset`, from its header alone (not verified: only for
    planning; decode_chunk verifies before anything is applied). A direct record's are its
    chunk's."""
    offset = _chunk_offset(buf, offset)
    chunk_size(buf, offset)
    next_ = _CHUNK_HDR.unpack_from(buf, offset)[4]
    base = offset + _CHUNK_HDR.size
    if len(buf) < base + 8 * next_:  # a chunk cut inside its extent list (found by t0_fuzz)
        raise ChunkError("truncated chunk extent list")
    return [struct.unpack_from("<II", buf, base + 8 * i) for i in range(next_)]


def decode_chunk(buf) -> Chunk:
    """Decode and verify one chunk (the whole buffer); raises ChunkError."""
    size = chunk_size(buf)
    if len(buf) != size:
        raise ChunkError(f"chunk is {len(buf)} bytes, its header says {size}")
    magic, gen, ds, num, next_, blocks, csum = _CHUNK_HDR.unpack_from(buf, 0)
    mv = memoryview(buf)
    if _sealed_checksum(mv[:_CHUNK_HDR.size], mv[_CHUNK_HDR.size:]) != csum:
        raise ChunkError(f"delta set {ds} chunk {num}: checksum mismatch")
    off = _CHUNK_HDR.size
    extents = [struct.unpack_from("<II", buf, off + 8 * i) for i in range(next_)]
    if sum(n for _, n in extents) != blocks:
        raise ChunkError(f"delta set {ds} chunk {num}: extents do not add up")
    # the data is a view of `buf` (not a copy: the receiver stores and plays it as it is)
    return Chunk(gen, ds, num, extents, mv[off + 8 * next_:], csum)


@dataclass
class SetHeader:
    generation: int
    delta_set: int
    chunks: int
    blocks: int
    data_checksum: int


def data_checksum(chunk_checksums) -> int:
    h = xxhash.xxh3_64()
    for c in chunk_checksums:
        h.update(struct.pack("<Q", c))
    return h.intdigest()


def encode_set_header(hdr: SetHeader) -> bytes:
    body = _SET_HDR.pack(_SET_MAGIC, hdr.generation, hdr.delta_set, hdr.chunks, hdr.blocks,
                         hdr.data_checksum, 0)
    csum = xxhash.xxh3_64_intdigest(body)
    return body[:-8] + struct.pack("<Q", csum)


def decode_set_header(buf) -> SetHeader:
    if len(buf) != _SET_HDR.size:
        raise ChunkError("delta-set header has the wrong size")
    magic, gen, ds, chunks, blocks, dsum, csum = _SET_HDR.unpack(buf)
    if magic != _SET_MAGIC:
        raise ChunkError("not a delta-set header (bad magic)")
    if xxhash.xxh3_64_intdigest(bytes(buf[:-8]) + bytes(8)) != csum:
        raise ChunkError(f"delta set {ds}: header checksum mismatch")
    return SetHeader(gen, ds, chunks, blocks, dsum)


def is_set_header(buf, offset: int = 0) -> bool:
    return bytes(buf[offset: offset + 8]) == _SET_MAGIC


# ----------------------------------------------------------------------------- initial copy
#
# Copy record (one request of the initial copy, FIG. 11)::
#
#     magic "RDCOPY01", generation u64, start block u64, block count u32, checksum u64
#     data  block count x 4 KiB
#
# The checksum is xxh3-64 over the header (checksum field zero) and the data. A record holds
# at most MAX_CHUNK_BLOCKS blocks, so the receiver stores each as one delta chunk.

_COPY_MAGIC = b"RDCOPY01"
_COPY_HDR = struct.Struct("<8sQQIQ")
COPY_HEADER_SIZE = _COPY_HDR.size


@dataclass
class CopyRecord:
    generation: int
    start: int
    count: int
    data: bytes  # (decode_copy: a memoryview of the buffer it decoded)


def encode_copy(generation: int, start: int, data) -> bytes:
    if len(data) % BS:
        raise ChunkError("copy data is not whole blocks")
    count = len(data) // BS
    if count > MAX_CHUNK_BLOCKS:
        raise ChunkError("copy record too large")
    head = bytearray(_COPY_HDR.pack(_COPY_MAGIC, generation, start, count, 0))
    struct.pack_into("<Q", head, _COPY_HDR.size - 8, _sealed_checksum(head, data))
    return bytes(head) + bytes(data)


def decode_copy(buf) -> CopyRecord:
    """Decode and verify one copy record (the whole buffer); raises ChunkError."""
    if len(buf) < _COPY_HDR.size:
        raise ChunkError("truncated copy record")
    magic, gen, start, count, csum = _COPY_HDR.unpack_from(buf, 0)
    if magic != _COPY_MAGIC:
        raise ChunkError("not a copy record (bad magic)")
    if count > MAX_CHUNK_BLOCKS:
        raise ChunkError("copy record header out of range")
    if len(buf) != _COPY_HDR.size + count * BS:
        raise ChunkError(f"copy record is {len(buf)} bytes, its header says "
                         f"{_COPY_HDR.size + count * BS}")
    mv = memoryview(buf)
    if _sealed_checksum(mv[:_COPY_HDR.size], mv[_COPY_HDR.size:]) != csum:
        raise ChunkError(f"copy record at block {start}: checksum mismatch")
    return CopyRecord(gen, start, count, mv[_COPY_HDR.size:])  # (a view of `buf`)
