"""The transport of replication: the calls a primary makes on a secondary's receiver.

`ReceiverClient` talks to a secondary daemon on the same host over its control port (HTTP/JSON,
bearer token); the network transport of RCP implements the same calls. Errors are sorted into
what a send task does about them: try again later, send again, or stop.

Bulk data (delta chunks, initial-copy records) is pipelined: `send_chunks` and `send_copies`
keep up to a window of requests in flight on one persistent HTTP/1.1 connection and take the
acknowledgements as they come back, in order (the control port serves a connection's requests
one after the other, and refuses the uploads pipelined behind one that failed). A send holds
at most the window's bodies in memory. The client is a small hand-rolled HTTP/1.1 one
(`HTTPConnection`): http.client and h11's client cannot pipeline.
"""

from __future__ import annotations

import collections
import json
import select
import socket
import ssl
import time
from typing import Iterable

from . import keys as K
from .chunk import encode_copy

WINDOW = 8  # requests in flight by default in a pipelined send
MAX_WINDOW = 64  # (the answers of a window must fit the socket buffers: ~200 bytes each)
TIMEOUT = 60.0  # s for each answer (from the end of its request or of the previous answer)
CONNECT_TIMEOUT = 15.0  # s for a TCP connection to be made (at most the answer timeout)
MAX_ANSWER_HEAD = 16 << 10  # status line and headers of an answer
MAX_ANSWER_BODY = 16 << 20  # a JSON answer


class TransportError(Exception):
    """An error of a call on the receiver. `index`: which item of a pipelined send failed
    (its position in what was handed to `send_chunks`/`send_copies`), else None."""

    index: int | None = None


class TransientError(TransportError):
    """Try again later (the peer is down, restarting, or busy)."""


class PermanentError(TransportError):
    """The destination refuses for a reason retrying will not fix."""


class RejectedError(TransportError):
    """The receiver rejected data it could not verify; send it again."""


class _Broken(Exception):
    """The connection failed (closed, reset, timed out, or the answer is not HTTP)."""


def error_for(status: int, doc) -> TransportError:
    """The exception for a failing answer: a 400 that says "rejected" or "again" means send
    it again; 401, 404 and 409 will not change by retrying; anything else may."""
    msg = doc.get("error", f"HTTP {status}") if isinstance(doc, dict) else str(doc)
    if not isinstance(msg, str):
        msg = str(msg)
    if status == 400 and ("rejected" in msg or "again" in msg):
        return RejectedError(msg)
    if status in (401, 404, 409):
        return PermanentError(msg)
    return TransientError(msg)


def parse_answer_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    """An answer's status and headers (lower-case names) from its head (without the blank
    line); raises _Broken for anything that is not an HTTP/1.x status line and headers."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if (len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3
            or not parts[1].isdigit()):
        raise _Broken(f"not an HTTP answer: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise _Broken(f"malformed header line in an answer: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class HTTPConnection:
    """One persistent HTTP/1.1 client connection (blocking; one thread uses it) that may have
    several requests in flight: `send_request` writes a request, `read_answer` reads the
    oldest unanswered one's answer. Every request carries the bearer token; every answer
    must have a Content-Length; each answer must come within `timeout` seconds."""

    def __init__(self, host: str, port: int, token: str, *, timeout: float = TIMEOUT,
                 tls=None, watch=None):
        """`tls`: (context, certificate) of rcp/tls.py site_client: inside TLS, the server
        must present that certificate (a site on this host, reached by its control.json).
        `watch`: see open_socket."""
        self.host = host
        self.timeout = timeout
        self.token = token
        self.sock = open_socket(host, port, timeout, watch)
        if tls is not None:
            from ..rcp.tls import reason, wrap
            try:
                self.sock = wrap(self.sock, tls[0], host, pin=tls[1], timeout=timeout)
            except OSError as e:
                raise _Broken(f"TLS with {host}:{port} failed: {reason(e)}") from None
        self.buf = bytearray()
        self.unanswered = 0
        self.closing = False  # an answer said "Connection: close"

    def close(self) -> None:
        self.sock.close()

    def alive(self) -> bool:
        """Whether an idle connection may be used: nothing pending, and the peer has not
        closed it (a daemon closes a connection idle for long, or has restarted)."""
        if self.closing or self.unanswered or self.buf:
            return False
        return socket_idle(self.sock)

    def send_request(self, method: str, target: str, body=b"",
                     ctype: str = "application/octet-stream") -> None:
        body = memoryview(body).cast("B")
        head = (f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Authorization: Bearer {self.token}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {body.nbytes}\r\n\r\n").encode()
        self.unanswered += 1
        try:
            self.sock.settimeout(self.timeout)
            if body.nbytes <= 65536:
                self.sock.sendall(head + body)
            else:
                self.sock.sendall(head)
                self.sock.sendall(body)
        except OSError as e:
            raise _Broken(f"sending {method} {target}: {_describe(e)}") from None

    def _fill(self, deadline: float) -> None:
        data = recv_within(self.sock, deadline, self.timeout, 1 << 16)
        if not data:
            raise _Broken("the connection was closed before the answer" if not self.buf
                          else "the connection was closed within an answer")
        self.buf += data

    def read_answer(self) -> tuple[int, bytes]:
        """The next answer: (status, body)."""
        if not self.unanswered:
            raise _Broken("no request is waiting for an answer")
        if self.closing:
            raise _Broken("the peer closed the connection after an earlier answer")
        deadline = time.monotonic() + self.timeout
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > MAX_ANSWER_HEAD:
                raise _Broken(f"an answer's head is longer than {MAX_ANSWER_HEAD} bytes")
            self._fill(deadline)
        status, headers = parse_answer_head(bytes(self.buf[:end]))
        length = headers.get(b"content-length", b"")
        if not length.isdigit() or b"transfer-encoding" in headers:
            raise _Broken(f"an answer ({status}) without a Content-Length")
        length = int(length)
        if length > MAX_ANSWER_BODY:
            raise _Broken(f"an answer of {length} bytes (at most {MAX_ANSWER_BODY})")
        start = end + 4
        while len(self.buf) < start + length:
            self._fill(deadline)
        body = bytes(self.buf[start:start + length])
        del self.buf[:start + length]
        self.unanswered -= 1
        if headers.get(b"connection", b"").lower() == b"close":
            self.closing = True
        return status, body


def open_socket(host: str, port: int, timeout: float, watch=None) -> socket.socket:
    """socket.create_connection (blocking, TCP_NODELAY, `timeout` set), within
    CONNECT_TIMEOUT (or `timeout` if shorter); `watch`, if given, is called with each socket
    before it connects (ReceiverClient._watch: then `abort` can shut it down while it
    connects, and through the TLS and RCP handshakes after). _Broken when it fails."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError as e:
        raise _Broken(f"cannot connect to {host}:{port}: {_describe(e)}") from None
    err: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if watch is not None:
                watch(sock)
            sock.settimeout(min(timeout, CONNECT_TIMEOUT))
            sock.connect(addr)
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            sock.close()
            err = e
        except BaseException:
            sock.close()
            raise
    raise _Broken(f"cannot connect to {host}:{port}: "
                  f"{_describe(err) if err else 'no address'}") from None


def socket_idle(sock) -> bool:
    """Whether an idle connection's socket may be used: nothing readable (the peer closed
    it, b"", or sent an answer nobody asked for) and, inside TLS, nothing decrypted already
    that nobody asked for (poll sees only the kernel's buffer)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    try:
        poller = select.poll()  # (select.select fails for descriptors above 1023)
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _describe(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def recv_within(sock, deadline: float, timeout: float, size: int, describe=_describe) -> bytes:
    """What `sock` has (b"" at its end), waiting until `deadline` (monotonic) at most: an
    answer's next bytes, for both transports; raises _Broken."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Broken(f"no (whole) answer within {timeout:g} s")
    try:
        sock.settimeout(remaining)
        return sock.recv(size)
    except socket.timeout:
        raise _Broken(f"no (whole) answer within {timeout:g} s") from None
    except OSError as e:
        raise _Broken(f"reading an answer: {describe(e)}") from None


class ReceiverClient:
    """Calls on a secondary daemon's control port (a site on this host), over one persistent
    connection."""

    aborted = False  # `abort` was called: every call fails
    _connecting: socket.socket | None = None  # (a duplicate of) the socket being connected

    def __init__(self, site, *, window: int = WINDOW, timeout: float = TIMEOUT):
        """`site`: the target site (`SiteService.peer(path)`: its path and control address).
        `window`: the default number of requests in flight in `send_chunks`/`send_copies`;
        `timeout`: seconds each answer may take."""
        self.site = site
        self.site_path = str(site.path)
        self.window = window
        self.timeout = timeout
        self.conn: HTTPConnection | None = None

    def _connect(self) -> HTTPConnection:
        site = self.site
        addr = site.control_address()
        if addr is None:
            raise TransientError(f"the daemon of {self.site_path} is not running")
        try:
            token = (site.path / "control.token").read_text().strip()
        except OSError as e:
            raise TransientError(f"cannot read the control token of {self.site_path}: {e}")
        from ..rcp.tls import TlsError, site_client
        try:  # the secondary's [tls] (rcp/tls.py): its port speaks TLS only
            tls = site_client(site.path)
        except TlsError as e:
            raise TransientError(f"{self.site_path}: {e}") from None
        try:
            conn = HTTPConnection(addr[0], addr[1], token, timeout=self.timeout, tls=tls,
                                  watch=self._watch)
        except _Broken as e:
            self._check_aborted()
            raise TransientError(f"{self.site_path}: {e}") from None
        finally:
            self._unwatch()
        return self._connected(conn)

    def _watch(self, sock: socket.socket) -> None:
        """A connection being made hands its socket here before it connects: from then on
        `abort` shuts it down (a duplicate descriptor of it: TLS takes over the socket
        object's own), so that connecting, the TLS handshake and the RCP handshake, which
        come before the connection is `self.conn`, are stopped at once too."""
        self._unwatch()
        self._connecting = sock.dup()
        self._check_aborted()  # (after it is registered: abort sets the flag first)

    def _unwatch(self) -> None:
        sock, self._connecting = self._connecting, None
        if sock is not None:
            sock.close()

    def _check_aborted(self) -> None:
        if self.aborted:
            raise TransientError(f"{self.site_path}: the send was stopped")

    def _connected(self, conn):
        """`conn` made: it is the connection, unless `abort` came meanwhile."""
        self.conn = conn
        if self.aborted:
            self.close()
            self._check_aborted()
        return conn

    def abort(self) -> None:
        """From another thread: make the call in progress fail at once (its socket is shut
        down, also while it connects or shakes hands) and every later one (`replicate stop`
        must not wait for a wedged peer's timeouts)."""
        self.aborted = True
        for sock in (self._connecting, getattr(self.conn, "sock", None)):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _connection(self) -> tuple[HTTPConnection, bool]:
        """A connection ready for requests, and whether it is new."""
        if self.aborted:
            raise TransientError(f"{self.site_path}: the send was stopped")
        if self.conn is not None and not self.conn.alive():
            self.close()
        if self.conn is None:
            return self._connect(), True
        return self.conn, False

    def _outcome(self, status: int, raw: bytes) -> dict | TransportError:
        """The JSON document of an answer, or the error it stands for."""
        try:
            doc = json.loads(raw)
        except ValueError:
            return TransientError(f"{self.site_path}: non-JSON answer {status}")
        if status == 200:
            return doc
        return error_for(status, doc)

    def request(self, method: str, path: str, body: bytes | dict | None = None) -> dict:
        """One call, stop-and-wait; a connection that fails is replaced and the call sent once
        more."""
        if isinstance(body, dict):
            data, ctype = json.dumps(body).encode(), "application/json"
        else:
            data = body or b""
            ctype = "application/octet-stream" if body is not None else "application/json"
        for attempt in (1, 2):
            conn, _ = self._connection()
            try:
                conn.send_request(method, "/v1" + path, data, ctype)
                status, raw = conn.read_answer()
            except _Broken as e:
                self.close()
                if attempt == 2:
                    raise TransientError(f"{self.site_path}: {e}") from None
                continue
            doc = self._outcome(status, raw)
            if isinstance(doc, TransportError):
                self.close()  # (uploads pipelined behind a failed one would be refused)
                raise doc
            return doc
        raise TransientError("unreachable")

    def send_many(self, path: str, bodies: Iterable, *, window: int | None = None,
                  what: str = "request") -> int:
        """POST each of `bodies` (octet-stream, taken from the iterable only as the window
        has room) to `path`, with up to `window` requests in flight on one connection;
        returns how many were acknowledged (all of them, or an exception is raised).

        A failing answer raises what `request` raises for it, with `index` set to the body's
        position and named in the message, once the answers to the requests in flight behind
        it came back (the control port refuses the uploads pipelined behind a failed one, so
        none of them is applied out of order); nothing of the send is in flight when it
        returns or raises, except after a connection failure. What `bodies` raises is raised
        as it is, once the bodies taken before it were acknowledged. A connection that fails
        raises TransientError for the oldest unanswered body, except that a kept-alive
        connection failing before its first answer is replaced and the window sent again
        once (as `request` does: the receiver takes a resent record it already holds as a
        duplicate)."""
        window = max(1, min(int(window or self.window), MAX_WINDOW))
        items = iter(bodies)
        inflight: collections.deque = collections.deque()  # (index, body), oldest first
        written = 0  # of inflight, from the oldest: requests written
        done = 0  # acknowledged
        nxt = 0  # index of the next body to take
        exhausted = False
        broken: _Broken | None = None  # why a write failed (its answers are still read)
        source_error: Exception | None = None  # what `bodies` raised
        try:
            conn, fresh = self._connection()
            answered = False  # an answer came on this connection
            while True:
                try:
                    if broken is None and not conn.closing:
                        while not exhausted and len(inflight) < window:
                            try:
                                body = next(items)
                            except StopIteration:
                                exhausted = True
                                break
                            except Exception as e:  # raised once what was sent is answered
                                source_error, exhausted = e, True
                                break
                            inflight.append((nxt, body))
                            nxt += 1
                        try:
                            while written < len(inflight):
                                conn.send_request("POST", "/v1" + path, inflight[written][1])
                                written += 1
                        except _Broken as e:
                            # the peer may have refused it (or one before it) and closed:
                            # what it answered says why
                            broken, written = e, written + 1
                    if not inflight:
                        break
                    if not written:
                        raise broken or _Broken("nothing was sent")
                    status, raw = conn.read_answer()
                except _Broken as e:
                    if fresh or answered:
                        raise TransientError(f"{self.site_path}: {broken or e}") from None
                    # a kept-alive connection the peer closed meanwhile: again, on a new one
                    self.close()
                    self.conn = None
                    conn, fresh = self._connection()
                    written, broken = 0, None
                    continue
                answered = True
                doc = self._outcome(status, raw)
                if isinstance(doc, TransportError):
                    # the rest of the window is refused (see the docstring): take those
                    # answers, so that nothing of this send is still in flight
                    self._drain(conn, written - 1)
                    raise doc  # (for inflight[0])
                inflight.popleft()
                written -= 1
                done += 1
        except TransportError as e:
            self.close()  # (the control port refuses the uploads after a failed one on it)
            index = inflight[0][0] if inflight else nxt
            e.index = index
            e.args = (f"{e.args[0] if e.args else type(e).__name__} ({what} {index} of this "
                      f"send)",)
            raise
        except BaseException:
            self.close()
            raise
        if source_error is not None:
            raise source_error
        return done

    @staticmethod
    def _drain(conn: HTTPConnection, n: int) -> None:
        """Read (and drop) the answers to `n` requests, while the connection lasts."""
        try:
            for _ in range(n):
                conn.read_answer()
        except _Broken:
            pass

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # the calls
    def info(self) -> dict:
        return checked_info(self.request("GET", "/repl/receiver"), self.site_path)

    def attach(self, primary: dict, generation: int, nblocks: int, force: bool) -> dict:
        return self.request("POST", "/repl/attach", {"primary": primary, "generation": generation,
                                                     "nblocks": nblocks, "force": force})

    def send_copies(self, pieces: Iterable[tuple[int, int, bytes]], *,
                    window: int | None = None) -> int:
        """Initial-copy records (generation, start block, data), pipelined (`send_many`);
        returns how many were acknowledged."""
        return self.send_many("/repl/copy", (encode_copy(g, s, d) for g, s, d in pieces),
                              window=window, what="copy record")

    def start_playback(self, after: int, generation: int, blocks: int) -> None:
        self.request("POST", "/repl/start-playback", {"after": after, "generation": generation,
                                                      "blocks": blocks})

    def send_chunks(self, chunks: Iterable[bytes], *, window: int | None = None) -> int:
        """Encoded delta chunks, pipelined (`send_many`); returns how many were
        acknowledged."""
        return self.send_many("/repl/chunk", chunks, window=window, what="chunk")

    def commit(self, header: bytes, meta: dict) -> dict:
        ack = self.request("POST", "/repl/commit", {"header": header.hex(), **meta})
        if not (isinstance(ack, dict) and K.is_u64(ack.get("acked"))
                and K.is_u64(ack.get("played"))):
            raise PermanentError(f"{self.site_path}: malformed answer to a delta-set header")
        return ack


def checked_info(doc, where: str) -> dict:
    """A receiver's status as the send task uses it, checked: the peer's answer is trusted no
    more than its requests are trusted by the receiver (tests/t0_fuzz.py: a string
    last_received or a partial set of ["x"] ended the send task with a TypeError)."""
    def sub(name: str, *fields: str) -> bool:
        v = doc.get(name)
        return v is None or (isinstance(v, dict) and all(K.is_u64(v.get(f)) for f in fields))

    if not (isinstance(doc, dict) and all(
            K.is_u64(doc.get(k)) for k in ("generation", "last_received", "last_played"))
            and all(doc.get(k) is None or isinstance(doc[k], str)
                    for k in ("role", "state"))
            and sub("partial", "delta_set", "chunks") and sub("copy", "next_block")
            and (doc.get("primary") is None or isinstance(doc["primary"], dict))):
        raise PermanentError(f"{where}: malformed answer from its receiver")
    return doc
