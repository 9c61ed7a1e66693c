"""The file-system core: POSIX operations on inodes, driven by the FUSE adapter or by tests.

The core is synchronous and single-threaded: every call runs to completion, so calls never
interleave. It keeps the kernel's lookup counts, the in-memory inode cache and the running
transaction. Commits are split in three steps so the adapter can run the slow middle one in a
worker thread while the next transaction goes on (see docs/crash-safety.md):

* ``prepare_commit()`` (caller's thread) packs dirty inodes, applies deferred frees and the
  superblock into the metadata cache and sets the transaction's blocks aside;
* ``write_commit(txn)`` (any thread) flushes the device (data first: ordered mode), writes and
  syncs the redo-log record (the commit point), then writes the blocks into the volume;
* ``finish_commit()`` (caller's thread) moves the blocks into the clean cache.

If preparing or writing a commit fails (EIO or ENOSPC under the redo log or the volume, a
value the format cannot hold), ``fail()`` turns the core read-only for good, as ext4's
``errors=remount-ro`` does: the in-memory state stays readable, every later commit raises
FSError(EIO), and nothing already durable is lost (docs/reliability.md, "Disk errors").

File data is written straight to the device below (ordered mode); metadata goes through the
metadata cache and the redo log. Permission checks on paths are the kernel's (the mount uses
``default_permissions``); the core implements what the kernel leaves to file systems: set-gid
directory inheritance, clearing set-uid/set-gid on chown, the sticky bit is the kernel's too.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass

import numpy as np

from ..extents import mapped_runs, runs
from .alloc import Allocator
from .blockmap import BlockMap
from .cache import MetaCache
from .dirs import Directories
from .errors import FSError
from .format import (
    BLOCK_SIZE, DIR_OFFSET_BASE, ID_MAX, INODE_SIZE, INODES_PER_BLOCK, LINK_MAX, MAX_FILE_SIZE,
    MAX_NAME, MAX_SYMLINK, RDEV_MAX, ROOT_INO, XATTR_NAME_MAX, XATTR_SIZE_MAX, FormatError,
    Inode, Superblock, clamp_time_ns,
)
from .journal import Journal
from .xattrs import Xattrs

log = logging.getLogger(__name__)
BS = BLOCK_SIZE
ORPHAN_FLAG = 1  # Inode.flags: the inode is on the superblock's orphan list
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")


@dataclass
class Ctx:
    """Who asks: the fields of pyfuse3's RequestContext that the core uses."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


ROOT = Ctx()


def _now() -> int:
    return time.time_ns()


def _sup_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class FileSystem:
    # commit once this many metadata blocks are dirty (bounds memory and the redo log)
    COMMIT_DIRTY_BLOCKS = 8192
    INODE_CACHE = 20000

    def __init__(self, dev, journal_path, *, readonly: bool = False,
                 cache_blocks: int = 16384):
        self.dev = dev
        self.readonly = readonly
        if journal_path is None:  # a snapshot: consistent as it stands, never written
            if not readonly:
                raise ValueError("a file system without a redo log must be read-only")
            self.journal = None
            self.replayed = 0
        else:
            self.journal = Journal(journal_path)
            self.replayed = self.replay_journal(dev, self.journal)
        self.sb = Superblock.unpack(dev.read(0, 1))
        if self.sb.nblocks != dev.nblocks:
            raise FormatError(f"superblock says {self.sb.nblocks} blocks, the volume has "
                              f"{dev.nblocks}")
        self.meta = MetaCache(dev, cache_blocks)
        # True under FUSE's writeback cache (set by Operations): the kernel keeps a regular
        # file's mtime and ctime and sends them in a SETATTR, so a write does not stamp them
        # (a WRITE arriving after that SETATTR would put other times on the volume than the
        # mount showed, changed again at the next flush of the kernel's or a remount)
        self.kernel_times = False
        reserve = min(max(16, self.sb.nblocks // 200), 32768)
        self.alloc = Allocator(self.meta, self.sb, reserve)
        self.bmap = BlockMap(self.meta, self.alloc)
        self.dirs = Directories(self.meta, self.bmap)
        self.xattrs = Xattrs(self.meta, self.alloc, self.bmap)
        self.inodes: dict[int, Inode] = {}
        self.dirty_inodes: set[int] = set()
        self.open_count: dict[int, int] = {}
        self.data_dirty = False
        self.sb_dirty = False
        # a change since the last commit that fdatasync must make durable: anything but file
        # data in mapped blocks and timestamps (see sync_data)
        self.datasync_dirty = False
        # errors=remount-ro: why a commit failed (the core turned read-only), and when
        self.error: str | None = None
        self.error_ns = 0
        self.committing_seq = 0
        self.frozen = False
        self.deferred_destroy: set[int] = set()
        if not readonly and self.sb.orphan_head:
            try:
                self._reap_orphans()
            except (FSError, FormatError) as e:
                # a damaged orphan list costs the space of the inodes left on it, not the
                # mount (t1_fuzz_core: a damaged orphan_next made every mount fail)
                log.warning("orphan list: %s; the inodes left on it stay allocated until "
                            "repfs fsck", e)
            self.commit()

    # ================================================================= journal and commit

    @staticmethod
    def replay_journal(dev, journal: Journal) -> int:
        """Apply the committed transaction in the redo log to the volume; idempotent."""
        rec = journal.read()
        if rec is None:
            return 0
        _, blocks = rec
        if blocks and max(blocks) >= dev.nblocks:  # checked before anything is written
            raise FormatError(f"the redo log names block {max(blocks)}, outside this volume "
                              f"of {dev.nblocks} blocks")
        for blk in sorted(blocks):
            dev.write(blk, blocks[blk], meta=True)
        dev.flush()
        journal.clear()
        return len(blocks)

    def has_changes(self) -> bool:
        return bool(self.meta.dirty or self.dirty_inodes or self.alloc.pending
                    or self.data_dirty or self.sb_dirty)

    def commit_due(self) -> bool:
        return len(self.meta.dirty) >= self.COMMIT_DIRTY_BLOCKS

    def fail(self, what: str, exc: BaseException) -> None:
        """A commit failed: turn read-only for good (as ext4's errors=remount-ro does). The
        in-memory state stays readable; nothing after the last durable commit is written;
        every later commit and fsync fails with EIO. Idempotent (keeps the first error)."""
        if self.error is None:
            self.error = f"{what}: {exc}"
            self.error_ns = time.time_ns()
            log.error("%s; the file system is now read-only (remount to recover; nothing "
                      "already fsync'd is lost)", self.error)
        self.readonly = True

    def _failed(self) -> FSError:
        return FSError(errno.EIO, f"the file system turned read-only after an error: "
                                  f"{self.error}")

    def prepare_commit(self):
        """Close the running transaction; returns it for write_commit (None: nothing to do).
        Raises FSError(EIO) once a commit has failed (see fail)."""
        if self.error is not None:
            raise self._failed()
        if not self.has_changes():
            return None
        # Pack everything first: a value that does not fit the format fails the commit
        # before any state of the running transaction changed. Then the inode-table blocks
        # are read (EIO from the volume may strike there). Either failure stops all writing.
        try:
            packed = []
            for ino in self.dirty_inodes:
                buf = bytearray(INODE_SIZE)
                self.inodes[ino].pack_into(buf, 0)
                packed.append((ino, buf))
            self.sb.pack()  # packed for real below, once the frees are applied
            for ino, buf in packed:
                blk, off = self._inode_pos(ino)
                self.meta.modify(blk)[off: off + INODE_SIZE] = buf
                self.inodes[ino].dirty = False
            self.dirty_inodes.clear()
            self.datasync_dirty = False
            freed = self.alloc.apply_pending()
            self.sb.commit_seq += 1
            self.meta.modify(0)[:] = self.sb.pack()
        except Exception as e:  # noqa: BLE001 - a bug or an unreadable volume: keep the state
            self.fail("a commit could not be prepared", e)
            raise self._failed() from e
        self.sb_dirty = False
        self.data_dirty = False
        txn = self.sb.commit_seq, self.meta.begin_commit()
        # The blocks this transaction frees are free in its image, but must not be reused
        # before its commit point: the running transaction holds them until finish_commit.
        self.alloc.quarantine(freed)
        return txn

    def write_commit(self, txn) -> None:
        """Make the transaction durable (may run in a worker thread). If any step fails the
        core turns read-only (fail) and this raises FSError(EIO): before the journal record
        is durable the transaction is not committed and the volume still holds the previous
        one (its checkpoint was flushed first); after it, the next mount replays the record.
        Either way the transaction's blocks stay in the cache, readable, and nothing
        already fsync'd is lost."""
        seq, blocks = txn
        step = "flushing the volume"
        try:
            self.dev.flush()  # data and the previous checkpoint first: ordered mode
            step = "writing the redo log"
            self.journal.write(seq, blocks)  # the commit point
            step = "writing the checkpoint to the volume"
            numbers = np.array(sorted(blocks), dtype=np.uint32)
            for _, start, n in runs(numbers):
                if n == 1:
                    self.dev.write(start, blocks[start], meta=True)
                else:
                    self.dev.write(start, b"".join(blocks[b] for b in range(start, start + n)),
                                   meta=True)
        except Exception as e:  # noqa: BLE001 - EIO, ENOSPC, a layer's refusal, a bug
            self.fail(f"commit {seq} failed {step}", e)
            raise self._failed() from e

    def data_only(self) -> bool:
        """Whether every change since the last commit is file data in blocks already mapped
        (and committed) or a timestamp: then fdatasync needs no redo-log record, only the
        volume flushed (sync_data), as ext4's fdatasync skips an inode whose only change is
        its times. The caller keeps commits out (no commit is in flight)."""
        return not (self.datasync_dirty or self.meta.dirty or self.meta.committing
                    or self.alloc.pending or self.sb_dirty or self.error is not None)

    def sync_data(self) -> None:
        """fdatasync when data_only(): make the file data written so far durable by flushing
        the volume (may run in a worker thread; the caller keeps commits out). The
        timestamps stay in the running transaction. A failed flush turns the core read-only
        (fail), as in write_commit: the pages it could not write may be gone."""
        if self.error is not None:
            raise self._failed()
        if self.readonly:
            return
        try:
            self.dev.flush()
        except Exception as e:  # noqa: BLE001 - EIO, ENOSPC under the site
            self.fail("fdatasync failed flushing the volume", e)
            raise self._failed() from e

    def finish_commit(self) -> None:
        self.meta.end_commit()
        self.alloc.release_quarantine()
        self._evict_inodes()

    def commit(self) -> None:
        """Commit synchronously (tests, mount and unmount)."""
        txn = self.prepare_commit()
        if txn is not None:
            self.write_commit(txn)
            self.finish_commit()

    def checkpoint(self) -> None:
        """Commit and make the volume alone hold the file system (the redo log empty)."""
        self.commit()
        if self.has_changes():  # blocks released from quarantine after the commit point
            self.commit()
        if not self.readonly:
            self.clear_journal()

    def clear_journal(self) -> None:
        """After a commit: make its checkpoint durable, then forget the redo record (may run
        in a worker thread; the caller keeps other commits out). If either fails the core
        turns read-only (fail): the redo record, whole or cleared, and the volume still hold
        every commit."""
        if self.error is not None:
            raise self._failed()
        step = "flushing the volume"
        try:
            self.dev.flush()
            step = "clearing the redo log"
            self.journal.clear()
        except Exception as e:  # noqa: BLE001 - EIO, ENOSPC under the site
            self.fail(f"a checkpoint failed {step}", e)
            raise self._failed() from e

    def freeze(self) -> None:
        """The volume is about to change underneath (a restore, a playback): until thaw(),
        inodes that lose their last user are not destroyed, only remembered."""
        self.frozen = True

    def thaw(self) -> None:
        """After the change (and reload()): destroy the remembered inodes that are still
        unnamed and unused in the volume as it now is."""
        self.frozen = False
        pending, self.deferred_destroy = self.deferred_destroy, set()
        for ino in pending:
            try:
                inode = self.iget(ino)
            except (FSError, FormatError):  # gone, or damaged in the volume as it now is
                continue
            self._maybe_destroy(inode)

    def reload(self) -> None:
        """The volume changed underneath (a restore, a playback): forget every cached block
        and inode and read the superblock again, keeping the kernel's lookup counts and the
        open files. The caller has committed (or the file system is read-only)."""
        assert not self.has_changes()
        self.sb = Superblock.unpack(self.dev.read(0, 1))
        self.meta = MetaCache(self.dev, self.meta.capacity)
        self.alloc = Allocator(self.meta, self.sb, self.alloc.reserve)
        self.bmap = BlockMap(self.meta, self.alloc)
        self.dirs = Directories(self.meta, self.bmap)
        self.xattrs = Xattrs(self.meta, self.alloc, self.bmap)
        known = {ino: i.lookups for ino, i in self.inodes.items() if i.lookups}
        self.inodes = {}
        self.dirty_inodes = set()
        for ino, n in known.items():
            try:
                self.iget(ino).lookups = n
            except (FSError, FormatError):  # gone, or damaged in the volume as it now is
                pass

    def close(self) -> None:
        if not self.readonly:
            self.checkpoint()
        if self.journal is not None:
            self.journal.close()

    # ================================================================= inodes

    def _inode_pos(self, ino: int) -> tuple[int, int]:
        return self.sb.itable_start + ino // INODES_PER_BLOCK, (ino % INODES_PER_BLOCK) * INODE_SIZE

    def iget(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is not None and inode.mode:
            return inode
        if inode is None and 1 <= ino < self.sb.ninodes and self.alloc.inodes.test(ino):
            blk, off = self._inode_pos(ino)
            inode = Inode.unpack_from(ino, self.meta.read(blk), off)
            if inode.mode:
                _check_inode(inode, self.sb)
                self.inodes[ino] = inode
                return inode
        raise FSError(errno.ENOENT, f"inode {ino} does not exist")

    def _dirty(self, inode: Inode) -> None:
        inode.dirty = True
        self.dirty_inodes.add(inode.ino)
        self.datasync_dirty = True

    def _dirty_times(self, inode: Inode) -> None:
        """The inode changed in its timestamps only (fdatasync need not commit them)."""
        inode.dirty = True
        self.dirty_inodes.add(inode.ino)

    def _evict_inodes(self) -> None:
        if len(self.inodes) <= self.INODE_CACHE:
            return
        for ino in [i for i, n in self.inodes.items()
                    if not n.dirty and n.lookups == 0 and ino_closed(self, i)]:
            del self.inodes[ino]
            if len(self.inodes) <= self.INODE_CACHE // 2:
                break

    def _dir(self, ino: int) -> Inode:
        inode = self.iget(ino)
        if not stat.S_ISDIR(inode.mode):
            raise FSError(errno.ENOTDIR)
        return inode

    def _writable(self) -> None:
        if self.readonly:
            raise FSError(errno.EROFS)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > MAX_NAME:
            raise FSError(errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name:
            raise FSError(errno.EINVAL)

    def ref(self, ino: int, n: int = 1) -> None:
        """The kernel took `n` more references (e.g. a readdirplus entry it accepted)."""
        self.iget(ino).lookups += n

    def forget(self, ino: int, n: int) -> None:
        inode = self.inodes.get(ino)
        if inode is None:
            return
        inode.lookups = max(0, inode.lookups - n)
        self._maybe_destroy(inode)

    # ================================================================= queries

    def lookup(self, parent: int, name: bytes, ctx: Ctx = ROOT) -> Inode:
        if name == b".":
            # The kernel decodes a file handle (name_to_handle_at, NFS export) of an inode it
            # no longer caches by looking up "." in that inode, which may be of any type; a
            # freed inode gives ENOENT and the kernel's check of the generation does the rest.
            inode = self.iget(parent)
            inode.lookups += 1
            return inode
        d = self._dir(parent)
        if name == b"..":
            ino = d.parent
        else:
            if len(name) > MAX_NAME:
                raise FSError(errno.ENAMETOOLONG)
            found = self.dirs.lookup(d, name)
            if found is None:
                raise FSError(errno.ENOENT)
            ino = found[0]
        inode = self.iget(ino)
        inode.lookups += 1
        return inode

    def getattr(self, ino: int) -> Inode:
        return self.iget(ino)

    def readlink(self, ino: int) -> bytes:
        inode = self.iget(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FSError(errno.EINVAL)
        p = int(self.bmap.lookup(inode, 0, 1)[0])
        return bytes(self.meta.read(p)[: inode.size]) if p else b""

    def readdir(self, ino: int, start: int):
        """Yield (name, inode, next offset) from readdir offset `start` ('.' and '..' first)."""
        d = self._dir(ino)
        if start < 1:
            yield b".", d, 1
        if start < 2:
            yield b"..", self.iget(d.parent), 2
        after = start - DIR_OFFSET_BASE if start >= DIR_OFFSET_BASE else None
        for h, name, child, _ in self.dirs.iter_from(d, after):
            yield name, self.iget(child), DIR_OFFSET_BASE + h

    def statfs(self) -> dict:
        free = self.sb.free_blocks
        return dict(
            f_bsize=BS, f_frsize=BS, f_blocks=self.sb.nblocks - self.sb.data_start, f_bfree=free,
            f_bavail=max(0, free - self.alloc.reserve), f_files=self.sb.ninodes - 1,
            f_ffree=self.sb.free_inodes, f_favail=self.sb.free_inodes, f_namemax=MAX_NAME,
        )

    def access(self, ino: int, mode: int, ctx: Ctx) -> bool:
        inode = self.iget(ino)
        if mode == os.F_OK:
            return True
        if ctx.uid == 0:
            # root may do anything but execute a file that nobody may execute
            return not (mode & os.X_OK) or stat.S_ISDIR(inode.mode) or bool(inode.mode & 0o111)
        if ctx.uid == inode.uid:
            bits = inode.mode >> 6
        elif ctx.gid == inode.gid or inode.gid in _sup_groups(ctx.pid):
            bits = inode.mode >> 3
        else:
            bits = inode.mode
        return (bits & mode & 7) == mode

    # ================================================================= data

    RELATIME_NS = 24 * 3600 * 10**9
    # what a read does to atime (the mount options relatime, noatime, strictatime; FUSE leaves
    # access times to the file system)
    atime_mode = "relatime"

    def _touch_atime(self, inode: Inode) -> None:
        """relatime, as Linux mounts by default: update atime when it is older than mtime or
        ctime, or more than a day old; noatime: never; strictatime: on every read."""
        if self.readonly or self.atime_mode == "noatime":
            return
        now = _now()
        if (self.atime_mode == "strictatime"
                or inode.atime_ns <= inode.mtime_ns or inode.atime_ns <= inode.ctime_ns
                or now - inode.atime_ns > self.RELATIME_NS):
            inode.atime_ns = now
            self._dirty_times(inode)

    def read(self, ino: int, off: int, size: int) -> bytes:
        inode = self.iget(ino)
        self._touch_atime(inode)
        if off >= inode.size or size <= 0:
            return b""
        size = min(size, inode.size - off)
        b0 = off // BS
        nb = (off + size - 1) // BS + 1 - b0
        head = off - b0 * BS
        p = self.bmap.contiguous(inode, b0, nb)
        if p:  # the common case: one extent, one read, no numpy
            data = self.dev.read(p, nb)
            return data if head == 0 and size == len(data) else data[head: head + size]
        ext = self.bmap.extents(inode, b0, nb)
        if ext is not None:  # a sequential file across a leaf boundary: one read per run
            data = b"".join([self.dev.read(s, n) for s, n in ext])
            return data if head == 0 and size == len(data) else data[head: head + size]
        phys = self.bmap.lookup(inode, b0, nb)
        rr = mapped_runs(phys)
        if len(rr) == 1 and rr[0][0] == 0 and rr[0][2] == nb:
            data = self.dev.read(rr[0][1], nb)
            return data if head == 0 and size == len(data) else data[head: head + size]
        buf = bytearray(nb * BS)
        for idx, start, n in rr:
            buf[idx * BS: (idx + n) * BS] = self.dev.read(start, n)
        return bytes(memoryview(buf)[head: head + size])

    def write(self, ino: int, off: int, data) -> int:
        self._writable()
        inode = self.iget(ino)
        if not stat.S_ISREG(inode.mode):
            raise FSError(errno.EINVAL)
        n = len(data)
        if off < 0:
            raise FSError(errno.EINVAL)
        if n == 0:
            return 0
        if off + n > MAX_FILE_SIZE:
            if off >= MAX_FILE_SIZE:
                raise FSError(errno.EFBIG)
            n = MAX_FILE_SIZE - off
        b0 = off // BS
        nb = (off + n - 1) // BS + 1 - b0
        if nb == 1 and self.sb.free_blocks - self.alloc.reserve > 4:
            # one block, mapped or a hole (with room for it and any indirect block it needs)
            return self._write_one(inode, b0, off, n, data)
        p = self.bmap.contiguous(inode, b0, nb)
        if p:  # an overwrite of one extent: no numpy, one pwrite
            self._overwrite(inode, p, off, n, data)
            return n
        if self.sb.free_blocks - self.alloc.reserve > nb + 3:
            # room for the blocks and every indirect block they may need
            if nb <= 256:  # fresh pages written back by the kernel: a run of holes
                done = self._write_fresh(inode, b0, off, n, data)
                if done is not None:
                    return done
        cur = self.bmap.lookup(inode, b0, nb)
        holes = cur == 0
        nholes = int(holes.sum())
        if nholes:
            overhead = self.bmap.indirect_needed(inode, b0, nb, holes)
            avail = self.sb.free_blocks - self.alloc.reserve
            if nholes + overhead > avail:
                # fill what fits, then ENOSPC on the next write (as other file systems do)
                allowed = avail - overhead
                fit = (int(np.searchsorted(np.cumsum(holes), allowed, side="right"))
                       if allowed > 0 else 0)
                if fit == 0:
                    raise FSError(errno.ENOSPC)
                n = min(n, (b0 + fit) * BS - off)
                nb = (off + n - 1) // BS + 1 - b0
            try:
                phys, new = self.bmap.ensure(inode, b0, nb)
            except (FSError, FormatError):  # no space, or a damaged map (t1_fuzz_core)
                # leave nothing mapped past EOF (indirect blocks allocated for the write)
                self.bmap.truncate(inode, -(-inode.size // BS))
                self._dirty(inode)
                raise
        else:
            phys, new = cur, holes
        head = off - b0 * BS
        end = head + n
        mv = memoryview(data)[:n]
        if head == 0 and n % BS == 0:
            buf = mv
        else:
            buf = bytearray(nb * BS)
            if head and not new[0]:
                buf[:BS] = self.dev.read(int(phys[0]), 1)
            if end % BS and not new[-1] and (nb > 1 or not head):
                buf[-BS:] = self.dev.read(int(phys[-1]), 1)
            buf[head:end] = mv
        done = 0  # blocks of the range written, in logical order
        try:
            for idx, start, cnt in mapped_runs(phys):
                self.dev.write(start, buf[idx * BS: (idx + cnt) * BS])
                done = idx + cnt
        except OSError:
            # a layer below refused (e.g. the snapshot save volumes are full) or the disk
            # failed (EIO, ENOSPC of the host file system): blocks this write mapped but did
            # not write become holes again (they hold a deleted file's bytes), and the write
            # is short
            unwritten = new.copy()
            unwritten[:done] = False
            n = max(0, min(n, done * BS - head))
            if unwritten.any():
                self.bmap.unmap(inode, b0, unwritten)
                self.bmap.truncate(inode, -(-max(inode.size, off + n) // BS))
                self._dirty(inode)
            if n == 0:
                raise
        now = _now()
        if off + n > inode.size:
            inode.size = off + n
        if not self.kernel_times:
            inode.mtime_ns = inode.ctime_ns = now
        self._dirty(inode)
        self.data_dirty = True
        return n

    def _write_fresh(self, inode: Inode, b0: int, off: int, n: int, data) -> int | None:
        """write() into a range of holes within one map leaf (BlockMap.fill_holes): its
        blocks allocated as extents and written extent by extent, the partial ends zero
        filled. None if the range is not such a run (nothing changed). A failed write is
        short, as in write(): the blocks it did not write become holes again."""
        try:
            extents = self.bmap.fill_holes(inode, b0, -(-(off % BS + n) // BS))
        except (FSError, FormatError):  # as in write(): nothing left mapped past EOF
            self.bmap.truncate(inode, -(-inode.size // BS))
            self._dirty(inode)
            raise
        if extents is None:
            return None
        head = off % BS
        nb = sum(c for _, c in extents)
        if head == 0 and n == nb * BS:
            buf = memoryview(data)[:n]
        else:
            buf = bytearray(nb * BS)
            buf[head: head + n] = memoryview(data)[:n]
        done = 0  # blocks written, in logical order
        try:
            for s, c in extents:
                self.dev.write(s, buf[done * BS: (done + c) * BS])
                done += c
        except OSError:
            unwritten = np.zeros(nb, dtype=bool)
            unwritten[done:] = True
            n = max(0, min(n, done * BS - head))
            self.bmap.unmap(inode, b0, unwritten)
            self.bmap.truncate(inode, -(-max(inode.size, off + n) // BS))
            self._dirty(inode)
            if n == 0:
                raise
        if off + n > inode.size:
            inode.size = off + n
        if not self.kernel_times:
            inode.mtime_ns = inode.ctime_ns = _now()
        self._dirty(inode)
        self.data_dirty = True
        return n

    def _write_one(self, inode: Inode, b0: int, off: int, n: int, data) -> int:
        """write() within logical block b0, which may be a hole: the small-I/O path."""
        try:
            p, new = self.bmap.ensure_one(inode, b0)
        except (FSError, FormatError):  # as in write(): nothing left mapped past EOF
            self.bmap.truncate(inode, -(-inode.size // BS))
            self._dirty(inode)
            raise
        try:
            self._overwrite(inode, p, off, n, data, fresh=new)
        except OSError:  # as in write(): the block this write mapped becomes a hole again
            if new:
                self.bmap.unmap(inode, b0, np.ones(1, dtype=bool))
                self.bmap.truncate(inode, -(-inode.size // BS))
                self._dirty(inode)
            raise
        return n

    def _overwrite(self, inode: Inode, p: int, off: int, n: int, data, *,
                   fresh: bool = False) -> None:
        """Write `n` bytes at `off` into blocks already mapped to volume blocks p, p+1, ...
        (nothing to allocate or unmap: a failed write fails the request whole). `fresh`:
        the blocks were just allocated, so what they hold is not the file's (zeros are)."""
        head = off % BS
        end = head + n
        nb = -(-end // BS)
        if head == 0 and n % BS == 0:
            buf = memoryview(data)[:n] if len(data) != n else data
        else:
            buf = bytearray(nb * BS)
            if head and not fresh:
                buf[:BS] = self.dev.read(p, 1)
            if end % BS and (nb > 1 or not head) and not fresh:
                buf[-BS:] = self.dev.read(p + nb - 1, 1)
            buf[head:end] = memoryview(data)[:n]
        self.dev.write(p, buf)
        if not self.kernel_times:
            inode.mtime_ns = inode.ctime_ns = _now()
        if off + n > inode.size:
            inode.size = off + n
            self._dirty(inode)
        else:
            self._dirty_times(inode)
        self.data_dirty = True

    def _truncate(self, inode: Inode, size: int) -> None:
        if size > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG)
        if size < inode.size:
            keep = -(-size // BS)
            self.bmap.truncate(inode, keep, discard=not stat.S_ISREG(inode.mode))
            if size % BS:  # keep the bytes past EOF in the last block zero
                p = int(self.bmap.lookup(inode, keep - 1, 1)[0])
                if p:
                    blk = bytearray(self.dev.read(p, 1))
                    blk[size % BS:] = bytes(BS - size % BS)
                    self.dev.write(p, blk)
                    self.data_dirty = True
        inode.size = size

    def open(self, ino: int, flags: int = os.O_RDONLY, ctx: Ctx = ROOT) -> Inode:
        inode = self.iget(ino)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._writable()
        if flags & os.O_TRUNC and stat.S_ISREG(inode.mode):
            # FUSE's atomic_o_trunc hands the truncation of open(O_TRUNC) to the file system;
            # like Linux, it updates mtime and ctime even when the file was empty
            self.setattr(ino, size=0, mtime_ns=_now(), ctx=ctx)
        self.open_count[ino] = self.open_count.get(ino, 0) + 1
        return inode

    def release(self, ino: int) -> None:
        c = self.open_count.get(ino, 0) - 1
        if c > 0:
            self.open_count[ino] = c
            return
        self.open_count.pop(ino, None)
        inode = self.inodes.get(ino)
        if inode is not None:
            self._maybe_destroy(inode)

    # ================================================================= attributes

    def setattr(self, ino: int, *, mode=None, uid=None, gid=None, size=None, atime_ns=None,
                mtime_ns=None, ctime_ns=None, ctx: Ctx = ROOT) -> Inode:
        self._writable()
        inode = self.iget(ino)
        now = _now()
        # Every value is checked (or clamped) before anything changes, so that nothing the
        # inode then holds can fail to pack at the commit.
        for v in (uid, gid):
            if v is not None and not 0 <= v <= ID_MAX:
                raise FSError(errno.EINVAL, f"uid/gid {v} is out of range")
        atime_ns, mtime_ns, ctime_ns = (None if t is None else clamp_time_ns(t)
                                        for t in (atime_ns, mtime_ns, ctime_ns))
        if size is not None:
            if stat.S_ISDIR(inode.mode):
                raise FSError(errno.EISDIR)
            if not stat.S_ISREG(inode.mode):
                raise FSError(errno.EINVAL)
            if size < 0:
                raise FSError(errno.EINVAL)
            if size > MAX_FILE_SIZE:
                raise FSError(errno.EFBIG)
            if size != inode.size:
                self._truncate(inode, size)
                inode.mtime_ns = now
        if mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
        if (uid is not None and uid != inode.uid) or (gid is not None and gid != inode.gid):
            if mode is None and not stat.S_ISDIR(inode.mode):
                inode.mode &= ~stat.S_ISUID
                if inode.mode & stat.S_IXGRP:
                    inode.mode &= ~stat.S_ISGID
        if uid is not None:
            inode.uid = uid
        if gid is not None:
            inode.gid = gid
        if atime_ns is not None:
            inode.atime_ns = atime_ns
        if mtime_ns is not None:
            inode.mtime_ns = mtime_ns
        inode.ctime_ns = ctime_ns if ctime_ns is not None else now
        if mode is None and uid is None and gid is None and size is None:
            self._dirty_times(inode)  # e.g. the writeback cache's mtime before an fsync
        else:
            self._dirty(inode)
        return inode

    # ================================================================= namespace

    def _make(self, parent: int, name: bytes, mode: int, ctx: Ctx, *, rdev: int = 0,
              target: bytes | None = None) -> Inode:
        self._writable()
        self._check_name(name)
        d = self._dir(parent)
        if d.nlink == 0:
            raise FSError(errno.ENOENT)  # the directory was removed while open
        if self.dirs.lookup(d, name) is not None:
            raise FSError(errno.EEXIST)
        is_dir = stat.S_ISDIR(mode)
        if is_dir and d.nlink >= LINK_MAX:
            raise FSError(errno.EMLINK)
        if not stat.S_ISLNK(mode):
            mode = stat.S_IFMT(mode) | (mode & 0o7777 & ~ctx.umask)
        gid = ctx.gid
        if d.mode & stat.S_ISGID:
            gid = d.gid
            if is_dir:
                mode |= stat.S_ISGID
        if (mode & stat.S_ISGID and not is_dir and ctx.uid != 0 and gid != ctx.gid
                and gid not in _sup_groups(ctx.pid)):
            mode &= ~stat.S_ISGID
        ino = self.alloc.alloc_inode()
        now = _now()
        inode = Inode(ino, mode=mode, uid=ctx.uid, gid=gid, nlink=2 if is_dir else 1,
                      generation=self.sb.next_generation, rdev=rdev, atime_ns=now,
                      mtime_ns=now, ctime_ns=now, crtime_ns=now,
                      parent=parent)  # a file's: a hint for snapshot diff (format.py)
        self.sb.next_generation = (self.sb.next_generation + 1) & 0xFFFFFFFF or 1
        self.inodes[ino] = inode
        self._dirty(inode)
        try:
            if is_dir:
                self.dirs.init_dir(inode)
            elif target is not None:
                (p,), _ = self.bmap.ensure(inode, 0, 1, data=False)
                self.meta.new(int(p))[: len(target)] = target
                inode.size = len(target)
            self.dirs.add(d, name, ino, mode >> 12)
        except (FSError, FormatError):  # no space, or a damaged directory: no inode leaks
            self.bmap.truncate(inode, 0, discard=True)
            self._free_inode(inode)
            raise
        if is_dir:
            d.nlink += 1
        d.mtime_ns = d.ctime_ns = now
        self._dirty(d)
        inode.lookups += 1
        return inode

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, ctx: Ctx = ROOT) -> Inode:
        if not 0 <= mode <= 0o177777:
            raise FSError(errno.EINVAL)
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                                     stat.S_IFSOCK):
            raise FSError(errno.EINVAL)
        if not 0 <= rdev <= RDEV_MAX:
            raise FSError(errno.EINVAL, f"device number {rdev} is out of range")
        return self._make(parent, name, mode, ctx, rdev=rdev)

    def create(self, parent: int, name: bytes, mode: int, ctx: Ctx = ROOT) -> Inode:
        inode = self._make(parent, name, stat.S_IFREG | (mode & 0o7777), ctx)
        self.open_count[inode.ino] = self.open_count.get(inode.ino, 0) + 1
        return inode

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx = ROOT) -> Inode:
        return self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), ctx)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx = ROOT) -> Inode:
        if len(target) > MAX_SYMLINK:
            raise FSError(errno.ENAMETOOLONG)
        if not target:
            raise FSError(errno.ENOENT)
        return self._make(parent, name, stat.S_IFLNK | 0o777, ctx, target=target)

    def link(self, ino: int, parent: int, name: bytes, ctx: Ctx = ROOT) -> Inode:
        self._writable()
        self._check_name(name)
        inode = self.iget(ino)
        if stat.S_ISDIR(inode.mode):
            raise FSError(errno.EPERM)
        d = self._dir(parent)
        if d.nlink == 0:
            raise FSError(errno.ENOENT)
        if inode.nlink >= LINK_MAX:
            raise FSError(errno.EMLINK)
        if inode.nlink == 0:
            raise FSError(errno.ENOENT)
        if self.dirs.lookup(d, name) is not None:
            raise FSError(errno.EEXIST)
        self.dirs.add(d, name, ino, inode.mode >> 12)
        now = _now()
        inode.nlink += 1
        inode.parent = parent  # the hint: the directory of its newest name (format.py)
        inode.ctime_ns = now
        d.mtime_ns = d.ctime_ns = now
        self._dirty(inode)
        self._dirty(d)
        inode.lookups += 1
        return inode

    def unlink(self, parent: int, name: bytes, ctx: Ctx = ROOT) -> None:
        self._writable()
        d = self._dir(parent)
        found = self.dirs.lookup(d, name) if len(name) <= MAX_NAME else None
        if found is None:
            raise FSError(errno.ENAMETOOLONG if len(name) > MAX_NAME else errno.ENOENT)
        inode = self.iget(found[0])
        if stat.S_ISDIR(inode.mode):
            raise FSError(errno.EISDIR)
        self.dirs.remove(d, name)
        now = _now()
        d.mtime_ns = d.ctime_ns = now
        self._dirty(d)
        inode.ctime_ns = now
        self._drop_link(inode)

    def rmdir(self, parent: int, name: bytes, ctx: Ctx = ROOT) -> None:
        self._writable()
        if name == b".":
            raise FSError(errno.EINVAL)
        if name == b"..":
            raise FSError(errno.ENOTEMPTY)
        d = self._dir(parent)
        found = self.dirs.lookup(d, name) if len(name) <= MAX_NAME else None
        if found is None:
            raise FSError(errno.ENAMETOOLONG if len(name) > MAX_NAME else errno.ENOENT)
        inode = self.iget(found[0])
        if not stat.S_ISDIR(inode.mode):
            raise FSError(errno.ENOTDIR)
        if not self.dirs.is_empty(inode):
            raise FSError(errno.ENOTEMPTY)
        self.dirs.remove(d, name)
        now = _now()
        d.nlink -= 1
        d.mtime_ns = d.ctime_ns = now
        self._dirty(d)
        inode.nlink = 1
        inode.ctime_ns = now
        self._drop_link(inode)

    def _drop_link(self, inode: Inode) -> None:
        inode.nlink -= 1
        self._dirty(inode)
        if inode.nlink > 0:
            return
        if inode.lookups == 0 and ino_closed(self, inode.ino):
            self._destroy(inode)
        else:  # still in use: remember it, so a crash cannot leak it
            inode.flags |= ORPHAN_FLAG
            inode.orphan_next = self.sb.orphan_head
            self.sb.orphan_head = inode.ino
            self.sb_dirty = True

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """True if directory `anc` is `ino` or one of its ancestors."""
        seen = set()
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INO:
                return False
            if ino in seen:  # parents that loop (found by tests/t1_fuzz_core.py: a directory
                # that was its own parent made rename spin forever)
                raise FormatError(f"directory {ino}: its parents loop")
            seen.add(ino)
            ino = self.iget(ino).parent

    def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int = 0,
               ctx: Ctx = ROOT) -> None:
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
                RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FSError(errno.EINVAL)
        self._check_name(n_new)
        if n_old in (b".", b"..") or n_new in (b".", b".."):
            raise FSError(errno.EBUSY)
        dold = self._dir(p_old)
        dnew = self._dir(p_new)
        found = self.dirs.lookup(dold, n_old) if len(n_old) <= MAX_NAME else None
        if found is None:
            raise FSError(errno.ENOENT)
        src = self.iget(found[0])
        dst_found = self.dirs.lookup(dnew, n_new)
        dst = self.iget(dst_found[0]) if dst_found else None
        src_dir = stat.S_ISDIR(src.mode)
        now = _now()
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FSError(errno.ENOENT)
            if src.ino == dst.ino:
                return
            dst_dir = stat.S_ISDIR(dst.mode)
            if p_old != p_new:
                if src_dir and self._is_ancestor(src.ino, p_new):
                    raise FSError(errno.EINVAL)
                if dst_dir and self._is_ancestor(dst.ino, p_old):
                    raise FSError(errno.EINVAL)
                delta = int(src_dir) - int(dst_dir)
                if dnew.nlink + delta > LINK_MAX or dold.nlink - delta > LINK_MAX:
                    raise FSError(errno.EMLINK)
            self.dirs.replace(dold, n_old, dst.ino, dst.mode >> 12)
            self.dirs.replace(dnew, n_new, src.ino, src.mode >> 12)
            if p_old != p_new:
                src.parent = p_new  # (a file's parent is a hint: format.py)
                dst.parent = p_old
                delta = int(src_dir) - int(dst_dir)
                dold.nlink -= delta
                dnew.nlink += delta
            for x in (src, dst):
                x.ctime_ns = now
                self._dirty(x)
            for x in (dold, dnew):
                x.mtime_ns = x.ctime_ns = now
                self._dirty(x)
            return
        if dst is not None and flags & RENAME_NOREPLACE:
            raise FSError(errno.EEXIST)
        if src_dir and p_old != p_new and self._is_ancestor(src.ino, p_new):
            raise FSError(errno.EINVAL)
        if dst is not None:
            if dst.ino == src.ino:
                return  # both names are links to one file: POSIX says do nothing
            dst_dir = stat.S_ISDIR(dst.mode)
            if src_dir and not dst_dir:
                raise FSError(errno.ENOTDIR)
            if not src_dir and dst_dir:
                raise FSError(errno.EISDIR)
            if dst_dir and not self.dirs.is_empty(dst):
                raise FSError(errno.ENOTEMPTY)
            self.dirs.replace(dnew, n_new, src.ino, src.mode >> 12)
            dst.ctime_ns = now
            if dst_dir:
                dnew.nlink -= 1
                dst.nlink = 1
            self._drop_link(dst)
        else:
            if src_dir and p_old != p_new and dnew.nlink >= LINK_MAX:
                raise FSError(errno.EMLINK)
            self.dirs.add(dnew, n_new, src.ino, src.mode >> 12)
        self.dirs.remove(dold, n_old)
        if src_dir and p_old != p_new:
            src.parent = p_new
            dold.nlink -= 1
            dnew.nlink += 1
        elif not src_dir:
            src.parent = p_new  # the hint (format.py)
        src.ctime_ns = now
        self._dirty(src)
        for x in (dold, dnew):
            x.mtime_ns = x.ctime_ns = now
            self._dirty(x)

    # ================================================================= freeing inodes

    def _maybe_destroy(self, inode: Inode) -> None:
        """Free an inode once it has no names, no kernel references and no open files —
        unless the volume is not the core's to change: a read-only core (a secondary, a
        snapshot) only forgets it; a frozen one (see freeze) destroys it at thaw."""
        if inode.nlink or inode.lookups or not inode.mode or not ino_closed(self, inode.ino):
            return
        if self.readonly:
            if not inode.dirty:
                self.inodes.pop(inode.ino, None)
        elif self.frozen:
            self.deferred_destroy.add(inode.ino)
        else:
            self._destroy(inode)

    def _destroy(self, inode: Inode) -> None:
        """Free an inode with no names and no users, with all its blocks."""
        self.bmap.truncate(inode, 0, discard=not stat.S_ISREG(inode.mode))
        self.xattrs.free(inode)
        if inode.flags & ORPHAN_FLAG:
            self._unlist_orphan(inode)
        self._free_inode(inode)

    def _free_inode(self, inode: Inode) -> None:
        keep_gen = inode.generation
        fresh = Inode(inode.ino, generation=keep_gen)
        for f in ("mode", "uid", "gid", "nlink", "flags", "size", "blocks", "rdev",
                  "parent", "xattr", "orphan_next", "map"):
            setattr(inode, f, getattr(fresh, f))
        self._dirty(inode)
        self.alloc.free_inode(inode.ino)

    def _unlist_orphan(self, inode: Inode) -> None:
        if self.sb.orphan_head == inode.ino:
            self.sb.orphan_head = inode.orphan_next
        else:
            prev = self.iget(self.sb.orphan_head)
            seen = {prev.ino}
            while prev.orphan_next and prev.orphan_next != inode.ino:
                if prev.orphan_next in seen:  # a damaged list that loops (t1_fuzz_core)
                    raise FormatError("the orphan list is damaged (it loops)")
                prev = self.iget(prev.orphan_next)
                seen.add(prev.ino)
            prev.orphan_next = inode.orphan_next
            self._dirty(prev)
        inode.orphan_next = 0
        inode.flags &= ~ORPHAN_FLAG
        self.sb_dirty = True

    def _reap_orphans(self) -> None:
        """At mount: inodes unlinked while open before a crash or unmount are freed now."""
        ino = self.sb.orphan_head
        seen = set()
        while ino:
            if ino in seen:  # a damaged list that loops (t1_fuzz_core)
                raise FormatError("the orphan list is damaged (it loops)")
            seen.add(ino)
            inode = self.iget(ino)
            nxt = inode.orphan_next
            if inode.nlink == 0:
                self._destroy(inode)
            else:  # linked again (cannot happen today, but never free a named inode)
                self._unlist_orphan(inode)
            ino = nxt

    # ================================================================= extended attributes
    # Stored by Xattrs (repfs/fs/xattrs.py); limits as Linux, see format.py. The kernel
    # refuses names over 255 bytes (ERANGE) and values over 64 KiB (E2BIG) itself; pyfuse3
    # answers size probes and too-small buffers (ERANGE) from the value returned here.

    @staticmethod
    def _check_xname(name: bytes) -> None:
        if not name.startswith(XATTR_NAMESPACES):
            raise FSError(errno.EOPNOTSUPP)
        if name.endswith(b".") and name in XATTR_NAMESPACES:
            raise FSError(errno.EINVAL)
        if len(name) > XATTR_NAME_MAX:
            raise FSError(errno.ERANGE)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.find_xattr(ino, name)
        if value is None:
            raise FSError(errno.ENODATA)
        return value

    def find_xattr(self, ino: int, name: bytes) -> bytes | None:
        """getxattr, with None for an attribute that is not there (the FUSE adapter answers
        the kernel's security.capability question before every write without an exception
        chain)."""
        inode = self.iget(ino)
        self._check_xname(name)
        return self.xattrs.get(inode, name)

    def listxattr(self, ino: int, ctx: Ctx = ROOT) -> list[bytes]:
        names = self.xattrs.names(self.iget(ino))
        if ctx.uid != 0:  # as ext4: trusted.* is visible to privileged users only
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._writable()
        inode = self.iget(ino)
        self._check_xname(name)
        if len(value) > XATTR_SIZE_MAX:
            raise FSError(errno.E2BIG)
        self.xattrs.set(inode, name, value, flags)
        inode.ctime_ns = _now()
        self._dirty(inode)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        inode = self.iget(ino)
        self._check_xname(name)
        self.xattrs.remove(inode, name)
        inode.ctime_ns = _now()
        self._dirty(inode)


_FILE_TYPES = frozenset((stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                         stat.S_IFIFO, stat.S_IFSOCK))


def _check_inode(inode: Inode, sb: Superblock) -> None:
    """FormatError (EIO for the request) for an inode no file system operation wrote: its
    fields index the block map, the directory table and the xattr block, so a damaged one
    must stop here (tests/t1_fuzz_core.py: a size past the map's reach made reads alias lower
    offsets, a link count of 0 on a named inode went negative at the next unlink and failed
    the commit, an xattr pointer into the inode table would have had setxattr write over it).
    Block-map pointers are checked by BlockMap."""
    kind = stat.S_IFMT(inode.mode)
    links = 2 if kind == stat.S_IFDIR else 1  # at least, unless unlinked while open
    if (kind not in _FILE_TYPES or inode.size > MAX_FILE_SIZE
            or inode.nlink > LINK_MAX or (inode.nlink < links and not (
                inode.nlink == 0 and inode.flags & ORPHAN_FLAG))
            or (kind == stat.S_IFDIR and inode.size % BLOCK_SIZE)
            or (kind == stat.S_IFLNK and inode.size > MAX_SYMLINK)
            or (inode.xattr and not sb.data_start <= inode.xattr < sb.nblocks)):
        raise FormatError(f"inode {inode.ino} is damaged (mode {inode.mode:o}, size "
                          f"{inode.size}, {inode.nlink} links, xattr block {inode.xattr})")


def ino_closed(fs: FileSystem, ino: int) -> bool:
    return ino not in fs.open_count
