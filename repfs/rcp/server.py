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
in order; uploads pipelined behind a failed upload are refused, as on HTTP. A protocol error
is logged (one line: the peer and the reason), answered with an ERROR frame if possible, and
ends the connection; the frame that broke the protocol is never applied.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
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
CONTROL_ROUTES = {"verify": (b"POST", b"/v1/repl/verify")}
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
            uuid=svc.core.sb.uuid.hex(), session=secrets.randbelow((1 << 32) - 1) + 1)
        conn.receive_data(first)
        try:
            await self._session(conn, stream, peer, len(first))
        except wire.ProtocolError as e:
            who = (f" (site {_short(conn.peer.get('site'))}, group "
                   f"{_short(conn.peer.get('group'))})" if conn.peer else "")
            log.warning("RCP connection from %s%s refused: %s", peer, who, e)
            if getattr(e, "remote", False):
                return  # (the peer refused first: nothing to send back)
            with trio.move_on_after(min(self.control.send_timeout, 2.0)):
                try:
                    await stream.send_all(conn.take_outgoing()
                                          + conn.error_frame(e.kind, str(e)))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        except trio.TooSlowError:
            pass  # the peer does not read its answers
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass  # the peer went away

    async def _session(self, conn, stream, peer: str, got: int) -> None:
        ctl = self.control
        # the handshake: bounded in time and size
        with trio.move_on_after(ctl.head_timeout) as slow:
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
            raise wire.ProtocolError(f"no authentication within {ctl.head_timeout:g} s")
        hello = conn.peer
        log.info("RCP session %d from %s: site %s, group %s (protocol version %d%s)",
                 conn.session, peer, _short(hello.get("site")), hello.get("group"),
                 conn.version, ", zstd" if "zstd" in conn.agreed else "")
        upload_failed = False
        sock = getattr(stream, "socket", None)  # (a TCP stream's; not inside TLS)
        while True:
            event = conn.next_event()
            if event is wire.NEED_DATA:
                # between requests: the idle timeout; within a frame, the body timeout
                limit = ctl.body_timeout if conn.buf else ctl.idle_timeout
                # a bulk frame's body is read into its own buffer (no copy on its way to the
                # receiver); else what the frame lacks (a header alone first, over TCP)
                into = conn.receive_buffer() if sock is not None else None
                with trio.move_on_after(limit) as idle:
                    if into is not None:
                        data = into[:await sock.recv_into(into)]
                    else:
                        data = await stream.receive_some(
                            conn.receive_size(1 << 20, header_first=sock is not None))
                if idle.cancelled_caught:
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
                if into is not None:
                    conn.received(len(data))
                else:
                    conn.receive_data(data)
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
            if upload and upload_failed:
                status, message, result = 503, AFTER_FAILED, None
            else:
                status, message, result = await self._request(event)
                upload_failed = upload and status != 200
            if status == 200:
                frame = conn.send("ACK", {"seq": event.seq, "result": result})
            else:
                kind = kind_of(status, message)
                if kind == "permanent":  # (the primary stops: say why here too)
                    log.info("RCP session %d from %s: %s refused: %s", conn.session, peer,
                             event.type, _short(message))
                frame = conn.send("ERROR", {"seq": event.seq, "kind": kind,
                                            "message": message[:1000]})
            with trio.fail_after(ctl.send_timeout):
                await stream.send_all(frame)

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
