"""The pyfuse3 adapter: a thin map from FUSE requests onto the FileSystem core.

Domain errors (FSError) become FUSEError here, in one place; anything else is a bug and is
left to bring the file system down. The adapter owns the concurrency around the core: the
group commit (the slow part runs in a worker thread while requests go on), and ``quiesce()``,
which holds back modifying requests, commits, and hands its caller a volume that holds a
consistent file system (invariant 2: snapshots and delta sets are taken inside it).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from contextlib import asynccontextmanager

import pyfuse3
import trio

from ..common import Latencies
from .core import FileSystem
from ..tasks import Supervisor
from ..volume import VolumeError
from .errors import FSError
from .format import FormatError

log = logging.getLogger(__name__)


def _fuse_errors(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        if not self._hold.is_set():  # a playback or restore is changing the volume
            await self._hold.wait()
        try:
            try:
                return await fn(self, *args, **kwargs)
            except FSError as e:
                # Space freed by this transaction (truncate, unlink) is usable only after its
                # commit: commit at once and try again, as ext4 does.
                if e.errno != errno.ENOSPC or not self.core.alloc.pending:
                    raise
                await self.commit()
                return await fn(self, *args, **kwargs)
        except FSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except (VolumeError, OSError, FormatError) as e:
            # damaged metadata or a failing disk: this request fails, the file system stays
            # up; the host file system being full is ENOSPC for the caller too
            _log_request_error(self, fn.__name__, e)
            full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise pyfuse3.FUSEError(e.errno if full else errno.EIO) from None
    return wrapper


def _log_request_error(ops, name: str, e: BaseException) -> None:
    """Log a failed request, each distinct error at most once a minute (a failing disk
    fails every request that touches it)."""
    seen = ops.request_errors
    key = f"{type(e).__name__}: {e}"
    now = time.monotonic()
    if now - seen.get(key, -1e9) < 60:
        return
    if len(seen) > 64:
        seen.clear()
    seen[key] = now
    log.error("%s failed: %s (the same error is logged at most once a minute)", name, e)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_acl = False
    HELD_LIMIT = 64 << 20  # see _maybe_flush_held
    RELEASE_TASK = "release-held"  # the supervised task that releases held writes behind
    # a cut_point whose running transaction has more dirty inodes than this commits it first,
    # before the gate closes (packing an inode may read its table block from the volume)
    CUT_PRECOMMIT_INODES = 64

    def __init__(self, core: FileSystem, *, writeback_cache: bool = False,
                 cache_timeout: float = 5.0):
        super().__init__()
        self.core = core
        self.enable_writeback_cache = writeback_cache
        core.kernel_times = writeback_cache  # the kernel then keeps mtime/ctime of files
        self.timeout = cache_timeout
        self.commit_lock = trio.Lock()
        self.quiesce_lock = trio.Lock()
        self._gate = trio.Event()
        self._gate.set()
        self._hold = trio.Event()
        self._hold.set()
        self.commits = 0
        self.commit_latency = Latencies()  # group commits' durations (/metrics)
        self.gate_ms = 0.0  # how long the last quiesce held modifying requests back
        self._direct_files: set[int] = set()  # see _keep_cache
        self.request_errors: dict[str, float] = {}  # error -> when last logged (at most 65)
        self._initialized = trio.Event()  # set by init(): the kernel has sent FUSE_INIT
        # the release of held writes behind the writer: a supervised task (RELEASE_TASK),
        # started at its first need and woken by writers past HELD_LIMIT; the daemon's
        # SiteService puts its own supervisor here, so status shows the task and its errors
        self.supervisor = Supervisor()
        self._release_wake: trio.Event | None = None
        # releases of held writes past HELD_LIMIT since the mount (status "held_releases"):
        # behind the writer, and by a writer that waited for them (past twice the limit)
        self.held_releases = {"behind": 0, "waited": 0}

    # ------------------------------------------------------------------ the mount

    # The mount's readahead (the kernel's FUSE default is 128 KiB). A cold sequential read
    # costs one READ request round trip per readahead window; 512 KiB read 128 MiB cold
    # 1.05-2.1x faster than 128 KiB on this 2-core machine, and 1 MiB was slower than 512 KiB
    # (docs/performance.md, "Small I/O"). Random reads are not affected: the kernel reads ahead
    # only for sequential access.
    READ_AHEAD_KB = 512

    def init(self) -> None:
        """pyfuse3 calls this while it answers the kernel's FUSE_INIT."""
        self._initialized.set()

    async def tune_readahead(self, mountpoint: str) -> None:
        """Set this mount's readahead to READ_AHEAD_KB, once the kernel has the INIT reply
        (which sets it). Best effort: only root may, and a failure changes nothing else."""
        await self._initialized.wait()
        try:
            # a GETATTR to ourselves: not on the trio thread, and never holding up an unmount
            st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
            path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
            await trio.to_thread.run_sync(_write_text, path, f"{self.READ_AHEAD_KB}\n")
        except OSError as e:
            log.debug("readahead of %s left at the kernel's default: %s", mountpoint, e)

    # ------------------------------------------------------------------ consistency points

    async def _modifying(self) -> None:
        """Wait while a consistency point holds modifying requests back."""
        if not self._gate.is_set():
            await self._gate.wait()

    async def commit(self) -> None:
        """Group commit: every change made so far becomes durable when this returns."""
        async with self.commit_lock:
            await self._commit_locked()

    async def _commit_locked(self) -> None:
        """One commit; the caller holds commit_lock. The sync runs in a worker thread."""
        txn = self.core.prepare_commit()
        if txn is None:
            return
        t0 = time.monotonic()
        await trio.to_thread.run_sync(self.core.write_commit, txn)
        self.core.finish_commit()
        self.commits += 1
        self.commit_latency.add(time.monotonic() - t0)

    async def _maybe_commit(self) -> None:
        if self.core.commit_due() and not self.commit_lock.locked():
            await self.commit()

    async def checkpoint(self) -> None:
        """Commit, then make the volume alone hold the file system: the volume flushed and the
        redo log empty. A consistency point includes this, so no redo-log replay after a crash
        can write through a snapshot or a delta-set boundary taken at it (replaying the last
        commit's blocks would otherwise save stale blocks as a new snapshot's before-images)."""
        await self.commit()
        async with self.commit_lock:
            await self._commit_locked()  # blocks released from quarantine by that commit
            if not self.core.readonly:
                await trio.to_thread.run_sync(self.core.clear_journal)

    @asynccontextmanager
    async def quiesce(self):
        """Block new modifying requests, commit and checkpoint, and yield the consistent
        volume. A first checkpoint runs before the gate closes (writers go on): the one
        under the gate then has only the last moments' changes to sync, which keeps the
        writers' stall short under a heavy write load (a delta-set cut every few seconds)."""
        async with self.quiesce_lock:
            if not self.core.readonly:
                await self.checkpoint()
            self._gate = trio.Event()
            t0 = time.monotonic()
            try:
                await self.checkpoint()
                yield self.core.dev
            finally:
                self._gate.set()
                self.gate_ms = (time.monotonic() - t0) * 1000

    async def cut_point(self, cut, written, durable, prepare=None):
        """A consistency point whose syncs run after the gate opens (a delta-set cut: the
        writers' stall is the in-memory part and `cut`'s one LMDB commit, not a sync of the
        volume under a saturating write load).

        With the commit lock taken first (a group commit in flight ends while writers go
        on; a running transaction of more than CUT_PRECOMMIT_INODES inodes is committed
        then too), the gate closes and the running transaction is closed (prepare_commit: its
        blocks in memory, nothing written). `cut(blocks)` runs in a worker thread with
        writers held: it records the boundary, `blocks` (the transaction's metadata block
        numbers, not yet in the volume) included, and returns a token. Then the gate
        opens; the commit lock stays held, so no other commit runs until the boundary is
        durable: the transaction is committed (volume flushed, redo record, its blocks
        written), `written(token)` runs, the redo log is emptied (the volume flushed again:
        no replay after a crash can write through the boundary), then `durable(token)`
        runs in a worker thread. If `cut` fails, the transaction is still committed and
        the error raised. `prepare()`, if given, runs in a worker thread before the gate
        closes (with both locks held: I/O the cut needs that does not depend on the
        boundary)."""
        async with self.quiesce_lock, self.commit_lock:
            if len(self.core.dirty_inodes) > self.CUT_PRECOMMIT_INODES:
                await self._commit_locked()  # writers go on; the gate packs only the rest
            if prepare is not None:
                await trio.to_thread.run_sync(prepare)
            self._gate = trio.Event()
            t0 = time.monotonic()
            txn = None
            try:
                txn = self.core.prepare_commit()
                token = await trio.to_thread.run_sync(cut, sorted(txn[1]) if txn else [])
            except BaseException:
                self._gate.set()
                self.gate_ms = (time.monotonic() - t0) * 1000
                if txn is not None:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self.core.write_commit, txn)
                        self.core.finish_commit()
                raise
            self._gate.set()
            self.gate_ms = (time.monotonic() - t0) * 1000
            with trio.CancelScope(shield=True):  # (a prepared transaction is committed)
                if txn is not None:
                    await trio.to_thread.run_sync(self.core.write_commit, txn)
                    try:
                        written(token)
                    finally:
                        self.core.finish_commit()
                        self.commits += 1
                else:
                    written(token)
                if not self.core.readonly:
                    await trio.to_thread.run_sync(self.core.clear_journal)
                await trio.to_thread.run_sync(durable, token)

    @asynccontextmanager
    async def hold_all(self):
        """Hold back every request (reads too) while the volume changes underneath; the
        file system is then re-read. Used by playback at a secondary and by restore. While
        held, no inode is destroyed (a forget or release only defers it): the volume the
        caller is changing is not the core's to write."""
        async with self.quiesce_lock:
            self._gate = trio.Event()
            self._hold = trio.Event()
            try:
                await self.checkpoint()
                self.core.freeze()
                try:
                    yield
                finally:
                    self.core.thaw()
            finally:
                self._hold.set()
                self._gate.set()

    # ------------------------------------------------------------------ attributes

    def _entry(self, inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode.ino
        e.generation = inode.generation
        e.st_mode = inode.mode
        e.st_nlink = inode.nlink
        e.st_uid = inode.uid
        e.st_gid = inode.gid
        e.st_rdev = inode.rdev
        e.st_size = inode.size
        e.st_blksize = 4096
        e.st_blocks = inode.blocks * 8
        e.st_atime_ns = inode.atime_ns
        e.st_mtime_ns = inode.mtime_ns
        e.st_ctime_ns = inode.ctime_ns
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        return e

    # ------------------------------------------------------------------ queries

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        return self._entry(self.core.lookup(parent_inode, name, ctx))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            try:
                self.core.forget(ino, n)
            except Exception:  # forget must never fail
                log.exception("forget(%d, %d) failed", ino, n)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._entry(self.core.getattr(inode))

    @_fuse_errors
    async def readlink(self, inode, ctx):
        return self.core.readlink(inode)

    @_fuse_errors
    async def opendir(self, inode, ctx):
        self.core._dir(inode)
        return inode

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        for name, inode, nxt in self.core.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(inode), nxt):
                break
            if name != b"." and name != b"..":
                inode.lookups += 1

    async def releasedir(self, fh):
        pass

    @_fuse_errors
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        for k, v in self.core.statfs().items():
            setattr(s, k, v)
        return s

    @_fuse_errors
    async def access(self, inode, mode, ctx):
        return self.core.access(inode, mode, ctx)

    async def getxattr(self, inode, name, ctx):
        # The kernel asks for security.capability before every write(2) (file_remove_privs;
        # FUSE_HANDLE_KILLPRIV_V2 would stop it, which libfuse 3.14 cannot request): answer
        # a file without attributes here, without the request wrapper and the core's checks.
        i = self.core.inodes.get(inode)
        if i is not None and not i.xattr and name == b"security.capability" \
                and self._hold.is_set():
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._getxattr(inode, name, ctx)

    @_fuse_errors
    async def _getxattr(self, inode, name, ctx):
        value = self.core.find_xattr(inode, name)
        if value is None:  # asked before every write (security.capability): no FSError chain
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_fuse_errors
    async def listxattr(self, inode, ctx):
        return self.core.listxattr(inode, ctx)

    # ------------------------------------------------------------------ changes

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        await self._modifying()
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        if fields.update_ctime:
            kw["ctime_ns"] = attr.st_ctime_ns
        e = self._entry(self.core.setattr(inode, ctx=ctx, **kw))
        await self._maybe_commit()
        return e

    @_fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        await self._modifying()
        return self._entry(self.core.mknod(parent_inode, name, mode, rdev, ctx))

    @_fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        await self._modifying()
        e = self._entry(self.core.mkdir(parent_inode, name, mode, ctx))
        await self._maybe_commit()
        return e

    @_fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        await self._modifying()
        return self._entry(self.core.symlink(parent_inode, name, target, ctx))

    @_fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        await self._modifying()
        return self._entry(self.core.link(inode, new_parent_inode, new_name, ctx))

    @_fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        await self._modifying()
        self.core.unlink(parent_inode, name, ctx)
        await self._maybe_commit()

    @_fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self._modifying()
        self.core.rmdir(parent_inode, name, ctx)
        await self._maybe_commit()

    @_fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._modifying()
        self.core.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)
        await self._maybe_commit()

    @_fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        await self._modifying()
        self.core.setxattr(inode, name, value)
        await self._maybe_commit()  # a 64 KiB value dirties 16 blocks: keep commits bounded

    @_fuse_errors
    async def removexattr(self, inode, name, ctx):
        await self._modifying()
        self.core.removexattr(inode, name)
        await self._maybe_commit()

    # ------------------------------------------------------------------ files

    def _keep_cache(self, ino: int, flags: int) -> bool:
        """Whether this open keeps the kernel's page cache of the file. Not for a file ever
        opened with O_DIRECT in this mount: direct writes bypass the cache, and a buffered
        reader racing them can leave pages holding data from before a write; an open that
        kept the cache would serve those to every later reader. (One int per such file.)"""
        if flags & os.O_DIRECT:
            self._direct_files.add(ino)
        return not flags & os.O_TRUNC and ino not in self._direct_files

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            await self._modifying()
        self.core.open(inode, flags, ctx)
        return pyfuse3.FileInfo(fh=inode, keep_cache=self._keep_cache(inode, flags))

    @_fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        await self._modifying()
        inode = self.core.create(parent_inode, name, mode, ctx)
        e = self._entry(inode)
        await self._maybe_commit()
        return pyfuse3.FileInfo(fh=inode.ino, keep_cache=self._keep_cache(inode.ino, flags)), e

    @_fuse_errors
    async def read(self, fh, off, size):
        return self.core.read(fh, off, size)

    @_fuse_errors
    async def write(self, fh, off, buf):
        await self._modifying()
        n = self.core.write(fh, off, buf)
        await self._maybe_commit()
        await self._maybe_flush_held()
        return n

    async def _maybe_flush_held(self) -> None:
        """The volume stack holds writes in memory until a flush (copy-on-write keeps data
        from overwriting a block before its before-image is durable): past HELD_LIMIT, flush
        in a worker thread; past twice that, this writer waits for it (bounded memory)."""
        held = self.core.dev.pending_bytes()
        if held < self.HELD_LIMIT:
            return
        if held < 2 * self.HELD_LIMIT:
            # the writer goes on while the flush syncs the save volumes (issue 8: waiting
            # for each 64 MiB of before-images to reach the disk serialized the disk's
            # work with the writer's)
            if not self.commit_lock.locked():
                if self._release_wake is None:  # the first time: start the task
                    self._release_wake = trio.Event()
                    trio.lowlevel.spawn_system_task(self.supervisor.run, self.RELEASE_TASK,
                                                    self._release_held_behind)
                self._release_wake.set()
            return
        if await self._release_held():
            self.held_releases["waited"] += 1

    async def _release_held(self) -> bool:
        """Release the held writes (in a worker thread, no commit running) if they are still
        past HELD_LIMIT when the commit lock is ours. True if it released them."""
        async with self.commit_lock:
            if self.core.dev.pending_bytes() >= self.HELD_LIMIT:
                await trio.to_thread.run_sync(self.core.dev.release_held)
                return True
        return False

    async def _release_held_behind(self) -> None:
        """_release_held for _maybe_flush_held, behind the writer, each time a writer wakes
        it. Runs under the supervisor: a failure is shown in status, logged once per
        distinct error and the task restarted after a back-off (the writers' wakes wait for
        it). The layer that failed refuses every later flush itself (a failed save-volume
        sync is final), so the next commit turns the file system read-only."""
        while True:
            await self._release_wake.wait()
            self._release_wake = trio.Event()
            if await self._release_held():
                self.held_releases["behind"] += 1
                self.supervisor.ok(self.RELEASE_TASK)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        self.core.release(fh)

    @_fuse_errors
    async def fsync(self, fh, datasync):
        if datasync:
            async with self.commit_lock:
                if self.core.data_only():  # overwrites and timestamps only: no redo record
                    await trio.to_thread.run_sync(self.core.sync_data)
                    return
                await self._commit_locked()
            return
        await self.commit()

    @_fuse_errors
    async def fsyncdir(self, fh, datasync):
        await self.commit()


