"""The snapped volume (FIG. 25): a layer of the volume stack that keeps snapshots.

Writes follow FIG. 26 and FIG. 41: before a clone block Bi is overwritten, walk the snapshot
queue from the tail toward the head; the first snapshot that already holds a before-image of
Bi ends the walk (every older snapshot reads through to it); the first that must keep Bi
(held it as valid data, its meta bit map; a delta set's pinning snapshot: Bi is in its delta
set) without a before-image gets one, saved into its own save volume (reads of older
snapshots pass through it, FIG. 27). The reference saves into the tail's save volume; saving
into the youngest snapshot that needs the block instead means that deleting a short-lived
snapshot at the tail (a delta set's, released every few seconds) moves nothing. Blocks no
snapshot keeps are never saved. Reads of snapshot N follow FIG. 27 — save volume N, else the
next younger one, else the clone — for a whole extent at once, with numpy masks.

Before-images are not synced one write at a time (invariant 3 needs only the order): a write
that overwrites a block whose before-image is not yet durable is *held* in memory (reads see
it) until the next flush, which syncs the save volumes once, then writes the held data to the
clone volume. A group commit flushes first (ordered mode), so an fsync also gets its data
written; `pending_bytes` tells the FUSE adapter when the held data should be flushed early.

The copies themselves are deferred (issue 8: reading and writing them on the FUSE thread was
half its CPU under a snapshot). The writing thread only decides which snapshot needs which
blocks and indexes the copies at the save addresses they will have; the save volume's record
notes *which clone blocks* to copy, not their content. Full records are written behind the
writer by a records thread of their own, the rest by the flush (under `_flush_lock`, before
its sync), each reading the blocks from the clone volume then. That is safe because the
write that needed the copy is held until the flush that synced the record, so the clone
volume keeps those blocks unchanged until then: a held write is released only after the
records of its epoch are written and synced, a later write to the blocks is held behind it,
and a copy is deferred only when no older held write covers the blocks (else it is read now,
through the held writes, as before: e.g. a snapshot created while writes of the previous
queue are held). Readers of a pending copy (`read_snapshot`, delete's moves, the delta-set
and initial-copy streams, diff and restore, all through `SaveVolume.read`) read the clone
volume's block, i.e. the snapshot's content, not the held data; the index is complete at
once, so every bit-map walk sees pending copies. A write that fails after deferring a copy
holds its blocks' current content instead, so they cannot change before the flush. The
simpler alternative (reading the copies on the FUSE thread, handing only the appends to the
flush) keeps the read and its memory on the FUSE thread; this one leaves it the bit-map work
and the index, and holds no before-image in memory.

Everything is by extent: bit maps are tested a page at a time, before-images are read and
written in runs. A lock serialises copy-on-write with snapshot reads, because the file
system's commit thread writes through this layer too; the syncs and the index's LMDB commit
run outside it, so a flush never holds a writer for a disk sync.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import pagedbits
from ..extents import runs
from ..volume import BLOCK_SIZE, ErrnoError, Layer, ReadOnlyDevice, VolumeError
from . import keys as K
from .store import SnapError, Snapshot, SnapStore, start_writeback

log = logging.getLogger(__name__)
BS = BLOCK_SIZE


HELD_RELEASE = 64 << 20  # held bytes at which restore and playback release them


class SnapLayer(Layer):
    META_CACHE = 256  # unpacked meta bit map pages (32 KiB each)
    held_release = HELD_RELEASE  # site.toml [memory] held_limit when a site sets it (Site.device)

    def __init__(self, lower, store: SnapStore, bitmap_start: int, *,
                 reserve_bytes: int = 64 << 20):
        super().__init__(lower)
        self.store = store
        self.bitmap_start = bitmap_start
        self.lock = threading.RLock()
        self._meta: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.reserve = reserve_bytes
        self.cow_blocks = 0
        # writes held until the before-images they overwrite are durable: (start, data,
        # epoch) in write order (a later entry wins), the blocks they cover, their size
        self._held: list[tuple[int, bytes, int]] = []
        self._held_bits = pagedbits.PagedBits()
        self._held_bytes = 0
        self._epoch = 0  # flushes started; an entry of epoch e is safe once flush e synced
        self._flush_lock = threading.Lock()  # one flush (or delete) at a time; before `lock`
        self._indexed_at = 0.0  # when the indexes were last committed (monotonic)
        self._sync_error: OSError | None = None  # a save volume's sync failed (final)
        # called before held writes are released to the volume (set by the change log above:
        # it makes the intent marks of the held writes durable; may raise)
        self.before_release = None
        # where deferred copies are read from (looked up at each call: a wrapper put on
        # `lower` later is used)
        store.clone_read = lambda start, count: self.lower.read(start, count)
        # full records are written behind the writer by one thread of their own; a flush
        # waits for the ones submitted before it (and writes what they could not)
        self._records_pool: ThreadPoolExecutor | None = None
        self._records_bg: list = []  # their futures since the last flush took them

    # ---------------------------------------------------------------- writing (FIG. 41)

    def write(self, start: int, data, meta: bool = False, hold: bool = False) -> None:
        """`hold`: keep the data from the volume until the next release of held writes,
        which first calls `before_release` (the change log's intent marks: a layer above
        asks this for a write whose mark is not yet durable)."""
        n = len(data) // BS
        self._check(start, data)  # (before any copy: a deferred one needs the write held)
        with self.lock:
            saved = self._copy_on_write(start, n, meta) if self.store.queue else 0
            if saved or hold or (self._held and self._held_bits.get_range(start, n).any()):
                self._hold(start, data)
            else:
                self.lower.write(start, data)

    def _check(self, start: int, data) -> None:
        n = len(data) // BS
        if len(data) % BS or start < 0 or start + n > self.nblocks:
            raise VolumeError(f"write ({start}, {len(data)} bytes) outside the volume or not "
                              f"whole blocks")

    def _hold(self, start: int, data) -> None:
        """Keep a write from the clone volume until its before-images are durable (flush)."""
        n = len(data) // BS
        self._check(start, data)
        self._held.append((start, bytes(data), self._epoch))
        self._held_bits.set_range(start, n)
        self._held_bytes += n * BS

    def pending_bytes(self) -> int:
        return self._held_bytes + self.lower.pending_bytes()

    def _overlay(self, s: int, n: int, buf) -> bytes:
        """`buf` (blocks [s, s+n) of the clone volume) with the held writes applied."""
        if not self._held or not self._held_bits.get_range(s, n).any():
            return buf
        out = bytearray(buf)
        end = s + n
        for hs, data, _ in self._held:
            he = hs + len(data) // BS
            if hs < end and he > s:
                a, b = max(hs, s), min(he, end)
                out[(a - s) * BS: (b - s) * BS] = data[(a - hs) * BS: (b - hs) * BS]
        return bytes(out)

    def read(self, start: int, count: int) -> bytes:
        if not self._held:  # (a list's truth is atomic: no lock on the common path)
            return self.lower.read(start, count)
        with self.lock:
            return self._overlay(start, count, self.lower.read(start, count))

    def _needed(self, upto: int, s: int, n: int, candidates: np.ndarray):
        """Which snapshot at queue position <= upto must get a before-image of which of the
        `candidates` among blocks [s, s+n): walk from `upto` toward the head (FIG. 41). A
        snapshot that holds a before-image ends the walk for that block (older ones read
        through to it); the first one that keeps the block (`interest`, else valid in its
        meta bit map) needs it. Returns [(snapshot, bool array)], youngest first."""
        undecided = candidates.copy()
        out = []
        for snap in reversed(self.store.queue[: upto + 1]):
            undecided &= ~self.store.has(snap, s, n)
            if not undecided.any():
                break
            keeps = (snap.interest.get_range(s, n) if snap.interest is not None
                     else self.meta_bits(snap, s, n))
            need = keeps & undecided
            if need.any():
                out.append((snap, need))
                undecided &= ~need
                if not undecided.any():
                    break
        return out

    def _copy_on_write(self, s: int, n: int, meta: bool) -> int:
        """Save the before-images the snapshots need of blocks [s, s+n) (not synced: the
        caller holds the write). Returns the number saved."""
        needs = self._needed(len(self.store.queue) - 1, s, n, np.ones(n, dtype=bool))
        if not needs:
            return 0
        cap = self.store.capacity
        if cap is not None:
            # a delta set's pinning snapshot is bounded by replication's flow control: only
            # the user's snapshots can fill the save volumes and refuse a write
            user = sum(int(nd.sum()) for snap, nd in needs if snap.interest is None)
            after = self.store.usage() + (user + user // 1000 + 1) * BS
            if user and after > cap - (0 if meta else self.reserve):
                if not meta:
                    log.error("save volumes full (%d of %d bytes): refusing a write that would "
                              "overwrite %d blocks the snapshots still need; delete snapshots or "
                              "raise [snap] save_capacity", self.store.usage(), cap, user)
                    raise ErrnoError(errno.ENOSPC, "the snapshot save volumes are full")
                log.error("save volumes over capacity: saving %d before-images of committed "
                          "metadata anyway", user)
        # deferred (the common case): no held write covers these blocks, so until this
        # write (held from now on) is released they are what the clone volume holds: the
        # flush reads them from there when it writes the record. Else (an older held write
        # covers some) they are read now, through the held writes, as before.
        defer = not (self._held and self._held_bits.get_range(s, n).any())
        saved = 0
        touched = []
        try:
            saved = self._save(s, n, meta, needs, defer, touched)
        except BaseException:
            if defer and touched:
                # this write fails and is not held, but some of its blocks' copies are
                # deferred: hold the blocks' current content instead (a write of what they
                # hold), so that they do not change before the flush reads them
                self._hold(s, self.lower.read(s, n))
            raise
        finally:
            for snap in touched:
                if snap.save.fresh:
                    self._write_behind(snap)
        self.cow_blocks += saved
        return saved

    def _write_behind(self, snap: Snapshot) -> None:
        """Hand the records an append just filled to the records thread (under `lock`).
        Never fails the write: if they cannot be handed over (no file descriptor left, the
        pool shut down), they stay unwritten in memory and the next flush writes them
        (review of 6618de1: an exception here skipped the hold of a write whose copies were
        deferred, and the next write to its blocks went straight to the volume)."""
        recs, snap.save.fresh = snap.save.fresh, []
        fd = None
        try:
            if self._records_pool is None:
                self._records_pool = ThreadPoolExecutor(1, thread_name_prefix="snap-records")
            fd = os.dup(snap.save.fd)  # (a delete may close the file meanwhile)
            self._records_bg.append(self._records_pool.submit(self._write_records, snap, fd,
                                                              recs))
        except Exception as e:  # noqa: BLE001 - the flush writes them instead
            if fd is not None:
                os.close(fd)
            log.warning("snapshot %s: its save volume's records are written at the next "
                        "flush, not behind the writer (%s)", snap.name, e)

    def _write_records(self, snap: Snapshot, fd: int, recs) -> None:
        """In the records thread: write full records (their deferred before-images read from
        the clone volume: those blocks stay as they are until the flush that waits for
        this), and start their writeback so that the flush's sync finds little to do. A
        failure leaves them unwritten: the flush writes them itself (and reports it)."""
        try:
            snap.save.write_records(fd, snap.id, recs, self.store.clone_read)
            start, end = recs[0].start, recs[-1].start + 1 + recs[-1].n
            start_writeback(fd, start * BS, (end - start) * BS)
        finally:
            os.close(fd)
        with self.lock:
            snap.save.mark_written(recs)

    def _save(self, s: int, n: int, meta: bool, needs, defer: bool, touched: list) -> int:
        saved = 0
        while needs:
            snap, need = needs.pop(0)
            idx = np.flatnonzero(need)
            touched.append(snap)
            if defer:
                data = None
            else:
                parts = [self._overlay(s + a, c, self.lower.read(s + a, c))
                         for _, a, c in runs(idx)]
                data = parts[0] if len(parts) == 1 else b"".join(parts)
            try:
                self.store.add_before_images(snap, (s + idx).astype(np.uint32), data)
            except OSError as e:
                # no room or a failing disk: the write fails and changes nothing, except
                # for committed metadata, which must go on: a pin that cannot keep its
                # copy of it breaks (its delta set needs a resync); a user's snapshot
                # fails the commit, as any disk error there does
                if not meta or not self.store.break_pin(snap, e):
                    raise
                # older snapshots that read those blocks through the broken pin need
                # their own copies now (the walk passes it: it keeps nothing any more)
                needs.extend(self._needed(len(self.store.queue) - 1, s, n, need))
                continue
            saved += len(idx)
        return saved

    def flush(self) -> None:
        """Sync the save volumes once, write the held data to the clone volume, commit the
        indexes, flush the clone volume. Only the bookkeeping holds `lock`."""
        with self._flush_lock:
            self._flush_saves()
        self.lower.flush()

    def release_held(self) -> None:
        """Sync the save volumes and write the held data (no sync of the clone volume)."""
        with self._flush_lock:
            self._flush_saves()
        self.lower.release_held()

    INDEX_EVERY = 1.0  # seconds between durable commits of the snapshot indexes

    def _flush_saves(self, index: bool | None = None) -> None:
        """`index`: commit the indexes too (None: if INDEX_EVERY passed or many pages are
        dirty; an fsync then costs the save volumes' sync, not an LMDB commit as well).

        A failed sync of a save volume is final (its pages may be lost although a later
        fsync would say nothing): this and every later flush raise, so the commit fails
        and the file system turns read-only, and the held writes never reach the volume.
        A failed index commit is not: the index stays dirty (recovery rescans the save
        volumes past indexed_end anyway) and is retried."""
        if self._sync_error is not None:
            raise self._sync_error
        with self.lock:
            epoch = self._epoch
            behind, self._records_bg = self._records_bg, []
            if index is None:
                index = (time.monotonic() - self._indexed_at >= self.INDEX_EVERY
                         or self.store.dirty_pages() >= 1024)
            token = self.store.detach(index)
            self._epoch += 1
        for fut in behind:  # the records written behind the writer, before the rest
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - written below, where it is reported
                log.debug("writing save-volume records behind the writer failed: %s", e)
        try:  # the other records, their deferred before-images read from the clone volume
            self.store.write_detached(token)
        except BaseException:  # not final: they stay in memory and the next flush writes them
            with self.lock:
                self.store.undetach(token, synced=False)
            raise
        with self.lock:
            self.store.written_detached(token)
        try:
            self.store.sync_detached(token)
        except OSError as e:
            with self.lock:
                self.store.undetach(token, synced=False)
            self._sync_error = e
            log.error("a save volume could not be synced (%s): its before-images cannot be "
                      "trusted; nothing they protect is written any more", e)
            raise
        if self.before_release is not None:
            try:  # (every entry of epoch <= `epoch` asked for its marks before it was held)
                self.before_release()
            except BaseException:  # nothing released: the held writes wait for the next flush
                with self.lock:
                    self.store.undetach(token, synced=True)
                raise
        try:
            self._release_held(epoch)
        except BaseException:  # the volume failed: the index stays dirty for the next
            with self.lock:
                self.store.undetach(token, synced=True)
            raise
        try:
            self.store.write_index(token)
        except Exception as e:  # noqa: BLE001 - lmdb.Error, OSError: retried at the next
            with self.lock:
                self.store.undetach(token, synced=True)
            log.warning("the snapshot indexes could not be committed (%s); kept in memory "
                        "and retried", e)
            return
        with self.lock:
            self.store.index_written(token)
        if index:
            self._indexed_at = time.monotonic()

    def _release_held(self, epoch: int) -> None:
        """Write the held entries of flushes up to `epoch` (their before-images are durable)
        to the clone volume, in order; keep the later ones. Call under `_flush_lock` (one
        release at a time), not under `lock`: the volume writes (up to twice the held limit)
        run without it, so the FUSE thread's reads and writes do not wait for them (review
        of d4731f2). Until an entry is written it stays in `_held`: reads see it through the
        overlay, a write to its blocks is held behind it (a later epoch) and a before-image
        of its blocks is taken from it, as before. If the volume fails, what was not written
        stays held (tried again at the next flush)."""
        with self.lock:
            batch = [e for e in self._held if e[2] <= epoch]
        done = 0
        try:
            for start, data, _ in batch:
                self.lower.write(start, data)
                done += 1
        finally:
            if done:
                written = {id(e) for e in batch[:done]}
                with self.lock:
                    self._held = [e for e in self._held if id(e) not in written]
                    self._held_bits = pagedbits.PagedBits()
                    self._held_bytes = 0
                    for hs, data, _ in self._held:
                        self._held_bits.set_range(hs, len(data) // BS)
                        self._held_bytes += len(data)

    def close(self) -> None:
        if self._records_pool is not None:
            self._records_pool.shutdown(wait=True)  # (it takes `lock` to finish)
            self._records_pool = None
        with self.lock:
            self.store.close()  # closes the shared LMDB environment last
        self.lower.close()

    # ---------------------------------------------------------------- meta bit maps (FIG. 42)

    def meta_page(self, snap: Snapshot, page: int) -> np.ndarray:
        """The file system's block bitmap block `page` as it was when `snap` was taken."""
        with self.lock:  # (the initial copy reads it from a worker thread)
            return self._meta_page(snap, page)

    def _meta_page(self, snap: Snapshot, page: int) -> np.ndarray:
        key = (snap.id, page)
        arr = self._meta.get(key)
        if arr is None:
            arr = pagedbits.unpack(self.read_snapshot(snap, self.bitmap_start + page, 1))
            self._meta[key] = arr
            if len(self._meta) > self.META_CACHE:
                self._meta.popitem(last=False)
        else:
            self._meta.move_to_end(key)
        return arr

    def meta_bits(self, snap: Snapshot, s: int, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=bool)
        for page, off, at, m in pagedbits.spans(s, n):
            out[at: at + m] = self.meta_page(snap, page)[off: off + m]
        return out

    # ---------------------------------------------------------------- reading (FIG. 27)

    def read_snapshot(self, snap: Snapshot, s: int, n: int) -> bytes:
        with self.lock:
            out = self._read_snapshot(snap, s, n)
            return out if isinstance(out, bytes) else bytes(out)

    def _read_snapshot(self, snap: Snapshot, s: int, n: int):
        """Blocks [s, s+n) as snapshot `snap` holds them (bytes, or a bytearray when some
        came from save volumes)."""
        q = self.store.queue
        out = None
        remaining = np.ones(n, dtype=bool)
        for e in q[self.store.position(snap):]:
            has = self.store.has(e, s, n) & remaining
            idx = np.flatnonzero(has)
            if len(idx):
                if out is None:
                    out = bytearray(n * BS)
                for i, c, data in self.store.read_saved(e, (s + idx).astype(np.uint32)):
                    a = int(idx[i])
                    out[a * BS: (a + c) * BS] = data
                remaining &= ~has
                if not remaining.any():
                    return out
        if out is None:  # no before-image in the range (the common case): the volume's
            return self._overlay(s, n, self.lower.read(s, n))  # blocks, uncopied
        for _, a, c in runs(np.flatnonzero(remaining)):
            out[a * BS: (a + c) * BS] = self._overlay(s + a, c, self.lower.read(s + a, c))
        return out

    # ---------------------------------------------------------------- deltas (FIG. 34-35, 39-40)

    def changed_pages(self, older: Snapshot, younger: Snapshot | None):
        """Yield (page, bool array) of blocks that may differ between two snapshots (younger
        None: the live volume), in page order (FIG. 39-40): blocks with a before-image in
        the save volumes of older .. younger-1, and blocks not in use in `older` but in use
        in `younger` (newly allocated blocks are never saved). The second kind is found only
        in pages whose bitmap block itself changed — an allocation changes it, so it has a
        before-image. Only pages some bit map holds are visited: the cost follows the
        changes, not the volume."""
        q = self.store.queue
        lo = self.store.position(older)
        hi = self.store.position(younger) if younger is not None else len(q)
        if hi < lo:
            raise SnapError("the first snapshot must be older than the second")
        span = q[lo:hi]
        pages = sorted(set().union(*(self.store.bit_pages(e) for e in span))) if span else []
        acc_by_page = {}
        for page in pages:
            acc = np.zeros(K.BITS_PER_PAGE, dtype=bool)
            for e in span:
                bits = self.store.page_bits(e, page)
                if bits is not None:
                    acc |= bits
            acc_by_page[page] = acc
        # pages whose bitmap block changed: add the blocks newly in use
        nbitmap = -(-self.nblocks // K.BITS_PER_PAGE)
        for p in range(nbitmap):
            blk = self.bitmap_start + p
            acc = acc_by_page.get(blk // K.BITS_PER_PAGE)
            if acc is None or not acc[blk % K.BITS_PER_PAGE]:
                continue
            with self.lock:
                new = self._used(younger, p) & ~self.meta_page(older, p)
            if new.any():
                if p in acc_by_page:
                    acc_by_page[p] |= new
                else:
                    acc_by_page[p] = new
        for page in sorted(acc_by_page):
            yield page, acc_by_page[page]

    def _used(self, snap: Snapshot | None, page: int) -> np.ndarray:
        """The meta bit map page of a snapshot, or of the live volume (snap None)."""
        if snap is not None:
            return self.meta_page(snap, page)
        return pagedbits.unpack(self.read(self.bitmap_start + page, 1))

    def delta(self, older: Snapshot, younger: Snapshot | None, *, max_run: int = 256):
        """Yield ((start, count), data) in block order for exactly the blocks that differ
        between `older` and `younger` (None: live) and are in use in the younger one."""
        for page, acc in self.changed_pages(older, younger):
            base = page * K.BITS_PER_PAGE
            with self.lock:
                acc &= self._used(younger, page)
            for _, a, c in runs(np.flatnonzero(acc)):
                while c:
                    m = min(c, max_run)
                    start = base + a
                    if start + m > self.nblocks:
                        m = self.nblocks - start
                        if m <= 0:
                            break
                    data = (self.read_snapshot(younger, start, m) if younger is not None
                            else self.read_live(start, m))
                    yield (start, m), data
                    a += m
                    c -= m

    def read_live(self, s: int, n: int) -> bytes:
        with self.lock:
            return self._overlay(s, n, self.lower.read(s, n))

    # ---------------------------------------------------------------- delete

    def delete(self, snap: Snapshot) -> int:
        """Delete a snapshot; before-images an older snapshot still needs move to the
        youngest one that needs them. Returns the number moved. Idempotent: a crash midway
        leaves the snapshot marked 'deleting', and running delete again finishes it. Writers
        wait only while the images are looked up and moved, not for the durable commits."""
        with self._flush_lock:
            if snap not in self.store.queue:  # deleted meanwhile (another thread)
                return 0
            self.store.mark(snap, "deleting")
            moved = 0
            with self.lock:
                pos = self.store.position(snap)
                for page in self.store.bit_pages(snap) if pos > 0 else ():
                    mine = self.store.page_bits(snap, page)
                    if mine is None:
                        continue
                    base = page * K.BITS_PER_PAGE
                    for older, need in self._needed(pos - 1, base, K.BITS_PER_PAGE, mine):
                        bis = (base + np.flatnonzero(need)).astype(np.uint32)
                        parts = self.store.read_saved(snap, bis)
                        self.store.add_before_images(older, bis, b"".join(d for _, _, d in parts))
                        moved += len(bis)
                # out of the queue in the same hold of the lock as the move: else a write
                # in between would give its before-image to this dying snapshot alone
                self._meta = OrderedDict((k, v) for k, v in self._meta.items()
                                         if k[0] != snap.id)
                self.store.unqueue(snap)
            if moved:
                self._flush_saves()  # the moved images are durable before their source goes
            self.store.remove(snap)
            return moved

    # ---------------------------------------------------------------- restore

    def restore(self, snap: Snapshot) -> int:
        return self.restore_through(snap, self)

    def restore_plan(self, snap: Snapshot) -> list[np.ndarray]:
        """The blocks a restore of `snap` writes: changed since it was taken, in use in it."""
        todo = []
        for page, acc in self.changed_pages(snap, None):
            with self.lock:
                acc &= self.meta_page(snap, page)
            idx = np.flatnonzero(acc)
            if len(idx):
                todo.append(page * K.BITS_PER_PAGE + idx)
        return todo

    def restore_through(self, snap: Snapshot, top, plan=None) -> int:
        """Make the clone volume hold snapshot `snap` again: every block changed since it was
        taken and in use in it gets its content back. Younger snapshots keep theirs (the
        writes go through copy-on-write). The caller holds a consistency point, has emptied
        the file system's redo log, and has recorded the restore as in progress. `top` is the
        device to write through (the change log above this layer, so replication ships the
        restored blocks)."""
        todo = plan if plan is not None else self.restore_plan(snap)
        n = 0
        for blocks in todo:
            for _, a, c in runs(blocks):
                while c:
                    m = min(c, 256)
                    with self.lock:
                        data = self._read_snapshot(snap, a, m)
                    top.write(a, data, meta=True)  # through the change log, if any
                    if top.pending_bytes() >= self.held_release:  # bounded memory
                        top.release_held()
                    n += m
                    a += m
                    c -= m
        top.flush()
        return n


class SnapshotDevice(ReadOnlyDevice):
    """Snapshot N as a read-only block device (for mounting it and for diffs)."""

    def __init__(self, layer: SnapLayer, snap: Snapshot):
        super().__init__(lambda start, count: layer.read_snapshot(snap, start, count),
                         layer.nblocks)
        self.layer = layer
        self.snap = snap
