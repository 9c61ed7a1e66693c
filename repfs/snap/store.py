"""The snapshot queue, its save volumes and its paged indexes (FIG. 24, 25, 42-44).

* A save volume is a plain file ``SITE/save/<id>.save``: a log of records, each a header block
  (magic, snapshot id, sequence number, the clone-volume block numbers Bi, an xxh3 checksum
  over header and data) followed by the before-images. The save-volume address Si of a
  before-image is its block index in the file. Records are appended without a sync; the
  snapped-volume layer (layer.py) holds back the clone writes they protect until a flush has
  made them durable (one fdatasync per save volume per group commit, not one per write), so
  a crash never loses a before-image whose block was overwritten. Records are built in
  memory and written later by the layer's records thread or its flush, never by the writing
  thread; a *deferred* part of one names the clone blocks to copy, read when it is written
  (or when a reader asks for it before then: `clone_read`).
* The indexes (bit map and block map of each snapshot) are paged and live in LMDB
  (``repfs.snap.keys``). Changes are kept in memory and written in one durable LMDB
  transaction at each flush, after the save volumes they point into are synced (`detach` /
  `commit_detached`: the index covers only records already durable). After a crash, records
  past a snapshot's ``indexed_end`` are read back from its save volume and indexed again; a
  torn last record is cut off (the clone write it protected had not been issued).
"""

from __future__ import annotations

import bisect
import errno
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
from ..tasks import describe
from ..statefile import fsync_dir, remove_durably
from .. import pagedbits
from ..extents import run_bounds, runs
from ..volume import BLOCK_SIZE, private_dir, pwritev_all
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


_libc = None


def _libc_():
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util
        lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        lib.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
        lib.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                        ctypes.c_uint)
        _libc = lib
    return _libc


def start_writeback(fd: int, off: int, length: int) -> None:
    """sync_file_range(2) with SYNC_FILE_RANGE_WRITE: start writing those pages to the disk
    without waiting for them (Python's os lacks it), so that a later fdatasync finds less to
    do. A hint: its result is ignored."""
    _libc_().sync_file_range(fd, off, length, 2)  # 2: SYNC_FILE_RANGE_WRITE


def _fallocate_keep_size(fd: int, off: int, length: int) -> None:
    """fallocate(2) with FALLOC_FL_KEEP_SIZE (Python's os has only posix_fallocate, which
    changes the size and emulates the call by writing where it is unsupported)."""
    if _libc_().fallocate(fd, 1, off, length) != 0:  # 1: FALLOC_FL_KEEP_SIZE
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class DamagedRecord(OSError):
    """A save-volume record fails its checksum when read back: its before-images cannot be
    trusted (EIO for a reader; a send task stops the destination: it needs a resync)."""

    def __init__(self, detail: str):
        super().__init__(errno.EIO, detail)


class _Record:
    """A record of a save volume not yet written to its file: the header's save address, its
    count, the Bi arrays and the parts of its body. A part is the before-images themselves
    (bytes-like) or, for a *deferred* copy, the array of clone-volume blocks to read them
    from when the record is written (see SnapLayer: those blocks do not change until then)."""

    __slots__ = ("start", "n", "bis", "parts", "seq", "written")

    def __init__(self, start: int):
        self.start = start
        self.n = 0
        self.bis: list[np.ndarray] = []
        self.parts: list = []
        self.seq = 0
        self.written = False  # in the file (set by the thread that wrote it)


def _holding(recs: list[tuple[int, int]], si: int):
    """The (header Si, n) of the sorted `recs` whose record holds save address `si`, or None."""
    i = bisect.bisect_right(recs, (si, 1 << 62)) - 1
    if i >= 0 and recs[i][0] < si <= recs[i][0] + recs[i][1]:
        return recs[i]
    return None


def _deferred(part) -> bool:
    return isinstance(part, np.ndarray)


def _read_clone(blocks: np.ndarray, clone_read) -> list:
    """The clone volume's blocks `blocks` (a deferred part), one read per run."""
    if clone_read is None:
        raise RuntimeError("a deferred before-image without a clone volume to read it from")
    return [clone_read(a, c) for _, a, c in runs(blocks)]


class SaveVolume:
    """One snapshot's save volume: an append-only log of before-image records.

    Appends go into an *open record* in memory that is sealed when it is full or at the next
    detach; sealed records wait in memory (`_unwritten`, read from there) until the flushing
    thread writes them (`write_records`) and the layer marks them written (`mark_written`):
    the trio thread never writes a save volume. A flush's before-images cost one header
    block per REC_MAX of them, not one per write request. Every record is verified against
    its checksum the first time one of its before-images is read from the file."""

    def __init__(self, path: Path, sid: int):
        self.path = path
        self.sid = sid
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size // BS  # in blocks, unwritten records included
        self.seq = 0
        self.unsynced = False  # records appended since the last detach
        self._open: _Record | None = None
        self._unwritten: list[_Record] = []  # sealed, not yet written, in file order
        self.fresh: list[_Record] = []  # sealed by appends since the layer last took them
        self._recs: list[tuple[int, int]] | None = None  # (header Si, n) found in the file
        # (header Si, n) of the records written since it was opened, sorted (the records
        # thread and the flush mark theirs in either order)
        self._written_here: list[tuple[int, int]] = []
        self._verified: set[int] = set()  # header Si of records whose checksum held
        self.entry_durable = True  # its directory entry (False: fsync the directory first)
        self._room_end = self.size  # disk space taken up to here (fallocate KEEP_SIZE)
        self._keep_size = True  # the file system can (else posix_fallocate per copy)

    def append(self, bis: np.ndarray, data=None) -> np.ndarray:
        """Append before-images of blocks `bis`; returns their save addresses. `data`: the
        before-images, or None to read them from the clone volume when the record is
        written (the caller guarantees those blocks do not change until then). Neither
        written nor synced here."""
        out = np.empty(len(bis), dtype=np.uint32)
        mv = memoryview(data) if data is not None else None
        # the space first (ENOSPC here changes nothing, and fails the write that needed the
        # copy, as before): the record is written later, by the flush
        room = REC_MAX - self._open.n if self._open is not None else 0
        rest = max(0, len(bis) - room)
        headers = -(-rest // REC_MAX)
        end = self.size + len(bis) + headers
        if len(bis) and end > self._room_end:
            self._take_room(end)
        done = 0
        while done < len(bis):
            if self._open is None or self._open.n == REC_MAX:
                self._seal()
                self._open = _Record(self.size)
                self.size += 1  # the header's block
            op = self._open
            m = min(REC_MAX - op.n, len(bis) - done)
            chunk = bis[done: done + m]
            op.bis.append(chunk)
            op.parts.append(mv[done * BS: (done + m) * BS] if mv is not None
                            else np.array(chunk, dtype=np.uint32))
            out[done: done + m] = np.arange(self.size, self.size + m, dtype=np.uint32)
            op.n += m
            self.size += m
            done += m
        self.unsynced = True
        return out

    def _seal(self) -> None:
        if self._open is not None:
            self.seq += 1
            self._open.seq = self.seq
            self._unwritten.append(self._open)
            self.fresh.append(self._open)
            self._open = None

    ROOM_STEP = 256  # blocks of room taken ahead at least (one fallocate per 1 MiB) ...
    ROOM_STEP_MAX = 16384  # ... and at most: an eighth of the file's size up to 64 MiB (a
    # fallocate costs ~0.5-1 ms on the writing thread; a large copy takes few of them)

    def _take_room(self, end: int) -> None:
        """Disk space up to block `end` (ENOSPC here fails the copy, changing nothing)."""
        if self._keep_size:
            step = min(self.ROOM_STEP_MAX, max(self.ROOM_STEP, self.size // 8))
            try:
                _fallocate_keep_size(self.fd, self._room_end * BS,
                                     (end + step - self._room_end) * BS)
                self._room_end = end + step
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._keep_size = False
        # (where the file system cannot keep the size: exactly what is needed, which
        # changes the size as the record will)
        os.posix_fallocate(self.fd, self.size * BS, (end - self.size) * BS)

    def reserve(self, blocks: int) -> bool:
        """Reserve disk space for `blocks` more before-images (and their record headers)
        past the end, without changing the file's size (fallocate KEEP_SIZE): copies into it
        then cannot fail for want of space. False where the file system cannot reserve
        (FUSE, some network file systems); ENOSPC is raised."""
        want = blocks + -(-blocks // REC_MAX) + 1
        try:
            _fallocate_keep_size(self.fd, self.size * BS, want * BS)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._keep_size = False
                return False
            raise
        self._room_end = max(self._room_end, self.size + want)
        return True

    def pending_records(self) -> list[_Record]:
        """Seal the open record; the records not yet written, in file order (under the
        layer's lock; they stay readable from memory until `mark_written`)."""
        self._seal()
        self.fresh = []  # (the flush writes them)
        return list(self._unwritten)

    @staticmethod
    def write_records(fd: int, sid: int, recs: list[_Record], clone_read) -> None:
        """Write records (header, then the before-images; deferred parts read from the clone
        volume now) to the file `fd`, except those already written. No lock needed: sealed
        records do not change."""
        for rec in recs:
            if rec.written:
                continue
            body = []
            for part in rec.parts:
                body.extend(_read_clone(part, clone_read) if _deferred(part) else (part,))
            head = bytearray(BS)
            _REC.pack_into(head, 0, _REC_MAGIC, sid, rec.seq, rec.n)
            head[_REC.size: _REC.size + 4 * rec.n] = (
                np.concatenate(rec.bis).astype("<u4").tobytes())
            h = xxhash.xxh3_64()
            h.update(memoryview(head)[:_REC_CSUM_OFF])
            for part in body:
                h.update(part)
            struct.pack_into("<Q", head, _REC_CSUM_OFF, h.intdigest())
            # one system call, no joined copy of the body (at most REC_MAX + 1 parts, one
            # per run at most: < IOV_MAX)
            pwritev_all(fd, [head, *body], rec.start * BS)
            rec.written = True

    def mark_written(self, recs: list[_Record]) -> None:
        """After write_records (under the layer's lock): read them from the file now."""
        done = {id(r) for r in recs}
        self._unwritten = [r for r in self._unwritten if id(r) not in done]
        for r in recs:
            i = bisect.bisect_left(self._written_here, (r.start, 0))
            if i == len(self._written_here) or self._written_here[i][0] != r.start:
                self._written_here.insert(i, (r.start, r.n))

    def read(self, si: int, count: int, clone_read=None) -> bytes:
        """Before-images at save addresses [si, si+count) (within one record)."""
        rec = None
        if self._open is not None and si > self._open.start:
            rec = self._open
        elif self._unwritten and si > self._unwritten[0].start:
            # (the records thread and the flush may have written later ones first)
            i = bisect.bisect_right([r.start for r in self._unwritten], si - 1) - 1
            rec = self._unwritten[i]
            if si > rec.start + rec.n:
                rec = None
        if rec is not None:
            out, pos, want = [], rec.start + 1, (si, si + count)
            for part in rec.parts:
                n = len(part) if _deferred(part) else len(part) // BS
                a, b = max(pos, want[0]), min(pos + n, want[1])
                if a < b:
                    if _deferred(part):
                        out.extend(_read_clone(part[a - pos: b - pos], clone_read))
                    else:
                        out.append(part[(a - pos) * BS: (b - pos) * BS])
                pos += n
            return b"".join(out)
        self._verify(si)
        return os.pread(self.fd, count * BS, si * BS)

    def _verify(self, si: int) -> None:
        """Check the record holding save address `si` the first time it is read."""
        hit = _holding(self._written_here, si)
        if hit is None:
            if self._recs is None:
                self._recs = [(pos, len(bis)) for pos, bis in
                              ((p - 1, b) for p, b in self.scan(0, check=False))]
            hit = _holding(self._recs, si)
        if hit is None:
            raise DamagedRecord(f"{self.path}: no record holds save block {si}")
        start, n = hit
        if start in self._verified:
            return
        if not self._record_ok(start):
            raise DamagedRecord(f"{self.path}: the before-image record at block {start} is "
                                f"damaged (checksum)")
        self._verified.add(start)

    def _record_ok(self, pos: int):
        """The record at `pos`: its (seq, Bi array) if whole and its checksum holds."""
        head = os.pread(self.fd, BS, pos * BS)
        if len(head) < BS:
            return None
        magic, sid, seq, n = _REC.unpack_from(head, 0)
        if magic != _REC_MAGIC or sid != self.sid or n > REC_MAX or pos + 1 + n > self.size:
            return None
        body = os.pread(self.fd, n * BS, (pos + 1) * BS)
        h = xxhash.xxh3_64()
        h.update(head[:_REC_CSUM_OFF])
        h.update(body)
        if struct.unpack_from("<Q", head, _REC_CSUM_OFF)[0] != h.intdigest():
            return None
        return seq, np.frombuffer(head, dtype="<u4", count=n, offset=_REC.size).astype(np.uint32)

    def scan(self, start: int, check: bool = True):
        """Yield (first Si, Bi array) for each whole record from block `start` on; stops at the
        first record that is torn or foreign and sets `self.valid_end` there. With `check`
        False, only the headers are read (the record map of `_verify`)."""
        pos = start
        self.valid_end = start
        while pos < self.size:
            if check:
                got = self._record_ok(pos)
                if got is None:
                    break
                seq, bis = got
                self._verified.add(pos)
            else:
                head = os.pread(self.fd, BS, pos * BS)
                if len(head) < BS:
                    break
                magic, sid, seq, n = _REC.unpack_from(head, 0)
                if magic != _REC_MAGIC or sid != self.sid or n > REC_MAX:
                    break
                bis = np.zeros(n, dtype=np.uint32)
            self.seq = max(self.seq, seq)
            yield pos + 1, bis
            pos += 1 + len(bis)
            self.valid_end = pos

    def truncate(self, end: int) -> None:
        self._open = None
        self._unwritten = []
        self.fresh = []
        os.ftruncate(self.fd, end * BS)
        os.fsync(self.fd)
        self.size = end
        self._room_end = end
        self._recs = None
        self._written_here = [r for r in self._written_here if r[0] + r[1] < end]
        self._verified = {v for v in self._verified if v < end}

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
        # reads the clone volume's blocks (start, count) -> bytes: where deferred copies
        # come from (set by the snapped layer; see SnapLayer._copy_on_write)
        self.clone_read = None
        self._load()

    # ---------------------------------------------------------------- state

    def _load(self) -> None:
        with self.env.begin(db=self.db_snaps) as txn:
            for key, val in txn.cursor():
                snap = _decode_record(key, val)
                snap.save = SaveVolume(self.save_dir / f"{snap.id}.save", snap.id)
                self.queue.append(snap)
        self.queue.sort(key=lambda s: s.id)
        self.orphans_removed = self._remove_orphans()
        recovered = 0
        for snap in self.queue:
            recovered += self._recover(snap)
        if recovered:
            log.info("re-indexed %d before-images from save volumes after a crash", recovered)
        if any(s.indexed_end != s.save.size for s in self.queue):
            self.flush()

    def _remove_orphans(self) -> list[tuple[str, int]]:
        """Remove the save volumes no snapshot record owns — left by a crash in a create
        (made before its record) or in a delete (its record gone before the file), or by a
        power cut that brought back a file whose removal was not yet durable — so their space
        is never lost. Only the site's owner (the daemon, fsck) opens the store, and it
        creates nothing before this runs. Returns [(file name, bytes)]."""
        owned = {f"{s.id}.save" for s in self.queue}
        gone = []
        for p in sorted(self.save_dir.glob("*.save")):
            if p.name in owned or not p.name[:-5].isdigit() or not p.is_file():
                continue
            size = p.stat().st_size
            p.unlink()
            gone.append((p.name, size))
        if gone:
            fsync_dir(self.save_dir)
            log.info("removed %d save volume(s) no snapshot owns (left by a crash): %s",
                     len(gone), ", ".join(f"{n} ({b} bytes)" for n, b in gone))
        return gone

    def _recover(self, snap: Snapshot) -> int:
        n = 0
        for si, bis in snap.save.scan(snap.indexed_end):
            self._index(snap, bis, np.arange(si, si + len(bis), dtype=np.uint32))
            n += len(bis)
        if snap.save.valid_end < snap.save.size:
            log.info("snapshot %s: cutting a torn save-volume record at block %d", snap.name,
                     snap.save.valid_end)
            snap.save.truncate(snap.save.valid_end)
        # (indexed_end moves when the flush after this records it: set here, the flush
        # would find nothing to record, and every later open would scan again)
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

    def prepare(self, name: str, attrs: dict | None = None, *, interest=None,
                durable_entry: bool = True) -> Snapshot:
        """The first half of create: check the name, make the save volume (its directory
        entry durable, or with `durable_entry` False at the first sync that needs it: a
        delta set's cut, where writers wait). `record_new` in the caller's transaction,
        then append to `queue`."""
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
        # the save volume's name must be durable before meta.lmdb indexes a before-image
        # in it (else a power cut loses the file while the index points into it:
        # tests/t4_power.py) — here, or in the first sync of its records (sync_detached)
        if durable_entry:
            fsync_dir(self.save_dir)
        else:
            snap.save.entry_durable = False
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
        # the name's removal made durable too (the caller runs in a worker thread, without
        # the layer's lock): else a power cut brings the file back, owned by no snapshot
        # (startup would remove it again: _remove_orphans)
        remove_durably(snap.save.path)
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
        n = len(bis)
        if n > 1 and int(bis[0]) // K.BITS_PER_PAGE == int(bis[-1]) // K.BITS_PER_PAGE \
                and (np.diff(bis.astype(np.int64)) == 1).all():
            # one run in one bit-map page (a sequential write): slices, not scatters
            b0 = int(bis[0])
            buf = np.frombuffer(self.bits.modify(snap.id, b0 // K.BITS_PER_PAGE),
                                dtype=np.uint8)
            off = b0 % K.BITS_PER_PAGE
            a, b = off >> 3, (off + n + 7) >> 3
            bits = np.unpackbits(buf[a:b], bitorder="little")
            bits[off - (a << 3): off - (a << 3) + n] = 1
            buf[a:b] = np.packbits(bits, bitorder="little")
            pos = 0
            while pos < n:
                page, m0 = divmod(b0 + pos, K.BMAP_PER_PAGE)
                m = min(n - pos, K.BMAP_PER_PAGE - m0)
                arr = np.frombuffer(self.bmap.modify(snap.id, page), dtype="<u4")
                arr[m0: m0 + m] = sis[pos: pos + m] + 1
                pos += m
            snap.saved += n
            return
        for page, offsets in pagedbits.by_page(bis):
            pagedbits.assign(self.bits.modify(snap.id, page), offsets, True)
        mp = bis // K.BMAP_PER_PAGE
        for page in np.unique(mp).tolist():
            sel = mp == page
            buf = self.bmap.modify(snap.id, page)
            arr = np.frombuffer(buf, dtype="<u4")
            arr[bis[sel] % K.BMAP_PER_PAGE] = sis[sel] + 1
        snap.saved += len(bis)

    def add_before_images(self, snap: Snapshot, bis: np.ndarray, data=None) -> None:
        """Save before-images and index them; neither is durable before the next flush (the
        caller holds back the writes they protect until then). `data` None: a deferred
        copy, read from the clone volume (`clone_read`) when the record is written."""
        sis = snap.save.append(bis, data)
        self._index(snap, bis, sis)

    def read_saved(self, snap: Snapshot, bis: np.ndarray) -> list[tuple[int, int, bytes]]:
        """Before-images of the sorted blocks `bis` as (index into bis, count, data) runs, each
        contiguous in the clone volume and in the save volume."""
        sis = self.lookup(snap, bis)
        if not len(bis):
            return []
        return [(i, j - i, snap.save.read(int(sis[i]), j - i, self.clone_read))
                for i, j in run_bounds(bis, sis)]

    def dirty_pages(self) -> int:
        return len(self.bits.dirty) + len(self.bmap.dirty)

    def detach(self, index: bool = True):
        """The first half of a flush, under the caller's lock: what must be synced and
        indexed now (later appends go to the next flush). Returns a token for `sync_detached`
        and `commit_detached`, which may run without the lock (one flush at a time). With
        `index` False the index stays in memory (its pages dirty): recovery re-indexes
        records past `indexed_end` from the save volumes, so the index needs committing
        only now and then, not at every group commit."""
        fds = []
        try:
            for snap in self.queue:
                if snap.save.unsynced:
                    # a delete may close the file: the flush writes and syncs a duplicate
                    fds.append((snap, os.dup(snap.save.fd), snap.save.pending_records()))
                    snap.save.unsynced = False
        except BaseException:
            for snap, fd, _ in fds:
                os.close(fd)
                snap.save.unsynced = True
            raise
        if not index:
            return fds, {}, ({}, {})
        ends = {s.id: s.save.size for s in self.queue if s.indexed_end != s.save.size}
        pages = (self.bits.detach(), self.bmap.detach())
        return fds, ends, pages

    def write_detached(self, token) -> None:
        """Write the detached records to their files, reading their deferred before-images
        from the clone volume (no lock needed). On failure nothing is marked written: the
        next flush writes them again (`undetach(synced=False)`)."""
        try:
            for snap, fd, recs in token[0]:
                snap.save.write_records(fd, snap.id, recs, self.clone_read)
        except BaseException:
            for _, fd, _ in token[0]:
                os.close(fd)
            raise

    def written_detached(self, token) -> None:
        """After write_detached (under the layer's lock): the records are read from the files
        from now on."""
        for snap, _, recs in token[0]:
            snap.save.mark_written(recs)

    def sync_detached(self, token) -> None:
        """Make the detached records durable (no lock needed; after write_detached); raises
        if a sync fails (the caller must then not trust those records: see
        SnapLayer._flush_saves). Closes the token's files either way."""
        fds = token[0]
        try:
            for _, fd, _ in fds:
                os.fdatasync(fd)
            new = [snap for snap, _, _ in fds if not snap.save.entry_durable]
            if new:  # before the index or a held write depends on the records
                fsync_dir(self.save_dir)
                for snap in new:
                    snap.save.entry_durable = True
        finally:
            for _, fd, _ in fds:
                os.close(fd)

    def break_pin(self, snap: Snapshot, exc: BaseException) -> bool:
        """A snapshot that keeps only an `interest` set (a delta set's pin) could not take a
        before-image into its save volume (no room, a failing disk): it stops keeping
        anything and is marked broken (its delta set cannot be sent; replication says the
        destination needs a resync), so that the file system goes on. False for a user's
        snapshot: the caller fails as it would have. Call under the layer's lock."""
        if snap.interest is None:
            return False
        if not snap.attrs.get("broken"):
            why = f"its save volume failed: {describe(exc)}"
            log.error("snapshot %s (a delta set's pin) is broken: %s; the file system goes on, "
                      "the delta set cannot be sent", snap.name, why)
            snap.interest = pagedbits.PagedBits()
            try:
                self.set_attrs(snap, {"broken": why})
            except Exception as e:  # noqa: BLE001 - meta.lmdb failing too: in memory only
                snap.attrs["broken"] = why
                log.error("cannot record that %s is broken: %s", snap.name, e)
        return True

    def write_index(self, token) -> None:
        """Write the detached indexes in one durable LMDB transaction (after sync_detached:
        an index never points at a record that is not durable). No lock needed; then
        `index_written`, or `undetach` if it failed."""
        _, ends, (bits, bmap) = token
        if not bits and not bmap and not ends:
            return
        with self.env.begin(write=True) as txn:
            self.bits.write_pages(txn, bits)
            self.bmap.write_pages(txn, bmap)
            for snap in list(self.queue):
                if snap.id in ends:
                    rec = json.loads(snap.record())
                    rec["indexed_end"] = ends[snap.id]
                    txn.put(K.snap_key(snap.id), json.dumps(rec).encode(), db=self.db_snaps)

    def index_written(self, token) -> None:
        """After write_index (under the layer's lock): readers use the committed pages."""
        _, ends, (bits, bmap) = token
        for snap in self.queue:
            if snap.id in ends:
                snap.indexed_end = max(snap.indexed_end, ends[snap.id])
        self.bits.attach_clean(bits)
        self.bmap.attach_clean(bmap)

    def undetach(self, token, *, synced: bool) -> None:
        """A flush failed (under the layer's lock): the detached index pages are dirty
        again, and unless `synced`, the detached records must be synced by the next one."""
        fds, ends, (bits, bmap) = token
        for pg, pages in ((self.bits, bits), (self.bmap, bmap)):
            for k, buf in pages.items():
                if pg.flushing.get(k) is buf:
                    del pg.flushing[k]
                    pg.dirty.setdefault(k, bytearray(buf))
        if not synced:
            for snap, _, _ in fds:
                snap.save.unsynced = True

    def commit_detached(self, token) -> None:
        try:
            self.write_index(token)
        except BaseException:
            self.undetach(token, synced=True)
            raise
        self.index_written(token)

    def flush(self) -> None:
        """Make every record and the indexes durable (the caller keeps writers out)."""
        token = self.detach()
        try:
            self.write_detached(token)
        except BaseException:
            self.undetach(token, synced=False)
            raise
        self.written_detached(token)
        self.sync_detached(token)
        self.commit_detached(token)

    def close(self) -> None:
        self.flush()
        for s in self.queue:
            s.save.close()
        self.env.close()
