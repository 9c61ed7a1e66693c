"""Tier 1: the control port's HTTP server, in process, against arbitrary and hostile input.

A real `ControlServer` serves each request over an in-memory stream (or, for the connection
limit, over loopback sockets) on trio's mock clock, so its timeouts run in virtual time and
a hang shows up as a timeout of the test, not as a slow suite. Behind it sits a fake site
service that records every call and checks that each argument arrived type- and
range-checked; an argument that slips through unchecked makes the fake raise, which the
server turns into a 500, which the tests refuse.

What must hold for every input: the peer gets a JSON reply (2xx, or a 4xx naming the
problem; never silence, never a dropped connection, never a 500 for bad input), and a
request without the token reaches no verb at all.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import socket

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from repfs.control import (
    BODY_TIMEOUT, HEAD_TIMEOUT, IDLE_TIMEOUT, MAX_BINARY_BODY, MAX_JSON_BODY, STATUS_OF_KIND,
    U64_MAX, ControlServer,
)
from repfs.errors import KINDS
from repfs.repl.receiver import ReceiveError
from repfs.snap.store import SnapError, valid_name

TOKEN = "t" * 43
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- the fake site

def _path_ok(p) -> bool:
    return isinstance(p, str) and p.startswith("/") and "\0" not in p and len(p.encode()) <= 4096


def _lookup_ok(n) -> bool:
    return isinstance(n, str) and 0 < len(n) <= 200 and "\0" not in n


def _num_ok(v) -> bool:
    return v is None or (type(v) in (int, float) and math.isfinite(v) and v >= 0)


class _Either(dict):
    """A reply that works whether the control port awaits the verb or calls it plainly (the
    receiver verbs are becoming async)."""

    def __await__(self):
        return self
        yield  # noqa: unreachable - makes this a generator


class _Part:
    def __init__(self, calls: list, name: str):
        self._calls, self._name = calls, name

    def _call(self, verb: str, ok: bool, *args):
        assert ok, f"{self._name}.{verb} got unchecked arguments {args!r}"
        self._calls.append((f"{self._name}.{verb}", args))
        return {"ok": verb}


class Snapshots(_Part):
    def list(self):
        return [self._call("list", True)]

    async def create(self, name, attrs):
        return self._call("create", valid_name(name) and isinstance(attrs, dict)
                          and all(isinstance(k, str) for k in attrs), name, attrs)

    async def delete(self, name):
        return self._call("delete", _lookup_ok(name), name)

    async def restore(self, name):
        return self._call("restore", _lookup_ok(name), name)

    async def diff(self, older, younger, *, paths):
        return self._call("diff", _lookup_ok(older) and (younger is None or _lookup_ok(younger))
                          and isinstance(paths, bool), older, younger, paths)


class Mounts(_Part):
    async def mount(self, name, mountpoint):
        return self._call("mount", _lookup_ok(name) and _path_ok(mountpoint), name, mountpoint)


class Replicate(_Part):
    async def start(self, to, *, force, name, group=None):
        remote = isinstance(to, str) and not to.startswith("/") and to.isprintable()
        return self._call("start", (_path_ok(to) or remote) and isinstance(force, bool)
                          and (name is None or valid_name("repl-init-" + name))
                          and (group is None or isinstance(group, str)), to, force, name)

    async def stop(self, to):
        return self._call("stop", to is None or _lookup_ok(to), to)

    async def policy(self, changes):
        nums = ("timeout", "hwm", "playback_timeout", "playback_hwm", "retention", "bwlimit")
        return self._call("policy", set(changes) == {*nums, "to", "compress"}
                          and all(_num_ok(changes[k]) for k in nums)
                          and all(type(changes[k]) in (int, type(None))
                                  for k in ("hwm", "playback_hwm", "bwlimit"))
                          and (changes["to"] is None or _lookup_ok(changes["to"]))
                          and changes["compress"] in (True, False, None), changes)

    async def deltaset(self, *, wait):
        return self._call("deltaset", isinstance(wait, bool), wait)


class Secondary(_Part):
    def info(self):
        return self._call("info", True)

    async def attach(self, primary, generation, *more):  # (more: volume size, force)
        return self._call("attach", isinstance(primary, dict) and type(generation) is int
                          and 0 <= generation <= U64_MAX
                          and all(type(x) in (int, bool) for x in more), primary, generation)

    async def copy(self, body):
        return self._call("copy", isinstance(body, (bytes, memoryview))  # (uploads: memoryview)
                          and len(body) <= MAX_BINARY_BODY,
                          len(body))

    async def start_playback(self, after, *more):  # (more: generation, blocks)
        return self._call("start_playback", type(after) is int and 0 <= after <= U64_MAX
                          and all(type(x) is int and x >= 0 for x in more), after)

    def chunk(self, body):
        return _Either(self._call("chunk", isinstance(body, (bytes, memoryview))
                                  and len(body) <= MAX_BINARY_BODY, len(body)))

    def commit(self, args):
        return _Either(self._call("commit", isinstance(args.get("header"), str),
                                  args.get("header")))


def _uint_ok(v) -> bool:
    return type(v) is int and 0 <= v <= U64_MAX


class SecondaryVerify(_Part):
    async def request(self, step, gen, *, at=None, ranges=None, inodes=None):
        return self._call("request", step in ("hold", "hashes", "release", "invalidate")
                          and _uint_ok(gen) and (at is None or _uint_ok(at))
                          and (ranges is None or all(map(_uint_ok, sum(ranges, ()))))
                          and (inodes is None or all(map(_uint_ok, inodes))), step)


class Verifier(_Part):
    async def run(self, to, *, repair, wait):
        return self._call("run", isinstance(to, str) and isinstance(repair, bool)
                          and _num_ok(wait) and wait is not None, to, repair, wait)


class FakeSite:
    """The control port's view of a site: records calls, checks what it is handed."""

    def __init__(self):
        self.calls: list = []
        self.snapshots = Snapshots(self.calls, "snapshots")
        self.mounts = Mounts(self.calls, "mounts")
        self.replicate = Replicate(self.calls, "replicate")
        self.secondary = Secondary(self.calls, "secondary")
        self.secondary.verify = SecondaryVerify(self.calls, "secondary.verify")
        self.verifier = Verifier(self.calls, "verifier")
        self.fail: BaseException | None = None
        self.result = None

    def status(self):
        if self.fail is not None:
            raise self.fail
        self.calls.append(("status", ()))
        return {"state": "mounted"} if self.result is None else self.result


# ----------------------------------------------------------------------------- plumbing

def run(fn, *args, **kw):
    """Run an async test body on the mock clock (timeouts pass in virtual time)."""
    return trio.run(functools.partial(fn, *args, **kw),
                    clock=trio.testing.MockClock(autojump_threshold=0))


async def exchange(server: ControlServer, *pieces: bytes, pause: float = 0,
                   eof: bool = True) -> bytes:
    """Send pieces to a fresh connection (pause virtual seconds between them), optionally end
    the stream, and return everything the server sent until it closed."""
    client, srv = trio.testing.memory_stream_pair()
    out = bytearray()
    with trio.fail_after(10 * IDLE_TIMEOUT):  # a hang fails the test (in virtual time)
        async with trio.open_nursery() as n:
            n.start_soon(server.handle, srv)
            for i, p in enumerate(pieces):
                if i and pause:
                    await trio.sleep(pause)
                try:
                    await client.send_all(p)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
            if eof:
                await client.send_eof()
            while chunk := await client.receive_some(1 << 20):
                out += chunk
    return bytes(out)


async def status_request(port: int) -> int:
    """An authenticated GET /v1/status on a new connection to a serving ControlServer: its
    reply's status."""
    s = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await s.send_all(request("GET", "/v1/status", extra="Connection: close\r\n"))
        raw = b""
        while chunk := await s.receive_some(65536):
            raw += chunk
    finally:
        await s.aclose()
    return one_reply(raw)[0]


def replies(raw: bytes) -> list[tuple[int, dict]]:
    """Split a server's output into (status, JSON document) pairs; fail on anything else."""
    out = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"a reply without the end of its headers: {head[:200]!r}"
        lines = head.decode("ascii").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers = dict(ln.lower().split(": ", 1) for ln in lines[1:])
        assert headers["content-type"] == "application/json"
        n = int(headers["content-length"])
        body, raw = raw[:n], raw[n:]
        assert len(body) == n
        out.append((int(status), json.loads(body)))
    return out


def one_reply(raw: bytes) -> tuple[int, dict]:
    got = replies(raw)
    assert len(got) == 1, got
    return got[0]


def request(method: str, target: str, body: bytes = b"", *, auth: bool = True,
            ctype: str = "application/json", extra: str = "") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n"
    if body or method == "POST":
        head += f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + (AUTH if auth else b"") + extra.encode() + b"\r\n" + body


def post(target: str, doc, **kw) -> bytes:
    return request("POST", target, json.dumps(doc).encode(), **kw)


def ask(*reqs: bytes, site: FakeSite | None = None, **kw) -> list[tuple[int, dict]]:
    site = site or FakeSite()
    return replies(run(exchange, ControlServer(site, TOKEN), *reqs, **kw))


# ----------------------------------------------------------------------------- fuzzing

TEMPLATES = [
    request("GET", "/v1/status"),
    request("GET", "/v1/snapshots"),
    post("/v1/snapshots", {"name": "s1", "attrs": {"k": "v"}}),
    request("DELETE", "/v1/snapshots/s1"),
    request("POST", "/v1/snapshots/s1/restore"),
    post("/v1/snapshots/s1/mount", {"mountpoint": "/mnt/x"}),
    request("GET", "/v1/snapshots/s1/diff?to=live&paths=0"),
    post("/v1/replicate/start", {"to": "/srv/b", "force": False, "name": "b"}),
    post("/v1/replicate/stop", {"to": "b"}),
    post("/v1/replicate/policy", {"timeout": 2.5, "hwm": 1 << 20, "retention": 3600}),
    post("/v1/replicate/deltaset", {"wait": False}),
    request("GET", "/v1/repl/receiver"),
    post("/v1/repl/attach", {"primary": {"uuid": "ab", "site": "/a"}, "generation": 3}),
    request("POST", "/v1/repl/chunk", b"\x01" * 100, ctype="application/octet-stream"),
    request("POST", "/v1/repl/copy", b"\x02" * 100, ctype="application/octet-stream"),
    post("/v1/repl/start-playback", {"after": 7}),
    post("/v1/repl/commit", {"header": "00ff", "cut_ns": 1}),
    post("/v1/verify", {"to": "b", "repair": True, "wait": 5}),
    post("/v1/repl/verify", {"step": "hashes", "at": 3, "generation": 1,
                             "ranges": [[0, 64], [64, 64]]}),
]


@st.composite
def mutated(draw) -> bytes:
    """A valid request with a few random edits: flipped, inserted, deleted or repeated bytes."""
    data = bytearray(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "truncate"]))
        i = draw(st.integers(0, len(data)))
        if op == "flip" and i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[i:i] = draw(st.sampled_from([b"\r\n", b":", b" ", b"\x00", b"\xff", b"%",
                                              b"9" * 30, b"\r\nContent-Length: 5",
                                              b"\r\nTransfer-Encoding: chunked"]))
        elif op == "delete":
            del data[i: i + draw(st.integers(1, 20))]
        elif op == "repeat":
            data[i:i] = data[i: i + draw(st.integers(1, 200))]
        elif op == "truncate":
            del data[i:]
    return bytes(data)


@FUZZ
@given(st.binary(min_size=1, max_size=3000))
def test_random_bytes_get_a_4xx_and_reach_nothing(data):
    site = FakeSite()
    status, doc = one_reply(run(exchange, ControlServer(site, TOKEN), data))
    assert status in (400, 401, 405, 408, 413, 431) and doc["error"], (status, doc)
    assert site.calls == []


@FUZZ
@given(mutated())
def test_mutated_requests_get_a_json_reply_never_a_500(data):
    assume(data)  # (an empty connection gets no reply: there is nothing to answer)
    site = FakeSite()
    raw = run(exchange, ControlServer(site, TOKEN), data)
    got = replies(raw)
    assert len(got) >= 1, f"silence for {data[:200]!r}"
    for status, doc in got:
        assert status == 200 or (400 <= status < 500 and doc["error"]), (status, doc)
    assert len(site.calls) <= sum(s == 200 for s, _ in got)


@FUZZ
@given(st.sampled_from(TEMPLATES), st.binary(max_size=200))
def test_requests_without_the_token_reach_nothing(template, junk):
    data = template.replace(AUTH, b"") + junk
    site = FakeSite()
    status, doc = replies(run(exchange, ControlServer(site, TOKEN), data))[0]
    assert status in (400, 401, 405) and doc["error"]
    assert site.calls == []


JSON_ROUTES = ["/v1/snapshots", "/v1/snapshots/s/mount", "/v1/replicate/start",
               "/v1/replicate/stop", "/v1/replicate/policy", "/v1/replicate/deltaset",
               "/v1/repl/attach", "/v1/repl/start-playback", "/v1/repl/commit",
               "/v1/verify", "/v1/repl/verify"]
KEYS = ["name", "attrs", "mountpoint", "to", "force", "timeout", "hwm", "playback_timeout",
        "playback_hwm", "retention", "wait", "primary", "generation", "after", "header",
        "cut_ns", "first_change_ns", "repair", "step", "at", "ranges", "inodes"]
scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=300)
           | st.sampled_from(["/a/b", "s1", "\0", "😀" * 70, "a,b", "", "/" + "x" * 5000]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


@FUZZ
@given(st.sampled_from(JSON_ROUTES), st.dictionaries(st.sampled_from(KEYS), values, max_size=6),
       st.sampled_from([None, "NaN", "Infinity", "-Infinity", "1e400", "9" * 5000]))
def test_json_arguments_are_checked_before_any_verb(route, args, constant):
    body = json.dumps(args, allow_nan=True)
    if constant is not None:
        body = body[:-1] + (", " if args else "") + f'"timeout": {constant}}}'
    status, doc = ask(request("POST", route, body.encode()))[0]
    if constant is not None:
        assert status == 400, doc
    assert status == 200 or (400 <= status < 500 and doc["error"]), (status, doc)


@FUZZ
@given(st.binary(max_size=500))
def test_json_body_bytes(body):
    status, doc = ask(request("POST", "/v1/snapshots", body))[0]
    assert status == 200 or (400 <= status < 500 and doc["error"]), (status, doc)


# ----------------------------------------------------------------------------- specific cases

def test_garbage_gets_a_400_not_silence():
    for garbage in (b"\x00\xff\x16\x03\x01 garbage\r\n\r\n", b"GET\r\n\r\n", b"\r\n",
                    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                    b"hello", bytes(range(256)) * 4):
        site = FakeSite()
        status, doc = one_reply(run(exchange, ControlServer(site, TOKEN), garbage))
        assert status == 400 and "malformed" in doc["error"], (garbage, status, doc)
        assert site.calls == []


def test_token_is_checked_before_the_body_is_read():
    site = FakeSite()
    # headers announce a gigabyte and no byte of it ever comes: the 401 comes anyway
    head = (b"POST /v1/snapshots HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n"
            b"Authorization: Bearer wrong\r\n\r\n")
    status, doc = one_reply(run(exchange, ControlServer(site, TOKEN), head, b"{", eof=False))
    assert status == 401 and "unauthorized" in doc["error"]
    # without any Authorization header, and with a body larger than any limit
    big = request("POST", "/v1/repl/chunk", b"x" * (3 * MAX_BINARY_BODY), auth=False,
                  ctype="application/octet-stream")
    assert one_reply(run(exchange, ControlServer(site, TOKEN), big))[0] == 401
    assert site.calls == []


def test_body_limits_per_route():
    site = FakeSite()
    server = ControlServer(site, TOKEN)
    big = b'{"name": "' + b"x" * MAX_JSON_BODY + b'"}'
    status, doc = one_reply(run(exchange, server, request("POST", "/v1/snapshots", big)))
    assert status == 413 and str(MAX_JSON_BODY) in doc["error"]
    # chunk uploads may be as large as a chunk, not larger
    ok = request("POST", "/v1/repl/chunk", b"c" * MAX_BINARY_BODY, ctype="application/"
                 "octet-stream")
    assert one_reply(run(exchange, server, ok))[0] == 200
    assert site.calls == [("secondary.chunk", (MAX_BINARY_BODY,))]
    over = request("POST", "/v1/repl/copy", b"c" * (MAX_BINARY_BODY + 1),
                   ctype="application/octet-stream")
    assert one_reply(run(exchange, server, over))[0] == 413
    # a chunked body has no Content-Length: it is counted as it comes
    piece = b"%x\r\n%s\r\n" % (40000, b" " * 40000)
    chunked = (b"POST /v1/snapshots HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               + AUTH + b"\r\n" + piece * 3 + b"0\r\n\r\n")
    assert one_reply(run(exchange, server, chunked))[0] == 413
    assert len(site.calls) == 1
    # headers are bounded too
    huge_head = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"a" * 100000 + b"\r\n"
    assert one_reply(run(exchange, server, huge_head))[0] in (400, 431)


def test_slow_and_idle_peers_time_out():
    async def body():
        site = FakeSite()
        server = ControlServer(site, TOKEN)
        # a head that never ends
        t0 = trio.current_time()
        status, doc = one_reply(await exchange(server, b"GET /v1/status HTTP/1.1\r\n",
                                               eof=False))
        assert status == 408 and "headers" in doc["error"]
        assert trio.current_time() - t0 >= HEAD_TIMEOUT
        # slow loris: a byte of header every few seconds never completes the head in time
        drip = [bytes([b]) for b in request("GET", "/v1/status")]
        status, _ = one_reply(await exchange(server, *drip, pause=HEAD_TIMEOUT / 5, eof=False))
        assert status == 408
        # a body that stops half way
        status, doc = one_reply(await exchange(
            server, request("POST", "/v1/snapshots", b'{"name": "s1"}')[:-5], eof=False))
        assert status == 408 and "body" in doc["error"]
        # a connection that never says anything is closed without a word
        t0 = trio.current_time()
        assert await exchange(server, eof=False) == b""
        assert HEAD_TIMEOUT <= trio.current_time() - t0 < IDLE_TIMEOUT
        # after an authenticated request it may idle longer, then it is closed quietly
        t0 = trio.current_time()
        got = replies(await exchange(server, request("GET", "/v1/status"),
                                     request("GET", "/v1/snapshots"), pause=IDLE_TIMEOUT / 2,
                                     eof=False))
        assert [s for s, _ in got] == [200, 200]
        assert trio.current_time() - t0 >= IDLE_TIMEOUT * 1.5
        assert site.calls[0][0] == "status" and site.calls[-1][0] == "snapshots.list"
        assert BODY_TIMEOUT >= HEAD_TIMEOUT
    run(body)


def test_connection_limit():
    """Over the limit, a connection gets a 503 and is closed; below it, service resumes."""
    async def body():
        server = ControlServer(FakeSite(), TOKEN, max_connections=2)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        port = sock.getsockname()[1]
        async with trio.open_nursery() as n:
            await n.start(server.serve, sock)
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            while server.active < 2:
                await trio.sleep(0.01)
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            raw = b""
            while chunk := await extra.receive_some(65536):
                raw += chunk
            status, doc = one_reply(raw)
            assert status == 503 and "too many" in doc["error"]
            await extra.aclose()
            await held.pop().aclose()
            while server.active > 1:
                await trio.sleep(0.01)
            assert await status_request(port) == 200
            for h in held:
                await h.aclose()
            n.cancel_scope.cancel()
    trio.run(body)


def test_an_unexpected_error_is_a_json_500_with_a_log_line(caplog):
    site = FakeSite()
    site.fail = KeyError("boom")
    got = ask(request("GET", "/v1/status"), request("GET", "/v1/snapshots"), site=site)
    assert got[0][0] == 500 and "KeyError" in got[0][1]["error"]
    assert got[1][0] == 200  # the connection goes on
    site.fail, site.result = None, {"not json": b"bytes"}
    assert ask(request("GET", "/v1/status"), site=site)[0][0] == 500
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 2 and all("GET /v1/status" in r.getMessage() for r in logged)
    caplog.clear()  # expected: the autouse check refuses unexpected error records


@pytest.mark.parametrize("kind", KINDS)
def test_domain_error_kinds_map_to_statuses(kind):
    site = FakeSite()
    site.fail = SnapError("no can do", kind)
    status, doc = ask(request("GET", "/v1/status"), site=site)[0]
    assert status == STATUS_OF_KIND[kind] and doc == {"error": "no can do"}
    site.fail = ReceiveError("out of order")
    assert ask(request("GET", "/v1/status"), site=site)[0][0] == 409


def test_arguments_are_type_and_range_checked():
    bad = [
        post("/v1/snapshots", {"name": "😀" * 200}),  # 800 bytes: more than an LMDB key holds
        post("/v1/snapshots", {"name": "a,allow_other"}),
        post("/v1/snapshots", {"name": ""}),
        post("/v1/snapshots", {"name": "s", "attrs": {"k": {"nested": 1}}}),
        post("/v1/snapshots", {"name": "s", "attrs": []}),
        post("/v1/snapshots/s/mount", {"mountpoint": "relative"}),
        post("/v1/snapshots/s/mount", {"mountpoint": "/a\0b"}),
        post("/v1/replicate/start", {"to": "/b", "force": "false"}),
        post("/v1/replicate/start", {"to": "/b", "name": "x" * 195}),
        post("/v1/replicate/start", {"to": "b:7410", "group": 5}),
        post("/v1/replicate/start", {"to": "b:7410\n", "group": "g1"}),
        post("/v1/replicate/policy", {"timeout": -1}),
        post("/v1/replicate/policy", {"timeout": True}),
        post("/v1/replicate/policy", {"hwm": 1.5}),
        post("/v1/replicate/policy", {"retention": 1e300}),
        post("/v1/replicate/deltaset", {"wait": 0}),
        post("/v1/repl/attach", {"primary": {"site": "/a"}, "generation": -1}),
        post("/v1/repl/attach", {"primary": {"site": "/a"}, "generation": 1 << 64}),
        post("/v1/repl/start-playback", {"after": "7"}),
        post("/v1/repl/commit", {"header": 5}),
        request("GET", "/v1/snapshots/s/diff?paths=maybe"),
        request("GET", "/v1/snapshots/%ff/diff"),
        request("POST", "/v1/snapshots", b'{"name": "s", "x": NaN}'),
        request("POST", "/v1/snapshots", b'{"name": "\\ud800"}'),
        request("POST", "/v1/snapshots", b"[" * 40 + b"]" * 40),
        request("POST", "/v1/snapshots", '{"name": "s"}'.encode("utf-16")),
    ]
    site = FakeSite()
    for r in bad:
        status, doc = ask(r, site=site)[0]
        assert status == 400 and doc["error"], (r, status, doc)
    assert site.calls == []
    status, doc = ask(post("/v1/snapshots", {"name": "😀" * 200}))[0]
    assert "255 bytes" in doc["error"]
    ok = [post("/v1/snapshots", {"name": "😀" * 63, "attrs": {"k": 1, "j": "v"}}),
          post("/v1/replicate/policy", {"timeout": 0, "hwm": 4096, "retention": 86400.5}),
          post("/v1/replicate/start", {"to": "/b", "force": True, "name": "x" * 190}),
          post("/v1/replicate/start", {"to": "b:7410", "group": "g1"})]
    for r in ok:
        assert ask(r, site=site)[0][0] == 200
    assert len(site.calls) == 4


def test_methods_and_paths():
    got = ask(request("PUT", "/v1/snapshots"))
    assert got[0][0] == 405
    assert ask(request("HEAD", "/v1/status"))[0][0] == 405
    assert ask(request("GET", "/nowhere"))[0][0] == 404
    assert ask(request("GET", "/v1/nowhere"))[0][0] == 404
    # pipelined requests on one connection are answered in order
    got = ask(request("GET", "/v1/status"), request("GET", "/v1/nowhere"),
              request("GET", "/v1/snapshots"))
    assert [s for s, _ in got] == [200, 404, 200]
