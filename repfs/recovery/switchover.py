"""Switchover and failback (FIG. 30): the roles of a primary and one of its secondaries
swapped with nothing lost and no full copy, while applications keep writing until the last
moment.

`repfs-admin --site PRIMARY switchover --to DEST` (DEST: a destination's name, as `status`
lists it) and `repfs-admin --site PRIMARY failback`, the same towards the old primary this
site resynced after its failover (the destination it brought up to date). The steps:

1. **drain** (here): cut a delta set and wait until DEST has played it, again while the
   writes of one delta set are more than FLOOR_BLOCKS (a few rounds at most), so that what
   is left to ship once writes stop is small;
2. **take over** (at DEST, asked over the same transport the delta sets go by, POST
   /v1/repl/failover step "switchover"): DEST runs `failover --sync` — it makes this site
   read-only (the fence), this site cuts and ships its last delta set, DEST plays it, raises
   the generation, takes its restart point and turns read-write: nothing is lost;
3. **the way back** (at DEST, now the primary): `resync --peer` this site. Nothing changed
   here after the restart point (fenced at it) and DEST has not been written yet, so the
   resync sends only what DEST changed meanwhile; this site becomes DEST's secondary
   (its divergent state kept in `divergence-GEN`, here empty of changes) and replication
   runs in the original direction of the pair, reversed.

Re-issuing after an error continues: DEST's failover and resync are both idempotent (a
failover done says so; a resync under way or done says so). At this site, once it is DEST's
secondary, switchover answers that it is done.
"""

from __future__ import annotations

import logging
import socket
import time

import trio

from ..errors import DomainError
from ..repl.sender import make_client
from ..repl.transport import PermanentError, RejectedError, TransientError

log = logging.getLogger(__name__)

FLOOR_BLOCKS = 256  # 1 MiB: what may be left for the last delta set, with writes stopped
DRAIN_ROUNDS = 5
DRAIN_WAIT = 300.0  # s for DEST to play one drained delta set
TAKEOVER_TIMEOUT = 3600.0  # s for DEST's failover --sync and resync


class SwitchoverError(DomainError):
    default_kind = "conflict"


class Switchover:
    """`SiteService.switchover`: at the primary, `run`; at the destination, `take_over`."""

    def __init__(self, svc):
        self.svc = svc
        self.lock = trio.Lock()

    # ------------------------------------------------------------------ at the primary

    async def failback(self) -> dict:
        """Switch over to the old primary this site resynced (after its failover)."""
        p = self.svc.primary
        if p is None:
            done = self._failed_back()
            if done is not None:  # (re-issued after an error: the old primary finished it)
                return done
            raise SwitchoverError(self._not_primary())
        back = [d for d in p.dests() if d.get("resync")
                and d["state"] in ("replicating", "initial-copy")]
        if not back:
            raise SwitchoverError("no old primary to fail back to: this site has resynced "
                                  "none (repfs-admin resync --peer OLDPRIMARY first)")
        if len(back) > 1:
            raise SwitchoverError("several resynced destinations: name one with "
                                  f"switchover --to ({', '.join(d['name'] for d in back)})")
        return await self.run(back[0]["name"])

    def _failed_back(self) -> dict | None:
        """At a secondary: the answer to a failback that happened (this site took over from
        its primary by failover, and follows that site again at a newer generation), else
        None."""
        r = self.svc.receiver
        fo = self.svc.recovery.last_failover() or {}
        prim, old = r.primary() or {}, fo.get("primary") or {}
        gen = fo.get("generation")
        if (r.role == "secondary" and fo.get("step") == "done" and isinstance(gen, int)
                and r.generation > gen and prim.get("uuid") == old.get("uuid")
                and prim.get("site") is not None and prim.get("site") == old.get("site")):
            return {"switched_to": prim.get("address") or prim["site"], "already": True,
                    "role": r.role, "generation": r.generation}
        return None

    def _not_primary(self) -> str:
        r = self.svc.receiver
        prim = (r.primary() or {}).get("site")
        return (f"this site is a {r.role}" + (f" of {prim}" if prim else "") +
                ": run switchover or failback at the primary")

    async def run(self, to: str) -> dict:
        async with self.lock:
            return await self._run(to)

    async def _run(self, to: str) -> dict:
        svc = self.svc
        p = svc.primary
        if p is None:
            r = svc.receiver
            prim = r.primary() or {}
            names = {prim.get("site"), prim.get("address")}
            if isinstance(prim.get("site"), str) and prim["site"].startswith("/"):
                names.add(prim["site"].rstrip("/").rsplit("/", 1)[-1])  # (a local one's name)
            if r.role == "secondary" and to in names:
                return {"switched_to": to, "already": True, "role": r.role,
                        "generation": r.generation}
            raise SwitchoverError(self._not_primary())
        d = p.dest(to)
        if d is None:
            raise SwitchoverError(f"no destination named {to!r} (repfs-admin status lists "
                                  f"them)", "not_found")
        fenced = svc.recovery.fenced is not None
        if d["state"] != "replicating" and not fenced:
            raise SwitchoverError(f"{to} is {d['state']}, not replicating: it cannot take "
                                  f"over without losing what it lacks")
        if not fenced:
            svc.check_writable()
            await self._drain(to)
        gen = p.sets.generation
        me = (d.get("me") or {}).get("site") or str(svc.site.path)
        client = make_client(svc, d)
        client.timeout = TAKEOVER_TIMEOUT
        log.info("switchover to %s: it takes over (failover --sync), then resyncs this site",
                 to)
        try:
            out = await trio.to_thread.run_sync(lambda: client.request(
                "POST", "/repl/failover", {"step": "switchover", "generation": gen,
                                           "by": me, "after": d["played"]}))
        except TransientError as e:
            raise SwitchoverError(f"cannot reach {to}: {e}; run switchover again (it goes "
                                  f"on where it stopped)") from None
        except (PermanentError, RejectedError) as e:
            raise SwitchoverError(f"{to} refused to take over: {e}") from None
        finally:
            client.close()
        log.info("switchover to %s done: it is the primary (generation %s); this site is its "
                 "secondary", to, (out.get("failover") or {}).get("generation"))
        return {"switched_to": to, "already": False, **out}

    async def _drain(self, to: str) -> None:
        """Cut and wait until `to` has played, while the last delta set is large."""
        svc = self.svc
        p = svc.primary
        for _ in range(DRAIN_ROUNDS):
            if svc.clog.changed_blocks <= FLOOR_BLOCKS:
                break
            n = await p.cut()
            deadline = time.monotonic() + DRAIN_WAIT
            while (p.dest(to) or {}).get("played", 0) < n:
                d = p.dest(to) or {}
                if d.get("state") != "replicating":
                    raise SwitchoverError(f"{to} stopped replicating while it caught up "
                                          f"({d.get('error') or d.get('state')})")
                if time.monotonic() > deadline:
                    raise SwitchoverError(f"{to} did not play delta set {n} in {DRAIN_WAIT:g} "
                                          f"s; nothing changed: try again when it keeps up")
                await trio.sleep(0.1)

    # ------------------------------------------------------------------ at the destination

    async def take_over(self, generation: int, by: str) -> dict:
        """Asked by this site's primary `by` (at `generation`): fail over with --sync, then
        resync it. Idempotent."""
        svc = self.svc
        r = svc.receiver
        fo = svc.recovery.last_failover() or {}
        prim = (fo.get("primary") if r.role == "primary" else r.primary()) or {}
        if r.role == "secondary" and r.generation != generation:
            raise SwitchoverError(f"this site is at generation {r.generation}, its primary "
                                  f"asks at {generation}")
        if r.role == "secondary" and by != prim.get("site"):
            raise SwitchoverError(f"this site follows {prim.get('site')}, not {by}")
        if r.role == "primary" and (by != prim.get("site") or generation != fo.get(
                "from_generation") or fo.get("step") != "done"):
            # (taken over already: only its old primary, at the generation it had, may ask
            # again, to finish the resync; anything else is stale: invariant 5)
            raise SwitchoverError(f"this site is a primary (generation {r.generation}); a "
                                  f"switchover asked by {by} at generation {generation} is "
                                  f"not its old primary's")
        out = await svc.recovery.failover(sync=r.role == "secondary")
        peer = prim.get("address") or prim.get("site")
        if not isinstance(peer, str):
            raise SwitchoverError("the old primary's address is not known here: run resync "
                                  "--peer OLDPRIMARY at this site")
        rs = await svc.resync.run(peer, prim.get("group"))
        log.info("switchover from %s: this site is the primary; %s is resynced as its "
                 "secondary", by, peer)
        return {"failover": out, "resync": rs, "site": f"{socket.gethostname()}:"
                f"{svc.site.path}"}
