"""RCP's copy-free paths (repfs/rcp/wire.py): a frame sent as header and body
(`send_parts`), and bulk bodies read straight into their own buffers (`receive_buffer`,
`received`, `receive_size`) as rcp/server.py reads them. The same frames must come out as
through `receive_data` in any split, a body handed up must not change while later frames
arrive, and a damaged bulk frame is refused as before. Pure state machine, no I/O.
"""

from __future__ import annotations

import os
import random

import pytest

from repfs.rcp import wire as W
from repfs.rcp.wire import HEADER, NEED_DATA, ProtocolError
from tests.t0_rcp_wire import feed, open_pair

SIZES = [0, 100, W.BULK_BODY - 1, W.BULK_BODY, 300_000, 1 << 20, W.MAX_BODY]


def requests(rng: random.Random) -> list[tuple[str, object]]:
    """CHUNK and COPY bodies of every size class, with small control frames between."""
    out = []
    for size in SIZES:
        out.append(("CHUNK" if rng.random() < 0.7 else "COPY", os.urandom(size)))
        if rng.random() < 0.5:
            out.append(("COMMIT", {"header": b"h" * 48, "cut_ns": 1, "first_change_ns": 2}))
    rng.shuffle(out)
    return out


def read_like_the_server(s: W.Connection, data: bytes, rng: random.Random) -> list:
    """Feed `data` the way rcp/server.py reads a socket: a bulk body through
    receive_buffer/received, anything else `receive_size(header_first=True)` bytes at a
    time; the peer's bytes arrive in random pieces (never more than asked for)."""
    events, pos = [], 0
    while True:
        while (ev := s.next_event()) is not NEED_DATA:
            events.append(ev)
        if pos == len(data):
            return events
        into = s.receive_buffer()
        if into is not None:
            n = min(len(into), len(data) - pos, rng.choice((1, 1000, 65536, 1 << 20)))
            into[:n] = data[pos:pos + n]
            s.received(n)
        else:
            want = s.receive_size(1 << 20, header_first=True)
            n = min(want, len(data) - pos, rng.choice((1, 7, 5000, 1 << 20)))
            s.receive_data(data[pos:pos + n])
        pos += n


@pytest.mark.parametrize("seed", range(4))
def test_parts_and_buffers_carry_the_same_frames(seed):
    rng = random.Random(seed)
    reqs = requests(rng)
    c1, s1 = open_pair()
    c2, s2 = open_pair()
    joined = b"".join(c1.send(name, body) for name, body in reqs)
    parts = []
    for name, body in reqs:
        head, rest = c2.send_parts(name, body)
        assert len(head) == HEADER.size
        parts.append(bytes(head) + bytes(rest))
    assert b"".join(parts) == joined  # (the same bytes, the same sequence numbers)
    plain = feed(s1, joined)
    got = read_like_the_server(s2, joined, rng)
    assert [(m.type, m.seq, bytes(m.body) if isinstance(m.body, (bytes, memoryview))
             else m.body) for m in got] == \
        [(m.type, m.seq, bytes(m.body) if isinstance(m.body, (bytes, memoryview))
          else m.body) for m in plain]
    assert [(m.type, m.body) for m in got] == [
        (n, b if isinstance(b, bytes) else {**b}) for n, b in reqs]


def test_a_body_handed_up_stays_as_it_was():
    """The body of a bulk frame is a view of its own buffer: frames received after it, by
    either path, must not change it."""
    rng = random.Random(7)
    c, s = open_pair()
    first, later = os.urandom(1 << 20), [os.urandom(n) for n in (1 << 20, 5000, 200_000)]
    data = c.send("CHUNK", first) + b"".join(c.send("CHUNK", b) for b in later)
    head = data[:HEADER.size + len(first)]
    got = read_like_the_server(s, head, rng)
    assert len(got) == 1
    held = got[0].body
    assert bytes(held) == first
    rest = read_like_the_server(s, data[len(head):], rng)
    assert [bytes(m.body) for m in rest] == later
    feed(s, c.send("CHUNK", b"x" * 100))  # (and the plain path after it)
    assert bytes(held) == first


@pytest.mark.parametrize("where", [HEADER.size, HEADER.size + 1, HEADER.size + 70_000, -1])
def test_a_bit_flipped_in_a_bulk_body_is_refused(where):
    c, s = open_pair()
    frame = bytearray(c.send("CHUNK", os.urandom(300_000)))
    frame[where] ^= 0x10
    with pytest.raises(ProtocolError, match="checksum mismatch"):
        read_like_the_server(s, bytes(frame), random.Random(1))
    assert s.state == W.CLOSED


def test_receive_buffer_only_for_a_checked_bulk_header():
    c, s = open_pair(features=())  # (no compression: these bodies would shrink)
    assert s.receive_buffer() is None  # (nothing yet)
    assert s.receive_size(1 << 20, header_first=True) == HEADER.size
    assert s.receive_size(1 << 20) == 1 << 20
    small = c.send("CHUNK", b"y" * 1000)
    s.receive_data(small[:HEADER.size])
    assert s.next_event() is NEED_DATA
    assert s.receive_buffer() is None  # (a small body goes the plain way)
    assert s.receive_size(1 << 20) == 1000
    s.receive_data(small[HEADER.size:])
    assert bytes(s.next_event().body) == b"y" * 1000
    big = c.send("CHUNK", b"z" * W.BULK_BODY)
    s.receive_data(big[:HEADER.size])
    assert s.next_event() is NEED_DATA
    into = s.receive_buffer()
    assert len(into) == W.BULK_BODY
    into[:] = big[HEADER.size:]
    s.received(len(into))
    assert bytes(s.next_event().body) == b"z" * W.BULK_BODY
    # a header the state machine refuses never gets a buffer: it is refused from the header
    bad = bytearray(c.send("CHUNK", b"q" * W.BULK_BODY))
    bad[4:8] = (W.MAX_BODY + 1).to_bytes(4, "big")  # (the length field)
    s.receive_data(bytes(bad[:HEADER.size]))
    with pytest.raises(ProtocolError, match="at most"):
        s.next_event()
