"""The snapshot verbs of a running site (create, list, delete, restore, diff), each at a
consistency point of the live file system. `svc` is the site service: it owns the FUSE
adapter (for quiesce), the snapped layer, the store and the change log on top."""

from __future__ import annotations

import logging
import threading
import time

import trio

from ..fs.core import FileSystem
from ..fs.invalidate import volume_changes
from .diff import changed_blocks, changed_paths
from ..volume import ReadOnlyDevice
from .layer import SnapshotDevice
from .store import SnapError

log = logging.getLogger(__name__)

# A diff against the live file system pins it with an internal snapshot of this name prefix
# and purpose; `snapshot list` does not show it, and a leftover (a daemon that died during a
# diff) is deleted at the next mount or diff.
DIFF_PIN_PREFIX = "diff-pin-"
DIFF_PURPOSE = "diff"
_HIDDEN = ("delta set", DIFF_PURPOSE, "verify")  # internal snapshots' purposes


class SnapshotVerbs:
    def __init__(self, svc):
        self.svc = svc
        self._pins: set[str] = set()  # the pins of the diffs running now
        self._pin_seq = 0
        # at the mount (no request is served yet): a pin a crash left behind goes, and so
        # does a verify's snapshot of the whole volume (kept, every overwrite would copy a
        # before-image into it, unseen: review of issue 9)
        for snap in [s for s in svc.store.queue
                     if s.attrs.get("purpose") in (DIFF_PURPOSE, "verify")]:
            what = "a diff" if snap.attrs.get("purpose") == DIFF_PURPOSE else "a verify"
            try:
                svc.layer.delete(snap)
                log.info("deleted %s, left by %s that did not finish", snap.name, what)
            except Exception as e:  # noqa: BLE001 - the next diff or verify tries again
                log.warning("cannot delete %s, left by %s that did not finish: %s (the "
                            "next one tries again)", snap.name, what, e)

    def _check_may_snapshot(self) -> None:
        """A writable site takes and deletes its snapshots; so does a secondary, between two
        playbacks (quiesce holds playback off), e.g. to clone one for a DR drill while it
        goes on replicating (recovery/clone.py)."""
        svc = self.svc
        if svc.receiver.role == "secondary" and svc.core.error is None:
            return
        svc.check_writable()

    async def create(self, name: str, attrs: dict | None = None) -> dict:
        svc = self.svc
        self._check_may_snapshot()
        if isinstance(name, str) and name.startswith("repl-"):
            raise SnapError(f"bad snapshot name {name!r}: names starting with 'repl-' are "
                            f"replication's own")
        if isinstance(name, str) and name.startswith(DIFF_PIN_PREFIX):
            raise SnapError(f"bad snapshot name {name!r}: names starting with "
                            f"{DIFF_PIN_PREFIX!r} are snapshot diff's own")
        async with svc.ops.quiesce():  # (create syncs: the save volume's name, meta.lmdb)
            snap = await trio.to_thread.run_sync(svc.store.create, name, attrs)
        log.info("snapshot %s (id %d) created", name, snap.id)
        return snap.info()

    def list(self) -> list[dict]:
        # (a delta set's pinning snapshot is replication's: shown in status, not here)
        return [s.info() for s in self.svc.store.queue if s.attrs.get("purpose") not in _HIDDEN]

    async def delete(self, name: str, internal: bool = False) -> dict:
        svc = self.svc
        if not internal:
            self._check_may_snapshot()
            if isinstance(name, str) and name.startswith("repl-"):
                raise SnapError(f"snapshot {name!r} belongs to replication (it is released "
                                f"when every destination has it; replicate stop releases "
                                f"them all)", "conflict")
        snap = svc.store.find(name)
        if name in self._pins:
            raise SnapError(f"snapshot {name!r} pins a diff that is running; it goes when the "
                            "diff ends", "conflict")
        if not internal and svc.cloner.holds(name):
            raise SnapError(f"snapshot {name!r} is being cloned (snapshot clone); delete it "
                            "when the clone is done", "conflict")
        if not internal and svc.copies.holds(name):  # (recovery/copy.py)
            raise SnapError(f"snapshot {name!r} is being copied to another site (copy); "
                            "delete it when the copy is done", "conflict")
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
        """The blocks (and paths) changed from snapshot `older` to `younger` (None: the live
        file system). Against the live file system, writers are held only while an internal
        snapshot pins it (as long as a snapshot create); the diff then reads the two
        snapshots in a worker thread while writes go on, and the pin is deleted after."""
        svc = self.svc
        a = svc.store.find(older)
        b = svc.store.find(younger) if younger else None
        if b is not None and svc.store.position(b) < svc.store.position(a):
            raise SnapError(f"snapshot {older!r} is younger than {younger!r}; swap them")
        if b is not None:
            return await self._run(a, b, paths)
        if svc.readonly or svc.core.error is not None:
            # nothing writes the volume but playback (a secondary), which quiesce holds off;
            # a pin would need a writable site
            async with svc.ops.quiesce():
                return await self._run(a, None, paths)
        pin = await self._pin()
        try:
            result = await self._run(a, pin, paths)
        finally:
            with trio.CancelScope(shield=True):
                await self._unpin(pin)
        result["to"] = "live"
        return result

    def _leftover_pins(self) -> list:
        return [s for s in self.svc.store.queue
                if s.attrs.get("purpose") == DIFF_PURPOSE and s.name not in self._pins]

    async def _pin(self):
        """An internal snapshot of the live file system, taken at a consistency point."""
        svc = self.svc
        for snap in self._leftover_pins():  # left by a daemon that died during a diff
            log.info("deleting %s, left by a diff that did not finish", snap.name)
            await trio.to_thread.run_sync(svc.layer.delete, snap)
        self._pin_seq += 1
        name = f"{DIFF_PIN_PREFIX}{time.time_ns()}-{self._pin_seq}"
        self._pins.add(name)
        try:
            async with svc.ops.quiesce():
                pin = await trio.to_thread.run_sync(svc.store.create, name,
                                                    {"purpose": DIFF_PURPOSE})
            log.info("snapshot diff: the live file system is pinned as %s", name)
            return pin
        except BaseException:
            self._pins.discard(name)
            raise

    async def _unpin(self, pin) -> None:
        """Delete a diff's pin (also when the diff failed or was cancelled); if that fails,
        the next diff or mount deletes it."""
        try:
            with trio.move_on_after(60):
                await trio.to_thread.run_sync(self.svc.layer.delete, pin)
        except Exception as e:  # noqa: BLE001 - the diff's answer stands; the pin waits
            log.warning("cannot delete %s after a diff: %s (the next diff or mount deletes "
                        "it)", pin.name, e)
        finally:
            self._pins.discard(pin.name)

    async def _run(self, a, b, paths: bool) -> dict:
        """self._diff in a worker thread; a cancellation stops it (between two steps) and
        waits for it, so that nothing it reads is deleted under it."""
        stop = threading.Event()
        done = threading.Event()
        box: dict = {}

        def work():
            try:
                box["value"] = self._diff(a, b, paths, stop)
            except BaseException as e:  # noqa: BLE001 - handed to the trio task
                box["error"] = e
            finally:
                done.set()
        try:
            await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except trio.Cancelled:
            log.info("diff from %s cancelled: stopping its worker thread", a.name)
            stop.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(done.wait)
            raise
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _diff(self, a, b, paths: bool, stop: threading.Event) -> dict:
        layer = self.svc.layer
        changed = changed_blocks(layer, a, b)
        out = {"from": a.name, "to": b.name if b else "live", "changed_blocks": len(changed)}
        if paths:
            old_fs = FileSystem(SnapshotDevice(layer, a), None, readonly=True)
            new_dev = (SnapshotDevice(layer, b) if b is not None  # else the live volume
                       else ReadOnlyDevice(layer.read_live, layer.nblocks))
            new_fs = FileSystem(new_dev, None, readonly=True)
            out["paths"] = changed_paths(old_fs, new_fs, changed, stop=stop)
        return out
