"""Delta sets at the primary (FIG. 8, 10): cutting, pinning, the mailbox, streaming,
retention and flow control.

A cut happens at a consistency point and is O(1) in the volume: the change log's table of
changed blocks becomes the delta set's block list (kept in LMDB ``dsbits``), and a *pinning
snapshot* (``repl-ds-N``, an internal snapshot of the snapped volume) is taken whose interest
is exactly that block list. Nothing is copied at the cut: the sender reads the delta set's
blocks through the pinning snapshot when it ships them, so a block still unchanged is read
from the volume, and only a block overwritten before every destination had it was copied —
once, by copy-on-write, into the pinning snapshot's save volume (with its sync batched like
every before-image; repfs/snap/layer.py). While destinations keep up, a user's byte is written
once on the primary. Each delta set is still exactly the state at its boundary (invariant 4:
the chunks are checksummed as they are made, the header goes last).

The mailbox (LMDB ``deltasets``) records each delta set; the cut writes the block list, the
pinning snapshot's record, the mailbox record and the emptied change log in one transaction,
so a crash leaves either no delta set or a whole one. A cut at a consistency point whose
syncs run after the writers go on (Primary.cut) records it in state "cut", and "ready" (sent
from then on) once its boundary is durable; a crash in between undoes it at the next open
(`undo_unready`: never sent, its blocks go back into the change log). A delta set is *released* (its pinning
snapshot deleted) once every destination has played it; its block list stays for the
retention period (what recovery needs later is the block lists, not the data: FIG. 28).

Flow control: cutting pauses while the pinning snapshots hold more than the capacity, or more
than MAX_OUTSTANDING delta sets are unreleased; the change log keeps coalescing meanwhile
(invariant 4: never dropped). Delta sets made before this design (a chunk file under
``save/deltasets/``) are still streamed from their file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ..extents import runs
from ..pagedbits import PagedBits
from ..snap.keys import snap_key
from . import keys as K
from .changelog import ChangeLogLayer
from .chunk import (
    MAX_CHUNK_BLOCKS, ChunkError, SetHeader, chunk_size, data_checksum,
    encode_chunk_parts,
    encode_set_header, encoded_checksum, is_set_header, SET_HEADER_SIZE,
)

log = logging.getLogger(__name__)
BS = 4096
PIN_PREFIX = "repl-ds-"  # the pinning snapshots' names (reserved: users cannot take them)
MAX_OUTSTANDING = 64  # unreleased delta sets before cutting pauses (each costs the write path
#                      one more snapshot to consult)


class ChunkEncoder:
    """Packs extents, in block order, into delta chunks of at most MAX_CHUNK_BLOCKS blocks.
    Deterministic: the same blocks give the same chunks, so a resumed send can skip the
    chunks a receiver holds and still compute the delta set's header."""

    def __init__(self, generation: int, n: int):
        self.generation = generation
        self.n = n
        self.checksums: list[int] = []
        self.blocks = 0
        self._ext: list[tuple[int, int]] = []
        self._data: list[bytes] = []
        self._pending = 0

    def add(self, start: int, data) -> list[bytes]:
        """Add blocks [start, start + len(data)/4K); returns the chunks completed."""
        out = []
        mv = memoryview(data)
        count = len(mv) // BS
        a = 0
        while a < count:
            m = min(count - a, MAX_CHUNK_BLOCKS - self._pending)
            s = start + a
            if self._ext and self._ext[-1][0] + self._ext[-1][1] == s:
                self._ext[-1] = (self._ext[-1][0], self._ext[-1][1] + m)
            else:
                self._ext.append((s, m))
            self._data.append(mv[a * BS: (a + m) * BS])  # (a view: copied once, at _emit)
            self._pending += m
            a += m
            if self._pending == MAX_CHUNK_BLOCKS:
                out.append(self._emit())
        return out

    def _emit(self) -> bytes:
        buf = encode_chunk_parts(self.generation, self.n, len(self.checksums), self._ext,
                                 self._data)
        self.checksums.append(encoded_checksum(buf))
        self.blocks += self._pending
        self._ext, self._data, self._pending = [], [], 0
        return buf

    def finish(self) -> list[bytes]:
        return [self._emit()] if self._pending else []

    def header(self) -> bytes:
        return encode_set_header(SetHeader(self.generation, self.n, len(self.checksums),
                                           self.blocks, data_checksum(self.checksums)))


class DeltaStream:
    """One delta set as the sender streams it: `chunks()` yields its encoded chunks in order
    (one in memory at a time); after that, `header()` is its delta-set header."""

    READ_BLOCKS = 256  # blocks read through the pinning snapshot at a time

    def __init__(self, sets: "DeltaSets", rec: dict):
        self.sets = sets
        self.rec = rec
        self._header: bytes | None = None

    def chunks(self):
        rec = self.rec
        n = rec["number"]
        if rec.get("pinned") is None:  # made before issue 8: a chunk file
            yield from self._file_chunks(self.sets.path(n))
            return
        enc = ChunkEncoder(rec["generation"], n)
        if rec["blocks"]:
            snap = self.sets.pin(n)
            if snap is None:
                raise ChunkError(f"delta set {n} is no longer held (released)")
            if snap.attrs.get("broken"):
                raise ChunkError(f"delta set {n} could not be kept on this site "
                                 f"({snap.attrs['broken']})")
            layer = self.sets.layer
            bits = snap.interest
            for page in sorted(bits.pages):
                for _, s, c in runs(bits.page_blocks(page)):
                    while c:
                        m = min(c, self.READ_BLOCKS)
                        yield from enc.add(s, layer.read_snapshot(snap, s, m))
                        s += m
                        c -= m
        yield from enc.finish()
        if rec["blocks"] and snap.attrs.get("broken"):  # broke while it was read
            raise ChunkError(f"delta set {n} could not be kept on this site "
                             f"({snap.attrs['broken']})")
        if enc.blocks != rec["blocks"]:
            raise ChunkError(f"delta set {n}: {enc.blocks} blocks streamed, "
                             f"{rec['blocks']} cut")
        self._header = enc.header()

    def _file_chunks(self, path: Path):
        with open(path, "rb") as f:
            fd = f.fileno()
            end = os.fstat(fd).st_size
            off = 0
            while off < end:
                head = os.pread(fd, 64, off)
                if is_set_header(head):
                    self._header = os.pread(fd, SET_HEADER_SIZE, off)
                    return
                size = chunk_size(head)
                yield os.pread(fd, size, off)
                off += size
        raise ChunkError(f"{path} ends without a delta-set header")

    def header(self) -> bytes:
        assert self._header is not None, "chunks() first"
        return self._header


def _load_bits(env, db_bits, n: int, txn=None) -> PagedBits:
    """Delta set `n`'s block list from LMDB ``dsbits`` (read in `txn` if given)."""
    bits = PagedBits()
    prefix = K.u64(n)
    with (env.begin(db=db_bits) if txn is None else nullcontext(txn)) as txn:
        cur = txn.cursor(db=db_bits)
        if cur.set_range(K.ds_page(n, 0)):
            for key, val in cur:
                if key[:8] != prefix:
                    break
                bits.pages[K.from_u32(key[8:12])] = np.frombuffer(val, np.uint8).copy()
    return bits


def undo_unready(env) -> list[int]:
    """Undo the delta sets that were cut but never made ready (a crash between a cut and
    the end of its syncs: Primary.cut, Operations.cut_point). Nothing of them was sent, so
    they count as never cut: each one's block list goes back into the change log (its old
    table, which the change log's recovery merges into the new one; the earliest
    first_change_ns is kept), its record and block list go and last_cut steps back, all in
    one transaction; its pinning snapshot then keeps nothing and is deleted (attach_pins,
    DeltaSets._recover). Run before the change log and the file system's redo-log replay
    open the volume stack (site.py: attach_pins). Returns the numbers undone."""
    db_sets = env.open_db(K.DELTASETS)
    db_bits = env.open_db(K.DSBITS)
    db_old = env.open_db(K.CLOG_OLD)
    db_ctx = env.open_db(K.CTX)
    undo, done = [], 0
    with env.begin(db=db_sets) as txn:
        for _, raw in txn.cursor():
            try:
                rec = json.loads(raw)
            except ValueError:  # (a damaged record is not this function's to judge)
                continue
            if not (isinstance(rec, dict) and K.is_u64(rec.get("number"))
                    and rec["number"] > 0):
                continue
            if rec.get("state") == "cut":
                undo.append(rec)
            else:
                done = max(done, rec["number"])
    # one cut below a later one that became ready: its "ready" commit failed after its
    # syncs, and the later cut's syncs came after its boundary: it is durable, made ready
    # (undoing it would put last_cut behind the later one)
    late = [r for r in undo if r["number"] < done]
    undo = [r for r in undo if r["number"] > done]
    if late:
        with env.begin(write=True) as txn:
            for rec in late:
                rec.update(state="ready", ready_ns=time.time_ns())
                txn.put(K.u64(rec["number"]), json.dumps(rec).encode(), db=db_sets)
        log.info("delta set %s was cut before a later one was made ready: made ready too",
                 ", ".join(str(r["number"]) for r in late))
    if not undo:
        return []
    with env.begin(write=True) as txn:
        first = 0
        raw = txn.get(b"first_change_ns", db=db_ctx)
        if raw is not None and len(raw) == 8:
            first = K.from_u64(raw)
        for rec in undo:
            n = rec["number"]
            for page, arr in _load_bits(env, db_bits, n, txn).pages.items():
                have = txn.get(K.u32(page), db=db_old)
                if have is not None and len(have) == len(arr):
                    arr |= np.frombuffer(have, np.uint8)
                txn.put(K.u32(page), arr.tobytes(), db=db_old)
            rf = rec.get("first_change_ns")
            if K.is_u64(rf) and rf and (not first or rf < first):
                first = rf
            txn.delete(K.u64(n), db=db_sets)
            cur = txn.cursor(db=db_bits)
            if cur.set_range(K.ds_page(n, 0)):
                while cur.key()[:8] == K.u64(n):
                    if not cur.delete():
                        break
        txn.put(b"first_change_ns", K.u64(first), db=db_ctx)
        txn.put(b"last_cut", K.u64(min(r["number"] for r in undo) - 1), db=db_ctx)
    nums = sorted(r["number"] for r in undo)
    log.info("delta set %s was cut but its boundary was not durable when the daemon "
             "stopped: undone, its blocks are in the change log again (nothing of it was "
             "sent)", ", ".join(map(str, nums)))
    return nums


def attach_pins(env, store) -> list:
    """Give every pinning snapshot its interest (its delta set's block list), as soon as
    the volume stack is assembled (site.py), before any recovery writes through it: else a
    pin would keep every valid block, as a user's snapshot does. A broken pin, and one
    whose delta set was released (the delete cut short by a crash) or undone
    (undo_unready, run first), keep nothing; the latter are returned, to be deleted.
    Idempotent."""
    undo_unready(env)
    db_sets = env.open_db(K.DELTASETS)
    db_bits = env.open_db(K.DSBITS)
    released = []
    for snap in store.queue:
        if not snap.name.startswith(PIN_PREFIX):
            continue
        n = snap.attrs.get("delta_set")
        rec = None
        if K.is_u64(n):
            with env.begin(db=db_sets) as txn:
                raw = txn.get(K.u64(n))
            rec = json.loads(raw) if raw else None
        if rec is None or not rec.get("pinned"):
            snap.interest = PagedBits()
            released.append(snap)
        elif snap.attrs.get("broken"):  # its delta set cannot be sent (DeltaStream.chunks)
            snap.interest = PagedBits()
        else:
            snap.interest = _load_bits(env, db_bits, n)
    return released


FORWARDING = b"forwarding"  # CTX: this secondary keeps a mailbox for its next hops (forward.py)


def forwarding(env, db_ctx) -> bool:
    """Whether this site forwards the delta sets it plays (a secondary with routes)."""
    with env.begin(db=db_ctx) as txn:
        return txn.get(FORWARDING) == b"1"


def clear_mailbox(env) -> None:
    """Forget every delta set of this site's mailbox and stop forwarding (one transaction):
    a site that takes a new copy (attach) keeps nothing of what it cut or forwarded before
    (its pins are deleted by the caller). A forwarder of the new copy starts its mailbox at
    the boundary it forwards from (forward.py)."""
    db_sets, db_bits, db_ctx = (env.open_db(K.DELTASETS), env.open_db(K.DSBITS),
                                env.open_db(K.CTX))
    with env.begin(write=True) as txn:
        txn.drop(db_sets, delete=False)
        txn.drop(db_bits, delete=False)
        txn.put(FORWARDING, b"0", db=db_ctx)
        txn.put(b"last_cut", K.u64(0), db=db_ctx)


def forward_pin(store, n: int, bits: PagedBits):
    """A forwarder's pin of delta set `n`, just played (receiver.play): a pinning snapshot of
    the volume at boundary n whose interest is the delta set's blocks, prepared to be recorded
    in play's last transaction (`forward_record`). Appended to the store's queue before that
    commit (the caller's job): nothing writes those blocks until the commit says n is played,
    and from then on a direct write of a later delta set or its playback copies them first."""
    return store.prepare(f"{PIN_PREFIX}{n}", {"delta_set": n, "purpose": "forwarded delta set"},
                         interest=bits, durable_entry=False)


def forward_record(txn, dbs, store, snap, rec: dict, bits: PagedBits) -> None:
    """In receiver.play's last transaction: delta set `rec` (received, now played) becomes
    ready in this forwarder's mailbox, exactly as a cut makes one on a primary, with the
    primary's number, generation and times, so the next hops (and an upstream bypassing
    this site) agree on every number. `snap`: its pin (None for an empty delta set); `dbs`:
    the handles of CTX, DELTASETS and DSBITS (no database is opened inside a transaction)."""
    db_ctx, db_sets, db_bits = dbs
    n = rec["number"]
    blocks = bits.count() if bits is not None else 0
    cur = txn.cursor(db=db_bits)  # (no page of an older record of the same number survives)
    if cur.set_range(K.ds_page(n, 0)):
        while cur.key()[:8] == K.u64(n):
            if not cur.delete():
                break
    for page, arr in (bits.pages.items() if bits is not None else ()):
        txn.put(K.ds_page(n, page), arr.tobytes(), db=db_bits)
    if snap is not None:
        store.record_new(txn, snap)
    now = time.time_ns()
    txn.put(K.u64(n), json.dumps({
        "number": n, "generation": rec.get("generation", 1), "state": "ready",
        "pinned": snap is not None, "blocks": blocks, "bytes": blocks * BS,
        "first_change_ns": rec.get("first_change_ns", 0), "cut_ns": rec.get("cut_ns") or now,
        "ready_ns": now, "forwarded": True}).encode(), db=db_sets)
    txn.put(b"last_cut", K.u64(n), db=db_ctx)


class DeltaSets:
    def __init__(self, env, clog: ChangeLogLayer, site_path: Path, layer, *,
                 capacity_bytes: int = 1 << 30, max_outstanding: int = MAX_OUTSTANDING):
        self.env = env
        self.clog = clog
        self.layer = layer  # the snapped volume: pinning snapshots
        self.store = layer.store
        self.dir = Path(site_path) / "save" / "deltasets"  # chunk files of before issue 8
        self.db_ctx = env.open_db(K.CTX)
        self.db_sets = env.open_db(K.DELTASETS)
        self.db_bits = env.open_db(K.DSBITS)
        self.capacity = capacity_bytes
        self.max_outstanding = max_outstanding
        self.cut_started = 0.0
        self._prune_lock = threading.Lock()
        self._recover()

    # ------------------------------------------------------------------ context

    def ctx_get(self, name: str, default=None):
        with self.env.begin(db=self.db_ctx) as txn:
            raw = txn.get(name.encode())
        return raw if raw is not None else default

    def ctx_put(self, name: str, value: bytes, txn=None) -> None:
        if txn is not None:
            txn.put(name.encode(), value, db=self.db_ctx)
            return
        with self.env.begin(write=True, db=self.db_ctx) as t:
            t.put(name.encode(), value)

    @property
    def last_cut(self) -> int:
        raw = self.ctx_get("last_cut")
        return K.from_u64(raw) if raw else 0

    @property
    def generation(self) -> int:
        raw = self.ctx_get("generation")
        return K.from_u64(raw) if raw else 1

    def record(self, n: int) -> dict | None:
        with self.env.begin(db=self.db_sets) as txn:
            raw = txn.get(K.u64(n))
        return json.loads(raw) if raw else None

    def records(self) -> list[dict]:
        with self.env.begin(db=self.db_sets) as txn:
            return [json.loads(v) for _, v in txn.cursor()]

    def _put_record(self, txn, rec: dict) -> None:
        txn.put(K.u64(rec["number"]), json.dumps(rec).encode(), db=self.db_sets)

    def block_list(self, n: int) -> PagedBits:
        """Delta set `n`'s block list as the cut recorded it (kept for the retention period:
        what recovery needs, FIG. 28)."""
        return _load_bits(self.env, self.db_bits, n)

    def _recover(self) -> None:
        self.legacy_files = False  # chunk files of before issue 8 (usage() lists them)
        for rec in self.records():
            n = rec["number"]
            if rec["state"] == "cutting":  # a chunk-file copy of before issue 8, cut short
                log.info("dropping delta set %d, cut when the daemon stopped; its blocks "
                         "are in the change log again", n)
                (self.dir / f"{n}.ds").unlink(missing_ok=True)
                with self.env.begin(write=True) as txn:
                    txn.delete(K.u64(n), db=self.db_sets)
                    self._drop_bits(txn, n)
                    self.ctx_put("last_cut", K.u64(n - 1), txn)
            elif rec.get("pinned") is None and rec.get("file", True):
                self.legacy_files = True
        for snap in attach_pins(self.env, self.store):  # released, the delete cut short
            self.layer.delete(snap)

    def _drop_bits(self, txn, n: int) -> None:
        cur = txn.cursor(db=self.db_bits)
        if cur.set_range(K.ds_page(n, 0)):
            while cur.key()[:8] == K.u64(n):
                if not cur.delete():
                    break

    # ------------------------------------------------------------------ cutting

    def pins(self) -> list:
        # (list(): another thread's delete may change the queue while it is read)
        return [s for s in list(self.store.queue) if s.name.startswith(PIN_PREFIX)]

    def pin(self, n: int):
        for s in list(self.store.queue):
            if s.name == f"{PIN_PREFIX}{n}":
                return s
        return None

    def usage(self) -> int:
        """Bytes the unreleased delta sets hold: the pinning snapshots' copies of blocks
        overwritten before they were shipped (and chunk files of before issue 8)."""
        total = sum(s.save.size for s in self.pins()) * BS
        if self.legacy_files and self.dir.exists():
            for f in self.dir.glob("*.ds"):
                try:
                    total += f.stat().st_size
                except FileNotFoundError:  # pruned meanwhile
                    pass
        return total

    def flow_control(self) -> str | None:
        """Why cutting must pause now (None: it need not)."""
        used = self.usage()
        if used >= self.capacity:
            return f"the unshipped delta sets hold {used} bytes (capacity {self.capacity})"
        if len(self.pins()) >= self.max_outstanding:
            return f"{len(self.pins())} delta sets are not yet played by every destination"
        return None

    def cut(self) -> int:
        """Close the accumulating delta set in one durable step (call at a consistency point
        whose volume is already durable, as FileSystem.checkpoint leaves it: tools, tests).
        Returns its number."""
        return self.cut_begin((), state="ready")

    def cut_prepare(self):
        """The next delta set's pinning snapshot, prepared before the writers' gate closes
        (its save volume made: creating a file can wait long on a busy disk), to be given to
        `cut_begin`; the caller holds the cut and quiesce locks (no other snapshot takes its
        id meanwhile) and discards it (`store.discard_prepared`) if `cut_begin` did not take
        it (an empty delta set pins nothing; a failed cut)."""
        n = self.last_cut + 1
        return self.store.prepare(f"{PIN_PREFIX}{n}", {"delta_set": n, "purpose": "delta set"},
                                  durable_entry=False)

    def cut_begin(self, meta_blocks=(), *, state: str = "cut", prepared=None) -> int:
        """Close the accumulating delta set at a consistency point (no writer runs); returns
        its number. One LMDB transaction: the change log's table (plus `meta_blocks`, the
        closing commit's metadata blocks, not yet written to the volume) becomes the block
        list, the pinning snapshot is recorded (its save volume made before it, its
        directory entry made durable at its first sync) and the mailbox record written with
        `state`. A delta set in state "cut" is not sent: its boundary is not yet durable
        in the volume (Primary.cut, Operations.cut_point). Until `cut_written` the pin
        keeps nothing of `meta_blocks`: the commit writes their boundary content after the
        cut, which must not be saved as their before-images."""
        with self.clog.lock:
            n = self.last_cut + 1
            first = self.clog.first_change_ns or (time.time_ns() if len(meta_blocks) else 0)
            bits = self.clog.new
            listed = bits
            if len(meta_blocks):
                listed = PagedBits()
                listed.merge(bits)
                interest = PagedBits()
                interest.merge(bits)
                meta = np.asarray(meta_blocks, dtype=np.int64)
                for _, s, c in runs(meta):
                    listed.set_range(s, c)
                interest.clear_blocks(meta)
            else:
                interest = bits
            blocks = listed.count()
            snap = None
            if blocks and prepared is not None and prepared.name == f"{PIN_PREFIX}{n}":
                snap = prepared  # (the caller's to discard if this fails)
                snap.interest = interest
                snap.created_ns = time.time_ns()
            elif blocks:
                snap = self.store.prepare(f"{PIN_PREFIX}{n}", {"delta_set": n, "purpose":
                                                               "delta set"},
                                          interest=interest, durable_entry=False)
            try:
                with self.env.begin(write=True) as txn:
                    self.clog.clear_tables(txn)
                    for page, arr in listed.pages.items():
                        txn.put(K.ds_page(n, page), arr.tobytes(), db=self.db_bits)
                    if snap is not None:
                        self.store.record_new(txn, snap)
                    now = time.time_ns()
                    self._put_record(txn, {
                        "number": n, "generation": self.generation, "state": state,
                        "pinned": snap is not None, "blocks": blocks, "bytes": blocks * BS,
                        "first_change_ns": first, "cut_ns": now,
                        "ready_ns": now if state == "ready" else None,
                    })
                    self.ctx_put("last_cut", K.u64(n), txn)
            except BaseException:
                if snap is not None and snap is not prepared:
                    self.store.discard_prepared(snap)
                raise
            self.clog.reset()
            if snap is not None:
                with self.layer.lock:
                    self.store.queue.append(snap)
        return n

    def cut_written(self, n: int, meta_blocks) -> None:
        """The closing commit's metadata blocks are in the volume (not yet durable): from now
        on the pin of delta set `n` keeps them (an overwrite by a later commit copies their
        boundary content), and the change log forgets that the commit wrote them after the
        cut. Call before any later commit can run."""
        if not len(meta_blocks):
            return
        meta = np.asarray(meta_blocks, dtype=np.int64)
        # written after the cut with the content this delta set carries: not a change since
        # it (else every cut left its commit's blocks for the next delta set to send again)
        self.clog.unmark(meta)
        snap = self.pin(n)
        if snap is None:
            return
        with self.layer.lock:
            for _, s, c in runs(meta):
                snap.interest.set_range(s, c)

    def cut_ready(self, n: int) -> None:
        """Delta set `n`'s boundary is durable in the volume (and the redo log empty): mark
        it "ready" (one durable commit), after which it is sent."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(K.u64(n), db=self.db_sets)
            if raw is None:
                raise ChunkError(f"delta set {n} vanished before it was ready")
            rec = json.loads(raw)
            if rec["state"] == "ready":
                return
            rec["state"] = "ready"
            rec["ready_ns"] = time.time_ns()
            self._put_record(txn, rec)

    def reserve(self, n: int) -> None:
        """After the cut, writers going again: reserve room for a copy of every block of
        delta set `n` in its pin's save volume (fallocate, nothing written), so no copy it
        needs fails for want of space later. Where the disk is already full, the pin may
        break at a copy (its delta set then needs a resync): logged."""
        snap = self.pin(n)
        if snap is None:
            return
        try:
            with self.layer.lock:  # (copy-on-write takes room from the same file)
                snap.save.reserve(snap.interest.count())
        except OSError as e:
            log.warning("delta set %d: no room could be reserved for its copies (%s); if the "
                        "disk stays full, an overwrite of its blocks breaks it", n, e.strerror)

    def path(self, n: int) -> Path:
        return self.dir / f"{n}.ds"

    def stream(self, rec: dict) -> DeltaStream:
        return DeltaStream(self, rec)

    def held(self, rec: dict) -> bool:
        """Whether this site can still send delta set `rec`."""
        if rec.get("pinned") is None:
            return rec.get("file", True)
        return rec["pinned"] or not rec["blocks"]

    # ------------------------------------------------------------------ retention

    def release(self, rec: dict) -> None:
        """Every destination has played delta set `rec`: delete its pinning snapshot (or
        chunk file); the block list stays until the retention period ends."""
        n = rec["number"]
        snap = self.pin(n)
        if rec.get("pinned") is None:
            self.path(n).unlink(missing_ok=True)
            rec["file"] = False
        rec["pinned"] = False
        with self.env.begin(write=True) as txn:  # first: a crash leaves an orphan pin,
            self._put_record(txn, rec)           # which _recover deletes
        if snap is not None:
            with self.layer.lock:  # it keeps nothing from now on, deleted or not
                snap.interest = PagedBits()
            self.layer.delete(snap)

    def prune(self, played_by_all: int, retention_s: float) -> None:
        """Release what every destination played; forget block lists after `retention_s`.
        Runs in a worker thread (one at a time: each destination's send task calls it)."""
        with self._prune_lock:
            self._prune(played_by_all, retention_s)
            for snap in self.pins():  # a release whose delete failed before: again
                n = snap.attrs.get("delta_set")
                # a pin and its record commit in one transaction, so both are read in one:
                # a forwarder's pin is queued before its playback's commit (receiver.play)
                # and, not yet recorded, is no orphan (deleting it lost the delta set)
                with self.env.begin() as txn:
                    made = txn.get(snap_key(snap.id), db=self.store.db_snaps) is not None
                    raw = txn.get(K.u64(n), db=self.db_sets) if K.is_u64(n) else None
                rec = json.loads(raw) if raw else None
                if made and (rec is None or not rec.get("pinned")):
                    self.layer.delete(snap)

    def _prune(self, played_by_all: int, retention_s: float) -> None:
        now = time.time_ns()
        for rec in self.records():
            n = rec["number"]
            if rec["state"] != "ready":
                continue
            if n > played_by_all:
                continue
            if self.held(rec) and rec["blocks"]:
                self.release(rec)
            if now - rec["cut_ns"] > retention_s * 1e9:
                with self.env.begin(write=True) as txn:
                    txn.delete(K.u64(n), db=self.db_sets)
                    self._drop_bits(txn, n)
