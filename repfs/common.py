"""Small helpers shared by the daemon, the snapshot mount helper and the command-line tools:
the host's table of repfs mounts, the mount-point check, logging setup and sizes
(`parse_size`). Imports nothing
of repfs, so every module may use it."""

from __future__ import annotations

import decimal
import logging
import os
import re
import subprocess
import sys


class MountError(Exception):
    """A mount point cannot be used (one line for the user)."""


_OCTAL = re.compile(rb"\\([0-7]{3})")


def unescape_mount_field(field: bytes) -> str:
    """A field of /proc/mounts or /proc/self/mountinfo as it was given to mount(2): the kernel
    shows space, tab, newline, backslash and '#' as octal escapes (\\040, \\011, \\012, \\134,
    \\043); every other byte, UTF-8 or not, as it is."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


def fuse_opt_value(value: str) -> str:
    """`value` (a path, a name) escaped for one libfuse option such as ``fsname=VALUE``.

    libfuse splits an option group at every ',' and undoes backslash escapes as it does
    (lib/fuse_opt.c, process_real_option_group): a backslash and a character are that
    character, and a backslash and three octal digits (the first 0-3) are that byte. So a
    ',' or '\\' in a site's path must be escaped, or the path is cut into options (a site path
    holding ',allow_other' or ',dev' would add them). pyfuse3 passes options as ASCII, so
    every byte outside printable ASCII (space, newline, UTF-8) goes as an octal escape too."""
    out = []
    for b in os.fsencode(value):
        if b in b",\\":
            out.append("\\" + chr(b))
        elif 0x20 < b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
    return "".join(out)


def repfs_mounts() -> dict[str, str]:
    """Mount point -> fsname of every repfs mount on this host (from /proc/mounts): the site's
    path for a site's mount, SITE@SNAPSHOT for a snapshot's (see `mount_site`). Both are
    exactly the paths given to mount, whatever characters they hold."""
    out = {}
    with open("/proc/mounts", "rb") as f:
        for line in f:
            fields = line.split(b" ")  # the kernel escapes the spaces within a field
            if len(fields) >= 3 and fields[2] == b"fuse.repfs":
                out[unescape_mount_field(fields[1])] = unescape_mount_field(fields[0])
    return out


def mount_site(fsname: str) -> str:
    """The site directory of a repfs mount's fsname: a site's mount names its site; a
    snapshot's mount names SITE@SNAPSHOT. A site's path may hold '@' too, so this is the
    longest of fsname and its prefixes before an '@' that is a site directory (holds
    volume.img); fsname itself when none is."""
    cut = len(fsname)
    while cut > 0:
        cand = fsname[:cut]
        if os.path.isfile(os.path.join(cand, "volume.img")):
            return cand
        cut = fsname.rfind("@", 0, cut)
    return fsname


def check_mountpoint(mountpoint: str, served=None) -> str:
    """The mount point, checked for a new mount. A repfs mount left there by a killed daemon
    is cleared away: its stat fails, or `served(site_path)` says no process serves its site
    (right after a kill -9 the kernel may still answer from its caches)."""
    mp = os.path.realpath(mountpoint)
    site = repfs_mounts().get(mp)
    if site is not None:
        try:
            os.stat(mp)
            dead = served is not None and not served(site)
        except OSError:
            dead = True
        if dead:
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


LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"  # a site's log


def setup_logging(path: str | None, level=logging.INFO) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)


class SizeError(ValueError):
    """Text that is not a size (one line for the user)."""


def exact_size(n: int) -> str:
    """Bytes as the largest binary unit that holds them exactly (parse_size's inverse:
    67108864 -> '64M', 1000 -> '1000')."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_size(text: str) -> int:
    """'10G', '512M', '1T', '4096', '1.5G' -> bytes (binary units, a fraction of a byte is
    dropped). Anything that is not a positive finite size of at least one byte (nan, inf,
    1e400K, -1, 0, 0.5, '') is refused with SizeError (one line)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = t, ""
    if t and t[-1] in units:
        num, unit = t[:-1], t[-1]
    try:
        value = decimal.Decimal(num.strip())  # exact: no float rounding, no float overflow
    except decimal.InvalidOperation:
        raise SizeError(f"bad size {text!r} (examples: 10G, 512M, 1T)") from None
    if not value.is_finite():
        raise SizeError(f"bad size {text!r}: must be a finite number")
    if value <= 0:
        raise SizeError(f"bad size {text!r}: must be positive")
    if value.adjusted() > 30:  # far beyond any size (1e30 bytes); keeps int() cheap
        raise SizeError(f"bad size {text!r}: too large")
    size = int(value * units[unit])
    if size < 1:
        raise SizeError(f"bad size {text!r}: less than one byte")
    return size


class Latencies:
    """Durations of one kind of event (a commit, a delta-set cut) for status and /metrics
    (repfs/metrics.py): a count and a sum since the daemon started (a Prometheus summary's
    _count and _sum, which only grow) and the last `keep` durations for quantiles. One
    append and two additions per event: it costs nothing per write."""

    def __init__(self, keep: int = 1000):
        import collections
        self.count = 0
        self.sum = 0.0  # seconds
        self.recent: collections.deque[float] = collections.deque(maxlen=keep)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        self.recent.append(seconds)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) of the recent durations in seconds; None before the first."""
        if not self.recent:
            return None
        values = sorted(self.recent)
        return values[min(len(values) - 1, int(len(values) * q))]
