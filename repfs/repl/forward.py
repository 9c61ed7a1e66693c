"""Forwarders (FIG. 3, 16-18; the reference's rcproute): a secondary with routes for a
replication group stores each delta set it receives, plays it back into its copy, and sends
it on to each next hop — store-and-forward, each hop acknowledging its own.

How a forwarder holds what it forwards. A delta set carries the state of its blocks at its
boundary; a forwarder's volume is at boundary n just after it played delta set n. So the
playback's last transaction (receiver.play) makes n *ready in the forwarder's own mailbox*,
exactly as a cut makes one on a primary: its block list in ``dsbits``, a pinning snapshot
``repl-ds-n`` of the volume whose interest is that list, the record under the primary's
number and generation. From then on the forwarder is, towards its next hops, a primary whose
delta sets are cut by playback: the sender (`sender.Primary`, which this class extends)
streams them through their pins (a block a later playback overwrites was copied into the pin
first, by copy-on-write, as on a primary), keeps them until every next hop has played them,
and releases them then. No second copy of a delta set is kept, and the chunks it sends are
byte for byte the primary's (the chunk encoder is deterministic in the block list, the
boundary's data, the number and the generation).

Next hops are the routes (`repfs-admin route add GROUP NEXTHOP`, SITE/routes.json), read
every second: a new next hop is attached and given an initial copy of the forwarder's volume
at a playback boundary (taken while no playback runs), then the delta sets played after it;
a next hop whose route is deleted is stopped. Routes wait until this site holds a copy
(replicating, its initial copy played).

Flow control: while the forwarded delta sets not yet played by every next hop reach the
mailbox's limits (site.toml [repl] max_outstanding, chunk_capacity), the forwarder plays no
more (its upstream keeps them, and its own flow control applies in turn).

Towards its upstream, a forwarder reports (`info()["forward"]`) its identity, its next hops
with their progress (and theirs, recursively: the route tree `status` shows) and the lowest
delta set its whole subtree has played. The upstream keeps each delta set until that subtree
has played it (`Primary.prune`), so that when the forwarder stops acknowledging, the upstream
can send directly to the forwarder's next hops (FIG. 16 text: `Primary._bypass`) from where
each one is, until the forwarder returns."""

from __future__ import annotations

import logging
import socket
import time

import trio

from ..rcp.client import parse_address
from ..rcp.routes import RouteError, Routes
from ..tasks import describe
from . import keys as K
from .deltaset import FORWARDING, DeltaSets, forwarding
from .sender import Primary, make_client, subtree
from .transport import PermanentError, TransientError

log = logging.getLogger(__name__)

ROUTES_EVERY = 1.0  # s between two reads of routes.json
START_RETRY = (2.0, 30.0)  # s: a next hop that could not be started is tried again (back-off)


class Forwarder(Primary):
    """Replication at a secondary that forwards: the send tasks to its next hops."""

    cuts = False  # its delta sets are made by playback (receiver.play), never by a cut

    def __init__(self, service):
        settings = service.site.settings()
        sets = DeltaSets(service.store.env, service.clog, service.site.path, service.layer,
                         capacity_bytes=service.site.chunk_capacity(),
                         max_outstanding=settings.max_outstanding)
        super().__init__(service, service.clog, sets)
        self.receiver = service.receiver
        self.db_ctx = self.receiver.db_ctx
        self.start_errors: dict[str, dict] = {}  # next hop -> its last failed start
        self.paused: str | None = None  # why playback waits (flow control), for status
        self.lock = trio.Lock()  # one reconcile (start or stop of next hops) at a time

    # ------------------------------------------------------------------ state

    def dests(self) -> list[dict]:
        """Its next hops' records (a site that was a primary keeps its old destinations'
        records in the same table: they are not this forwarder's)."""
        return [d for d in super().dests() if d.get("route")]

    def dest(self, name: str) -> dict | None:
        d = super().dest(name)
        return d if d is not None and d.get("route") else None

    @property
    def on(self) -> bool:
        return forwarding(self.env, self.db_ctx)

    def me(self) -> dict:
        """How this site names itself to its next hops (as `replicate verbs._remote` does
        at a primary); a replica shares its primary's volume uuid, the site tells them
        apart."""
        return {"uuid": self.service.core.sb.uuid.hex(),
                "site": f"{socket.gethostname()}:{self.service.site.path}"}

    def wanted(self) -> dict[str, str] | None:
        """next hop -> group, from routes.json; None when it cannot be read (said in status
        and logged once; nothing changes until it reads again)."""
        try:
            table = Routes(self.service.site.path).table()
        except (RouteError, OSError) as e:
            if getattr(self, "routes_error", None) != describe(e):
                log.warning("the routes cannot be read (%s); the next hops stay as they are",
                            describe(e))
            self.routes_error = describe(e)
            return None
        self.routes_error = None
        return {hop: group for group, hops in sorted(table.items()) for hop in hops}

    def info(self) -> dict | None:
        """What the upstream learns of this forwarder (Secondary.info): None when it does
        not forward."""
        if not self.on:
            return None
        hops = []
        for d in self.dests():
            if d["state"] == "stopped" or d.get("bypass_of"):
                continue
            hops.append({"site": d["site"], "group": d.get("group"), "state": d["state"],
                         "acked": d["acked"], "played": d["played"],
                         "error": d.get("error") or d.get("last_error"),
                         "forward": d.get("forward")})
        return {"me": self.me(), "hops": hops, "played": self.subtree_played()}

    def subtree_played(self) -> int:
        """The lowest delta set every site below this one has played (this site's own last
        played when it has no next hops)."""
        own = self.receiver.last_played  # (a next hop in error is not waited for: it needs
        return min([own] + [subtree(d) for d in self.dests()  # a new copy, not delta sets)
                            if d["state"] not in ("stopped", "error")
                            and not d.get("bypass_of")])

    # ------------------------------------------------------------------ loops

    async def run(self, nursery) -> None:
        self.service.nursery = self.service.nursery or nursery
        for d in self.dests():
            if d["state"] not in ("stopped", "error"):
                self.start_sender(nursery, d["name"])
        nursery.start_soon(self.sup.run, "routes", self._routes_loop)
        nursery.start_soon(self.sup.run, "bypass", self._watch_forwarders)  # (hops forward)

    async def _routes_loop(self) -> None:
        while self.receiver.role == "secondary":
            await self.reconcile()
            self.sup.ok("routes")
            await trio.sleep(ROUTES_EVERY)

    async def reconcile(self) -> None:
        """Make the next hops what the routes say."""
        async with self.lock:
            await self._reconcile()

    async def _reconcile(self) -> None:
        svc = self.service
        want = await trio.to_thread.run_sync(self.wanted)
        if want is None:
            return
        for hop in [h for h in self.start_errors if h not in want]:
            del self.start_errors[hop]  # (its route is gone)
        if self.on:  # (whatever no next hop waits for goes: also with none started yet)
            await trio.to_thread.run_sync(self.prune)
            if self.paused and not self.sets.flow_control():
                self.playback_pause()  # (over: said, and cleared for status)
        r = self.receiver
        live = {d["name"]: d for d in self.dests() if d["state"] != "stopped"
                and not d.get("bypass_of")}
        for name in [n for n in live if n not in want]:  # routes deleted
            await self.stop_senders(name)
            d = self.dest(name)
            d["state"] = "stopped"
            self.put_dest(d)
            if any(s.name == d.get("snapshot") for s in svc.store.queue):
                await svc.snapshots.delete(d["snapshot"], internal=True)
            log.info("forwarding to %s stopped (its route was deleted)", name)
        if not want:
            if self.on and not any(d["state"] != "stopped" for d in self.dests()):
                await self._set_forwarding(False)
            return
        if r.role != "secondary" or r.state != "replicating" or r.last_played < 1:
            return  # a next hop is given a copy of this site's: none yet
        if not self.on:
            await self._set_forwarding(True)
        now = time.monotonic()
        for hop, group in want.items():
            d = self.dest(hop)
            if d is not None and d["state"] not in ("stopped",):
                continue  # running, or in error (shown; route delete and add start it again)
            err = self.start_errors.get(hop)
            if err is not None and now < err["next"]:
                continue
            try:
                await self._start_hop(hop, group)
            except (TransientError, PermanentError, ValueError) as e:
                delay = START_RETRY[0] if err is None else min(err["delay"] * 2,
                                                              START_RETRY[1])
                if err is None or err["error"] != str(e):
                    log.warning("forwarding to %s cannot start: %s (retrying)", hop, e)
                self.start_errors[hop] = {"error": str(e), "delay": delay, "next": now + delay}
            else:
                self.start_errors.pop(hop, None)

    async def _set_forwarding(self, on: bool) -> None:
        """Turn the mailbox on (it starts at the boundary the volume is at: nothing played
        runs meanwhile) or off (everything it pinned released)."""
        svc = self.service

        def flip():
            if not on:  # (released first: a crash in between leaves nothing pinned)
                self.sets.prune(1 << 62, self.policy()["retention"])
            with self.env.begin(write=True, db=self.db_ctx) as txn:
                txn.put(FORWARDING, b"1" if on else b"0")
                if on:
                    txn.put(b"last_cut", K.u64(self.receiver.last_played))

        async with svc.ops.hold_all():  # (no playback: last_played is the volume's boundary)
            await trio.to_thread.run_sync(flip)
        log.info("forwarding %s", "on: delta sets played from now on are kept for the next "
                 "hops" if on else "off: no route left")

    async def _start_hop(self, hop: str, group: str) -> None:
        """Attach next hop `hop` and begin its initial copy from this site's volume at the
        current playback boundary."""
        svc = self.service
        parse_address(hop)
        me = self.me()
        base = {"kind": "rcp", "site": hop, "group": group, "me": me}
        client = make_client(svc, base)
        try:
            info = await trio.to_thread.run_sync(client.info)
            if info.get("volume_blocks") != svc.layer.nblocks:
                raise PermanentError(f"{hop} has a volume of {info.get('volume_blocks')} "
                                     f"blocks, this site {svc.layer.nblocks}")
            if info.get("generation", 0) > self.sets.generation:
                raise PermanentError(f"{hop} knows generation {info['generation']}, newer "
                                     f"than this site's {self.sets.generation}")
            theirs = info.get("primary") or {}
            follows_me = (theirs.get("uuid"), theirs.get("site")) == (me["uuid"], me["site"])
            if not follows_me and (info.get("root_entries") or info.get("destinations") or (
                    info.get("role") == "secondary" and info.get("state") != "stopped")):
                raise PermanentError(f"{hop} holds files or replicates; a route gives a copy "
                                     f"only to an empty site (or one that follows this one)")
            await trio.to_thread.run_sync(client.attach, me, self.sets.generation,
                                          svc.layer.nblocks, follows_me)
        finally:
            client.close()
        snap_name = f"repl-init-{hop}"
        async with svc.ops.hold_all():  # between two playbacks: the copy's boundary
            def take() -> int:
                r = self.receiver
                if r.role != "secondary" or r.state != "replicating" or r.last_played < 1:
                    raise TransientError(f"this site is {r.state}: it gives next hops a "
                                         f"copy once it replicates again")
                old = next((s for s in list(svc.store.queue) if s.name == snap_name), None)
                if old is not None:
                    svc.layer.delete(old)
                stamp = r.last_played
                svc.store.create(snap_name, {"delta_set": stamp, "purpose": "initial copy",
                                             "destination": hop})
                return stamp
            stamp = await trio.to_thread.run_sync(take)
        d = {"name": hop, **base, "route": True, "state": "initial-copy", "snapshot": snap_name,
             "stamp": stamp, "acked": stamp, "played": stamp, "copy_pos": 0, "copied": 0,
             "started_ns": time.time_ns()}
        self.put_dest(d)
        self.start_sender(svc.nursery, hop)
        log.info("forwarding to %s (group %s) started: initial copy of this site at delta set "
                 "%d", hop, group, stamp)

    # ------------------------------------------------------------------ becoming something else

    async def reset(self) -> None:
        """This site takes a new copy (attach) or becomes a primary (failover): what it
        forwarded belongs to the old one. The next hops are stopped (the routes give them a
        new copy), the mailbox emptied. Its pins are dropped by the caller
        (Secondary._drop_pins). The caller holds `lock` (no next hop starts meanwhile)."""
        await self.stop_senders(*self.tasks)

        def clear():
            for d in self.dests():
                if not d.get("bypass_of"):
                    d["state"] = "stopped"
                    self.put_dest(d)
            with self.env.begin(write=True) as txn:
                for rec in self.sets.records():
                    txn.delete(K.u64(rec["number"]), db=self.sets.db_sets)
                    self.sets._drop_bits(txn, rec["number"])
                txn.put(b"last_cut", K.u64(0), db=self.db_ctx)
        await trio.to_thread.run_sync(clear)

    def playback_pause(self) -> str | None:
        """Why the next playback must wait (the mailbox is full), else None; logged once."""
        why = self.sets.flow_control() if self.on else None
        if why and not self.paused:
            log.warning("forwarding flow control: %s; playback waits until the next hops "
                        "catch up", why)
        elif self.paused and not why:
            log.info("forwarding flow control over: playback goes on")
        self.paused = why
        return why

