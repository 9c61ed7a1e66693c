"""Mount options: parsing (`repfs mount -o`, the mount(8) helper), the options handed to the
kernel at mount time, and remounting a running daemon's mount (`mount -o remount,ro|rw`).

What each option does on a repfs mount:

* ``ro`` / ``rw``: read-only in the kernel (writes fail with EROFS in the VFS) and in the core.
* ``nosuid``/``suid``, ``nodev``/``dev``, ``noexec``/``exec``, ``sync``/``async``, ``dirsync``:
  kernel per-mount flags, enforced by the VFS. The daemon runs as root, so without them a
  mount gets ``suid,dev,exec`` as any root mount does.
* ``relatime`` (default), ``noatime``, ``strictatime``, ``atime``: FUSE leaves access times to
  the file system (the kernel never updates them itself), so these choose what the daemon does
  on a read: update as Linux's relatime, never, or always. ``atime`` means the default.
* ``nodiratime``: accepted; repfs never updates a directory's access time when it is listed
  (so every repfs mount behaves as ``nodiratime``; ``diratime`` is refused).
* ``writeback_cache``: let the kernel cache writes.
* ``remount``: change the options of a mounted site (below).
* Options mount(8) consumes or reports (``defaults``, ``auto``, ``noauto``, ``nofail``,
  ``_netdev``, ``user``, ``users``, ``nouser``, ``x-*``, ``comment=*``) and those the kernel
  shows for a FUSE mount (``user_id=``, ``group_id=``, ``default_permissions``, ``allow_other``,
  ``max_read=``, ``blksize=``, ``fsname=``, ``subtype=``), which mount(8) passes back on a
  remount, are ignored. Anything else is refused with its name.

Remount. ``mount -o remount,ro MNT`` runs the helper (``mount.fuse.repfs SITE MNT -o
ro,...,remount,...``), which asks the site's daemon over its control port (``POST /v1/remount``
with ``{"options": "ro,...", "readonly": true}``, authenticated by ``SITE/control.token``,
which only root may read) and prints the daemon's one-line answer. The daemon (`Remounter`)
remounts one request at a time: a second remount waits for the first, then applies its options
over the mount's options as the first left them. It changes the kernel's flags with mount(2)
(MS_REMOUNT) from a worker thread — the kernel first writes back cached pages through the
daemon — and its own state in the order that loses nothing: going read-only, the kernel first
(no new writes), then a consistency point (commit and checkpoint), then the core refuses every
change and updates no access time; going read-write, the core first, then the kernel. Refused,
with a one-line reason: read-only while files are open for writing (EBUSY); read-write for a
secondary (read-only until failover) and for a file system that turned read-only after an
error; by anyone but root (the helper says so before it asks).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import asdict, dataclass

from .common import unescape_mount_field
from .errors import DomainError

log = logging.getLogger(__name__)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS, MS_REMOUNT = 1, 2, 4, 8, 16, 32
MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME = 128, 1024, 2048
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24

_MOUNT8_OPTIONS = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
                   "owner", "group", "async"}
_FUSE_SHOWN = {"default_permissions", "allow_other"}
_FUSE_SHOWN_PREFIXES = ("user_id=", "group_id=", "max_read=", "blksize=", "fsname=", "subtype=",
                        "x-", "comment=")


class MountOptionError(ValueError):
    """An option repfs does not know or cannot honour (one line for the user)."""


class RemountError(DomainError):
    """A remount was refused or failed (one line for the user; its kind says which)."""

    default_kind = "conflict"


@dataclass
class MountOptions:
    readonly: bool = False
    writeback_cache: bool = False
    remount: bool = False
    suid: bool | None = None  # None: as the mounting user may (root: yes)
    dev: bool | None = None
    exec: bool = True
    sync: bool = False
    dirsync: bool = False
    atime: str = "relatime"  # relatime | noatime | strictatime

    @classmethod
    def parse(cls, text: str, base: "MountOptions | None" = None) -> "MountOptions":
        """Options as mount(8) writes them (comma-separated; the last of two opposites wins)."""
        o = cls(**asdict(base)) if base is not None else cls()
        for opt in filter(None, (x.strip() for x in text.split(","))):
            if opt in ("ro", "rw"):
                o.readonly = opt == "ro"
            elif opt in ("suid", "nosuid"):
                o.suid = opt == "suid"
            elif opt in ("dev", "nodev"):
                o.dev = opt == "dev"
            elif opt in ("exec", "noexec"):
                o.exec = opt == "exec"
            elif opt == "sync":
                o.sync = True
            elif opt == "async":
                o.sync = False
            elif opt == "dirsync":
                o.dirsync = True
            elif opt in ("relatime", "atime", "norelatime", "nostrictatime"):
                o.atime = "relatime"
            elif opt in ("noatime", "strictatime"):
                o.atime = opt
            elif opt == "nodiratime":
                pass  # what repfs always does (directories' access times are never updated)
            elif opt == "diratime":
                raise MountOptionError("mount option 'diratime' is not supported: repfs never "
                                       "updates a directory's access time")
            elif opt == "writeback_cache":
                o.writeback_cache = True
            elif opt == "remount":
                o.remount = True
            elif opt in _MOUNT8_OPTIONS or opt in _FUSE_SHOWN or opt.startswith(
                    _FUSE_SHOWN_PREFIXES):
                pass
            else:
                raise MountOptionError(f"unknown mount option {opt!r}")
        return o

    def fuse_options(self, *, root: bool) -> set[str]:
        """The kernel flags for pyfuse3.init (libfuse passes them to mount(2))."""
        out = {"ro" if self.readonly else "rw"}
        out.add("suid" if (root if self.suid is None else self.suid) else "nosuid")
        out.add("dev" if (root if self.dev is None else self.dev) else "nodev")
        if not self.exec:
            out.add("noexec")
        if self.sync:
            out.add("sync")
        if self.dirsync:
            out.add("dirsync")
        if self.atime == "noatime":
            out.add("noatime")  # the daemon's policy; shown by findmnt
        return out

    def ms_flags(self, *, root: bool = True) -> int:
        """mount(2) flags of a remount with these options."""
        f = MS_REMOUNT
        if self.readonly:
            f |= MS_RDONLY
        if not (root if self.suid is None else self.suid):
            f |= MS_NOSUID
        if not (root if self.dev is None else self.dev):
            f |= MS_NODEV
        if not self.exec:
            f |= MS_NOEXEC
        if self.sync:
            f |= MS_SYNCHRONOUS
        if self.dirsync:
            f |= MS_DIRSYNC
        f |= {"noatime": MS_NOATIME, "strictatime": MS_STRICTATIME,
              "relatime": MS_RELATIME}[self.atime]
        return f

    def describe(self) -> str:
        return ",".join(sorted(self.fuse_options(root=os.geteuid() == 0))
                        + ([self.atime] if self.atime != "noatime" else []))


def current_options(mountpoint: str) -> str | None:
    """The per-mount options of the mount at `mountpoint` (as /proc/self/mountinfo shows
    them), or None when nothing is mounted there."""
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")  # the kernel escapes the spaces within a field
            if len(fields) > 5 and unescape_mount_field(fields[4]) == mountpoint:
                found = fields[5].decode()  # the last one is the one on top
    return found


def kernel_remount(mountpoint: str, flags: int) -> None:
    """mount(2) with MS_REMOUNT on `mountpoint` (blocks while the kernel writes back)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(None, os.fsencode(mountpoint), None, ctypes.c_ulong(flags), None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# ----------------------------------------------------------------------------- the daemon's side

class Remounter:
    """The daemon's remount verb (the control port's POST /v1/remount): one remount at a time
    (a second waits for the first, then applies its options over the first one's result)."""

    def __init__(self, service):
        import trio
        self.service = service
        self.lock = trio.Lock()  # every change of the kernel's mount flags takes it

    async def remount(self, options: str = "", readonly: bool | None = None) -> dict:
        """Remount with the mount(8) options `options` applied over the mount's current ones
        (and read-only or read-write, when `readonly` says so)."""
        svc = self.service
        mp = svc.mountpoint
        if self.lock.locked():
            log.info("remount of %s (%s) waits for the one under way", mp, options or "-")
        async with self.lock:
            try:
                base = MountOptions.parse(current_options(mp) or "")
                base.atime = svc.core.atime_mode  # (the kernel shows relatime for strictatime)
                new = MountOptions.parse(options, base=base)
            except MountOptionError as e:
                raise RemountError(str(e), "invalid") from None
            if readonly is not None:
                new.readonly = readonly
            try:
                await remount(svc, mp, new)
            except RemountError as e:
                log.info("remount of %s refused: %s", mp, e)
                raise
        return {"mountpoint": mp, "readonly": new.readonly, "options": new.describe()}


def _refused(e: OSError) -> RemountError:
    """The kernel refused the remount: EBUSY while files are open for writing (as any file
    system), anything else a failure."""
    if e.errno == errno.EBUSY:
        return RemountError(f"{e.strerror} (files are open for writing)", "conflict")
    return RemountError(e.strerror or str(e), "failed")


async def remount(service, mountpoint: str, opts: MountOptions) -> None:
    """Change a running mount's options (see the module's docstring for the order); the
    caller holds the Remounter's lock."""
    import trio
    ops = service.ops
    core = ops.core
    root = os.geteuid() == 0
    flags = opts.ms_flags(root=root)
    if opts.readonly:
        try:
            await trio.to_thread.run_sync(kernel_remount, mountpoint, flags)
        except OSError as e:
            raise _refused(e) from None
        if not core.readonly:
            async with ops.quiesce():  # a consistency point: everything so far is in the volume
                core.readonly = True
        service.readonly = True
    else:
        if core.error is not None:
            raise RemountError(f"the file system turned read-only after an error "
                               f"({core.error}); unmount and mount it again")
        receiver = getattr(service, "receiver", None)
        if receiver is not None and receiver.role == "secondary":
            raise RemountError("the site is a secondary: its mount is read-only until failover")
        recovery = getattr(service, "recovery", None)  # (recovery/failover.py)
        fence = recovery.fence_reason() if recovery is not None else None
        if fence:
            raise RemountError(f"fenced: {fence}: this site is a stale primary and stays "
                               f"read-only (resync it from the new primary)")
        was = core.readonly
        core.readonly = False
        try:
            await trio.to_thread.run_sync(kernel_remount, mountpoint, flags)
        except OSError as e:
            core.readonly = was
            raise _refused(e) from None
        service.readonly = False
    core.atime_mode = opts.atime
    log.info("remounted %s with %s", mountpoint, opts.describe())
