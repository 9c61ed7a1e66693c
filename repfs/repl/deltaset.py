"""Delta sets at the primary (FIG. 8, 10): cutting, the background copy into the chunk area,
the mailbox, retention and flow control.

A cut happens at a consistency point and only swaps the change log's tables (O(1) in the
volume); the old table's blocks are then copied into ``SITE/save/deltasets/<n>.ds`` in the
background, a few megabytes at a time, as delta chunks of coalesced extents followed by the
delta-set header. A write that hits a block not yet copied copies it first (priority copy),
so the delta set is exactly the state at its boundary. The mailbox (LMDB ``deltasets``)
records each delta set: "cutting" while the copy runs, "ready" once the header is durable.

After a crash, a delta set still "cutting" is dropped (its file deleted): the change log's
recovery put its blocks back in the new table, and the next cut — at the consistency point
that mounting is — ships them again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from ..statefile import fsync_dir
from ..extents import runs
from ..volume import private_dir, pwrite_all
from . import keys as K
from .changelog import ChangeLogLayer
from .chunk import (
    MAX_CHUNK_BLOCKS, SetHeader, data_checksum, encode_chunk, encode_set_header, encoded_checksum,
)

log = logging.getLogger(__name__)
BS = 4096
COPY_STEP_BLOCKS = 256  # blocks read per step while holding the change-log lock


class ChunkWriter:
    """Appends one delta set's chunks to its file."""

    def __init__(self, path: Path, generation: int, n: int):
        self.path = path
        self.generation = generation
        self.n = n
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.off = 0
        self.checksums: list[int] = []
        self.blocks = 0
        self._ext: list[tuple[int, int]] = []
        self._data: list[bytes] = []
        self._pending = 0

    def add(self, blocks: np.ndarray, data: bytes) -> None:
        """Add sorted blocks with their content (data is len(blocks) * 4 KiB)."""
        if not len(blocks):
            return
        mv = memoryview(data)
        for a, s, count in runs(blocks):
            b = a + count
            while a < b:
                m = min(b - a, MAX_CHUNK_BLOCKS - self._pending)
                if self._ext and self._ext[-1][0] + self._ext[-1][1] == s:
                    self._ext[-1] = (self._ext[-1][0], self._ext[-1][1] + m)
                else:
                    self._ext.append((s, m))
                self._data.append(bytes(mv[a * BS: (a + m) * BS]))
                self._pending += m
                a += m
                s += m
                if self._pending == MAX_CHUNK_BLOCKS:
                    self._emit()

    def _emit(self) -> None:
        if not self._pending:
            return
        buf = encode_chunk(self.generation, self.n, len(self.checksums), self._ext,
                           b"".join(self._data))
        self.checksums.append(encoded_checksum(buf))
        pwrite_all(self.fd, buf, self.off)
        self.off += len(buf)
        self.blocks += self._pending
        self._ext, self._data, self._pending = [], [], 0

    def finish(self) -> SetHeader:
        self._emit()
        hdr = SetHeader(self.generation, self.n, len(self.checksums), self.blocks,
                        data_checksum(self.checksums))
        raw = encode_set_header(hdr)
        pwrite_all(self.fd, raw, self.off)
        self.off += len(raw)
        os.fdatasync(self.fd)
        os.close(self.fd)
        self.fd = -1
        # the file's name too, before the mailbox says "ready": else a power cut can keep
        # the record and lose the file, and the send task fails on it for ever
        # (tests/t4_power.py)
        fsync_dir(self.path.parent)
        return hdr

    def abandon(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:  # EIO at the close of a failing file: it is dropped anyway
                pass
            self.fd = -1
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:  # a later cut of the same number truncates it
            log.warning("cannot remove %s: %s", self.path, e.strerror)



class DeltaSets:
    def __init__(self, env, clog: ChangeLogLayer, site_path: Path, *,
                 capacity_bytes: int = 1 << 30):
        self.env = env
        self.clog = clog
        self.dir = Path(site_path) / "save" / "deltasets"
        private_dir(self.dir)  # raw blocks of every file: 0700
        self.db_ctx = env.open_db(K.CTX)
        self.db_sets = env.open_db(K.DELTASETS)
        self.db_bits = env.open_db(K.DSBITS)
        self.capacity = capacity_bytes
        self.writer: ChunkWriter | None = None
        self.writer_lock = threading.Lock()  # order: change-log lock, then this one
        self.cut_started = 0.0
        self.copied_blocks = 0  # counters for rates
        # A chunk file that fails (EIO, ENOSPC of the host file system) makes the delta set
        # being cut impossible: `broken` says why (a priority copy must not fail a user's
        # write), the cut is dropped (abandon_cut) and the next one waits `cut_backoff`.
        self.broken: BaseException | None = None
        self.cut_backoff = 0.0
        self.cut_not_before = 0.0
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

    def _recover(self) -> None:
        for rec in self.records():
            if rec["state"] == "cutting":
                log.info("dropping delta set %d, cut when the daemon stopped; its blocks "
                         "are in the change log again", rec["number"])
                (self.dir / f"{rec['number']}.ds").unlink(missing_ok=True)
                with self.env.begin(write=True) as txn:
                    txn.delete(K.u64(rec["number"]), db=self.db_sets)
                    self._drop_bits(txn, rec["number"])
                    self.ctx_put("last_cut", K.u64(rec["number"] - 1), txn)

    def _drop_bits(self, txn, n: int) -> None:
        cur = txn.cursor(db=self.db_bits)
        if cur.set_range(K.ds_page(n, 0)):
            while cur.key()[:8] == K.u64(n):
                if not cur.delete():
                    break

    # ------------------------------------------------------------------ cutting

    @property
    def cutting(self) -> bool:
        return self.writer is not None

    def usage(self) -> int:
        total = 0
        for f in self.dir.glob("*.ds"):
            try:
                total += f.stat().st_size
            except FileNotFoundError:  # pruned meanwhile by a send task (a worker thread)
                pass
        return total

    def flow_control(self) -> bool:
        return self.usage() >= self.capacity

    def cut(self) -> int:
        """Close the accumulating delta set (call at a consistency point, with no cut in
        progress). Returns its number."""
        assert self.writer is None
        with self.clog.lock:
            n = self.last_cut + 1
            first = self.clog.first_change_ns
            with self.env.begin(write=True) as txn:
                old = self.clog.swap(txn)
                for page, arr in old.pages.items():
                    txn.put(K.ds_page(n, page), arr.tobytes(), db=self.db_bits)
                self._put_record(txn, {
                    "number": n, "generation": self.generation, "state": "cutting",
                    "chunks": 0, "blocks": 0, "bytes": 0, "data_checksum": 0,
                    "first_change_ns": first, "cut_ns": time.time_ns(), "ready_ns": 0,
                })
                self.ctx_put("last_cut", K.u64(n), txn)
            try:
                self.writer = ChunkWriter(self.dir / f"{n}.ds", self.generation, n)
            except Exception:
                self.abandon_cut()
                raise
            self.clog.priority_copy = self._priority_copy
            self.cut_started = time.monotonic()
        if not old:
            try:
                self.finish_if_done()
            except Exception:
                self.abandon_cut()
                raise
        return n

    def abandon_cut(self) -> None:
        """The delta set being cut cannot be made (its chunk file failed): drop it, as the
        recovery after a crash does, and mark all its blocks in the change log again, so the
        next cut ships them. Nothing is lost; the next cut waits a growing back-off."""
        with self.clog.lock:
            with self.writer_lock:
                w, self.writer = self.writer, None
                if w is not None:
                    w.abandon()
            self.clog.priority_copy = None
            self.broken = None
            n = self.last_cut
            rec = self.record(n)
            with self.env.begin(write=True) as txn:
                if self.clog.old is not None:
                    self.clog.unswap(txn, rec.get("first_change_ns", 0) if rec else 0)
                if rec is not None and rec["state"] == "cutting":
                    txn.delete(K.u64(n), db=self.db_sets)
                    self._drop_bits(txn, n)
                    self.ctx_put("last_cut", K.u64(n - 1), txn)
            first = self.cut_backoff == 0.0
            self.cut_backoff = min(30.0, max(0.5, self.cut_backoff * 2))
            self.cut_not_before = time.monotonic() + self.cut_backoff
        if first:  # once per series of failed cuts (the task's error is logged once too)
            log.info("delta set %d dropped: its blocks are in the change log again; cuts are "
                     "retried with back-off until the chunk area works", n)

    def _read_blocks(self, blocks: np.ndarray) -> bytes:
        parts = []
        for _, s, count in runs(blocks):
            parts.append(self.clog.read(s, count))  # (passes through the log)
        return b"".join(parts)

    def _priority_copy(self, blocks: np.ndarray) -> None:
        """Called under the change-log lock before `blocks` are overwritten."""
        blocks = np.sort(blocks).astype(np.int64)
        data = self._read_blocks(blocks)
        self.clog.old.clear_blocks(blocks)
        self.copied_blocks += len(blocks)
        with self.writer_lock:
            if self.broken is None:
                try:
                    self.writer.add(blocks, data)
                except Exception as e:  # noqa: BLE001 - the copy task drops the cut
                    self.broken = e

    def copy_step(self) -> bool:
        """Copy a few megabytes of the old table into the delta set; True when it is done.
        Runs in a worker thread. Only reading the blocks and clearing their bits holds the
        change-log lock (writers wait for that much); chunking and writing do not. If the
        chunk file fails, the cut is dropped (abandon_cut) and the error raised."""
        try:
            if self.broken is not None:
                raise self.broken
            return self._copy_step()
        except Exception:
            self.abandon_cut()
            raise

    def _copy_step(self) -> bool:
        with self.clog.lock:
            old = self.clog.old
            if old is None:
                return True
            blocks = data = None
            if old:
                page = min(old.pages)
                blocks = old.page_blocks(page)[:COPY_STEP_BLOCKS]
                data = self._read_blocks(blocks)
                old.clear_blocks(blocks)
                self.copied_blocks += len(blocks)
            more = bool(old)
        if blocks is not None:
            with self.writer_lock:
                self.writer.add(blocks, data)
        if more:
            return False
        self.finish_if_done()
        return True

    def finish_if_done(self) -> None:
        with self.clog.lock:
            if self.writer is None or (self.clog.old is not None and self.clog.old):
                return
            w = self.writer
            with self.writer_lock:
                hdr = w.finish()
            rec = self.record(w.n)
            rec.update(state="ready", chunks=hdr.chunks, blocks=hdr.blocks, bytes=w.off,
                       data_checksum=hdr.data_checksum, ready_ns=time.time_ns())
            with self.env.begin(write=True) as txn:
                self._put_record(txn, rec)
                self.clog.old_done(txn)
            self.clog.priority_copy = None
            self.writer = None
            self.cut_backoff = 0.0
        log.info("delta set %d ready: %d blocks in %d chunks (%.2f s after the cut)",
                 hdr.delta_set, hdr.blocks, hdr.chunks, time.monotonic() - self.cut_started)

    def path(self, n: int) -> Path:
        return self.dir / f"{n}.ds"

    # ------------------------------------------------------------------ retention

    def prune(self, acked_by_all: int, retention_s: float) -> None:
        """Chunk data goes once every destination has it; block lists after `retention_s`."""
        now = time.time_ns()
        for rec in self.records():
            n = rec["number"]
            if rec["state"] != "ready":
                continue
            if n <= acked_by_all and rec.get("file", True):
                self.path(n).unlink(missing_ok=True)
                rec["file"] = False
                with self.env.begin(write=True) as txn:
                    self._put_record(txn, rec)
            if not rec.get("file", True) and now - rec["cut_ns"] > retention_s * 1e9:
                with self.env.begin(write=True) as txn:
                    txn.delete(K.u64(n), db=self.db_sets)
                    self._drop_bits(txn, n)
