"""Small state files of a site (site.toml, control.token, control.json, repfs.pid), written
whole and durably.

A power cut keeps only what was made durable, so a file written with a plain ``write_text``
can come back empty or torn. ``write_durably`` writes a temporary file beside the target,
fsyncs it, renames it over the target and fsyncs the directory: after a crash the file holds
either its old content or its new one, whole. Readers still treat an empty or malformed file
as damaged (it may predate this module, or the disk may lie) and regenerate or refuse it.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory entries of `path` (a directory) durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike, data: bytes | str, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically and durably; the file gets exactly `mode`."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; an old tmp kept its own
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_durably(*paths: str | os.PathLike) -> None:
    """Remove files (missing ones are fine) and make the removal durable."""
    dirs = set()
    for p in map(Path, paths):
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        dirs.add(p.parent)
    for d in dirs:
        fsync_dir(d)
