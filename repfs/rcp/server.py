"""The secondary's side of RCP: one inbound connection on the site's shared port (FIG. 19).

`ControlServer.handle` reads a connection's first bytes; those that start with the RCP
preface come here (`RcpServer.serve`) with the bytes already read. The connection is counted
and bounded like any control connection: at most the control port's connections at once, the
handshake within its head timeout and at most `MAX_HANDSHAKE` bytes (nothing unauthenticated
is buffered beyond that), then idle at most its idle timeout between requests.

After the handshake (wire.Connection, authenticated by the group's secret from
SITE/groups), each request runs the receiver endpoint of the HTTP route it stands for,
through `ControlServer._dispatch` itself: the same argument checks, the same domain errors and
statuses, which become the ERROR kinds the primary acts on (`kind_of`). Requests are answered
in order; uploads pipelined behind a failed upload are refused, as on HTTP. Delta chunks
that arrived while the ones before them were stored are stored together, in one hand-off to
a worker thread (`_gather`, Secondary.chunks: the chunk route's endpoint, a failure answered
through `_dispatch`), and answered as one by one. A protocol error
is logged (one line: the peer and the reason), answered with an ERROR frame if possible, and
ends the connection; the frame that broke the protocol is never applied.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import select
from types import SimpleNamespace

import trio

from . import wire
from .groups import GroupStore

log = logging.getLogger(__name__)

MAX_HANDSHAKE = 16 << 10  # bytes a peer may send before it has authenticated

# message type -> (method, API path, body kind) of the HTTP route with the same endpoint
ROUTES = {
    "INFO": (b"GET", b"/v1/repl/receiver", None),
    "ATTACH": (b"POST", b"/v1/repl/attach", "json"),
    "COPY": (b"POST", b"/v1/repl/copy", "raw"),
    "START_PLAYBACK": (b"POST", b"/v1/repl/start-playback", "json"),
    "CHUNK": (b"POST", b"/v1/repl/chunk", "raw"),
    "COMMIT": (b"POST", b"/v1/repl/commit", "json"),
}
# CONTROL {op, args}: op -> (method, API path) of the HTTP route that takes args as its JSON
# body (rcp/client.py CONTROL_OP_OF)
CONTROL_ROUTES = {"pull": (b"POST", b"/v1/repl/pull"),  # (recovery/copy.py)
                  "verify": (b"POST", b"/v1/repl/verify"),
                  "failover": (b"POST", b"/v1/repl/failover"),  # (recovery/failover.py)
                  "resync": (b"POST", b"/v1/repl/resync")}  # (recovery/resync.py)
UPLOADS = ("COPY", "CHUNK")
AFTER_FAILED = ("not applied: an earlier upload pipelined on this session failed; send again "
                "from that one")


def kind_of(status: int, message: str) -> str:
    """The ERROR kind of what the HTTP route would answer: "rejected" (send it again), the
    400 that says so; "permanent" (retrying will not change it), 401, 404 and 409; else
    "transient" (the same sorting as repl/transport.error_for)."""
    if status == 400 and ("rejected" in message or "again" in message):
        return "rejected"
    if status in (401, 404, 409):
        return "permanent"
    return "transient"


def insecure_listen_warning(host: str) -> str | None:
    """What a daemon listening on `host` without TLS must say (None on loopback)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"the control and replication port listens on {host or '*'} without TLS: "
            "replication sessions are authenticated (HMAC on the group secret) but not "
            "encrypted; anyone on the path can read the data")


def _secrets(site_path):
    """The handshake's lookup of a group's secret (wire.Connection `secrets`): None for a
    group this site does not hold (refused "auth": permanent at the primary); an error reading
    its secret file refuses the session with kind "transient" (the primary retries), naming
    the error: it is not an unknown group. (serve logs the refusal.)"""
    store = GroupStore(site_path)

    def lookup(group: str) -> bytes | None:
        try:
            return store.secret(group)
        except OSError as e:
            raise wire.ProtocolError(
                f"cannot read the secret of group {wire.one_line(group, 64)!r} at this site: "
                f"{e.strerror or type(e).__name__} (try again later)", "transient") from None
    return lookup


def _features(site) -> tuple[str, ...]:
    """What this site's sessions may agree to (wire.FEATURES), read at each connection as
    the groups are: site.toml [rcp] accept_compression = false declines "zstd" (the session
    then runs uncompressed). A site.toml made bad since the mount (which checked it) agrees
    to nothing, with a WARNING."""
    from ..site import SiteError
    try:
        accept = site.settings().accept_compression
    except SiteError as e:
        log.warning("RCP: %s; sessions run uncompressed until it is fixed", e)
        accept = False
    return tuple(f for f in wire.FEATURES if accept or f != "zstd")


class RcpServer:
    """Serves RCP sessions for a `ControlServer` (its service, limits and dispatch)."""

    def __init__(self, control):
        self.control = control
        self.service = control.service

    async def serve(self, stream, first: bytes) -> None:
        svc = self.service
        peer = _peer_name(stream)
        conn = wire.Connection(
            wire.SERVER, secrets=_secrets(svc.site.path), site=str(svc.site.path),
            uuid=svc.core.sb.uuid.hex(), session=secrets.randbelow((1 << 32) - 1) + 1,
            features=_features(svc.site))
        conn.receive_data(first)
        try:
            await self._session(conn, stream, peer, len(first))
        except wire.ProtocolError as e:
            site = conn.peer.get("site")  # (a claim, and only once the proofs are made)
            who = (f" ({f'site {_short(site)}, ' if site else ''}group "
                   f"{_short(conn.peer.get('group'))})" if conn.peer else "")
            # (the log says what the peer is not told: a group this site does not hold)
            self.control.refused(log, "RCP connection from %s%s refused: %s", peer, who,
                                 e.detail or e)
            if getattr(e, "remote", False):
                return  # (the peer refused first: nothing to send back)
            await self._refuse(stream, conn.take_outgoing() + conn.error_frame(e.kind, str(e)))
        except trio.TooSlowError:
            pass  # the peer does not read its answers
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass  # the peer went away

    async def _refuse(self, stream, frames: bytes) -> None:
        """Send the ERROR that ends a connection, then read and drop what the peer still
        sends for a moment (at most control.LINGER s and LINGER_BYTES: a window of
        pipelined chunks) before it is closed: closing with unread data resets the
        connection, and a primary still sending its window (or a proxy between) would lose
        the ERROR, and with it the reason it logs."""
        from ..control import send_and_linger
        await send_and_linger(stream, frames, self.control.send_timeout)

    async def _session(self, conn, stream, peer: str, got: int) -> None:
        ctl = self.control
        # the handshake: bounded in time (what is left of the connection's deadline before
        # it authenticates: ControlServer.pre_auth_limit) and size
        with trio.move_on_after(ctl.pre_auth_limit()) as slow:
            while conn.state != wire.OPEN:
                event = conn.next_event()
                out = conn.take_outgoing()
                if out:
                    await stream.send_all(out)
                if event is wire.NEED_DATA:
                    if got >= MAX_HANDSHAKE:
                        raise wire.ProtocolError(f"more than {MAX_HANDSHAKE} bytes before "
                                                 "authentication")
                    data = await stream.receive_some(MAX_HANDSHAKE - got)
                    if not data:
                        return  # closed before it authenticated
                    got += len(data)
                    conn.receive_data(data)
                elif event.type == "CLOSE":
                    return
        if slow.cancelled_caught:
            raise wire.ProtocolError(f"no authentication within {ctl.head_timeout:g} s of "
                                     "the connection")
        ctl.authenticated()
        hello = conn.peer
        log.info("RCP session %d from %s: site %s, group %s (protocol version %d%s)",
                 conn.session, peer, _short(hello.get("site")), hello.get("group"),
                 conn.version, ", zstd" if "zstd" in conn.agreed else "")
        upload_failed = False
        sock = getattr(stream, "socket", None)  # (a TCP stream's; not inside TLS)

        async def read(limit: float):
            """Read what the frame being received lacks, within `limit` seconds (a bulk
            frame's body into its own buffer: no copy on its way to the receiver; over TCP a
            header alone first): what was read, b"" at the end of the stream, None when
            `limit` passed."""
            into = conn.receive_buffer() if sock is not None else None
            with trio.move_on_after(limit):
                if into is not None:
                    n = await sock.recv_into(into)
                    conn.received(n)
                    return into[:n]
                data = await stream.receive_some(
                    conn.receive_size(1 << 20, header_first=sock is not None))
                conn.receive_data(data)
                return data
            return None

        held = None  # a frame parsed while a batch of chunks was gathered: handled next
        while True:
            event, held = (held, None) if held is not None else (conn.next_event(), None)
            if event is wire.NEED_DATA:
                # between requests: the idle timeout; within a frame, the body timeout
                limit = ctl.body_timeout if conn.buf else ctl.idle_timeout
                data = await read(limit)
                if data is None:
                    if conn.buf:
                        raise wire.ProtocolError(f"a frame did not arrive within {limit:g} s")
                    log.info("RCP session %d from %s: idle for %g s, closed", conn.session,
                             peer, limit)
                    return
                if not data:
                    if conn.buf:
                        log.warning("RCP session %d from %s: closed within a frame (nothing "
                                    "of it applied)", conn.session, peer)
                    return
                continue
            if event.type == "CLOSE":
                log.info("RCP session %d from %s closed: %s", conn.session, peer,
                         _short(event.body.get("reason")))
                return
            if event.type == "ERROR":  # (a client's complaint; it closes next)
                log.info("RCP session %d from %s: the peer reports %s", conn.session, peer,
                         _short(event.body.get("message")))
                continue
            upload = event.type in UPLOADS
            if event.type == "CHUNK" and not upload_failed and sock is not None:
                # the chunks that arrived meanwhile are stored with it in one hand-off to a
                # worker thread, and answered together (each in order, as one by one)
                batch, held = await _gather(conn, sock, read, event, ctl.body_timeout)
                frames, upload_failed = await self._chunks(conn, peer, batch)
            else:
                if upload and upload_failed:
                    status, message, result = 503, AFTER_FAILED, None
                else:
                    status, message, result = await self._request(event)
                    upload_failed = upload and status != 200
                frames = [_answer(conn, peer, event, status, message, result)]
            with trio.fail_after(ctl.send_timeout):
                await stream.send_all(b"".join(frames))

    async def _chunks(self, conn, peer: str, batch: list) -> tuple[list[bytes], bool]:
        """Store the chunks of `batch` (Secondary.chunks): their answers, and whether one
        failed (it is answered as its HTTP route would answer it, those after it are
        refused unapplied, as uploads pipelined behind a failed one)."""
        out, err = await self.service.secondary.chunks([m.body for m in batch])
        frames = [_answer(conn, peer, m, 200, "", r) for m, r in zip(batch, out)]
        if err is None:
            return frames, False

        async def failed():
            raise err

        req = SimpleNamespace(method=b"POST", target=b"/v1/repl/chunk",
                              headers=[(b"content-type", b"application/octet-stream")])
        status, data = await self.control._dispatch(req, b"", call=failed)
        doc = json.loads(data)
        frames.append(_answer(conn, peer, batch[len(out)], status,
                              str(doc.get("error", f"status {status}")), None))
        frames += [_answer(conn, peer, m, 503, AFTER_FAILED, None)
                   for m in batch[len(out) + 1:]]
        return frames, True

    async def _request(self, msg) -> tuple[int, str, dict | None]:
        """Run one request through the HTTP route of its endpoint: (status, error message,
        result)."""
        route = ROUTES.get(msg.type)
        if msg.type == "CONTROL" and msg.body["op"] in CONTROL_ROUTES:
            route = (*CONTROL_ROUTES[msg.body["op"]], "json")
        if route is None:
            what = (f"CONTROL {_short(msg.body['op'])}" if msg.type == "CONTROL"
                    else msg.type)
            return 409, f"{what} is not served by this build", None
        method, target, body_kind = route
        if msg.type == "CONTROL":
            try:
                body = json.dumps(msg.body["args"]).encode()
            except (TypeError, ValueError) as e:
                return 400, f"bad CONTROL {msg.body['op']} arguments: {e}", None
            ctype = b"application/json"
        elif body_kind == "raw":
            ctype, body = b"application/octet-stream", msg.body
        else:
            doc = dict(msg.body)
            if msg.type == "COMMIT":
                doc["header"] = doc["header"].hex()
            try:
                body = json.dumps(doc).encode() if body_kind else b""
            except (TypeError, ValueError) as e:
                return 400, f"bad {msg.type} body: {e}", None
            ctype = b"application/json"
        req = SimpleNamespace(method=method, target=target,
                              headers=[(b"content-type", ctype)])
        status, data = await self.control._dispatch(req, body)
        doc = json.loads(data)
        if status != 200:
            return status, str(doc.get("error", f"status {status}")), None
        return 200, "", doc if isinstance(doc, dict) else {"value": doc}


MAX_BATCH = 16  # chunks stored in one hand-off to a worker thread
MAX_BATCH_BYTES = 8 << 20  # and their bodies' bytes: what a session holds in a batch


async def _gather(conn, sock, read, first, limit: float) -> tuple[list, object]:
    """`first` (a CHUNK) and the CHUNKs after it that are already here (received, or in the
    socket's buffer: never waits for the peer to send more), up to MAX_BATCH chunks and
    MAX_BATCH_BYTES of bodies (`first` alone may be larger; a chunk that would pass the
    bound starts the next batch); and the frame after them if it is another one, or that
    chunk (else None). A protocol error stops the gathering: the chunks before it are
    answered, then `next_event` raises it again."""
    batch = [first]
    size = len(first.body)
    while len(batch) < MAX_BATCH:
        try:
            event = conn.next_event()
        except wire.ProtocolError:
            break
        if event is wire.NEED_DATA:
            if not _readable(sock) or not await read(limit):
                break  # (nothing more yet; the end of the stream is seen again after)
            continue
        if event.type != "CHUNK" or size + len(event.body) > MAX_BATCH_BYTES:
            return batch, event
        batch.append(event)
        size += len(event.body)
    return batch, None


def _readable(sock) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _answer(conn, peer: str, event, status: int, message: str, result) -> bytes:
    """The ACK or ERROR frame answering request `event`; nothing once the session has
    closed (a protocol error stopped `_gather` after the chunks before it: they are stored,
    idempotently, and the next `next_event` raises the error, answered and logged as every
    protocol error is; review of 75d024f: the ACK raised and a traceback was logged)."""
    if conn.state != wire.OPEN:
        return b""
    if status == 200:
        return conn.send("ACK", {"seq": event.seq, "result": result})
    kind = kind_of(status, message)
    if kind == "permanent":  # (the primary stops: say why here too)
        log.info("RCP session %d from %s: %s refused: %s", conn.session, peer, event.type,
                 _short(message))
    return conn.send("ERROR", {"seq": event.seq, "kind": kind, "message": message[:1000]})


def _peer_name(stream) -> str:
    stream = getattr(stream, "transport_stream", stream)  # (inside TLS: the TCP stream)
    try:
        addr = stream.socket.getpeername()
        return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
    except (AttributeError, OSError, IndexError, TypeError):
        return "an unknown peer"


def _short(v) -> str:
    """A peer's name for a log line (one line: anything unprintable as its repr)."""
    r = v if isinstance(v, str) and v.isprintable() else repr(v)
    return r if len(r) <= 200 else r[:197] + "..."
