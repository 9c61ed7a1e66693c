"""Tier 1: what a peer that has not authenticated can make the shared port do (issue 9 review).

Unauthenticated peers get little: no body is read for them (an open `GET /metrics` takes
none), they have one deadline from accept to their first authenticated request or RCP READY,
and they have a cap of their own, below the port's, so that strangers cannot hold every slot
while an authenticated peer is turned away. A real `ControlServer` on a fake site
(tests/t1_control.py), over in-memory streams on trio's mock clock or over loopback.
"""

from __future__ import annotations

import trio

from repfs.control import ControlServer
from tests.t1_control import TOKEN, FakeSite, exchange, one_reply, request, run


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
