"""The running site: the file-system core, its FUSE adapter and the volume stack, and the
role objects that offer the control port's verbs. One instance per daemon; every method runs
in the daemon's trio run, and every snapshot operation happens at a consistency point.

| attribute | module | does |
|---|---|---|
| `status()` | `repfs/status.py` | the status report |
| `snapshots` | `repfs/snap/verbs.py` | snapshot create, list, delete, restore, diff |
| `mounts` | `repfs/snap/mounts.py` | read-only snapshot mounts (helper processes) |
| `remounter` | `repfs/mountopts.py` | `mount -o remount,...`, one at a time |
| `replicate` | `repfs/repl/verbs.py` | replicate start, stop, policy, deltaset |
| `primary` | `repfs/repl/sender.py` | at a primary: cut and copy loops, send tasks |
| `secondary` | `repfs/repl/secondary.py` | the receiver's endpoints and the playback loop |
| `forwarder` | `repfs/repl/forward.py` | at a secondary: the send tasks to its next hops (routes) |
| `verifier` | `repfs/repl/verify.py` | verify --to DEST (and, at a secondary, `secondary.verify`) |
| `recovery` | `repfs/recovery/failover.py` | failover at a secondary; the generation fence |
| `resync` | `repfs/recovery/resync.py` | resync --peer at a new primary; its steps at the old one |
| `copies` | `repfs/recovery/copy.py` | copy SNAP --to PEER at a source; pull --from PEER at a copy |
| `switchover` | `repfs/recovery/switchover.py` | switchover --to DEST and failback at a primary; taking over at DEST |
| `cloner` | `repfs/recovery/clone.py` | snapshot clone NAME NEWSITE: a new, independent site from a snapshot |

Kernel-cache invalidation after a change underneath the file system (restore, playback) is
`repfs/fs/invalidate.py`."""

from __future__ import annotations

import logging
import time

import trio

from .fs.core import FileSystem
from .fs.ops import Operations
from .mountopts import Remounter
from .recovery.clone import Cloner
from .recovery.copy import Copies
from .recovery.failover import Recovery
from .recovery.resync import Resync
from .recovery.switchover import Switchover
from .site import Site
from .snap.layer import SnapLayer
from .snap.mounts import SnapshotMounts
from .snap.store import SnapError
from .snap.verbs import SnapshotVerbs
from .tasks import Supervisor
from .repl.changelog import ChangeLogLayer
from .repl.deltaset import DeltaSets
from .repl.receiver import Receiver
from .repl.secondary import Secondary
from .repl.sender import Primary
from .repl.verbs import ReplicateVerbs
from .repl.verify import PrimaryVerify
from .status import site_status

log = logging.getLogger(__name__)


class SiteService:
    def __init__(self, site: Site, ops: Operations, *, mountpoint: str, readonly: bool):
        self.site = site
        self.ops = ops
        self.mountpoint = mountpoint
        self.readonly = readonly
        self.started = time.time()
        self.nursery: trio.Nursery | None = None
        self.supervisor = Supervisor()  # the background tasks: contained, shown in status
        ops.supervisor = self.supervisor  # (the FUSE adapter's release of held writes too)
        env = self.store.env
        self.receiver = Receiver(env, site.path, self.layer.nblocks, self.clog)
        self.primary: Primary | None = None
        self.sets: DeltaSets | None = None
        if self.receiver.role == "primary":
            settings = site.settings()
            self.sets = DeltaSets(env, self.clog, site.path, self.layer,
                                  capacity_bytes=site.chunk_capacity(),
                                  max_outstanding=settings.max_outstanding)
            self.primary = Primary(self, self.clog, self.sets)
        self.secondary = Secondary(self, self.receiver)
        self.forwarder = None  # a secondary's next hops (repfs/repl/forward.py)
        if self.primary is None:
            from .repl.forward import Forwarder
            self.forwarder = Forwarder(self)
        self.snapshots = SnapshotVerbs(self)
        self.mounts = SnapshotMounts(self)
        self.remounter = Remounter(self)
        self.replicate = ReplicateVerbs(self)
        self.verifier = PrimaryVerify(self)
        self.resync = Resync(self)  # (resync --peer at a new primary; its steps at an old one)
        self.copies = Copies(self)  # (copy SNAP --to PEER, pull --from PEER: recovery/copy.py)
        self.switchover = Switchover(self)  # (switchover, failback)
        self.cloner = Cloner(self)  # (snapshot clone NAME NEWSITE)
        self.recovery = Recovery(self)  # (last: a fenced site turns read-only here)

    async def run(self, nursery) -> None:
        """Start the background tasks of the site's role."""
        self.nursery = nursery
        if self.primary is not None:
            await self.primary.run(nursery)
        else:
            nursery.start_soon(self.supervisor.run, "playback", self.secondary.playback_loop)
        if self.forwarder is not None:
            await self.forwarder.run(nursery)

    @property
    def core(self) -> FileSystem:
        return self.ops.core

    @property
    def clog(self) -> ChangeLogLayer:
        return self.core.dev.find_layer(ChangeLogLayer)  # the top of the stack

    @property
    def layer(self) -> SnapLayer:
        return self.core.dev.find_layer(SnapLayer)  # the snapped volume under the change log

    @property
    def store(self):
        return self.layer.store

    def peer(self, path: str) -> Site:
        """Another site on this host (a replication target)."""
        return Site(path)

    def status(self) -> dict:
        return site_status(self)

    def check_writable(self) -> None:
        if self.core.error is not None:
            raise SnapError(f"the file system turned read-only after an error "
                            f"({self.core.error}); remount the site", "conflict")
        if self.readonly:
            fence = self.recovery.fence_reason()  # (a peer holds a newer generation)
            if fence:
                raise SnapError(f"fenced: {fence}: this site is a stale primary and stays "
                                f"read-only (resync it from the new primary)", "conflict")
            raise SnapError("the site is mounted read-only", "conflict")
