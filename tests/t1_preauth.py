"""Tier 1: what a peer that has not authenticated can make the shared port do (issue 9 review).

Unauthenticated peers get little: no body is read for them (an open `GET /metrics` takes
none), they have one deadline from accept to their first authenticated request or RCP READY,
and they have a cap of their own, below the port's, so that strangers cannot hold every slot
while an authenticated peer is turned away. A real `ControlServer` on a fake site
(tests/t1_control.py), over in-memory streams on trio's mock clock or over loopback.
"""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace

import trio

from repfs.control import MAX_UNAUTHENTICATED, REFUSALS_LOGGED, ControlServer, RefusalLog
from repfs.rcp import wire
from repfs.site import Site
from tests.t1_control import (TOKEN, FakeSite, exchange, one_reply, request, run,
                               status_request)


def test_an_open_metrics_port_reads_no_unauthenticated_body():
    """With `[metrics] open = true`, only GET /metrics goes without the token: a POST (or a
    GET with a body) is refused from its headers, before a byte of its body is read (none
    ever comes here: the 401 comes at once, not after the body timeout)."""
    async def body():
        site = FakeSite()
        server = ControlServer(site, TOKEN, metrics_open=True)
        for method in ("POST", "GET"):
            head = (f"{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n"
                    f"\r\n").encode()
            t0 = trio.current_time()
            status, doc = one_reply(await exchange(server, head, b"x", eof=False))
            assert status == 401 and "unauthorized" in doc["error"], (method, doc)
            assert trio.current_time() - t0 < server.head_timeout  # (virtual time)
        chunked = b"POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert one_reply(await exchange(server, chunked, eof=False))[0] == 401
        # with the token, a POST is the route's own refusal (405), as before
        status, doc = one_reply(await exchange(server, request("POST", "/metrics", b"{}")))
        assert status == 405 and "GET" in doc["error"]
        assert site.calls == []
    run(body)


class Timed:
    """A ControlServer's `handle` that notes how long (virtual time) it served: `took`."""

    def __init__(self, server: ControlServer):
        self.server = server
        self.took = None

    async def handle(self, stream):
        t0 = trio.current_time()
        await self.server.handle(stream)
        self.took = trio.current_time() - t0


def test_one_deadline_from_accept_to_authentication(caplog):
    """The stages before authentication share one deadline (head_timeout from accept): a
    peer that waits most of it before its first bytes does not get a fresh one for its
    request head or its RCP handshake (each stage had its own: 20-40 s per stranger)."""
    async def body():
        site = FakeSite()
        # (what an RCP session names, and its settings: the defaults, as a site without
        # a site.toml has them)
        site.site = SimpleNamespace(path="/nowhere", settings=Site("/nowhere").settings)
        site.core = SimpleNamespace(sb=SimpleNamespace(uuid=b"\x01" * 16))
        server = ControlServer(site, TOKEN)
        ht = server.head_timeout
        # HTTP: the first byte at 0.6 of it, the rest of the head dripping after
        timed = Timed(server)
        head = request("GET", "/v1/status")
        status, doc = one_reply(await exchange(timed, b"", head[:1], head[1:20], head[20:],
                                               pause=0.6 * ht, eof=False))
        assert status == 408 and "headers" in doc["error"]
        # (virtual time, the mock clock: 408 at 1.0, then LINGER; without the one deadline
        # the head had its own from its first byte: 1.6, then LINGER)
        assert timed.took < 1.5 * ht
        # RCP: the preface at 0.9 of it, then no HELLO
        await exchange(timed, b"", wire.PREFACE, pause=0.9 * ht, eof=False)
        assert timed.took < 1.5 * ht  # (refused at 1.0; else 1.9)
        # an authenticated connection is no longer bound by it (it may idle, as before)
        got = await exchange(server, request("GET", "/v1/status"), request("GET", "/v1/status"),
                             pause=3 * ht, eof=False)
        assert got.count(b"HTTP/1.1 200") == 2
        assert not server.pending
    run(body)
    assert any("no authentication within" in r.getMessage() for r in caplog.records)
    caplog.clear()  # (that refusal's WARNING was expected; conftest refuses others)


def test_strangers_cannot_hold_the_slots_of_authenticated_peers(caplog):
    """More silent connections than may be unauthenticated at once: each new one closes the
    oldest, so they never fill the port, and an authenticated request is still served
    (without the cap, the silent ones took every slot and it got a 503)."""
    async def body():
        server = ControlServer(FakeSite(), TOKEN, max_connections=MAX_UNAUTHENTICATED + 4)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        port = sock.getsockname()[1]
        async with trio.open_nursery() as n:
            await n.start(server.serve, sock)
            extra = 8
            silent = [await trio.open_tcp_stream("127.0.0.1", port)
                      for _ in range(MAX_UNAUTHENTICATED + extra)]
            while server.evicted < extra:  # (all accepted: the oldest were closed)
                await trio.sleep(0.01)
            assert len(server.pending) == MAX_UNAUTHENTICATED
            assert server.active <= MAX_UNAUTHENTICATED + 1
            assert await status_request(port) == 200
            for c in silent:
                await c.aclose()
            n.cancel_scope.cancel()
    trio.run(body)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines and all("have not authenticated" in m for m in lines), lines
    caplog.clear()  # (expected: conftest refuses unexpected WARNING records)


def test_refusals_are_logged_at_most_so_many_a_minute(caplog):
    """A flood of refusals: REFUSALS_LOGGED lines a minute, then one line with the count."""
    async def body():
        logger = logging.getLogger("repfs.test.refusals")
        refusals = RefusalLog()
        for i in range(REFUSALS_LOGGED + 30):
            refusals.warning(logger, "refused %d", i)
        assert len(caplog.records) == REFUSALS_LOGGED
        await trio.sleep(61)
        refusals.warning(logger, "refused again")
        assert [r.getMessage() for r in caplog.records[REFUSALS_LOGGED:]] == [
            f"30 more refused connections in the last 61 s were not logged (at most "
            f"{REFUSALS_LOGGED} lines a minute)", "refused again"]
    run(body)
    caplog.clear()  # (expected)
