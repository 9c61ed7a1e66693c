"""A site: one directory holding the volume image, the redo log and the site's configuration.

    SITE/
      volume.img   the volume: the file system's blocks (sparse file)
      journal      the redo log of the file system (outside the volume, not replicated)
      site.toml    configuration (human-editable)
      lock         flock()ed by the process that owns the site (a daemon, fsck)
      repfs.pid    pid of the mounted daemon, and its mount point
      repfs.log    the daemon's log (unless mount --log says otherwise)

Later issues add meta.lmdb/ and save/ here. The volume stack is built in one place,
``Site.device()``, so layers (change log, snapshots) slot in without touching the file system.
"""

from __future__ import annotations

import fcntl
import logging
import json
import os
import shutil
import sys
import time
import tomllib
import uuid as uuidlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from .fs.core import FileSystem
from .fs.format import FormatError, Superblock
from .fs.mkfs import mkfs
from .statefile import remove_durably, write_durably
from .volume import BLOCK_SIZE, Volume, VolumeError


log = logging.getLogger(__name__)


class SiteError(Exception):
    """A site cannot be used as asked; the message is one line for the user."""


DEFAULT_CONFIG = """\
# repfs site configuration
[site]
name = {name}
uuid = {uuid}
created = {created}

[fs]
# seconds between group commits when nothing asks for one (fsync, a full cache)
commit_interval = 5.0
# kernel attribute/entry cache lifetime in seconds
cache_timeout = 5.0

[control]
# the daemon's HTTP/JSON control port (repfs-admin); loopback only unless you change it
listen = "127.0.0.1:0"

[snap]
# bytes the snapshot save volumes (SITE/save/) may hold, e.g. "50G"; by default a quarter of
# the free space of the file system holding the site, measured when the site is mounted
# save_capacity = "50G"

[repl]
# bytes the primary's unshipped delta sets may hold (copies of blocks overwritten before they
# were shipped, kept by their pinning snapshots); when it is full, cutting pauses until the
# destinations catch up (the change log keeps every change)
chunk_capacity = "1G"
# unreleased delta sets (each pinned by a snapshot) at which cutting pauses (flow control)
max_outstanding = 64
# delta chunks (1 MiB each) in flight to one destination
send_window = 8
# seconds a destination that forwards (it has routes) may fail before this site sends
# straight to its next hops, until it answers again (docs/replication.md, "Forwarders")
bypass_after = 30

[memory]
# bytes of writes the volume stack may hold in memory until their before-images are durable;
# past it they are released in a worker thread, past twice it writers wait (docs/user-guide.md:
# the daemon's memory follows from this, send_window and the destinations)
held_limit = "64M"

[metrics]
# GET /metrics (Prometheus) without the control token: read-only, no secrets in it
# (docs/replication.md, "Metrics"); by default it wants the token like every other request
# open = false

[rcp]
# take zstd compression of the delta chunks and copy records a primary sends to this site
# (docs/protocol.md, "Compression"); false: every RCP session to this site runs uncompressed
# accept_compression = true
"""


@dataclass(frozen=True)
class Settings:
    """site.toml's bounds on a daemon's memory (docs/user-guide.md, "Memory")."""
    held_limit: int  # [memory] held_limit: bytes of held writes before they are released
    max_outstanding: int  # [repl] max_outstanding: unreleased delta sets before cutting pauses
    send_window: int  # [repl] send_window: delta chunks in flight to one destination
    metrics_open: bool = False  # [metrics] open: GET /metrics without the token
    accept_compression: bool = True  # [rcp] accept_compression: take zstd a primary offers
    bypass_after: int = 30  # [repl] bypass_after: s a forwarder fails before it is bypassed


def _toml_value(value) -> str:
    """`value` as TOML (for the DEFAULT_CONFIG template), written by tomli_w."""
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


class Site:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.volume_path = self.path / "volume.img"
        self.journal_path = self.path / "journal"
        self.config_path = self.path / "site.toml"
        self.lock_path = self.path / "lock"
        self.pid_path = self.path / "repfs.pid"
        self.log_path = self.path / "repfs.log"
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------- creation

    @classmethod
    def create(cls, path, size: int, *, inodes: int | None = None, label: str = "",
               force: bool = False) -> "Site":
        site = cls(path)
        if site.path.exists() and not site.path.is_dir():
            raise SiteError(f"{site.path} exists and is not a directory")
        if site.volume_path.exists():
            if not force:
                raise SiteError(f"{site.path} is already a repfs site (use --force to replace it)")
            site.lock()
            for p in (site.volume_path, site.journal_path):
                p.unlink(missing_ok=True)
            shutil.rmtree(site.path / "meta.lmdb", ignore_errors=True)
            shutil.rmtree(site.path / "save", ignore_errors=True)
        nblocks = size // BLOCK_SIZE
        # a failed mkfs leaves nothing behind: not the files it made, nor the directories
        made_dirs = [p for p in (site.path, *site.path.parents) if not p.exists()]
        made_config = not site.config_path.exists()
        try:
            try:
                site.path.mkdir(mode=0o700, parents=True, exist_ok=True)  # holds raw blocks
                vol = Volume.create(site.volume_path, nblocks)
            except OSError as e:
                raise SiteError(f"cannot create {site.volume_path}: {e.strerror}") from None
            try:
                mkfs(vol, site.journal_path, ninodes=inodes, label=label)
            except (FormatError, OSError) as e:
                raise SiteError(f"mkfs: {e}") from None
            finally:
                vol.close()
            if made_config:
                site.write_default_config(label)
        except BaseException:
            site.unlock()
            for p in (site.volume_path, site.journal_path) + (
                    (site.config_path,) if made_config else ()):
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass
            for d in made_dirs:
                try:
                    d.rmdir()
                except OSError:
                    break
            raise
        site.unlock()
        return site

    # ---------------------------------------------------------------- checks

    def check(self) -> None:
        try:
            is_dir, is_site = self.path.is_dir(), self.volume_path.is_file()
        except PermissionError:  # (a site's directory is 0700: another user, not root)
            raise SiteError(f"{self.path}: permission denied (only the site's owner, "
                            "usually root, may use it)") from None
        if not is_dir:
            raise SiteError(f"{self.path} is not a directory (make a site with: repfs mkfs SITE --size SIZE)")
        if not is_site:
            raise SiteError(f"{self.path} is not a repfs site (no volume.img)")

    def write_default_config(self, label: str = "") -> None:
        # Values are written by a TOML writer, so any label or directory name ('"', '\\',
        # newlines, bytes that are not UTF-8) gives a file that tomllib reads back.
        name = (label or self.path.name).encode("utf-8", "surrogateescape").decode(
            "utf-8", "replace")
        write_durably(self.config_path, DEFAULT_CONFIG.format(
            name=_toml_value(name), uuid=_toml_value(str(uuidlib.uuid4())),
            created=_toml_value(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))), 0o644)

    def config(self) -> dict:
        try:
            raw = self.config_path.read_bytes()
        except FileNotFoundError:
            return {}
        if not raw.strip(b"\0 \t\r\n"):  # empty or zeros: torn by a crash while written
            log.warning("%s is empty or zeroed (a crash while it was written?): writing the "
                        "default configuration", self.config_path)
            self.write_default_config()
            raw = self.config_path.read_bytes()
        try:
            return tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SiteError(f"{self.config_path}: {e} (fix or remove the file)") from None

    def superblock(self) -> Superblock:
        self.check()
        try:
            with open(self.volume_path, "rb") as f:
                block = f.read(BLOCK_SIZE)
        except OSError as e:  # EIO from the disk under the site
            raise SiteError(f"cannot read {self.volume_path}: {e.strerror or e}") from None
        try:
            return Superblock.unpack(block)
        except FormatError as e:
            raise SiteError(f"{self.volume_path}: {e}") from None

    # ---------------------------------------------------------------- ownership

    def lock(self) -> None:
        """Take the site for this process, or fail naming who has it."""
        self.check()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = self.owner()
            where = f" (mounted at {who[1]} by pid {who[0]})" if who else ""
            raise SiteError(f"site {self.path} is in use{where}") from None
        self._lock_fd = fd

    def in_use(self) -> bool:
        """Whether a process (a daemon, fsck) holds the site; takes nothing."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def owner(self) -> tuple[int, str] | None:
        """(pid, mount point) of the daemon serving this site, if one runs."""
        if not self.in_use():  # a pid file left by a power cut or kill -9 names a pid that
            return None        # another process may have now; the daemon holds the lock
        try:
            pid_s, _, mnt = self.pid_path.read_text().partition("\n")
            pid = int(pid_s)
        except (OSError, ValueError):
            return None
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return None
        if state in (b"Z", b"X"):  # dead, not yet reaped
            return None
        return pid, mnt.strip()

    def write_pid(self, mountpoint: str) -> None:
        write_durably(self.pid_path, f"{os.getpid()}\n{mountpoint}\n", 0o644)

    def clear_pid(self) -> None:
        remove_durably(self.pid_path, self.path / "control.json")

    def write_control(self, host: str, port: int) -> None:
        write_durably(self.path / "control.json",
                      json.dumps({"host": host, "port": port, "pid": os.getpid()}) + "\n", 0o644)

    def control_address(self) -> tuple[str, int] | None:
        """Where this site's daemon listens, if one runs."""
        if self.owner() is None:
            return None
        try:
            c = json.loads((self.path / "control.json").read_text())
            return c["host"], int(c["port"])
        except (OSError, ValueError, KeyError):
            return None

    # ---------------------------------------------------------------- the stack

    @staticmethod
    def _finish_interrupted(top) -> None:
        """A restore or delete that a crash interrupted is finished before the file system
        is opened (both are idempotent)."""
        from .snap.layer import SnapLayer
        layer = top.find_layer(SnapLayer)
        store = layer.store
        raw = store.get_state("restoring")
        if raw:
            sid = int.from_bytes(raw, "big")
            snap = next((s for s in store.queue if s.id == sid), None)
            if snap is not None:
                log.info("finishing the interrupted restore of snapshot %s", snap.name)
                layer.restore_through(snap, top)
            store.set_state("restoring", None)
        for snap in [s for s in store.queue if s.state == "deleting"]:
            log.info("finishing the interrupted delete of snapshot %s", snap.name)
            layer.delete(snap)
        from .repl.receiver import finish_interrupted_playback
        finish_interrupted_playback(store.env, store.root, top)  # a secondary's playback

    def save_capacity(self) -> int:
        from .common import SizeError, parse_size
        raw = self.config().get("snap", {}).get("save_capacity")
        if raw is not None:
            try:
                return parse_size(str(raw))
            except SizeError:
                raise SiteError(f"{self.config_path}: bad [snap] save_capacity {raw!r}") from None
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize // 4

    def open_store(self, env=None):
        from .snap.store import SnapStore
        try:
            return SnapStore(self.path, capacity_bytes=self.save_capacity(), env=env)
        except Exception as e:  # lmdb.Error and OSError: one line for the user
            raise SiteError(f"cannot open {self.path / 'meta.lmdb'}: {e}") from None

    def chunk_capacity(self) -> int:
        from .common import SizeError, parse_size
        raw = self.config().get("repl", {}).get("chunk_capacity", "1G")
        try:
            return parse_size(str(raw))
        except SizeError:
            raise SiteError(f"{self.config_path}: bad [repl] chunk_capacity {raw!r}") from None

    def settings(self) -> "Settings":
        """The settings that bound the daemon's memory and replication's flow control, checked:
        a bad value is refused with one line naming it (a mount fails before it starts)."""
        from .common import SizeError, exact_size, parse_size
        cfg = self.config()

        def bad(section: str, key: str, raw, why: str) -> SiteError:
            return SiteError(f"{self.config_path}: bad [{section}] {key} {raw!r}: {why}")

        def size(section: str, key: str, default: str, low: int, high: int) -> int:
            raw = cfg.get(section, {}).get(key, default)
            if isinstance(raw, bool) or not isinstance(raw, (str, int)):
                raise bad(section, key, raw, "must be a size such as \"64M\"")
            try:
                value = parse_size(str(raw))
            except SizeError as e:
                raise bad(section, key, raw, str(e)) from None
            if not low <= value <= high:
                raise bad(section, key, raw,
                          f"must be between {exact_size(low)} and {exact_size(high)}")
            return value

        def count(section: str, key: str, default: int, low: int, high: int) -> int:
            raw = cfg.get(section, {}).get(key, default)
            if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
                raise bad(section, key, raw, f"must be a whole number from {low} to {high}")
            return raw

        metrics_open = cfg.get("metrics", {}).get("open", False)
        if not isinstance(metrics_open, bool):
            raise bad("metrics", "open", metrics_open, "must be true or false")
        accept_compression = cfg.get("rcp", {}).get("accept_compression", True)
        if not isinstance(accept_compression, bool):
            raise bad("rcp", "accept_compression", accept_compression,
                      "must be true or false")
        from .repl.transport import MAX_WINDOW
        return Settings(
            held_limit=size("memory", "held_limit", "64M", 1 << 20, 64 << 30),
            accept_compression=accept_compression,
            max_outstanding=count("repl", "max_outstanding", 64, 1, 4096),
            send_window=count("repl", "send_window", 8, 1, MAX_WINDOW),
            bypass_after=count("repl", "bypass_after", 30, 1, 86400),
            metrics_open=metrics_open,
        )

    def tls_context(self):
        """The daemon's ssl.SSLContext from site.toml [tls] (rcp/tls.py), or None without one;
        its files checked (missing, unreadable, not PEM, the key not the certificate's, expired,
        not signed by the CA): SiteError, one line."""
        from .rcp.tls import TlsError, load
        try:
            return load(self.path, self.config(), str(self.config_path))
        except TlsError as e:
            raise SiteError(str(e)) from None

    def device(self, *, held_limit: int | None = None):
        """The volume stack the file system writes through, top to bottom: the change log
        (replication), the snapped volume (copy-on-first-write for snapshots), the image file.
        The layers share the site's LMDB environment (SITE/meta.lmdb). `held_limit`: the held
        writes at which a restore releases them (Settings.held_limit; a default if None)."""
        from .repl.changelog import ChangeLogLayer
        from .repl.deltaset import attach_pins
        from .snap.layer import SnapLayer
        from .snap.store import open_env
        try:
            vol = Volume(self.volume_path)
        except VolumeError as e:
            raise SiteError(str(e)) from None
        try:
            sb = Superblock.unpack(vol.read(0, 1))
        except FormatError as e:
            vol.close()
            raise SiteError(f"{self.volume_path}: {e}") from None
        try:
            env = open_env(self.path)
        except Exception as e:  # lmdb.Error: one line for the user
            vol.close()
            raise SiteError(f"cannot open {self.path / 'meta.lmdb'}: {e}") from None
        snap = SnapLayer(vol, self.open_store(env), sb.bbitmap_start)
        if held_limit is not None:
            snap.held_release = held_limit
        attach_pins(env, snap.store)  # before any recovery writes through the stack
        return ChangeLogLayer(snap, env)

    def role(self) -> str:
        """'primary' or 'secondary' (a site never replicated is a primary)."""
        from .repl import keys as K
        from .snap.store import open_env
        if not (self.path / "meta.lmdb").exists():
            return "primary"
        env = open_env(self.path)
        try:
            db = env.open_db(K.CTX)
            with env.begin(db=db) as txn:
                raw = txn.get(b"role")
        finally:
            env.close()
        return raw.decode() if raw else "primary"

    @contextmanager
    def _recovery_logged(self):
        """The recovery an open does (a delta set undone, before-images re-indexed, the change
        log's marks, an interrupted restore finished) changes the site, and the open that
        does it is the only one that can say so: in a process that has not set up logging
        (`repfs fsck`), its lines go to the site's log too (else a crash's undo was written
        nowhere: the mount after the fsck finds nothing left to undo). Warnings still go to
        stderr, as they did."""
        if logging.getLogger().handlers:  # (a daemon, a foreground mount, a test's capture)
            yield
            return
        try:
            to_file = logging.FileHandler(self.log_path)
        except OSError:
            yield
            return
        from .common import LOG_FORMAT
        to_file.setFormatter(logging.Formatter(LOG_FORMAT))
        to_stderr = logging.StreamHandler(sys.stderr)
        to_stderr.setLevel(logging.WARNING)
        top = logging.getLogger("repfs")
        level = top.level
        top.setLevel(logging.INFO)
        top.addHandler(to_file)
        top.addHandler(to_stderr)
        try:
            yield
        finally:
            top.removeHandler(to_stderr)
            top.removeHandler(to_file)
            top.setLevel(level)
            to_file.close()

    def open_fs(self, *, readonly: bool = False, held_limit: int | None = None) -> FileSystem:
        with self._recovery_logged():
            return self._open_fs(readonly=readonly, held_limit=held_limit)

    def _open_fs(self, *, readonly: bool, held_limit: int | None) -> FileSystem:
        dev = None
        try:
            dev = self.device(held_limit=held_limit)
            self._finish_interrupted(dev)  # recovery, like the redo-log replay: even read-only
            return FileSystem(dev, self.journal_path, readonly=readonly)
        except FormatError as e:
            dev.close()
            raise SiteError(f"{self.volume_path}: {e}") from None
        except OSError as e:  # EIO, ENOSPC under the site while replaying or reading
            if dev is not None:
                dev.close()
            raise SiteError(f"cannot open the file system of {self.path}: "
                            f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}; "
                            f"a later mount redoes whatever recovery began") from None
