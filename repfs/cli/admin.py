"""`repfs-admin --site TARGET VERB ...`: administer a running site over its control port.

TARGET is HOST:PORT, a site directory or a repfs mount point. For a site directory or a mount
point the address and the token come from the site (``control.json``, ``control.token``); for
HOST:PORT the token comes from ``--token-file`` or the environment variable REPFS_TOKEN.
The `group` and `route` verbs (docs/security.md) change a local site's files themselves,
mounted or not, and go through the control port only for a HOST:PORT target.
Tables for people; ``--json`` prints one JSON document for scripts. Exit status: 0 success,
1 the operation failed (the message says why), 2 bad arguments, 3 no daemon to ask (the site
is not mounted, nothing listens at HOST:PORT), 4 the daemon did not answer within --timeout
seconds or dropped the connection (whether the operation happened is unknown).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import ssl
import sys
import time
from urllib.parse import quote

from . import QuietError, run_cli


STALL_SECONDS = 60  # replicate start gives up waiting (the copy goes on) after this
TIMEOUT = 120.0  # default --timeout: seconds the daemon has to answer a request
NO_DAEMON, NO_ANSWER = 3, 4  # exit statuses (see the module's docstring)
VERIFY_TIMEOUT = 3600.0  # verify's --timeout unless given
FAILOVER_TIMEOUT = 3600.0  # failover's --timeout unless given (it plays what was received)


def _timeout(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 0 < v <= 86400):
        raise argparse.ArgumentTypeError(f"bad timeout {text!r}: want seconds, more than 0 and "
                                         "at most 86400")
    return v


def _bwlimit(text: str | None) -> int | None:
    """--bwlimit: bytes per second (10M, 512K), or 0 / none for no limit."""
    if text is None:
        return None
    if text.strip().lower() in ("0", "none", "off"):
        return 0
    from . import parse_size
    rate = parse_size(text)
    if rate < 64 << 10:
        raise QuietError(f"--bwlimit {text}: at least 64K bytes per second (or 0 for none)", 2)
    return rate


def _seconds(text: str) -> float:
    """A time setting: finite seconds, from 0 to ten years (what the control port accepts)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 0 <= v <= 10 * 365 * 86400):
        raise argparse.ArgumentTypeError(f"bad time {text!r}: want seconds, from 0 to ten "
                                         "years")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise QuietError(message, 2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="repfs-admin", description="Administer a repfs site.")
    p.add_argument("--site", metavar="TARGET",  # (required but by `tls init`: _main)
                   help="HOST:PORT, a site directory or a repfs mount point")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--token-file", help="control token (for a HOST:PORT target)")
    # TLS to a HOST:PORT target whose site.toml has [tls] (all three; docs/security.md); a
    # site directory's own [tls] is used without them
    p.add_argument("--tls-ca", metavar="FILE", help="the CA that signed the daemon's "
                                                    "certificate (HOST:PORT over TLS)")
    p.add_argument("--tls-cert", metavar="FILE", help="our certificate (signed by that CA)")
    p.add_argument("--tls-key", metavar="FILE", help="our certificate's key")
    p.add_argument("--timeout", type=_timeout, default=TIMEOUT, metavar="SECONDS",
                   dest="request_timeout",  # (not `timeout`: replicate policy has its own)
                   help=f"give up when the daemon does not answer a request within this "
                        f"(default {TIMEOUT:g})")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    sub.add_parser("status", help="what the site is, how full, its snapshots")
    snap = sub.add_parser("snapshot", help="snapshots of the file system")
    ss = snap.add_subparsers(dest="action", required=True, parser_class=_Parser)
    c = ss.add_parser("create", help="take a snapshot (at a consistency point)")
    c.add_argument("name")
    c.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                   help="an attribute to stamp on the snapshot (repeatable)")
    ss.add_parser("list", help="the snapshots, oldest first")
    d = ss.add_parser("delete", help="delete a snapshot (the others read the same after)")
    d.add_argument("name")
    r = ss.add_parser("restore", help="bring the live file system back to a snapshot")
    r.add_argument("name")
    m = ss.add_parser("mount", help="mount a snapshot read-only")
    m.add_argument("name")
    m.add_argument("mountpoint")
    cl = ss.add_parser("clone", help="make a new, independent, writable site from a snapshot "
                                     "(DR drills; replication goes on)")
    cl.add_argument("name")
    cl.add_argument("newsite", metavar="NEWSITE",
                    help="the new site's directory on the daemon's host (absent or empty)")
    cl.add_argument("--label", help="the clone's volume label (default: the snapshot's)")
    df = ss.add_parser("diff", help="what changed from snapshot L to snapshot M (or live)")
    df.add_argument("older")
    df.add_argument("younger", nargs="?", help="a younger snapshot (default: the live file system)")
    df.add_argument("--no-paths", action="store_true", help="count blocks only")
    rp = sub.add_parser("replicate", help="replication to secondary sites")
    rs = rp.add_subparsers(dest="action", required=True, parser_class=_Parser)
    st = rs.add_parser("start", help="make SITE a secondary: initial copy, then delta sets")
    st.add_argument("--to", required=True, metavar="SITE",
                    help="the secondary's site directory, or HOST:PORT[,HOST:PORT...] of "
                         "sites on other hosts (their daemons' --listen addresses)")
    st.add_argument("--group", help="the replication group of remote destinations (required "
                                    "with HOST:PORT; see repfs-admin group)")
    st.add_argument("--name", help="destination name (default: the site directory's name, "
                                   "or HOST:PORT)")
    st.add_argument("--force", action="store_true",
                    help="replace the content of a site that holds files or replicates")
    st.add_argument("--no-wait", action="store_true", help="return before the initial copy ends")
    sp = rs.add_parser("stop", help="stop replicating (the secondary stays consistent)")
    sp.add_argument("--to", metavar="NAME", help="one destination (default: all)")
    po = rs.add_parser("policy", help="show or set when delta sets are cut / played back")
    po.add_argument("--timeout", type=_seconds, help="primary: cut after this many seconds")
    po.add_argument("--hwm", help="primary: cut when this much data changed (e.g. 64M)")
    po.add_argument("--playback-timeout", type=_seconds,
                    help="secondary: play back a delta set this many seconds after it arrived")
    po.add_argument("--playback-hwm", help="secondary: or once this much data waits (e.g. 64M)")
    po.add_argument("--retention", type=_seconds,
                    help="primary: seconds to keep delta-set block lists (default 7 days)")
    po.add_argument("--to", metavar="NAME",
                    help="primary: show or set destination NAME's own policy (--bwlimit, "
                         "--compress)")
    po.add_argument("--bwlimit", metavar="RATE",
                    help="with --to: at most RATE bytes per second to it, e.g. 10M (binary "
                         "units; at least 64K), 0 or none: no limit")
    po.add_argument("--compress", choices=("on", "off"),
                    help="with --to: compress chunks on the wire to it (zstd, where it pays; "
                         "on by default)")
    ds = rs.add_parser("deltaset", help="cut a delta set now")
    ds.add_argument("--no-wait", action="store_true", help="do not wait until it is ready")
    gp = sub.add_parser("group", help="replication groups: a name and a secret shared by sites")
    gs = gp.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ga = gs.add_parser("add", help="add a group (FILE's secret; a new one if FILE is absent)")
    ga.add_argument("name")
    ga.add_argument("--secret-file", required=True, metavar="FILE",
                    help="the group's secret (one line); written, mode 0600, if absent")
    ga.add_argument("--force", action="store_true", help="replace the group's other secret")
    gs.add_parser("list", help="the site's groups (never their secrets)")
    gd = gs.add_parser("delete", help="remove a group's secret from the site")
    gd.add_argument("name")
    ro = sub.add_parser("route", help="where the site forwards a group's delta sets (rcproute)")
    rr = ro.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ra = rr.add_parser("add", help="forward GROUP's delta sets to NEXTHOP too")
    ra.add_argument("group")
    ra.add_argument("next_hop", metavar="NEXTHOP", help="HOST:PORT of the next site")
    rr.add_parser("list", help="each group's next hops")
    rd = rr.add_parser("delete", help="remove a route (all of GROUP's without NEXTHOP)")
    rd.add_argument("group")
    rd.add_argument("next_hop", nargs="?", metavar="NEXTHOP")
    vf = sub.add_parser("verify", help="compare a secondary with this primary block by block "
                                       "at a delta-set boundary (exit 1: they differ)")
    vf.add_argument("--to", required=True, metavar="DEST",
                    help="the destination: its name, site directory or HOST:PORT")
    vf.add_argument("--repair", action="store_true",
                    help="re-send the differing blocks, then verify again")
    vf.add_argument("--wait", type=_seconds, metavar="SECONDS",
                    help="how long to wait for DEST to play a delta set (default 120; "
                         "--timeout defaults to 3600 for verify)")
    fo = sub.add_parser("failover", help="at a secondary: become the primary (a new "
                                         "generation), on the same mount (docs/recovery.md)")
    fo.add_argument("--sync", action="store_true",
                    help="lose nothing: the primary (which must be up) turns read-only and "
                         "ships its last delta set first")
    fo.add_argument("--now", action="store_true",
                    help="do not play the delta sets received but not yet played (they are "
                         "discarded, and reported)")
    fo.add_argument("--dry-run", action="store_true",
                    help="say what would happen; change nothing")
    rs = sub.add_parser("resync", help="at a new primary (after failover): bring the old "
                                       "primary up to date, shipping only the blocks that "
                                       "differ (docs/recovery.md)")
    rs.add_argument("--peer", required=True, metavar="OLDPRIMARY",
                    help="the old primary: its site directory, or HOST:PORT")
    rs.add_argument("--group", help="the replication group to reach it in (default: the "
                                    "one it replicated to this site in)")
    rs.add_argument("--dry-run", action="store_true",
                    help="say which blocks and files would be discarded on the old primary "
                         "and what would cross the wire; change nothing")
    sw = sub.add_parser("switchover", help="at a primary: hand the primary role to a "
                                           "destination, losing nothing, no full copy "
                                           "(docs/recovery.md)")
    sw.add_argument("--to", required=True, metavar="DEST",
                    help="the destination that takes over (its name in status)")
    sub.add_parser("failback", help="at a primary that failed over: give the primary role "
                                    "back to the old primary it resynced (docs/recovery.md)")
    cp = sub.add_parser("copy", help="ship a snapshot (or its changes since an older one) "
                                     "to another site (fs_copy; docs/recovery.md)")
    cp.add_argument("snapshot", metavar="SNAP", help="the snapshot to copy")
    cp.add_argument("--to", required=True, metavar="PEER",
                    help="the site that gets it: its site directory, or HOST:PORT")
    cp.add_argument("--base", metavar="OLDER",
                    help="send only the blocks changed since snapshot OLDER, of which PEER "
                         "holds a copy from this site")
    cp.add_argument("--group", help="the replication group to reach a HOST:PORT peer in")
    cp.add_argument("--force", action="store_true",
                    help="replace the content of a peer that holds files or replicates")
    cp.add_argument("--bwlimit", metavar="RATE", help="bytes per second (10M, 512K)")
    cp.add_argument("--dry-run", action="store_true",
                    help="check, and say how many blocks would be sent; change nothing")
    pl = sub.add_parser("pull", help="at a copy: bring it up to its source's youngest snapshot "
                                     "(only the changed blocks while the source holds this "
                                     "copy's snapshot; docs/recovery.md)")
    pl.add_argument("--from", required=True, dest="peer", metavar="PEER",
                    help="the source: its site directory, or HOST:PORT")
    pl.add_argument("--group", help="the replication group to reach a HOST:PORT source in "
                                    "(this site must listen: repfs mount --listen)")
    pl.add_argument("--min-interval", type=_seconds, metavar="SECONDS",
                    help="ask only if the last update or check is older than this (Tmin)")
    pl.add_argument("--dry-run", action="store_true",
                    help="say what the source would send; change nothing")
    tl = sub.add_parser("tls", help="certificates for TLS (no --site needed)")
    ts = tl.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ti = ts.add_parser("init", help="make a CA in DIR (if it has none) and a certificate "
                                    "for one site (or an administrator) signed by it")
    ti.add_argument("dir", metavar="DIR", help="where the CA and the certificates live")
    ti.add_argument("--site-name", required=True, metavar="NAME",
                    help="the certificate's name: DIR/NAME.pem, DIR/NAME.key")
    ti.add_argument("--host", required=True, metavar="HOST[,HOST...]",
                    help="the host names and IP addresses clients dial to reach the site")
    ti.add_argument("--days", type=int, default=825, help="validity (default 825)")
    return p


# ----------------------------------------------------------------------------- reaching it

class Target:
    def __init__(self, site=None, address=None, token=None, timeout: float = TIMEOUT,
                 tls=None):
        self.site = site
        self.address = address
        self.token = token
        self.timeout = timeout
        self.tls = tls  # (ssl context, the certificate pinned or None) (rcp/tls.py)


def _tls_of(site, a) -> tuple | None:
    """The TLS a request to the target uses: a site directory's own [tls] (the daemon must
    present the site's certificate), or --tls-ca/--tls-cert/--tls-key for HOST:PORT (the
    daemon's certificate must be signed by that CA and name HOST); None: plain."""
    from ..rcp import tls
    try:
        if site is not None:
            return tls.site_client(site.path)
        given = [x for x in (a.tls_ca, a.tls_cert, a.tls_key) if x]
        if not given:
            return None
        if len(given) != 3:
            raise QuietError("--tls-ca, --tls-cert and --tls-key go together (all three)", 2)
        from pathlib import Path
        return tls.client_context(tls.TlsFiles(Path(a.tls_cert), Path(a.tls_key),
                                               Path(a.tls_ca))), None
    except tls.TlsError as e:
        raise QuietError(str(e)) from None


def _tls_init(a) -> dict:
    from ..rcp import tls
    hosts = [h.strip() for h in a.host.split(",") if h.strip()]
    try:
        made_ca, files = tls.init(a.dir, a.site_name, hosts, days=a.days)
    except tls.TlsError as e:
        raise QuietError(str(e)) from None
    out = {"ca_made": made_ca, "ca": str(files.ca), "cert": str(files.cert),
           "key": str(files.key), "hosts": hosts}
    if not a.json:
        if made_ca:
            print(f"made a CA: {files.ca} (its key {files.ca.with_suffix('.key')}, mode 0600: "
                  "keep it off the sites)")
        print(f"made {files.cert} and {files.key} for {a.site_name} ({', '.join(hosts)})")
        print("add to the site's site.toml (copy the three files to its host first):")
        print(f'[tls]\ncert = "{files.cert}"\nkey = "{files.key}"\nca = "{files.ca}"')
    return out


def _resolve(target: str, token_file: str | None) -> Target:
    from ..common import mount_site, repfs_mounts
    from ..site import Site
    if os.path.exists(target):
        real = os.path.realpath(target)
        mounts = repfs_mounts()
        if real in mounts:  # a site's mount, or a snapshot's (SITE@NAME)
            site = Site(mount_site(mounts[real]))
            if not os.access(site.path, os.X_OK):  # (not "no daemon": its lock is unreadable)
                raise QuietError(f"{site.path}: permission denied (only the site's owner, "
                                 "usually root, may use it)")
        else:
            site = Site(real)
            try:
                is_site = site.volume_path.is_file()
            except PermissionError:  # (a site's directory is 0700)
                raise QuietError(f"{target}: permission denied (only the site's owner, "
                                 "usually root, may use it)") from None
            if not is_site:
                raise QuietError(f"{target} is neither a repfs site directory nor a repfs "
                                 "mount point")
        addr = site.control_address()
        token = None
        if addr:
            from ..control import token_file_problem
            problem = token_file_problem(site.path / "control.token", owner=False)
            if problem:
                raise QuietError(problem)
            try:
                token = (site.path / "control.token").read_text().strip()
            except OSError as e:
                raise QuietError(f"cannot read the control token of {site.path}: "
                                 f"{e.strerror}") from None
        # (the site's own [tls]: its daemon's port speaks TLS only)
        return Target(site, addr, token, tls=_tls_of(site, None) if addr else None)
    m = re.fullmatch(r"\[?([\w.\-:]+?)\]?:(\d{1,5})", target)
    if not m:
        raise QuietError(f"{target} is not HOST:PORT, a site directory or a mount point", 2)
    token = os.environ.get("REPFS_TOKEN")
    if token_file:
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise QuietError(f"cannot read {token_file}: {e.strerror}") from None
    if not token:
        raise QuietError("a HOST:PORT target needs the site's control token "
                         "(--token-file FILE or REPFS_TOKEN)", 2)
    return Target(None, (m.group(1), int(m.group(2))), token)


def call(t: Target, method: str, path: str, body: dict | None = None):
    if t.address is None:
        raise QuietError(f"no daemon: site {t.site.path} is not mounted (mount it with: "
                         f"repfs mount {t.site.path} MOUNTPOINT)", NO_DAEMON)
    host, port = t.address
    if t.tls is not None:  # (the daemon's port speaks TLS only: rcp/tls.py)
        conn = http.client.HTTPSConnection(host, port, timeout=t.timeout, context=t.tls[0])
    else:
        conn = http.client.HTTPConnection(host, port, timeout=t.timeout)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {t.token}", "Content-Type": "application/json"}
    try:
        if t.tls is not None:
            conn.connect()
            if t.tls[1] is not None and conn.sock.getpeercert(binary_form=True) != t.tls[1]:
                raise QuietError(f"TLS with the daemon at {host}:{port} failed: it presents "
                                 f"another certificate than the site's [tls] cert")
        conn.request(method, "/v1" + path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except TimeoutError:
        raise QuietError(f"the daemon at {host}:{port} did not answer in {t.timeout:g} s (busy "
                         "or wedged? see its repfs.log; --timeout SECONDS waits longer)",
                         NO_ANSWER) from None
    except ConnectionRefusedError:
        raise QuietError(f"no daemon at {host}:{port}: nothing listens there (is the site "
                         "mounted?)", NO_DAEMON) from None
    except ssl.SSLError as e:
        from ..rcp.tls import reason
        raise QuietError(f"TLS with the daemon at {host}:{port} failed: {reason(e)}") from None
    except (http.client.HTTPException, ConnectionError) as e:
        raise QuietError(f"the daemon at {host}:{port} closed the connection without an "
                         f"answer ({e or type(e).__name__}); see its repfs.log",
                         NO_ANSWER) from None
    except OSError as e:
        raise QuietError(f"cannot reach the daemon at {host}:{port}: "
                         f"{e.strerror or e}", NO_DAEMON) from None
    finally:
        conn.close()
    try:
        doc = json.loads(raw)
    except ValueError:
        raise QuietError(f"the daemon answered {resp.status} with a non-JSON body") from None
    if resp.status != 200:
        raise QuietError(doc.get("error", f"HTTP {resp.status}") if isinstance(doc, dict)
                         else f"HTTP {resp.status}")
    return doc


# ----------------------------------------------------------------------------- printing

def _human(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def _print_snapshots(snaps: list[dict]) -> None:
    if not snaps:
        print("no snapshots")
        return
    rows = [[s["name"], s["id"], s["created"], _human(s["save_bytes"]),
             ",".join(f"{k}={v}" for k, v in s["attrs"].items()) or "-"] for s in snaps]
    print(_table(rows, ["NAME", "ID", "CREATED (UTC)", "SAVED", "ATTRS"]))


def offline_status(site) -> dict:
    from ..site import SiteError
    try:
        sb = site.superblock()
    except SiteError as e:
        raise QuietError(str(e)) from None
    usable = sb.nblocks - sb.data_start
    return {
        "site": str(site.path), "label": sb.label, "uuid": sb.uuid.hex(),
        "state": "not mounted", "mountpoint": None, "pid": None,
        "volume_bytes": sb.nblocks * 4096, "used_bytes": (usable - sb.free_blocks) * 4096,
        "free_bytes": sb.free_blocks * 4096, "inodes": sb.ninodes - 1,
        "free_inodes": sb.free_inodes, "format_version": sb.version,
    }


def _print_status(st: dict) -> None:
    rows = [
        ("site", st["site"]), ("label", st["label"] or "-"), ("state", st["state"]
                                                              + (" (read-only)" if st.get("readonly") else "")),
        ("mount point", st["mountpoint"] or "-"), ("daemon pid", st["pid"] or "-"),
        ("volume", _human(st["volume_bytes"])),
        ("used", f"{_human(st['used_bytes'])} ({_human(st['free_bytes'])} free)"),
        ("inodes", f"{st['inodes'] - st['free_inodes']} used of {st['inodes']}"),
    ]
    if st.get("replication_status_error"):
        rows.append(("replication", f"cannot report: {st['replication_status_error']} "
                                    f"(see the TASK table and the site log)"))
    elif "role" in st:
        rows.append(("role", f"{st['role']} (generation {st['generation']})"))
        if st["role"] == "primary":
            rows.append(("delta sets", f"current {st['current_delta_set']} "
                         f"({st['current_delta_set_blocks']} blocks changed), last cut "
                         f"{st['last_cut_delta_set']}"))
            rows.append(("chunk area", f"{_human(st['chunk_area_bytes'])} of "
                         f"{_human(st['chunk_area_capacity_bytes'])}"
                         + ("  FLOW CONTROL: cutting paused" if st["flow_control"] else "")))
            rows.append(("send rate", f"{_human(st['send_rate_bytes_per_s'])}/s"))
            if st["cut_stall_ms"]["count"]:
                rows.append(("cut stall", f"p50 {st['cut_stall_ms']['p50']} ms, "
                             f"p99 {st['cut_stall_ms']['p99']} ms"))
        else:
            source = (st.get("primary") or {}).get("site", "-")
            rows.append(("replication", f"stopped (it was replicating from {source})"
                         if st["replication_state"] == "stopped"
                         else f"{st['replication_state']} from {source}"))
            rows.append(("delta sets", f"received {st['last_received_delta_set']}, played "
                         f"{st['last_played_delta_set']}"))
        rows.append(("lag", f"{st['lag_seconds']:.1f} s"))
    if st.get("restart_point"):  # (recovery/failover.py)
        rp = st["restart_point"]
        rows.append(("restart point", f"{rp['snapshot']} (delta set {rp['delta_set']}, "
                                      f"generation {rp['generation']}, {rp['at']})"))
    if st.get("last_failover"):
        fo = st["last_failover"]
        rows.append(("last failover", f"{fo['state']} ({fo['completed'] or fo['started']}): "
                                      f"generation {fo['from_generation']} -> "
                                      f"{fo['generation']}; {_lost_line(fo.get('lost'))}"))
    if "snapshots" in st:
        rows.append(("snapshots", str(len(st["snapshots"]))))
        rows.append(("save volumes", f"{_human(st['save_used_bytes'])} used of "
                                     f"{_human(st['save_capacity_bytes'])}"))
    if st.get("security_warning"):  # listening beyond loopback without TLS
        rows.insert(3, ("WARNING", st["security_warning"]))
    if st.get("fenced"):  # a peer holds a newer generation: say so first
        rows.insert(3, ("FENCED", f"{st['fenced']} (since {st['fenced_at']}): read-only, a "
                                  f"stale primary; resync it from the new one"))
    if st.get("fs_error"):  # errors=remount-ro: say so first
        rows.insert(3, ("FILE SYSTEM", f"READ-ONLY after an error at {st['fs_error_at']}: "
                                       f"{st['fs_error']}; remount the site"))
    for k, v in rows:
        print(f"{k:13s} {v}")
    tasks = st.get("tasks") or {}
    if any(t["last_error"] or t["state"] not in ("running", "done") for t in tasks.values()):
        print()
        rows = [[name, t["state"], t["errors"],
                 f"{t['last_error']} (at {t['last_error_at']})" if t["last_error"] else "-"]
                for name, t in tasks.items()]
        print(_table(rows, ["TASK", "STATE", "ERRORS", "LAST ERROR"]))
    for q in st.get("quarantined_delta_sets") or []:
        print(f"delta set {q['delta_set']} quarantined at {q['at']} ({q['reason']}); kept in "
              f"{q['file']}, asked for again")
    cp = st.get("copy")  # a snapshot copy being sent (repfs/recovery/copy.py)
    if cp:
        n = cp["blocks_to_send"]
        print(f"copying snapshot {cp['snapshot']}"
              + (f" (its changes since {cp['base']})" if cp.get("base") else "")
              + f" to {cp['to']}: {cp['sent_blocks']} of {n} blocks sent"
              + (f" ({100 * cp['sent_blocks'] / n:.0f}%)" if n else ""))
    if st.get("peers"):  # "is my data safe": every peer, its generation and state
        print()
        print(_table([[p.get("peer") or "-", p.get("role"), p.get("generation") or "-",
                       p.get("state")] for p in st["peers"]],
                     ["PEER", "ROLE", "GENERATION", "STATE"]))
    fwd = st.get("forwarding") or {}
    for title, dests in (("DESTINATION", st.get("destinations")),
                         ("NEXT HOP", fwd.get("next_hops"))):
        if dests:
            print()
            print(_table(_route_rows(dests), [title, "STATE", "ACKED", "PLAYED", "LAG",
                                              "BWLIMIT", "SITE"]))
    if fwd.get("flow_control"):
        print(f"forwarding: FLOW CONTROL: {fwd['flow_control']}")
    for hop, why in (fwd.get("not_started") or {}).items():
        print(f"next hop {hop} not started: {why}")
    if st.get("outstanding_delta_sets"):
        print()
        rows = [[x["delta_set"], x.get("state", "received"), x["blocks"], x["created"],
                 x.get("ready") or x.get("received") or "-"] for x in st["outstanding_delta_sets"]]
        print(_table(rows, ["DELTA SET", "STATE", "BLOCKS", "CREATED", "READY/RECEIVED"]))
    if st.get("snapshots"):
        print()
        _print_snapshots(st["snapshots"])
    for name, mp in (st.get("snapshot_mounts") or {}).items():
        print(f"snapshot {name} is mounted at {mp}")


def _route_rows(dests: list, depth: int = 0) -> list[list]:
    """Destination rows, each followed by the route tree below it (a forwarder's next hops,
    indented)."""
    rows = []
    for d in dests:
        state = d["state"] or "-"
        if d.get("copy_progress"):
            cp = d["copy_progress"]
            state += f" {100.0 * cp['position'] / max(1, cp['volume_blocks']):.0f}%"
        if d.get("resync") and d["state"] in ("initial-copy", "resync-attach"):
            state = state.replace("initial-copy", "resyncing")
        if d.get("bypass_of"):
            state += f" (bypassing {d['bypass_of']})"
        if d.get("error"):
            state += f" ({d['error']})"
        lag = d.get("lag_seconds")
        name = d.get("name") or d.get("site") or "?"
        rows.append([("  " * depth + "└ " if depth else "") + name, state,
                     d.get("acked_delta_set"), d.get("played_delta_set"),
                     "-" if lag is None else f"{lag:.1f}s",
                     f"{_human(d['bwlimit'])}/s" if d.get("bwlimit") else "-",
                     d.get("site") or "-"])
        rows.extend(_route_rows(d.get("hops") or [], depth + 1))
    return rows


# ----------------------------------------------------------------------------- verbs

def _main(argv) -> int:
    argv = list(argv)
    want_json = "--json" in argv  # accepted before or after the verb
    argv = [x for x in argv if x != "--json"]
    a = _parser().parse_args(argv)
    a.json = want_json
    if a.verb == "tls":
        out = _tls_init(a)
        if a.json:
            print(json.dumps(out, indent=2))
        return 0
    if a.site is None:
        raise QuietError("the following arguments are required: --site", 2)
    t = _resolve(a.site, a.token_file)
    t.timeout = a.request_timeout
    if t.site is None:  # (a site's own [tls] is _resolve's)
        t.tls = _tls_of(None, a)
    out = None
    if a.verb == "status":
        out = call(t, "GET", "/status") if t.address or t.site is None else offline_status(t.site)
        if not a.json:
            _print_status(out)
    elif a.verb == "snapshot":
        act = a.action
        if act == "create":
            attrs = {}
            for kv in a.attr:
                k, sep, v = kv.partition("=")
                if not sep or not k:
                    raise QuietError(f"bad --attr {kv!r} (want KEY=VALUE)", 2)
                attrs[k] = v
            out = call(t, "POST", "/snapshots", {"name": a.name, "attrs": attrs})
            if not a.json:
                print(f"snapshot {out['name']} created (id {out['id']}, {out['created']})")
        elif act == "list":
            out = call(t, "GET", "/snapshots")
            if not a.json:
                _print_snapshots(out)
        elif act == "delete":
            out = call(t, "DELETE", f"/snapshots/{quote(a.name, safe='')}")
            if not a.json:
                print(f"snapshot {a.name} deleted ({out['moved_blocks']} before-images moved "
                      "to the next older snapshot)")
        elif act == "restore":
            if not a.json:
                print(f"restoring snapshot {a.name} (writers wait until it is done) ...",
                      flush=True)
            t0 = time.monotonic()
            out = call(t, "POST", f"/snapshots/{quote(a.name, safe='')}/restore")
            if not a.json:
                print(f"restored {out['blocks']} blocks in {time.monotonic() - t0:.1f} s; "
                      "the mount shows the snapshot's tree")
        elif act == "mount":
            mp = os.path.abspath(a.mountpoint)
            out = call(t, "POST", f"/snapshots/{quote(a.name, safe='')}/mount",
                       {"mountpoint": mp})
            if not a.json:
                print(f"snapshot {a.name} mounted read-only at {out['mountpoint']} "
                      f"(unmount with: repfs umount {out['mountpoint']})")
        elif act == "clone":
            if a.label is not None and (len(a.label.encode(errors="surrogateescape")) > 64
                                        or not a.label.isprintable()):
                raise QuietError(f"bad --label {a.label!r}: at most 64 bytes of printable "
                                 "UTF-8", 2)
            if t.timeout == TIMEOUT:  # (it copies every valid block of the snapshot)
                t.timeout = FAILOVER_TIMEOUT
            body = {"newsite": os.path.abspath(a.newsite)}
            if a.label is not None:
                body["label"] = a.label
            out = call(t, "POST", f"/snapshots/{quote(a.name, safe='')}/clone", body)
            if not a.json:
                print(f"cloned snapshot {a.name} into {out['clone']}: {out['blocks']} blocks "
                      f"({out['bytes'] / 2**20:.1f} MiB) in {out['seconds']:.1f} s; "
                      f"volume uuid {out['uuid']} (a new site: primary, no destinations, no "
                      f"snapshots)")
                print(f"mount it with: repfs mount {out['clone']} MOUNTPOINT")
        elif act == "diff":
            q = f"?to={quote(a.younger, safe='')}" if a.younger else "?to=live"
            q += "&paths=0" if a.no_paths else ""
            out = call(t, "GET", f"/snapshots/{quote(a.older, safe='')}/diff{q}")
            if not a.json:
                print(f"{out['changed_blocks']} blocks changed from {out['from']} to {out['to']}")
                for p in out.get("paths", []):
                    print(f"  {p['change']:9s} {p['path']}")
    elif a.verb == "replicate":
        out = _replicate(t, a)
    elif a.verb == "group":
        out = _group(t, a)
    elif a.verb == "route":
        out = _route(t, a)
    elif a.verb == "verify":
        out = _verify(t, a)
    elif a.verb == "failover":
        out = _failover(t, a)
    elif a.verb == "resync":
        out = _resync(t, a)
    elif a.verb in ("copy", "pull"):
        out = _copy(t, a)
    elif a.verb in ("switchover", "failback"):
        if t.timeout == TIMEOUT:  # (the peer plays the last delta set and resyncs this one)
            t.timeout = FAILOVER_TIMEOUT
        out = (call(t, "POST", "/switchover", {"to": a.to}) if a.verb == "switchover"
               else call(t, "POST", "/failback", {}))
        if not a.json:
            if out.get("already"):
                print(f"already switched over: this site is a secondary of {out['switched_to']}")
            else:
                fo = out.get("failover") or {}
                print(f"{out['switched_to']} is the primary now (generation "
                      f"{fo.get('generation')}); this site is its secondary")
                print(_lost_line(fo.get("lost")))
    if a.json:
        print(json.dumps(out, indent=2))
    if a.verb == "verify" and not out["in_sync"]:
        return 1  # (they differ: said on stdout)
    return 0


def _failover(t: Target, a) -> dict:
    """`failover [--sync] [--now] [--dry-run]` at a secondary (repfs/recovery/failover.py)."""
    if t.timeout == TIMEOUT:  # (not given: --sync waits for the last delta set to arrive,
        t.timeout = FAILOVER_TIMEOUT  # then everything received is played)
    out = call(t, "POST", "/failover", {"sync": a.sync, "now": a.now, "dry_run": a.dry_run})
    if a.json:
        return out
    if out.get("dry_run"):
        print(f"failover of {out['site']} (dry run: nothing changed) would:")
        for i, step in enumerate(out.get("steps") or [], 1):
            print(f"  {i}. {step}")
        if not out.get("steps"):
            print("  nothing: this site already failed over (generation "
                  f"{out['generation']})")
    elif out.get("already_done"):
        print(f"{out['site']} already failed over: it is the primary, generation "
              f"{out['generation']} (restart point {out['restart_point']}, delta set "
              f"{out['restart_delta_set']})")
    else:
        print(f"{out['site']} is now the primary, generation {out['generation']} (was "
              f"{out['from_generation']}); its mount is "
              f"{'STILL READ-ONLY (see the site log)' if out['readonly'] else 'read-write'}")
        print(f"restart point: snapshot {out['restart_point']} at delta set "
              f"{out['restart_delta_set']}")
    fence = out.get("fence") or {}
    if fence and not out.get("dry_run"):
        print(f"old primary {out.get('primary')}: {fence.get('state')}"
              + (f" ({fence['why']})" if fence.get("why") else ""))
    for x in out.get("discarded") or []:
        print(f"discarded (received, not played): delta set {x['delta_set']}, "
              f"{x['blocks']} blocks")
    if out.get("damaged"):
        print(f"damaged, not played: delta set {out['damaged']['delta_set']} "
              f"({out['damaged']['why']})")
    print(_lost_line(out.get("lost")))
    return out


def _resync(t: Target, a) -> dict:
    """`resync --peer OLDPRIMARY [--group G] [--dry-run]` at a new primary
    (repfs/recovery/resync.py)."""
    out = call(t, "POST", "/resync", {"peer": a.peer, "group": a.group,
                                      "dry_run": a.dry_run})
    if a.json:
        return out
    if out.get("warning"):
        print(out["warning"], file=sys.stderr)
    if out.get("dry_run"):
        print(f"resync of {out['peer']} (dry run: nothing changed) would:")
        if out.get("full_copy"):
            print(f"  copy every block in use: at most {_human(out['bytes_at_most'])}")
        else:
            print(f"  since delta set {out['restart_delta_set']} (the restart point): "
                  f"{out['old_primary_changed_blocks']} blocks changed on the old primary "
                  f"(discarded there), {out['new_primary_changed_blocks']} here")
            print(f"  send at most {out['blocks']} blocks "
                  f"({_human(out['bytes_at_most'])})")
            paths = out.get("discarded_paths") or []
            print(f"  discard on the old primary (kept in snapshot divergence-GEN there): "
                  f"{len(paths)} files and directories" + (":" if paths else ""))
            for path in paths[:40]:
                print(f"    {path}")
            if len(paths) > 40:
                print(f"    ... and {len(paths) - 40} more (--json lists them all)")
        return out
    if out.get("already"):
        print(f"{out['destination']}: resync already under way or done ({out['state']})")
    elif out.get("full_copy"):
        print(f"{out['destination']}: full copy started (delta set {out['stamp']})")
    else:
        print(f"{out['destination']}: resync started: {out['blocks']} blocks differ since "
              f"delta set {out['restart_delta_set']}; the old primary is a secondary of this "
              f"site and takes them as delta set {out['stamp']} (repfs-admin status: "
              f"resyncing N%)")
    return out


def _copy(t: Target, a) -> dict:
    """`copy SNAP [--base OLDER] --to PEER` at a source, `pull --from PEER` at a copy
    (repfs/recovery/copy.py)."""
    if t.timeout == TIMEOUT:  # (the command waits while the copy crosses the wire)
        t.timeout = FAILOVER_TIMEOUT
    if a.verb == "copy":
        body = {"snapshot": a.snapshot, "to": a.to if ":" in a.to and not a.to.startswith(
            "/") else os.path.abspath(a.to), "base": a.base, "group": a.group,
                "force": a.force, "dry_run": a.dry_run}
        rate = _bwlimit(a.bwlimit)
        if rate:
            body["bwlimit"] = rate
        out = call(t, "POST", "/copy", body)
    else:
        out = call(t, "POST", "/pull", {
            "from": a.peer if ":" in a.peer and not a.peer.startswith("/")
            else os.path.abspath(a.peer), "group": a.group, "min_interval": a.min_interval,
            "dry_run": a.dry_run})
    if a.json:
        return out
    if out.get("decision") == "not due":
        print(f"not asked: the copy (snapshot {out['snapshot']}) was updated or checked less "
              f"than --min-interval ago; next check in {out['next_check_in']} s")
    elif out.get("decision") == "current":
        print(f"up to date: this site holds the source's youngest snapshot {out['snapshot']}")
    elif out.get("already"):
        print(f"{out['to']} already holds snapshot {out['snapshot']} from this site")
    elif out.get("dry_run"):
        how = {"delta": "its changes only", "full": "a full copy"}.get(out.get("decision"))
        what = (f"the changes since {out['base']}" if out.get("base") else "every block in use")
        print(f"copy of snapshot {out['snapshot']} to {out['to']} (dry run: nothing changed) "
              f"would send {out['sent_blocks']} of {out['blocks']} blocks ({how or what}), "
              f"replacing {out['replaces']}")
    else:
        how = {"delta": "its changes only", "full": "a full copy: this copy's snapshot is "
               "no longer held at the source"}.get(out.get("decision"), "")
        what = (f"the changes since {out['base']}" if out.get("base") else "every block in use")
        print(f"snapshot {out['snapshot']} copied to {out['to']} ({how or what}): "
              f"{out['sent_blocks']} blocks sent"
              + (f", resumed at block {out['resumed_at_block']}" if out.get("resumed_at_block")
                 else "")
              + ("" if out.get("state") == "copied" else "; the peer is still playing it"))
    return out


def _lost_line(lost) -> str:
    """What a failover lost, in one line."""
    if not lost or not lost.get("known"):
        why = (lost or {}).get("why")
        return ("lost: cannot be told (the old primary could not be asked"
                + (f": {why})" if why else ")"))
    sets = lost.get("delta_sets") or []
    uncut = lost.get("uncut_blocks", 0)
    if not sets and not uncut:
        return "lost: nothing (every delta set the old primary cut is here)"
    parts = [f"delta sets {', '.join(str(x['delta_set']) for x in sets)}"] if sets else []
    if uncut:
        parts.append(f"{uncut} blocks written on it but never cut")
    return f"lost: {' and '.join(parts)} ({_human(lost.get('bytes', 0))} in all)"


def _verify(t: Target, a) -> dict:
    if t.timeout == TIMEOUT:  # (not given: a verify reads both volumes whole, and waits for
        t.timeout = VERIFY_TIMEOUT  # the destination to play, twice with --repair)
    to = a.to
    if "/" in to or to in (".", ".."):  # a site directory (a name or HOST:PORT has none),
        to = os.path.realpath(to)  # as the primary recorded it (resolved)
    out = call(t, "POST", "/verify", {"to": to, "repair": a.repair, "wait": a.wait})
    if a.json:
        return out
    rep = out.get("repaired")
    if rep:
        print(f"{out['destination']} differed in {rep['blocks']} blocks at delta set "
              f"{rep['before']['delta_set']}; re-sent in delta set {rep['delta_set']}")
    if out["in_sync"]:
        print(f"{out['destination']}: in sync at delta set {out['delta_set']} "
              f"({out['ranges_hashed']} range hashes compared)")
        return out
    print(f"{out['destination']}: differs at delta set {out['delta_set']}: "
          f"{out['differing_blocks']} blocks"
          + (" at least (too many to descend; whole ranges listed)" if out["truncated"]
             else ""))
    for r in out["differences"]:
        first, n = r["start"], r["count"]
        where = f"block {first}" if n == 1 else f"blocks {first}-{first + n - 1}"
        print(f"  {where}: {', '.join(r['owners']) or 'no file'}")
    if not out.get("listed_all", True):
        print("  ... (more not listed: --json has the first ones too)")
    if out["files"]:
        print(f"files: {' '.join(out['files'])}")
    if not rep:
        print(f"(repfs-admin --site {a.site} verify --to {a.to} --repair re-sends them)")
    return out


def _remote_destinations(to: str) -> list[str] | None:
    """`--to`'s HOST:PORT list, or None when it names a site directory (an existing directory,
    or anything that is not a list of HOST:PORT)."""
    if os.path.isdir(to):
        return None
    parts = to.split(",")
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or "/" in host:
            return None
    return parts


class _CopyProgress:
    """The initial copy's one updating line on a terminal (stderr): bytes sent of the total,
    the rate since the command began watching and the time left at that rate. Redrawn in
    place with a carriage return; `end` moves past it."""

    def __init__(self, name: str, stream=None):
        self.name = name
        self.stream = stream or sys.stderr
        self.first: tuple[float, int] | None = None  # (when, bytes) of the first report
        self.width = 0

    def show(self, cp: dict) -> None:
        now, sent = time.monotonic(), cp.get("copied_blocks", 0) * 4096
        total = cp.get("total_blocks")
        total = None if total is None else max(total * 4096, sent)
        if self.first is None:
            self.first = (now, sent)
        t0, s0 = self.first
        rate = (sent - s0) / (now - t0) if sent > s0 and now > t0 else None
        text = f"initial copy to {self.name}: {_human(sent)}"
        if total:
            text += f" of {_human(total)} ({100.0 * sent / total:.0f}%)"
        text += f", {_human(rate)}/s" if rate else ", rate -"
        if rate and total:
            left = int((total - sent) / rate)
            text += f", ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def end(self) -> None:
        if self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


def _replicate_wait(t: Target, a, out: dict) -> dict:
    """Wait until the initial copy of `out` (replicate start's answer) is played, showing its
    progress (on a terminal, one updating line on stderr: _CopyProgress); the destination's
    status row."""
    tty = None if a.json or not sys.stderr.isatty() else _CopyProgress(out["destination"])
    try:
        return _replicate_watch(t, a, out, tty)
    finally:
        if tty is not None:
            tty.end()


def _show_copy(cp: dict, tty, a, last: str | None) -> str | None:
    """One look at the initial copy: the terminal's line redrawn, or a plain line when it
    changed (not with --json); returns the plain line last printed."""
    pct = 100.0 * cp.get("position", 0) / max(1, cp.get("volume_blocks", 1))
    line = f"  initial copy: {pct:5.1f}% ({_human(cp.get('copied_blocks', 0) * 4096)} sent)"
    if tty is not None:
        tty.show(cp)
    elif line != last and not a.json:
        print(line, flush=True)
        return line
    return last


def _replicate_watch(t: Target, a, out: dict, tty) -> dict:
    last = None
    cp: dict = {}
    progress, since = None, time.monotonic()
    while True:
        try:
            st = call(t, "GET", "/status")
        except QuietError as e:  # (the start itself was done: say so, not only "no daemon")
            raise QuietError(f"replication to {out['destination']} started, but waiting for "
                             f"its initial copy failed: {e}; the copy goes on by itself "
                             "once the site is mounted (see repfs-admin status)",
                             e.code) from None
        d = next((x for x in st["destinations"] if x["name"] == out["destination"]), None)
        if d is None or d["state"] != "initial-copy":
            # the secondary plays the staged copy as delta set `stamp`: wait for it
            if (d is not None and d["state"] == "replicating"
                    and d["played_delta_set"] < out["stamp"]
                    and time.monotonic() - since < STALL_SECONDS):
                time.sleep(0.1)
                continue
            break
        cp = d.get("copy_progress") or cp
        if cp.get("position") != progress:
            progress, since = cp.get("position"), time.monotonic()
        elif time.monotonic() - since > STALL_SECONDS:
            raise QuietError(
                f"the initial copy to {d['name']} has made no progress for "
                f"{STALL_SECONDS} s ({d.get('last_error') or 'no answer'}); it goes on by "
                "itself once the secondary is reachable (see repfs-admin status)")
        last = _show_copy(cp, tty, a, last)
        time.sleep(0.5)
    if d is not None and d["state"] == "replicating" and cp.get("total_blocks"):
        # the copy is whole: its last line says so (100%, the mean rate), also when it
        # ended between two looks at it
        done = cp["total_blocks"]
        _show_copy({**cp, "copied_blocks": done, "position": cp.get("volume_blocks", 1)},
                   tty, a, last)
    if tty is not None:
        tty.end()
    if d is None or d["state"] == "error":
        raise QuietError(f"initial copy failed: {(d or {}).get('error', 'destination gone')}")
    if not a.json:
        print(f"initial copy done: {d['name']} is a read-only secondary, replicating "
              f"(played delta set {d['played_delta_set']})")
    return d


def _replicate(t: Target, a):
    from . import parse_size
    act = a.action
    if act == "start":
        remote = _remote_destinations(a.to)
        if remote is None:
            out = call(t, "POST", "/replicate/start", {"to": os.path.abspath(a.to),
                                                       "force": a.force, "name": a.name,
                                                       "group": a.group})
        else:
            if len(remote) > 1 and a.name:
                raise QuietError("--name names one destination; give one HOST:PORT with it")
            outs = []
            for to in remote:  # (each checked and started by the daemon, one after another)
                outs.append(call(t, "POST", "/replicate/start", {
                    "to": to, "force": a.force, "name": a.name, "group": a.group}))
                if not a.json:
                    print(f"replicating to {outs[-1]['destination']}: initial copy of the "
                          f"snapshot at delta set {outs[-1]['stamp']}")
            if a.no_wait:
                return outs if len(outs) > 1 else outs[0]
            done = [_replicate_wait(t, a, o) for o in outs]
            return done if len(done) > 1 else done[0]
        if not a.json:
            print(f"replicating to {out['destination']} ({out['site']}): initial copy of the "
                  f"snapshot at delta set {out['stamp']}")
        if a.no_wait:
            return out
        out = _replicate_wait(t, a, out)
    elif act == "stop":
        out = call(t, "POST", "/replicate/stop", {"to": a.to})
        if not a.json:
            print(f"stopped: {out['stopped']}")
    elif act == "policy":
        body = {"timeout": a.timeout, "playback_timeout": a.playback_timeout,
                "retention": a.retention,
                "hwm": parse_size(a.hwm) if a.hwm else None,
                "playback_hwm": parse_size(a.playback_hwm) if a.playback_hwm else None}
        for k in ("timeout", "playback_timeout", "retention"):
            if body[k] is not None and body[k] < 0:
                raise QuietError(f"--{k.replace('_', '-')} must not be negative", 2)
        if a.to is not None or a.bwlimit is not None or a.compress is not None:
            body.update(to=a.to, bwlimit=_bwlimit(a.bwlimit),
                        compress=None if a.compress is None else a.compress == "on")
        out = call(t, "POST", "/replicate/policy", body)
        if not a.json:
            for k, v in out.items():
                if k == "bwlimit":
                    v = f"{_human(v)}/s" if v else "none"
                elif k == "compress":
                    v = "on" if v else "off"
                print(f"{k:17s} {_human(v) if k.endswith('hwm') else v}")
    elif act == "deltaset":
        out = call(t, "POST", "/replicate/deltaset", {"wait": not a.no_wait})
        if not a.json:
            print(f"delta set {out['delta_set']} cut ({out['state']}, {out['blocks']} blocks)")
    return out


def _local_or_call(t: Target, local, method: str, path: str, body: dict | None = None):
    """A `group` or `route` verb: on a local site (a directory or a mount point), its files
    are changed here, mounted or not (the daemon reads them when it needs them); on a
    HOST:PORT target, through the control port."""
    from ..errors import DomainError
    if t.site is None:
        return call(t, method, path, body)
    try:
        return local(t.site.path)
    except DomainError as e:
        raise QuietError(str(e)) from None
    except OSError as e:
        raise QuietError(f"{t.site.path}: {e.strerror or e}") from None


def _loopback(host: str) -> bool:
    """Whether `host` (an address, or a name: every address it resolves to) is on this
    host's loopback, where a request in clear text never crosses a network."""
    import ipaddress
    import socket
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback
                               for i in infos)


def _group(t: Target, a):
    from ..rcp.groups import (GROUP_RULE, GroupError, GroupStore, create_secret_file,
                              read_secret_file, remove_secret_file, valid_group)
    from ..rcp.routes import delete_group
    act = a.action
    if act == "list":
        out = _local_or_call(t, lambda site: GroupStore(site).names(), "GET", "/groups")
        if not a.json:
            print("\n".join(out) if out else "no groups")
        return out
    if not valid_group(a.name):
        raise QuietError(f"bad group name {a.name!r} ({GROUP_RULE})")
    if act == "delete":
        _local_or_call(t, lambda site: delete_group(site, a.name), "DELETE",
                       f"/groups/{quote(a.name, safe='')}")
        if not a.json:
            print(f"group {a.name} deleted from the site (the group's other sites keep it)")
        return {"group": a.name, "deleted": True}
    # add
    if t.site is None and t.tls is None and not _loopback(t.address[0]):
        host, port = t.address
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise QuietError(
            f"group add: not sending the secret of group {a.name} to {where} over plain "
            "HTTP (no TLS): anyone on the path could read it; copy the secret file to that "
            f"host and run 'repfs-admin --site SITE group add {a.name} --secret-file FILE' "
            "there (or give --tls-ca, --tls-cert and --tls-key)")
    path = a.secret_file
    try:
        created = not os.path.lexists(path)
        secret = create_secret_file(path) if created else read_secret_file(path)
    except GroupError as e:
        raise QuietError(str(e)) from None
    try:
        result = _local_or_call(
            t, lambda site: {"result": GroupStore(site).put(a.name, secret, force=a.force)},
            "POST", "/groups", {"name": a.name, "secret": secret.hex(),
                                "force": a.force})["result"]
    except QuietError as e:
        if created and e.code == NO_ANSWER:  # (the site may hold it: keep the file)
            raise QuietError(f"{e}; {path} keeps the new secret: run the same command again",
                             e.code) from None
        if created:
            remove_secret_file(path)
        raise
    except BaseException:
        if created:
            remove_secret_file(path)
        raise
    if not a.json:
        if created:
            print(f"group {a.name} added; wrote a new secret to {path}: copy it to the "
                  "group's other sites")
        elif result == "unchanged":
            print(f"group {a.name} already holds the secret of {path}: nothing changed")
        elif result == "replaced":
            print(f"group {a.name}'s secret replaced by the one in {path} (every site of the "
                  "group needs it)")
        else:
            print(f"group {a.name} added with the secret of {path}")
    return {"group": a.name, "result": result, "secret_file": path, "new_secret_file": created}


def _route(t: Target, a):
    from ..rcp.groups import GroupError
    from ..rcp.routes import Routes, parse_next_hop
    act = a.action
    if act == "list":
        out = _local_or_call(t, lambda site: Routes(site).table(), "GET", "/routes")
        if not a.json:
            rows = [[g, h] for g, hops in out.items() for h in hops]
            print(_table(rows, ["GROUP", "NEXT HOP"]) if rows else "no routes")
        return out
    try:  # (checked here first: a bad one goes nowhere)
        hop = None if a.next_hop is None else parse_next_hop(a.next_hop)
    except GroupError as e:
        raise QuietError(str(e)) from None
    g = quote(a.group, safe="")
    if act == "add":
        out = _local_or_call(
            t, lambda site: {"group": a.group, "next_hop": hop,
                             "added": Routes(site).add(a.group, hop)},
            "POST", "/routes", {"group": a.group, "next_hop": hop})
        if not a.json:
            print(f"route added: group {a.group} -> {hop}" if out["added"] else
                  f"group {a.group} already routes to {hop}: nothing changed")
        return out
    out = _local_or_call(
        t, lambda site: {"group": a.group, "deleted": Routes(site).delete(a.group, hop)},
        "DELETE", f"/routes/{g}" + (f"/{quote(hop, safe='')}" if hop else ""))
    if not a.json:
        print(f"route deleted: group {a.group} -> {', '.join(out['deleted'])}")
    return out


def main(argv=None) -> int:
    sys.exit(run_cli("repfs-admin", _main, sys.argv[1:] if argv is None else argv))
