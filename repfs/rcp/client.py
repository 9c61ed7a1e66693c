"""The primary's side of RCP: the receiver calls of repl/transport.py over an RCP session.

`RcpConnection` has the two methods of transport.HTTPConnection that `ReceiverClient` drives
(`send_request`, `read_answer`, with `alive`, `close` and `closing`), so the windowed,
pipelined sends of `ReceiverClient.send_many` serve both transports unchanged: an API path
becomes its message type (`TYPE_OF`), an ACK the 200 with its result, an ERROR the status
whose meaning `transport.error_for` knows ("rejected" 400: send it again; "permanent" 409;
"transient" 503). `RcpReceiverClient` is a `ReceiverClient` whose connection is an
authenticated RCP session to HOST:PORT in a replication group.

Blocking sockets, one thread: the send task's worker thread, as for the local transport.
"""

from __future__ import annotations

import collections
import json
import socket
import ssl
import threading
import time
from pathlib import Path

from ..repl.transport import (TIMEOUT, WINDOW, PermanentError, ReceiverClient,
                              TransientError, _Broken, _describe, open_socket, recv_within,
                              socket_idle)
from . import wire
from .groups import GroupStore
from .tls import TlsError, client_context, site_files
from .tls import reason as tls_reason
from .tls import wrap as tls_wrap

# API path (as ReceiverClient sends it) -> message type; the server maps them back
# (rcp/server.py ROUTES)
TYPE_OF = {"/v1/repl/receiver": "INFO", "/v1/repl/attach": "ATTACH", "/v1/repl/copy": "COPY",
           "/v1/repl/start-playback": "START_PLAYBACK", "/v1/repl/chunk": "CHUNK",
           "/v1/repl/commit": "COMMIT"}
STATUS_OF = {"rejected": 400, "permanent": 409, "transient": 503}
# API path -> the op of the CONTROL message that carries it {op, args: the JSON body}
# (rcp/server.py CONTROL_ROUTES maps it back)
CONTROL_OP_OF = {"/v1/repl/pull": "pull",  # (a copy asks its source: recovery/copy.py)
                 "/v1/repl/verify": "verify", "/v1/repl/failover": "failover",
                 "/v1/repl/resync": "resync"}


# bytes this process has written to RCP sessions, per destination address (HOST:PORT as
# dialled): the frames as sent, headers and control messages included, bulk bodies after
# compression (inside TLS: before TLS's own framing). /metrics shows them beside the
# uncompressed bytes of the destination's record (repfs_destination_wire_bytes_total).
_wire_lock = threading.Lock()
_wire_bytes: dict[str, int] = {}


def wire_bytes(address: str) -> int:
    """What this process has sent to `address` over RCP since it started (`_wire_bytes`)."""
    with _wire_lock:
        return _wire_bytes.get(address, 0)


def _count_wire(address: str, n: int) -> None:
    with _wire_lock:
        _wire_bytes[address] = _wire_bytes.get(address, 0) + n


class Refused(Exception):
    """The handshake failed: refused by the peer or by us, `permanent` for a reason retrying
    will not fix (authentication, an unknown group, no common version), else not (a peer
    that does not speak RCP properly, or too slowly)."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) -> (host, port); ValueError for anything else."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"bad address {text!r} (want HOST:PORT)")
    return host, int(port)


class RcpConnection:
    """One authenticated RCP session (blocking; one thread uses it), several requests in
    flight: `send_request` sends one, `read_answer` reads the oldest one's answer. Raises
    transport._Broken when the connection fails, Refused when the handshake is refused,
    TransientError (naming its reason) when the receiver refused the open session."""

    def __init__(self, host: str, port: int, *, group: str, secret: bytes, site: str,
                 uuid: str, timeout: float = TIMEOUT, compress: bool = True, pace=None,
                 tls=None, watch=None, count=None):
        """`compress`: offer zstd for the bulk bodies (the peer may refuse it); `pace`:
        called with each COPY or CHUNK frame's size before it is sent (the destination's
        bandwidth limit, which may sleep). `tls`: an ssl.SSLContext (rcp/tls.py
        client_context): the session runs inside TLS, the server's certificate signed by the
        CA and naming `host`. `watch`: called with the socket before it connects
        (transport.open_socket: the client's abort stops connect and handshakes too).
        `count`: called with the size of each piece of data written to the connection."""
        self.timeout = timeout
        self.pace = pace
        self.count = count
        self.where = f"{host}:{port}"
        self.sock = open_socket(host, port, timeout, watch)
        if tls is not None:
            try:
                self.sock = tls_wrap(self.sock, tls, host, timeout=timeout)
            except OSError as e:
                raise _Broken(f"TLS with {host}:{port} failed: {tls_reason(e)}") from None
        self.conn = wire.Connection(wire.CLIENT, group=group, secret=secret, site=site,
                                    uuid=uuid, features=wire.FEATURES if compress else ())
        self.pending: collections.deque = collections.deque()  # seqs of unanswered requests
        self.closing = False  # the peer closed the session
        try:
            self._handshake()
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self) -> None:
        conn = self.conn
        self._sendall(conn.hello(), "the handshake")
        deadline = time.monotonic() + self.timeout
        while conn.state != wire.OPEN:
            try:
                event = conn.next_event()
            except wire.ProtocolError as e:
                refused = getattr(e, "remote", False) or str(e).startswith("the peer refused")
                if not refused:  # say why to the peer (it logs it), as well as we can
                    why = (f"authentication failed: the client holds another secret of "
                           f"group {conn.group!r} (the secrets differ)" if e.kind == "auth"
                           else str(e))
                    try:
                        self.sock.settimeout(1.0)
                        frame = conn.error_frame(e.kind, why)
                        self.sock.sendall(frame)
                        if self.count is not None:
                            self.count(len(frame))
                    except OSError:
                        pass
                # (a refusal for another reason, a slow handshake say, may pass)
                raise Refused(str(e), e.kind in ("auth", "version")) from None
            out = conn.take_outgoing()
            if out:
                self._sendall(out, "the handshake")
            if event is wire.NEED_DATA:
                self._fill(deadline)
            elif event.type == "CLOSE":
                raise _Broken(f"the peer closed the handshake: {event.body.get('reason')}")

    def _sendall(self, data, what: str) -> None:
        """Send `data`: bytes, or a frame's (header, body) as `Connection.send_parts` makes
        them, with vectored sends (a 1 MiB body is not copied into one buffer with its
        header first)."""
        try:
            self.sock.settimeout(self.timeout)
            if isinstance(data, tuple):
                _sendmsg_all(self.sock, data)
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise _Broken(f"sending {what}: {_describe(e)}") from None
        if self.count is not None:
            self.count(sum(map(len, data)) if isinstance(data, tuple) else len(data))

    def _fill(self, deadline: float) -> None:
        # (inside TLS the peer may refuse our certificate here: tls_reason says so)
        data = recv_within(self.sock, deadline, self.timeout, 1 << 20, tls_reason)
        if not data:
            raise _Broken("the connection was closed before the answer" if not self.conn.buf
                          else "the connection was closed within an answer")
        self.conn.receive_data(data)

    def alive(self) -> bool:
        """Whether an idle session may be used: nothing pending, and the peer has not closed
        it (an idle session is closed after the peer's idle timeout)."""
        if self.closing or self.pending or self.conn.buf or self.conn.state != wire.OPEN:
            return False
        return socket_idle(self.sock)

    def send_request(self, method: str, target: str, body=b"",
                     ctype: str = "application/octet-stream") -> None:
        name = TYPE_OF.get(target)
        if name is None and target in CONTROL_OP_OF:
            name = "CONTROL"
        if name is None:
            raise ValueError(f"{method} {target} has no RCP message")
        if name == "CONTROL":
            payload = {"op": CONTROL_OP_OF[target],
                       "args": json.loads(bytes(body)) if len(body) else {}}
        elif wire.BY_NAME[name].raw:
            payload = body
        else:
            payload = json.loads(bytes(body)) if len(body) else {}
            if name == "COMMIT":  # (the HTTP route takes the times as optional; 0: unknown)
                payload["header"] = bytes.fromhex(payload["header"])
                payload.setdefault("cut_ns", 0)
                payload.setdefault("first_change_ns", 0)
        try:
            frame = self.conn.send_parts(name, payload)  # (header, body: sent by one sendmsg)
        except ValueError as e:  # (the session is closed)
            raise _Broken(str(e)) from None
        if self.pace is not None and wire.BY_NAME[name].raw:
            try:
                self.pace(len(frame[0]) + len(frame[1]))
            except BaseException:  # (the send task was stopped: this frame is never sent,
                self.closing = True  # so the session cannot go on, nor be closed by CLOSE)
                raise
        self.pending.append(self.conn.send_seq)
        self._sendall(frame, name)

    def read_answer(self) -> tuple[int, bytes]:
        """The oldest request's answer: (status, JSON body), as HTTPConnection gives it."""
        if not self.pending:
            raise _Broken("no request is waiting for an answer")
        if self.closing:
            raise _Broken("the peer closed the session after an earlier answer")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                event = self.conn.next_event()
            except wire.ProtocolError as e:
                # an answer this end refuses (a damaged ACK, say): the session cannot go on;
                # the receiver is told why (it logs it), and so is the send task, which logs
                # it and reconnects (a broken connection's silent retry would hide it)
                self.closing = True
                self._complain(e)
                raise TransientError(f"{self.where}: RCP protocol error: {e}") from None
            if event is wire.NEED_DATA:
                self._fill(deadline)
                continue
            body = event.body
            if event.type == "CLOSE":
                self.closing = True
                raise _Broken(f"the peer closed the session: {body.get('reason')}")
            if event.type not in ("ACK", "ERROR"):
                continue  # FLOW (not sent by this build)
            if body["seq"] != self.pending[0]:
                self.closing = True
                if event.type == "ERROR" and body["seq"] == 0:
                    # the receiver refused the session (a damaged or malformed frame, one
                    # too slow) and closed it: its reason is what the send task logs, not a
                    # broken connection, which a kept-alive session's send retries silently
                    raise TransientError(f"{self.where}: the receiver ended the session: "
                                         f"{wire.one_line(body['message'])}")
                raise _Broken(f"{event.type} for request {body['seq']}, not "
                              f"{self.pending[0]}")
            self.pending.popleft()
            if event.type == "ACK":
                return 200, json.dumps(body["result"]).encode()
            status = STATUS_OF.get(body["kind"], 503)
            message = body["message"]
            if status == 400 and "rejected" not in message and "again" not in message:
                message = f"rejected: {message}"
            return status, json.dumps({"error": message}).encode()

    def _complain(self, e: wire.ProtocolError) -> None:
        """Tell the peer why this end ends the session (best effort, never waits)."""
        try:
            self.sock.setblocking(False)
            sent = self.sock.send(self.conn.error_frame(e.kind, str(e)))
            if self.count is not None:
                self.count(sent)
        except OSError:
            pass

    def close(self) -> None:
        if self.conn.state == wire.OPEN and not self.pending and not self.closing:
            try:  # (the peer logs why the session ended; best effort, never waits: a
                self.sock.setblocking(False)  # send task closes it from the trio thread)
                sent = self.sock.send(self.conn.close_frame("done"))
                if self.count is not None:
                    self.count(sent)
            except OSError:
                pass
        self.sock.close()


def _sendmsg_all(sock: socket.socket, parts) -> None:
    """socket.sendall for several buffers (sendmsg, as many calls as it takes)."""
    if isinstance(sock, ssl.SSLSocket):  # (no sendmsg inside TLS, which copies anyway)
        sock.sendall(b"".join(parts))
        return
    views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
    while views:
        n = sock.sendmsg(views)
        while n:
            if n < views[0].nbytes:
                views[0] = views[0][n:]
                break
            n -= views.pop(0).nbytes


class RcpReceiverClient(ReceiverClient):
    """The receiver calls on a site at HOST:PORT over RCP, in replication group `group`,
    whose secret this site (`local`, the primary's directory) holds."""

    def __init__(self, address: str, *, group: str, local: Path, uuid: str,
                 name: str | None = None, window: int = WINDOW, timeout: float = TIMEOUT,
                 compress: bool = True):
        """`name`: how this site names itself in HELLO (default: its directory);
        `compress`: offer zstd on its sessions. `pace`, if set, limits the bulk frames'
        bytes (RcpConnection)."""
        self.site = None
        self.site_path = address  # (names the destination in error messages)
        self.address = address
        self.group = group
        self.local = Path(local)
        self.uuid = uuid
        self.name = name or str(self.local)
        self.window = window
        self.timeout = timeout
        self.compress = compress
        self.pace = None
        self.conn = None

    def _count(self, n: int) -> None:
        _count_wire(self.address, n)

    def _connect(self) -> RcpConnection:
        try:
            host, port = parse_address(self.address)
        except ValueError as e:
            raise PermanentError(str(e)) from None
        try:
            secret = GroupStore(self.local).secret(self.group)
        except OSError as e:
            raise TransientError(f"cannot read the secret of group {self.group!r}: "
                                 f"{_describe(e)}") from None
        if secret is None:
            raise PermanentError(f"this site holds no replication group {self.group!r} "
                                 f"(repfs-admin group add {self.group} --secret-file FILE)")
        try:  # this site's [tls] (rcp/tls.py): then every session runs inside TLS
            files = site_files(self.local)
            tls = client_context(files) if files is not None else None
        except TlsError as e:
            raise TransientError(f"{self.address}: {e}") from None
        try:
            conn = RcpConnection(host, port, group=self.group, secret=secret,
                                 site=self.name, uuid=self.uuid,
                                 timeout=self.timeout, compress=self.compress,
                                 pace=self.pace, tls=tls, watch=self._watch,
                                 count=self._count)
        except _Broken as e:
            self._check_aborted()
            raise TransientError(f"{self.address}: {e}") from None
        except Refused as e:
            self._check_aborted()
            cls = PermanentError if e.permanent else TransientError
            raise cls(f"{self.address}: RCP session refused: {e}") from None
        finally:
            self._unwatch()
        return self._connected(conn)
