"""The snapshot queue, its save volumes and its paged indexes (FIG. 24, 25, 42-44).

* A save volume is a plain file ``SITE/save/<id>.save``: a log of records, each a header block
  (magic, snapshot id, sequence number, the clone-volume block numbers Bi, an xxh3 checksum
  over header and data) followed by the before-images. The save-volume address Si of a
  before-image is its block index in the file. Records are appended without a sync; the
  snapped-volume layer (layer.py) holds back the clone writes they protect until a flush has
  made them durable (one fdatasync per save volume per group commit, not one per write), so
  a crash never loses a before-image whose block was overwritten.
* The indexes (bit map and block map of each snapshot) are paged and live in LMDB
  (``repfs.snap.keys``). Changes are kept in memory and written in one durable LMDB
  transaction at each flush, after the save volumes they point into are synced (`detach` /
  `commit_detached`: the index covers only records already durable). After a crash, records
  past a snapshot's ``indexed_end`` are read back from its save volume and indexed again; a
  torn last record is cut off (the clone write it protected had not been issued).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
import xxhash

from ..errors import DomainError
from ..statefile import fsync_dir
from .. import pagedbits
from ..extents import run_bounds
from ..volume import BLOCK_SIZE, private_dir, pwrite_all
from . import keys as K

log = logging.getLogger(__name__)
BS = BLOCK_SIZE

_REC = struct.Struct("<8sQQI")  # magic, snapshot id, sequence, count
_REC_MAGIC = b"RSAVEREC"
_REC_CSUM_OFF = BS - 8
REC_MAX = (_REC_CSUM_OFF - _REC.size) // 4


NAME_RULE = "1-200 printable characters, at most 255 bytes of UTF-8, no '/', ',' or '\\'"


def valid_name(name) -> bool:
    """A snapshot name fits every index it goes into (an LMDB key, a FUSE fsname option)."""
    return (isinstance(name, str) and 0 < len(name) <= 200 and name.isprintable()
            and not any(c in name for c in "/,\\") and len(name.encode()) <= 255)


class SnapError(DomainError):
    """A snapshot (or replication) operation cannot be done as asked (one line for the user);
    `kind` says why (repfs/errors.py)."""


def open_env(site_path: Path):
    """The site's LMDB environment (SITE/meta.lmdb), shared by snapshots and replication."""
    return lmdb.open(str(Path(site_path) / "meta.lmdb"), map_size=1 << 40, max_dbs=32,
                     subdir=True, lock=True, mode=0o700)  # files 0600: private, any umask


class SaveVolume:
    """One snapshot's save volume: an append-only log of before-image records."""

    def __init__(self, path: Path, sid: int):
        self.path = path
        self.sid = sid
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size // BS  # in blocks
        self.seq = 0
        self.unsynced = False  # records appended since the last sync

    def append(self, bis: np.ndarray, data) -> np.ndarray:
        """Append before-images of blocks `bis`; returns their save addresses. Not synced."""
        out = np.empty(len(bis), dtype=np.uint32)
        mv = memoryview(data)
        done = 0
        while done < len(bis):
            n = min(REC_MAX, len(bis) - done)
            head = bytearray(BS)
            self.seq += 1
            _REC.pack_into(head, 0, _REC_MAGIC, self.sid, self.seq, n)
            head[_REC.size: _REC.size + 4 * n] = bis[done: done + n].astype("<u4").tobytes()
            body = mv[done * BS: (done + n) * BS]
            h = xxhash.xxh3_64()
            h.update(memoryview(head)[:_REC_CSUM_OFF])
            h.update(body)
            struct.pack_into("<Q", head, _REC_CSUM_OFF, h.intdigest())
            off = self.size * BS
            os.pwrite(self.fd, head, off)
            pwrite_all(self.fd, body, off + BS)
            out[done: done + n] = np.arange(self.size + 1, self.size + 1 + n, dtype=np.uint32)
            self.size += 1 + n
            done += n
        self.unsynced = True
        return out

    def sync(self) -> None:
        os.fdatasync(self.fd)
        self.unsynced = False

    def read(self, si: int, count: int) -> bytes:
        return os.pread(self.fd, count * BS, si * BS)

    def scan(self, start: int):
        """Yield (first Si, Bi array) for each whole record from block `start` on; stops at the
        first record that is torn or foreign and sets `self.valid_end` there."""
        pos = start
        self.valid_end = start
        while pos < self.size:
            head = os.pread(self.fd, BS, pos * BS)
            if len(head) < BS:
                break
            magic, sid, seq, n = _REC.unpack_from(head, 0)
            if magic != _REC_MAGIC or sid != self.sid or n > REC_MAX or pos + 1 + n > self.size:
                break
            body = os.pread(self.fd, n * BS, (pos + 1) * BS)
            h = xxhash.xxh3_64()
            h.update(head[:_REC_CSUM_OFF])
            h.update(body)
            if struct.unpack_from("<Q", head, _REC_CSUM_OFF)[0] != h.intdigest():
                break
            self.seq = max(self.seq, seq)
            bis = np.frombuffer(head, dtype="<u4", count=n, offset=_REC.size).astype(np.uint32)
            yield pos + 1, bis
            pos += 1 + n
            self.valid_end = pos

    def truncate(self, end: int) -> None:
        os.ftruncate(self.fd, end * BS)
        os.fsync(self.fd)
        self.size = end

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1



@dataclass
class Snapshot:
    id: int
    name: str
    created_ns: int
    attrs: dict = field(default_factory=dict)
    state: str = "ok"
    indexed_end: int = 0
    saved: int = 0
    save: SaveVolume | None = None
    # which blocks this snapshot must keep (None: its valid blocks, FIG. 41). A delta set's
    # pinning snapshot keeps only the blocks of its delta set (repl/deltaset.py sets it).
    interest: object | None = field(default=None, repr=False, compare=False)

    def record(self) -> bytes:
        return json.dumps({
            "id": self.id, "name": self.name, "created_ns": self.created_ns,
            "attrs": self.attrs, "state": self.state, "indexed_end": self.indexed_end,
            "saved": self.saved,
        }).encode()

    def info(self) -> dict:
        return {"id": self.id, "name": self.name, "created_ns": self.created_ns,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                         time.gmtime(self.created_ns / 1e9)),
                "attrs": self.attrs, "state": self.state,  # "ok", or "deleting" (under way)
                "saved_blocks": self.saved,
                "save_bytes": (self.save.size if self.save else 0) * BS}


class _Pages:
    """Pages of one LMDB sub-database, cached, with changed pages written at flush."""

    def __init__(self, env, db, page_bytes: int, limit: int = 4096):
        self.env = env
        self.db = db
        self.page_bytes = page_bytes
        self.limit = limit
        self.clean: OrderedDict[tuple[int, int], bytes | None] = OrderedDict()
        self.dirty: dict[tuple[int, int], bytearray] = {}
        # pages detached for a commit in progress (see SnapStore.detach): still read from here
        self.flushing: dict[tuple[int, int], bytes] = {}

    def get(self, sid: int, page: int):
        k = (sid, page)
        buf = self.dirty.get(k)
        if buf is not None:
            return buf
        buf = self.flushing.get(k)
        if buf is not None:
            return buf
        if k in self.clean:
            self.clean.move_to_end(k)
            return self.clean[k]
        with self.env.begin(db=self.db) as txn:
            buf = txn.get(K.page_key(sid, page))
        if buf is not None and len(buf) != self.page_bytes:  # found by tests/t0_fuzz.py
            raise SnapError(f"meta.lmdb: index page {page} of snapshot {sid} is damaged "
                            f"({len(buf)} bytes)", "failed")
        self.clean[k] = buf
        if len(self.clean) > self.limit:
            self.clean.popitem(last=False)
        return buf

    def modify(self, sid: int, page: int) -> bytearray:
        k = (sid, page)
        buf = self.dirty.get(k)
        if buf is None:
            cur = self.get(sid, page)
            buf = bytearray(cur) if cur is not None else bytearray(self.page_bytes)
            self.dirty[k] = buf
            self.clean.pop(k, None)
        return buf

    def pages(self, sid: int) -> list[int]:
        """Pages of a snapshot that are not all zero (stored or changed)."""
        found = set()
        lo = K.page_key(sid, 0)
        with self.env.begin(db=self.db) as txn:
            cur = txn.cursor()
            if cur.set_range(lo):
                for key in cur.iternext(values=False):
                    s, p = K.unpack_page_key(key)
                    if s != sid:
                        break
                    found.add(p)
        # (list() of a dict does not let another thread in: copy-on-write may add pages)
        found.update(p for (s, p) in list(self.dirty) + list(self.flushing) if s == sid)
        return sorted(found)

    def detach(self) -> dict:
        """Take the changed pages out for a commit (frozen copies; readers still see them
        in `flushing` until `attach_clean`); later changes start new dirty pages."""
        pages = {k: bytes(buf) for k, buf in self.dirty.items()}
        self.flushing.update(pages)
        self.dirty = {}
        return pages

    def write_pages(self, txn, pages: dict) -> None:
        for (sid, page), buf in pages.items():
            key = K.page_key(sid, page)
            if any(buf):
                txn.put(key, buf, db=self.db)
            else:
                txn.delete(key, db=self.db)

    def attach_clean(self, pages: dict) -> None:
        """After the commit of `pages`: they are what LMDB holds."""
        for k, buf in pages.items():
            if self.flushing.get(k) is buf:
                del self.flushing[k]
            self.clean[k] = buf if any(buf) else None
            self.clean.move_to_end(k)
        while len(self.clean) > self.limit:
            self.clean.popitem(last=False)

    def drop(self, txn, sid: int) -> None:
        for p in self.pages(sid):
            txn.delete(K.page_key(sid, p), db=self.db)

    def forget(self, sid: int) -> None:
        for d in (self.clean, self.dirty, self.flushing):
            for k in [k for k in d if k[0] == sid]:
                del d[k]


def _decode_record(key: bytes, val: bytes) -> Snapshot:
    """A snapshot record from LMDB; SnapError if it is damaged (a record whose JSON or fields
    do not decode used to stop the site from opening with a traceback: tests/t0_fuzz.py)."""
    try:
        rec = json.loads(val)
        snap = Snapshot(rec["id"], rec["name"], rec["created_ns"], rec.get("attrs", {}),
                        rec.get("state", "ok"), rec.get("indexed_end", 0), rec.get("saved", 0))
        ok = (snap.id == K.unpack_id(key) and isinstance(snap.name, str)
              and isinstance(snap.attrs, dict) and isinstance(snap.state, str)
              and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63
                      for v in (snap.created_ns, snap.indexed_end, snap.saved)))
    except (ValueError, KeyError, TypeError, K.MetaError):
        ok = False
    if not ok:
        raise SnapError(f"meta.lmdb: the record of snapshot {key.hex()} is damaged", "failed")
    return snap


class SnapStore:
    """The snapshot queue (oldest first) with each snapshot's save volume and indexes."""

    def __init__(self, site_path: Path, *, capacity_bytes: int | None = None, env=None):
        self.root = Path(site_path)
        self.save_dir = self.root / "save"
        private_dir(self.save_dir)  # raw blocks of every file: 0700
        fsync_dir(self.root)  # its entry durable once, before any save volume goes in it
        self.env = env if env is not None else open_env(self.root)
        self.db_snaps = self.env.open_db(K.SNAPS)
        self.db_names = self.env.open_db(K.NAMES)
        self.db_state = self.env.open_db(K.STATE)
        self.bits = _Pages(self.env, self.env.open_db(K.BITS), K.BITS_PAGE_BYTES)
        self.bmap = _Pages(self.env, self.env.open_db(K.BMAP), K.BMAP_PER_PAGE * 4)
        self.capacity = capacity_bytes
        self.queue: list[Snapshot] = []
        self._load()

    # ---------------------------------------------------------------- state

    def _load(self) -> None:
        with self.env.begin(db=self.db_snaps) as txn:
            for key, val in txn.cursor():
                snap = _decode_record(key, val)
                snap.save = SaveVolume(self.save_dir / f"{snap.id}.save", snap.id)
                self.queue.append(snap)
        self.queue.sort(key=lambda s: s.id)
        recovered = 0
        for snap in self.queue:
            recovered += self._recover(snap)
        if recovered:
            log.info("re-indexed %d before-images from save volumes after a crash", recovered)
            self.flush()

    def _recover(self, snap: Snapshot) -> int:
        n = 0
        for si, bis in snap.save.scan(snap.indexed_end):
            self._index(snap, bis, np.arange(si, si + len(bis), dtype=np.uint32))
            n += len(bis)
        if snap.save.valid_end < snap.save.size:
            log.info("snapshot %s: cutting a torn save-volume record at block %d", snap.name,
                     snap.save.valid_end)
            snap.save.truncate(snap.save.valid_end)
        snap.indexed_end = snap.save.size
        return n

    def get_state(self, name: str) -> bytes | None:
        with self.env.begin(db=self.db_state) as txn:
            return txn.get(name.encode())

    def set_state(self, name: str, value: bytes | None) -> None:
        with self.env.begin(db=self.db_state, write=True) as txn:
            if value is None:
                txn.delete(name.encode())
            else:
                txn.put(name.encode(), value)

    def usage(self) -> int:
        """Bytes held by all save volumes."""
        return sum(s.save.size for s in self.queue) * BS

    # ---------------------------------------------------------------- queue

    def find(self, name: str) -> Snapshot:
        for s in self.queue:
            if s.name == name:
                return s
        raise SnapError(f"no snapshot named {name!r}", "not_found")

    def position(self, snap: Snapshot) -> int:
        return self.queue.index(snap)

    def create(self, name: str, attrs: dict | None = None) -> Snapshot:
        """Add a snapshot at the tail of the queue (the caller holds a consistency point)."""
        snap = self.prepare(name, attrs)
        try:
            with self.env.begin(write=True) as txn:
                self.record_new(txn, snap)
        except BaseException:
            self.discard_prepared(snap)
            raise
        self.queue.append(snap)
        return snap

    def prepare(self, name: str, attrs: dict | None = None, *, interest=None) -> Snapshot:
        """The first half of create: check the name, make the save volume (its directory
        entry durable). `record_new` in the caller's transaction, then append to `queue`."""
        if not valid_name(name):
            raise SnapError(f"bad snapshot name {name!r} ({NAME_RULE})")
        if any(s.name == name for s in self.queue):
            raise SnapError(f"a snapshot named {name!r} exists", "conflict")
        raw = self.get_state("next_id")
        sid = int.from_bytes(raw, "big") if raw else 1
        snap = Snapshot(sid, name, time.time_ns(), dict(attrs or {}))
        snap.interest = interest
        snap.save = SaveVolume(self.save_dir / f"{sid}.save", sid)
        if snap.save.size:  # a leftover of a crashed create: start empty
            snap.save.truncate(0)
        # the save volume's name must be durable before the snapshot is recorded: else a
        # power cut loses the file while meta.lmdb indexes before-images in it
        # (tests/t4_power.py)
        fsync_dir(self.save_dir)
        return snap

    def record_new(self, txn, snap: Snapshot) -> None:
        txn.put(K.snap_key(snap.id), snap.record(), db=self.db_snaps)
        txn.put(snap.name.encode(), K.snap_key(snap.id), db=self.db_names)
        txn.put(b"next_id", (snap.id + 1).to_bytes(8, "big"), db=self.db_state)

    @staticmethod
    def discard_prepared(snap: Snapshot) -> None:
        snap.save.close()
        snap.save.path.unlink(missing_ok=True)

    def set_attrs(self, snap: Snapshot, attrs: dict) -> None:
        snap.attrs.update(attrs)
        with self.env.begin(write=True, db=self.db_snaps) as txn:
            txn.put(K.snap_key(snap.id), snap.record())

    def unqueue(self, snap: Snapshot) -> None:
        """Take a snapshot out of the queue and the caches (under the layer's lock); `remove`
        then forgets it durably."""
        if snap in self.queue:
            self.queue.remove(snap)
        self.bits.forget(snap.id)
        self.bmap.forget(snap.id)

    def remove(self, snap: Snapshot) -> None:
        """Forget a snapshot and its save volume (its before-images must have been moved)."""
        with self.env.begin(write=True) as txn:
            self.bits.drop(txn, snap.id)
            self.bmap.drop(txn, snap.id)
            txn.delete(K.snap_key(snap.id), db=self.db_snaps)
            txn.delete(snap.name.encode(), db=self.db_names)
        snap.save.close()
        snap.save.path.unlink(missing_ok=True)
        if snap in self.queue:  # (the layer unqueues first, under its lock)
            self.unqueue(snap)

    def mark(self, snap: Snapshot, state: str) -> None:
        snap.state = state
        with self.env.begin(write=True, db=self.db_snaps) as txn:
            txn.put(K.snap_key(snap.id), snap.record())

    # ---------------------------------------------------------------- indexes

    def has(self, snap: Snapshot, s: int, n: int) -> np.ndarray:
        """Bool array: which of blocks [s, s+n) have a before-image in this snapshot."""
        return pagedbits.get_range(lambda page: self.bits.get(snap.id, page), s, n)

    def page_bits(self, snap: Snapshot, page: int) -> np.ndarray | None:
        buf = self.bits.get(snap.id, page)
        return None if buf is None else pagedbits.unpack(buf)

    def bit_pages(self, snap: Snapshot) -> list[int]:
        return self.bits.pages(snap.id)

    def lookup(self, snap: Snapshot, bis: np.ndarray) -> np.ndarray:
        """Save addresses of blocks (which must have before-images), as an array."""
        out = np.zeros(len(bis), dtype=np.int64)
        pages = bis // K.BMAP_PER_PAGE
        for page in np.unique(pages).tolist():
            sel = pages == page
            buf = self.bmap.get(snap.id, page)
            arr = np.frombuffer(buf, dtype="<u4") if buf is not None else np.zeros(
                K.BMAP_PER_PAGE, dtype=np.uint32)
            out[sel] = arr[bis[sel] % K.BMAP_PER_PAGE].astype(np.int64) - 1
        if (out < 0).any():
            raise RuntimeError(f"snapshot {snap.name}: block map lacks an entry the bit map has")
        return out

    def _index(self, snap: Snapshot, bis: np.ndarray, sis: np.ndarray) -> None:
        for page, offsets in pagedbits.by_page(bis):
            pagedbits.assign(self.bits.modify(snap.id, page), offsets, True)
        mp = bis // K.BMAP_PER_PAGE
        for page in np.unique(mp).tolist():
            sel = mp == page
            buf = self.bmap.modify(snap.id, page)
            arr = np.frombuffer(buf, dtype="<u4")
            arr[bis[sel] % K.BMAP_PER_PAGE] = sis[sel] + 1
        snap.saved += len(bis)

    def add_before_images(self, snap: Snapshot, bis: np.ndarray, data) -> None:
        """Save before-images and index them; neither is durable before the next flush (the
        caller holds back the writes they protect until then)."""
        sis = snap.save.append(bis, data)
        self._index(snap, bis, sis)

    def read_saved(self, snap: Snapshot, bis: np.ndarray) -> list[tuple[int, int, bytes]]:
        """Before-images of the sorted blocks `bis` as (index into bis, count, data) runs, each
        contiguous in the clone volume and in the save volume."""
        sis = self.lookup(snap, bis)
        if not len(bis):
            return []
        return [(i, j - i, snap.save.read(int(sis[i]), j - i)) for i, j in run_bounds(bis, sis)]

    def detach(self):
        """The first half of a flush, under the caller's lock: what must be synced and
        indexed now (later appends go to the next flush). Returns a token for `sync_detached`
        and `commit_detached`, which may run without the lock (one flush at a time)."""
        fds = []
        for snap in self.queue:
            if snap.save.unsynced:
                fds.append(os.dup(snap.save.fd))  # a concurrent delete may close the file
                snap.save.unsynced = False
        ends = {s.id: s.save.size for s in self.queue if s.indexed_end != s.save.size}
        pages = (self.bits.detach(), self.bmap.detach())
        return fds, ends, pages

    @staticmethod
    def sync_detached(token) -> None:
        """Make the detached records durable (no lock needed)."""
        fds = token[0]
        try:
            for fd in fds:
                os.fdatasync(fd)
        finally:
            for fd in fds:
                os.close(fd)
            fds.clear()

    def commit_detached(self, token) -> None:
        """Write the detached indexes in one durable LMDB transaction (after sync_detached:
        an index never points at a record that is not durable), then let readers use the
        committed pages from the cache. If it fails, the pages are dirty again."""
        _, ends, (bits, bmap) = token
        if not bits and not bmap and not ends:
            return
        try:
            with self.env.begin(write=True) as txn:
                self.bits.write_pages(txn, bits)
                self.bmap.write_pages(txn, bmap)
                for snap in self.queue:
                    if snap.id in ends:
                        rec = json.loads(snap.record())
                        rec["indexed_end"] = ends[snap.id]
                        txn.put(K.snap_key(snap.id), json.dumps(rec).encode(), db=self.db_snaps)
        except BaseException:
            for pg, pages in ((self.bits, bits), (self.bmap, bmap)):
                for k, buf in pages.items():
                    if pg.flushing.get(k) is buf:
                        del pg.flushing[k]
                        pg.dirty.setdefault(k, bytearray(buf))
            for snap in self.queue:
                if snap.id in ends:
                    snap.save.unsynced = True
            raise
        for snap in self.queue:
            if snap.id in ends:
                snap.indexed_end = max(snap.indexed_end, ends[snap.id])
        self.bits.attach_clean(bits)
        self.bmap.attach_clean(bmap)

    def flush(self) -> None:
        """Make every record and the indexes durable (the caller keeps writers out)."""
        token = self.detach()
        self.sync_detached(token)
        self.commit_detached(token)

    def close(self) -> None:
        self.flush()
        for s in self.queue:
            s.save.close()
        self.env.close()
