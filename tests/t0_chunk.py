"""Tier 0: the replication chunk format (repfs/repl/chunk.py) and the change log's paged bit
maps (repfs/repl/changelog.PagedBits), as pure units.

The chunk format is the last line of defence of invariant 4 ("a receiver applies nothing it
cannot verify"): every single-bit corruption, every truncation and every trailing byte of an
encoded chunk or delta-set header must be refused with ChunkError (never another exception,
never a successful decode)."""

from __future__ import annotations

import random
import struct

import lmdb
import numpy as np
import pytest

from repfs.repl import keys as K
from repfs.repl.changelog import PagedBits
from repfs.repl.chunk import (
    BS, MAX_CHUNK_BLOCKS, MAX_EXTENTS, SET_HEADER_SIZE, Chunk, ChunkError, SetHeader,
    chunk_size, data_checksum, decode_chunk, decode_set_header, encode_chunk,
    encode_set_header, encoded_checksum, is_set_header,
)

CHUNK_HDR_SIZE = 44  # "<8sQQIIIQ"


def blocks_data(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n * BS)


def make_chunk(rng, extents, gen=3, ds=17, num=5):
    data = blocks_data(rng, sum(n for _, n in extents))
    return encode_chunk(gen, ds, num, extents, data), data


# ----------------------------------------------------------------------------- chunks


@pytest.mark.parametrize("extents", [
    [],
    [(0, 1)],
    [(7, 3)],
    [(100, 2), (5, 1), (2 ** 32 - 2, 1)],
    [(i * 10, 1) for i in range(40)],
    [(1000, MAX_CHUNK_BLOCKS)],
    [(i * 2, 1) for i in range(MAX_CHUNK_BLOCKS)],
])
def test_chunk_roundtrip(extents):
    rng = random.Random(len(extents))
    raw, data = make_chunk(rng, extents, gen=2 ** 63 + 1, ds=2 ** 40 + 3, num=2 ** 31 + 7)
    blocks = sum(n for _, n in extents)
    assert len(raw) == CHUNK_HDR_SIZE + 8 * len(extents) + blocks * BS
    assert chunk_size(raw) == len(raw)
    c = decode_chunk(raw)
    assert isinstance(c, Chunk)
    assert (c.generation, c.delta_set, c.number) == (2 ** 63 + 1, 2 ** 40 + 3, 2 ** 31 + 7)
    assert [tuple(e) for e in c.extents] == [tuple(e) for e in extents]
    assert c.data == data
    assert c.blocks == blocks
    assert c.checksum == encoded_checksum(raw)
    # encoding is deterministic and accepts any bytes-like data
    assert encode_chunk(2 ** 63 + 1, 2 ** 40 + 3, 2 ** 31 + 7, extents, bytearray(data)) == raw
    assert encode_chunk(2 ** 63 + 1, 2 ** 40 + 3, 2 ** 31 + 7, extents, memoryview(data)) == raw
    # decode accepts bytearray and memoryview too
    assert decode_chunk(bytearray(raw)).data == data
    assert decode_chunk(memoryview(raw)).data == data


def test_chunk_checksums_differ_with_identity_fields():
    """The checksum covers generation, delta set and chunk number: the same data under another
    identity is another checksum (a chunk cannot be replayed into another place)."""
    rng = random.Random(1)
    data = blocks_data(rng, 2)
    ext = [(10, 2)]
    sums = {encoded_checksum(encode_chunk(g, d, n, ext, data))
            for g, d, n in [(1, 1, 0), (2, 1, 0), (1, 2, 0), (1, 1, 1)]}
    assert len(sums) == 4
    # the same blocks at another place are another checksum
    assert encoded_checksum(encode_chunk(1, 1, 0, [(11, 2)], data)) not in sums


def test_chunks_concatenated_are_walked_by_size():
    rng = random.Random(2)
    parts = [make_chunk(rng, [(i * 100, i + 1), (i * 100 + 50, 2)], num=i)[0] for i in range(5)]
    hdr = encode_set_header(SetHeader(3, 17, 5, sum(i + 3 for i in range(5)),
                                      data_checksum([encoded_checksum(p) for p in parts])))
    buf = b"".join(parts) + hdr
    off, seen = 0, []
    while not is_set_header(buf, off):
        size = chunk_size(buf, off)
        seen.append(decode_chunk(buf[off: off + size]).number)
        off += size
    assert seen == [0, 1, 2, 3, 4]
    h = decode_set_header(buf[off:])
    assert h.chunks == 5 and h.blocks == sum(i + 3 for i in range(5))
    assert h.data_checksum == data_checksum([decode_chunk(p).checksum for p in parts])


@pytest.mark.parametrize("extents", [[(3, 1)], [(9, 1), (2, 1)]])
def test_every_flipped_bit_in_a_chunk_is_rejected(extents):
    rng = random.Random(3)
    raw, data = make_chunk(rng, extents)
    buf = bytearray(raw)
    for i in range(len(buf)):
        for bit in range(8):
            buf[i] ^= 1 << bit
            try:
                decode_chunk(bytes(buf))
            except ChunkError:
                pass
            else:
                pytest.fail(f"a chunk with bit {bit} of byte {i} flipped was accepted")
            finally:
                buf[i] ^= 1 << bit
    assert decode_chunk(bytes(buf)).data == data  # restored: accepted again


def test_every_flipped_bit_in_a_large_chunk_sampled():
    """Bits flipped all over a full chunk (every header/extent bit, a sample of the data)."""
    rng = random.Random(4)
    ext = [(i * 3, 2) for i in range(MAX_CHUNK_BLOCKS // 2)]
    raw, _ = make_chunk(rng, ext)
    buf = bytearray(raw)
    meta_end = CHUNK_HDR_SIZE + 8 * len(ext)
    positions = [(i, b) for i in range(CHUNK_HDR_SIZE) for b in range(8)]
    positions += [(rng.randrange(CHUNK_HDR_SIZE, meta_end), rng.randrange(8))
                  for _ in range(800)]
    positions += [(rng.randrange(meta_end, len(buf)), rng.randrange(8)) for _ in range(600)]
    for i, bit in positions:
        buf[i] ^= 1 << bit
        with pytest.raises(ChunkError):
            decode_chunk(bytes(buf))
        buf[i] ^= 1 << bit


def test_random_multi_byte_corruption_rejected():
    rng = random.Random(5)
    raw, _ = make_chunk(rng, [(0, 4), (40, 3)])
    for _ in range(2000):
        buf = bytearray(raw)
        for _ in range(rng.randrange(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        if bytes(buf) == raw:
            continue
        with pytest.raises(ChunkError):
            decode_chunk(bytes(buf))


def test_truncated_chunk_rejected():
    rng = random.Random(6)
    raw, _ = make_chunk(rng, [(5, 2), (1, 1)])
    for n in list(range(0, CHUNK_HDR_SIZE + 30)) + list(range(len(raw) - 4200, len(raw))):
        with pytest.raises(ChunkError):
            decode_chunk(raw[:n])
    # chunk_size on a truncated header
    for n in range(CHUNK_HDR_SIZE):
        with pytest.raises(ChunkError):
            chunk_size(raw[:n])
    # chunk_size at an offset near the end
    with pytest.raises(ChunkError):
        chunk_size(raw + raw[:10], len(raw))


def test_oversized_chunk_rejected():
    rng = random.Random(7)
    raw, _ = make_chunk(rng, [(5, 2)])
    for extra in (b"\0", b"x" * 7, bytes(BS), raw):
        with pytest.raises(ChunkError):
            decode_chunk(raw + extra)


def test_chunk_header_out_of_range_rejected_from_header_alone():
    rng = random.Random(8)
    raw, _ = make_chunk(rng, [(5, 1)])
    magic, gen, ds, num, next_, blocks, csum = struct.unpack_from("<8sQQIIIQ", raw)
    for ne, nb in [(MAX_EXTENTS + 1, 1), (1, MAX_CHUNK_BLOCKS + 1), (2 ** 32 - 1, 2 ** 32 - 1)]:
        hdr = struct.pack("<8sQQIIIQ", magic, gen, ds, num, ne, nb, csum)
        with pytest.raises(ChunkError):
            chunk_size(hdr)
        with pytest.raises(ChunkError):
            decode_chunk(hdr + raw[CHUNK_HDR_SIZE:])
    with pytest.raises(ChunkError):
        chunk_size(b"RDCHUNK2" + raw[8:])
    with pytest.raises(ChunkError):
        decode_chunk(b"RDSETHD1" + raw[8:])


def test_extents_that_do_not_add_up_rejected_even_with_a_good_checksum():
    """A chunk whose checksum is right but whose extents disagree with its block count (a
    buggy or hostile sender) is refused."""
    import xxhash
    data = bytes(BS * 2)
    ext = struct.pack("<II", 0, 1) + struct.pack("<II", 5, 3)  # 4 blocks, header says 2
    head = bytearray(struct.pack("<8sQQIIIQ", b"RDCHUNK1", 1, 1, 0, 2, 2, 0))
    csum = xxhash.xxh3_64_intdigest(bytes(head) + ext + data)
    struct.pack_into("<Q", head, CHUNK_HDR_SIZE - 8, csum)
    with pytest.raises(ChunkError):
        decode_chunk(bytes(head) + ext + data)


def test_encode_rejects_bad_input():
    with pytest.raises(ChunkError):
        encode_chunk(1, 1, 0, [(0, 2)], bytes(BS))  # data shorter than the extents
    with pytest.raises(ChunkError):
        encode_chunk(1, 1, 0, [(0, 1)], bytes(BS + 1))
    with pytest.raises(ChunkError):
        encode_chunk(1, 1, 0, [(0, MAX_CHUNK_BLOCKS + 1)], bytes(BS * (MAX_CHUNK_BLOCKS + 1)))
    with pytest.raises(ChunkError):
        encode_chunk(1, 1, 0, [(i, 0) for i in range(MAX_EXTENTS + 1)], b"")
    # the limits themselves are fine
    encode_chunk(1, 1, 0, [(0, MAX_CHUNK_BLOCKS)], bytes(BS * MAX_CHUNK_BLOCKS))


def test_chunk_error_is_a_value_error():
    assert issubclass(ChunkError, ValueError)


# ----------------------------------------------------------------------------- set headers


def test_set_header_roundtrip():
    for hdr in [SetHeader(1, 1, 0, 0, data_checksum([])),
                SetHeader(2 ** 64 - 1, 2 ** 64 - 2, 2 ** 32 - 1, 2 ** 64 - 3, 2 ** 64 - 4),
                SetHeader(7, 12345, 3, 700, data_checksum([1, 2, 3]))]:
        raw = encode_set_header(hdr)
        assert len(raw) == SET_HEADER_SIZE
        assert is_set_header(raw)
        assert is_set_header(b"xx" + raw, 2)
        assert decode_set_header(raw) == hdr
        assert decode_set_header(bytearray(raw)) == hdr
        assert decode_set_header(memoryview(raw)) == hdr


def test_every_flipped_bit_in_a_set_header_is_rejected():
    raw = encode_set_header(SetHeader(4, 99, 12, 3000, data_checksum(range(12))))
    buf = bytearray(raw)
    for i in range(len(buf)):
        for bit in range(8):
            buf[i] ^= 1 << bit
            with pytest.raises(ChunkError):
                decode_set_header(bytes(buf))
            buf[i] ^= 1 << bit
    assert decode_set_header(bytes(buf)).delta_set == 99


def test_set_header_wrong_size_rejected():
    raw = encode_set_header(SetHeader(4, 99, 12, 3000, 5))
    for n in range(len(raw)):
        with pytest.raises(ChunkError):
            decode_set_header(raw[:n])
    with pytest.raises(ChunkError):
        decode_set_header(raw + b"\0")


def test_a_chunk_is_not_a_set_header_and_vice_versa():
    rng = random.Random(9)
    raw, _ = make_chunk(rng, [(1, 1)])
    assert not is_set_header(raw)
    with pytest.raises(ChunkError):
        decode_set_header(raw[:SET_HEADER_SIZE])
    hdr = encode_set_header(SetHeader(1, 2, 3, 4, 5))
    with pytest.raises(ChunkError):
        decode_chunk(hdr)
    with pytest.raises(ChunkError):
        chunk_size(hdr)


def test_data_checksum_depends_on_every_checksum_and_their_order():
    base = [11, 22, 33, 44]
    s = data_checksum(base)
    assert data_checksum(list(base)) == s
    assert data_checksum(base[::-1]) != s
    assert data_checksum(base[:-1]) != s
    assert data_checksum(base + [0]) != s
    assert data_checksum([11, 22, 34, 44]) != s
    assert data_checksum([]) != data_checksum([0])


# ----------------------------------------------------------------------------- PagedBits


def _model_check(pb: PagedBits, model: np.ndarray) -> None:
    n = len(model)
    assert np.array_equal(pb.get_range(0, n), model)
    assert pb.count() == int(model.sum())
    assert bool(pb) == bool(model.any())
    pages_with_bits = set(np.flatnonzero(model) // K.PAGE_BITS)
    # all-zero pages are not kept (clear_blocks drops them); set_range never creates empty ones
    assert set(pb.pages) == {int(p) for p in pages_with_bits}
    got = np.concatenate([pb.page_blocks(p) for p in sorted(pb.pages)] or
                         [np.zeros(0, dtype=np.int64)])
    assert np.array_equal(got, np.flatnonzero(model))


def test_paged_bits_against_a_model():
    rng = random.Random(10)
    n = K.PAGE_BITS * 3 + 123
    model = np.zeros(n, dtype=bool)
    pb = PagedBits()
    assert not pb and pb.count() == 0
    for step in range(150):
        op = rng.random()
        if op < 0.55:
            start = rng.randrange(n)
            count = min(n - start, rng.choice([0, 1, 2, 7, 100, K.PAGE_BITS - 1, K.PAGE_BITS,
                                               K.PAGE_BITS + 5, 3 * K.PAGE_BITS]))
            added = pb.set_range(start, count)
            assert added == count - int(model[start: start + count].sum())
            model[start: start + count] = True
        elif op < 0.9:
            setb = np.flatnonzero(model)
            if len(setb):
                pick = np.unique(np.array(rng.sample(setb.tolist(), min(len(setb),
                                                                          rng.randrange(1, 200)))))
                # also some unset ones (clearing them is harmless)
                extra = np.array([rng.randrange(n) for _ in range(5)])
                blocks = np.unique(np.concatenate((pick, extra))).astype(np.int64)
                pb.clear_blocks(blocks)
                model[blocks] = False
        else:
            s = rng.randrange(n)
            c = rng.randrange(0, n - s + 1)
            assert np.array_equal(pb.get_range(s, c), model[s: s + c])
        if step % 20 == 0:
            _model_check(pb, model)
    _model_check(pb, model)


def test_paged_bits_page_boundaries():
    pb = PagedBits()
    P = K.PAGE_BITS
    assert pb.set_range(P - 2, 4) == 4
    assert set(pb.pages) == {0, 1}
    assert pb.get_range(P - 3, 6).tolist() == [False, True, True, True, True, False]
    assert pb.set_range(P - 1, 1) == 0
    pb.clear_blocks(np.array([P - 2, P - 1], dtype=np.int64))
    assert set(pb.pages) == {1}
    assert pb.page_blocks(1).tolist() == [P, P + 1]
    assert pb.page_blocks(0).tolist() == []
    pb.clear_blocks(np.array([P, P + 1], dtype=np.int64))
    assert not pb and pb.count() == 0
    # a far page costs one page only
    pb.set_range(1000 * P + 5, 1)
    assert list(pb.pages) == [1000]
    assert pb.page_blocks(1000).tolist() == [1000 * P + 5]


def test_paged_bits_merge():
    rng = random.Random(11)
    n = K.PAGE_BITS * 3
    a, b = PagedBits(), PagedBits()
    ma, mb = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for pb, m in ((a, ma), (b, mb)):
        for _ in range(30):
            s = rng.randrange(n - 50)
            c = rng.randrange(1, 50)
            pb.set_range(s, c)
            m[s: s + c] = True
    a.merge(b)
    _model_check(a, ma | mb)
    _model_check(b, mb)  # merge does not alias or change the other map
    b.set_range(0, n)
    _model_check(a, ma | mb)


def test_paged_bits_persistence(tmp_path):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 30, max_dbs=4)
    db = env.open_db(b"bits")
    rng = random.Random(12)
    n = K.PAGE_BITS * 4
    model = np.zeros(n, dtype=bool)
    pb = PagedBits()

    def reload() -> PagedBits:
        out = PagedBits()
        with env.begin() as txn:
            out.load(txn, db)
        return out

    for round_ in range(8):
        for _ in range(10):
            s = rng.randrange(n - 3000)
            c = rng.randrange(1, 3000)
            pb.set_range(s, c)
            model[s: s + c] = True
        setb = np.flatnonzero(model)
        if len(setb) and round_ % 2:
            clear = np.unique(np.array(rng.sample(setb.tolist(), len(setb) // 2)))
            pb.clear_blocks(clear.astype(np.int64))
            model[clear] = False
        if round_ == 5:  # clear a whole page: its key must go from the database
            pb.clear_blocks(pb.page_blocks(min(pb.pages)))
            model[:] = pb.get_range(0, n)
        with env.begin(write=True) as txn:
            pb.save_dirty(txn, db)
        assert not pb.dirty
        _model_check(reload(), model)
        with env.begin() as txn:
            keys = {K.from_u32(k) for k in txn.cursor(db=db).iternext(values=False)}
        assert keys == set(pb.pages)
    # save_all replaces whatever the database held
    other = PagedBits()
    other.set_range(7, 3)
    with env.begin(write=True) as txn:
        other.save_all(txn, db)
    m2 = np.zeros(n, dtype=bool)
    m2[7:10] = True
    _model_check(reload(), m2)
    env.close()
