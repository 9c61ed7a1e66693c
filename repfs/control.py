"""The daemon's control port: HTTP/1.1 with JSON bodies, authenticated by a bearer token.

The token is ``SITE/control.token`` (mode 0600, made at the first mount); the address the
daemon listens on is ``SITE/control.json``, so `repfs-admin --site SITE_OR_MOUNTPOINT` needs
neither at hand. h11 parses HTTP (a well-kept, I/O-free parser); routing and the verbs are
ours. An unauthenticated or malformed request gets a 4xx and changes nothing.

Routes (all under /v1):

| method | path | body | does |
|---|---|---|---|
| GET | /status | | site, mount state, usage, snapshots, save-volume usage |
| GET | /snapshots | | the snapshot queue, oldest first |
| POST | /snapshots | {"name", "attrs"?} | create a snapshot (at a consistency point) |
| DELETE | /snapshots/NAME | | delete it |
| POST | /snapshots/NAME/restore | | restore the live file system to it, online |
| POST | /snapshots/NAME/mount | {"mountpoint"} | mount it read-only |
| GET | /snapshots/NAME/diff?to=OTHER&paths=1 | | changed blocks (and paths) from NAME to OTHER (default: live) |
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
import socket
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from .errors import DomainError
from .statefile import write_durably

log = logging.getLogger(__name__)
MAX_BODY = 8 << 20


# the one place where domain errors (repfs/errors.py) become HTTP statuses
STATUS_OF_KIND = {"invalid": 400, "not_found": 404, "conflict": 409, "busy": 503,
                  "failed": 500}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def ensure_token(site_path: Path) -> str:
    """The control port's bearer token, made (durably, 0600) if the site has none. A token file
    that a power cut left empty or torn is replaced by a new token, with a warning."""
    path = Path(site_path) / "control.token"
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = None
    except UnicodeDecodeError:
        token = ""
    if token is not None and _TOKEN_RE.fullmatch(token):
        return token
    if token is not None:
        log.warning("%s is empty or damaged (a crash while it was written?): making a new token",
                    path)
    token = secrets.token_urlsafe(32)
    write_durably(path, token + "\n", 0o600)
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


def _num(v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise HTTPError(400, f"bad number {v!r}")
    return v


def _binary(args: dict) -> bytes:
    body = args.get("_body")
    if body is None:
        raise HTTPError(400, "want an application/octet-stream body")
    return body


class ControlServer:
    def __init__(self, service, token: str):
        self.service = service
        self.token = token.encode()

    async def serve(self, sock: socket.socket) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await trio.serve_listeners(self.handle, [listener])

    async def handle(self, stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                req, body = await self._read_request(conn, stream)
                if req is None:
                    return
                status, payload = await self._dispatch(req, body)
                await self._send(conn, stream, status, payload)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as e:
            try:
                await self._send(conn, stream, 400, {"error": f"malformed request: {e}"})
            except Exception:  # noqa: BLE001 - the peer is gone or broken
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - a bug in one request must not take the site down
            log.exception("control connection failed")
        finally:
            await stream.aclose()

    async def _read_request(self, conn, stream):
        req = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(1 << 20)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                req = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                return req, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send(self, conn, stream, status: int, payload) -> None:
        data = (json.dumps(payload, indent=None) + "\n").encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=data)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    def _authorized(self, req) -> bool:
        for name, value in req.headers:
            if name == b"authorization" and value.startswith(b"Bearer "):
                return hmac.compare_digest(value[7:].strip(), self.token)
        return False

    async def _dispatch(self, req, body: bytes):
        if not self._authorized(req):
            return 401, {"error": "unauthorized: missing or wrong control token"}
        try:
            method = req.method.decode()
            url = urlsplit(req.target.decode())
            parts = [unquote(p) for p in url.path.split("/") if p]
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            ctype = dict(req.headers).get(b"content-type", b"application/json")
            if ctype.startswith(b"application/octet-stream"):
                args = {"_body": body}
            else:
                args = json.loads(body) if body else {}
                if not isinstance(args, dict):
                    raise HTTPError(400, "the request body must be a JSON object")
            return 200, await self._route(method, parts, query, args)
        except json.JSONDecodeError as e:
            return 400, {"error": f"malformed JSON body: {e}"}
        except (UnicodeDecodeError, RecursionError) as e:
            return 400, {"error": f"malformed request: {type(e).__name__}"}
        except ValueError as e:  # e.g. a NUL byte in a path
            return 400, {"error": f"bad value: {e}"}
        except HTTPError as e:
            return e.status, {"error": str(e)}
        except DomainError as e:
            return STATUS_OF_KIND[e.kind], {"error": str(e)}
        except OSError as e:
            log.exception("control request failed")
            return 500, {"error": f"{e.strerror or e}"}

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
                    name = args.get("name")
                    attrs = args.get("attrs") or {}
                    if not isinstance(name, str) or not isinstance(attrs, dict):
                        raise HTTPError(400, "want {\"name\": string, \"attrs\": object}")
                    return await svc.snapshots.create(name, attrs)
            elif len(parts) == 2 and method == "DELETE":
                return await svc.snapshots.delete(parts[1])
            elif len(parts) == 3 and parts[2] == "restore" and method == "POST":
                return await svc.snapshots.restore(parts[1])
            elif len(parts) == 3 and parts[2] == "mount" and method == "POST":
                mp = args.get("mountpoint")
                if not isinstance(mp, str) or not mp:
                    raise HTTPError(400, "want {\"mountpoint\": string}")
                return await svc.mounts.mount(parts[1], mp)
            elif len(parts) == 3 and parts[2] == "diff" and method == "GET":
                to = query.get("to") or None
                if to == "live":
                    to = None
                return await svc.snapshots.diff(parts[1], to,
                                                paths=query.get("paths", "1") != "0")
        if parts and parts[0] == "replicate" and len(parts) == 2 and method == "POST":
            verb = parts[1]
            if verb == "start":
                to = args.get("to")
                if not isinstance(to, str) or not to:
                    raise HTTPError(400, "want {\"to\": site directory}")
                return await svc.replicate.start(to, force=bool(args.get("force")),
                                                 name=args.get("name"))
            if verb == "stop":
                return await svc.replicate.stop(args.get("to"))
            if verb == "policy":
                return await svc.replicate.policy({k: _num(args.get(k)) for k in (
                    "timeout", "hwm", "playback_timeout", "playback_hwm", "retention")})
            if verb == "deltaset":
                return await svc.replicate.deltaset(wait=bool(args.get("wait", True)))
        if parts and parts[0] == "repl" and len(parts) == 2:
            verb = parts[1]
            if verb == "receiver" and method == "GET":
                return svc.secondary.info()
            if method == "POST":
                if verb == "attach":
                    prim, gen = args.get("primary"), args.get("generation")
                    if not isinstance(prim, dict) or not isinstance(gen, int):
                        raise HTTPError(400, "want {\"primary\": object, \"generation\": int}")
                    return await svc.secondary.attach(prim, gen)
                if verb == "copy":
                    return await svc.secondary.copy(_binary(args))
                if verb == "start-playback":
                    after = args.get("after")
                    if not isinstance(after, int) or after < 0:
                        raise HTTPError(400, "want {\"after\": delta set number}")
                    return await svc.secondary.start_playback(after)
                if verb == "chunk":
                    return svc.secondary.chunk(_binary(args))
                if verb == "commit":
                    return svc.secondary.commit(args)
        raise HTTPError(404 if method in ("GET", "POST", "DELETE") else 405,
                        f"no such operation: {method} /v1/{'/'.join(parts)}")
