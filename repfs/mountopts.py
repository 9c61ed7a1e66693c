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
* ``remount``: change the options of a mounted site (see ``request_remount``).
* Options mount(8) consumes or reports (``defaults``, ``auto``, ``noauto``, ``nofail``,
  ``_netdev``, ``user``, ``users``, ``nouser``, ``x-*``, ``comment=*``) and those the kernel
  shows for a FUSE mount (``user_id=``, ``group_id=``, ``default_permissions``, ``allow_other``,
  ``max_read=``, ``blksize=``, ``fsname=``, ``subtype=``), which mount(8) passes back on a
  remount, are ignored. Anything else is refused with its name.

Remount. ``mount -o remount,ro MNT`` runs the helper (``mount.fuse.repfs SITE MNT -o
ro,...,remount,...``). The helper asks the site's daemon to do it: it writes
``SITE/remount.request`` (a nonce and the options), sends the daemon SIGUSR1 and waits for
``SITE/remount.result`` with its nonce. The daemon changes the kernel's flags with mount(2)
(MS_REMOUNT) from a worker thread — the kernel first writes back cached pages through the
daemon — and its own state in the order that loses nothing: going read-only, the kernel first
(no new writes), then a consistency point (commit and checkpoint), then the core refuses every
change and updates no access time; going read-write, the core first, then the kernel. A
secondary (read-only until failover) and a file system that turned read-only after an error
refuse ``rw``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import unescape_mount_field

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


class RemountError(Exception):
    """A remount was refused or failed (one line for the user)."""


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


# ----------------------------------------------------------------------------- the protocol

REQUEST = "remount.request"
RESULT = "remount.result"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def request_remount(site_path: Path, pid: int, opts: MountOptions, *,
                    timeout: float = 60.0) -> None:
    """Ask the daemon `pid` serving `site_path` to remount with `opts`; wait for its answer."""
    nonce = os.urandom(8).hex()
    result = site_path / RESULT
    try:
        result.unlink(missing_ok=True)
        _write_json(site_path / REQUEST, {"nonce": nonce, "options": asdict(opts)})
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        raise RemountError(f"the daemon (pid {pid}) is gone") from None
    except OSError as e:  # e.g. not root: the site and its daemon are root's
        raise RemountError(f"cannot ask the daemon (pid {pid}): {e.strerror}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = json.loads(result.read_text())
        except (OSError, ValueError):
            answer = None
        if answer is not None and answer.get("nonce") == nonce:
            result.unlink(missing_ok=True)
            if answer.get("error"):
                raise RemountError(answer["error"])
            return
        if time.monotonic() > deadline:
            raise RemountError(f"the daemon (pid {pid}) did not answer in {timeout:.0f} s")
        time.sleep(0.02)


async def remount_loop(service, site_path: Path, mountpoint: str) -> None:
    """The daemon's side: serve remount requests (SIGUSR1) until cancelled."""
    import trio
    with trio.open_signal_receiver(signal.SIGUSR1) as sigs:
        async for _ in sigs:
            req_path = site_path / REQUEST
            try:
                req = json.loads(req_path.read_text())
                req_path.unlink()
                opts = MountOptions(**req["options"])
                nonce = req["nonce"]
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.warning("ignoring a malformed remount request: %s", e)
                req_path.unlink(missing_ok=True)
                continue
            try:
                await remount(service, mountpoint, opts)
                error = None
            except RemountError as e:
                error = str(e)
                log.info("remount of %s refused: %s", mountpoint, error)
            except Exception as e:  # noqa: BLE001 - a failed remount never takes the mount down
                log.exception("remount of %s failed", mountpoint)
                error = f"remount failed: {e}"
            try:
                _write_json(site_path / RESULT, {"nonce": nonce, "error": error})
            except OSError as e:
                log.warning("cannot answer the remount request: %s", e)


def _why(e: OSError) -> str:
    if e.errno == errno.EBUSY:
        return f"{e.strerror} (files are open for writing)"
    return e.strerror or str(e)


async def remount(service, mountpoint: str, opts: MountOptions) -> None:
    """Change a running mount's options (see the module's docstring for the order)."""
    import trio
    ops = service.ops
    core = ops.core
    root = os.geteuid() == 0
    flags = opts.ms_flags(root=root)
    if opts.readonly:
        try:
            await trio.to_thread.run_sync(kernel_remount, mountpoint, flags)
        except OSError as e:
            raise RemountError(_why(e)) from None
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
        was = core.readonly
        core.readonly = False
        try:
            await trio.to_thread.run_sync(kernel_remount, mountpoint, flags)
        except OSError as e:
            core.readonly = was
            raise RemountError(_why(e)) from None
        service.readonly = False
    core.atime_mode = opts.atime
    log.info("remounted %s with %s", mountpoint, opts.describe())
