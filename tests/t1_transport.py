"""Tier 1: pipelined sends of delta chunks and initial-copy records (repfs/repl/transport.py).

A real `ControlServer` listens on loopback in the test's trio run; behind it sits a real
`Receiver` (repfs/repl/receiver.py, on LMDB in tmp_path), whose endpoints run as
repfs/repl/secondary.py runs them: one at a time, in a worker thread. The client is the real
`ReceiverClient`, blocking, in a worker thread as the send task runs it. The receiver checks
the order of every chunk and record, so "arrived in order" is its verdict, not the test's.

Faults are injected around the server: a stream wrapper that cuts the connection after some
bytes, a gate that holds the first chunk until the client has asked for more, a wrong token.
"""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager
from pathlib import Path

import lmdb
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repfs.control import MAX_BINARY_BODY, ControlServer
from repfs.repl.chunk import (
    BS, SetHeader, data_checksum, encode_chunk, encode_set_header,
    encoded_checksum,
)
from repfs.repl.receiver import Receiver
from repfs.repl.transport import (
    HTTPConnection, PermanentError, ReceiverClient, RejectedError, TransientError,
    TransportError, _Broken,
)
from tests.memdev import MemDev

TOKEN = "k" * 43
NBLOCKS = 4096
GEN = 4
AFTER = 5  # the receiver has delta set AFTER (an empty initial copy); chunks are of AFTER + 1
PRIMARY = {"uuid": "cd" * 16, "site": "/srv/primary"}


class Receiving:
    """The control port's view of a secondary whose receiver is real. `gate`: an event the
    first upload waits for; `handled`: how many uploads reached the receiver."""

    def __init__(self, receiver: Receiver):
        self.secondary = self
        self.receiver = receiver
        self.lock = trio.Lock()
        self.handled = 0
        self.gate: trio.Event | None = None

    async def _run(self, fn, body):
        if self.gate is not None:
            await self.gate.wait()
        async with self.lock:
            self.handled += 1
            return await trio.to_thread.run_sync(fn, body)

    async def chunk(self, body):
        return await self._run(self.receiver.receive_chunk, body)

    async def copy(self, body):
        return await self._run(self.receiver.receive_copy, body)

    async def commit(self, args):
        header = bytes.fromhex(args["header"])
        async with self.lock:
            return await trio.to_thread.run_sync(self.receiver.commit, header, args)

    async def start_playback(self, after, generation, blocks):
        async with self.lock:
            await trio.to_thread.run_sync(self.receiver.start_playback, after, generation,
                                          blocks)
        return self.receiver.info()

    def info(self):
        return self.receiver.info()


class Peer:
    """What ReceiverClient needs of a target site: its directory (with control.token) and
    its control address."""

    def __init__(self, path: Path, port: int, token: str = TOKEN):
        self.path = path
        self.port = port
        path.mkdir(exist_ok=True)
        (path / "control.token").write_text(token + "\n")

    def control_address(self):
        return "127.0.0.1", self.port


class CutAfter(trio.abc.Stream):
    """A server-side stream that breaks (as a reset connection does) once it has received
    `limit` bytes: the peer's requests stop being read in the middle of one."""

    def __init__(self, stream, limit: int):
        self.stream, self.left = stream, limit

    async def receive_some(self, max_bytes=None):
        if self.left <= 0:
            await trio.aclose_forcefully(self.stream)
            raise trio.BrokenResourceError("cut by the test")
        data = await self.stream.receive_some(min(max_bytes or 65536, self.left))
        self.left -= len(data)
        return data

    async def send_all(self, data):
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self):
        await self.stream.aclose()


@pytest.fixture
def receiver(tmp_path):
    env = lmdb.open(str(tmp_path / "meta.lmdb"), map_size=1 << 30, max_dbs=32)
    r = Receiver(env, tmp_path, NBLOCKS)
    r.attach(PRIMARY, GEN)
    yield r
    env.close()


def replicating(r: Receiver) -> Receiver:
    r.start_playback(AFTER, GEN, 0)
    r.play(r.next_to_play(), MemDev(NBLOCKS))
    return r


@asynccontextmanager
async def served(tmp_path, service, *, cut_first: int | None = None, **server_kw):
    """A control server on a loopback port for `service`; yields the Peer to give a
    ReceiverClient. `cut_first`: the first connection breaks after that many bytes."""
    server = ControlServer(service, TOKEN, **server_kw)
    cuts = [cut_first] if cut_first is not None else []

    async def handle(stream):
        if cuts:
            stream = CutAfter(stream, cuts.pop())
        await server.handle(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as n:
        await n.start(trio.serve_listeners, handle, listeners)
        yield Peer(tmp_path / "peer", port)
        n.cancel_scope.cancel()


def chunks_of(n: int, count: int, blocks: int = 2, *, first_block: int = 0) -> list[bytes]:
    """`count` encoded chunks of delta set n, `blocks` distinct blocks each."""
    out = []
    for i in range(count):
        start = first_block + i * blocks
        data = bytes([i % 251 + 1]) * (blocks * BS)
        out.append(encode_chunk(GEN, n, i, [(start, blocks)], data))
    return out


def header_of(n: int, raws: list[bytes], blocks: int) -> bytes:
    sums = [encoded_checksum(r) for r in raws]
    return encode_set_header(SetHeader(GEN, n, len(raws), blocks, data_checksum(sums)))


def flip(raw: bytes, pos: int = -1) -> bytes:
    b = bytearray(raw)
    b[pos] ^= 0x40
    return bytes(b)


async def in_thread(fn, *args, **kw):
    with trio.fail_after(30):  # a hang fails the test
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


# ----------------------------------------------------------------------------- the tests

async def test_pipelined_chunks_arrive_in_order_and_are_acknowledged(tmp_path, receiver):
    """A window of requests is in flight (the first chunk is held at the server until the
    client has asked its iterator for the window's last one: a stop-and-wait client would
    hang here), no more than the window, and every chunk lands in order: the receiver takes
    the delta-set header that checks them all."""
    replicating(receiver)
    svc = Receiving(receiver)
    svc.gate = trio.Event()
    raws = chunks_of(AFTER + 1, 40)
    window = 6
    asked = []
    token = trio.lowlevel.current_trio_token()

    def lazily():
        for j, raw in enumerate(raws):
            asked.append((j, svc.handled))
            if j == window - 1:
                trio.from_thread.run_sync(svc.gate.set, trio_token=token)
            yield raw

    async with served(tmp_path, svc) as peer:
        client = ReceiverClient(peer)
        assert await in_thread(client.send_chunks, lazily(), window=window) == 40
        # body j is taken only once the answer to body j - window came back
        assert all(handled >= j - window + 1 for j, handled in asked), asked
        assert asked[window - 1][1] == 0  # a window taken before the first chunk was handled
        assert receiver.partial["n"] == AFTER + 1 and len(receiver.partial["checksums"]) == 40
        ack = await in_thread(client.commit, header_of(AFTER + 1, raws, 80), {})
        assert ack["acked"] == AFTER + 1
        # the same (kept-alive) connection serves the other calls
        assert (await in_thread(client.info))["last_received"] == AFTER + 1
        client.close()


async def test_window_of_one_is_stop_and_wait(tmp_path, receiver):
    replicating(receiver)
    svc = Receiving(receiver)
    raws = chunks_of(AFTER + 1, 12)
    asked = []

    def lazily():
        for j, raw in enumerate(raws):
            asked.append(svc.handled)
            yield raw

    async with served(tmp_path, svc) as peer:
        client = ReceiverClient(peer)
        assert await in_thread(client.send_chunks, lazily(), window=1) == 12
        assert asked == list(range(12))  # each taken after the one before was answered
        assert await in_thread(client.send_chunks, iter([])) == 0
        client.close()


async def test_a_rejected_chunk_stops_the_window_and_is_named(tmp_path, receiver):
    """Chunk 7 of 20 is damaged: RejectedError names it, the chunks pipelined behind it are
    not applied (none reaches the receiver), and sending again from it completes the set."""
    replicating(receiver)
    svc = Receiving(receiver)
    raws = chunks_of(AFTER + 1, 20)
    sent = list(raws)
    sent[7] = flip(raws[7])
    async with served(tmp_path, svc) as peer:
        client = ReceiverClient(peer)
        with pytest.raises(RejectedError) as e:
            await in_thread(client.send_chunks, iter(sent), window=8)
        assert e.value.index == 7 and "chunk 7 of this send" in str(e.value)
        assert "rejected" in str(e.value)
        assert len(receiver.partial["checksums"]) == 7
        assert svc.handled == 8  # 8..14 were in flight: refused without reaching it
        assert await in_thread(client.send_chunks, iter(raws[7:])) == 13
        ack = await in_thread(client.commit, header_of(AFTER + 1, raws, 40), {})
        assert ack["acked"] == AFTER + 1
        client.close()


async def test_a_failed_copy_record_leaves_no_hole(tmp_path, receiver):
    """Initial-copy records accept any later block, so a record pipelined behind a failed
    one would leave a hole: the control port refuses them, and the copy resumes whole."""
    svc = Receiving(receiver)
    pieces = [(GEN, 100 * i, bytes([i + 1]) * (3 * BS)) for i in range(10)]
    async with served(tmp_path, svc) as peer:
        client = ReceiverClient(peer)
        bad = [*pieces[:4], (GEN + 1, *pieces[4][1:]), *pieces[5:]]  # of another generation
        with pytest.raises(TransportError) as e:
            await in_thread(client.send_copies, iter(bad), window=4)
        assert e.value.index == 4 and "copy record 4 of this send" in str(e.value)
        assert receiver.copy["check"].next == 303 and receiver.copy["chunks"] == 4
        assert await in_thread(client.send_copies, iter(pieces[4:])) == 6
        assert receiver.copy["check"].blocks == 30
        await in_thread(client.start_playback, AFTER, GEN, 30)
        client.close()


async def test_the_connection_cut_mid_window_is_a_transient_error(tmp_path, receiver):
    """The server's connection breaks in the middle of the 6th chunk: TransientError names
    the oldest chunk not acknowledged, exactly the ones before it are held, and a new
    connection takes the rest."""
    replicating(receiver)
    svc = Receiving(receiver)
    raws = chunks_of(AFTER + 1, 16, blocks=8)
    size = len(raws[0]) + 300  # (about one request: head and body)
    async with served(tmp_path, svc, cut_first=5 * size + size // 2) as peer:
        client = ReceiverClient(peer)
        with pytest.raises(TransientError) as e:
            await in_thread(client.send_chunks, iter(raws), window=8)
        held = len(receiver.partial["checksums"])
        assert 1 <= e.value.index == held <= 5, (e.value, held)
        assert f"chunk {held} of this send" in str(e.value)
        assert await in_thread(client.send_chunks, iter(raws[held:])) == 16 - held
        assert len(receiver.partial["checksums"]) == 16
        client.close()


async def test_refusals_still_work_when_pipelined(tmp_path, receiver):
    """A wrong token is refused before any body is read (nothing reaches the receiver); a
    body over the limit in the middle of a window is refused as itself, after the ones
    before it were taken."""
    replicating(receiver)
    svc = Receiving(receiver)
    raws = chunks_of(AFTER + 1, 8, blocks=256)  # 1 MiB each, as the sender's are
    async with served(tmp_path, svc) as peer:
        wrong = Peer(tmp_path / "wrong", peer.port, token="w" * 43)
        client = ReceiverClient(wrong)
        with pytest.raises(PermanentError) as e:
            await in_thread(client.send_chunks, iter(raws), window=8)
        assert e.value.index == 0 and "unauthorized" in str(e.value)
        assert svc.handled == 0 and receiver.partial is None

        client = ReceiverClient(peer)
        over = [*raws[:3], b"x" * (MAX_BINARY_BODY + 1), *raws[3:]]
        with pytest.raises(TransientError) as e:
            await in_thread(client.send_chunks, iter(over), window=8)
        assert e.value.index == 3 and str(MAX_BINARY_BODY) in str(e.value)
        assert len(receiver.partial["checksums"]) == 3 and svc.handled == 3
        assert await in_thread(client.send_chunks, iter(raws[3:])) == 5
        client.close()


async def test_each_pipelined_request_shows_its_token_before_its_body(tmp_path, receiver):
    """A request pipelined behind an authorized one is judged by its own headers: a wrong
    token gets its 401 although the body it announces never comes."""
    replicating(receiver)
    svc = Receiving(receiver)
    raw = chunks_of(AFTER + 1, 1)[0]

    def head(token: str, length: int) -> bytes:
        return (f"POST /v1/repl/chunk HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
                ).encode()

    async with served(tmp_path, svc) as peer:
        stream = await trio.open_tcp_stream("127.0.0.1", peer.port)
        await stream.send_all(head(TOKEN, len(raw)) + raw + head("w" * 43, 10**9))
        got = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                got += data
        await stream.aclose()
    assert got.startswith(b"HTTP/1.1 200 ") and got.count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 401 " in got and b"unauthorized" in got
    assert svc.handled == 1 and len(receiver.partial["checksums"]) == 1


async def test_an_answer_that_does_not_come_is_a_transient_error(tmp_path, receiver):
    """The secondary takes a window and never answers (its receiver is stuck): each answer
    has its time limit, then TransientError names the first chunk."""
    replicating(receiver)
    svc = Receiving(receiver)
    svc.gate = trio.Event()  # never set: the first chunk never reaches the receiver
    async with served(tmp_path, svc) as peer:
        client = ReceiverClient(peer, timeout=0.2)
        with pytest.raises(TransientError) as e:
            await in_thread(client.send_chunks, iter(chunks_of(AFTER + 1, 6)), window=4)
        assert e.value.index == 0 and "no (whole) answer within 0.2 s" in str(e.value)
        assert client.conn is None and svc.handled == 0
        svc.gate.set()


async def test_what_the_iterator_raises_comes_after_the_acknowledgements(tmp_path, receiver):
    """The caller's iterator fails (its chunk file cannot be read): its own exception comes
    out unchanged, once every chunk taken before it was acknowledged."""
    replicating(receiver)
    svc = Receiving(receiver)
    raws = chunks_of(AFTER + 1, 10)

    def failing():
        yield from raws[:6]
        raise PermanentError("delta set 6 is damaged in this site's chunk area")

    async with served(tmp_path, svc) as peer:
        client = ReceiverClient(peer)
        with pytest.raises(PermanentError) as e:
            await in_thread(client.send_chunks, failing(), window=4)
        assert e.value.index is None and str(e.value).endswith("chunk area")
        assert len(receiver.partial["checksums"]) == 6 and svc.handled == 6
        assert await in_thread(client.send_chunks, iter(raws[6:])) == 4
        client.close()


async def test_a_connection_closed_while_idle_is_replaced(tmp_path, receiver):
    """The daemon closes a kept-alive connection that idles too long: the next send (and
    the next call) goes over a new one, without an error."""
    replicating(receiver)
    svc = Receiving(receiver)
    raws = chunks_of(AFTER + 1, 6)
    async with served(tmp_path, svc, idle_timeout=0.05) as peer:
        client = ReceiverClient(peer)
        assert await in_thread(client.send_chunks, iter(raws[:3]), window=4) == 3
        first = client.conn
        await trio.sleep(0.3)
        assert await in_thread(client.send_chunks, iter(raws[3:]), window=4) == 3
        assert client.conn is not first
        await trio.sleep(0.3)
        assert (await in_thread(client.info))["partial"]["chunks"] == 6
        client.close()


# ----------------------------------------------------------------------------- answers

_ANSWERS = [
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n"
    b'{"ok": true}',
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 27\r\nconnection: close\r\n\r\n"
    b'{"error": "rejected chunk"}',
]


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.sampled_from(_ANSWERS), st.integers(0, 120), st.binary(
                     min_size=1, max_size=4)).map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])))
def test_answers_are_bytes_from_a_peer(raw):
    """Whatever a peer answers, the client returns an answer or raises its own errors: never
    another exception, never a hang."""
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        conn = HTTPConnection("127.0.0.1", lsock.getsockname()[1], TOKEN, timeout=5)
        srv, _ = lsock.accept()
        try:
            conn.send_request("POST", "/v1/repl/chunk", b"x")
            conn.send_request("POST", "/v1/repl/chunk", b"y")
            srv.sendall(raw)
            srv.shutdown(socket.SHUT_WR)
            client = ReceiverClient.__new__(ReceiverClient)
            client.site_path = "peer"
            for _ in range(2):
                try:
                    status, body = conn.read_answer()
                except _Broken:
                    break
                out = client._outcome(status, body)
                assert isinstance(out, TransportError) or status == 200
        finally:
            srv.close()
            conn.close()
    finally:
        lsock.close()


def test_retries_slow_down_when_a_destination_stays_unreachable():
    """The send task's back-off doubles up to 2 s while the failures are new, and up to 30 s
    once a destination has failed for a minute: a site that is gone for good gets a retry
    every 30 s, not every 2 s for ever (issue 9: 'retries continue more slowly')."""
    from repfs.repl.sender import RETRY_FAST, RETRY_SLOW, RETRY_SLOW_AFTER, retry_delay
    seq, b = [], 0.2
    for _ in range(8):
        b = retry_delay(b, 0.0)
        seq.append(b)
    assert seq[:3] == [0.4, 0.8, 1.6] and set(seq[3:]) == {RETRY_FAST}
    for _ in range(8):
        b = retry_delay(b, RETRY_SLOW_AFTER)
    assert b == RETRY_SLOW
    assert retry_delay(0.2, RETRY_SLOW_AFTER + 1) == 0.4  # (a new failure starts fast again)
