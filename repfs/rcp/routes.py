"""Routes (FIG. 16-18, the reference's rcproute): for each replication group a site holds, the
next hops it forwards that group's delta sets to.

A site that receives a group's delta sets and has routes for the group stores each delta set,
plays it back if it holds a copy, and sends it on to each next hop (store-and-forward; the
forwarder, later work, asks `Routes.next_hops`). A next hop is HOST:PORT, the shared port of
another site (`repfs mount --listen`). `repfs-admin route add GROUP NEXTHOP | list | delete
GROUP [NEXTHOP]` changes them; a route is only taken for a group the site holds
(rcp/groups.py), and a group with routes is not deleted (`delete_group`).

Where they live: ``SITE/routes.json``, one small JSON document

    {"format": 1, "routes": {"GROUP": ["HOST:PORT", ...], ...}}

replaced whole and durably (statefile.write_durably: after a power cut the old table or the
new one, never a torn one). Not meta.lmdb: the table is a handful of entries changed by an
operator, it must be changeable when no daemon runs (repfs-admin acts on a local site directly,
and an LMDB environment would then be opened by two processes with their own map sizes and
reader tables), a person can read it, and the forwarder reads it when it connects, not on a
hot path. A change reads, checks and writes the table under the site's `site_lock` (shared with
the groups), so concurrent changes do not lose one another.

Next hops are written as `parse_next_hop` leaves them (host in lower case, IPv6 in brackets),
so `route delete` matches however the address was typed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path

from ..statefile import write_durably
from .groups import GroupError, GroupStore, site_lock, valid_group, GROUP_RULE

FORMAT = 1
MAX_HOPS = 32  # next hops of one group
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


class RouteError(GroupError):
    """A bad next hop, an unknown group or route, a damaged routes.json; one line, a kind."""


def parse_next_hop(text: str) -> str:
    """HOST:PORT, checked and written one way. The split follows control.py's `parse_listen`
    (the last ':' separates the port; an IPv6 host may be in brackets; an empty host is
    127.0.0.1), and a next hop must also be reachable: a port from 1 to 65535, and a host
    name (RFC 1123) or an IP address that is not unspecified (0.0.0.0, ::) or multicast."""
    bad = f"bad next hop {text!r} (want HOST:PORT"
    if not isinstance(text, str) or len(text) > 300:
        raise RouteError(f"bad next hop {str(text)[:60]!r} (want HOST:PORT)")
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT_RE.match(port) or not 0 < int(port) <= 65535:
        raise RouteError(f"{bad}, the port from 1 to 65535)")
    host = host.strip("[]") or "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_unspecified or ip.is_multicast:
            raise RouteError(f"{bad}: {host} is not an address to connect to)")
        return f"[{ip.compressed}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"
    name = host.lower().removesuffix(".")
    if len(name) > 253 or not all(_LABEL_RE.match(x) for x in name.split(".")):
        raise RouteError(f"{bad}: {host!r} is neither a host name nor an IP address)")
    return f"{name}:{int(port)}"


class Routes:
    """The routing table of one site (``SITE/routes.json``)."""

    def __init__(self, site_path: str | os.PathLike):
        self.site = Path(site_path)
        self.path = self.site / "routes.json"

    def table(self) -> dict[str, list[str]]:
        """Every group's next hops (groups in name order, hops in the order added)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise RouteError(f"cannot read {self.path}: {e.strerror}", "failed") from None
        try:
            doc = json.loads(data)
            routes = doc["routes"]
            ok = (doc.get("format") == FORMAT and isinstance(routes, dict)
                  and all(valid_group(g) and isinstance(h, list)
                          and all(isinstance(x, str) for x in h) for g, h in routes.items()))
        except (ValueError, TypeError, KeyError, AttributeError):
            ok = False
        if not ok:
            raise RouteError(f"{self.path} is damaged (not a format-{FORMAT} routing table): "
                             "fix it, or remove it and add the routes again", "failed")
        return {g: list(routes[g]) for g in sorted(routes) if routes[g]}

    def next_hops(self, group: str) -> list[str]:
        """Where this site forwards the group's delta sets (empty: nowhere)."""
        return self.table().get(group, [])

    def _write(self, table: dict[str, list[str]]) -> None:
        doc = {"format": FORMAT, "routes": {g: h for g, h in sorted(table.items()) if h}}
        write_durably(self.path, json.dumps(doc, indent=1) + "\n", mode=0o600)

    def add(self, group: str, next_hop: str) -> bool:
        """Route the group's delta sets to `next_hop` too; False if it already was."""
        hop = parse_next_hop(next_hop)
        if not valid_group(group):
            raise RouteError(f"bad group name {group!r} ({GROUP_RULE})")
        with site_lock(self.site):
            try:
                held = GroupStore(self.site).secret(group)
            except OSError as e:
                raise RouteError(f"cannot read the secret of group {group}: "
                                 f"{e.strerror or e}", "failed") from None
            if held is None:
                raise RouteError(f"this site does not hold group {group} (add it first: "
                                 f"repfs-admin group add {group} --secret-file FILE)",
                                 "not_found")
            table = self.table()
            hops = table.setdefault(group, [])
            if hop in hops:
                return False
            if len(hops) >= MAX_HOPS:
                raise RouteError(f"group {group} has {MAX_HOPS} next hops already (the most "
                                 "a group may have)", "conflict")
            hops.append(hop)
            self._write(table)
            return True

    def delete(self, group: str, next_hop: str | None = None) -> list[str]:
        """Remove one route of the group, or (no `next_hop`) all of them; returns the next
        hops removed. RouteError (not_found) if there is no such route."""
        hop = None if next_hop is None else parse_next_hop(next_hop)
        if not valid_group(group):
            raise RouteError(f"bad group name {group!r} ({GROUP_RULE})")
        with site_lock(self.site):
            table = self.table()
            hops = table.get(group, [])
            if hop is None:
                gone = hops
            else:
                gone = [hop] if hop in hops else []
            if not gone:
                raise RouteError(f"no route for group {group}"
                                 + (f" to {hop}" if hop else ""), "not_found")
            table[group] = [x for x in hops if x not in gone]
            self._write(table)
            return gone


def delete_group(site_path: str | os.PathLike, name: str) -> None:
    """`group delete`: the group's secret leaves the site, unless routes still use it."""
    store = GroupStore(site_path)
    store._path(name)  # (a bad name: refused first)
    with site_lock(site_path):
        hops = Routes(site_path).next_hops(name)
        if hops:
            raise RouteError(f"group {name} has routes (to {', '.join(hops)}): delete them "
                             f"first (repfs-admin route delete {name})", "conflict")
        if not store.delete(name):
            raise GroupError(f"this site does not hold group {name}", "not_found")
