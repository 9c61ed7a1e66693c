"""The daemon's control port: HTTP/1.1 with JSON bodies, authenticated by a bearer token.

The token is ``SITE/control.token`` (mode 0600, made at the first mount); the address the
daemon listens on is ``SITE/control.json``, so `repfs-admin --site SITE_OR_MOUNTPOINT` needs
neither at hand. h11 parses HTTP (a well-kept, I/O-free parser); routing and the verbs are
ours. An unauthenticated or malformed request gets a 4xx and changes nothing.

The port is a network service and trusts no peer: `ControlServer` bounds connections, header
and body sizes (per route) and the time each part of a request may take, checks the token
before it reads a body, and answers every request in JSON; `_route` checks every argument's
type and range (the `_uint`, `_seconds`, `_size`, `_bool`, `_new_name`, `_path` helpers)
before a verb runs. Domain errors (repfs/errors.py) become HTTP statuses here alone
(STATUS_OF_KIND); anything unexpected is a logged 500. The limits are documented in
docs/user-guide.md ("The control port and repfs-admin").

The same port serves RCP, the replication protocol between hosts (FIG. 19): `handle` reads a
connection's first bytes and gives those that start with RCP's preface to rcp/server.py,
which runs each authenticated request through `_dispatch` on the route of its receiver
endpoint (the same checks and statuses); the connection counts against the same limit.

Routes (all under /v1):

| method | path | body | does |
|---|---|---|---|
| GET | /status | | site, mount state, usage, snapshots, save-volume usage |
| GET | /snapshots | | the snapshot queue, oldest first |
| POST | /snapshots | {"name", "attrs"?} | create a snapshot (at a consistency point) |
| DELETE | /snapshots/NAME | | delete it |
| POST | /snapshots/NAME/restore | | restore the live file system to it, online |
| POST | /snapshots/NAME/mount | {"mountpoint"} | mount it read-only |
| POST | /snapshots/NAME/clone | {"newsite", "label"?} | a new, independent site NEWSITE (a directory on this host) from it (recovery/clone.py) |
| POST | /remount | {"options"?, "readonly"?} | `mount -o remount,...` (mountopts.py) |
| GET | /snapshots/NAME/diff?to=OTHER&paths=1 | | changed blocks (and paths) from NAME to OTHER (default: live) |
| POST | /replicate/start, /stop, /policy, /deltaset | JSON | the `replicate` verbs (docs/replication.md) |
| GET | /repl/receiver | | a secondary's receiver state (for its primary) |
| POST | /repl/attach, /start-playback, /commit | JSON | primary to secondary: attach, end of the initial copy, delta-set header |
| POST | /repl/copy, /repl/chunk | octet-stream | primary to secondary: an initial-copy record, a delta chunk |
| POST | /failover | {"sync"?, "now"?, "dry_run"?} | `failover` at a secondary (recovery/failover.py) |
| POST | /repl/failover | {"step", "generation", "by", "after"?} | secondary to primary at a failover: "report", "fence", "sync" |
| POST | /resync | {"peer", "group"?, "dry_run"?} | `resync --peer` at a new primary (recovery/resync.py) |
| POST | /switchover, /failback | {"to"} / {} | `switchover --to DEST`, `failback` at a primary (recovery/switchover.py) |
| POST | /repl/resync | {"step", "generation", "by", "after", "dry_run"?, "first_page"?, "bits"?, "primary"?, "nblocks"?, "keep"?} | new primary to old at a resync: "blocklist" (in parts), "blockhashes", "paths" (dry run), "attach" |
| POST | /copy | {"snapshot", "to", "base"?, "group"?, "force"?, "bwlimit"?, "dry_run"?} | `copy SNAP --to PEER` (recovery/copy.py) |
| POST | /pull | {"from", "group"?, "min_interval"?, "dry_run"?} | `pull --from PEER` at a copy |
| POST | /repl/pull | {"have"?, "to", "group"?, "dry_run"?} | a copy to its source at a pull: FIG. 37-38's choice, then the copy |
| POST | /verify | {"to", "repair"?, "wait"?} | `verify --to DEST`: compare with a secondary at a delta-set boundary (repl/verify.py) |
| POST | /repl/verify | {"step", "at", "generation", "ranges"?} | primary to secondary: verify's hold of playback and range hashes |
| GET | /groups | | the replication groups' names (never their secrets) |
| POST | /groups | {"name", "secret" (hex), "force"?} | `group add` (rcp/groups.py `GroupStore.put`) |
| DELETE | /groups/NAME | | `group delete` (refused while the group has routes) |
| GET | /routes | | {group: [next hop, ...]} (rcp/routes.py) |
| POST | /routes | {"group", "next_hop"} | `route add` |
| DELETE | /routes/GROUP[/NEXTHOP] | | `route delete` (all of the group's routes, or one) |

And `GET /metrics` (outside /v1): Prometheus metrics in the text exposition format
(repfs/metrics.py), without the token if site.toml says `[metrics] open = true`.
"""

from __future__ import annotations

import errno
import hmac
import json
import collections
import contextvars
import logging
import math
import os
import re
import secrets
import socket
import ssl
import stat
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import lmdb
import numpy as np
import trio

from .errors import DomainError
from .rcp.wire import PREFACE_PREFIX
from .repl.chunk import MAX_CHUNK_BLOCKS, MAX_EXTENTS
from .site import SiteError
from .snap.store import NAME_RULE, valid_name
from .statefile import write_durably

log = logging.getLogger(__name__)

# Limits of the control port (docs/user-guide.md, "The control port").
MAX_CONNECTIONS = 64  # at once; more get a 503 and are closed
MAX_UNAUTHENTICATED = 16  # of those, not yet authenticated; a newer one closes the oldest
REFUSALS_LOGGED = 20  # refusals of connections logged (WARNING) per minute; then a count
MAX_HEAD = 16 << 10  # request line and headers
MAX_JSON_BODY = 64 << 10  # a JSON request
# a chunk upload (header, extent list, data) or an initial-copy record, with room to spare
MAX_BINARY_BODY = MAX_CHUNK_BLOCKS * 4096 + MAX_EXTENTS * 8 + 4096
BINARY_ROUTES = {b"/v1/repl/chunk", b"/v1/repl/copy"}
HEAD_TIMEOUT = 10.0  # s from a request's first byte to the end of its headers
BODY_TIMEOUT = 60.0  # s from the headers to the end of the body
IDLE_TIMEOUT = 60.0  # s a kept-alive connection may wait for its next request
SEND_TIMEOUT = 60.0  # s the peer has to take a reply
LINGER = 2.0  # s a refused connection is drained before it is closed
# bytes drained at most: a window of pipelined uploads (repfs/repl/transport.py MAX_WINDOW)
LINGER_BYTES = 64 * MAX_BINARY_BODY
MAX_JSON_DEPTH = 32
MAX_PATH = 4096  # bytes of a path argument
MAX_OPTIONS = 4096  # characters of a remount's mount options
MAX_SECONDS = 10 * 365 * 86400  # a time setting (timeouts, retention)
MAX_SIZE = 1 << 50  # a size setting in bytes (high-water marks)
U64_MAX = (1 << 64) - 1


# the one place where domain errors (repfs/errors.py) become HTTP statuses
STATUS_OF_KIND = {"invalid": 400, "not_found": 404, "conflict": 409, "busy": 503,
                  "failed": 500}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def token_file_problem(path: Path, *, owner: bool = True) -> str | None:
    """Why a token file must not be trusted, or None: other users may read or change it (any
    group or other permission bit), or (with `owner`) another user owns it."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # (missing: made; unreadable: reading it says why)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return (f"{path} is open to other users (mode {mode:04o}); anyone who read it can "
                f"control the site: make a new one (rm {path}; the next mount writes it) or "
                f"at least chmod 600 {path}")
    if owner and st.st_uid != os.geteuid():
        return (f"{path} belongs to uid {st.st_uid}, not to the daemon's user "
                f"(uid {os.geteuid()}): remove it (the next mount writes a new one)")
    return None


def ensure_token(site_path: Path) -> str:
    """The control port's bearer token, made (durably, 0600) if the site has none. A token file
    that a power cut left empty or torn is replaced by a new token, with a warning; one that
    other users may read or change is refused (SiteError)."""
    path = Path(site_path) / "control.token"
    problem = token_file_problem(path)
    if problem:
        raise SiteError(problem)
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = None
    except UnicodeDecodeError:
        token = ""
    except OSError as e:
        raise SiteError(f"cannot read {path}: {e.strerror}") from None
    if token is not None and _TOKEN_RE.fullmatch(token):
        return token
    if token is not None:
        log.warning("%s is empty or damaged (a crash while it was written?): making a new token",
                    path)
    token = secrets.token_urlsafe(32)
    try:
        write_durably(path, token + "\n", 0o600)
    except OSError as e:
        raise SiteError(f"cannot write {path}: {e.strerror}") from None
    return token


_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{32,128}")


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad listen address {text!r} (want HOST:PORT)")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def _short(v) -> str:
    """A value for an error message: its repr, cut to a readable length."""
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _uint(v, what: str, limit: int = U64_MAX):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limit:
        raise HTTPError(400, f"bad {what} {_short(v)}: want an integer from 0 to {limit}")
    return v


def _seconds(v, what: str):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_SECONDS:
        raise HTTPError(400, f"bad {what} {_short(v)}: want seconds from 0 to {MAX_SECONDS}")
    return v


def _size(v, what: str):
    if v is None:
        return None
    return _uint(v, what, MAX_SIZE)


def _bool(v, what: str, default: bool) -> bool:
    if v is None:
        return default
    if not isinstance(v, bool):
        raise HTTPError(400, f"bad {what} {_short(v)}: want true or false")
    return v


def _new_name(v, what: str = "snapshot name", prefix: str = "") -> str:
    """A name that goes into the indexes: it must fit every one of them (store.valid_name)."""
    if not isinstance(v, str) or not valid_name(prefix + v):
        raise HTTPError(400, f"bad {what} {_short(v)} ({NAME_RULE}"
                             + (f", after the prefix {prefix!r})" if prefix else ")"))
    return v


def _lookup_name(v, what: str = "snapshot name") -> str:
    """A name that is only looked up (it may predate today's naming rules)."""
    if not isinstance(v, str) or not 0 < len(v) <= 200 or "\0" in v:
        raise HTTPError(400, f"bad {what} {_short(v)}")
    return v


def _path(v, what: str) -> str:
    if (not isinstance(v, str) or not v.startswith("/") or "\0" in v
            or len(v.encode(errors="surrogatepass")) > MAX_PATH):
        raise HTTPError(400, f"bad {what} {_short(v)}: want an absolute path")
    return v


def _scalar_map(v, what: str, max_items: int, max_str: int) -> dict:
    """A flat JSON object of short string keys and scalar values (attributes, identities)."""
    if not isinstance(v, dict) or len(v) > max_items:
        raise HTTPError(400, f"bad {what}: want an object of at most {max_items} entries")
    for k, x in v.items():
        if not 0 < len(k) <= 128 or not k.isprintable():
            raise HTTPError(400, f"bad {what} key {_short(k)}: 1-128 printable characters")
        ok = (x is None or isinstance(x, bool) or (isinstance(x, int) and abs(x) <= U64_MAX)
              or isinstance(x, float) or (isinstance(x, str) and len(x) <= max_str))
        if not ok:
            raise HTTPError(400, f"bad {what} value {_short(x)} for {k!r}: want a string of at "
                                 f"most {max_str} characters, a number, true, false or null")
    return v


def _peer(v, what: str) -> str:
    """A peer site: its directory on this host, or HOST:PORT."""
    if not isinstance(v, str) or not 0 < len(v) <= MAX_PATH or not v.isprintable():
        raise HTTPError(400, f"bad {what} {_short(v)} (want a site directory or HOST:PORT)")
    return v


def _uint_pairs(v, what: str, limit: int) -> list[tuple[int, int]]:
    """A list of at most `limit` [start, count] pairs of unsigned integers."""
    if not isinstance(v, list) or not 0 < len(v) <= limit or not all(
            isinstance(x, list) and len(x) == 2 for x in v):
        raise HTTPError(400, f"bad {what}: want 1 to {limit} [start, count] pairs")
    return [(_uint(a, f"start in {what}"), _uint(b, f"count in {what}")) for a, b in v]


async def _verify_step(svc, args: dict):
    """POST /v1/repl/verify: a step of a primary's verify at this secondary (repl/verify.py)."""
    from .repl.verify import MAX_INVALIDATE, MAX_RANGES, STEPS
    step = args.get("step")
    if step not in STEPS:
        raise HTTPError(400, f"bad verify step {_short(step)}: want one of {', '.join(STEPS)}")
    gen = _uint(args.get("generation"), "generation")
    at = ranges = inodes = None
    if step in ("hold", "hashes"):
        at = _uint(args.get("at"), "delta set number (at)")
    if step == "hashes":
        ranges = _uint_pairs(args.get("ranges"), "ranges", MAX_RANGES)
    if step == "invalidate":
        inodes = args.get("inodes")
        if not isinstance(inodes, list) or len(inodes) > MAX_INVALIDATE:
            raise HTTPError(400, f"bad inodes: want a list of at most {MAX_INVALIDATE}")
        inodes = [_uint(i, "inode number") for i in inodes]
    return await svc.secondary.verify.request(step, gen, at=at, ranges=ranges, inodes=inodes)


def _binary(args: dict) -> bytes:
    body = args.get("_body")
    if body is None:
        raise HTTPError(400, "want an application/octet-stream body")
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} is out of range")
    return v


def _check_json(v, depth: int = 0) -> None:
    """Refuse what json.loads lets through but nothing downstream wants: deep nesting and
    strings that are not Unicode (lone surrogates from \\ud800 escapes)."""
    if depth > MAX_JSON_DEPTH:
        raise HTTPError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(v, str):
        try:
            v.encode()
        except UnicodeEncodeError:
            raise HTTPError(400, "a JSON string is not valid Unicode (a lone surrogate)") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_json(k, depth + 1)
            _check_json(x, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _check_json(x, depth + 1)


def parse_json_body(body: bytes) -> dict:
    """A request's JSON object: strict UTF-8, no NaN or infinities, bounded nesting."""
    if not body:
        return {}
    try:
        args = json.loads(body.decode("utf-8"), parse_constant=_no_constant,
                          parse_float=_finite_float)
    except UnicodeDecodeError:
        raise HTTPError(400, "the JSON body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise HTTPError(400, f"malformed JSON body: {e}") from None
    except RecursionError:
        raise HTTPError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # NaN, Infinity, 1e400, an integer of thousands of digits
        raise HTTPError(400, f"bad JSON value: {e}") from None
    if not isinstance(args, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    _check_json(args)
    return args


def body_limit(method: bytes, target: bytes) -> int:
    """How large a request's body may be: uploads of chunks and copy records, or small JSON."""
    if method == b"POST" and target.split(b"?")[0].rstrip(b"/") in BINARY_ROUTES:
        return MAX_BINARY_BODY
    return MAX_JSON_BODY


_REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 409: "Conflict", 413: "Content Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


async def send_and_linger(stream, data: bytes, send_timeout: float) -> None:
    """Send the last bytes of a connection (an error reply, an RCP ERROR), then read and drop
    what the peer still sends for a moment (at most LINGER s and LINGER_BYTES) before it is
    closed: closing with unread data resets the connection, and the peer would lose what was
    sent. Both transports end a refused connection so (this and rcp/server.py)."""
    with trio.move_on_after(min(send_timeout, LINGER)):
        try:
            await stream.send_all(data)
            if hasattr(stream, "send_eof"):  # (not inside TLS)
                await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
    with trio.move_on_after(LINGER):
        dropped = 0
        try:
            while dropped < LINGER_BYTES:
                data = await stream.receive_some(65536)
                if not data:
                    break
                dropped += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def raw_reply(status: int, message: str) -> bytes:
    """A whole error reply that closes the connection, written without h11 (which may be in an
    error state, or never have seen a request)."""
    data = (json.dumps({"error": message}) + "\n").encode()
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
            "connection: close\r\n\r\n").encode() + data


def _plain_upload(req) -> bool:
    """Whether a request's body may be read past h11 (`ControlServer._read_upload`):
    HTTP/1.1, kept alive, a Content-Length and no transfer coding or 100-continue."""
    if req.http_version != b"1.1":
        return False
    for name, value in req.headers:
        if name in (b"transfer-encoding", b"expect") or (
                name == b"connection" and b"close" in value.lower()):
            return False
    return True


def _answer_head(status: int, length: int) -> bytes:
    """The head of a JSON answer that keeps the connection open (as h11 writes it)."""
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'OK' if status == 200 else 'Error')}"
            f"\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
            ).encode()


def _has_body(req) -> bool:
    """Whether a request's headers announce a body (a Content-Length above 0, or chunked)."""
    for name, value in req.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


def _is_metrics(req) -> bool:
    """A request for the Prometheus metrics (GET /metrics, repfs/metrics.py)."""
    return req.target.split(b"?")[0].rstrip(b"/") == b"/metrics"


_AFTER_FAILED = ("not applied: an earlier upload pipelined on this connection failed; send "
                 "again from that one")


async def _rcp_config(site_path, method: str, parts: list[str], args: dict):
    """/v1/groups and /v1/routes: the `group` and `route` verbs on a site reached by HOST:PORT
    (repfs-admin changes a local site's files itself). A secret comes in the JSON body as hex,
    is never logged (errors name the group, not the secret) and never sent back. The writes
    fsync, so they run in a worker thread."""
    from .rcp.groups import GROUP_RULE, MAX_SECRET, GroupStore, valid_group
    from .rcp.routes import Routes, delete_group, parse_next_hop

    def group(v, what="group name"):
        if not isinstance(v, str) or not valid_group(v):
            raise HTTPError(400, f"bad {what} {_short(v)} ({GROUP_RULE})")
        return v

    def hop(v):
        if not isinstance(v, str) or not 0 < len(v) <= 300:
            raise HTTPError(400, f"bad next hop {_short(v)} (want HOST:PORT)")
        return v

    run = trio.to_thread.run_sync
    if parts == ["groups"] and method == "GET":
        return GroupStore(site_path).names()
    if parts == ["groups"] and method == "POST":
        name = group(args.get("name"))
        secret = args.get("secret")
        if (not isinstance(secret, str) or len(secret) > 2 * MAX_SECRET
                or not re.fullmatch(r"(?:[0-9a-f]{2})+", secret)):
            raise HTTPError(400, "want {\"name\": string, \"secret\": the secret in hex, "
                                 "\"force\": bool}")
        force = _bool(args.get("force"), "force", False)
        result = await run(lambda: GroupStore(site_path).put(name, bytes.fromhex(secret),
                                                             force=force))
        return {"group": name, "result": result}
    if len(parts) == 2 and parts[0] == "groups" and method == "DELETE":
        name = group(parts[1])
        await run(delete_group, site_path, name)
        return {"group": name, "deleted": True}
    if parts == ["routes"] and method == "GET":
        return Routes(site_path).table()
    if parts == ["routes"] and method == "POST":
        name, next_hop = group(args.get("group")), hop(args.get("next_hop"))
        added = await run(Routes(site_path).add, name, next_hop)
        return {"group": name, "next_hop": parse_next_hop(next_hop), "added": added}
    if 2 <= len(parts) <= 3 and parts[0] == "routes" and method == "DELETE":
        name = group(parts[1])
        next_hop = hop(parts[2]) if len(parts) == 3 else None
        gone = await run(Routes(site_path).delete, name, next_hop)
        return {"group": name, "deleted": gone}
    raise HTTPError(404 if method in ("GET", "POST", "DELETE") else 405,
                    f"no such operation: {method} /v1/{'/'.join(parts)}")


class _Refuse(Exception):
    """End this connection with an error reply (status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Pending:
    """A connection that has not authenticated yet: its deadline (trio time) and its scope."""

    def __init__(self, deadline: float, scope: trio.CancelScope):
        self.deadline = deadline
        self.scope = scope


# the connection the current task serves (each connection has its own task): its _Pending
# until it authenticates, then None
_pending: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar("_pending",
                                                                           default=None)


class RefusalLog:
    """WARNING lines for refused connections, at most `limit` per minute (strangers must not
    fill the log): the rest are counted, and the count is logged with the next refusal after
    the minute."""

    def __init__(self, limit: int = REFUSALS_LOGGED, period: float = 60.0):
        self.limit = limit
        self.period = period
        self.start = -math.inf
        self.logged = 0
        self.dropped = 0

    def warning(self, logger: logging.Logger, fmt: str, *args) -> None:
        now = trio.current_time()
        if now - self.start >= self.period:
            if self.dropped:
                logger.warning("%d more refused connections in the last %g s were not "
                               "logged (at most %d lines a minute)", self.dropped,
                               now - self.start, self.limit)
            self.start, self.logged, self.dropped = now, 0, 0
        if self.logged >= self.limit:
            self.dropped += 1
            return
        self.logged += 1
        logger.warning(fmt, *args)


class ControlServer:
    """Serves the control port. Every connection gets bounded time, memory and work:

    * at most `max_connections` at once; more get a 503 and are closed;
    * one deadline, `head_timeout` from accept, for everything before it authenticates (the
      TLS handshake, the first bytes, the RCP handshake up to READY, or the HTTP request
      heads up to the first one that carries the token: `pre_auth_limit`); at most
      `max_unauthenticated` connections are that far at once: a new one closes the oldest
      (strangers cannot hold the slots authenticated peers need); refusals are logged at most
      REFUSALS_LOGGED a minute (`refusals`);
    * the request line and headers (at most MAX_HEAD bytes) must arrive within `head_timeout`
      of the request's first byte, and the body within `body_timeout` of the headers; a
      connection idle between requests is closed after `idle_timeout` (after `head_timeout`
      until it has made one authenticated request);
    * the token is checked from the headers before any byte of the body is read; the body
      may be MAX_JSON_BODY bytes, or MAX_BINARY_BODY for chunk and copy uploads;
    * requests may be pipelined (sent before the answers to earlier ones): they are served
      one at a time, in order, each checked and limited as above (what was read ahead stays
      in h11's buffer, unread by any verb, at most one read's worth); the uploads pipelined
      behind a chunk or copy upload that failed get a 503 and are not applied;
    * every request gets a JSON reply: 2xx, a 4xx naming the problem, or a 500 (logged) for
      a bug; a refused connection gets its reply and is closed.
    """

    def __init__(self, service, token: str, *, max_connections: int = MAX_CONNECTIONS,
                 head_timeout: float = HEAD_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT, send_timeout: float = SEND_TIMEOUT,
                 metrics_open: bool = False, tls=None,
                 max_unauthenticated: int = MAX_UNAUTHENTICATED):
        """`tls`: an ssl.SSLContext (site.toml [tls], rcp/tls.py): the port speaks TLS only."""
        self.service = service
        self.tls = tls
        self.token = token.encode()
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.metrics_open = metrics_open  # GET /metrics without the token (site.toml)
        self.active = 0
        self.max_unauthenticated = max(1, min(max_unauthenticated, max_connections))
        self.pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self.refusals = RefusalLog()
        self.evicted = 0  # connections closed for a newer one (not yet authenticated)

    def pre_auth_limit(self) -> float:
        """Seconds the current connection's next step may take: what is left of its
        pre-authentication deadline until it has authenticated, then `head_timeout`."""
        p = _pending.get()
        if p is None:
            return self.head_timeout
        return max(0.0, p.deadline - trio.current_time())

    def refused(self, logger: logging.Logger, fmt: str, *args) -> None:
        """Log the refusal of the current connection: at most REFUSALS_LOGGED a minute
        before it has authenticated (`refusals`), every one after."""
        if _pending.get() is None:
            logger.warning(fmt, *args)
        else:
            self.refusals.warning(logger, fmt, *args)

    def authenticated(self) -> None:
        """The current connection has authenticated (a request with the token, RCP READY):
        no longer bound by the pre-authentication deadline, nor counted among those."""
        p = _pending.get()
        if p is not None:
            _pending.set(None)
            self.pending.pop(id(p), None)
            p.scope.deadline = math.inf

    async def serve(self, sock: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await trio.serve_listeners(self.handle, [listener], task_status=task_status)

    async def handle(self, stream) -> None:
        try:
            if self.active >= self.max_connections:
                await self._refuse(stream, 503, f"too many control connections (at most "
                                                f"{self.max_connections}); try again")
                return
            self.active += 1
            # not authenticated yet: one deadline for all of that (the stages take what is
            # left of it: pre_auth_limit; the scope is the backstop, with time for a refusal
            # to be sent), and a cap: a new connection over it closes the oldest
            scope = trio.CancelScope(deadline=trio.current_time() + self.head_timeout
                                     + 2 * LINGER + 1.0)
            pending = _Pending(trio.current_time() + self.head_timeout, scope)
            from .rcp.server import _peer_name
            while len(self.pending) >= self.max_unauthenticated:
                _, oldest = self.pending.popitem(last=False)
                oldest.scope.cancel()
                self.evicted += 1
                self.refusals.warning(log, "%d control port connections have not "
                                      "authenticated: the oldest is closed for a new one "
                                      "from %s", self.max_unauthenticated, _peer_name(stream))
            self.pending[id(pending)] = pending
            _pending.set(pending)
            try:
                with scope:
                    if self.tls is not None:  # (then the same filter, inside TLS)
                        inner = await self._tls_handshake(stream)
                        if inner is None:
                            return
                        stream = inner
                    first = await self._first_bytes(stream)
                    if first is None:
                        return
                    if first.startswith(PREFACE_PREFIX):  # RCP shares the port (FIG. 19)
                        from .rcp.server import RcpServer
                        await RcpServer(self).serve(stream, first)
                    else:
                        await self._connection(stream, first)
            finally:
                self.active -= 1
                self.pending.pop(id(pending), None)
        except Exception:  # noqa: BLE001 - a bug in one connection must not take the site down
            log.exception("control connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _tls_handshake(self, stream):
        """The connection inside TLS (rcp/tls.py), or None: a peer that sends nothing within
        the head timeout is closed quietly; plain text, a failed handshake (an untrusted or
        missing certificate) are logged once, with the peer and the reason, and closed."""
        from .rcp.server import _peer_name
        from .rcp.tls import TLS_RECORD, reason
        peer = _peer_name(stream)
        first = b""
        with trio.move_on_after(self.pre_auth_limit()):
            try:
                first = await stream.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                return None
        if not first:
            return None
        if first[0] != TLS_RECORD:
            self.refusals.warning(log, "plain-text connection from %s refused: this port "
                                  "speaks TLS only (site.toml [tls])", peer)
            await self._refuse(stream, 400, "this port speaks TLS only (site.toml [tls]): "
                                            "connect with TLS (repfs-admin --tls-ca, "
                                            "--tls-cert, --tls-key)")
            return None
        tls = trio.SSLStream(stream, self.tls, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(self.pre_auth_limit()):
                await tls.do_handshake()
        except trio.TooSlowError:
            self.refusals.warning(log, "TLS handshake with %s refused: not done within %g s "
                                  "of the connection", peer, self.head_timeout)
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.refusals.warning(log, "TLS handshake with %s refused: %s", peer,
                                  reason(e.__cause__ or e))
            # the alert OpenSSL wrote for the peer (unknown CA, no certificate...), which
            # trio's SSLStream leaves unsent once broken: sent, so the client learns why
            alert = getattr(tls, "_outgoing", None)
            data = alert.read() if isinstance(alert, ssl.MemoryBIO) else b""
            if data:
                with trio.move_on_after(1.0):
                    try:
                        await stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            return None
        return tls

    async def _first_bytes(self, stream) -> bytes | None:
        """A connection's first bytes, enough to tell RCP from HTTP (the port's filter,
        FIG. 19): read within the head timeout, at most MAX_HEAD bytes; None when the peer
        sends nothing in time or closes (closed quietly, as an idle HTTP connection is)."""
        first = b""
        try:
            with trio.move_on_after(self.pre_auth_limit()):
                while len(first) < len(PREFACE_PREFIX) and PREFACE_PREFIX.startswith(first):
                    data = await stream.receive_some(MAX_HEAD - len(first))
                    if not data:
                        break
                    first += data
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return None
        return first or None

    async def _refuse(self, stream, status: int, message: str) -> None:
        """Send a closing error reply, then read and drop what the peer still sends for a
        moment, so that closing with unread data does not reset the connection before the
        peer has read the reply."""
        await send_and_linger(stream, raw_reply(status, message), self.send_timeout)

    async def _connection(self, stream, first: bytes = b"") -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if first:
            conn.receive_data(first)  # (what the port's filter read)
        idle = None  # until the peer has shown it holds the token: pre_auth_limit
        upload_failed = False  # the last request was an upload that failed
        try:
            while True:
                req = await self._read_head(conn, stream, idle)
                if req is None:
                    return
                metrics = _is_metrics(req)  # (repfs/metrics.py: open or not, [metrics] open)
                authorized = self._authorized(req)
                # without the token: only an open GET /metrics, and no body is read for it
                # (a stranger's POST would hold the connection for the body timeout)
                if not authorized and not (metrics and self.metrics_open
                                           and req.method == b"GET" and not _has_body(req)):
                    raise _Refuse(401, "unauthorized: missing or wrong control token")
                if req.method not in (b"GET", b"POST", b"DELETE"):
                    raise _Refuse(405, f"method {req.method.decode('ascii', 'replace')} is not "
                                       "used by this API (GET, POST, DELETE)")
                if authorized:
                    idle = self.idle_timeout
                    self.authenticated()
                body, after = await self._read_body(conn, stream, req)
                upload = body_limit(req.method, req.target) == MAX_BINARY_BODY
                ctype = "application/json"
                if upload and upload_failed:
                    status, data = 503, (json.dumps({"error": _AFTER_FAILED}) + "\n").encode()
                elif metrics:
                    status, data, ctype = self._metrics(req)
                else:
                    status, data = await self._dispatch(req, body)
                    # pipelined uploads are taken in order: those behind a failed one are
                    # refused, until the peer asks something else (an initial copy accepts
                    # any later block, so taking them would leave a hole)
                    upload_failed = upload and status != 200
                if after is not None:  # an upload read past h11: answered without it too
                    with trio.fail_after(self.send_timeout):
                        await stream.send_all(_answer_head(status, len(data)) + data)
                    conn = after
                    continue
                with trio.fail_after(self.send_timeout):
                    await self._send(conn, stream, status, data, ctype)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except _Refuse as e:
            await self._refuse(stream, e.status, str(e))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                ConnectionError):
            pass  # the peer went away or does not read its replies

    async def _receive(self, conn, stream, size: int = 65536) -> None:
        data = await stream.receive_some(size)
        conn.receive_data(data)  # b"" is the peer's end of stream

    async def _read_head(self, conn, stream, idle: float | None):
        """The next request's line and headers; None when the peer closes or stays idle
        (`idle` s; None: before it authenticates, what is left of its deadline)."""
        if not conn.trailing_data[0] and not conn.trailing_data[1]:
            with trio.move_on_after(self.pre_auth_limit() if idle is None else idle):
                await self._receive(conn, stream)
            if not conn.trailing_data[0] and not conn.trailing_data[1]:
                return None  # idle: close quietly (no request is waiting for a reply)
        try:
            with trio.fail_after(self.pre_auth_limit()):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        await self._receive(conn, stream)
                    elif isinstance(event, h11.Request):
                        return event
                    else:  # ConnectionClosed (or PAUSED, which a server never sees here)
                        return None
        except trio.TooSlowError:
            raise _Refuse(408, f"the request line and headers did not arrive within "
                               f"{self.head_timeout:g} s") from None
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint if e.error_status_hint in (400, 431) else 400
            raise _Refuse(status, f"malformed request: {e}") from None

    async def _read_body(self, conn, stream, req):
        """The request's body, and None or, for an upload read straight from the socket
        (`_read_upload`), the h11 connection that takes the requests after it."""
        limit = body_limit(req.method, req.target)
        length = None
        for name, value in req.headers:
            if name == b"content-length":
                length = int(value)
                if length > limit:
                    raise _Refuse(413, f"request body of {length} bytes: this request takes "
                                       f"at most {limit}")
        if length is not None and limit == MAX_BINARY_BODY and _plain_upload(req):
            return await self._read_upload(conn, stream, length)
        return await self._read_h11_body(conn, stream, limit), None

    async def _read_upload(self, conn, stream, length: int):
        """An upload's body (a delta chunk or a copy record, up to 1 MiB), read into one
        buffer of its Content-Length with recv_into: h11 would copy each byte four times
        (its receive buffer, its Data event, the body being gathered, the final bytes), which
        cost the secondary more CPU than storing the chunk (issue 8). What h11 had read
        past the head is the body's start; what is read past the body (pipelined requests)
        goes to a new h11 connection, which serves the next request (returned). The body
        is a memoryview (format "B") of memory that is not zeroed first."""
        ahead = conn.trailing_data[0]
        view = memoryview(np.empty(length, dtype=np.uint8))
        got = min(length, len(ahead))
        view[:got] = ahead[:got]
        rest = ahead[got:]
        sock = getattr(stream, "socket", None)
        try:
            with trio.fail_after(self.body_timeout):
                while got < length:
                    if sock is not None:
                        n = await sock.recv_into(view[got:])
                    else:  # (a stream without a socket: tests' memory streams)
                        data = await stream.receive_some(min(length - got, 1 << 20))
                        n = len(data)
                        view[got: got + n] = data
                    if not n:
                        raise _Refuse(400, "the connection closed within the request body")
                    got += n
        except trio.TooSlowError:
            raise _Refuse(408, f"the request body did not arrive within "
                               f"{self.body_timeout:g} s") from None
        after = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if rest:
            after.receive_data(rest)
        return view, after

    async def _read_h11_body(self, conn, stream, limit: int) -> bytes:
        body = bytearray()
        try:
            with trio.fail_after(self.body_timeout):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        await self._receive(conn, stream, 1 << 20)  # (large reads: uploads)
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > limit:
                            raise _Refuse(413, f"request body larger than {limit} bytes")
                    elif isinstance(event, h11.EndOfMessage):
                        return bytes(body)
                    else:
                        raise _Refuse(400, "the connection closed within the request body")
        except trio.TooSlowError:
            raise _Refuse(408, f"the request body did not arrive within "
                               f"{self.body_timeout:g} s") from None
        except h11.RemoteProtocolError as e:
            raise _Refuse(400, f"malformed request body: {e}") from None

    async def _send(self, conn, stream, status: int, data: bytes,
                    ctype: str = "application/json") -> None:
        headers = [("content-type", ctype), ("content-length", str(len(data)))]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=data)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    def _metrics(self, req) -> tuple[int, bytes, str]:
        """GET /metrics (repfs/metrics.py): the text exposition format, or a JSON error."""
        if req.method != b"GET":
            return 405, b'{"error": "/metrics takes GET"}\n', "application/json"
        try:
            from .metrics import render
            accept = dict(req.headers).get(b"accept", b"").decode("latin-1")
            data, ctype = render(self.service, accept)
            return 200, data, ctype
        except Exception as e:  # noqa: BLE001 - a bug in a scrape must not take the site down
            data = (json.dumps(self._internal_error(req, e)) + "\n").encode()
            return 500, data, "application/json"

    def _authorized(self, req) -> bool:
        for name, value in req.headers:
            if name == b"authorization" and value.startswith(b"Bearer "):
                return hmac.compare_digest(value[7:].strip(), self.token)
        return False

    async def _dispatch(self, req, body: bytes, call=None) -> tuple[int, bytes]:
        """Run one authenticated request: (status, JSON reply). Never raises but Cancelled.
        `call`: an async function run instead of the request's route (rcp/server.py answers
        a failed chunk of a batch with the exception it raised)."""
        try:
            status, payload = 200, await (call() if call else self._call(req, body))
        except HTTPError as e:
            status, payload = e.status, {"error": str(e)}
        except DomainError as e:
            status, payload = STATUS_OF_KIND[e.kind], {"error": str(e)}
        except (UnicodeError, ValueError) as e:  # e.g. a NUL byte in a path
            status, payload = 400, {"error": f"bad value: {e}"}
        except (OSError, lmdb.Error) as e:  # the disk under the site (EIO, ENOSPC): not a bug
            status, payload = self._disk_error(req, e)
        except Exception as e:  # noqa: BLE001 - a bug in one request must not take the site down
            status, payload = 500, self._internal_error(req, e)
        try:
            data = (json.dumps(payload, allow_nan=False) + "\n").encode()
        except (TypeError, ValueError) as e:
            status, data = 500, (json.dumps(self._internal_error(req, e)) + "\n").encode()
        return status, data

    def _disk_error(self, req, e: OSError | lmdb.Error) -> tuple[int, dict]:
        """A verb met a disk error (under the volume, the save areas or meta.lmdb): one line
        for the caller (503 when the disk is full), logged without a traceback, and not at all
        when the file system already turned read-only after an error (the core logged that
        once)."""
        from .tasks import describe
        target = req.target.decode("ascii", "replace")[:200]
        core = getattr(self.service, "core", None)
        if getattr(core, "error", None) is None:
            log.error("control request %s %s failed: %s",
                      req.method.decode("ascii", "replace"), target, describe(e))
        full = (isinstance(e, lmdb.MapFullError)
                or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT))
        return (STATUS_OF_KIND["busy" if full else "failed"],
                {"error": f"{target} failed: {describe(e)}"})

    @staticmethod
    def _internal_error(req, e: BaseException) -> dict:
        target = req.target.decode("ascii", "replace")[:200]
        log.exception("control request %s %s failed", req.method.decode("ascii", "replace"),
                      target, exc_info=e)
        return {"error": f"internal error in {target}: {type(e).__name__}: {e} (the site log "
                         "has the details)"}

    async def _call(self, req, body: bytes):
        method = req.method.decode()
        url = urlsplit(req.target.decode())
        parts = [unquote(p, errors="strict") for p in url.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query, errors="strict").items()}
        ctype = dict(req.headers).get(b"content-type", b"application/json")
        if ctype.startswith(b"application/octet-stream"):
            args = {"_body": body}
        else:
            args = parse_json_body(bytes(body))
        return await self._route(method, parts, query, args)

    async def _route(self, method: str, parts: list[str], query: dict, args: dict):
        svc = self.service
        if not parts or parts[0] != "v1":
            raise HTTPError(404, "unknown path (the API is under /v1)")
        parts = parts[1:]
        if parts == ["status"] and method == "GET":
            return svc.status()
        if parts and parts[0] == "snapshots":
            if len(parts) == 1:
                if method == "GET":
                    return svc.snapshots.list()
                if method == "POST":
                    if "name" not in args:
                        raise HTTPError(400, "want {\"name\": string, \"attrs\": object}")
                    name = _new_name(args["name"])
                    attrs = args.get("attrs")
                    attrs = {} if attrs is None else _scalar_map(attrs, "attrs", 64, 1024)
                    return await svc.snapshots.create(name, attrs)
            elif len(parts) == 2 and method == "DELETE":
                return await svc.snapshots.delete(_lookup_name(parts[1]))
            elif len(parts) == 3 and parts[2] == "restore" and method == "POST":
                return await svc.snapshots.restore(_lookup_name(parts[1]))
            elif len(parts) == 3 and parts[2] == "mount" and method == "POST":
                mp = _path(args.get("mountpoint"), "mountpoint")
                return await svc.mounts.mount(_lookup_name(parts[1]), mp)
            elif len(parts) == 3 and parts[2] == "clone" and method == "POST":
                newsite = _path(args.get("newsite"), "new site directory (newsite)")
                label = args.get("label")
                if label is not None and (not isinstance(label, str) or not label.isprintable()
                                          or len(label.encode()) > 64):
                    raise HTTPError(400, f"bad label {_short(label)}: at most 64 bytes of "
                                         "printable UTF-8")
                return await svc.cloner.clone(_lookup_name(parts[1]), newsite, label)
            elif len(parts) == 3 and parts[2] == "diff" and method == "GET":
                to = query.get("to") or None
                to = None if to in (None, "live") else _lookup_name(to)
                if query.get("paths", "1") not in ("0", "1"):
                    raise HTTPError(400, f"bad paths={_short(query['paths'])}: want 0 or 1")
                return await svc.snapshots.diff(_lookup_name(parts[1]), to,
                                                paths=query.get("paths", "1") == "1")
        if parts == ["remount"] and method == "POST":
            opts = args.get("options", "")
            if not isinstance(opts, str) or len(opts) > MAX_OPTIONS or not opts.isprintable():
                raise HTTPError(400, f"bad options {_short(opts)}: want mount(8) options, "
                                     f"comma-separated, at most {MAX_OPTIONS} characters")
            return await svc.remounter.remount(opts, _bool(args.get("readonly"), "readonly",
                                                           None))
        if parts and parts[0] == "replicate" and len(parts) == 2 and method == "POST":
            verb = parts[1]
            if verb == "start":
                to = args.get("to")
                if isinstance(to, str) and not to.startswith("/"):  # HOST:PORT (RCP)
                    if not 0 < len(to) <= 300 or not to.isprintable():
                        raise HTTPError(400, f"bad destination {_short(to)} (want HOST:PORT)")
                else:
                    to = _path(to, "site directory (to)")
                group = args.get("group")
                if group is not None and (not isinstance(group, str) or not 0 < len(group)
                                          <= 64 or not group.isprintable()):
                    raise HTTPError(400, f"bad group name {_short(group)}")
                name = args.get("name")
                if name is not None:  # it names a snapshot too: repl-init-NAME
                    name = _new_name(name, "destination name", prefix="repl-init-")
                return await svc.replicate.start(to, force=_bool(args.get("force"), "force",
                                                                 False), name=name,
                                                 group=group)
            if verb == "stop":
                to = args.get("to")
                return await svc.replicate.stop(
                    None if to is None else _lookup_name(to, "destination name"))
            if verb == "policy":
                return await svc.replicate.policy({
                    "timeout": _seconds(args.get("timeout"), "timeout"),
                    "hwm": _size(args.get("hwm"), "hwm"),
                    "playback_timeout": _seconds(args.get("playback_timeout"),
                                                 "playback_timeout"),
                    "playback_hwm": _size(args.get("playback_hwm"), "playback_hwm"),
                    "retention": _seconds(args.get("retention"), "retention"),
                    # one destination's own policy (repl/sender.py DEST_POLICY)
                    "to": (None if args.get("to") is None
                           else _lookup_name(args.get("to"), "destination name")),
                    "bwlimit": _size(args.get("bwlimit"), "bandwidth limit (bwlimit)"),
                    "compress": _bool(args.get("compress"), "compress", None)})
            if verb == "deltaset":
                return await svc.replicate.deltaset(wait=_bool(args.get("wait"), "wait", True))
        if parts and parts[0] == "repl" and len(parts) == 2:
            verb = parts[1]
            if verb == "receiver" and method == "GET":
                return svc.secondary.info()
            if verb == "verify" and method == "POST":
                return await _verify_step(svc, args)
            if method == "POST":
                if verb == "attach":
                    prim = _scalar_map(args.get("primary"), "primary", 16, MAX_PATH)
                    gen = _uint(args.get("generation"), "generation")
                    nblocks = _uint(args.get("nblocks"), "volume size in blocks (nblocks)")
                    return await svc.secondary.attach(prim, gen, nblocks,
                                                      _bool(args.get("force"), "force", False))
                if verb == "copy":
                    return await svc.secondary.copy(_binary(args))
                if verb == "start-playback":
                    after = _uint(args.get("after"), "delta set number (after)")
                    return await svc.secondary.start_playback(
                        after, _uint(args.get("generation"), "generation"),
                        _uint(args.get("blocks"), "block count (blocks)"))
                if verb == "chunk":
                    return await svc.secondary.chunk(_binary(args))
                if verb == "commit":
                    header = args.get("header")
                    if not isinstance(header, str) or len(header) > 8192:
                        raise HTTPError(400, "want {\"header\": hex string}")
                    for k in ("cut_ns", "first_change_ns"):
                        if k in args:
                            _uint(args[k], k)
                    return await svc.secondary.commit(args)
        if parts == ["failover"] and method == "POST":  # (recovery/failover.py)
            return await svc.recovery.failover(
                sync=_bool(args.get("sync"), "sync", False),
                now=_bool(args.get("now"), "now", False),
                dry_run=_bool(args.get("dry_run"), "dry_run", False))
        if parts == ["repl", "failover"] and method == "POST":  # a secondary failing over
            by = args.get("by")
            if not isinstance(by, str) or not 0 < len(by) <= MAX_PATH or not by.isprintable():
                raise HTTPError(400, f"bad site name (by) {_short(by)}")
            step = args.get("step")
            if not isinstance(step, str) or len(step) > 16:
                raise HTTPError(400, f"bad failover step {_short(step)}")
            if step == "switchover":  # its primary asks it to take over (recovery/switchover.py)
                return await svc.switchover.take_over(
                    _uint(args.get("generation"), "generation"), by)
            return await svc.recovery.request(step, _uint(args.get("generation"), "generation"),
                                              by, _uint(args.get("after", 0), "after"))
        if parts == ["switchover"] and method == "POST":  # (recovery/switchover.py)
            return await svc.switchover.run(_lookup_name(args.get("to"), "destination name"))
        if parts == ["failback"] and method == "POST":
            return await svc.switchover.failback()
        if parts == ["resync"] and method == "POST":  # (recovery/resync.py)
            peer = args.get("peer")
            if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PATH or not peer.isprintable():
                raise HTTPError(400, f"bad peer {_short(peer)} (want a site directory or "
                                     "HOST:PORT)")
            group = args.get("group")
            if group is not None:
                group = _lookup_name(group, "group name")
            return await svc.resync.run(peer, group, _bool(args.get("dry_run"), "dry_run", False))
        if parts == ["repl", "resync"] and method == "POST":  # a new primary resyncing this one
            by = args.get("by")
            if not isinstance(by, str) or not 0 < len(by) <= MAX_PATH or not by.isprintable():
                raise HTTPError(400, f"bad site name (by) {_short(by)}")
            step = args.get("step")
            if step not in ("blocklist", "blockhashes", "paths", "attach"):
                raise HTTPError(400, f"bad resync step {_short(step)}")
            req = {"step": step, "by": by,
                   "generation": _uint(args.get("generation"), "generation"),
                   "after": _uint(args.get("after", 0), "after"),
                   "dry_run": _bool(args.get("dry_run"), "dry_run", False)}
            if step in ("paths", "blockhashes"):
                if not isinstance(args.get("bits"), str):
                    raise HTTPError(400, "want {\"bits\": a block list}")
                req["bits"] = args["bits"]
            if step == "attach":
                req["primary"] = _scalar_map(args.get("primary"), "primary", 16, MAX_PATH)
                req["nblocks"] = _uint(args.get("nblocks"), "volume size in blocks (nblocks)")
                req["keep"] = _bool(args.get("keep"), "keep", True)
            if step == "blocklist":
                req["first_page"] = _uint(args.get("first_page", 0), "first_page", 1 << 32)
            return await svc.resync.request(req)
        if parts == ["copy"] and method == "POST":  # (recovery/copy.py)
            to = _peer(args.get("to"), "peer (to)")
            base = args.get("base")
            return await svc.copies.copy(
                _lookup_name(args.get("snapshot"), "snapshot name"), to,
                base=None if base is None else _lookup_name(base, "snapshot name (base)"),
                group=None if args.get("group") is None else _lookup_name(args["group"],
                                                                          "group name"),
                force=_bool(args.get("force"), "force", False),
                bwlimit=_size(args.get("bwlimit"), "bandwidth limit (bwlimit)") or 0,
                dry_run=_bool(args.get("dry_run"), "dry_run", False))
        if parts == ["pull"] and method == "POST":
            return await svc.copies.pull(
                _peer(args.get("from"), "peer (from)"),
                None if args.get("group") is None else _lookup_name(args["group"],
                                                                    "group name"),
                _seconds(args.get("min_interval"), "min_interval"),
                _bool(args.get("dry_run"), "dry_run", False))
        if parts == ["repl", "pull"] and method == "POST":  # a copy asks its source
            have = args.get("have")
            if have is not None:
                have = _scalar_map(have, "have", 8, MAX_PATH)
            group = args.get("group")
            return await svc.copies.serve_pull(
                have, _peer(args.get("to"), "peer (to)"),
                None if group is None else _lookup_name(group, "group name"),
                _bool(args.get("dry_run"), "dry_run", False))
        if parts == ["verify"] and method == "POST":
            to = args.get("to")
            if not isinstance(to, str) or not 0 < len(to) <= MAX_PATH or not to.isprintable():
                raise HTTPError(400, f"bad destination {_short(to)} (want its name, site "
                                     "directory or HOST:PORT)")
            wait = _seconds(args.get("wait"), "wait")
            from .repl.verify import WAIT, answer
            return answer(await svc.verifier.run(
                to, repair=_bool(args.get("repair"), "repair", False),
                wait=WAIT if wait is None else wait))
        if parts and parts[0] in ("groups", "routes"):
            return await _rcp_config(svc.site.path, method, parts, args)
        raise HTTPError(404 if method in ("GET", "POST", "DELETE") else 405,
                        f"no such operation: {method} /v1/{'/'.join(parts)}")
