"""The running site: the file-system core, its FUSE adapter, the volume stack, and the verbs
the control port offers (status, snapshots). One instance per daemon; every method runs in
the daemon's trio run, and every snapshot operation happens at a consistency point."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import subprocess
import sys
import time

import pyfuse3
import trio

from .fs.core import FileSystem
from .fs.errors import FSError
from .fs.ops import Operations
from .site import Site
from .snap.diff import changed_paths
from .snap.layer import SnapLayer, SnapshotDevice
from .snap.store import SnapError

log = logging.getLogger(__name__)


class SiteService:
    def __init__(self, site: Site, ops: Operations, *, mountpoint: str, readonly: bool):
        self.site = site
        self.ops = ops
        self.mountpoint = mountpoint
        self.readonly = readonly
        self.started = time.time()
        self.snapshot_mounts: dict[str, dict] = {}  # name -> {"mountpoint", "process"}
        self.nursery: trio.Nursery | None = None

    @property
    def core(self) -> FileSystem:
        return self.ops.core

    @property
    def layer(self) -> SnapLayer:
        return self.core.dev

    @property
    def store(self):
        return self.layer.store

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        st = self.core.statfs()
        sb = self.core.sb
        snaps = [s.info() for s in self.store.queue]
        return {
            "site": str(self.site.path),
            "label": sb.label,
            "uuid": sb.uuid.hex(),
            "state": "mounted",
            "mountpoint": self.mountpoint,
            "readonly": self.readonly,
            "pid": os.getpid(),
            "volume_bytes": sb.nblocks * 4096,
            "used_bytes": (st["f_blocks"] - st["f_bfree"]) * 4096,
            "free_bytes": st["f_bfree"] * 4096,
            "inodes": st["f_files"],
            "free_inodes": st["f_ffree"],
            "format_version": sb.version,
            "commits": self.ops.commits,
            "snapshots": snaps,
            "save_used_bytes": self.store.usage(),
            "save_capacity_bytes": self.store.capacity,
            "snapshot_mounts": {n: m["mountpoint"] for n, m in self.snapshot_mounts.items()},
        }

    # ------------------------------------------------------------------ snapshots

    def _writable(self) -> None:
        if self.readonly:
            raise SnapError("the site is mounted read-only", 409)

    async def snapshot_create(self, name: str, attrs: dict | None = None) -> dict:
        self._writable()
        async with self.ops.quiesce():
            snap = self.store.create(name, attrs)
        log.info("snapshot %s (id %d) created", name, snap.id)
        return snap.info()

    def snapshot_list(self) -> list[dict]:
        return [s.info() for s in self.store.queue]

    async def snapshot_delete(self, name: str) -> dict:
        self._writable()
        snap = self.store.find(name)
        if name in self.snapshot_mounts:
            raise SnapError(f"snapshot {name!r} is mounted at "
                            f"{self.snapshot_mounts[name]['mountpoint']}; unmount it first", 409)
        async with self.ops.quiesce():
            moved = await trio.to_thread.run_sync(self.layer.delete, snap)
        log.info("snapshot %s deleted (%d before-images moved to the next older one)",
                 name, moved)
        return {"deleted": name, "moved_blocks": moved}

    async def snapshot_restore(self, name: str) -> dict:
        """Bring the live file system back to snapshot `name`, online."""
        self._writable()
        snap = self.store.find(name)
        t0 = time.monotonic()
        async with self.ops.quiesce():
            old = self.core
            known = {ino: (i.lookups, old.open_count.get(ino, 0))
                     for ino, i in old.inodes.items() if i.lookups or ino in old.open_count}
            old_names = self._known_names(old, known)
            await trio.to_thread.run_sync(old.checkpoint)  # the redo log must be empty
            self.store.set_state("restoring", snap.id.to_bytes(8, "big"))
            n = await trio.to_thread.run_sync(self.layer.restore, snap)
            self.store.set_state("restoring", None)
            new = FileSystem(self.layer, self.site.journal_path)
            for ino, (lookups, opened) in known.items():
                try:
                    inode = new.iget(ino)
                except FSError:
                    continue
                inode.lookups = lookups
                if opened:
                    new.open_count[ino] = opened
            self.ops.core = new
            await self._invalidate(known, old_names, new)
        log.info("restored snapshot %s: %d blocks in %.2f s", name, n, time.monotonic() - t0)
        return {"restored": name, "blocks": n, "seconds": round(time.monotonic() - t0, 3)}

    @staticmethod
    def _known_names(core: FileSystem, known) -> dict[int, set[bytes]]:
        """Names in the directories the kernel knows (so their cached entries can go)."""
        out = {}
        for ino in known:
            inode = core.inodes.get(ino)
            if inode is not None and inode.mode and inode.mode & 0o170000 == 0o040000:
                out[ino] = {h[1] for h in core.dirs.iter_from(inode, None)}
        return out

    async def _invalidate(self, known, old_names, new: FileSystem) -> None:
        for dino, names in old_names.items():
            try:
                d = new.iget(dino)
                names = names | {h[1] for h in new.dirs.iter_from(d, None)}
            except (FSError, OSError):
                pass
            for name in names:
                await trio.to_thread.run_sync(_invalidate_entry, dino, name)
        for ino in known:
            await trio.to_thread.run_sync(_invalidate_inode, ino)

    async def snapshot_diff(self, older: str, younger: str | None, *, paths: bool = True) -> dict:
        a = self.store.find(older)
        b = self.store.find(younger) if younger else None
        if b is not None and self.store.position(b) < self.store.position(a):
            raise SnapError(f"snapshot {older!r} is younger than {younger!r}; swap them")
        if b is None:  # against the live file system: its volume must hold what it shows
            async with self.ops.quiesce():
                result = await trio.to_thread.run_sync(self._diff, a, b, paths)
        else:
            result = await trio.to_thread.run_sync(self._diff, a, b, paths)
        return result

    def _diff(self, a, b, paths: bool) -> dict:
        changed = set()
        count = 0
        for page, acc in self.layer.changed_pages(a, b):
            meta = (self.layer.meta_page(b, page) if b is not None else
                    _live_meta(self.layer, page))
            idx = (acc & meta).nonzero()[0] + page * 32768
            count += len(idx)
            if paths:
                changed.update(idx.tolist())
        out = {"from": a.name, "to": b.name if b else "live", "changed_blocks": count}
        if paths:
            old_fs = FileSystem(SnapshotDevice(self.layer, a), None, readonly=True)
            new_fs = (FileSystem(SnapshotDevice(self.layer, b), None, readonly=True)
                      if b is not None else FileSystem(_LiveDevice(self.layer), None,
                                                       readonly=True))
            out["paths"] = changed_paths(old_fs, new_fs, changed)
        return out

    async def snapshot_mount(self, name: str, mountpoint: str) -> dict:
        from .daemon import MountError, check_mountpoint
        snap = self.store.find(name)
        if name in self.snapshot_mounts:
            raise SnapError(f"snapshot {name!r} is already mounted at "
                            f"{self.snapshot_mounts[name]['mountpoint']}", 409)
        try:
            mp = check_mountpoint(mountpoint)
        except MountError as e:
            raise SnapError(str(e)) from None
        sock_path = self.site.path / f".snap-{snap.id}-{secrets.token_hex(4)}.sock"
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(str(sock_path))
        listener.listen(4)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "repfs.snap.mountd", str(sock_path), mp,
             f"{self.site.path}@{name}", str(self.site.path / "repfs.log")],
            stdout=subprocess.PIPE)
        entry = {"mountpoint": mp, "process": proc}
        self.snapshot_mounts[name] = entry
        self.nursery.start_soon(self._serve_snapshot_mount, name, snap, listener, sock_path,
                                proc)
        # the child says "ok" or why it failed, on its stdout
        line = b""
        with trio.move_on_after(30):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(256)
                if not chunk:
                    break
                line += chunk
        msg = line.decode(errors="replace").strip()
        if msg != "ok":
            self.snapshot_mounts.pop(name, None)
            proc.kill()
            raise SnapError(f"cannot mount snapshot {name!r}: {msg or 'the mount helper died'}",
                            500)
        log.info("snapshot %s mounted at %s (pid %d)", name, mp, proc.pid)
        return {"mounted": name, "mountpoint": mp, "pid": proc.pid}

    async def _serve_snapshot_mount(self, name, snap, listener, sock_path, proc) -> None:
        """Serve block reads of one snapshot to its mount helper until it exits."""
        try:
            async with trio.open_nursery() as nursery:
                async def watch():
                    await proc.wait()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(watch)
                conn, _ = await listener.accept()
                stream = trio.SocketStream(conn)
                nursery.start_soon(self._block_server, stream, snap)
        finally:
            listener.close()
            try:
                os.unlink(sock_path)
            except OSError:
                pass
            self.snapshot_mounts.pop(name, None)
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.terminate()
                    with trio.move_on_after(10):
                        await proc.wait()
            log.info("snapshot %s unmounted", name)

    async def _block_server(self, stream, snap) -> None:
        from .snap.mountd import serve_requests
        await serve_requests(stream, lambda s, n: trio.to_thread.run_sync(
            self.layer.read_snapshot, snap, s, n))

    async def close_snapshot_mounts(self) -> None:
        for name, m in list(self.snapshot_mounts.items()):
            try:
                await trio.run_process(["fusermount3", "-u", "-z", m["mountpoint"]], check=False)
            except OSError:
                pass
            m["process"].terminate()


class _LiveDevice:
    """The live volume read through the snapped layer (inside a consistency point)."""

    block_size = 4096

    def __init__(self, layer: SnapLayer):
        self.layer = layer
        self.nblocks = layer.nblocks

    def read(self, start, count):
        return self.layer.read_live(start, count)

    def write(self, *a, **k):
        raise FSError(errno.EROFS)

    def flush(self):
        pass

    def close(self):
        pass


def _live_meta(layer: SnapLayer, page: int):
    import numpy as np
    raw = layer.read_live(layer.bitmap_start + page, 1)
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little").astype(bool)


def _invalidate_entry(dino: int, name: bytes) -> None:
    try:
        pyfuse3.invalidate_entry(dino, name)
    except (FileNotFoundError, OSError):
        pass


def _invalidate_inode(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(ino)
    except (FileNotFoundError, OSError):
        pass
