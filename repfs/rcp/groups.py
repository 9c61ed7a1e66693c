"""Replication groups (FIG. 13): a name and a shared secret that every site of the group holds.

A site keeps each group's secret in ``SITE/groups/NAME.secret`` (mode 0600, written whole and
durably); RCP sessions are authenticated by it (rcp/wire.py `proof`), and it never crosses the
wire. `repfs-admin group add NAME --secret-file FILE` copies FILE's secret into the site, or,
when FILE does not exist, makes a random one and writes it to FILE too (mode 0600), to be
copied to the group's other sites.

A secret file holds one line of text: at least MIN_SECRET characters (the random ones are 64
hexadecimal digits, 256 bits); the secret is that line's bytes.

The operator's side: `read_secret_file` and `create_secret_file` are repfs-admin's (the client
reads the file; a secret never goes into a URL or a log), `GroupStore.put` is the checked
`add` of `group add` (an existing group keeps its secret unless forced). Changes of a site's
groups and routes (rcp/routes.py) hold `site_lock`, so that two operators, or an operator and
the daemon's control port, do not interleave a check and a write. The daemon reads the store at
every handshake: a group added or deleted takes effect at the next session, mounted or not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path

from ..errors import DomainError
from ..statefile import fsync_dir, remove_durably, write_durably

MIN_SECRET = 16
MAX_SECRET = 4096
GROUP_RULE = "1-64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit"
_GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class GroupError(DomainError):
    """A bad group name or secret file, or a refused change; `str(e)` is the one-line reason
    and `kind` (repfs/errors.py) what sort of refusal it is (default "invalid")."""


def valid_group(name) -> bool:
    return isinstance(name, str) and _GROUP_RE.match(name) is not None


def parse_secret(text: bytes, where: str) -> bytes:
    """The secret in a secret file's content; GroupError if it is not one."""
    lines = text.strip().splitlines()
    if len(text) > MAX_SECRET or len(lines) != 1:
        raise GroupError(f"{where}: a secret file holds one line (at most {MAX_SECRET} bytes)")
    secret = lines[0].strip()
    if len(secret) < MIN_SECRET:
        raise GroupError(f"{where}: the secret is {len(secret)} characters; at least "
                         f"{MIN_SECRET} are needed")
    return secret


def new_secret() -> bytes:
    return secrets.token_hex(32).encode()


def read_secret_file(path: str | os.PathLike) -> bytes:
    """The secret in an existing secret file; GroupError (one line) if it cannot be read or is
    not a secret (a directory, unreadable, empty, too short, more than one line, too large)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise GroupError(f"cannot read the secret file {os.fspath(path)}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise GroupError(f"the secret file {os.fspath(path)} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise GroupError(f"the secret file {os.fspath(path)} is not a regular file")
        data = os.read(fd, MAX_SECRET + 1)
    except OSError as e:
        raise GroupError(f"cannot read the secret file {os.fspath(path)}: {e.strerror}") from None
    finally:
        os.close(fd)
    if not data.strip():
        raise GroupError(f"the secret file {os.fspath(path)} is empty")
    return parse_secret(data, f"secret file {os.fspath(path)}")


def create_secret_file(path: str | os.PathLike) -> bytes:
    """Write a new random secret to `path`, which must not exist (an existing file, even an
    empty one or a dangling symbolic link, is never replaced): mode 0600, durable, and whole
    or absent after a crash (written beside it, then linked in). Returns the secret."""
    path = Path(path)
    secret = new_secret()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.new")
    try:
        _write_exclusive(tmp, secret)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # (a random name: only ever this call's)
        raise GroupError(f"cannot write the secret file {path}: {e.strerror}") from None
    try:
        try:
            os.link(tmp, path)  # fails if `path` appeared meanwhile: never overwritten
        except FileExistsError:
            raise GroupError(f"the secret file {path} appeared while it was being written; "
                             "nothing changed (run the command again to use it)") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            _write_exclusive(path, secret)  # a file system without hard links
    except OSError as e:
        raise GroupError(f"cannot write the secret file {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return secret


def _write_exclusive(path: Path, secret: bytes) -> None:
    """A new file (never an existing one, nor through a symbolic link) holding `secret`,
    mode 0600 whatever the umask, synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_secret_file(path: str | os.PathLike) -> None:
    """Undo `create_secret_file` when the site refused the group (nothing changed)."""
    remove_durably(path)


@contextmanager
def site_lock(site_path: str | os.PathLike):
    """Held while a site's groups or routes are checked and changed (``SITE/rcp.lock``, an
    flock: released by the kernel if the holder dies)."""
    fd = os.open(Path(site_path) / "rcp.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class GroupStore:
    """The groups of one site (its ``groups/`` directory)."""

    def __init__(self, site_path: str | os.PathLike):
        self.dir = Path(site_path) / "groups"

    def _path(self, name: str) -> Path:
        if not valid_group(name):
            raise GroupError(f"bad group name {name!r} ({GROUP_RULE})")
        return self.dir / f"{name}.secret"

    def secret(self, name: str) -> bytes | None:
        """The group's secret, or None if this site is not in the group (no secret file, or
        `name` is not a group name at all: a peer's HELLO may carry anything) or its secret
        file is damaged (`put` tells that apart). Any other error reading the file (EIO,
        EMFILE, a directory in its place...) is raised as the OSError it is: it says nothing
        about the group, and may pass."""
        if not valid_group(name):
            return None
        try:
            return parse_secret(self._path(name).read_bytes(), name)
        except (FileNotFoundError, GroupError):
            return None

    def names(self) -> list[str]:
        try:
            return sorted(p.name[:-len(".secret")] for p in self.dir.iterdir()
                          if p.name.endswith(".secret") and valid_group(p.name[:-7]))
        except FileNotFoundError:
            return []

    def add(self, name: str, secret: bytes) -> None:
        path = self._path(name)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        write_durably(path, secret + b"\n", mode=0o600)

    def delete(self, name: str) -> bool:
        path = self._path(name)
        if not path.exists():
            return False
        remove_durably(path)
        return True

    def put(self, name: str, secret: bytes, *, force: bool = False) -> str:
        """`group add`: "added", "unchanged" (the group holds this secret already) or
        "replaced" (with `force`); GroupError (conflict) if the group holds another secret
        and not `force`. Takes `site_lock`."""
        self._path(name)  # (a bad name: refused before anything is touched)
        secret = parse_secret(secret, f"the secret of group {name}")
        with site_lock(self.dir.parent):
            old = self.secret(name)
            if old is not None and secrets.compare_digest(old, secret):
                return "unchanged"
            exists = old is not None or self._path(name).exists()
            if exists and not force:
                what = "a different secret" if old is not None else "a damaged secret file"
                raise GroupError(f"group {name} exists with {what} (--force replaces it; every "
                                 "site of the group then needs the new one)", "conflict")
            self.add(name, secret)
            return "replaced" if exists else "added"
