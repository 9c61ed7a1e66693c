"""The transport of replication: the calls a primary makes on a secondary's receiver.

`ReceiverClient` talks to a secondary daemon on the same host over its control port (HTTP/JSON,
bearer token); the network transport of RCP implements the same calls. Errors are sorted into
what a send task does about them: try again later, send again, or stop.
"""

from __future__ import annotations

import http.client
import json

from . import keys as K
from .chunk import encode_copy


class TransientError(Exception):
    """Try again later (the peer is down, restarting, or busy)."""


class PermanentError(Exception):
    """The destination refuses for a reason retrying will not fix."""


class RejectedError(Exception):
    """The receiver rejected data it could not verify; send it again."""


class ReceiverClient:
    """Calls on a secondary daemon's control port (a site on this host)."""

    def __init__(self, site):
        """`site`: the target site (`SiteService.peer(path)`: its path and control address)."""
        self.site = site
        self.site_path = str(site.path)
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self):
        site = self.site
        addr = site.control_address()
        if addr is None:
            raise TransientError(f"the daemon of {self.site_path} is not running")
        try:
            token = (site.path / "control.token").read_text().strip()
        except OSError as e:
            raise TransientError(f"cannot read the control token of {self.site_path}: {e}")
        self.token = token
        self.conn = http.client.HTTPConnection(addr[0], addr[1], timeout=60)

    def request(self, method: str, path: str, body: bytes | dict | None = None) -> dict:
        for attempt in (1, 2):
            if self.conn is None:
                self._connect()
            if isinstance(body, dict):
                data, ctype = json.dumps(body).encode(), "application/json"
            else:
                data, ctype = body, "application/octet-stream"
            try:
                self.conn.request(method, "/v1" + path, body=data, headers={
                    "Authorization": f"Bearer {self.token}", "Content-Type": ctype})
                resp = self.conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if attempt == 2:
                    raise TransientError(f"{self.site_path}: {e}") from None
                continue
            try:
                doc = json.loads(raw)
            except ValueError:
                raise TransientError(f"{self.site_path}: non-JSON answer {resp.status}") from None
            if resp.status == 200:
                return doc
            msg = doc.get("error", f"HTTP {resp.status}") if isinstance(doc, dict) else str(doc)
            if resp.status == 400 and ("rejected" in msg or "again" in msg):
                raise RejectedError(msg)
            if resp.status in (401, 404, 409):
                raise PermanentError(msg)
            raise TransientError(msg)
        raise TransientError("unreachable")

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

    def copy(self, generation: int, start: int, data: bytes) -> None:
        self.request("POST", "/repl/copy", encode_copy(generation, start, data))

    def start_playback(self, after: int, generation: int, blocks: int) -> None:
        self.request("POST", "/repl/start-playback", {"after": after, "generation": generation,
                                                      "blocks": blocks})

    def chunk(self, raw: bytes) -> None:
        self.request("POST", "/repl/chunk", raw)

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
