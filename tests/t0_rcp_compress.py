"""RCP compression (repfs/rcp/wire.py "zstd") and the send task's bandwidth limit
(repl/sender.py TokenBucket), with no I/O.

The handshake's `features`: agreed when both ends offer them, none when either does not (a
HELLO or CHALLENGE without the field, as an older peer sends); compressible COPY and CHUNK
bodies go compressed with FLAG_ZSTD and arrive as they were sent, incompressible ones raw;
a compressed frame that would decompress beyond MAX_BODY (a zstd bomb, with or without its
size in the zstd header), a damaged one, one not agreed on, or a compressed control message,
is refused with a one-line reason. The token bucket is checked against a fake clock.
"""

from __future__ import annotations

import os

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from repfs.rcp import wire as W
from repfs.rcp.wire import BY_NAME, NEED_DATA, PREFACE, encode_frame
from repfs.repl.sender import BURST, TokenBucket
from tests.fuzzing import examples
from tests.t0_rcp_wire import SESSION, client, feed, frame, handshake, refused, server

TEXT = b"".join(b"line %d of a log file that compresses well\n" % i for i in range(20000))
NOISE = os.urandom(600_000)


def open_pair(ckw=None, skw=None):
    c, s = client(**(ckw or {})), server(**(skw or {}))
    handshake(c, s)
    assert c.state == s.state == W.OPEN
    return c, s


def hello_of(conn_bytes: bytes) -> dict:
    """The body of the HELLO in a client's first bytes."""
    body = conn_bytes[len(PREFACE) + W.HEADER.size:]
    return msgpack.unpackb(body, raw=False)


def test_both_offer_zstd_and_agree():
    c, s = client(), server()
    c_bytes = c.hello()
    assert hello_of(c_bytes)["features"] == ["zstd"]
    feed(s, c_bytes)
    assert s.agreed == {"zstd"}
    feed(c, s.take_outgoing())
    feed(s, c.take_outgoing())
    feed(c, s.take_outgoing())
    assert c.agreed == {"zstd"} and c.state == W.OPEN


@pytest.mark.parametrize("side", ["client", "server"])
def test_one_side_without_compression_agrees_to_none(side):
    c, s = open_pair(ckw={"features": ()} if side == "client" else None,
                     skw={"features": ()} if side == "server" else None)
    assert c.agreed == s.agreed == frozenset()
    data = c.send("CHUNK", TEXT[:500_000])
    hdr = W.HEADER.unpack_from(data)
    assert hdr[1] == 0 and hdr[3] == 500_000  # raw, no flag
    (msg,) = feed(s, data)
    assert msg.body == TEXT[:500_000] and msg.flags == 0


def test_older_client_without_the_field():
    """A HELLO without `features` (a peer older than the field): no CHALLENGE field back,
    nothing agreed, the session works."""
    c, s = client(features=()), server()
    c_bytes = c.hello()
    assert "features" not in hello_of(c_bytes)
    feed(s, c_bytes)
    challenge = s.take_outgoing()
    assert b"features" not in challenge
    feed(c, challenge)
    feed(s, c.take_outgoing())
    feed(c, s.take_outgoing())
    assert c.state == W.OPEN and s.agreed == c.agreed == frozenset()


def test_older_server_without_the_field():
    """A CHALLENGE without `features` (an older server ignores the HELLO's): none agreed."""
    c, s = client(), server(features=())
    hello = c.hello()
    feed(s, hello)
    challenge = s.take_outgoing()
    # the server of this build answers [] when it takes none; an older one says nothing
    doc = msgpack.unpackb(challenge[W.HEADER.size:], raw=False)
    assert doc["features"] == []
    doc.pop("features")
    t = BY_NAME["CHALLENGE"]
    old = encode_frame(t.code, msgpack.packb(doc, use_bin_type=True), session=0, seq=1)
    feed(c, old)
    assert c.state == W.READY_WAIT and c.agreed == frozenset()


def test_compressible_bodies_go_compressed_and_arrive_whole():
    c, s = open_pair()
    sent = []
    for name, body in (("CHUNK", TEXT[:1 << 20]), ("COPY", TEXT[:300_000]),
                       ("CHUNK", NOISE), ("CHUNK", b"x")):
        data = c.send(name, body)
        hdr = W.HEADER.unpack_from(data)
        sent.append((hdr[1], hdr[3], len(body)))
        got = feed(s, data)
        assert [(m.type, m.body) for m in got] == [(name, body)]
    (f1, n1, r1), (f2, n2, r2), (f3, n3, r3), (f4, n4, r4) = sent
    assert f1 == f2 == W.FLAG_ZSTD and n1 < r1 // 10 and n2 < r2 // 10
    assert f3 == 0 and n3 == r3  # incompressible: raw, no flag
    assert f4 == 0 and n4 == 1  # grows when compressed: raw
    assert c.compressed == 2 and c.raw_bytes == r1 + r2 + r3 + r4
    assert c.body_bytes == n1 + n2 + n3 + n4
    # control messages are never compressed
    data = c.send("COMMIT", {"header": TEXT[:4000], "cut_ns": 1, "first_change_ns": 2})
    assert W.HEADER.unpack_from(data)[1] == 0
    assert feed(s, data)[0].body["header"] == TEXT[:4000]


def test_incompressible_bodies_are_not_tried_again_at_once():
    """After a body that did not shrink, the next ones go raw untried, for twice as many
    bodies each time it fails again (up to MAX_SKIP); one that shrinks resets it.
    Compressing random data before sending it raw cost ~0.45 CPU s per GiB (helper-46)."""
    c, s = open_pair()
    flags = []
    for body in [NOISE] * 8 + [TEXT[:1 << 20]] * 4:
        data = c.send("CHUNK", body)
        flags.append(W.HEADER.unpack_from(data)[1])
        assert [m.body for m in feed(s, data)] == [body]
    # tried at 0, (skip 1) 2, (skip 2) 5, then skipping 4: TEXT at 8 goes raw untried
    # (still skipping), and is compressed from the next try on
    assert c.compressed == flags.count(W.FLAG_ZSTD) >= 1
    assert flags[:9] == [0] * 9 and flags[-1] == W.FLAG_ZSTD
    assert c._skip_next == 0


def test_bodies_in_random_splits():
    c, s = open_pair()
    bodies = [TEXT[i * 70_000:(i + 1) * 70_000 + i] for i in range(8)] + [NOISE[:90_000]]
    data = b"".join(c.send("CHUNK", b) for b in bodies)
    pos, got = 0, []
    for n in (1, 7, 3000, 65536, 11, 200_000, 5):
        got += feed(s, data[pos:pos + n])
        pos += n
    got += feed(s, data[pos:])
    assert [m.body for m in got] == bodies


def zstd_frame(data: bytes, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(data)


@pytest.mark.parametrize("content_size", [True, False])
def test_decompression_bomb_is_refused(content_size):
    """A body of a few hundred bytes that would make 64 MiB: refused, never made."""
    bomb = zstd_frame(b"\0" * (64 << 20), content_size)
    assert len(bomb) < 10_000
    c, s = open_pair()
    refused(s, frame("CHUNK", bomb, session=SESSION, seq=3, flags=W.FLAG_ZSTD), "protocol",
            "decompresses to" if content_size else "bad compressed body")


def test_just_over_max_body_is_refused_and_max_body_passes():
    c, s = open_pair()
    ok = os.urandom(64) * (W.MAX_BODY // 64)
    ok += b"\0" * (W.MAX_BODY - len(ok))
    (msg,) = feed(s, frame("COPY", zstd_frame(ok), session=SESSION, seq=3,
                           flags=W.FLAG_ZSTD))
    assert msg.body == ok
    for content_size in (True, False):
        c, s = open_pair()
        refused(s, frame("COPY", zstd_frame(ok + b"\0", content_size), session=SESSION,
                         seq=3, flags=W.FLAG_ZSTD), "protocol",
                "decompresses to" if content_size else "bad compressed body")


@pytest.mark.parametrize("body,needle", [
    (b"not zstd at all", "bad compressed body"),
    (zstd_frame(TEXT[:10000])[:-5], "bad compressed body"),  # cut short
    (zstd_frame(TEXT[:10000]) + b"junk", "bad compressed body"),  # trailing bytes
    (zstd_frame(TEXT[:100]) + zstd_frame(TEXT[:100]), "bad compressed body"),  # two frames
])
def test_damaged_compressed_body_is_refused(body, needle):
    c, s = open_pair()
    refused(s, frame("CHUNK", body, session=SESSION, seq=3, flags=W.FLAG_ZSTD), "protocol",
            needle)


def test_compressed_control_message_or_unagreed_is_refused():
    c, s = open_pair()
    body = zstd_frame(msgpack.packb({}))
    refused(s, frame("INFO", body, session=SESSION, seq=3, flags=W.FLAG_ZSTD), "protocol",
            "only COPY and CHUNK")
    c, s = open_pair(skw={"features": ()})
    refused(s, frame("CHUNK", zstd_frame(TEXT[:1000]), session=SESSION, seq=3,
                     flags=W.FLAG_ZSTD), "protocol", "compression was not agreed")


def test_challenge_agreeing_to_what_was_not_offered_is_refused():
    c, s = client(features=()), server()
    feed(s, c.hello())
    challenge = s.take_outgoing()
    doc = msgpack.unpackb(challenge[W.HEADER.size:], raw=False)
    doc["features"] = ["zstd"]
    t = BY_NAME["CHALLENGE"]
    refused(c, encode_frame(t.code, msgpack.packb(doc, use_bin_type=True), session=0, seq=1),
            "protocol", "which this end did not offer")


@pytest.mark.parametrize("features", ["zstd", [1], ["x" * 300], ["a"] * 17])
def test_malformed_features_in_hello_is_refused(features):
    c, s = client(), server()
    data = bytearray(c.hello())
    doc = hello_of(bytes(data))
    doc["features"] = features
    t = BY_NAME["HELLO"]
    bad = PREFACE + encode_frame(t.code, msgpack.packb(doc, use_bin_type=True), session=0,
                                 seq=1)
    refused(s, bad, "protocol", "'features' is not a list")


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=2000), st.booleans())
def test_fuzz_compressed_bodies(body, as_zstd):
    """Any compressed body: handed up (at most MAX_BODY bytes) or refused, nothing else."""
    if as_zstd:
        body = zstd_frame(body)
    c, s = open_pair()
    data = frame("CHUNK", body, session=SESSION, seq=3, flags=W.FLAG_ZSTD)
    try:
        got = feed(s, data)
    except W.ProtocolError as e:
        assert str(e).isprintable()
        assert not as_zstd
        return
    assert len(got) == 1 and len(got[0].body) <= W.MAX_BODY


# ================================================================== the token bucket

class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.slept = []

    def clock(self):
        return self.now

    def sleep(self, t):
        assert t > 0
        self.slept.append(t)
        self.now += t


def test_token_bucket_keeps_the_rate():
    f = FakeClock()
    rate = 1 << 20
    b = TokenBucket(rate, clock=f.clock, sleep=f.sleep)
    start = f.now
    total = 0
    for size in [100_000] * 50 + [1_100_000] * 5 + [1] * 10:
        b.take(size)
        total += size
    elapsed = f.now - start
    # at most the burst ahead of the rate, never behind it by more than nothing
    assert total - rate * BURST <= rate * elapsed + 1
    assert elapsed <= total / rate + 1e-6


def test_token_bucket_refills_while_idle_up_to_the_burst():
    f = FakeClock()
    rate = 1_000_000
    b = TokenBucket(rate, clock=f.clock, sleep=f.sleep)
    assert b.take(rate * BURST) == 0  # a full bucket to start with
    assert b.take(100_000) == pytest.approx(0.1)
    f.now += 3600  # an hour idle: the bucket holds the burst, not an hour's worth
    assert b.take(rate * BURST) == 0
    assert b.take(rate) == pytest.approx(1.0)


def test_token_bucket_without_limit_and_rate_changes():
    f = FakeClock()
    b = TokenBucket(0, clock=f.clock, sleep=f.sleep)
    for _ in range(100):
        assert b.take(1 << 20) == 0
    assert f.slept == []
    b.rate = 100_000  # set while running (the policy verb)
    assert b.take(50_000) == 0  # starts full
    assert b.take(100_000) == pytest.approx(1.0)
    b.rate = 200_000  # changed while it slept off its debt: refilled at the new rate since
    assert b.take(200_000) == pytest.approx(0.5)  # (200k in, burst 100k left; 100k owed)
    b.rate = 0
    assert b.take(10 << 20) == 0


def test_token_bucket_sleep_may_stop_it():
    class Stop(Exception):
        pass

    def sleep(t):
        raise Stop()
    f = FakeClock()
    b = TokenBucket(65536, clock=f.clock, sleep=sleep)
    with pytest.raises(Stop):
        b.take(1 << 20)
