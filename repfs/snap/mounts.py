"""Read-only snapshot mounts of a running site: each is a `repfs.snap.mountd` helper process
with its own FUSE mount, served the snapshot's blocks by the site daemon over a Unix socket."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

import trio

from ..common import MountError, check_mountpoint, repfs_mounts
from .mountd import serve_requests
from .store import SnapError

log = logging.getLogger(__name__)


def _remove_socket(sock_path: str) -> None:
    """Remove a snapshot mount's socket and its private directory."""
    for fn, path in ((os.unlink, sock_path), (os.rmdir, os.path.dirname(sock_path))):
        try:
            fn(path)
        except OSError:
            pass


class SnapshotMounts:
    def __init__(self, svc):
        self.svc = svc
        self.active: dict[str, dict] = {}  # name -> {"mountpoint", "process"}

    def mountpoints(self) -> dict[str, str]:
        return {n: m["mountpoint"] for n, m in self.active.items()}

    async def wait_unmounted(self, name: str) -> None:
        """Raise unless snapshot `name` is not mounted (waiting for a helper that is exiting)."""
        if name in self.active:
            if self.active[name]["mountpoint"] not in repfs_mounts():
                # unmounted a moment ago: its helper is exiting; wait for it to be gone
                log.info("snapshot %s was unmounted a moment ago: waiting for its mount "
                         "helper to exit", name)
                with trio.move_on_after(10):
                    while name in self.active:
                        await trio.sleep(0.02)
        if name in self.active:
            raise SnapError(f"snapshot {name!r} is mounted at "
                            f"{self.active[name]['mountpoint']}; unmount it first", "conflict")

    async def mount(self, name: str, mountpoint: str) -> dict:
        svc = self.svc
        snap = svc.store.find(name)
        if name in self.active:
            raise SnapError(f"snapshot {name!r} is already mounted at "
                            f"{self.active[name]['mountpoint']}", "conflict")
        try:
            # (from a worker thread: a mount point on this site's own mount is looked up by
            # this daemon's loop, which a stat from the loop itself would wait on for ever)
            mp = await trio.to_thread.run_sync(check_mountpoint, mountpoint)
        except MountError as e:
            raise SnapError(str(e)) from None
        # the socket lives in a private directory of its own (0700) with a short path: an
        # AF_UNIX path holds at most 107 bytes, and a site's path may be longer than that
        sock_path = os.path.join(tempfile.mkdtemp(prefix="repfs-snap-"), f"{snap.id}.sock")
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await listener.bind(sock_path)
            listener.listen(4)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "repfs.snap.mountd", sock_path, mp,
                 f"{svc.site.path}@{name}", str(svc.site.path / "repfs.log")],
                stdout=subprocess.PIPE)
        except BaseException:
            listener.close()
            _remove_socket(sock_path)
            raise
        entry = {"mountpoint": mp, "process": proc}
        self.active[name] = entry
        svc.nursery.start_soon(self._serve, name, snap, listener, sock_path, proc)
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
            self.active.pop(name, None)
            proc.kill()
            raise SnapError(f"cannot mount snapshot {name!r}: {msg or 'the mount helper died'}",
                            "failed")
        log.info("snapshot %s mounted at %s (pid %d)", name, mp, proc.pid)
        return {"mounted": name, "mountpoint": mp, "pid": proc.pid}

    async def _serve(self, name, snap, listener, sock_path, proc) -> None:
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
            _remove_socket(sock_path)
            self.active.pop(name, None)
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.terminate()
                    with trio.move_on_after(10):
                        await proc.wait()
            log.info("snapshot %s unmounted", name)

    async def _block_server(self, stream, snap) -> None:
        layer = self.svc.layer
        await serve_requests(stream, lambda s, n: trio.to_thread.run_sync(
            layer.read_snapshot, snap, s, n))

    async def close_all(self) -> None:
        for name, m in list(self.active.items()):
            try:
                await trio.run_process(["fusermount3", "-u", "-z", m["mountpoint"]], check=False)
            except OSError:
                pass
            m["process"].terminate()
