"""The receiver at a secondary site (FIG. 9): verify and store delta sets in the secondary save
volume, acknowledge them, and play them back into the secondary volume in order.

A chunk is accepted only if it decodes and its checksum holds, carries the receiver's
generation, and is the next one expected (duplicates of chunks already held are acknowledged
and ignored, so a sender may resend freely). A delta set is complete when its header arrives
and the chunk count, block count and the checksum over all chunk checksums agree; only then is
it recorded (durably) and acknowledged. Playback applies complete delta sets in order, is
idempotent (whole block images) and records the last one played durably after the volume is
flushed, so a crash replays at most the one in progress.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from pathlib import Path

import xxhash

from ..errors import DomainError
from ..volume import pwrite_all
from . import keys as K
from .chunk import (
    ChunkError, chunk_size, data_checksum, decode_chunk, decode_set_header, peek_extents,
)

log = logging.getLogger(__name__)
BS = 4096
COPY_HDR = struct.Struct("<QIQ")  # start block, count, xxh3-64 of the data


class ReceiveError(DomainError):
    """A secondary refuses what a primary sent: "invalid" for data that fails to decode or
    verify (the sender may send it again), "conflict" when this site is not in the state
    that the request needs (wrong role, generation or order)."""

    default_kind = "conflict"


def encode_copy(start: int, data) -> bytes:
    return COPY_HDR.pack(start, len(data) // BS, xxhash.xxh3_64_intdigest(data)) + bytes(data)


class Receiver:
    def __init__(self, env, site_path: Path):
        self.env = env
        self.dir = Path(site_path) / "save" / "incoming"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_ctx = env.open_db(K.CTX)
        self.db_in = env.open_db(K.INCOMING)
        self.partial: dict | None = None  # the delta set being received
        self.played_blocks = 0
        self.received_bytes = 0
        self._load_partial()

    # ------------------------------------------------------------------ context

    def _get(self, name: str):
        with self.env.begin(db=self.db_ctx) as txn:
            return txn.get(name.encode())

    def _put(self, txn, name: str, value: bytes) -> None:
        txn.put(name.encode(), value, db=self.db_ctx)

    @property
    def role(self) -> str:
        raw = self._get("role")
        # a damaged value reads as no known role, so every request is refused (t0_fuzz)
        return raw.decode(errors="replace") if raw else "primary"

    @property
    def generation(self) -> int:
        raw = self._get("generation")
        return K.from_u64(raw) if raw else 1

    def _num(self, name: str) -> int:
        raw = self._get(name)
        return K.from_u64(raw) if raw else 0

    @property
    def last_received(self) -> int:
        return self._num("last_received")

    @property
    def last_played(self) -> int:
        return self._num("last_played")

    @property
    def state(self) -> str:
        raw = self._get("secondary_state")
        return raw.decode(errors="replace") if raw else "idle"

    def primary(self) -> dict | None:
        raw = self._get("primary")
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise K.MetaError("meta.lmdb: the primary's record is damaged") from None

    def incoming(self) -> list[dict]:
        with self.env.begin(db=self.db_in) as txn:
            return [json.loads(v) for _, v in txn.cursor()]

    def info(self) -> dict:
        p = self.partial
        return {
            "role": self.role, "generation": self.generation, "state": self.state,
            "primary": self.primary(), "last_received": self.last_received,
            "last_played": self.last_played,
            "partial": {"delta_set": p["n"], "chunks": len(p["checksums"])} if p else None,
        }

    # ------------------------------------------------------------------ becoming a secondary

    def attach(self, primary: dict, generation: int) -> None:
        """Become a secondary of `primary` and expect an initial copy."""
        for f in self.dir.glob("*.ds"):
            f.unlink()
        self.partial = None
        with self.env.begin(write=True) as txn:
            txn.drop(self.db_in, delete=False)
            self._put(txn, "role", b"secondary")
            self._put(txn, "generation", K.u64(generation))
            self._put(txn, "primary", json.dumps(primary).encode())
            self._put(txn, "secondary_state", b"initial-copy")
            self._put(txn, "last_received", K.u64(0))
            self._put(txn, "last_played", K.u64(0))

    def check_copy(self, body: bytes) -> tuple[int, bytes]:
        if self.state != "initial-copy":
            raise ReceiveError("not expecting an initial copy")
        if len(body) < COPY_HDR.size:
            raise ReceiveError("truncated copy record", "invalid")
        start, count, csum = COPY_HDR.unpack_from(body)
        data = body[COPY_HDR.size:]
        if len(data) != count * BS or xxhash.xxh3_64_intdigest(data) != csum:
            raise ReceiveError("copy record fails its checksum", "invalid")
        return start, data

    def start_playback(self, after: int) -> None:
        """The initial copy is complete: it holds delta sets up to `after`."""
        with self.env.begin(write=True) as txn:
            self._put(txn, "secondary_state", b"replicating")
            self._put(txn, "last_received", K.u64(after))
            self._put(txn, "last_played", K.u64(after))

    def detach(self) -> None:
        with self.env.begin(write=True) as txn:
            self._put(txn, "secondary_state", b"stopped")

    # ------------------------------------------------------------------ receiving

    def _path(self, n: int) -> Path:
        return self.dir / f"{n}.ds"

    def _load_partial(self) -> None:
        """Rebuild the state of a delta set whose reception was interrupted."""
        n = self.last_received + 1
        path = self._path(n)
        if not path.exists():
            return
        raw = path.read_bytes()
        off = 0
        checksums = []
        blocks = 0
        while off < len(raw):
            try:
                size = chunk_size(raw, off)
                c = decode_chunk(raw[off: off + size])
            except ChunkError:
                break
            checksums.append(c.checksum)
            blocks += c.blocks
            off += size
        os.truncate(path, off)
        self.partial = {"n": n, "checksums": checksums, "blocks": blocks, "off": off}

    def receive_chunk(self, body: bytes) -> dict:
        if self.role != "secondary" or self.state != "replicating":
            raise ReceiveError("this site is not receiving delta sets")
        try:
            c = decode_chunk(body)
        except ChunkError as e:
            raise ReceiveError(f"rejected chunk: {e}", "invalid") from None
        if c.generation != self.generation:
            raise ReceiveError(f"rejected chunk of generation {c.generation}: this site is at "
                               f"generation {self.generation}")
        want = self.last_received + 1
        if c.delta_set <= self.last_received:
            return {"duplicate": True}
        if c.delta_set != want:
            raise ReceiveError(f"expected delta set {want}, got {c.delta_set}")
        p = self.partial
        if p is None or p["n"] != want:
            p = self.partial = {"n": want, "checksums": [], "blocks": 0, "off": 0}
            self._path(want).write_bytes(b"")
        if c.number < len(p["checksums"]):
            return {"duplicate": True}
        if c.number != len(p["checksums"]):
            raise ReceiveError(f"delta set {want}: expected chunk {len(p['checksums'])}, got "
                               f"{c.number}")
        fd = os.open(self._path(want), os.O_WRONLY | os.O_CLOEXEC)
        try:
            pwrite_all(fd, body, p["off"])
        finally:
            os.close(fd)
        p["off"] += len(body)
        p["checksums"].append(c.checksum)
        p["blocks"] += c.blocks
        self.received_bytes += len(body)
        return {"accepted": c.number}

    def commit(self, header: bytes, meta: dict) -> dict:
        """The delta-set header: verify completeness, make it durable, acknowledge."""
        try:
            hdr = decode_set_header(header)
        except ChunkError as e:
            raise ReceiveError(f"rejected delta-set header: {e}", "invalid") from None
        if hdr.generation != self.generation:
            raise ReceiveError(f"rejected header of generation {hdr.generation}")
        if hdr.delta_set <= self.last_received:
            return {"acked": self.last_received, "played": self.last_played}
        p = self.partial
        if hdr.delta_set != self.last_received + 1 or (hdr.chunks and (p is None or p["n"] != hdr.delta_set)):
            raise ReceiveError(f"header for delta set {hdr.delta_set} out of order")
        got = p["checksums"] if p and p["n"] == hdr.delta_set else []
        blocks = p["blocks"] if got else 0
        if len(got) != hdr.chunks or blocks != hdr.blocks or data_checksum(got) != hdr.data_checksum:
            self.partial = None
            self._path(hdr.delta_set).unlink(missing_ok=True)
            raise ReceiveError(f"delta set {hdr.delta_set} incomplete or corrupt "
                               f"({len(got)} of {hdr.chunks} chunks): send it again", "invalid")
        path = self._path(hdr.delta_set)
        if not path.exists():
            path.write_bytes(b"")
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        rec = {"number": hdr.delta_set, "chunks": hdr.chunks, "blocks": hdr.blocks,
               "bytes": p["off"] if got else 0, "received_ns": time.time_ns(),
               "cut_ns": meta.get("cut_ns", 0), "first_change_ns": meta.get("first_change_ns", 0)}
        with self.env.begin(write=True) as txn:
            txn.put(K.u64(hdr.delta_set), json.dumps(rec).encode(), db=self.db_in)
            self._put(txn, "last_received", K.u64(hdr.delta_set))
        self.partial = None
        return {"acked": hdr.delta_set, "played": self.last_played}

    # ------------------------------------------------------------------ playback

    def next_to_play(self) -> dict | None:
        n = self.last_played + 1
        with self.env.begin(db=self.db_in) as txn:
            raw = txn.get(K.u64(n))
        return json.loads(raw) if raw else None

    def extents(self, rec: dict) -> list[tuple[int, int]]:
        """The extents a received delta set will write, read from its chunk headers only
        (the data is read and verified once, by play)."""
        path = self._path(rec["number"])
        if not path.exists():
            return []
        out, off = [], 0
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            while off < end:
                head = os.pread(f.fileno(), 64 * 1024, off)  # holds any chunk's extent list
                size = chunk_size(head)
                out.extend(peek_extents(head))
                off += size
        return out

    def play(self, rec: dict, dev) -> int:
        """Write delta set `rec` into the volume (through `dev`) and record it as played.
        Runs in a worker thread while readers are held back."""
        n = rec["number"]
        path = self._path(n)
        raw = path.read_bytes() if path.exists() else b""
        off = 0
        blocks = 0
        while off < len(raw):
            size = chunk_size(raw, off)
            c = decode_chunk(raw[off: off + size])
            pos = 0
            for start, count in c.extents:
                dev.write(start, c.data[pos: pos + count * BS], meta=True)
                pos += count * BS
            blocks += c.blocks
            off += size
        dev.flush()
        with self.env.begin(write=True) as txn:
            self._put(txn, "last_played", K.u64(n))
            txn.delete(K.u64(n), db=self.db_in)
            self._put(txn, "last_played_ns", K.u64(time.time_ns()))
            self._put(txn, "last_played_first_change_ns", K.u64(rec.get("first_change_ns", 0)))
        path.unlink(missing_ok=True)
        self.played_blocks += blocks
        return blocks

