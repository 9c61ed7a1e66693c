"""Kernel-cache invalidation around a change of the volume underneath the file system
(playback at a secondary, snapshot restore): hold every request, apply the change, re-read the
file system and drop exactly the kernel caches the change made stale."""

from __future__ import annotations

import stat

import numpy as np
import pyfuse3
import trio

from .core import FileSystem
from .errors import FSError
from .format import FormatError


async def volume_changes(ops, apply, prepare):
    """Run `apply` (in a worker thread) while every request is held back — it changes the
    volume underneath the file system (playback, restore) — then re-read the file system
    and drop exactly the kernel caches that the change touched: inodes the kernel knows
    whose records changed, and the names of the known directories that changed.
    `prepare` runs first (in a worker thread, after the commit) and returns the extents
    the change will write ((start, count) list; None: anything)."""
    async with ops.hold_all():
        core = ops.core
        extents = await trio.to_thread.run_sync(prepare)
        watch = InvalidationPlan(core, extents)
        try:
            result = await trio.to_thread.run_sync(apply)
        finally:  # a failed change may have written part of the volume: never serve stale
            core.reload()
            entries, inodes = watch.finish(core)
    await trio.to_thread.run_sync(invalidate_all, entries, inodes)
    return result


class InvalidationPlan:
    """What the kernel may have cached that a change of the volume can make stale."""

    def __init__(self, core: FileSystem, extents):
        self.known = [ino for ino, i in core.inodes.items()
                      if i.mode and (i.lookups or ino in core.open_count or ino == 1)]
        if 1 not in core.inodes:  # the root: the kernel always holds it
            core.iget(1)
            self.known.append(1)
        self.before = {ino: _signature(core.inodes[ino]) for ino in self.known}
        if extents is None:
            touched = lambda blk: True  # noqa: E731
        else:
            starts = np.array(sorted(s for s, _ in extents), dtype=np.int64)
            ends = np.array([s + c for s, c in sorted(extents)], dtype=np.int64)

            def touched(blk):
                i = int(np.searchsorted(starts, blk, side="right")) - 1
                return i >= 0 and blk < ends[i]
        self.names = {}
        for ino in self.known:
            inode = core.inodes[ino]
            if stat.S_ISDIR(inode.mode) and touched(core._inode_pos(ino)[0]):
                self.names[ino] = {h[1] for h in core.dirs.iter_from(inode, None)}

    def finish(self, core: FileSystem):
        inodes, entries = [], []
        for ino in self.known:
            try:
                after = _signature(core.iget(ino))
            except (FSError, FormatError):  # gone, or damaged in the volume as it now is
                after = None
            if after != self.before[ino]:
                inodes.append(ino)
                if ino in self.names:
                    names = set(self.names[ino])
                    if after is not None and stat.S_ISDIR(after[0]):
                        names |= {h[1] for h in core.dirs.iter_from(core.iget(ino), None)}
                    entries.extend((ino, n) for n in names)
        return entries, inodes


def _signature(inode) -> tuple:
    return (inode.mode, inode.size, inode.mtime_ns, inode.ctime_ns, inode.nlink, inode.uid,
            inode.gid, inode.generation)


def invalidate_all(entries, inodes) -> None:
    """Drop kernel caches (in a worker thread: the kernel may call back into us)."""
    for dino, name in entries:
        try:
            pyfuse3.invalidate_entry(dino, name)
        except OSError:
            pass
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError:
            pass
