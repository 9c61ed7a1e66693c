"""`repfs`: make, mount, unmount and check repfs sites.

Exit codes: 0 success; 1 the operation failed (the message says why); 2 bad arguments;
fsck: 0 clean, 1 repaired, 4 problems remain, 8 fsck could not run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from . import QuietError, parse_size, run_cli

FSCK_OPERATIONAL_ERROR = 8
# s a remount may take: the kernel writes back what it cached; another remount may run first
REMOUNT_TIMEOUT = 600.0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise QuietError(message, 2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="repfs", description="A replicating file system on a block volume.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    m = sub.add_parser("mkfs", help="make a new site with an empty file system")
    m.add_argument("site", help="site directory (created if missing)")
    m.add_argument("--size", required=True, help="volume size, e.g. 10G (binary units)")
    m.add_argument("--inodes", type=int, help="number of inodes (default: one per 16 KiB)")
    m.add_argument("--label", default="", help="volume label (up to 64 bytes)")
    m.add_argument("--force", action="store_true", help="replace an existing site's volume")

    m = sub.add_parser("mount", help="mount a site (returns once the mount is ready)")
    m.add_argument("site")
    m.add_argument("mountpoint")
    m.add_argument("--ro", action="store_true", help="read-only: every change gets EROFS")
    m.add_argument("--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("--log", help="log file (default: SITE/repfs.log)")
    m.add_argument("--listen", metavar="HOST:PORT",
                   help="control port address (default: site.toml [control] listen, "
                   "127.0.0.1 on a free port)")
    m.add_argument("--writeback-cache", action="store_true",
                   help="let the kernel cache writes (faster small writes)")
    m.add_argument("-o", dest="options", action="append", default=[],
                   help="mount(8)-style options: ro, rw, nosuid, nodev, noexec, noatime, "
                   "relatime, strictatime, nodiratime, sync, dirsync, writeback_cache, remount "
                   "(see the user guide)")

    m = sub.add_parser("umount", help="unmount cleanly and wait for the daemon to exit")
    m.add_argument("mountpoint")
    m.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")

    m = sub.add_parser("fsck", help="check an unmounted site")
    m.add_argument("site")
    m.add_argument("--repair", action="store_true", help="fix what has one safe fix")
    m.add_argument("--quiet", "-q", action="store_true", help="print problems only")
    return p


def _cmd_mkfs(a) -> int:
    from ..site import Site, SiteError
    from ..fs.format import BLOCK_SIZE, MAX_VOLUME_BLOCKS, MIN_VOLUME_BLOCKS
    size = parse_size(a.size)  # then rounded down to whole 4 KiB blocks
    if size < MIN_VOLUME_BLOCKS * BLOCK_SIZE:
        raise QuietError(f"size {a.size} is too small (at least 256K)", 2)
    if size // BLOCK_SIZE > MAX_VOLUME_BLOCKS:
        raise QuietError(f"size {a.size} is too large (at most 2**32-1 blocks of 4 KiB, "
                         "just under 16T)", 2)
    try:
        site = Site.create(a.site, size, inodes=a.inodes, label=a.label, force=a.force)
    except SiteError as e:
        raise QuietError(str(e)) from None
    except PermissionError as e:
        raise QuietError(f"cannot make site {a.site}: {e.strerror}"
                         f"{f' ({e.filename})' if e.filename else ''}") from None
    sb = site.superblock()
    print(f"made site {site.path}: {sb.nblocks * 4096 / 2**30:.2f} GiB volume, "
          f"{sb.ninodes - 1} inodes, label {sb.label or '-'}")
    return 0


def _cmd_mount(a) -> int:
    from ..common import MountError, check_mountpoint, setup_logging
    from ..daemon import daemonize_and_serve, serve
    from ..mountopts import MountOptionError, MountOptions
    from ..site import Site, SiteError
    try:
        opts = MountOptions.parse(",".join(a.options))
    except MountOptionError as e:
        raise QuietError(str(e), 2) from None
    if a.ro:
        opts.readonly = True
    if a.writeback_cache:
        opts.writeback_cache = True
    if opts.remount:
        return _remount(a)
    readonly, writeback = opts.readonly, opts.writeback_cache
    site = Site(a.site)
    try:
        site.check()
        site.superblock()
        mp = check_mountpoint(a.mountpoint, served=lambda path: Site(path).in_use())
    except (SiteError, MountError) as e:
        raise QuietError(str(e)) from None
    who = site.owner()
    if who:
        raise QuietError(f"site {site.path} is already mounted at {who[1]} (pid {who[0]})")
    kw = dict(readonly=readonly, writeback_cache=writeback, listen=a.listen, mount_options=opts)
    if a.foreground:
        setup_logging(a.log)
        err = []
        serve(site, mp, ready=lambda m: m and err.append(m), **kw)
        if err:
            raise QuietError(err[0])
        return 0
    err = daemonize_and_serve(site, mp, log_file=a.log, **kw)
    if err:
        raise QuietError(err)
    return 0


def _remount(a) -> int:
    """`mount -o remount,ro|rw MNT` (mount(8) runs the helper) or `repfs mount -o remount,...
    SITE MNT`: the daemon serving MNT changes its options, asked over its control port (see
    repfs/mountopts.py)."""
    from ..common import repfs_mounts
    from ..site import Site
    from .admin import Target, _resolve, call
    mp = os.path.realpath(a.mountpoint)
    mounts = repfs_mounts()
    if mp not in mounts:
        raise QuietError(f"cannot remount {a.mountpoint}: not a repfs mount point")
    if os.geteuid() != 0:
        raise QuietError(f"cannot remount {a.mountpoint}: only root may (the site's daemon "
                         "runs as root)")
    site = Site(mounts[mp])
    who = site.owner()
    if who is None or os.path.realpath(who[1]) != mp:
        raise QuietError(f"cannot remount {a.mountpoint}: no repfs daemon serves it as its "
                         "site's mount (a snapshot's mount stays read-only)")
    # (checked by _cmd_mount; the daemon applies them over the mount's current options)
    options = ",".join(a.options)
    words = [o.strip() for o in options.split(",")]
    ro = True if a.ro else next((w == "ro" for w in reversed(words) if w in ("ro", "rw")), None)
    how = {True: " read-only", False: " read-write", None: ""}[ro]
    try:
        t = _resolve(str(site.path), None)
        t = Target(t.site, t.address, t.token, timeout=REMOUNT_TIMEOUT, tls=t.tls)
        call(t, "POST", "/remount", {"options": options, "readonly": ro})
    except QuietError as e:
        raise QuietError(f"cannot remount {a.mountpoint}{how}: {e}", e.code) from None
    return 0


def _cmd_umount(a) -> int:
    from ..common import repfs_mounts
    from ..site import Site
    mp = os.path.realpath(a.mountpoint)
    mounts = repfs_mounts()
    if mp not in mounts:
        raise QuietError(f"{a.mountpoint} is not a repfs mount point")
    site = Site(mounts[mp])
    who = site.owner()
    deadline = time.monotonic() + 3
    while True:  # "busy" is often a process that is just exiting: try again for a moment
        r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
        if r.returncode == 0 or "busy" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        if who is None:  # the daemon is gone (killed): clear the dead mount
            z = subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, text=True)
            if z.returncode == 0:  # (another user, who cannot see the daemon, gets its error)
                return 0
        raise QuietError(f"cannot unmount {a.mountpoint}: {msg.removeprefix('fusermount3: ')}")
    if who:
        deadline = time.monotonic() + a.timeout
        # until the daemon has let go of the site's lock (it removes its pid file first,
        # so owner() says None a moment before fsck or a new mount can take the site)
        while site.in_use():
            if time.monotonic() > deadline:
                raise QuietError(f"unmounted, but daemon pid {who[0]} has not exited after "
                                 f"{a.timeout:.0f} s")
            time.sleep(0.05)
    return 0


def _cmd_fsck(a) -> int:
    from ..fs.fsck import CHECKS, Fsck
    from ..site import Site, SiteError
    site = Site(a.site)
    try:
        site.lock()
    except SiteError as e:
        raise QuietError(str(e), FSCK_OPERATIONAL_ERROR) from None
    try:
        try:
            fs = site.open_fs(readonly=not a.repair)
        except SiteError as e:
            raise QuietError(str(e), FSCK_OPERATIONAL_ERROR) from None
        try:
            checker = Fsck(fs, repair=a.repair)
            report = checker.run()
            from ..snap.layer import SnapLayer
            orphans = fs.dev.find_layer(SnapLayer).store.orphans_removed
        finally:
            fs.close()
            fs.dev.close()
    finally:
        site.unlock()
    for note in report.notes:
        print(f"note: {note}")
    for name, size in orphans:  # (removed when the site was opened, as a mount does)
        print(f"note: removed save/{name} ({size} bytes), which no snapshot owned "
              f"(left by a crash)")
    for name in CHECKS:
        probs = [p for p in report.problems if p.check == name]
        if not a.quiet:
            print(f"{name:22s} {'ok' if not probs else f'{len(probs)} problem(s)'}")
        for p in probs:
            print(f"  {'repaired: ' if p.repaired else ''}{p.message}")
    code = report.exit_code
    if not a.quiet or code:
        print({0: "clean", 1: "all problems repaired",
               4: "problems remain" + ("" if a.repair else " (run with --repair)")}[code])
    return code


def _main(argv) -> int:
    a = _parser().parse_args(argv)
    return {"mkfs": _cmd_mkfs, "mount": _cmd_mount, "umount": _cmd_umount,
            "fsck": _cmd_fsck}[a.cmd](a)


def main(argv=None) -> int:
    sys.exit(run_cli("repfs", _main, sys.argv[1:] if argv is None else argv))


def mount_helper(argv=None) -> int:
    """mount(8) helper: `mount -t fuse.repfs SITE MNT -o OPTS` runs `mount.fuse.repfs SITE MNT
    -o OPTS`, which becomes `repfs mount SITE MNT -o OPTS`."""
    args = sys.argv[1:] if argv is None else argv
    rest = ["mount"]
    # On a remount mount(8) hands over the whole list the mount is to end with (the mount's
    # options merged with the new ones): an absent 'nosuid' means 'suid' (`mount -o
    # remount,exec` passes the list without 'noexec'), so start a remount from the defaults.
    remount = any("remount" in args[j + 1].split(",") for j in range(len(args) - 1)
                  if args[j] == "-o")
    i = 0
    while i < len(args):
        if args[i] == "-o" and i + 1 < len(args):
            rest += ["-o", ("suid,dev,exec,async," if remount else "") + args[i + 1]]
            i += 2
        elif args[i] in ("-n", "-v", "-f", "-s"):  # mount(8) flags: no mtab, verbose, fake...
            i += 1
        else:
            rest.append(args[i])
            i += 1
    sys.exit(run_cli("mount.fuse.repfs", _main, rest))
