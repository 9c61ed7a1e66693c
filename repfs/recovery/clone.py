"""`repfs-admin --site SITE snapshot clone NAME NEWSITE [--label L]`: a new, independent,
writable site made from a snapshot, for disaster-recovery drills (issue 10, item 6), on a
primary while it replicates or on a secondary while it receives and plays.

The clone is built by the daemon of SITE, in a worker thread, while the site goes on serving:

1. checks (nothing made yet): the snapshot exists and is a user's (not replication's or a
   diff's pin: those go away by themselves); NEWSITE is an absolute path on this host whose
   parent exists, is not inside the site directory nor on the site's own mount (the daemon
   would write through itself) nor on one of its snapshot mounts, and is absent or an empty
   directory; the disk under it has room for the snapshot's valid blocks;
2. everything is built under ``NEWSITE.partial`` (flock()ed ``lock`` while it is built;
   ``clone-origin.json`` says where it comes from): a sparse ``volume.img`` of the same size
   holding only the blocks valid in the snapshot (its file system's block bitmap, read
   through the snapshot, ``SnapLayer.meta_page``), read with ``read_snapshot`` in runs of up
   to 1 MiB — holes elsewhere; block 0 stays zero meanwhile;
3. an empty redo log and a default ``site.toml`` as ``repfs mkfs`` makes them (no
   ``meta.lmdb``: the first mount makes it, so the clone is a primary of generation 1, with no
   destinations and no snapshots);
4. the image is synced, then the superblock is written with a **new volume uuid** (a new
   lineage: a clone can never be taken for a replica of SITE, whose peers check the uuid) and
   the label given, and synced; the directory is synced, renamed to NEWSITE (over an empty
   directory, if one was there) and the parent synced. Only then does the verb answer.

A failure or cancellation removes ``NEWSITE.partial``. A crash leaves it: its name says it is
incomplete and, until step 4, its image has no superblock, so nothing mounts it
(``repfs mount`` says "not a repfs volume"); the next clone into NEWSITE removes such a
leftover (it has ``clone-origin.json`` and nobody holds its lock). The snapshot cannot be
deleted while a clone reads it (`snapshot delete` refuses). Copy-on-write keeps the snapshot
exactly as it was while writers (or playback) go on: the clone reads it as a snapshot mount
would.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid as uuidlib
from pathlib import Path

import numpy as np
import trio

from ..errors import DomainError
from ..extents import runs
from ..fs.format import Superblock
from ..fs.journal import Journal
from ..site import Site
from ..snap.keys import BITS_PER_PAGE
from ..statefile import fsync_dir, write_durably
from ..volume import BLOCK_SIZE as BS, Volume

log = logging.getLogger(__name__)

PIECE = 256  # blocks read through the snapshot at a time (1 MiB: the layer's lock is held)
PROGRESS_EVERY = 5.0  # seconds between progress lines in the log
ROOM = 16 << 20  # bytes beyond the valid blocks the clone needs (redo log, meta.lmdb, ...)
PARTIAL = ".partial"
ORIGIN = "clone-origin.json"
_INTERNAL = ("delta set", "diff", "verify", "initial copy")  # snapshots' purposes


class CloneError(DomainError):
    """A clone cannot be made as asked (one line for the user)."""


def _size(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} bytes"


def check_label(label) -> str | None:
    if label is None:
        return None
    if not isinstance(label, str) or len(label.encode()) > 64 or not label.isprintable():
        raise CloneError(f"bad label {label!r}: at most 64 bytes of printable UTF-8")
    return label


class Cloner:
    """The clones a site's daemon is making (one object per daemon: `svc.cloner`)."""

    def __init__(self, svc):
        self.svc = svc
        self.running: dict[Path, str] = {}  # NEWSITE.partial -> the snapshot it is read from
        self._held: collections.Counter = collections.Counter()  # snapshot -> clones of it

    def holds(self, name: str) -> bool:
        """Whether a clone is reading snapshot `name` now (it cannot be deleted meanwhile)."""
        return self._held[name] > 0

    async def clone(self, name: str, newsite: str, label: str | None = None) -> dict:
        svc = self.svc
        label = check_label(label)
        snap = svc.store.find(name)
        if name.startswith("repl-") or snap.attrs.get("purpose") in _INTERNAL:
            raise CloneError(f"snapshot {name!r} is internal (replication's or a diff's) and "
                             f"goes away by itself; take one of your own (snapshot create) "
                             f"and clone that")
        if snap.state != "ok":
            raise CloneError(f"snapshot {name!r} is being deleted", "conflict")
        self._held[name] += 1  # (from here on `snapshot delete` refuses it)
        try:
            return await self._clone(snap, newsite, label)
        finally:
            self._held[name] -= 1
            if not self._held[name]:
                del self._held[name]

    async def _clone(self, snap, newsite: str, label: str | None) -> dict:
        name = snap.name
        mounts = {"the site's own mount": self.svc.mountpoint,  # (read here, not in a thread)
                  **{f"the mount of snapshot {n}": m
                     for n, m in self.svc.mounts.mountpoints().items()}}
        target, partial = await trio.to_thread.run_sync(self._check, snap, newsite, mounts)
        if partial in self.running:
            raise CloneError(f"a clone into {target} is under way", "conflict")
        self.running[partial] = name
        stop = threading.Event()
        done = threading.Event()
        box: dict = {}

        def work():
            try:
                box["value"] = self._build(snap, target, partial, label, stop)
            except BaseException as e:  # noqa: BLE001 - handed to the trio task
                box["error"] = e
            finally:
                done.set()
        try:
            try:
                await trio.to_thread.run_sync(work, abandon_on_cancel=True)
            except trio.Cancelled:
                log.info("clone of snapshot %s into %s cancelled: stopping", name, target)
                stop.set()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(done.wait)
                raise
        finally:
            self.running.pop(partial, None)
        if "error" in box:
            e = box["error"]
            log.info("clone of snapshot %s into %s failed: %s (nothing left behind)", name,
                     target, e)
            raise e
        out = box["value"]
        log.info("cloned snapshot %s into %s: %d blocks (%s) in %.2f s, volume uuid %s",
                 name, target, out["blocks"], _size(out["bytes"]), out["seconds"], out["uuid"])
        return out

    # ------------------------------------------------------------------ checks

    def _check(self, snap, newsite: str, mounts: dict[str, str]) -> tuple[Path, Path]:
        """(NEWSITE, NEWSITE.partial), or CloneError. In a worker thread: the paths may lie
        on FUSE mounts (our own included, which the trio loop serves)."""
        svc = self.svc
        if not isinstance(newsite, str) or not newsite.startswith("/") or "\0" in newsite:
            raise CloneError(f"bad NEWSITE {newsite!r}: want an absolute path")
        p = Path(os.path.normpath(newsite))
        if p.name in ("", ".", ".."):
            raise CloneError(f"bad NEWSITE {newsite!r}: want the path of a new directory")
        if len((p.name + PARTIAL).encode(errors="surrogateescape")) > 255:
            raise CloneError(f"bad NEWSITE {newsite!r}: its name is too long")
        try:
            parent = Path(os.path.realpath(p.parent, strict=True))
        except OSError:
            raise CloneError(f"cannot clone into {p}: its parent directory {p.parent} does "
                             f"not exist") from None
        if not parent.is_dir():
            raise CloneError(f"cannot clone into {p}: {p.parent} is not a directory")
        target = parent / p.name
        site = svc.site.path
        if target == site or site in target.parents:
            raise CloneError(f"cannot clone into {p}: it is inside the site {site}")
        pdev = os.stat(parent).st_dev
        for what, m in mounts.items():
            m = Path(m)
            try:
                on = (target == m or m in target.parents  # (below: reached by a symlink)
                      or (os.path.ismount(m) and os.stat(m).st_dev == pdev))
            except OSError:
                on = target == m or m in target.parents
            if on:
                raise CloneError(f"cannot clone into {p}: it is on {what} ({m}); the clone "
                                 f"must be a directory of the host's own file systems")
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise CloneError(f"cannot clone into {p}: it exists and is not a directory")
        if target.exists():
            with os.scandir(target) as it:
                if next(it, None) is not None:
                    raise CloneError(f"cannot clone into {p}: it exists and is not empty",
                                     "conflict")
        partial = parent / (p.name + PARTIAL)
        if partial in self.running:
            raise CloneError(f"a clone into {p} is under way", "conflict")
        if os.path.lexists(partial):
            if not partial.is_dir() or partial.is_symlink() or not (partial / ORIGIN).exists():
                raise CloneError(f"cannot clone into {p}: {partial} exists and is not a "
                                 f"clone's leftover (remove it or pick another name)",
                                 "conflict")
            if Site(partial).in_use():
                raise CloneError(f"a clone into {p} is under way (by another process)",
                                 "conflict")
            log.info("removing %s, left by a clone that did not finish", partial)
            shutil.rmtree(partial)
            fsync_dir(parent)
        sb = Superblock.unpack(svc.layer.read_snapshot(snap, 0, 1))
        # (an upper bound: the superblock counts the whole inode table as in use)
        used = sb.nblocks - sb.free_blocks
        st = os.statvfs(parent)
        free = st.f_bavail * st.f_frsize
        need = used * BS + ROOM
        if free < need:
            raise CloneError(f"not enough space in {parent} for the clone: it needs "
                             f"{_size(need)} (the snapshot's valid blocks), {_size(free)} "
                             f"free", "conflict")
        return target, partial

    # ------------------------------------------------------------------ the copy

    def _build(self, snap, target: Path, partial: Path, label: str | None,
               stop: threading.Event) -> dict:
        t0 = time.monotonic()
        layer = self.svc.layer
        nblocks = layer.nblocks
        lock_fd = vol = None
        made = renamed = False
        try:
            try:
                partial.mkdir(mode=0o700)
            except FileExistsError:
                raise CloneError(f"a clone into {target} is under way", "conflict") from None
            made = True
            lock_fd = os.open(partial / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            write_durably(partial / ORIGIN, json.dumps({
                "site": str(self.svc.site.path), "snapshot": snap.name,
                "snapshot_created": snap.info()["created"],
                "cloned": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=1) + "\n", 0o644)
            fsync_dir(partial.parent)  # (the leftover is found after a crash)
            vol = Volume.create(partial / "volume.img", nblocks)
            sb = Superblock.unpack(layer.read_snapshot(snap, 0, 1))
            copied = self._copy(snap, vol, nblocks, target, stop)
            stale = Journal(partial / "journal")  # an empty redo log, as mkfs leaves it
            stale.clear()
            stale.close()
            # the name in site.toml: the label, else NEWSITE's (not NEWSITE.partial's)
            Site(partial).write_default_config(label or target.name)
            os.fsync(vol.fd)  # every block before the superblock that makes it a volume
            sb.uuid = uuidlib.uuid4().bytes
            if label is not None:
                sb.label = label
            vol.write(0, sb.pack())
            os.fsync(vol.fd)
            vol.close()
            vol = None
            fsync_dir(partial)
            if stop.is_set():
                raise CloneError("the clone was cancelled", "failed")
            try:
                os.rename(partial, target)  # (over an empty directory: rename(2) may)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise CloneError(f"cannot clone into {target}: it was made meanwhile "
                                     f"and is not empty", "conflict") from None
                raise
            renamed = True
            fsync_dir(target.parent)
            return {"clone": str(target), "snapshot": snap.name, "uuid": sb.uuid.hex(),
                    "label": sb.label, "blocks": copied, "bytes": copied * BS,
                    "size_bytes": nblocks * BS, "seconds": round(time.monotonic() - t0, 3)}
        except OSError as e:
            what = f" ({e.filename})" if e.filename else ""
            raise CloneError(f"cannot make the clone {target}: {e.strerror or e}{what}",
                             "failed") from None
        finally:  # (closes may fail too, on a failing disk: the first error is the one told)
            try:
                if vol is not None:
                    vol.close()
            except OSError:
                pass
            try:
                if lock_fd is not None:
                    os.close(lock_fd)
            except OSError:
                pass
            if made and not renamed:  # ours (made by this call): leave nothing behind
                shutil.rmtree(partial, ignore_errors=True)
                try:
                    fsync_dir(partial.parent)
                except OSError:
                    pass

    def _copy(self, snap, vol: Volume, nblocks: int, target: Path,
              stop: threading.Event) -> int:
        """Write the snapshot's valid blocks but block 0 into `vol`, in block order, a run at
        a time (holes elsewhere). Returns the blocks copied, block 0 included."""
        layer = self.svc.layer
        npages = -(-nblocks // BITS_PER_PAGE)

        def valid(page: int) -> np.ndarray:
            """The blocks of bitmap page `page` in use in the snapshot."""
            if snap not in layer.store.queue:
                raise CloneError(f"snapshot {snap.name!r} was deleted during the clone",
                                 "conflict")
            try:
                return layer.meta_page(snap, page)[:nblocks - page * BITS_PER_PAGE]
            except ValueError:  # (store.position: it left the queue since the check above)
                raise CloneError(f"snapshot {snap.name!r} was deleted during the clone",
                                 "conflict") from None
        # the exact count, for the progress lines (the superblock's is an upper bound)
        total = sum(int(np.count_nonzero(valid(p))) for p in range(npages))
        log.info("cloning snapshot %s into %s: %d blocks in use (%s)", snap.name, target,
                 total, _size(total * BS))
        copied = 0
        last = time.monotonic()
        for page in range(npages):
            base = page * BITS_PER_PAGE
            for _, first, c in runs(np.flatnonzero(valid(page))):
                s = base + first
                while c:
                    if stop.is_set():
                        raise CloneError("the clone was cancelled", "failed")
                    m = min(c, PIECE)
                    data = layer.read_snapshot(snap, s, m)
                    if s == 0:  # the superblock is written last, with the new uuid
                        data = data[BS:]
                        if m > 1:
                            vol.write(1, data)
                    else:
                        vol.write(s, data)
                    copied += m
                    s += m
                    c -= m
                    now = time.monotonic()
                    if now - last >= PROGRESS_EVERY:
                        last = now
                        log.info("clone of snapshot %s into %s: %d of %d blocks (%.0f%%)",
                                 snap.name, target, copied, total,
                                 100.0 * copied / max(total, 1))
        return copied
