"""`repfs-admin`: administer a site (this issue: `status` read from the site itself)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import QuietError, run_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise QuietError(message, 2)


def _resolve_site(target: str):
    """TARGET is a site directory or a repfs mount point."""
    from ..daemon import repfs_mounts
    from ..site import Site
    real = os.path.realpath(target)
    mounts = repfs_mounts()
    if real in mounts:
        return Site(mounts[real])
    site = Site(real)
    if not site.volume_path.is_file():
        raise QuietError(f"{target} is neither a repfs site directory nor a repfs mount point")
    return site


def status(site) -> dict:
    from ..site import SiteError
    try:
        sb = site.superblock()
    except SiteError as e:
        raise QuietError(str(e)) from None
    who = site.owner()
    usable = sb.nblocks - sb.data_start
    free_blocks, free_inodes = sb.free_blocks, sb.free_inodes
    if who:
        try:  # the live numbers from the daemon
            st = os.statvfs(who[1])
            free_blocks, free_inodes = st.f_bfree, st.f_ffree
        except OSError:
            pass
    return {
        "site": str(site.path),
        "label": sb.label,
        "uuid": sb.uuid.hex(),
        "state": "mounted" if who else "not mounted",
        "mountpoint": who[1] if who else None,
        "pid": who[0] if who else None,
        "volume_bytes": sb.nblocks * 4096,
        "used_bytes": (usable - free_blocks) * 4096,
        "free_bytes": free_blocks * 4096,
        "inodes": sb.ninodes - 1,
        "free_inodes": free_inodes,
        "format_version": sb.version,
    }


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _main(argv) -> int:
    p = _Parser(prog="repfs-admin", description="Administer a repfs site.")
    p.add_argument("--site", required=True, help="a site directory or a repfs mount point")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    sub.add_parser("status", help="what the site is and how full it is")
    a = p.parse_args(argv)
    site = _resolve_site(a.site)
    st = status(site)
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    rows = [
        ("site", st["site"]), ("label", st["label"] or "-"), ("state", st["state"]),
        ("mount point", st["mountpoint"] or "-"), ("daemon pid", st["pid"] or "-"),
        ("volume", _human(st["volume_bytes"])),
        ("used", f"{_human(st['used_bytes'])} ({_human(st['free_bytes'])} free)"),
        ("inodes", f"{st['inodes'] - st['free_inodes']} used of {st['inodes']}"),
    ]
    for k, v in rows:
        print(f"{k:12s} {v}")
    return 0


def main(argv=None) -> int:
    sys.exit(run_cli("repfs-admin", _main, sys.argv[1:] if argv is None else argv))
