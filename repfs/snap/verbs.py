"""The snapshot verbs of a running site (create, list, delete, restore, diff), each at a
consistency point of the live file system. `svc` is the site service: it owns the FUSE
adapter (for quiesce), the snapped layer, the store and the change log on top."""

from __future__ import annotations

import logging
import time

import trio

from ..fs.core import FileSystem
from ..fs.invalidate import volume_changes
from .diff import changed_paths
from ..volume import ReadOnlyDevice
from .layer import SnapshotDevice
from .store import SnapError

log = logging.getLogger(__name__)


class SnapshotVerbs:
    def __init__(self, svc):
        self.svc = svc

    async def create(self, name: str, attrs: dict | None = None) -> dict:
        svc = self.svc
        svc.check_writable()
        async with svc.ops.quiesce():  # (create syncs: the save volume's name, meta.lmdb)
            snap = await trio.to_thread.run_sync(svc.store.create, name, attrs)
        log.info("snapshot %s (id %d) created", name, snap.id)
        return snap.info()

    def list(self) -> list[dict]:
        return [s.info() for s in self.svc.store.queue]

    async def delete(self, name: str, internal: bool = False) -> dict:
        svc = self.svc
        if not internal:
            svc.check_writable()
        snap = svc.store.find(name)
        await svc.mounts.wait_unmounted(name)
        async with svc.ops.quiesce():
            moved = await trio.to_thread.run_sync(svc.layer.delete, snap)
        log.info("snapshot %s deleted (%d before-images moved to the next older one)",
                 name, moved)
        return {"deleted": name, "moved_blocks": moved}

    async def restore(self, name: str) -> dict:
        """Bring the live file system back to snapshot `name`, online."""
        svc = self.svc
        svc.check_writable()
        snap = svc.store.find(name)
        t0 = time.monotonic()
        plan: list = []

        def prepare():
            svc.core.checkpoint()  # the redo log must be empty, the volume current
            plan.extend(svc.layer.restore_plan(snap))
            return [(int(b[0]), int(b[-1]) - int(b[0]) + 1) for b in plan]

        def apply():
            svc.store.set_state("restoring", snap.id.to_bytes(8, "big"))
            n = svc.layer.restore_through(snap, svc.clog, plan)
            svc.store.set_state("restoring", None)
            return n
        n = await volume_changes(svc.ops, apply, prepare)
        log.info("restored snapshot %s: %d blocks in %.2f s", name, n, time.monotonic() - t0)
        return {"restored": name, "blocks": n, "seconds": round(time.monotonic() - t0, 3)}

    async def diff(self, older: str, younger: str | None, *, paths: bool = True) -> dict:
        svc = self.svc
        a = svc.store.find(older)
        b = svc.store.find(younger) if younger else None
        if b is not None and svc.store.position(b) < svc.store.position(a):
            raise SnapError(f"snapshot {older!r} is younger than {younger!r}; swap them")
        if b is None:  # against the live file system: its volume must hold what it shows
            async with svc.ops.quiesce():
                result = await trio.to_thread.run_sync(self._diff, a, b, paths)
        else:
            result = await trio.to_thread.run_sync(self._diff, a, b, paths)
        return result

    def _diff(self, a, b, paths: bool) -> dict:
        layer = self.svc.layer
        changed = set()
        count = 0
        for page, acc in layer.changed_pages(a, b):
            meta = layer._used(b, page)
            idx = (acc & meta).nonzero()[0] + page * 32768
            count += len(idx)
            if paths:
                changed.update(idx.tolist())
        out = {"from": a.name, "to": b.name if b else "live", "changed_blocks": count}
        if paths:
            old_fs = FileSystem(SnapshotDevice(layer, a), None, readonly=True)
            new_dev = (SnapshotDevice(layer, b) if b is not None  # else the live volume
                       else ReadOnlyDevice(layer.read_live, layer.nblocks))
            new_fs = FileSystem(new_dev, None, readonly=True)
            out["paths"] = changed_paths(old_fs, new_fs, changed)
        return out
