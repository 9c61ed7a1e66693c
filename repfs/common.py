"""Small helpers shared by the daemon, the snapshot mount helper and the command-line tools:
the host's table of repfs mounts, the mount-point check, and logging setup. Imports nothing
of repfs, so every module may use it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys


class MountError(Exception):
    """A mount point cannot be used (one line for the user)."""


def repfs_mounts() -> dict[str, str]:
    """Mount point -> site path of every repfs mount on this host (from /proc/mounts)."""
    out = {}
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "fuse.repfs":
                unesc = [x.replace("\\040", " ").replace("\\011", "\t")
                         .replace("\\012", "\n").replace("\\134", "\\") for x in fields[:2]]
                out[unesc[1]] = unesc[0]
    return out


def check_mountpoint(mountpoint: str) -> str:
    mp = os.path.realpath(mountpoint)
    if mp in repfs_mounts():
        try:
            os.stat(mp)
        except OSError:  # a dead mount left by a killed daemon: clear it away
            subprocess.run(["fusermount3", "-u", "-z", mp], check=False)
    if not os.path.exists(mp):
        raise MountError(f"mount point {mountpoint} does not exist")
    if not os.path.isdir(mp):
        raise MountError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mp):
        raise MountError(f"{mountpoint} is already a mount point")
    if os.listdir(mp):
        raise MountError(f"mount point {mountpoint} is not empty")
    return mp


def setup_logging(path: str | None, level=logging.INFO) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
