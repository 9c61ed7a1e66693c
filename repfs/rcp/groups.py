"""Replication groups (FIG. 13): a name and a shared secret that every site of the group holds.

A site keeps each group's secret in ``SITE/groups/NAME.secret`` (mode 0600, written whole and
durably); RCP sessions are authenticated by it (rcp/wire.py `proof`), and it never crosses the
wire. `repfs-admin group add NAME --secret-file FILE` copies FILE's secret into the site, or,
when FILE does not exist, makes a random one and writes it to FILE too (mode 0600), to be
copied to the group's other sites.

A secret file holds one line of text: at least MIN_SECRET characters (the random ones are 64
hexadecimal digits, 256 bits); the secret is that line's bytes.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from ..statefile import remove_durably, write_durably

MIN_SECRET = 16
MAX_SECRET = 4096
GROUP_RULE = "1-64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit"
_GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class GroupError(Exception):
    """A bad group name or secret file; `str(e)` is the one-line reason."""


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


class GroupStore:
    """The groups of one site (its ``groups/`` directory)."""

    def __init__(self, site_path: str | os.PathLike):
        self.dir = Path(site_path) / "groups"

    def _path(self, name: str) -> Path:
        if not valid_group(name):
            raise GroupError(f"bad group name {name!r} ({GROUP_RULE})")
        return self.dir / f"{name}.secret"

    def secret(self, name: str) -> bytes | None:
        """The group's secret, or None if this site is not in the group (or `name` is not a
        group name at all: a peer's HELLO may carry anything)."""
        if not valid_group(name):
            return None
        try:
            return parse_secret(self._path(name).read_bytes(), name)
        except (OSError, GroupError):
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
