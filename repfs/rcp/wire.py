"""RCP, the replication control protocol (FIG. 13-19), as bytes in and events out: no I/O.

A connection starts with the client's preface (`PREFACE`, which tells the site's one port that
this is RCP and not HTTP, FIG. 19), then frames both ways. A frame is a fixed header

    type u8 | flags u8 | reserved u16 (0) | length u32 | session u32 | seq u64 | check u64

(big-endian, `HEADER.size` bytes) and `length` bytes of body. `check` is xxh3-64 of the
header's first 20 bytes and the body: a bit flipped on the wire closes the session and applies
nothing. `seq` numbers each side's frames from 1 with no gap (a dropped, repeated or reordered
frame is refused); `session` is 0 until the server names the session in READY, then that
number. Control bodies are msgpack maps (`TYPES` says which keys each carries and of what
type); the bulk bodies (an initial-copy record, a delta chunk) are the existing checksummed
formats of repl/chunk.py, carried as they are.

The handshake authenticates both ends by the replication group's shared secret, which never
crosses the wire (HMAC-SHA256 challenge/response; `proof`):

    client                                   server
    PREFACE, HELLO {versions, group, nonce,  ─▶
                    site "", uuid ""}
                                             ◀─ CHALLENGE {version, nonce, proof(server),
                                                           site "", uuid ""}
                                                           (or ERROR version, then close)
    AUTH {proof(client), site, uuid}         ─▶
                                             ◀─ READY {session, site, uuid}
                                                           (or ERROR auth, then close)

Nothing before the proofs tells a stranger who a site is or which groups it holds: each end
names itself only after the other proved the secret (AUTH, READY; HELLO and CHALLENGE keep
the keys, empty, for version-1 peers that require them), and a group the server does not
hold gets a CHALLENGE proved with a decoy key (`_decoy_secret`), refused after AUTH as a
wrong secret is (`ProtocolError.detail` says what it was, for the server's log).

Each proof covers a role label, the group and both nonces: a proof replayed from an earlier
handshake fails (the other side's nonce is new), and one reflected back at its maker fails (the
label is the other role's). After READY the client sends requests (INFO, ATTACH, COPY,
START_PLAYBACK, CHUNK, COMMIT, CONTROL, BLOCKLIST), as many as the window allows before their
answers; the server answers each, in order, with ACK {seq, result} or ERROR {seq, kind,
message}. CLOSE {reason} ends a session from either side.

`Connection` is the state machine of one end. Anything malformed (unknown type, bad length,
bad check, wrong seq or session, a message the state does not allow, a body without the keys
of its type) raises `ProtocolError` with a one-line reason; the adapter logs it, sends
`Connection.error_frame(...)` if it can (not when `e.remote`: the peer refused first), and
closes: a connection that has failed once takes no further data. A frame of a type the state
does not take (`ALLOWED`) is refused from its header alone, and before READY no frame may
exceed `MAX_HANDSHAKE_BODY`: an unauthenticated peer makes an end buffer little.

Features: HELLO may carry `features`, the optional extensions the client speaks (this build:
"zstd"); CHALLENGE answers with `features`, those both ends take for this session. An absent
field means none (a peer older than the field agrees to nothing, and works as before). With
"zstd" agreed, an end may send a COPY or CHUNK body zstd-compressed with `FLAG_ZSTD` set (one
compressor per connection; a body that compresses to `PAYS` of its size or more goes raw,
without the flag); the receiving end decompresses it, at most `MAX_BODY` bytes (a frame that
would make more is a protocol error), before the body is handed up. A compressed frame of any
other type, or without the agreement, is refused.
docs/protocol.md describes the protocol for operators and implementers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import xxhash

try:
    import zstandard
except ImportError:  # pragma: no cover - a dependency; without it the build offers nothing
    zstandard = None

PROTOCOL_VERSIONS = (1,)  # what this build speaks (HELLO offers them, CHALLENGE picks one)
PREFACE = b"RCP/1.0 repfs\r\n"  # the framing's version: a new framing gets a new preface
PREFACE_PREFIX = b"RCP/"  # what the port's filter looks at (FIG. 19)
HEADER = struct.Struct(">BBHIIQQ")
MAX_BODY = (1 << 20) + (64 << 10)  # a chunk or copy record of 256 blocks and its header
MAX_CONTROL_BODY = 64 << 10  # a msgpack body
MAX_HANDSHAKE_BODY = 16 << 10  # any frame before READY: what an unauthenticated peer can make
#                                an end buffer is bounded by this (and the header)
NONCE = 32
MAX_NAME = 255  # a group name
MAX_SITE = 4096  # a site's name (a path) in HELLO, CHALLENGE, AUTH or READY
MAX_VERSIONS = 64  # versions a HELLO may offer

FLAG_ZSTD = 0x01  # the body is zstd-compressed (only COPY and CHUNK; "zstd" agreed)
KNOWN_FLAGS = FLAG_ZSTD
FEATURES = ("zstd",) if zstandard is not None else ()  # what this build can agree to
MAX_FEATURES = 16  # features a HELLO or CHALLENGE may name
ZSTD_LEVEL = 1  # fast: the point is fewer bytes on a slow link, not the smallest
PAYS = 0.95  # a body compressed to this fraction of its size or more is sent raw
MAX_SKIP = 32  # bodies sent raw at most before trying to compress again

CLIENT, SERVER = "client", "server"


class ProtocolError(Exception):
    """The peer broke the protocol; `str(e)` is the one-line reason. `kind` is what the
    ERROR frame sent back says ("protocol", "version", "auth"). `remote` is True when the
    peer itself refused (its ERROR arrived during the handshake): nothing to send back."""

    def __init__(self, message: str, kind: str = "protocol", *, remote: bool = False,
                 detail: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.remote = remote
        # what this end logs when it knows more than it tells the peer (a group it does not
        # hold is refused as a wrong secret, and logged as what it is)
        self.detail = detail


def one_line(text, limit: int = 200) -> str:
    """A peer's text made fit for a one-line log message: control characters escaped, cut
    at `limit` characters."""
    text = text if isinstance(text, str) else repr(text)
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                  for c in text[:limit])
    return out[:limit] + ("..." if len(text) > limit or len(out) > limit else "")


# ---------------------------------------------------------------- message types

@dataclass(frozen=True)
class MsgType:
    code: int
    name: str
    fields: dict[str, Any] = field(default_factory=dict)  # key -> type (or tuple of types)
    raw: bool = False  # the body is bytes carried as they are (not msgpack)
    sender: str = CLIENT  # who may send it: CLIENT, SERVER or "both"


_U = int
TYPES_LIST = [
    MsgType(1, "HELLO", {"versions": list, "group": str, "nonce": bytes, "site": str,
                         "uuid": str}),
    MsgType(2, "CHALLENGE", {"version": _U, "nonce": bytes, "proof": bytes, "site": str,
                             "uuid": str}, sender=SERVER),
    MsgType(3, "AUTH", {"proof": bytes}),
    MsgType(4, "READY", {"session": _U}, sender=SERVER),
    MsgType(5, "CLOSE", {"reason": str}, sender="both"),
    MsgType(6, "ERROR", {"seq": _U, "kind": str, "message": str}, sender="both"),
    MsgType(7, "ACK", {"seq": _U, "result": dict}, sender=SERVER),
    MsgType(10, "INFO", {}),
    MsgType(11, "ATTACH", {"primary": dict, "generation": _U, "nblocks": _U, "force": bool}),
    MsgType(12, "COPY", raw=True),
    MsgType(13, "START_PLAYBACK", {"after": _U, "generation": _U, "blocks": _U}),
    MsgType(14, "CHUNK", raw=True),
    MsgType(15, "COMMIT", {"header": bytes, "cut_ns": _U, "first_change_ns": _U}),
    MsgType(16, "CONTROL", {"op": str, "args": dict}),  # a control block (FIG. 13)
    MsgType(17, "FLOW", {"window": _U}, sender=SERVER),  # how many requests may be in flight
    MsgType(18, "BLOCKLIST", {"first": _U, "last": _U}),  # block lists of delta sets
]
TYPES = {t.code: t for t in TYPES_LIST}
BY_NAME = {t.name: t for t in TYPES_LIST}
REQUESTS = frozenset(("INFO", "ATTACH", "COPY", "START_PLAYBACK", "CHUNK", "COMMIT", "CONTROL",
                      "BLOCKLIST"))
HANDSHAKE = frozenset(("HELLO", "CHALLENGE", "AUTH", "READY"))


@dataclass
class Message:
    """One decoded frame: its type name, sequence number, and body (a dict of the type's
    fields, or the raw bytes of a COPY or CHUNK), and the session its header named."""
    type: str
    seq: int
    body: Any
    flags: int = 0
    session: int = 0


class NeedData:
    def __repr__(self):
        return "NEED_DATA"


NEED_DATA = NeedData()
BULK_BODY = 64 << 10  # a COPY or CHUNK body this large is read into its own buffer


def check_of(head20: bytes, body) -> int:
    h = xxhash.xxh3_64(head20)
    h.update(body)
    return h.intdigest()


def encode_frame(code: int, body: bytes, *, session: int, seq: int, flags: int = 0) -> bytes:
    head, body = encode_frame_parts(code, body, session=session, seq=seq, flags=flags)
    return head + body


def encode_frame_parts(code: int, body, *, session: int, seq: int,
                       flags: int = 0) -> tuple[bytes, Any]:
    """`encode_frame` as (header, body), not joined: a bulk body is not copied (the adapter
    sends both with one `sendmsg`)."""
    head20 = HEADER.pack(code, flags, 0, len(body), session, seq, 0)[:20]
    return head20 + struct.pack(">Q", check_of(head20, body)), body


def encode_body(t: MsgType, fields: dict | bytes) -> bytes:
    if t.raw:
        if not isinstance(fields, (bytes, bytearray, memoryview)):
            raise TypeError(f"{t.name} carries bytes")
        # (not copied: a 1 MiB chunk; the caller does not change it until it is sent)
        return fields if isinstance(fields, bytes) else memoryview(fields).cast("B")
    missing = set(t.fields) - set(fields)
    if missing:
        raise TypeError(f"{t.name} lacks {sorted(missing)}")
    return msgpack.packb(fields, use_bin_type=True)


def _type_ok(value, want) -> bool:
    if want is int:  # (bool is an int to Python, not to the protocol)
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64
    return isinstance(value, want)


def decode_body(t: MsgType, raw: bytes):
    """A frame body checked against its type; raises ProtocolError."""
    if t.raw:
        return raw
    if len(raw) > MAX_CONTROL_BODY:
        raise ProtocolError(f"{t.name} body of {len(raw)} bytes (at most {MAX_CONTROL_BODY})")
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True,
                              max_bin_len=MAX_CONTROL_BODY, max_str_len=MAX_CONTROL_BODY,
                              max_array_len=4096, max_map_len=4096)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types for bad input
        raise ProtocolError(f"{t.name} body is not msgpack ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{t.name} body is not a map")
    for key, want in t.fields.items():
        if key not in doc:
            raise ProtocolError(f"{t.name} lacks {key!r}")
        if not _type_ok(doc[key], want):
            raise ProtocolError(f"{t.name} {key!r} is not {want.__name__}")
    return doc


def proof(secret: bytes, role: str, group: str, client_nonce: bytes,
          server_nonce: bytes) -> bytes:
    """What an end sends to show it holds the group's secret: HMAC-SHA256 over its role,
    the group and both nonces (so neither a replay nor a reflection verifies)."""
    msg = b"repfs-rcp-1\0" + role.encode() + b"\0" + group.encode() + b"\0" + client_nonce + \
        server_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


_DECOY_KEY = os.urandom(32)  # this process's key for the groups it does not hold


def _decoy_secret(group: str) -> bytes:
    """What a server proves with for a group it does not hold: a key no one else has (made
    from a random per-process key and the group's name), so that its CHALLENGE looks as a
    real one does and the handshake fails only at the proofs, as with a wrong secret: an
    unauthenticated peer learns nothing of which groups exist."""
    return hmac.new(_DECOY_KEY, b"repfs-rcp-decoy\0" + group.encode(), hashlib.sha256).digest()


def _identity(body: dict, name: str) -> dict:
    """The optional `site` and `uuid` of an AUTH or READY (who the end that sent it is,
    said once the other end proved the secret): those present, checked."""
    out = {}
    for key, most in (("site", MAX_SITE), ("uuid", MAX_NAME)):
        if key in body:
            if not isinstance(body[key], str) or len(body[key]) > most:
                raise ProtocolError(f"{name} {key!r} is not a name of at most {most} "
                                    "characters")
            out[key] = body[key]
    return out


def _features(body: dict, name: str) -> list[str] | None:
    """The optional `features` of a HELLO or CHALLENGE (None when absent); raises on a
    malformed one."""
    got = body.get("features")
    if got is None:
        return None
    if not isinstance(got, list) or len(got) > MAX_FEATURES or not all(
            isinstance(f, str) and len(f) <= MAX_NAME for f in got):
        raise ProtocolError(f"{name} 'features' is not a list of at most {MAX_FEATURES} names")
    return got


# ---------------------------------------------------------------- the state machine

PREFACE_WAIT, HELLO_WAIT, CHALLENGE_WAIT, AUTH_WAIT, READY_WAIT, OPEN, CLOSED = (
    "preface", "hello", "challenge", "auth", "ready", "open", "closed")

# What each end takes in each state (CLOSE and ERROR besides, in every state): a frame of any
# other type is refused as soon as its header arrives, before its body is waited for.
ALLOWED = {
    SERVER: {HELLO_WAIT: frozenset(("HELLO",)), AUTH_WAIT: frozenset(("AUTH",)),
             OPEN: REQUESTS},
    CLIENT: {CHALLENGE_WAIT: frozenset(("CHALLENGE",)), READY_WAIT: frozenset(("READY",)),
             OPEN: frozenset(("ACK", "FLOW"))},
}


class Connection:
    """One end of an RCP connection: feed it the bytes received (`receive_data`), take the
    events (`next_event`), and send the bytes it makes (`hello`, `send`, ...).

    Client: `Connection(CLIENT, group=G, secret=S, site=..., uuid=...)`; send `hello()`; the
    CHALLENGE is checked here (a server that does not know the secret is refused) and
    answered with `auth()`'s bytes, which `next_event` queues in `outgoing` for the adapter;
    READY makes the connection OPEN. Server: `Connection(SERVER, secrets=lookup, site=...,
    uuid=...)` where `lookup(group)` returns the group's secret or None; it answers HELLO
    and AUTH itself (bytes in `outgoing`) and yields the HELLO's fields as
    `Message("HELLO")` (its group, for the adapter's log) and then READY; who the client
    is (`peer["site"]`, `peer["uuid"]`) comes with its AUTH, once it proved the secret.

    Events: `Message` for each frame a higher layer must see; NEED_DATA when more bytes are
    needed. `state` is one of the *_WAIT constants, OPEN or CLOSED.

    `features`: the extensions this end offers (a client) or takes (a server); `agreed`, once
    the handshake is through, those of the session. With "zstd" agreed, `send` compresses
    COPY and CHUNK bodies where that pays; `raw_bytes` and `body_bytes` count those bodies
    before and after (the wire's share of them), `compressed` the frames sent compressed.
    """

    def __init__(self, role: str, *, site: str = "", uuid: str = "", group: str = "",
                 secret: bytes | None = None,
                 secrets: Callable[[str], bytes | None] | None = None,
                 versions: tuple[int, ...] = PROTOCOL_VERSIONS,
                 nonce: Callable[[int], bytes] = os.urandom, session: int = 0,
                 features: tuple[str, ...] = FEATURES):
        if role not in (CLIENT, SERVER):
            raise ValueError(role)
        if not 0 <= session < 1 << 32:
            raise ValueError(f"session {session} does not fit the header's 32 bits")
        self.role = role
        self.site, self.uuid = site, uuid
        self.group = group
        self.secret = secret
        self.secrets = secrets
        self.versions = tuple(versions)
        self._nonce = nonce
        self.my_nonce = b""
        self.peer_nonce = b""
        self.version = 0
        self.session = 0
        self._new_session = session  # the number a server gives (its adapter picks it)
        self.peer: dict = {}  # the peer's HELLO or CHALLENGE fields, and who it is (site,
        #                       uuid: from its AUTH or READY, after the proofs)
        self.decoy = False  # a server answering a group it does not hold (_decoy_secret)
        self.state = PREFACE_WAIT if role == SERVER else HELLO_WAIT
        self.buf = bytearray()
        self.send_seq = 0
        self.recv_seq = 0
        self.outgoing = bytearray()  # bytes the state machine itself must send
        self.error: ProtocolError | None = None
        self.features = tuple(f for f in features if f in FEATURES)
        self.agreed: frozenset[str] = frozenset()
        self._cctx = None  # one zstd compressor and decompressor per connection
        self._dctx = None
        self.raw_bytes = self.body_bytes = self.compressed = 0
        self._skip = self._skip_next = 0  # bodies sent raw untried after one that did not pay

    # -------------------------------------------------------------- sending

    def _frame(self, name: str, body: dict | bytes, flags: int = 0) -> bytes:
        t = BY_NAME[name]
        if t.sender not in (self.role, "both"):
            raise ValueError(f"a {self.role} does not send {name}")
        self.send_seq += 1
        head, body = encode_frame_parts(t.code, encode_body(t, body), session=self.session,
                                        seq=self.send_seq, flags=flags)
        return (head, body) if self._parts else head + body

    def hello(self) -> bytes:
        """The client's first bytes: the preface and HELLO."""
        if self.role != CLIENT or self.state != HELLO_WAIT or self.send_seq:
            raise ValueError(f"hello() is a client's first call (this is a {self.role} in "
                             f"state {self.state})")
        self.my_nonce = self._nonce(NONCE)
        self.state = CHALLENGE_WAIT
        # (site and uuid stay empty: who this end is goes in AUTH, to a server that has
        # proved the secret; the keys stay for peers of version 1 that require them)
        hello = {"versions": list(self.versions), "group": self.group, "nonce": self.my_nonce,
                 "site": "", "uuid": ""}
        if self.features:  # (absent: none; what a peer older than the field sends)
            hello["features"] = list(self.features)
        return PREFACE + self._frame("HELLO", hello)

    def send(self, name: str, body: dict | bytes | None = None) -> bytes:
        """A frame of an open session; returns its bytes (its seq is `send_seq`)."""
        if self.state != OPEN:
            raise ValueError(f"cannot send {name}: the session is {self.state}")
        t = BY_NAME[name]
        if name in HANDSHAKE:
            raise ValueError(f"{name} belongs to the handshake, which the state machine sends")
        if t.raw and body is None:
            raise ValueError(f"{name} carries bytes")
        if t.raw:
            return self._bulk(name, body)
        return self._frame(name, {} if body is None else body)

    def _bulk(self, name: str, body) -> bytes:
        """A COPY or CHUNK frame: its body compressed when "zstd" is agreed and it pays."""
        flags = 0
        size = len(body)
        if "zstd" in self.agreed and size and self._skip:
            self._skip -= 1  # (data that did not shrink lately: sent raw without trying)
        elif "zstd" in self.agreed and size:
            if self._cctx is None:
                self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            packed = self._cctx.compress(body)
            if len(packed) < size * PAYS:
                body, flags = packed, FLAG_ZSTD
                self.compressed += 1
                self._skip_next = 0
            else:  # incompressible (random, already compressed): try again later, and
                # later still while it stays so (compressing it cost ~0.45 CPU s per GiB)
                self._skip_next = min(max(1, 2 * self._skip_next), MAX_SKIP)
                self._skip = self._skip_next
        self.raw_bytes += size
        self.body_bytes += len(body)
        return self._frame(name, body, flags)

    def error_frame(self, kind: str, message: str, seq: int = 0) -> bytes:
        """An ERROR frame (for any state: the adapter sends it before it closes)."""
        self.send_seq += 1
        return encode_frame(BY_NAME["ERROR"].code,
                            encode_body(BY_NAME["ERROR"], {"seq": seq, "kind": kind,
                                                           "message": message[:1000]}),
                            session=self.session, seq=self.send_seq)

    def close_frame(self, reason: str) -> bytes:
        data = self._frame("CLOSE", {"reason": reason[:1000]})
        self.state = CLOSED
        return data

    _parts = False  # (send_parts: _frame returns the header and the body, not joined)

    def send_parts(self, name: str, body: dict | bytes | None = None) -> tuple[bytes, Any]:
        """`send` as the frame's header and its body, not joined, for a vectored send
        (`socket.sendmsg([head, body])`): a bulk body sent as it is (a 1 MiB chunk) is not
        copied into the frame. The body must not change until it is sent."""
        self._parts = True
        try:
            return self.send(name, body)
        finally:
            self._parts = False

    # -------------------------------------------------------------- receiving

    def receive_data(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.buf += data

    def receive_size(self, most: int = 1 << 20, header_first: bool = False) -> int:
        """How many bytes the adapter should read next (at most `most`): what the frame at
        the start of the buffer still lacks once its header is in, else `most` (or, with
        `header_first`, what the header lacks: an adapter that reads bulk bodies with
        `receive_buffer` reads a header alone first). Read so, a bulk frame ends the buffer,
        and its body is handed up without a copy."""
        if len(self.buf) >= HEADER.size:
            need = HEADER.size + HEADER.unpack_from(self.buf)[3] - len(self.buf)
            if need > 0:
                return min(need, most)
        elif header_first:
            return HEADER.size - len(self.buf)
        return most

    _into = None  # [frame buffer, bytes in it] while receive_buffer's frame arrives

    def receive_buffer(self) -> memoryview | None:
        """For an adapter that can read into memory (a socket's recv_into): when the buffer
        is the header of a bulk frame alone (a COPY or CHUNK of `BULK_BODY` bytes or more;
        call it after `next_event` gave NEED_DATA, so that header was checked), a writable
        view of the rest of a new buffer of that frame's size, to read into and report with
        `received(n)`; else None (read `receive_size` bytes for `receive_data`). The frame
        arrives where its body is handed up from: no copy of it in this process."""
        if self._into is None:
            if len(self.buf) != HEADER.size or self.state != OPEN:
                return None
            t = TYPES.get(self.buf[0])
            length = HEADER.unpack_from(self.buf)[3]
            if t is None or not t.raw or length < BULK_BODY:
                return None
            frame = bytearray(HEADER.size + length)
            frame[:HEADER.size] = self.buf
            self._into = [frame, HEADER.size]
        frame, got = self._into
        return memoryview(frame)[got:]

    def received(self, n: int) -> None:
        """`n` bytes were read into `receive_buffer()`'s view."""
        into = self._into
        into[1] += n
        if into[1] == len(into[0]):  # whole: the frame alone in the buffer (_next takes it)
            self.buf, self._into = into[0], None

    def next_event(self):
        """The next Message, or NEED_DATA; raises ProtocolError (then the connection is
        CLOSED for good)."""
        if self.error is not None:
            raise self.error
        try:
            return self._next()
        except ProtocolError as e:
            self.error = e
            self.state = CLOSED
            raise

    def _preface(self):
        """PREFACE_WAIT: True once the preface is taken, NEED_DATA before; raises if the
        first bytes are not this build's preface."""
        n = min(len(self.buf), len(PREFACE))
        if bytes(self.buf[:n]) == PREFACE[:n]:
            if n < len(PREFACE):
                return NEED_DATA
            del self.buf[:len(PREFACE)]
            return True
        got = bytes(self.buf[:len(PREFACE)])
        if not got.startswith(PREFACE_PREFIX):
            raise ProtocolError(f"not an RCP connection (it starts {one_line(got[:16])}, not "
                                f"{PREFACE_PREFIX.decode()})")
        # another RCP: name its version (its preface's first word) whatever the split
        word = got.split(b" ")[0]
        if word == got and not any(c in got for c in b"\r\n") and len(got) < len(PREFACE):
            return NEED_DATA
        word = word.split(b"\r")[0].split(b"\n")[0]
        mine = PREFACE.split(b" ")[0]
        if word == mine:
            raise ProtocolError(f"malformed RCP preface {one_line(got)}")
        raise ProtocolError(f"the peer speaks {one_line(word.decode('ascii', 'replace'), 32)}; "
                            f"this site speaks {mine.decode()}", "version")

    def _next(self):
        while True:
            if self.state == CLOSED:
                return NEED_DATA
            if self.state == PREFACE_WAIT:
                got = self._preface()
                if got is NEED_DATA:
                    return got
                self.state = HELLO_WAIT
                continue
            if len(self.buf) < HEADER.size:
                return NEED_DATA
            code, flags, reserved, length, session, seq, check = HEADER.unpack_from(self.buf)
            t = TYPES.get(code)
            if t is None:
                raise ProtocolError(f"unknown message type {code}")
            if reserved or flags & ~KNOWN_FLAGS:
                raise ProtocolError(f"{t.name}: unknown flags or reserved bits set")
            # refused from the header alone: an unauthenticated peer cannot make this end
            # wait for (and buffer) a body it would refuse anyway
            if t.sender not in (("both", SERVER) if self.role == CLIENT else ("both", CLIENT)):
                raise ProtocolError(f"a {'server' if self.role == CLIENT else 'client'} "
                                    f"does not send {t.name}")
            if t.name not in ("CLOSE", "ERROR") and \
                    t.name not in ALLOWED[self.role].get(self.state, ()):
                raise ProtocolError(f"unexpected {t.name} (session state: {self.state})")
            limit = (MAX_HANDSHAKE_BODY if self.state != OPEN
                     else MAX_BODY if t.raw else MAX_CONTROL_BODY)
            if length > limit:
                raise ProtocolError(f"{t.name} of {length} bytes (at most {limit})")
            if len(self.buf) < HEADER.size + length:
                return NEED_DATA
            if t.raw and len(self.buf) == HEADER.size + length:
                # a bulk frame alone in the buffer (the adapter reads what `receive_size`
                # says): its body is handed up as a view of that buffer, not copied, and a
                # new buffer takes the next frames (so the del below finds it empty)
                frame, self.buf = self.buf, bytearray()
                body = memoryview(frame)[HEADER.size:]
                ok = check_of(memoryview(frame)[:20], body) == check
            else:
                with memoryview(self.buf) as view:
                    body = bytes(view[HEADER.size:HEADER.size + length])
                    ok = check_of(view[:20], body) == check
            if not ok:
                raise ProtocolError(f"{t.name} frame {seq}: checksum mismatch (damaged on "
                                    "the wire)")
            del self.buf[:HEADER.size + length]
            if seq != self.recv_seq + 1:
                raise ProtocolError(f"{t.name}: frame {seq} where {self.recv_seq + 1} was due")
            self.recv_seq = seq
            if session != self.session and not (t.name == "READY" and self.role == CLIENT):
                raise ProtocolError(f"{t.name}: session {session}, not {self.session}")
            if flags & FLAG_ZSTD:
                body = self._inflate(t, seq, body)
            doc = decode_body(t, body)
            msg = Message(t.name, seq, doc, flags, session)
            out = self._on(msg)
            if out is not None:
                return out

    def _inflate(self, t: MsgType, seq: int, body: bytes) -> bytes:
        """A compressed body, decompressed to at most MAX_BODY bytes (more: a protocol
        error, never allocated: the frame header's content size is checked first)."""
        if "zstd" not in self.agreed:
            raise ProtocolError(f"{t.name}: compressed, but compression was not agreed")
        if not t.raw:
            raise ProtocolError(f"{t.name}: compressed, but only COPY and CHUNK bodies may be")
        try:
            size = zstandard.frame_content_size(body)
            if size > MAX_BODY:
                raise ProtocolError(f"{t.name} frame {seq}: decompresses to {size} bytes (at "
                                    f"most {MAX_BODY})")
            if self._dctx is None:
                self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << 21)
            # (with no content size in its header, max_output_size bounds what is made)
            out = self._dctx.decompress(body, max_output_size=MAX_BODY,
                                        allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise ProtocolError(f"{t.name} frame {seq}: bad compressed body "
                                f"({one_line(str(e), 100)})") from None
        if size >= 0 and len(out) != size:  # (zstd checks it; never trusted)
            raise ProtocolError(f"{t.name} frame {seq}: decompressed to {len(out)} bytes, its "
                                f"header said {size}")
        if len(out) > MAX_BODY:
            raise ProtocolError(f"{t.name} frame {seq}: decompresses to more than {MAX_BODY} "
                                "bytes")
        return out

    def _on(self, msg: Message):
        """Handle a frame the state allows (`ALLOWED`); a Message to hand up, or None."""
        name, st = msg.type, self.state
        if name == "ERROR" and st != OPEN:
            b = msg.body
            why = f"the peer refused: {one_line(b['message'])}"
            raise ProtocolError(why, one_line(b["kind"], 32), remote=True,
                                detail=f"{self._unknown()} ({why})" if self.decoy else None)
        if name == "CLOSE":
            self.state = CLOSED
            return msg
        if name in ("ACK", "ERROR") and msg.body["seq"] > self.send_seq:
            raise ProtocolError(f"{name} for frame {msg.body['seq']}, which this end has not "
                                f"sent")
        if name == "HELLO":
            return self._on_hello(msg)
        if name == "AUTH":
            return self._on_auth(msg)
        if name == "CHALLENGE":
            return self._on_challenge(msg)
        if name == "READY":
            s = msg.body["session"]
            if not 0 < s < 1 << 32 or s != msg.session:
                raise ProtocolError(f"READY with a bad session number ({s} in the body, "
                                    f"{msg.session} in the header)")
            self.peer = {**self.peer, **_identity(msg.body, "READY")}
            self.session = s
            self.state = OPEN
        return msg

    def _on_hello(self, msg: Message):
        b = msg.body
        self.peer = b
        if len(b["nonce"]) != NONCE:
            raise ProtocolError("HELLO nonce of the wrong size")
        if len(b["group"]) > MAX_NAME or len(b["site"]) > MAX_SITE or len(b["uuid"]) > MAX_NAME:
            raise ProtocolError("HELLO names too long")
        versions = b["versions"]
        if len(versions) > MAX_VERSIONS:
            raise ProtocolError(f"HELLO offers {len(versions)} versions (at most {MAX_VERSIONS})")
        common = [v for v in versions if _type_ok(v, int) and v in self.versions]
        if not common:
            offered = ", ".join(one_line(v, 20) for v in versions[:16])
            raise ProtocolError(f"no common protocol version: the peer speaks {offered or 'none'}"
                                f", this site speaks "
                                f"{', '.join(str(v) for v in self.versions)}", "version")
        offered = _features(b, "HELLO")
        secret = self.secrets(b["group"]) if self.secrets else None
        # a group this site does not hold is not refused here: it gets a CHALLENGE as a
        # known one does (proved with a decoy key) and is refused after AUTH with a wrong
        # secret's message; only this end's log says which it was
        self.decoy = secret is None
        self.version = max(common)
        self.group = b["group"]
        self.secret = _decoy_secret(self.group) if secret is None else secret
        self.peer_nonce = b["nonce"]
        self.my_nonce = self._nonce(NONCE)
        # (site and uuid empty: who this site is goes in READY, once the client proved the
        # secret; the keys stay for clients of version 1, which require them)
        challenge = {
            "version": self.version, "nonce": self.my_nonce, "site": "", "uuid": "",
            "proof": proof(self.secret, SERVER, self.group, self.peer_nonce, self.my_nonce)}
        if offered is not None:  # (a peer that offers none is told none)
            self.agreed = frozenset(f for f in self.features if f in offered)
            challenge["features"] = sorted(self.agreed)
        self.outgoing += self._frame("CHALLENGE", challenge)
        self.state = AUTH_WAIT
        return msg

    def _unknown(self) -> str:
        return f"unknown replication group {one_line(self.group)!r}"

    def _on_auth(self, msg: Message):
        want = proof(self.secret, CLIENT, self.group, self.peer_nonce, self.my_nonce)
        if not hmac.compare_digest(want, msg.body["proof"]) or self.decoy:
            raise ProtocolError(f"authentication failed for group {self.group!r} (wrong "
                                "secret?)", "auth",
                                detail=self._unknown() if self.decoy else None)
        self.peer = {**self.peer, **_identity(msg.body, "AUTH")}
        self.session = self._new_session or 1
        self.outgoing += self._frame("READY", {"session": self.session, "site": self.site,
                                               "uuid": self.uuid})
        self.state = OPEN
        return Message("READY", msg.seq, {"session": self.session}, 0, self.session)

    def _on_challenge(self, msg: Message):
        b = msg.body
        self.peer = b
        if b["version"] not in self.versions:
            raise ProtocolError(f"the peer chose protocol version {b['version']}, which this "
                                f"site does not speak", "version")
        if len(b["nonce"]) != NONCE:
            raise ProtocolError("CHALLENGE nonce of the wrong size")
        if len(b["site"]) > MAX_SITE or len(b["uuid"]) > MAX_NAME:
            raise ProtocolError("CHALLENGE names too long")
        want = proof(self.secret or b"", SERVER, self.group, self.my_nonce, b["nonce"])
        if self.secret is None or not hmac.compare_digest(want, b["proof"]):
            raise ProtocolError(f"the peer does not hold the secret of group {self.group!r}",
                                "auth")
        agreed = _features(b, "CHALLENGE") or []
        extra = [f for f in agreed if f not in self.features]
        if extra:
            raise ProtocolError(f"the peer agreed to {one_line(', '.join(extra))}, which this "
                                f"end did not offer")
        self.agreed = frozenset(agreed)
        self.version = b["version"]
        self.peer_nonce = b["nonce"]
        self.outgoing += self._frame("AUTH", {
            "proof": proof(self.secret, CLIENT, self.group, self.my_nonce, self.peer_nonce),
            "site": self.site, "uuid": self.uuid})  # (the server proved the secret)
        self.state = READY_WAIT
        return None

    def take_outgoing(self) -> bytes:
        """The bytes the state machine made itself (CHALLENGE, AUTH, READY), to be sent now."""
        data = bytes(self.outgoing)
        self.outgoing.clear()
        return data
