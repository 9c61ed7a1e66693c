"""The running site: the file-system core, its FUSE adapter, the volume stack, and the verbs
the control port offers (status, snapshots). One instance per daemon; every method runs in
the daemon's trio run, and every snapshot operation happens at a consistency point."""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
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
from .repl.deltaset import DeltaSets
from .repl.receiver import Receiver, ReceiveError
from .repl.sender import (
    PermanentError, Primary, ReceiverClient, TransientError,
)
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
        env = self.store.env
        self.db_ctx = env.open_db(b"replctx")  # never open a database inside a transaction
        self.receiver = Receiver(env, site.path)
        self.primary: Primary | None = None
        self.sets: DeltaSets | None = None
        if self.receiver.role == "primary":
            self.sets = DeltaSets(env, self.clog, site.path, capacity_bytes=site.chunk_capacity())
            self.primary = Primary(self, self.clog, self.sets)
        self.playback_wake = trio.Event()
        self.playback_ms: list[float] = []

    async def run(self, nursery) -> None:
        """Start the background tasks of the site's role."""
        self.nursery = nursery
        if self.primary is not None:
            await self.primary.run(nursery)
        else:
            nursery.start_soon(self._playback_loop)

    @property
    def core(self) -> FileSystem:
        return self.ops.core

    @property
    def clog(self):
        return self.core.dev  # the top of the stack: the change log

    @property
    def layer(self) -> SnapLayer:
        return self.core.dev.lower  # the snapped volume under it

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
            **self.repl_status(),
        }

    def repl_status(self) -> dict:
        now = time.time_ns()
        if self.primary is not None:
            p, sets, clog = self.primary, self.sets, self.clog
            dests = []
            for d in p.dests():
                row = {k: d.get(k) for k in ("name", "site", "state", "error", "last_error")}
                row.update(acked_delta_set=d["acked"], played_delta_set=d["played"],
                           lag_seconds=round(p.lag(d), 3) if d["state"] != "stopped" else None)
                if d["state"] == "initial-copy":
                    row["copy_progress"] = {"copied_blocks": d.get("copied", 0),
                                            "position": d.get("copy_pos", 0),
                                            "volume_blocks": self.layer.nblocks}
                dests.append(row)
            outstanding = [
                {"delta_set": r["number"], "state": r["state"], "blocks": r["blocks"],
                 "created": _iso(r["cut_ns"]), "ready": _iso(r["ready_ns"]) if r["ready_ns"] else None}
                for r in sets.records() if r.get("file", True)]
            stalls = sorted(p.stall_ms)
            return {
                "role": "primary", "generation": sets.generation,
                "replicating": clog.enabled,
                "current_delta_set": sets.last_cut + 1,
                "current_delta_set_blocks": clog.changed_blocks,
                "last_cut_delta_set": sets.last_cut,
                "last_played_delta_set": None,
                "lag_seconds": round(max((p.lag(d) for d in p.dests() if d["state"] != "stopped"),
                                         default=0.0), 3),
                "destinations": dests,
                "outstanding_delta_sets": outstanding,
                "chunk_area_bytes": sets.usage(), "chunk_area_capacity_bytes": sets.capacity,
                "flow_control": p.flow_control,
                "send_rate_bytes_per_s": round(p.rate()),
                "cut_stall_ms": {"p50": _pct(stalls, 50), "p99": _pct(stalls, 99),
                                 "count": len(stalls)},
                "policy": p.policy(),
            }
        r = self.receiver
        incoming = r.incoming()
        first = min((x["first_change_ns"] for x in incoming if x.get("first_change_ns")),
                    default=0)
        return {
            "role": "secondary", "generation": r.generation, "replication_state": r.state,
            "primary": r.primary(), "current_delta_set": None, "last_cut_delta_set": None,
            "last_received_delta_set": r.last_received,
            "last_played_delta_set": r.last_played,
            "lag_seconds": round((now - first) / 1e9, 3) if first else 0.0,
            "outstanding_delta_sets": [
                {"delta_set": x["number"], "blocks": x["blocks"], "created": _iso(x["cut_ns"]),
                 "received": _iso(x["received_ns"])} for x in incoming],
            "played_blocks": r.played_blocks,
            "playback_ms_p50": _pct(sorted(self.playback_ms), 50),
            "policy": self._secondary_policy(),
        }

    # ------------------------------------------------------------------ replication (primary)

    def _need_primary(self) -> Primary:
        if self.primary is None:
            raise SnapError("this site is a secondary; run this on its primary", 409)
        return self.primary

    async def replicate_start(self, to: str, *, force: bool = False, name: str | None = None):
        from .site import Site
        p = self._need_primary()
        self._writable()
        target = Site(to)
        if not target.volume_path.is_file():
            raise SnapError(f"{to} is not a repfs site (make it with repfs mkfs)", 400)
        if target.path == self.site.path:
            raise SnapError("a site cannot replicate to itself", 400)
        name = name or target.path.name
        old = p.dest(name)
        if old and old["state"] not in ("stopped", "error") and not force:
            raise SnapError(f"already replicating to {name} ({old['state']})", 409)
        client = ReceiverClient(str(target.path))
        try:
            info = await trio.to_thread.run_sync(client.info)
        except (TransientError, PermanentError) as e:
            raise SnapError(f"cannot reach the daemon of {to}: {e} (mount it first: "
                            f"repfs mount {to} MOUNTPOINT)", 409) from None
        me = {"uuid": self.core.sb.uuid.hex(), "site": str(self.site.path)}
        if Site(info["site"]).path == self.site.path:  # (a replica shares the volume uuid)
            raise SnapError("the target is this very site", 400)
        if not force:
            if info["role"] == "secondary" and info["state"] != "stopped":
                raise SnapError(f"{to} is already a replicating secondary; --force replaces "
                                "its content", 409)
            if info.get("root_entries"):
                raise SnapError(f"{to} holds files; --force replaces its content", 409)
            if info["role"] == "primary" and info.get("destinations"):
                raise SnapError(f"{to} is itself replicating; --force replaces its content", 409)
        try:
            await trio.to_thread.run_sync(client.attach, me, p.sets.generation, force)
        except (TransientError, PermanentError) as e:
            raise SnapError(f"{to} refused to become a secondary: {e}", 409) from None
        finally:
            client.close()
        snap_name = f"repl-init-{name}"
        if any(s.name == snap_name for s in self.store.queue):
            await self.snapshot_delete(snap_name, internal=True)
        async with p.cut_lock:
            while p.sets.cutting:
                await trio.sleep(0.02)
            async with self.ops.quiesce():
                self.clog.enabled = True
                stamp = p.sets.cut()
                self.store.create(snap_name, {"delta_set": stamp, "purpose": "initial copy",
                                              "destination": name})
        p.copy_needed.set()
        d = {"name": name, "site": str(target.path), "kind": "local", "state": "initial-copy",
             "snapshot": snap_name, "stamp": stamp, "acked": stamp, "played": stamp,
             "copy_pos": 0, "copied": 0, "started_ns": time.time_ns()}
        p.put_dest(d)
        p.start_sender(self.nursery, name)
        log.info("replication to %s (%s) started: initial copy of snapshot %s (delta set %d)",
                 name, target.path, snap_name, stamp)
        return {"destination": name, "site": str(target.path), "stamp": stamp,
                "state": "initial-copy"}

    async def replicate_stop(self, to: str | None) -> dict:
        if self.primary is None:
            self.receiver.detach()
            self.playback_wake.set()
            return {"stopped": "playback"}
        p = self.primary
        names = [d["name"] for d in p.dests()] if to is None else [to]
        for n in names:
            d = p.dest(n)
            if d is None:
                raise SnapError(f"no destination named {n!r}", 404)
            scope = p.tasks.pop(n, None)
            if scope is not None:
                scope.cancel()
            d["state"] = "stopped"
            p.put_dest(d)
            if any(s.name == d.get("snapshot") for s in self.store.queue):
                await self.snapshot_delete(d["snapshot"], internal=True)
        if not any(d["state"] != "stopped" for d in p.dests()):
            async with p.cut_lock:
                while p.sets.cutting:
                    await trio.sleep(0.02)
                self.clog.disable()
        return {"stopped": names}

    async def replicate_policy(self, changes: dict) -> dict:
        if self.primary is not None:
            bad = {"playback_timeout", "playback_hwm"} & {k for k, v in changes.items()
                                                          if v is not None}
            if bad:
                raise SnapError("--playback-timeout and --playback-hwm are set on a secondary")
            return self.primary.set_policy(**{k: changes.get(k) for k in ("timeout", "hwm",
                                                                          "retention")})
        bad = {"timeout", "hwm"} & {k for k, v in changes.items() if v is not None}
        if bad:
            raise SnapError("--timeout and --hwm are set on the primary")
        pol = self._secondary_policy()
        pol.update({k: v for k, v in changes.items()
                    if k in ("playback_timeout", "playback_hwm") and v is not None})
        with self.store.env.begin(write=True, db=self.db_ctx) as txn:
            txn.put(b"playback_policy", json.dumps(pol).encode())
        self.playback_wake.set()
        return pol

    def _secondary_policy(self) -> dict:
        with self.store.env.begin(db=self.db_ctx) as txn:
            raw = txn.get(b"playback_policy")
        pol = {"playback_timeout": 0.0, "playback_hwm": 64 << 20}
        if raw:
            pol.update(json.loads(raw))
        return pol

    async def replicate_deltaset(self, wait: bool = True) -> dict:
        p = self._need_primary()
        if not self.clog.enabled:
            raise SnapError("replication is not running (replicate start --to SITE)", 409)
        if p.sets.flow_control():
            raise SnapError("the chunk area is full (flow control): cutting is paused until "
                            "the destinations catch up; every change stays in the change log",
                            409)
        n = await p.cut()
        if wait:
            while p.sets.record(n)["state"] != "ready":
                await trio.sleep(0.02)
        rec = p.sets.record(n)
        return {"delta_set": n, "blocks": rec["blocks"], "state": rec["state"]}

    # ------------------------------------------------------------------ replication (secondary)

    def receiver_info(self) -> dict:
        info = self.receiver.info()
        root = self.core.iget(1)
        info.update(uuid=self.core.sb.uuid.hex(), site=str(self.site.path),
                    root_entries=self.core.dirs.header(root).count,
                    destinations=[d["name"] for d in self.primary.dests()
                                  if d["state"] != "stopped"] if self.primary else [])
        return info

    async def receiver_attach(self, primary: dict, generation: int) -> dict:
        async with self.ops.quiesce():
            await trio.to_thread.run_sync(self.core.checkpoint)
            if self.primary is not None:
                for name in list(self.primary.tasks):
                    self.primary.tasks.pop(name).cancel()
                self.clog.disable()
                self.primary = None
                self.sets = None
            self.receiver.attach(primary, generation)
            self.core.readonly = True
            self.readonly = True
        self.nursery.start_soon(self._playback_loop)
        log.info("this site is now a secondary of %s: its mount is read-only; waiting for the "
                 "initial copy", primary.get("site"))
        return self.receiver.info()

    async def receiver_copy(self, body: bytes) -> dict:
        start, data = self.receiver.check_copy(body)
        await trio.to_thread.run_sync(self.clog.write, start, data, True)
        return {"written": len(data) // 4096}

    async def receiver_start_playback(self, after: int) -> dict:
        def apply():
            self.clog.flush()
            self.receiver.start_playback(after)
        await self._volume_changes(apply, lambda: None)
        log.info("initial copy received; playback starts after delta set %d", after)
        return self.receiver.info()

    def receiver_chunk(self, body: bytes) -> dict:
        return self.receiver.receive_chunk(body)

    def receiver_commit(self, args: dict) -> dict:
        try:
            header = bytes.fromhex(args.get("header", ""))
        except ValueError:
            raise ReceiveError("the header is not hex", 400) from None
        out = self.receiver.commit(header, args)
        self.playback_wake.set()
        return out

    async def _playback_loop(self) -> None:
        """Integrate complete delta sets in order, one consistent step at a time (FIG. 9)."""
        while self.receiver.role == "secondary":
            with trio.move_on_after(0.2):
                await self.playback_wake.wait()
            self.playback_wake = trio.Event()
            if self.receiver.state != "replicating":
                continue
            rec = self.receiver.next_to_play()
            if rec is None:
                continue
            pol = self._secondary_policy()
            waiting = self.receiver.incoming()
            age = (time.time_ns() - rec["received_ns"]) / 1e9
            if age < pol["playback_timeout"] and sum(
                    x["blocks"] for x in waiting) * 4096 < pol["playback_hwm"]:
                continue
            t0 = time.monotonic()
            await self._volume_changes(lambda: self.receiver.play(rec, self.clog),
                                       lambda: self.receiver.extents(rec))
            self.playback_ms.append((time.monotonic() - t0) * 1000)
            del self.playback_ms[:-1000]
            self.playback_wake.set()  # maybe more to play

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

    async def snapshot_delete(self, name: str, internal: bool = False) -> dict:
        if not internal:
            self._writable()
        snap = self.store.find(name)
        if name in self.snapshot_mounts:
            from .daemon import repfs_mounts
            if self.snapshot_mounts[name]["mountpoint"] not in repfs_mounts():
                # unmounted a moment ago: its helper is exiting; wait for it to be gone
                with trio.move_on_after(10):
                    while name in self.snapshot_mounts:
                        await trio.sleep(0.02)
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
        plan: list = []

        def prepare():
            self.core.checkpoint()  # the redo log must be empty, the volume current
            plan.extend(self.layer.restore_plan(snap))
            return [(int(b[0]), int(b[-1]) - int(b[0]) + 1) for b in plan]

        def apply():
            self.store.set_state("restoring", snap.id.to_bytes(8, "big"))
            n = self.layer.restore_through(snap, self.clog, plan)
            self.store.set_state("restoring", None)
            return n
        n = await self._volume_changes(apply, prepare)
        log.info("restored snapshot %s: %d blocks in %.2f s", name, n, time.monotonic() - t0)
        return {"restored": name, "blocks": n, "seconds": round(time.monotonic() - t0, 3)}

    async def _volume_changes(self, apply, prepare):
        """Run `apply` (in a worker thread) while every request is held back — it changes the
        volume underneath the file system (playback, restore) — then re-read the file system
        and drop exactly the kernel caches that the change touched: inodes the kernel knows
        whose records changed, and the names of the known directories that changed.
        `prepare` runs first (in a worker thread, after the commit) and returns the extents
        the change will write ((start, count) list; None: anything)."""
        async with self.ops.hold_all():
            core = self.core
            extents = await trio.to_thread.run_sync(prepare)
            watch = _InvalidationPlan(core, extents)
            result = await trio.to_thread.run_sync(apply)
            core.reload()
            entries, inodes = watch.finish(core)
        await trio.to_thread.run_sync(_invalidate_all, entries, inodes)
        return result

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
            meta = self.layer._used(b, page)
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


def _iso(ns: int) -> str | None:
    if not ns:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{int(ns % 1e9) // 1000000:03d}Z"


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * p / 100))], 2)


class _InvalidationPlan:
    """What the kernel may have cached that a change of the volume can make stale."""

    def __init__(self, core: FileSystem, extents):
        import numpy as np
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
            except FSError:
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


def _invalidate_all(entries, inodes) -> None:
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
