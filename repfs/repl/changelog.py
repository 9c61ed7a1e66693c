"""The change log (FIG. 8, 10): a layer of the volume stack that logs every changed block in a
bit-map table.

Writes set bits in the *new* table. At a delta-set boundary (a consistency point) the table
becomes the delta set's block list (repl/deltaset.py: its pinning snapshot keeps those blocks
as they were at the boundary, which replaces the reference's old table and priority copy) and
a fresh new table starts.

Crash safety (invariant 3: over-marking allowed, under-marking never). Bit maps are paged
(empty pages cost nothing). The tables are written to LMDB at most once a second at a flush
(the file system's group commit); a write-intent log covers what is only in memory: before
any write into an 8 MiB region since the last cut reaches the volume, the region is marked
durably in LMDB. Recovery marks new ∪ every intent region (∪ the old table of a site from
before issue 8) as changed. A cut empties the table and clears the intent marks in the
transaction that records the delta set.

No durable commit on the writer's thread (the FUSE handlers run on the trio thread). A write
into a region without a durable mark is passed to the snapped volume below *held*
(SnapLayer.write(hold=True): its copy-on-write and its refusals happen now, its data waits in
memory, readers see it) and the region is queued for marking. A worker thread commits the
queued marks, a few regions ahead of a sequential writer, so it usually never meets an
unmarked region; and the snapped volume calls `_commit_marks` (its `before_release`) before
it lets any held write reach the volume (at a flush or when the held bytes pass the memory
bound, both off the trio thread). So a region's mark is durable before any write in it can
reach the volume, whichever thread got there first. Crash at any instant: a held write was
in memory only (lost, and nothing on the volume differs), or its mark was durable.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from .. import pagedbits
from ..volume import Layer
from . import keys as K

log = logging.getLogger(__name__)


class PagedBits(pagedbits.PagedBits):
    """The paged bit map (repfs/pagedbits.py) kept in an LMDB database of replication, one
    record per page (key: the page number, u32; repl/keys.py)."""

    # persistence
    def load(self, txn, db) -> None:
        cur = txn.cursor(db=db)
        for key, val in cur:
            page = K.from_u32(key)
            if len(val) != K.PAGE_BYTES:
                # a damaged page (found by tests/t0_fuzz.py: a short one crashed the next write
                # into it): mark every block it covers, as over-marking is always safe
                log.warning("change log: page %d is damaged (%d bytes); marking all of its "
                            "blocks as changed", page, len(val))
                self.pages[page] = np.full(K.PAGE_BYTES, 0xFF, dtype=np.uint8)
                self.dirty.add(page)
                continue
            self.pages[page] = np.frombuffer(val, dtype=np.uint8).copy()

    def save_dirty(self, txn, db) -> None:
        for page in self.dirty:
            arr = self.pages.get(page)
            if arr is None:
                txn.delete(K.u32(page), db=db)
            else:
                txn.put(K.u32(page), arr.tobytes(), db=db)
        self.dirty.clear()

    def save_all(self, txn, db) -> None:
        txn.drop(db, delete=False)
        for page, arr in self.pages.items():
            txn.put(K.u32(page), arr.tobytes(), db=db)
        self.dirty.clear()


def _trim(bits: PagedBits, nblocks: int) -> None:
    """Clear the bits of blocks past the volume's end (a damaged page may hold them)."""
    end_page, tail = divmod(nblocks, K.PAGE_BITS)
    for page in [p for p in bits.pages if p > end_page or (p == end_page and not tail)]:
        del bits.pages[page]
        bits.dirty.add(page)
    arr = bits.pages.get(end_page)
    if arr is not None and tail:
        flat = np.unpackbits(arr, bitorder="little")
        if flat[tail:].any():
            flat[tail:] = 0
            arr[:] = np.packbits(flat, bitorder="little")
            bits.dirty.add(end_page)


class ChangeLogLayer(Layer):
    """Logs changed blocks while `enabled` (the site is a primary with destinations)."""

    def __init__(self, lower, env):
        super().__init__(lower)
        self.env = env
        self.db_new = env.open_db(K.CLOG_NEW)
        self.db_old = env.open_db(K.CLOG_OLD)
        self.db_intent = env.open_db(K.CLOG_INTENT)
        self.db_ctx = env.open_db(K.CTX)
        self.lock = threading.RLock()
        self.new = PagedBits()
        self.hot: set[int] = set()  # regions with a durable intent mark
        self.touched: set[int] = set()  # regions written since the last cut
        self._persisted = 0.0  # when flush last wrote the table (monotonic)
        self.changed_blocks = 0  # blocks set in the new table since the last cut
        self.first_change_ns = 0
        self._want: set[int] = set()  # regions whose mark is asked for, not yet durable
        self._epoch = 0  # cuts (and disables) so far: a mark committed before one is gone
        # the snapped volume below holds writes until their marks are durable (a bare
        # device, in unit tests, gets its marks synchronously instead)
        self._hold_below = hasattr(lower, "before_release")
        if self._hold_below:
            lower.before_release = self._commit_marks
        self._marker: threading.Thread | None = None  # the worker that commits marks
        self._wake = threading.Event()
        self._closing = False
        with env.begin(db=self.db_ctx) as txn:
            # logging is on from the start of a mount when the site replicates, so the redo
            # log's replay (which runs before the daemon is up) is logged too
            self._enabled = txn.get(b"clog_enabled") == b"1"
        self.recovered = self._recover()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if value != self._enabled:
            with self.env.begin(write=True, db=self.db_ctx) as txn:
                txn.put(b"clog_enabled", b"1" if value else b"0")
        self._enabled = value

    def _recover(self) -> int:
        """Load the persistent log; old ∪ new ∪ intent regions become the new table."""
        damaged = False
        old = PagedBits()
        with self.env.begin() as txn:
            try:
                self.new.load(txn, self.db_new)
                old.load(txn, self.db_old)
                regions = [K.from_u32(k)
                           for k in txn.cursor(db=self.db_intent).iternext(values=False)]
            except K.MetaError as e:
                # a key that does not decode names no page or region we could mark: mark the
                # whole volume, as over-marking is always safe (found by tests/t0_fuzz.py: a
                # 1-byte intent key stopped every mount and fsck with a traceback)
                log.warning("change log: %s; marking every block as changed", str(e))
                damaged = True
                regions = []
            raw = txn.get(b"first_change_ns", db=self.db_ctx)
        try:
            self.first_change_ns = K.from_u64(raw) if raw else 0
        except K.MetaError:
            self.first_change_ns = 0  # unknown: counted from now, below
        self.new.merge(old)
        if damaged:
            self.new.set_range(0, self.nblocks)
        for r in regions:
            start = r * K.REGION_BLOCKS
            self.new.set_range(start, min(K.REGION_BLOCKS, max(0, self.nblocks - start)))
        _trim(self.new, self.nblocks)
        self.changed_blocks = self.new.count()
        if self.changed_blocks and not self.first_change_ns:
            self.first_change_ns = time.time_ns()  # unknown after a crash: count from now
        if old or regions or damaged:
            with self.env.begin(write=True) as txn:
                self.new.save_all(txn, self.db_new)
                txn.drop(self.db_old, delete=False)
                txn.drop(self.db_intent, delete=False)
            log.info("change log recovered: %d blocks marked (%d regions from the intent log)",
                     self.changed_blocks, len(regions))
        return self.changed_blocks

    # ------------------------------------------------------------------ the write path

    def write(self, start: int, data, meta: bool = False) -> None:
        n = len(data) // 4096
        with self.lock:
            if self.enabled:
                unmarked = self._intent(start, n)
                added = self.new.set_range(start, n)
                if added:
                    if not self.changed_blocks:
                        self.first_change_ns = time.time_ns()
                    self.changed_blocks += added
                if unmarked:
                    if self._hold_below:  # held below until the marks are durable
                        self.lower.write(start, data, meta, hold=True)
                        return
                    self._commit_marks()  # a bare device: now, on this thread
            self.lower.write(start, data, meta)

    def _intent(self, start: int, n: int) -> bool:
        """Note the write's regions; ask for the marks it lacks (and, when it nears the
        end of the marked run, for the next INTENT_AHEAD regions). Under `lock`. Returns
        whether a region of the write has no durable mark yet."""
        first = start // K.REGION_BLOCKS
        last = (start + n - 1) // K.REGION_BLOCKS
        if first == last:
            self.touched.add(first)
            unmarked = first not in self.hot
        else:
            self.touched.update(range(first, last + 1))
            unmarked = any(r not in self.hot for r in range(first, last + 1))
        nxt = last + 1
        nregions = -(-self.nblocks // K.REGION_BLOCKS)
        if unmarked or (nxt < nregions and nxt not in self.hot and nxt not in self._want):
            # marking ahead makes a sequential writer find its next regions marked (one
            # commit per 64 MiB); recovery over-marks at most that much more, which is allowed
            want = {r for r in range(first, min(nxt + self.INTENT_AHEAD, nregions))
                    if r not in self.hot}
            if not want <= self._want:
                self._want |= want
                self._kick()
        return unmarked

    def _kick(self) -> None:
        """Wake the worker that commits the asked-for marks (started on first use)."""
        if not self._hold_below:
            return
        if self._marker is None or not self._marker.is_alive():
            self._marker = threading.Thread(target=self._marker_main, daemon=True,
                                            name="repfs-intent-marks")
            self._marker.start()
        self._wake.set()

    def _marker_main(self) -> None:
        failed = 0
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            try:
                self._commit_marks()
            except Exception as e:  # noqa: BLE001 - lmdb.Error, OSError: the writes stay
                # held (nothing reaches the volume unmarked); a flush tries again and fails
                # the commit if it cannot either
                failed += 1
                if failed == 1:
                    log.warning("the change log's intent marks could not be written (%s); "
                                "the writes stay held, retried", e)
                time.sleep(min(0.05 * 2 ** failed, 1.0))
                self._wake.set()
            else:
                if failed:
                    log.info("the change log's intent marks are written again")
                failed = 0

    def _commit_marks(self) -> None:
        """Make every asked-for intent mark durable (one LMDB transaction, outside `lock`).
        Called by the worker, and by the snapped volume before it releases held writes to
        the volume (`before_release`, in the flushing thread): when this returns, every
        region asked for before it was called has a durable mark. Raises if LMDB fails."""
        while True:
            with self.lock:
                if not self.enabled:
                    self._want.clear()
                    return
                regions = sorted(self._want - self.hot)
                epoch = self._epoch
                if not regions:
                    self._want.clear()
                    return
            with self.env.begin(write=True) as txn:
                for r in regions:
                    txn.put(K.u32(r), b"", db=self.db_intent)
            with self.lock:
                # a cut in between dropped the intent log (after this transaction, or this
                # one ran after it: unknown), so then mark again what is still unmarked
                if epoch == self._epoch:
                    self.hot.update(regions)
                    self._want.difference_update(regions)
                    return

    PERSIST_EVERY = 1.0  # seconds between writes of the table at flushes
    INTENT_AHEAD = 7  # regions marked ahead of a write with its intent mark (see _intent)

    def flush(self) -> None:
        # The intent marks already cover every block written since the cut (recovery marks
        # their regions), so writing the table is needed only to keep recovery's
        # over-marking small: at most once a second, not at every group commit or fsync
        # (nor twice inside every consistency point, where writers wait)
        now = time.monotonic()
        if now - self._persisted >= self.PERSIST_EVERY:
            try:
                self.persist()
            except Exception as e:  # noqa: BLE001 - lmdb.Error, OSError: not needed for
                # correctness (the intent marks cover it), so not a reason to fail a commit
                log.warning("the change log's table could not be written (%s); the intent "
                            "marks cover it, retried at the next flush", e)
            else:
                self._persisted = now
        self.lower.flush()  # (the snapped volume commits the marks before held writes go)

    def persist(self) -> None:
        """Write the tables (one transaction). The intent marks stay until the next cut, so a
        region pays one durable mark per delta set, not one per group commit; recovery may
        over-mark those regions, which is allowed. The changed pages are copied under `lock`
        and committed outside it (writers do not wait for the commit)."""
        with self.lock:
            if not self.new.dirty:
                return
            pages = {p: (a.tobytes() if (a := self.new.pages.get(p)) is not None else None)
                     for p in self.new.dirty}
            self.new.dirty.clear()
            first = self.first_change_ns
            epoch = self._epoch
        try:
            with self.env.begin(write=True) as txn:
                # (a cut's transaction empties the table and moves the epoch on: if it ran
                # since the copy, these pages belong to the delta set it recorded)
                if epoch == self._epoch:
                    for page, raw in pages.items():
                        if raw is None:
                            txn.delete(K.u32(page), db=self.db_new)
                        else:
                            txn.put(K.u32(page), raw, db=self.db_new)
                    txn.put(b"first_change_ns", K.u64(first), db=self.db_ctx)
        except BaseException:
            with self.lock:
                if epoch == self._epoch:
                    self.new.dirty.update(pages)  # written at the next flush
            raise

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._marker is not None:
            self._marker.join(timeout=10)
        if self.enabled:
            try:
                self._exact()
            except Exception as e:  # noqa: BLE001 - lmdb.Error, OSError: the marks stay
                log.warning("the change log's table could not be written at close (%s); the "
                            "next open marks whole written regions (over-marking)", e)
        self.lower.close()

    def _exact(self) -> None:
        """At a clean close (nothing writes any more): the whole table and the emptied intent
        log in one transaction. Every block written since the cut is in the table (a write
        sets its bit before it reaches the volume), so the intent marks, there for a crash,
        are not needed, and the next open finds the exact blocks instead of whole 8 MiB
        regions (and the regions marked ahead of each write) — what a resync after a failover
        reads and sends (recovery/resync.py)."""
        with self.lock:
            with self.env.begin(write=True) as txn:
                self.new.save_all(txn, self.db_new)
                txn.drop(self.db_intent, delete=False)
                txn.put(b"first_change_ns", K.u64(self.first_change_ns), db=self.db_ctx)
            self.hot.clear()

    # ------------------------------------------------------------------ cutting

    def clear_tables(self, txn) -> None:
        """At a cut (under `lock`, at a consistency point): empty the persistent log in
        `txn`, whose commit also records the delta set that takes over the table; then
        `reset`."""
        for db in (self.db_new, self.db_old, self.db_intent):
            txn.drop(db, delete=False)
        self._epoch += 1  # (in the cut's transaction: a mark or page commit after it sees it)
        # the regions written in the last interval are marked for the next one with the
        # cut's commit: a writer that keeps to its regions pays no durable intent mark on
        # its own thread after a cut (recovery over-marks them, which is allowed)
        # (at most CARRY regions: the cut's transaction stays short, writers wait on it)
        if len(self.touched) > self.CARRY:
            self.touched = set()
        for r in self.touched:
            txn.put(K.u32(r), b"", db=self.db_intent)
        txn.put(b"first_change_ns", K.u64(0), db=self.db_ctx)

    CARRY = 1024  # regions (8 GiB) whose intent marks a cut carries over

    def reset(self) -> None:
        """After the cut's commit: a fresh new table."""
        self.new = PagedBits()
        self.hot, self.touched = self.touched, set()
        self._want -= self.hot
        self.changed_blocks = 0
        self.first_change_ns = 0

    def unmark(self, blocks: np.ndarray) -> None:
        """Clear the marks of `blocks` (sorted block numbers) in the new table: the closing
        commit of a cut wrote them just after the cut with the content its delta set carries
        (Primary.cut: nothing else writes them meanwhile, the commit lock is held). Their
        intent regions stay marked (over-marking is allowed)."""
        from ..extents import runs
        if not len(blocks):
            return
        with self.lock:
            was = sum(int(self.new.get_range(s, c).sum()) for _, s, c in runs(blocks))
            if not was:
                return
            self.new.clear_blocks(blocks)
            self.changed_blocks -= was
            if not self.changed_blocks:
                self.first_change_ns = 0

    def mark(self, ranges) -> int:
        """Mark the blocks of `ranges` ((start, count) pairs) as changed, as a write would,
        so that the next cut ships them (repl/verify.py's repair: blocks a secondary holds
        wrong). Not made durable here: the caller cuts next. Returns the blocks newly
        marked."""
        added = 0
        with self.lock:
            if not self.enabled:
                return 0
            for s, c in ranges:
                added += self.new.set_range(int(s), int(c))
            if added:
                if not self.changed_blocks:
                    self.first_change_ns = time.time_ns()
                self.changed_blocks += added
        return added

    def disable(self) -> None:
        """Stop logging and forget the log (no destinations left)."""
        with self.lock:
            self.enabled = False
            self.new = PagedBits()
            self.hot.clear()
            self.touched.clear()
            self._want.clear()
            self._epoch += 1
            self.changed_blocks = 0
            with self.env.begin(write=True) as txn:
                for db in (self.db_new, self.db_old, self.db_intent):
                    txn.drop(db, delete=False)
