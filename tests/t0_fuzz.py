"""Fuzzing: every decoder of bytes from disk or from a peer, fed arbitrary and mutated bytes.

Each property feeds a decoder random bytes and damaged valid encodings (built by the real
encoder, then bit-flipped, truncated, extended, or with fields set to boundary values; for
checksummed formats also *resealed*: fields changed and the checksum recomputed, so the input
gets past the checksum to the code behind it). The decoder must return a value that satisfies
the format's invariants or raise its module's documented error; any other exception (struct,
index, value, key, overflow, memory errors) fails the property, and so does a hang (the pytest
timeout) or a write to anything that was not accepted. docs/reliability.md lists the decoders.

Examples per property: tests/fuzzing.py (REPFS_FUZZ_EXAMPLES raises it).
"""

from __future__ import annotations

import json
import struct

import lmdb
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repfs.fs import format as F
from repfs.fs.core import FileSystem
from repfs.fs.format import BLOCK_SIZE, FormatError
from repfs.fs.journal import Journal
from repfs.repl import chunk as C
from repfs.repl import keys as RK
from repfs.repl.chunk import ChunkError
from repfs.repl.receiver import CorruptDeltaSet, Receiver, ReceiveError
from repfs.snap import keys as SK
from repfs.snap import store as S
from tests.fuzzing import damaged, examples, mutated, struct_fields

BS = BLOCK_SIZE
# a failing example of a large input must report its error, not hypothesis's warning about it
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
FUZZ = settings(max_examples=examples(200),
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
FUZZ_IO = settings(FUZZ, max_examples=examples(100))  # properties that write files or LMDB


def reseal(buf: bytes | bytearray, body_end: int, csum_off: int) -> bytes:
    """Recompute an xxh3-64 checksum over buf[:body_end] into buf[csum_off:+8]."""
    out = bytearray(buf)
    if len(out) >= csum_off + 8:
        struct.pack_into("<Q", out, csum_off, xxhash.xxh3_64_intdigest(bytes(out[:body_end])))
    return bytes(out)


# ================================================================== superblock

SB_FMT = F._SB.format
VALID_SB = F.Superblock.layout(4096, 1024, label="fuzz").pack()


def assert_sane(sb: F.Superblock) -> None:
    """What the core relies on once a superblock decoded: regions in order inside the volume,
    bitmaps that cover every block and inode, counts that cannot exceed their totals."""
    assert F.MIN_VOLUME_BLOCKS <= sb.nblocks <= F.MAX_VOLUME_BLOCKS
    assert 2 <= sb.ninodes <= 2**32
    assert 1 <= sb.bbitmap_start
    assert sb.bbitmap_start + sb.bbitmap_blocks <= sb.ibitmap_start
    assert sb.ibitmap_start + sb.ibitmap_blocks <= sb.itable_start
    assert sb.itable_start + sb.itable_blocks == sb.data_start < sb.nblocks
    assert sb.bbitmap_blocks * BS * 8 >= sb.nblocks
    assert sb.ibitmap_blocks * BS * 8 >= sb.ninodes
    assert sb.itable_blocks * F.INODES_PER_BLOCK >= sb.ninodes
    assert sb.free_blocks <= sb.nblocks - sb.data_start
    assert sb.free_inodes <= sb.ninodes - 1
    assert sb.orphan_head < sb.ninodes


def decode_superblock(raw: bytes) -> None:
    try:
        sb = F.Superblock.unpack(raw)
    except FormatError:
        return
    assert_sane(sb)


@FUZZ
@given(damaged(VALID_SB, struct_fields(SB_FMT)))
def test_superblock_damaged(raw):
    decode_superblock(raw)


@FUZZ
@given(mutated(VALID_SB, struct_fields(SB_FMT)))
def test_superblock_resealed(raw):
    """Fields changed behind a recomputed checksum: the geometry checks must catch them."""
    decode_superblock(reseal(raw, F._SB.size, F._SB.size))


# ================================================================== inodes

def test_every_inode_image_decodes():
    """An inode is a fixed record: every 256-byte image decodes (its fields are checked where
    they are used, t1_fuzz_core)."""
    @FUZZ
    @given(st.binary(min_size=F.INODE_SIZE, max_size=F.INODE_SIZE))
    def prop(raw):
        ino = F.Inode.unpack_from(5, raw, 0)
        buf = bytearray(F.INODE_SIZE)
        ino.pack_into(buf, 0)
        assert F.Inode.unpack_from(5, buf, 0).map == ino.map
    prop()


# ================================================================== directory blocks

def block(raw: bytes) -> bytes:
    """A damaged input as the metadata cache hands it over: exactly one block."""
    return raw[:BS].ljust(BS, b"\0")


def _valid_dir_header() -> bytes:
    buf = bytearray(BS)
    F.DirHeader(depth=2, count=3, bytes=90, nblocks=6, free_head=5).pack_into(buf)
    return bytes(buf)


def _valid_bucket(names=(b"a", b"bb", b"a-much-longer-name")) -> bytes:
    buf = bytearray(BS)
    off = F.BUCKET_HDR_SIZE
    for i, n in enumerate(names):
        off = F.pack_dirent(buf, off, F.name_hash(n), 10 + i, 8, n)
    F.set_bucket_header(buf, len(names), off - F.BUCKET_HDR_SIZE, 0)
    return bytes(buf)


@FUZZ
@given(damaged(_valid_dir_header(), struct_fields(F._DIR_HDR.format)))
def test_directory_header(raw):
    try:
        hdr = F.DirHeader.unpack_from(block(raw))
    except FormatError:
        return
    assert 0 <= hdr.depth <= 24
    assert hdr.nblocks >= 1 + (1 << hdr.depth)
    assert hdr.free_head == 0 or (1 << hdr.depth) < hdr.free_head < hdr.nblocks


@FUZZ
@given(damaged(_valid_bucket(), struct_fields(F._BUCKET_HDR.format)
               + struct_fields(F._DIRENT.format, F.BUCKET_HDR_SIZE)))
def test_directory_bucket(raw):
    try:
        entries = list(F.iter_bucket(block(raw)))
    except FormatError:
        return
    used = F.BUCKET_HDR_SIZE
    for off, _h, _ino, _typ, name in entries:
        assert off == used and 1 <= len(name) <= F.MAX_NAME
        used += F.dirent_size(name)
    assert used <= BS


# ================================================================== xattr blocks

# the version-1 single-block layout (still read; format version 2 stores a stream)
VALID_V1_XATTRS = bytes(F.pack_xattrs({b"user.a": b"1", b"user.long": b"x" * 300,
                                          b"trusted.t": b""}))
VALID_STREAM = F.pack_xattr_stream({b"user.a": b"1", b"user.long": b"x" * 300,
                                    b"security.s": b"\0" * 9})
VALID_XROOT = bytes(F.XattrRoot(3, len(VALID_STREAM), 30).pack(VALID_STREAM))


@FUZZ
@given(damaged(VALID_V1_XATTRS, struct_fields(F._XHDR.format)
               + struct_fields(F._XENT.format, F._XHDR.size)))
def test_xattr_block_version_1(raw):
    try:
        attrs = F.unpack_xattrs(block(raw))
    except FormatError:
        return
    assert sum(3 + len(k) + len(v) for k, v in attrs.items()) <= BS


@FUZZ
@given(damaged(VALID_XROOT, struct_fields(F._XROOT.format)))
def test_xattr_root_block(raw):
    try:
        root = F.XattrRoot.unpack(block(raw))
    except FormatError:
        return
    assert len(root.map) == 15 and root.file_blocks >= 0


@FUZZ
@given(damaged(VALID_STREAM, struct_fields("<BI") + struct_fields("<BI", 5 + 6 + 1)),
       st.sampled_from([0, 1, 2, 3, 4, 2**32 - 1]))
def test_xattr_stream(raw, count):
    try:
        attrs = F.unpack_xattr_stream(raw, count)
    except FormatError:
        return
    assert len(attrs) == count and all(k for k in attrs)
    assert F.pack_xattr_stream(attrs) == raw


# ================================================================== the redo log

def _journal_record(tmp_path) -> bytes:
    j = Journal(tmp_path / "valid")
    j.write(7, {3: b"\1" * BS, 9: b"\2" * BS, 10: b"\3" * BS})  # inside a 16-block volume
    j.close()
    return (tmp_path / "valid").read_bytes()


@pytest.fixture(scope="module")
def journal_record(tmp_path_factory):
    return _journal_record(tmp_path_factory.mktemp("jnl"))


def _read_journal(path, raw: bytes):
    path.write_bytes(raw)
    j = Journal(path, readonly=True)
    try:
        rec = j.read()
    finally:
        j.close()
    assert path.read_bytes() == raw  # reading never writes
    if rec is None:
        return
    seq, blocks = rec
    assert all(0 <= b < 2**32 and len(d) == BS for b, d in blocks.items())
    # replaying it at mount: into the volume whole, or refused before any write
    dev = JournalDev()
    j = Journal(path)
    try:
        FileSystem.replay_journal(dev, j)
    except FormatError:
        assert dev.writes == [] and max(blocks) >= dev.nblocks
        assert path.read_bytes() == raw  # kept for a person to look at
    else:
        assert sorted(dev.writes) == sorted(blocks)
    finally:
        j.close()


class JournalDev:
    nblocks = 16

    def __init__(self):
        self.writes = []

    def write(self, start, data, meta=False):
        assert 0 <= start < self.nblocks and len(data) == BS
        self.writes.append(start)

    def flush(self):
        pass


def test_journal_damaged(tmp_path, journal_record):
    path = tmp_path / "journal"

    @FUZZ_IO
    @given(damaged(journal_record, struct_fields("<8sQIIII")))
    def prop(raw):
        _read_journal(path, raw)
    prop()


def test_journal_resealed(tmp_path, journal_record):
    """Header fields changed and the trailer's checksum recomputed."""
    path = tmp_path / "journal"
    body = len(journal_record) - 16

    @FUZZ_IO
    @given(mutated(journal_record[:body], struct_fields("<8sQIIII"), max_extend=8))
    def prop(raw):
        trailer = struct.pack("<Q8s", xxhash.xxh3_64_intdigest(raw), b"REPFSJNL")
        _read_journal(path, raw + trailer)
    prop()


# ================================================================== delta chunks and headers

extents_st = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 4)),
                      min_size=0, max_size=6)


def _chunk(extents) -> bytes:
    blocks = sum(n for _, n in extents)
    data = bytes(range(256)) * (blocks * BS // 256)
    return C.encode_chunk(3, 11, 2, extents, data)


CHUNK_FIELDS = struct_fields(C._CHUNK_HDR.format) + struct_fields("<IIIIIIII", C._CHUNK_HDR.size)


def check_chunk_decoders(raw: bytes) -> None:
    """chunk_size, peek_extents and decode_chunk: a result or ChunkError, never another error."""
    try:
        size = C.chunk_size(raw)
        assert size >= C._CHUNK_HDR.size
    except ChunkError:
        pass
    try:
        ext = C.peek_extents(raw)
        assert all(0 <= s < 2**32 and 0 <= n < 2**32 for s, n in ext)
    except ChunkError:
        pass
    try:
        c = C.decode_chunk(raw)
    except ChunkError:
        return
    assert len(c.data) == c.blocks * BS == sum(n for _, n in c.extents) * BS
    assert c.blocks <= C.MAX_CHUNK_BLOCKS


@FUZZ
@given(extents_st.flatmap(lambda e: damaged(_chunk(e), CHUNK_FIELDS)))
def test_chunk_damaged(raw):
    check_chunk_decoders(raw)


@FUZZ
@given(extents_st.flatmap(lambda e: mutated(_chunk(e), CHUNK_FIELDS)))
def test_chunk_resealed(raw):
    """Header and extent fields changed behind a recomputed checksum."""
    buf = bytearray(raw)
    hs = C._CHUNK_HDR.size
    if len(buf) >= hs:
        buf[hs - 8: hs] = bytes(8)
        csum = xxhash.xxh3_64_intdigest(bytes(buf))
        struct.pack_into("<Q", buf, hs - 8, csum)
    check_chunk_decoders(bytes(buf))


def _direct(extents) -> bytes:
    """A direct record of `_chunk(extents)` whose every other block went into the volume."""
    runs = [(b, 1) for s, n in extents for b in range(s, s + n) if b % 2 == 0 and b < 2**32]
    return b"".join(bytes(p) for p in C.encode_direct(_chunk(extents), runs))


DIRECT_FIELDS = struct_fields(C._DIRECT_HDR.format) + struct_fields("<IIIIIIII",
                                                                     C._DIRECT_HDR.size)


@FUZZ
@given(extents_st.flatmap(lambda e: damaged(_direct(e), DIRECT_FIELDS)))
def test_direct_record_damaged(raw):
    """A stored direct record (the secondary's record of a chunk whose free blocks went into
    its volume): record_size, peek_extents, split_record and join_direct give a result or
    ChunkError, never another error; the volume is read only inside the record's runs."""
    for fn in (C.record_size, C.peek_extents, C.split_record):
        try:
            fn(raw)
        except ChunkError:
            pass
    reads = []

    def read(s, n):
        reads.append((s, n))
        return bytes(n * BS)
    try:
        whole, runs = C.join_direct(raw, read)
    except ChunkError:
        return
    assert reads == runs or not runs and not reads
    check_chunk_decoders(bytes(whole))


VALID_SET = C.encode_set_header(C.SetHeader(3, 11, 4, 700, 0x1234))


@FUZZ
@given(damaged(VALID_SET, struct_fields(C._SET_HDR.format)))
def test_set_header(raw):
    try:
        C.decode_set_header(raw)
    except ChunkError:
        pass
    assert C.is_set_header(raw) in (True, False)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=6)



# ================================================================== the receiver (peer bodies)

NBLOCKS = 1 << 16
PRIMARY = {"uuid": "ab" * 16, "site": "/nonexistent/primary"}
COPY_FIELDS = struct_fields(C._COPY_HDR.format)


@pytest.fixture
def receiver(tmp_path):
    env = lmdb.open(str(tmp_path / "meta.lmdb"), map_size=1 << 26, max_dbs=32, sync=False)
    r = Receiver(env, tmp_path, NBLOCKS)
    r.attach(PRIMARY, 3)
    yield r
    env.close()


def replicating(r: Receiver) -> Receiver:
    r.attach(PRIMARY, 3)
    r.start_playback(10, 3, 0)
    with r.env.begin(write=True) as txn:
        txn.drop(r.db_in, delete=False)
        txn.put(b"last_played", RK.u64(10), db=r.db_ctx)
    return r


def _files(d) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _state(r: Receiver):
    return _files(r.dir), r.info()


def test_copy_records(receiver):
    """Initial-copy records from a peer: decode_copy gives a record or ChunkError; the
    receiver stages a valid one or refuses it with ReceiveError, changing nothing."""
    valid = C.encode_copy(3, 12, b"\3" * (3 * BS))

    @FUZZ
    @given(damaged(valid, COPY_FIELDS) | mutated(valid, COPY_FIELDS).map(
        lambda raw: reseal(raw[:C._COPY_HDR.size - 8] + bytes(8) + raw[C._COPY_HDR.size:],
                           len(raw), C._COPY_HDR.size - 8) if len(raw) >= C._COPY_HDR.size
        else raw))
    def prop(body):
        try:
            rec = C.decode_copy(body)
            assert len(rec.data) == rec.count * BS and rec.count <= C.MAX_CHUNK_BLOCKS
        except ChunkError:
            pass
        receiver.attach(PRIMARY, 3)
        before = _state(receiver)
        try:
            receiver.receive_copy(body)
        except ReceiveError:
            assert _state(receiver) == before
            return
        assert 0 <= rec.start and rec.start + rec.count <= NBLOCKS
    prop()


def test_receiver_chunk_bodies(receiver):
    """A chunk body from a peer is accepted (valid, next in order) or refused with
    ReceiveError; a refused one changes no file and no state."""
    replicating(receiver)
    good = C.encode_chunk(3, 11, 0, [(5, 1)], b"\7" * BS)

    @FUZZ
    @given(st.one_of(extents_st.flatmap(lambda e: damaged(
        C.encode_chunk(3, 11, 0, e, b"\5" * (sum(n for _, n in e) * BS)), CHUNK_FIELDS)),
        damaged(good, CHUNK_FIELDS)))
    def prop(body):
        receiver.partial = None
        (receiver.dir / "11.ds").unlink(missing_ok=True)
        before = _state(receiver)
        try:
            receiver.receive_chunk(body)
        except ReceiveError:
            assert _state(receiver) == before
            return
        c = C.decode_chunk(body)  # accepted: a well-formed chunk of this generation
        assert c.generation == 3 and c.delta_set == 11
        assert all(n > 0 and s + n <= NBLOCKS for s, n in c.extents)
    prop()


def test_receiver_set_headers(receiver):
    replicating(receiver)

    @FUZZ
    @given(damaged(C.encode_set_header(C.SetHeader(3, 11, 0, 0, C.data_checksum([]))),
                   struct_fields(C._SET_HDR.format)),
           st.dictionaries(st.sampled_from(["cut_ns", "first_change_ns"]), json_values))
    def prop(body, meta):
        try:
            receiver.commit(body, meta)
        except ReceiveError:
            assert receiver.last_received == 10
            return
        if receiver.last_received == 11:
            with receiver.env.begin(write=True) as txn:
                txn.put(b"last_received", RK.u64(10), db=receiver.db_ctx)
                txn.drop(receiver.db_in, delete=False)
    prop()


class RecordingDev:
    nblocks = NBLOCKS

    def __init__(self):
        self.writes = []

    def write(self, start, data, meta=False):
        self.writes.append((start, len(data)))

    def flush(self):
        pass


def test_receiver_stored_delta_sets(receiver):
    """A stored delta-set file damaged on disk: the partial-set recovery at start-up keeps the
    whole chunks before the damage; planning (extents) returns a list or None; playback plays
    all of it or refuses with CorruptDeltaSet having written nothing."""
    replicating(receiver)
    chunks = [C.encode_chunk(3, 11, i, [(20 + 3 * i, 2)], bytes([i]) * (2 * BS))
              for i in range(3)]
    valid = b"".join(chunks)
    path = receiver.dir / "11.ds"
    rec = {"number": 11, "chunks": 3, "blocks": 6, "generation": 3,
           "data_checksum": C.data_checksum([C.encoded_checksum(c) for c in chunks])}

    @FUZZ_IO
    @given(damaged(valid, CHUNK_FIELDS))
    def prop(raw):
        path.write_bytes(raw)
        r = Receiver(receiver.env, receiver.dir.parent.parent, NBLOCKS)  # rebuilds the partial
        assert r.partial is not None and r.partial["off"] <= len(raw)
        assert path.read_bytes() == raw[: r.partial["off"]]
        path.write_bytes(raw)
        ext = receiver.extents(dict(rec))
        assert ext is None or all(isinstance(e, tuple) for e in ext)
        dev = RecordingDev()
        try:
            receiver.play(dict(rec), dev)
        except CorruptDeltaSet:
            assert dev.writes == []
        else:
            assert sorted(dev.writes) == [(20, 2 * BS), (23, 2 * BS), (26, 2 * BS)]
            replicating(receiver)
    prop()


@st.composite
def damaged_json(draw, valid: dict):
    """A JSON record damaged as bytes, with a field dropped, or a field of another type."""
    raw = json.dumps(valid).encode()
    kind = draw(st.sampled_from(("bytes", "drop", "retype")))
    if kind == "bytes":
        return draw(damaged(raw))
    rec = dict(valid)
    key = draw(st.sampled_from(sorted(rec)))
    if kind == "drop":
        del rec[key]
    else:
        rec[key] = draw(json_values | st.sampled_from(["../../x", "11.ds", -1, 2**64]))
    return json.dumps(rec).encode()


def test_receiver_incoming_records(receiver):
    """A damaged record of a received delta set in LMDB: listing and choosing what to play
    never fail; playback refuses it (CorruptDeltaSet, to be quarantined) having written
    nothing, or plays the delta set it names; no file outside the incoming area is touched."""
    replicating(receiver)
    chunks = [C.encode_chunk(3, 11, 0, [(20, 2)], b"\1" * (2 * BS))]
    valid = {"number": 11, "chunks": 1, "blocks": 2, "bytes": len(chunks[0]), "generation": 3,
             "data_checksum": C.data_checksum([C.encoded_checksum(chunks[0])]),
             "received_ns": 5, "cut_ns": 0, "first_change_ns": 0}
    outside = receiver.dir.parent.parent / "x"

    @FUZZ_IO
    @given(damaged_json(valid))
    def prop(raw):
        replicating(receiver)
        outside.write_bytes(b"keep")
        (receiver.dir / "11.ds").write_bytes(chunks[0])
        with receiver.env.begin(write=True) as txn:
            txn.put(RK.u64(11), raw, db=receiver.db_in)
        assert isinstance(receiver.incoming(), list)
        rec = receiver.next_to_play()
        assert rec is not None and rec["number"] == 11
        receiver.extents(rec)
        dev = RecordingDev()
        try:
            receiver.play(rec, dev)
        except CorruptDeltaSet:
            assert dev.writes == []
        else:
            assert dev.writes in ([], [(20, 2 * BS)])
        assert outside.read_bytes() == b"keep"
    prop()


def test_receiver_copy_progress(receiver):
    """A damaged saved position of an initial copy: the receiver rescans the staged copy."""
    staged = C.encode_chunk(3, 0, 0, [(0, 1)], b"\2" * BS)

    @FUZZ_IO
    @given(damaged_json({"off": len(staged), "next": 1, "chunks": 1, "blocks": 1}))
    def prop(raw):
        receiver.attach(PRIMARY, 3)
        (receiver.dir / "copy.ds").write_bytes(staged)
        with receiver.env.begin(write=True) as txn:
            txn.put(b"copy_progress", raw, db=receiver.db_ctx)
        r = Receiver(receiver.env, receiver.dir.parent.parent, NBLOCKS)
        assert r.copy is not None and r.copy["off"] <= len(staged)
    prop()


def test_receiver_answers_to_the_sender(receiver):
    """The secondary's answers are bytes from a peer too: the send task takes a status or an
    acknowledgement that has what it uses, with the types it uses, or refuses the answer
    with PermanentError; never a TypeError or KeyError later in the task."""
    from repfs.repl.transport import PermanentError, ReceiverClient, checked_info

    replicating(receiver)
    receiver.partial = {"n": 11, "checksums": [1, 2], "blocks": 3, "off": 0}
    valid = json.loads(json.dumps({**receiver.info(), "copy": {"next_block": 7, "blocks": 2}}))

    class Answer(ReceiverClient):  # the transport replaced by the damaged answer
        def __init__(self, doc):
            self.doc, self.site_path = doc, "peer"

        def request(self, method, path, body=None):
            return self.doc

    @FUZZ
    @given(damaged_json(valid), damaged_json({"acked": 11, "played": 10}))
    def prop(raw, raw_ack):
        try:
            doc = json.loads(raw)
        except ValueError:
            return  # ReceiverClient.request refuses non-JSON itself
        try:
            info = checked_info(doc, "peer")
        except PermanentError:
            pass
        else:  # what the send task does with it
            assert info["last_received"] + 1 > info["last_played"] - 2**64
            if info.get("partial"):
                assert info["partial"]["delta_set"] >= 0 <= info["partial"]["chunks"]
            if info.get("copy"):
                assert info["copy"]["next_block"] // RK.PAGE_BITS >= 0
            (info.get("primary") or {}).get("site")
        try:
            ack = Answer(json.loads(raw_ack)).commit(b"", {})
        except (PermanentError, ValueError):
            return
        assert ack["acked"] >= 0 and ack["played"] >= 0
    prop()


# ================================================================== LMDB values and keys

@FUZZ
@given(st.binary(max_size=16))
def test_lmdb_integer_keys_and_values(raw):
    for fn in (RK.from_u32, RK.from_u64, SK.unpack_id, SK.unpack_page_key):
        try:
            fn(raw)
        except SK.MetaError:
            pass


def test_receiver_context_values(receiver):
    """Damaged values of the replication context in LMDB: a MetaError naming the value."""
    replicating(receiver)
    names = ["generation", "last_received", "last_played", "role", "primary",
             "secondary_state"]

    @FUZZ_IO
    @given(st.sampled_from(names), st.binary(max_size=12))
    def prop(name, value):
        with receiver.env.begin(write=True) as txn:
            txn.put(name.encode(), value, db=receiver.db_ctx)
        try:
            receiver.info()
        except SK.MetaError:
            pass
        replicating(receiver)
    prop()


# ================================================================== save volumes and snapshots

def _save_volume(path, sid=1) -> bytes:
    sv = S.SaveVolume(path, sid)
    sv.append(np.array([5, 6, 9], dtype=np.uint32), b"\1" * (3 * BS))
    sv.append(np.array([2**32 - 1], dtype=np.uint32), b"\2" * BS)
    sv.close()
    return path.read_bytes()


REC_FIELDS = struct_fields("<8sQQI") + struct_fields("<IIII", S._REC.size)


def test_save_volume_scan(tmp_path):
    valid = _save_volume(tmp_path / "valid.save")
    path = tmp_path / "1.save"

    def scan(raw: bytes):
        path.write_bytes(raw)
        sv = S.SaveVolume(path, 1)
        try:
            for si, bis in sv.scan(0):
                assert 1 <= si and si + len(bis) <= sv.size
                assert len(bis) <= S.REC_MAX
            assert sv.valid_end <= sv.size
        finally:
            sv.close()
        assert path.read_bytes() == raw

    @FUZZ_IO
    @given(damaged(valid, REC_FIELDS))
    def damaged_prop(raw):
        scan(raw)

    @FUZZ_IO
    @given(mutated(valid[:BS], REC_FIELDS, max_extend=8))
    def resealed_prop(head):
        head = bytearray(head[:BS].ljust(BS, b"\0"))
        n = min(struct.unpack_from("<I", head, 24)[0], 8)
        body = b"\1" * (n * BS)
        h = xxhash.xxh3_64()
        h.update(bytes(head[: S._REC_CSUM_OFF]))
        h.update(body)
        struct.pack_into("<Q", head, S._REC_CSUM_OFF, h.intdigest())
        scan(bytes(head) + body)

    damaged_prop()
    resealed_prop()


def _snap_record() -> bytes:
    return S.Snapshot(1, "daily", 123, {"ds": 4}, "ok", 0, 0).record()


@st.composite
def snap_records(draw):
    rec = json.loads(_snap_record())
    kind = draw(st.sampled_from(("bytes", "drop", "retype")))
    if kind == "bytes":
        return draw(damaged(_snap_record()))
    key = draw(st.sampled_from(sorted(rec)))
    if kind == "drop":
        del rec[key]
    else:
        rec[key] = draw(json_values)
    return json.dumps(rec).encode()


def test_snapshot_records(tmp_path):
    """A damaged snapshot record or index page in LMDB: SnapStore refuses to open with a
    SnapError naming the snapshot (or reads it), never another error."""
    site = tmp_path / "site"
    site.mkdir()
    store = S.SnapStore(site, env=lmdb.open(str(site / "meta.lmdb"), map_size=1 << 26,
                                            max_dbs=32, sync=False))
    snap = store.create("daily")
    store.add_before_images(snap, np.array([3, 70000], dtype=np.uint32), b"\1" * (2 * BS))
    store.flush()
    env = store.env
    store.queue.clear()

    def reopen():
        st_ = S.SnapStore(site, env=env)
        for s in st_.queue:
            st_.has(s, 0, 80000)
            st_.page_bits(s, 0)
            st_.read_saved(s, np.array([3, 70000], dtype=np.uint32))
            s.save.close()

    @FUZZ_IO
    @given(snap_records())
    def records(raw):
        with env.begin(write=True) as txn:
            txn.put(SK.snap_key(1), raw, db=store.db_snaps)
        try:
            reopen()
        except S.SnapError:
            pass

    @FUZZ_IO
    @given(st.sampled_from(("bits", "bmap")), st.integers(0, 300),
           st.binary(max_size=64) | st.binary(min_size=4096, max_size=4200))
    def pages(which, page, value):
        with env.begin(write=True) as txn:
            txn.put(SK.snap_key(1), _snap_record(), db=store.db_snaps)
            db = store.bits.db if which == "bits" else store.bmap.db
            txn.put(SK.page_key(1, page), value, db=db)
        try:
            reopen()
        except S.SnapError:
            pass
        with env.begin(write=True) as txn:
            txn.delete(SK.page_key(1, page), db=db)

    records()
    pages()
    env.close()


# ================================================================== the change log in LMDB

def test_change_log_pages_and_intent_log(tmp_path, caplog):
    """Damaged change-log pages, page keys or intent keys: the log over-marks (never
    under-marks, never past the volume's end); it never fails to open, never crashes on the
    write path."""
    NB = (1 << 20) - 5
    from repfs.repl.changelog import ChangeLogLayer
    from tests.memdev import MemDev

    env = lmdb.open(str(tmp_path / "meta.lmdb"), map_size=1 << 26, max_dbs=32, sync=False)
    dbs = {n: env.open_db(n) for n in (RK.CLOG_NEW, RK.CLOG_OLD, RK.CLOG_INTENT)}

    @FUZZ_IO
    @given(st.sampled_from(sorted(dbs)),
           st.sampled_from([RK.u32(0), RK.u32(31), RK.u32(2**32 - 1)]) | st.binary(max_size=8),
           st.binary(max_size=64)
           | st.binary(min_size=RK.PAGE_BYTES - 2, max_size=RK.PAGE_BYTES + 2))
    def prop(db, key, value):
        with env.begin(write=True) as txn:
            for d in dbs.values():
                txn.drop(d, delete=False)
            txn.put(key or b"\0", value, db=dbs[db])
        layer = ChangeLogLayer(MemDev(NB), env)
        # nothing marked past the volume's end (the cutter would read there)
        assert all(p * RK.PAGE_BITS < NB for p in layer.new.pages)
        assert layer.new.count() <= NB
        if db == RK.CLOG_INTENT or len(value) != RK.PAGE_BYTES:
            # a key or page that does not decode: its blocks, or every block, are marked
            marked = layer.new.get_range(0, NB)
            if len(key) != 4:
                assert marked.all()
        layer.enabled = True
        layer.write(5, bytes(BS))
        layer.write(NB - 1, bytes(BS))
        layer.persist()
        assert layer.new.get_range(5, 1).all() and layer.new.get_range(NB - 1, 1).all()
        layer.enabled = False
    prop()
    env.close()
    caplog.clear()  # the damaged pages were logged as warnings, as they should be
