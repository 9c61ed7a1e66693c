"""The receiver at a secondary site (FIG. 9): verify and store delta sets in the secondary save
volume, acknowledge them, and play them back into the secondary volume in order.

The receiver trusts nothing its peer sends. A chunk is accepted only if it decodes and its
checksum holds, carries the receiver's generation, is the next one expected (duplicates of
chunks already held are acknowledged and ignored, so a sender may resend freely), and every
extent in it is non-empty, lies inside the volume and touches no block that another extent
of the same delta set touches (`ExtentCheck`). A delta set is complete when its header
arrives and the chunk count, block count and the checksum over all chunk checksums agree;
only then is it recorded (durably) and acknowledged. Playback verifies a whole delta set again
before it writes its first block (`verify`): a delta set is played whole or not at all.
Playback records "playing n" durably before it writes, and the last one played after the
volume is flushed; a crash in between is finished before the file system is opened again
(`finish_interrupted_playback`), so the secondary never serves a half-played delta set.

The initial copy (FIG. 11) is staged, not written into the volume: each copy record is
checked like a chunk (generation, bounds, emptiness, and ascending without overlap, since the
primary copies in block order) and appended as a delta chunk to ``incoming/copy.ds``. When
the primary signals "start playback after n" the staged copy becomes delta set n and is
played like any other, under the same hold of every request. Until then the secondary's mount
shows the state it had before, whole; after a crash the copy resumes at the receiver's own
durable position, which the primary asks for.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from ..common import exact_size
from ..errors import DomainError
from ..pagedbits import PagedBits
from ..snap.layer import HELD_RELEASE, SnapLayer
from ..statefile import fsync_dir
from ..volume import create_private, private_dir, pwrite_all, pwritev_all
from . import keys as K
from ..extents import runs
from .deltaset import PIN_PREFIX, forward_pin, forward_record, forwarding
from ..fs.format import FormatError, Superblock
from .chunk import (
    ChunkError, data_checksum, decode_chunk, decode_copy, decode_set_header, direct_pieces,
    encode_chunk, encode_direct, join_direct, peek_extents, record_size, split_record,
)

log = logging.getLogger(__name__)
BS = 4096
COPY_FILE = "copy.ds"
COPY_SYNC_BYTES = 64 << 20  # the staged copy is made durable (and its position saved) this often
WAITING_BITMAP_BYTES = 16 << 20  # bitmap block images kept for the delta sets not yet played
# what a snapshot copy's attach says of it (recovery/copy.py), kept as "copy_pending"
COPY_FIELDS = ("copy_snapshot", "copy_id", "copy_created_ns", "copy_base", "copy_base_id")


class ReceiveError(DomainError):
    """A secondary refuses what a primary sent: "invalid" for data that fails to decode or
    verify (the sender may send it again), "conflict" when this site is not in the state
    that the request needs (wrong role, generation or order) or the data breaks a rule no
    resend can mend (an extent beyond the volume, overlapping or empty extents)."""

    default_kind = "conflict"


class CorruptDeltaSet(ReceiveError):
    """A received delta set fails its verification at playback: nothing of it was written."""


# ----------------------------------------------------------------------------- pure checks


class ExtentCheck:
    """The extents of one delta set (or one initial copy) as they arrive: each must be
    non-empty and inside a volume of `nblocks` blocks, and no block may appear twice.
    Memory: a paged bit map of the blocks seen (empty pages cost nothing); or, for an initial
    copy (`ascending`: the primary copies in block order), only the end of the last extent."""

    def __init__(self, nblocks: int, *, ascending: bool = False):
        self.nblocks = nblocks
        self.seen = None if ascending else PagedBits()
        self.next = 0  # the end of the highest extent added
        self.blocks = 0

    def problem(self, extents) -> str | None:
        """Why `extents` (one chunk's) cannot be accepted after those added so far."""
        if not extents:
            return "a chunk with no extents"
        for s, n in extents:
            if n <= 0:
                return f"an empty extent at block {s}"
            if s < 0 or s + n > self.nblocks:
                return (f"extent ({s}, {n}) reaches beyond the end of this volume "
                        f"({self.nblocks} blocks)")
        ordered = sorted(extents)
        for (s0, n0), (s1, _) in zip(ordered, ordered[1:]):
            if s0 + n0 > s1:
                return f"overlapping extents at block {s1}"
        if self.seen is None:
            if ordered[0][0] < self.next:
                return (f"extent {tuple(ordered[0])} overlaps or precedes blocks already "
                        f"copied (up to block {self.next})")
            return None
        for s, n in ordered:
            if self.seen.get_range(s, n).any():
                return f"extent ({s}, {n}) overlaps blocks the delta set already holds"
        return None

    def add(self, extents) -> None:
        """Check then record `extents`; raises ValueError (recording nothing) if bad."""
        why = self.problem(extents)
        if why:
            raise ValueError(why)
        for s, n in extents:
            if self.seen is not None:
                self.seen.set_range(s, n)
            self.blocks += n
            self.next = max(self.next, s + n)


def attach_refusal(current: dict, primary, generation, nblocks, force: bool) -> str | None:
    """Why this site may not become a secondary of `primary` (None: it may).

    `current` describes this site: ``site`` (its directory), ``volume_blocks``, ``role``,
    ``state``, ``generation``, ``primary`` (the one it follows, if a secondary),
    ``root_entries`` (names in its root directory) and ``destinations`` (if a primary).
    A malformed request, a volume of another size or the site itself are refused always;
    `force` replaces the content of a site that holds files, replicates or follows another
    primary; nothing lets a primary of an older generation than this site's take it
    (invariant 5: a returning old primary cannot overwrite the new one, not even by
    --force)."""
    if (not isinstance(primary, dict) or not isinstance(primary.get("site"), str)
            or not primary["site"] or not isinstance(primary.get("uuid"), str)
            or len(primary["uuid"]) != 32):
        return "the request names no valid primary (want its site and 32-hex-digit uuid)"
    try:
        int(primary["uuid"], 16)
    except ValueError:
        return "the request names no valid primary (want its site and 32-hex-digit uuid)"
    if not isinstance(generation, int) or isinstance(generation, bool) or not (
            1 <= generation < 1 << 64):
        return f"generation {generation!r} is not a positive 64-bit number"
    if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks != current[
            "volume_blocks"]:
        return (f"the primary's volume has {nblocks} blocks, this one "
                f"{current['volume_blocks']}: a secondary must be exactly the primary's size "
                f"(make it with repfs mkfs --size {_size(nblocks)})")
    if os.path.realpath(primary["site"]) == os.path.realpath(current["site"]):
        return "a site cannot be its own secondary"
    if generation < current.get("generation", 0):
        return (f"the primary's generation {generation} is older than this site's "
                f"{current['generation']}: a stale primary cannot take it, not even with "
                f"--force")
    if current.get("state") == "failover":  # (recovery/failover.py: not even with --force)
        return "this site is failing over (repfs-admin failover): it cannot be attached now"
    if force:
        return None
    if current["role"] == "secondary":
        prev = current.get("primary") or {}
        if prev and (prev.get("uuid"), prev.get("site")) != (primary["uuid"], primary["site"]):
            return (f"this site is a secondary of {prev.get('site')}; --force makes it follow "
                    f"{primary['site']}")
        if current["state"] in ("replicating", "initial-copy"):
            return "this site is already a replicating secondary; --force replaces its content"
        return None
    if current.get("root_entries"):
        return "this site holds files; --force replaces its content"
    if current.get("destinations"):
        return "this site is itself replicating; --force replaces its content"
    return None


def _size(nblocks) -> str:
    return exact_size(nblocks * BS) if isinstance(nblocks, int) else "?"


def iter_records(path: Path, start: int = 0):
    """Yield (offset, size, record) for the stored records (chunks and direct records) of
    file `path` from `start` whose headers parse, one in memory at a time; stops at the end
    or before the first that does not (nothing is verified here)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = os.fstat(fd).st_size
        off = start
        while off < end:
            head = os.pread(fd, 64 * 1024, off)  # holds any record's headers
            try:
                size = record_size(head)
            except ChunkError:
                return
            raw = os.pread(fd, size, off) if size > len(head) else head[:size]
            if len(raw) != size:
                return
            yield off, size, raw
            off += size
    finally:
        os.close(fd)


def iter_chunks(path: Path, start: int = 0, read=None):
    """Yield (offset, size, chunk) for the verified chunks of file `path` from `start`, one
    chunk in memory at a time: a direct record is rebuilt with the blocks it wrote into the
    volume (`read(start, count)`; None: it counts as undecodable) and verified whole; its
    chunk's `direct` are those runs. Stops at the end, at a delta-set header, or before the
    first chunk that does not decode (the caller compares the last offset with the file
    size)."""
    for off, size, raw in iter_records(path, start):
        try:
            if read is None and split_record(raw).runs:
                return
            whole, direct = join_direct(raw, read)
            c = decode_chunk(whole)
        except ChunkError:
            return
        c.direct = direct
        yield off, size, c


# ----------------------------------------------------------------------------- the receiver


class Receiver:
    """`dev`: the secondary's volume stack (its top), into which chunk blocks that were free
    at the last played boundary go at once; None: every block is staged."""

    def __init__(self, env, site_path: Path, nblocks: int, dev=None):
        self.env = env
        self.nblocks = nblocks
        self.dev = dev
        save = Path(site_path) / "save"
        self.dir = save / "incoming"
        private_dir(save)
        private_dir(self.dir)
        self.db_ctx = env.open_db(K.CTX)
        self.db_in = env.open_db(K.INCOMING)
        self.db_fwd_sets = env.open_db(K.DELTASETS)  # a forwarder's mailbox (forward.py)
        self.db_fwd_bits = env.open_db(K.DSBITS)
        self.partial: dict | None = None  # the delta set being received
        # (delta set, fd): the partial delta set's file, kept open while it is received
        # (issue 8: an open and a close per chunk cost as much as the chunk's write)
        self._wfd: tuple[int, int] | None = None
        self.copy: dict | None = None  # the initial copy being staged
        # delta sets received whole by this process and not yet played: their blocks and
        # bitmap block images, for the direct writes of the ones after them
        self._waiting: dict[int, dict] = {}
        self.played_blocks = 0
        self.received_bytes = 0
        self.direct_blocks = 0  # received blocks written straight into the volume
        self._load_partial()
        self._load_copy()

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
    def last_played_ns(self) -> int:
        """When the last delta set was played (0: none yet)."""
        return self._num("last_played_ns")

    @property
    def playing(self) -> int | None:
        """The delta set being played into the volume now (marked before its first block is
        written, cleared with the record that it was played), or None."""
        raw = self._get("playing")
        return K.from_u64(raw) if raw else None

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
            return [_record(v, K.from_u64(k)) for k, v in txn.cursor()]

    def info(self) -> dict:
        p = self.partial
        return {
            "role": self.role, "generation": self.generation, "state": self.state,
            "primary": self.primary(), "last_received": self.last_received,
            "last_played": self.last_played, "volume_blocks": self.nblocks,
            "partial": {"delta_set": p["n"], "chunks": len(p["checksums"])} if p else None,
            "copy": ({"next_block": self.copy["check"].next,
                      "blocks": self.copy["check"].blocks}
                     if self.copy else None),
            # a snapshot copy (recovery/copy.py): the one played, the one being received
            "copied": self._json("copied"), "copy_pending": self._json("copy_pending"),
        }

    def _json(self, name: str) -> dict | None:
        """A JSON record of the replication context (None: none, or damaged)."""
        try:
            v = json.loads(self._get(name) or b"null")
        except ValueError:
            return None
        return v if isinstance(v, dict) else None

    # ------------------------------------------------------------------ becoming a secondary

    def attach(self, primary: dict, generation: int) -> None:
        """Become a secondary of `primary` and expect an initial copy (the caller checked
        `attach_refusal`). Nothing of the volume changes until the copy is played."""
        self.partial = None
        self._waiting.clear()
        self.close()
        with self.env.begin(write=True) as txn:  # first: no stale record outlives its file
            txn.drop(self.db_in, delete=False)
            self._put(txn, "role", b"secondary")
            self._put(txn, "generation", K.u64(generation))
            # (and how to reach it at a failover, if it said: recovery/failover.py)
            self._put(txn, "primary", json.dumps(
                {"uuid": primary["uuid"], "site": primary["site"],
                 **{k: primary[k] for k in ("address", "group")
                    if isinstance(primary.get(k), str)}}).encode())
            # a copy of one of its snapshots (recovery/copy.py): what it is, recorded as
            # "copied" when it is played; until then the last copy played stays recorded
            pending = {k: primary[k] for k in COPY_FIELDS if k in primary}
            if pending:
                self._put(txn, "copy_pending", json.dumps(pending).encode())
            else:
                txn.delete(b"copy_pending", db=self.db_ctx)
                txn.delete(b"copied", db=self.db_ctx)
            # a fence, a restart point: of this site's time as a primary, which ends here
            txn.delete(b"fenced", db=self.db_ctx)
            txn.delete(b"restart_point", db=self.db_ctx)
            self._put(txn, "secondary_state", b"initial-copy")
            self._put(txn, "last_received", K.u64(0))
            self._put(txn, "last_played", K.u64(0))
            txn.delete(b"copy_progress", db=self.db_ctx)
            txn.delete(b"playing", db=self.db_ctx)
        for f in self.dir.glob("*.ds"):
            f.unlink()
        os.close(create_private(self.dir / COPY_FILE))
        fsync_dir(self.dir)
        self.copy = {"off": 0, "chunks": 0, "unsynced": 0,
                     "check": ExtentCheck(self.nblocks, ascending=True)}

    def _resumable_chunks(self, path: Path, start: int, number: int, delta_set: int | None,
                          check: ExtentCheck):
        """After a restart: yield (end offset, chunk) for the chunks of `path` from `start`
        that continue what was received in order (numbered from `number`, of this
        generation and of `delta_set` unless None, extents accepted by and added to `check`);
        stops at the first that does not (the caller cuts the file there)."""
        for off, size, c in iter_chunks(path, start, self._read):
            if (c.number != number or c.generation != self.generation
                    or (delta_set is not None and c.delta_set != delta_set)
                    or check.problem(c.extents)):
                return
            check.add(c.extents)
            number += 1
            yield off + size, c

    def _load_copy(self) -> None:
        """Rebuild the position of an initial copy in progress: from the last durable
        position saved, every whole chunk that verifies (a torn tail is cut off)."""
        if self.role != "secondary" or self.state != "initial-copy":
            return
        path = self.dir / COPY_FILE
        check = ExtentCheck(self.nblocks, ascending=True)
        cp = {"off": 0, "chunks": 0, "unsynced": 0, "check": check}
        saved = _progress(self._get("copy_progress"))
        for f in self.dir.glob("*.ds"):  # delta sets of an earlier primary (attach crashed)
            if f.name != COPY_FILE:
                f.unlink()
        if not path.exists():
            os.close(create_private(path))
            saved = None
        start = 0  # the saved position counts only if the file still reaches it
        if saved and path.stat().st_size >= saved["off"]:
            start = saved["off"]
            cp.update(off=saved["off"], chunks=saved["chunks"])
            check.next, check.blocks = saved["next"], saved["blocks"]
        for end, _ in self._resumable_chunks(path, start, cp["chunks"], None, check):
            cp["off"] = end
            cp["chunks"] += 1
        if path.stat().st_size != cp["off"]:
            os.truncate(path, cp["off"])
        self.copy = cp

    def _read(self, start: int, count: int) -> bytes:
        """Blocks of the volume for rebuilding a direct record (bounds checked: a damaged
        record must not make a read fail outside the volume)."""
        if self.dev is None:
            raise ChunkError("a direct record, but no volume to read it from")
        return _bounded(self.dev, self.nblocks)(start, count)

    def _decode(self, decode, body, what: str):
        """Decode a record from the primary; refuse it unless it is whole and of this site's
        generation."""
        try:
            rec = decode(body)
        except ChunkError as e:
            raise ReceiveError(f"rejected {what}: {e}", "invalid") from None
        if rec.generation != self.generation:
            raise ReceiveError(f"rejected {what} of generation {rec.generation}: this site is "
                               f"at generation {self.generation}")
        return rec

    def receive_copy(self, body) -> dict:
        """One initial-copy record: check it, then stage it (append it as a chunk)."""
        if self.role != "secondary" or self.state != "initial-copy" or self.copy is None:
            raise ReceiveError("this site is not expecting an initial copy")
        rec = self._decode(decode_copy, body, "copy record")
        cp = self.copy
        check = cp["check"]
        ext = [(rec.start, rec.count)]
        if rec.count and rec.start + rec.count <= check.next:
            return {"duplicate": True, "next_block": check.next}  # a resend: already held
        why = check.problem(ext)
        if why:
            raise ReceiveError(f"rejected copy record: {why}")
        raw = encode_chunk(self.generation, 0, cp["chunks"], ext, rec.data)
        # blocks free in the file system the mount shows (its state until the copy is
        # played) go straight into the volume: the copy of a new secondary is written once
        area = self._bitmap_area() if self.dev is not None else None
        direct = self._free_runs(ext, area) if area is not None else []
        fd = os.open(self.dir / COPY_FILE, os.O_WRONLY | os.O_CLOEXEC)
        try:
            stored = self._store_record(fd, cp["off"], raw, ext, rec.data, direct)
            # (counted in bytes received: a direct record stores a few bytes per MiB, and a
            # restart re-verifies every block copied since the last recorded position)
            synced = cp["unsynced"] + len(raw) >= COPY_SYNC_BYTES
            if synced:  # the volume's direct blocks durable before the position says so
                if self.dev is not None:
                    self.dev.flush()
                os.fdatasync(fd)
        finally:
            os.close(fd)
        check.add(ext)
        cp["off"] += stored
        cp["chunks"] += 1
        self.received_bytes += len(raw)
        cp["unsynced"] = 0 if synced else cp["unsynced"] + len(raw)
        if synced:
            with self.env.begin(write=True) as txn:
                self._put(txn, "copy_progress", json.dumps(
                    {"off": cp["off"], "next": check.next, "chunks": cp["chunks"],
                     "blocks": check.blocks}).encode())
        return {"written": rec.count, "next_block": check.next}

    def start_playback(self, after, generation, blocks) -> None:
        """The initial copy is complete: it holds `blocks` blocks, the primary's state at
        delta set `after`. It becomes incoming delta set `after`, played like the others."""
        if self.role != "secondary" or self.state != "initial-copy" or self.copy is None:
            raise ReceiveError("this site is not receiving an initial copy")
        if generation != self.generation:
            raise ReceiveError(f"rejected start of playback of generation {generation}: this "
                               f"site is at generation {self.generation}")
        if not isinstance(after, int) or not 1 <= after < 1 << 63:
            raise ReceiveError(f"rejected start of playback after delta set {after!r}", "invalid")
        cp = self.copy
        if blocks != cp["check"].blocks:
            raise ReceiveError(f"the initial copy is incomplete: this site holds "
                               f"{cp['check'].blocks} of {blocks} blocks")
        path = self.dir / COPY_FILE
        if self.dev is not None:  # the copy's direct blocks
            self.dev.flush()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.dir)
        rec = {"number": after, "chunks": cp["chunks"], "blocks": cp["check"].blocks,
               "bytes": cp["off"], "generation": self.generation, "received_ns": time.time_ns(),
               "cut_ns": 0, "first_change_ns": 0, "file": COPY_FILE, "copy": True}
        with self.env.begin(write=True) as txn:
            txn.put(K.u64(after), json.dumps(rec).encode(), db=self.db_in)
            self._put(txn, "secondary_state", b"replicating")
            self._put(txn, "last_received", K.u64(after))
            self._put(txn, "last_played", K.u64(after - 1))
            txn.delete(b"copy_progress", db=self.db_ctx)
        self.copy = None

    def detach(self) -> None:
        with self.env.begin(write=True) as txn:
            self._put(txn, "secondary_state", b"stopped")

    # ------------------------------------------------------------------ receiving

    def _path(self, n: int) -> Path:
        return self.dir / f"{n}.ds"

    def _writer(self, n: int) -> int:
        """The open file of partial delta set `n` (opened once, kept until it is committed,
        dropped or replaced)."""
        if self._wfd is None or self._wfd[0] != n:
            self.close()
            self._wfd = (n, os.open(self._path(n), os.O_WRONLY | os.O_CLOEXEC))
        return self._wfd[1]

    def close(self) -> None:
        """Close the file of the delta set being received, if open (nothing is lost: it is
        reopened for the next chunk)."""
        if self._wfd is not None:
            fd, self._wfd = self._wfd[1], None
            os.close(fd)

    def _file(self, rec: dict) -> Path:
        return self.dir / rec["file"] if rec.get("file") else self._path(rec["number"])

    def _new_partial(self, n: int) -> dict:
        return {"n": n, "checksums": [], "blocks": 0, "off": 0,
                "check": ExtentCheck(self.nblocks), "direct": False, "bitmap": {}}

    def _load_partial(self) -> None:
        """Rebuild the state of a delta set whose reception was interrupted."""
        if self.role != "secondary" or self.state != "replicating":
            return
        n = self.last_received + 1
        path = self._path(n)
        if not path.exists():
            return
        p = self._new_partial(n)
        area = self._bitmap_area() if self.dev is not None else None
        for end, c in self._resumable_chunks(path, 0, 0, n, p["check"]):
            self._keep_bitmap(p, area, c)
            p["checksums"].append(c.checksum)
            p["blocks"] += c.blocks
            p["off"] = end
            p["direct"] = p["direct"] or bool(c.direct)
        os.truncate(path, p["off"])
        self.partial = p

    def receive_chunk(self, body) -> dict:
        if self.role != "secondary" or self.state != "replicating":
            raise ReceiveError("this site is not receiving delta sets")
        c = self._decode(decode_chunk, body, "chunk")
        want = self.last_received + 1
        if c.delta_set <= self.last_received:
            return {"duplicate": True}
        if c.delta_set != want:
            raise ReceiveError(f"expected delta set {want}, got {c.delta_set}")
        p = self.partial
        if p is not None and p["n"] == want and c.number < len(p["checksums"]):
            return {"duplicate": True}
        have = len(p["checksums"]) if p is not None and p["n"] == want else 0
        if c.number != have:
            raise ReceiveError(f"delta set {want}: expected chunk {have}, got {c.number}")
        if p is None or p["n"] != want:
            p = self._new_partial(want)
            why = p["check"].problem(c.extents)
            if why is None:
                self.close()
                self._wfd = (want, create_private(self._path(want)))
                self.partial = p
        else:
            why = p["check"].problem(c.extents)
        if why:
            raise ReceiveError(f"rejected chunk {c.number} of delta set {want}: {why}")
        area = self._bitmap_area() if self.dev is not None else None
        direct = self._direct_runs(want, c.extents, area)
        self._keep_bitmap(p, area, c)
        stored = self._store_record(self._writer(want), p["off"], body, c.extents, c.data,
                                    direct)
        p["direct"] = p["direct"] or bool(direct)
        p["check"].add(c.extents)
        p["off"] += stored
        p["checksums"].append(c.checksum)
        p["blocks"] += c.blocks
        self.received_bytes += len(body)
        return {"accepted": c.number}

    def _bitmap_area(self) -> tuple[int, int] | None:
        """(first block, blocks) of the block bitmap of the file system in the volume, or
        None if the volume holds none."""
        try:
            sb = Superblock.unpack(self.dev.read(0, 1))
        except (FormatError, OSError, ValueError):
            return None
        return sb.bbitmap_start, sb.bbitmap_blocks

    def _keep_bitmap(self, p: dict, area, c) -> None:
        """Keep the images of the bitmap blocks that chunk `c` of the partial delta set
        carries (their state at its boundary), for the direct writes of later delta sets
        received before it is played; past WAITING_BITMAP_BYTES in all, none are kept for
        it (later ones are then staged until it is played)."""
        if area is None or p["bitmap"] is None:
            p["bitmap"] = None
            return
        start, count = area
        mv, pos = memoryview(c.data), 0
        for s, k in c.extents:
            for b in range(max(s, start), min(s + k, start + count)):  # (bitmap blocks only)
                p["bitmap"][b - start] = bytes(mv[pos + (b - s) * BS: pos + (b - s + 1) * BS])
            pos += k * BS
        if (len(p["bitmap"]) + sum(len(w["bitmap"]) for w in self._waiting.values())
                ) * BS > WAITING_BITMAP_BYTES:
            p["bitmap"] = None

    def _direct_runs(self, n: int, extents, area) -> list[tuple[int, int]]:
        """The blocks of `extents` (a chunk of delta set `n`) that may go straight into the
        volume, as runs in the chunk's block order: those free at boundary n - 1 and not
        written by a delta set still to be played before n. Nothing reads a free block,
        and playing delta set n is the first thing to make one part of the file system, so
        such a block needs no staged copy: it is written once. Free means free at every
        boundary from the one played to n - 1: in the volume's bitmap and in the bitmap
        block images of the delta sets received since (kept while they were received). []
        when that is not known: no device, no file system, or a delta set to be played
        before n that this process did not receive whole (received before a restart, the
        initial copy, too many bitmap blocks)."""
        if self.dev is None or area is None:
            return []
        played = self.last_played
        for k in [k for k in self._waiting if k <= played]:
            del self._waiting[k]
        sets = [self._waiting.get(k) for k in range(played + 1, n)]
        if None in sets:
            return []
        return self._free_runs(extents, area, sets)

    def _free_runs(self, extents, area, sets=()) -> list[tuple[int, int]]:
        """The blocks of `extents` free in the volume's block bitmap (the boundary the mount
        shows) and in every bitmap block image of `sets` (each boundary up to the one the
        delta set starts from: a block in use at any of them is read by the mount once that
        one is played), and in none of `sets`' blocks, as runs in the extents' order."""
        start, count = area
        bits_per = BS * 8
        out = []
        for s, k in extents:
            first, last = s // bits_per, (s + k - 1) // bits_per
            if last >= count:
                return []
            used = np.frombuffer(self.dev.read(start + first, last - first + 1),
                                 dtype=np.uint8).copy()
            for w in sets:  # used at any boundary from the one the mount shows to n - 1
                for i in range(first, last + 1):
                    if i in w["bitmap"]:
                        used[(i - first) * BS: (i - first + 1) * BS] |= np.frombuffer(
                            w["bitmap"][i], dtype=np.uint8)
            lo = s - first * bits_per
            free = np.unpackbits(used, bitorder="little")[lo: lo + k] == 0
            for w in sets:
                free &= ~w["blocks"].get_range(s, k)
            out.extend((s + i, n) for _, i, n in runs(np.flatnonzero(free)))
        return out

    def _store_record(self, fd: int, off: int, chunk, extents, data, direct) -> int:
        """Store received chunk `chunk` (its `extents` and `data`) at `off` of file `fd`:
        whole, or its blocks in runs `direct` written into the volume first (through the
        stack: a snapshot of this site still gets its before-images) and a direct record of
        the rest. Returns the bytes stored."""
        if not direct:
            pwrite_all(fd, chunk, off)
            return len(chunk)
        mv = memoryview(data)
        pos = 0
        for s, k, is_direct in direct_pieces(extents, direct):
            if is_direct:
                self.dev.write(s, mv[pos: pos + k * BS], meta=True)
            pos += k * BS
        _bound_held(self.dev)
        self.direct_blocks += sum(k for _, k in direct)
        return pwritev_all(fd, encode_direct(chunk, direct), off)

    def commit(self, header: bytes, meta: dict) -> dict:
        """The delta-set header: verify completeness, make it durable, acknowledge.
        Syncs files: call it from a worker thread."""
        if self.role != "secondary" or self.state != "replicating":
            raise ReceiveError("this site is not receiving delta sets")
        hdr = self._decode(decode_set_header, header, "delta-set header")
        if hdr.delta_set <= self.last_received:
            return {"acked": self.last_received, "played": self.last_played}
        p = self.partial
        if hdr.delta_set != self.last_received + 1 or (
                hdr.chunks and (p is None or p["n"] != hdr.delta_set)):
            raise ReceiveError(f"header for delta set {hdr.delta_set} out of order")
        got = p["checksums"] if p and p["n"] == hdr.delta_set else []
        blocks = p["blocks"] if got else 0
        if len(got) != hdr.chunks or blocks != hdr.blocks or data_checksum(got) != hdr.data_checksum:
            self.partial = None
            self.close()
            self._path(hdr.delta_set).unlink(missing_ok=True)
            raise ReceiveError(f"delta set {hdr.delta_set} incomplete or corrupt "
                               f"({len(got)} of {hdr.chunks} chunks): send it again", "invalid")
        if got:
            if p["direct"]:  # its blocks in the volume durable before it is acknowledged
                self.dev.flush()
            try:
                os.fsync(self._writer(hdr.delta_set))
            finally:
                self.close()  # (received whole: no more writes to it)
            fsync_dir(self.dir)
        rec = {"number": hdr.delta_set, "chunks": hdr.chunks, "blocks": hdr.blocks,
               "bytes": p["off"] if got else 0, "generation": hdr.generation,
               "data_checksum": hdr.data_checksum, "received_ns": time.time_ns(),
               "cut_ns": _int(meta.get("cut_ns")),
               "first_change_ns": _int(meta.get("first_change_ns"))}
        with self.env.begin(write=True) as txn:
            txn.put(K.u64(hdr.delta_set), json.dumps(rec).encode(), db=self.db_in)
            self._put(txn, "last_received", K.u64(hdr.delta_set))
        if not got:
            self._waiting[hdr.delta_set] = {"blocks": PagedBits(), "bitmap": {}}
        elif p["bitmap"] is not None:
            self._waiting[hdr.delta_set] = {"blocks": p["check"].seen, "bitmap": p["bitmap"]}
        self.partial = None
        return {"acked": hdr.delta_set, "played": self.last_played}

    # ------------------------------------------------------------------ playback

    def next_to_play(self) -> dict | None:
        n = self.last_played + 1
        with self.env.begin(db=self.db_in) as txn:
            raw = txn.get(K.u64(n))
        return None if raw is None else _record(raw, n)

    def extents(self, rec: dict) -> list[tuple[int, int]] | None:
        """The extents a received delta set will write, read from its chunk headers only
        (the data is verified by play); None if the headers do not parse (play will refuse
        the delta set; meanwhile assume it may write anything)."""
        path = self._file(rec)
        if not rec["chunks"]:
            return []
        if rec.get("copy"):
            return None  # the initial copy: anything may change (and its headers are many)
        out, off = [], 0
        try:
            with open(path, "rb") as f:
                end = os.fstat(f.fileno()).st_size
                while off < end:
                    head = os.pread(f.fileno(), 64 * 1024, off)  # holds any chunk's extents
                    size = record_size(head)
                    out.extend(peek_extents(head))
                    off += size
        except (OSError, ChunkError, IndexError, ValueError):
            return None
        return out

    def verify(self, rec: dict, dev=None) -> None:
        """Check a whole received delta set before any of it is written: every chunk
        decodes and verifies (a direct record with the blocks it put in the volume, read
        through `dev` or this receiver's device), is numbered in order, carries the delta
        set's generation and number, its extents are valid and disjoint, and the totals
        match its record. Raises CorruptDeltaSet. Returns the delta set's blocks (PagedBits;
        None for an initial copy)."""
        n = rec["number"]
        if rec.get("damaged"):
            raise CorruptDeltaSet(f"delta set {n}: its record in meta.lmdb is damaged")
        if not rec["chunks"]:
            return PagedBits()
        path = self._file(rec)
        gen = rec.get("generation", self.generation)
        want_ds = 0 if rec.get("copy") else n
        check = ExtentCheck(self.nblocks, ascending=bool(rec.get("copy")))
        sums = []
        end = 0
        try:
            size = path.stat().st_size
            read = self._read if dev is None else _bounded(dev, self.nblocks)
            for off, csize, c in iter_chunks(path, 0, read):
                if c.number != len(sums) or c.generation != gen or c.delta_set != want_ds:
                    raise CorruptDeltaSet(f"delta set {n}: chunk {len(sums)} is out of place")
                try:
                    check.add(c.extents)
                except ValueError as e:
                    raise CorruptDeltaSet(f"delta set {n}: {e}") from None
                sums.append(c.checksum)
                end = off + csize
        except OSError as e:
            raise CorruptDeltaSet(f"delta set {n}: cannot read {path}: {e.strerror}") from None
        if end != size or len(sums) != rec["chunks"] or check.blocks != rec["blocks"] or (
                "data_checksum" in rec and data_checksum(sums) != rec["data_checksum"]):
            raise CorruptDeltaSet(f"delta set {n} in {path} is damaged ({len(sums)} of "
                                  f"{rec['chunks']} chunks verify); it was not played")
        return check.seen

    def play(self, rec: dict, dev) -> int:
        """Write delta set `rec` into the volume (through `dev`) and record it as played:
        all of it, after `verify`, or none of it. Runs in a worker thread while readers are
        held back, one chunk in memory at a time."""
        n = rec["number"]
        bits = self.verify(rec, dev)
        copied = self._json("copy_pending") if rec.get("copy") else None
        with self.env.begin(write=True) as txn:
            self._put(txn, "playing", K.u64(n))
        blocks = 0
        if rec["chunks"]:  # (verified whole just now: the records are taken apart only)
            for _, _, raw in iter_records(self._file(rec)):
                sp = split_record(raw)
                pos = 0
                for start, count, direct in sp.pieces:
                    if not direct:  # (a direct run is in the volume since it was received)
                        dev.write(start, sp.data[pos: pos + count * BS], meta=True)
                        pos += count * BS
                _bound_held(dev)
                blocks += sp.blocks
        dev.flush()
        # a forwarder (repl/forward.py): the delta set becomes ready in its own mailbox in
        # the same transaction that records it played, pinned at this boundary
        fwd = forwarding(self.env, self.db_ctx)
        store = pin = None
        if fwd and not rec.get("copy") and bits is not None and bits.count():
            layer = dev.find_layer(SnapLayer)
            store = layer.store
            old = next((s for s in list(store.queue) if s.name == f"{PIN_PREFIX}{n}"), None)
            if old is not None:  # (a stale one: this playback makes the pin of n anew)
                layer.delete(old)
            pin = forward_pin(store, n, bits)
            with layer.lock:  # nothing writes its blocks before the commit below
                store.queue.append(pin)
        try:
            with self.env.begin(write=True) as txn:
                self._put(txn, "last_played", K.u64(n))
                txn.delete(K.u64(n), db=self.db_in)
                txn.delete(b"playing", db=self.db_ctx)
                self._put(txn, "last_played_ns", K.u64(time.time_ns()))
                self._put(txn, "last_played_first_change_ns",
                          K.u64(rec.get("first_change_ns", 0)))
                if copied is not None:  # a snapshot copy (recovery/copy.py) is in place:
                    copied["played_ns"] = time.time_ns()  # this site holds it, and no
                    self._put(txn, "copied", json.dumps(copied).encode())  # delta sets
                    self._put(txn, "secondary_state", b"copied")  # follow
                    txn.delete(b"copy_pending", db=self.db_ctx)
                if fwd and rec.get("copy"):  # the mailbox starts at the copy's boundary
                    self._put(txn, "last_cut", K.u64(n))
                elif fwd and (pin is not None or not bits.count()):
                    forward_record(txn, (self.db_ctx, self.db_fwd_sets, self.db_fwd_bits),
                                   store, pin, rec, bits)
        except BaseException:
            if pin is not None:
                with layer.lock:
                    store.queue.remove(pin)
                store.discard_prepared(pin)
            raise
        self._file(rec).unlink(missing_ok=True)
        self.played_blocks += blocks
        return blocks

    def drop_partial(self) -> None:
        """Forget the delta set being received (its file could not be made durable): the
        primary sends it again from its first chunk."""
        self.close()
        if self.partial is not None:
            self._path(self.partial["n"]).unlink(missing_ok=True)
            self.partial = None

    # ------------------------------------------------------------------ quarantine

    QUARANTINE_KEEP = 20  # reports kept in the replication context

    def quarantine(self, rec: dict, reason: str) -> str | None:
        """A received delta set fails its verification at playback (damaged on this site's
        disk after it was acknowledged): it is never played. Its file moves to
        SITE/save/quarantine/ (kept for inspection), it and every delta set received after
        it are forgotten, and last_received goes back to the last one played, so the primary
        sends them again (it keeps chunk files until they are played). Returns the path of
        the kept file (None if there was none). Idempotent after a crash: a record whose file
        is gone fails verification and comes here again."""
        n = rec["number"]
        qdir = self.dir.parent / "quarantine"
        private_dir(qdir)  # raw blocks of every file, as incoming/: 0700
        src = self._file(rec)
        dst: Path | None = qdir / f"{n}-{time.time_ns()}.ds"
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            dst = None
        else:
            # the move durable before the record says it happened (a power cut must not
            # keep a report naming a file that is not there): quarantine/ itself (it may be
            # new) in save/, the new name, the old one gone (runs in a worker thread)
            fsync_dir(qdir.parent)
            fsync_dir(qdir)
            fsync_dir(self.dir)
        later = [r for r in self.incoming() if r["number"] > n]
        self._waiting = {k: w for k, w in self._waiting.items() if k < n}
        entry = {"delta_set": n, "reason": reason, "at_ns": time.time_ns(),
                 "file": str(dst) if dst else None}
        reports = (self.quarantined() + [entry])[-self.QUARANTINE_KEEP:]
        with self.env.begin(write=True) as txn:
            for r in [rec] + later:
                txn.delete(K.u64(r["number"]), db=self.db_in)
            self._put(txn, "last_received", K.u64(n - 1))
            self._put(txn, "quarantined", json.dumps(reports).encode())
        for r in later:
            self._file(r).unlink(missing_ok=True)
        self.close()
        if self.partial is not None:  # a later delta set half received: from scratch
            self._path(self.partial["n"]).unlink(missing_ok=True)
            self.partial = None
        return entry["file"]

    def quarantined(self) -> list[dict]:
        """Reports of the delta sets quarantined here, oldest first."""
        raw = self._get("quarantined")
        try:
            out = json.loads(raw) if raw else []
        except ValueError:
            return []
        return out if isinstance(out, list) else []

    def interrupted_playback(self) -> dict | None:
        """The delta set whose playback a crash interrupted (its record), if any."""
        raw = self._get("playing")
        if raw is None:
            return None
        rec = self.next_to_play()
        if rec is None or rec["number"] != K.from_u64(raw):
            with self.env.begin(write=True) as txn:
                txn.delete(b"playing", db=self.db_ctx)
            return None
        return rec


def finish_interrupted_playback(env, site_path: Path, dev) -> None:
    """Before the file system is opened: finish a playback that a crash interrupted (it is
    idempotent), so the mount never shows a half-played delta set."""
    db = env.open_db(K.CTX)
    with env.begin(db=db) as txn:
        if txn.get(b"playing") is None:
            return
    r = Receiver(env, site_path, dev.nblocks, dev)
    rec = r.interrupted_playback()
    if rec is None:
        return
    log.info("finishing the interrupted playback of delta set %d", rec["number"])
    try:
        r.play(rec, dev)
    except ReceiveError as e:  # damaged since it was first verified: it cannot be finished
        log.error("%s; the mount shows it half played until the playback loop has it sent "
                  "again and plays it", e)


def _bound_held(dev) -> None:
    """Let the writes that copy-on-write for a snapshot of this site holds in memory go to
    the volume once they reach the snapshot layer's `held_release` (site.toml [memory]
    held_limit; its default for a device without one): bounded memory while a delta set is
    received or played."""
    try:
        limit = dev.find_layer(SnapLayer).held_release
    except (AttributeError, LookupError):
        limit = HELD_RELEASE
    if getattr(dev, "pending_bytes", int)() >= limit:
        dev.release_held()


def _bounded(dev, nblocks: int):
    """`dev.read(start, count)`, refusing runs outside a volume of `nblocks` blocks."""
    def bounded(start: int, count: int) -> bytes:
        if start < 0 or count <= 0 or start + count > nblocks:
            raise ChunkError(f"direct run ({start}, {count}) is not inside this volume")
        return dev.read(start, count)
    return bounded


def _record(raw: bytes, n: int) -> dict:
    """The record of incoming delta set `n` from LMDB, checked. A damaged one (found by
    tests/t0_fuzz.py: bad JSON stopped playback with a traceback on every round; a "file" of
    "../x" would have had playback read and then delete a file outside the incoming area)
    comes back marked `damaged`: playback refuses it like a damaged delta set (quarantined,
    asked for again)."""
    try:
        rec = json.loads(raw)
        ok = (isinstance(rec, dict) and rec.get("number") == n
              and K.is_u64(rec.get("chunks")) and K.is_u64(rec.get("blocks"))
              and all(K.is_u64(rec.get(k, 0)) for k in (
                  "bytes", "generation", "data_checksum", "received_ns", "cut_ns",
                  "first_change_ns"))
              and rec.get("file", f"{n}.ds") in (f"{n}.ds", COPY_FILE))
    except ValueError:
        ok = False
    if ok:
        return rec
    return {"number": n, "chunks": 0, "blocks": 0, "bytes": 0, "received_ns": 0,
            "damaged": True}


def _progress(raw: bytes | None) -> dict | None:
    """The saved position of an initial copy, or None if there is none or it is damaged
    (the copy is then rescanned from its start: every chunk is verified anyway)."""
    try:
        saved = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(saved, dict) or not all(
            K.is_u64(saved.get(k)) for k in ("off", "chunks", "next", "blocks")):
        return None
    return saved


def _int(v) -> int:
    return v if K.is_u64(v) else 0
