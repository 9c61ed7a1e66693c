"""Tier 0: the receiver trusts nothing (repfs/repl/receiver.py).

Every rule a secondary applies to what a primary sends, one test each, with hostile input
built by the real encoders and then altered: extents beyond the volume, empty or overlapping
extents (in one chunk and across the chunks of one delta set), the generation of chunks,
headers and initial-copy records, the bounds and order of initial-copy records, the start of
playback, and who may attach. A refused record writes nothing. A delta set is played whole or
not at all, and a playback a crash interrupted is finished before anything reads the volume.
The receiver runs on a real LMDB environment in tmp_path; the volume is tests.memdev.MemDev.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import lmdb
import pytest

from repfs.repl import receiver as R
from repfs.repl.chunk import (
    BS, MAX_CHUNK_BLOCKS, ChunkError, SetHeader, data_checksum, decode_copy, encode_chunk,
    encode_copy, encode_set_header, encoded_checksum,
)
from repfs.repl.receiver import (
    CorruptDeltaSet, ExtentCheck, ReceiveError, Receiver, attach_refusal,
    finish_interrupted_playback,
)
from tests.memdev import MemDev

NBLOCKS = 1000
GEN = 3
PRIMARY = {"uuid": "ab" * 16, "site": "/srv/primary"}


def blk(rng, n):
    return rng.randbytes(n * BS)


@pytest.fixture
def site(tmp_path):
    path = tmp_path / "site"
    path.mkdir()
    env = lmdb.open(str(path / "meta.lmdb"), map_size=1 << 30, max_dbs=32)
    yield path, env
    env.close()


def secondary(site, *, copy=None, after=5) -> Receiver:
    """A receiver attached at generation GEN; `copy`: (start, data) records of the initial
    copy, then playback starts after delta set `after` and the copy is played (None: stay in
    the copy)."""
    path, env = site
    r = Receiver(env, path, NBLOCKS)
    r.attach(PRIMARY, GEN)
    blocks = 0
    for start, data in copy or []:
        r.receive_copy(encode_copy(GEN, start, data))
        blocks += len(data) // BS
    if after is not None:
        r.start_playback(after, GEN, blocks)
        r.play(r.next_to_play(), MemDev(NBLOCKS))  # the copy is delta set `after`
    return r


def send_set(r: Receiver, n: int, chunks: list[list[tuple[int, int]]], rng, gen=GEN):
    """Send delta set n made of chunks with the given extents; returns {block: data}."""
    out, sums = send_chunks(r, n, chunks, rng, gen)
    hdr = SetHeader(gen, n, len(chunks), sum(c for ch in chunks for _, c in ch),
                    data_checksum(sums))
    r.commit(encode_set_header(hdr), {})
    return out


def send_chunks(r: Receiver, n: int, chunks, rng, gen=GEN):
    """The chunks of delta set n (no header); returns ({block: data}, chunk checksums)."""
    out, sums = {}, []
    for i, ext in enumerate(chunks):
        data = blk(rng, sum(c for _, c in ext))
        raw = encode_chunk(gen, n, i, ext, data)
        r.receive_chunk(raw)
        sums.append(encoded_checksum(raw))
        pos = 0
        for s, c in ext:
            for b in range(c):
                out[s + b] = data[(pos + b) * BS:(pos + b + 1) * BS]
            pos += c
    return out, sums


# ----------------------------------------------------------------------------- ExtentCheck


@pytest.mark.parametrize("extents, why", [
    ([], "no extents"),
    ([(5, 0)], "empty extent"),
    ([(1, 2), (9, 0)], "empty extent"),
    ([(NBLOCKS - 1, 2)], "beyond the end"),
    ([(NBLOCKS, 1)], "beyond the end"),
    ([(2 ** 32 - 1, 2 ** 32 - 1)], "beyond the end"),
    ([(-1, 2)], "beyond the end"),
    ([(10, 5), (14, 1)], "overlapping"),
    ([(14, 1), (10, 5)], "overlapping"),
    ([(10, 5), (10, 5)], "overlapping"),
])
def test_extent_rules(extents, why):
    check = ExtentCheck(NBLOCKS)
    assert why in check.problem(extents)
    with pytest.raises(ValueError, match=why):
        check.add(extents)
    assert check.blocks == 0 and not check.seen  # a refused chunk records nothing


def test_extents_across_chunks_of_one_delta_set():
    check = ExtentCheck(NBLOCKS)
    check.add([(10, 5), (NBLOCKS - 1, 1), (0, 1)])  # the last block and block 0 are fine
    check.add([(15, 3), (1, 9)])  # adjacent, not overlapping
    assert check.blocks == 19
    assert "overlaps" in check.problem([(100, 1), (17, 2)])
    assert "overlaps" in check.problem([(NBLOCKS - 1, 1)])
    assert check.problem([(18, 2)]) is None
    ascending = ExtentCheck(NBLOCKS, ascending=True)
    ascending.add([(10, 5)])
    assert "precedes" in ascending.problem([(14, 1)])
    assert "precedes" in ascending.problem([(3, 1)])
    assert ascending.problem([(15, 1)]) is None
    assert "beyond" in ascending.problem([(NBLOCKS - 1, 5)])


# ----------------------------------------------------------------------------- copy records


def test_copy_record_roundtrip_and_every_bit_flip():
    rng = random.Random(1)
    data = blk(rng, 3)
    raw = encode_copy(7, 123, data)
    rec = decode_copy(raw)
    assert (rec.generation, rec.start, rec.count, rec.data) == (7, 123, 3, data)
    assert decode_copy(bytearray(raw)).data == data
    for i in list(range(0, 64)) + rng.sample(range(64, len(raw)), 200):
        bad = bytearray(raw)
        bad[i] ^= 1 << rng.randrange(8)
        with pytest.raises(ChunkError):
            decode_copy(bytes(bad))
    for cut in (0, 10, 35, 36, len(raw) - 1):
        with pytest.raises(ChunkError):
            decode_copy(raw[:cut])
    with pytest.raises(ChunkError):
        decode_copy(raw + b"\0")
    with pytest.raises(ChunkError):
        encode_copy(1, 0, bytes(BS * (MAX_CHUNK_BLOCKS + 1)))
    with pytest.raises(ChunkError):
        encode_copy(1, 0, b"x")


def test_copy_records_are_checked_before_anything_is_staged(site):
    rng = random.Random(2)
    r = secondary(site, after=None)
    staged = r.dir / R.COPY_FILE
    r.receive_copy(encode_copy(GEN, 10, blk(rng, 4)))
    size = staged.stat().st_size
    hostile = [
        (encode_copy(GEN + 1, 20, blk(rng, 1)), "conflict", "generation"),
        (encode_copy(GEN - 1, 20, blk(rng, 1)), "conflict", "generation"),
        (encode_copy(GEN, NBLOCKS - 1, blk(rng, 2)), "conflict", "beyond the end"),
        (encode_copy(GEN, 2 ** 63, blk(rng, 1)), "conflict", "beyond the end"),
        (encode_copy(GEN, 20, b""), "conflict", "empty extent"),
        (encode_copy(GEN, 12, blk(rng, 4)), "conflict", "overlaps"),
        (encode_copy(GEN, 8, blk(rng, 7)), "conflict", "precedes"),
        (encode_copy(GEN, 20, blk(rng, 1))[:-1], "invalid", "rejected copy record"),
        (b"garbage", "invalid", "rejected copy record"),
    ]
    for raw, kind, why in hostile:
        with pytest.raises(ReceiveError, match=why) as e:
            r.receive_copy(raw)
        assert e.value.kind == kind
        assert staged.stat().st_size == size, why  # nothing written
    # a resend of a record already held is acknowledged and ignored
    assert r.receive_copy(encode_copy(GEN, 10, blk(rng, 4)))["duplicate"]
    assert r.receive_copy(encode_copy(GEN, 11, blk(rng, 2)))["duplicate"]
    assert r.receive_copy(encode_copy(GEN, 2, blk(rng, 1)))["duplicate"]  # below: ignored
    assert staged.stat().st_size == size
    r.receive_copy(encode_copy(GEN, NBLOCKS - 1, blk(rng, 1)))  # the last block is fine
    assert r.info()["copy"] == {"next_block": NBLOCKS, "blocks": 5}


def test_start_playback_checks_generation_count_and_number(site):
    rng = random.Random(3)
    r = secondary(site, copy=[(0, blk(rng, 2)), (8, blk(rng, 3))], after=None)
    with pytest.raises(ReceiveError, match="generation"):
        r.start_playback(5, GEN + 1, 5)
    with pytest.raises(ReceiveError, match="incomplete: this site holds 5 of 6"):
        r.start_playback(5, GEN, 6)
    with pytest.raises(ReceiveError, match="delta set 0"):
        r.start_playback(0, GEN, 5)
    assert r.state == "initial-copy"
    r.start_playback(5, GEN, 5)
    assert (r.state, r.last_received, r.last_played) == ("replicating", 5, 4)
    with pytest.raises(ReceiveError, match="not receiving an initial copy"):
        r.start_playback(5, GEN, 5)
    with pytest.raises(ReceiveError, match="not expecting an initial copy"):
        r.receive_copy(encode_copy(GEN, 20, blk(rng, 1)))


def test_the_initial_copy_is_played_as_one_delta_set(site):
    """The copy touches nothing of the volume until playback, then lands whole."""
    rng = random.Random(4)
    a, b = blk(rng, 3), blk(rng, MAX_CHUNK_BLOCKS)
    r = secondary(site, copy=[(1, a), (100, b)], after=None)
    dev = MemDev(NBLOCKS)
    dev.blocks = {0: b"old0" * 1024, 1: b"old1" * 1024}
    assert r.next_to_play() is None  # nothing to play during the copy
    r.start_playback(7, GEN, 3 + MAX_CHUNK_BLOCKS)
    rec = r.next_to_play()
    assert rec["number"] == 7 and rec["copy"]
    assert r.extents(rec) is None  # the copy may change anything: every cache is dropped
    r.play(rec, dev)
    assert dev.read(1, 3) == a and dev.read(100, MAX_CHUNK_BLOCKS) == b
    assert dev.blocks[0] == b"old0" * 1024  # blocks the copy does not hold are left alone
    assert r.last_played == 7 and not (r.dir / R.COPY_FILE).exists()
    data = send_set(r, 8, [[(5, 1)]], rng)
    r.play(r.next_to_play(), dev)
    assert dev.read(5, 1) == data[5]


def test_staged_copy_resumes_after_a_torn_tail(site, monkeypatch):
    """A crash during the copy: the receiver's position is what it holds whole; the saved
    durable position is used when the file still reaches it."""
    monkeypatch.setattr(R, "COPY_SYNC_BYTES", 3 * BS)
    rng = random.Random(5)
    path, env = site
    r = secondary(site, copy=[(0, blk(rng, 2)), (4, blk(rng, 2)), (9, blk(rng, 2))], after=None)
    staged = r.dir / R.COPY_FILE
    os.truncate(staged, staged.stat().st_size - 100)  # the last record torn
    (r.dir / "9.ds").write_bytes(b"a delta set of an earlier primary")  # attach crashed
    r2 = Receiver(env, path, NBLOCKS)
    assert r2.info()["copy"] == {"next_block": 6, "blocks": 4}
    assert sorted(p.name for p in r.dir.iterdir()) == [R.COPY_FILE]
    r2.receive_copy(encode_copy(GEN, 9, blk(rng, 2)))
    r2.start_playback(2, GEN, 6)
    # and a torn tail below the saved position: the scan starts from the beginning
    r3 = secondary(site, copy=[(0, blk(rng, 2)), (4, blk(rng, 2)), (9, blk(rng, 2))],
                   after=None)
    os.truncate(r3.dir / R.COPY_FILE, 10)
    assert Receiver(env, path, NBLOCKS).info()["copy"] == {"next_block": 0, "blocks": 0}


# ----------------------------------------------------------------------------- delta sets


def test_hostile_chunks_are_refused_and_write_nothing(site):
    rng = random.Random(6)
    r = secondary(site, after=5)
    ok = encode_chunk(GEN, 6, 0, [(10, 2)], blk(rng, 2))
    r.receive_chunk(ok)
    path = r._path(6)
    size = path.stat().st_size
    hostile = [
        (encode_chunk(GEN, 6, 1, [(NBLOCKS - 1, 2)], blk(rng, 2)), "beyond the end"),
        (encode_chunk(GEN, 6, 1, [(2 ** 32 - 1, 1)], blk(rng, 1)), "beyond the end"),
        (encode_chunk(GEN, 6, 1, [(20, 0), (21, 1)], blk(rng, 1)), "empty extent"),
        (encode_chunk(GEN, 6, 1, [], b""), "no extents"),
        (encode_chunk(GEN, 6, 1, [(30, 3), (32, 1)], blk(rng, 4)), "overlapping"),
        (encode_chunk(GEN, 6, 1, [(40, 1), (11, 1)], blk(rng, 2)), "overlaps blocks"),
        (encode_chunk(GEN + 1, 6, 1, [(40, 1)], blk(rng, 1)), "generation"),
        (encode_chunk(GEN - 1, 6, 1, [(40, 1)], blk(rng, 1)), "generation"),
        (encode_chunk(GEN, 7, 0, [(40, 1)], blk(rng, 1)), "expected delta set 6"),
        (encode_chunk(GEN, 6, 2, [(40, 1)], blk(rng, 1)), "expected chunk 1"),
    ]
    for raw, why in hostile:
        with pytest.raises(ReceiveError, match=why) as e:
            r.receive_chunk(raw)
        assert e.value.kind == "conflict", why
        assert path.stat().st_size == size, why
    bad = bytearray(encode_chunk(GEN, 6, 1, [(40, 1)], blk(rng, 1)))
    bad[100] ^= 4
    with pytest.raises(ReceiveError, match="rejected chunk") as e:
        r.receive_chunk(bytes(bad))
    assert e.value.kind == "invalid"  # corrupt in transit: the sender sends it again
    assert r.receive_chunk(ok) == {"duplicate": True}
    assert path.stat().st_size == size
    # the very first chunk of a delta set refused: no file is made for it
    r.commit(encode_set_header(SetHeader(GEN, 6, 1, 2, data_checksum(
        [encoded_checksum(ok)]))), {})
    with pytest.raises(ReceiveError, match="beyond"):
        r.receive_chunk(encode_chunk(GEN, 7, 0, [(NBLOCKS, 1)], blk(rng, 1)))
    assert not r._path(7).exists()


def test_headers_are_checked(site):
    rng = random.Random(7)
    r = secondary(site, after=5)
    raw = encode_chunk(GEN, 6, 0, [(10, 2)], blk(rng, 2))
    r.receive_chunk(raw)
    good = SetHeader(GEN, 6, 1, 2, data_checksum([encoded_checksum(raw)]))
    for hdr, why in [
        (SetHeader(GEN + 1, 6, 1, 2, good.data_checksum), "generation"),
        (SetHeader(GEN, 7, 1, 2, good.data_checksum), "out of order"),
    ]:
        with pytest.raises(ReceiveError, match=why):
            r.commit(encode_set_header(hdr), {})
    assert r.last_received == 5 and r.partial is not None
    with pytest.raises(ReceiveError, match="send it again") as e:
        r.commit(encode_set_header(SetHeader(GEN, 6, 1, 3, good.data_checksum)), {})
    assert e.value.kind == "invalid" and r.last_received == 5
    r.receive_chunk(raw)
    r.commit(encode_set_header(good), {"cut_ns": "x", "first_change_ns": -1})
    rec = r.next_to_play()
    assert r.last_received == 6 and rec["cut_ns"] == 0 and rec["first_change_ns"] == 0
    with pytest.raises(ReceiveError, match="not receiving"):
        Receiver(site[1], site[0], NBLOCKS).detach() or r.receive_chunk(raw)


class FailingDev(MemDev):
    """Dies (like a kill) after `left` writes."""

    def __init__(self, nblocks, left):
        super().__init__(nblocks)
        self.left = left

    def write(self, start, data, meta=False):
        if self.left == 0:
            raise RuntimeError("power cut")
        self.left -= 1
        super().write(start, data, meta)


def test_a_delta_set_is_played_whole_or_not_at_all(site):
    rng = random.Random(8)
    r = secondary(site, after=5)
    send_set(r, 6, [[(10, 2)], [(20, 1), (30, 4)]], rng)
    rec = r.next_to_play()
    f = r._path(6)
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 1  # damage in the last chunk: nothing of the first may be written
    f.write_bytes(bytes(raw))
    dev = MemDev(NBLOCKS)
    with pytest.raises(CorruptDeltaSet, match="delta set 6"):
        r.play(rec, dev)
    assert dev.blocks == {} and r.last_played == 5
    # a file whose chunks all verify but break the rules together (a block twice)
    with open(f, "wb") as out:
        out.write(encode_chunk(GEN, 6, 0, [(10, 2)], blk(rng, 2)))
        out.write(encode_chunk(GEN, 6, 1, [(11, 1)], blk(rng, 1)))
    rec2 = dict(rec, chunks=2, blocks=3)
    rec2.pop("data_checksum")
    with pytest.raises(CorruptDeltaSet, match="overlaps"):
        r.play(rec2, dev)
    # chunks of another delta set, or missing ones
    with open(f, "wb") as out:
        out.write(encode_chunk(GEN, 9, 0, [(10, 2)], blk(rng, 2)))
    with pytest.raises(CorruptDeltaSet, match="out of place"):
        r.play(dict(rec2, chunks=1, blocks=2), dev)
    f.unlink()
    with pytest.raises(CorruptDeltaSet):
        r.play(rec, dev)
    assert dev.blocks == {} and r.last_played == 5


def test_interrupted_playback_is_finished_before_the_volume_is_read(site):
    rng = random.Random(9)
    path, env = site
    r = secondary(site, after=5)
    data = send_set(r, 6, [[(10, 2)], [(20, 1), (30, 4)]], rng)
    rec = r.next_to_play()
    dev = FailingDev(NBLOCKS, 1)
    with pytest.raises(RuntimeError):
        r.play(rec, dev)
    assert r.last_played == 5 and len(dev.blocks) == 2  # half played
    dev.left = 10 ** 6
    finish_interrupted_playback(env, path, dev)
    assert {b: dev.blocks[b] for b in data} == data
    r2 = Receiver(env, path, NBLOCKS)
    assert r2.last_played == 6 and r2.interrupted_playback() is None
    before = dict(dev.blocks)
    finish_interrupted_playback(env, path, dev)  # nothing left to do
    assert dev.blocks == before


def test_an_interrupted_playback_that_cannot_be_finished_does_not_stop_the_mount(site, caplog):
    rng = random.Random(12)
    path, env = site
    r = secondary(site, after=5)
    send_set(r, 6, [[(10, 2)], [(20, 1)]], rng)
    with pytest.raises(RuntimeError):
        r.play(r.next_to_play(), FailingDev(NBLOCKS, 1))
    f = r._path(6)
    f.write_bytes(f.read_bytes()[:-1])  # damaged meanwhile
    dev = MemDev(NBLOCKS)
    finish_interrupted_playback(env, path, dev)  # logs, does not raise
    assert dev.blocks == {}
    assert [x.getMessage() for x in caplog.records if x.levelname == "ERROR"], caplog.text
    assert Receiver(env, path, NBLOCKS).interrupted_playback()["number"] == 6  # still due
    caplog.clear()


def test_partial_delta_set_is_rebuilt_and_rechecked_after_a_restart(site):
    rng = random.Random(10)
    path, env = site
    r = secondary(site, after=5)
    for i, ext in enumerate([[(10, 2)], [(20, 1)], [(30, 1)]]):
        r.receive_chunk(encode_chunk(GEN, 6, i, ext, blk(rng, len(ext) and ext[0][1])))
    f = r._path(6)
    os.truncate(f, f.stat().st_size - 7)
    r2 = Receiver(env, path, NBLOCKS)
    assert r2.info()["partial"] == {"delta_set": 6, "chunks": 2}
    with pytest.raises(ReceiveError, match="overlaps"):  # the rebuilt partial knows its blocks
        r2.receive_chunk(encode_chunk(GEN, 6, 2, [(11, 1)], blk(rng, 1)))


# ----------------------------------------------------------------------------- attach


def me(**kw):
    d = {"site": "/srv/me", "volume_blocks": NBLOCKS, "role": "primary", "state": "idle",
         "generation": 1, "primary": None, "root_entries": 0, "destinations": []}
    d.update(kw)
    return d


@pytest.mark.parametrize("current, primary, gen, nblocks, force, why", [
    (me(), PRIMARY, 1, NBLOCKS, False, None),
    (me(), PRIMARY, 1, NBLOCKS + 1, False, "exactly the primary's size"),
    (me(), PRIMARY, 1, NBLOCKS - 1, True, "exactly the primary's size"),
    (me(), PRIMARY, 1, "1000", True, "exactly the primary's size"),
    (me(), {"site": "/srv/p"}, 1, NBLOCKS, True, "no valid primary"),
    (me(), {"site": "/srv/p", "uuid": "zz" * 16}, 1, NBLOCKS, True, "no valid primary"),
    (me(), "x", 1, NBLOCKS, True, "no valid primary"),
    (me(), PRIMARY, 0, NBLOCKS, True, "not a positive"),
    (me(), PRIMARY, True, NBLOCKS, True, "not a positive"),
    (me(), PRIMARY, 2 ** 64, NBLOCKS, True, "not a positive"),
    (me(site="/srv/primary"), PRIMARY, 1, NBLOCKS, True, "its own secondary"),
    (me(root_entries=2), PRIMARY, 1, NBLOCKS, False, "holds files; --force"),
    (me(root_entries=2), PRIMARY, 1, NBLOCKS, True, None),
    (me(destinations=["x"]), PRIMARY, 1, NBLOCKS, False, "itself replicating"),
    (me(role="secondary", state="replicating", primary=PRIMARY, generation=2), PRIMARY, 2,
     NBLOCKS, False, "already a replicating secondary"),
    (me(role="secondary", state="stopped", primary=PRIMARY, generation=2), PRIMARY, 2,
     NBLOCKS, False, None),
    (me(role="secondary", state="stopped", primary=PRIMARY, generation=2), PRIMARY, 1,
     NBLOCKS, False, "older than this site's 2"),
    (me(role="secondary", state="stopped", primary=PRIMARY, generation=2), PRIMARY, 1,
     NBLOCKS, True, "not even with --force"),  # (invariant 5)
    (me(generation=3), PRIMARY, 2, NBLOCKS, True, "older than this site's 3"),
    (me(role="secondary", state="stopped", primary={"uuid": "cd" * 16, "site": "/srv/q"}),
     PRIMARY, 1, NBLOCKS, False, "secondary of /srv/q"),
    (me(role="secondary", state="stopped", primary={"uuid": "cd" * 16, "site": "/srv/q"}),
     PRIMARY, 1, NBLOCKS, True, None),
])
def test_attach_rules(current, primary, gen, nblocks, force, why):
    got = attach_refusal(current, primary, gen, nblocks, force)
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got, got


# ----------------------------------------------------------------------------- file modes


def test_incoming_files_and_directories_are_private_under_any_umask(site):
    path, env = site
    old = os.umask(0)
    try:
        rng = random.Random(11)
        r = secondary(site, copy=[(0, blk(rng, 1))], after=None)
        assert stat.S_IMODE((r.dir / R.COPY_FILE).stat().st_mode) == 0o600
        r.start_playback(5, GEN, 1)
        r.receive_chunk(encode_chunk(GEN, 6, 0, [(3, 1)], blk(rng, 1)))
        assert stat.S_IMODE(r._path(6).stat().st_mode) == 0o600
        for d in (path / "save", r.dir):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        os.chmod(path / "save", 0o755)  # a loose directory from an older version is tightened
        Receiver(env, path, NBLOCKS)
        assert stat.S_IMODE((path / "save").stat().st_mode) == 0o700
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- direct writes


def formatted_dev(used: list[tuple[int, int]]) -> MemDev:
    """A volume holding a superblock and a block bitmap whose `used` extents (and the
    metadata area) are allocated: every other block is free."""
    from repfs.fs.format import Superblock
    dev = MemDev(NBLOCKS)
    sb = Superblock.layout(NBLOCKS, 64)
    bitmap = bytearray(BS)
    for s, n in [(0, sb.data_start), *used]:
        for b in range(s, s + n):
            bitmap[b >> 3] |= 1 << (b & 7)
    dev.write(0, sb.pack())
    dev.write(sb.bbitmap_start, bytes(bitmap))
    return dev


def direct_secondary(site, dev, after=5) -> Receiver:
    path, env = site
    r = Receiver(env, path, NBLOCKS, dev)
    r.attach(PRIMARY, GEN)
    r.start_playback(after, GEN, 0)
    r.play(r.next_to_play(), dev)
    return r


def test_blocks_free_at_the_last_boundary_go_straight_into_the_volume(site):
    """Issue 8: a received block that was free when the last delta set was played is
    written once, into the volume, as it arrives; the stored record keeps only the other
    blocks. The delta set is acknowledged only once those blocks are durable (a flush), and
    playback writes only the staged blocks. The result is the same volume."""
    rng = random.Random(21)
    dev = formatted_dev([(100, 100)])
    r = direct_secondary(site, dev)
    before = dict(dev.blocks)
    chunks = [[(150, 4), (300, 8)], [(198, 4)], [(120, 2)]]  # mixed, mixed, all used
    flushes = dev.flushes
    out, sums = send_chunks(r, 6, chunks, rng)
    assert dev.flushes == flushes  # nothing synced before the header
    direct = list(range(300, 308)) + [200, 201]
    for b in direct:  # in the volume already, before the delta set is complete
        assert dev.blocks[b] == out[b]
    for b in set(out) - set(direct):
        assert dev.blocks.get(b) == before.get(b)  # the used blocks wait for playback
    staged = r._path(6).stat().st_size
    assert staged < (len(out) - len(direct) + 1) * BS  # the direct blocks are not stored
    flushes = dev.flushes
    r.commit(encode_set_header(SetHeader(GEN, 6, 3, len(out), data_checksum(sums))), {})
    assert dev.flushes > flushes  # durable before the acknowledgement
    rec = r.next_to_play()
    assert sorted(r.extents(rec)) == sorted(e for ext in chunks for e in ext)
    r.play(rec, dev)
    for b, d in out.items():
        assert dev.blocks[b] == d
    assert r.last_played == 6


def test_direct_writes_while_earlier_delta_sets_wait_use_their_boundary(site):
    """Chunks that arrive while earlier delta sets wait to be played: a block is written
    into the volume only if it is free in the bitmap at the boundary the delta set starts
    from (the volume's bitmap with the waiting sets' bitmap blocks laid over it) and no
    waiting set writes it (its playback would overwrite it). After a restart, the waiting
    sets' bitmap blocks are not known: staged until they are played."""
    rng = random.Random(22)
    path, env = site
    dev = formatted_dev([])
    r = direct_secondary(site, dev)
    bitmap = bytearray(dev.read(1, 1))  # delta set 6 allocates 400-401 and 500-502
    for b in (400, 401, 500, 501, 502):
        bitmap[b >> 3] |= 1 << (b & 7)
    # (450: written by 6 and free again at its boundary, e.g. a file made and deleted)
    raw6 = encode_chunk(GEN, 6, 0, [(1, 1), (400, 2), (450, 1)], bytes(bitmap) + blk(rng, 3))
    r.receive_chunk(raw6)
    r.commit(encode_set_header(SetHeader(GEN, 6, 1, 4, data_checksum(
        [encoded_checksum(raw6)]))), {})
    assert dev.read(1, 1) != bytes(bitmap)  # the bitmap block is used: staged
    assert dev.read(400, 2) + dev.read(450, 1) == raw6[-3 * BS:]  # free at 5: direct
    seven = send_set(r, 7, [[(401, 1)], [(450, 1)], [(500, 3)], [(600, 2)]], rng)  # 6 waits
    assert dev.read(401, 1) != seven[401]  # written (and allocated) by delta set 6: staged
    assert dev.read(450, 1) == raw6[-BS:]  # free at 6, but 6's playback writes it: staged
    assert all(b not in dev.blocks for b in (500, 501, 502))  # allocated at 6: staged
    assert dev.blocks[600] == seven[600] and dev.blocks[601] == seven[601]  # free at 6
    r2 = Receiver(env, path, NBLOCKS, dev)  # a restart: 6 and 7 wait, their bitmaps unknown
    eight = send_set(r2, 8, [[(700, 1)]], rng)
    assert 700 not in dev.blocks
    for _ in range(3):
        r2.play(r2.next_to_play(), dev)
    assert dev.read(1, 1) == bytes(bitmap)
    assert all(dev.blocks[b] == d for b, d in {**seven, **eight}.items())
    assert dev.read(400, 1) == raw6[-3 * BS:-2 * BS]
    nine = send_set(r2, 9, [[(800, 1)]], rng)  # all played: the volume's bitmap again
    assert dev.blocks[800] == nine[800]


def test_a_block_in_use_where_the_mount_is_stays_staged_when_a_waiting_set_frees_it(site):
    """Review of e59fb2b: a block in use at the boundary the mount shows, freed by a delta
    set still waiting to be played and reused by the next one, is read by the mount until
    the waiting set is played: it must be staged (free at every boundary from the played
    one on, not only at the last)."""
    rng = random.Random(26)
    dev = formatted_dev([(100, 100)])  # boundary 5: blocks 100-199 hold a file
    dev.write(150, blk(rng, 4))
    r = direct_secondary(site, dev)
    shown = dev.read(150, 4)
    bitmap = bytearray(dev.read(1, 1))  # delta set 6 deletes the file (its bitmap only)
    for b in range(100, 200):
        bitmap[b >> 3] &= ~(1 << (b & 7)) & 0xFF
    raw6 = encode_chunk(GEN, 6, 0, [(1, 1)], bytes(bitmap))
    r.receive_chunk(raw6)
    r.commit(encode_set_header(SetHeader(GEN, 6, 1, 1, data_checksum(
        [encoded_checksum(raw6)]))), {})
    seven = send_set(r, 7, [[(150, 4)], [(300, 1)]], rng)  # 7 reuses them, 6 not played
    assert dev.read(150, 4) == shown  # what the mount shows is untouched
    assert dev.blocks[300] == seven[300]  # (free at 5 and at 6: direct)
    r.play(r.next_to_play(), dev)
    r.play(r.next_to_play(), dev)
    assert all(dev.blocks[b] == d for b, d in seven.items())


def test_a_damaged_direct_block_is_found_before_anything_is_played(site):
    """Playback verifies the blocks a direct record put in the volume with the chunk's own
    checksum: damaged since, the delta set is refused whole (nothing staged is written)."""
    rng = random.Random(23)
    dev = formatted_dev([(100, 100)])
    r = direct_secondary(site, dev)
    out = send_set(r, 6, [[(150, 2), (300, 2)]], rng)
    dev.blocks[301] = b"rot!" * 1024
    with pytest.raises(CorruptDeltaSet, match="damaged"):
        r.play(r.next_to_play(), dev)
    assert dev.blocks.get(150) != out[150] and r.last_played == 5


def test_a_partial_delta_set_with_direct_blocks_resumes_where_they_hold(site):
    """After a restart the partial delta set is rebuilt by verifying each record, direct
    blocks read back from the volume: a direct block lost (a power cut took the unsynced
    write) ends the partial there, and the sender resends from that chunk."""
    rng = random.Random(24)
    path, env = site
    dev = formatted_dev([])
    r = direct_secondary(site, dev)
    raws = [encode_chunk(GEN, 6, i, [(300 + 10 * i, 2)], blk(rng, 2)) for i in range(3)]
    for raw in raws:
        r.receive_chunk(raw)
    assert Receiver(env, path, NBLOCKS, dev).info()["partial"] == {"delta_set": 6, "chunks": 3}
    del dev.blocks[311]  # the second chunk's write did not survive
    r2 = Receiver(env, path, NBLOCKS, dev)
    assert r2.info()["partial"] == {"delta_set": 6, "chunks": 1}
    assert r2.receive_chunk(raws[0]) == {"duplicate": True}
    for raw in raws[1:]:
        r2.receive_chunk(raw)
    r2.commit(encode_set_header(SetHeader(GEN, 6, 3, 6, data_checksum(
        [encoded_checksum(x) for x in raws]))), {})
    r2.play(r2.next_to_play(), dev)
    assert r2.last_played == 6 and dev.read(310, 2) == bytes(decode_chunk_data(raws[1]))


def decode_chunk_data(raw):
    from repfs.repl.chunk import decode_chunk
    return decode_chunk(raw).data


def test_the_initial_copy_writes_blocks_free_on_the_secondary_once(site, monkeypatch):
    """The copy's blocks that are free in the file system the secondary's mount shows go
    into the volume as they arrive (nothing reads them until the copy is played); the others
    are staged. The saved position and the start of playback come after a flush, and a
    restart rebuilds the copy verifying the direct blocks read back."""
    monkeypatch.setattr(R, "COPY_SYNC_BYTES", 3 * BS)
    rng = random.Random(25)
    path, env = site
    dev = formatted_dev([(100, 10)])
    r = Receiver(env, path, NBLOCKS, dev)
    r.attach(PRIMARY, GEN)
    before = dict(dev.blocks)
    records = [(0, blk(rng, 1)), (105, blk(rng, 10)), (400, blk(rng, 4))]
    flushes = dev.flushes
    for start, data in records[:2]:
        r.receive_copy(encode_copy(GEN, start, data))
    assert dev.flushes > flushes  # the position was saved (3 blocks): after a flush
    assert R._progress(r._get("copy_progress"))["next"] == 115
    assert dev.blocks[0] == before[0] and dev.blocks.get(105) == before.get(105)  # used
    assert dev.read(110, 5) == records[1][1][5 * BS:]  # free: written at once
    r2 = Receiver(env, path, NBLOCKS, dev)  # a restart: rebuilt, direct blocks verified
    assert r2.info()["copy"] == {"next_block": 115, "blocks": 11}
    r2.receive_copy(encode_copy(GEN, *records[2]))
    assert dev.read(400, 4) == records[2][1]
    # all direct (a few bytes stored): the position is saved by the bytes received (a
    # restart would otherwise re-verify the whole copy: review of 156cdf7)
    assert R._progress(r2._get("copy_progress"))["next"] == 404
    flushes = dev.flushes
    r2.start_playback(9, GEN, 15)
    assert dev.flushes > flushes
    r2.play(r2.next_to_play(), dev)
    for start, data in records:
        assert dev.read(start, len(data) // BS) == data
    assert r2.last_played == 9
