"""Failover (FIG. 22-23, 31-33) and the generation fence (invariant 5).

`repfs-admin --site SECONDARY failover [--sync] [--now] [--dry-run]` turns a secondary into
the primary of a new generation, on the same mount (open files and the mount point stay
valid), in the reference's order:

| step | what | recorded (LMDB ``replctx``) |
|---|---|---|
| sync (--sync only) | ask the primary to fence itself and cut its last delta set; wait until it is received | nothing here (the primary's fence is its own record; asking again is harmless) |
| fence (without --sync) | ask the primary to turn read-only and to report what it cut (best effort; a refusal, e.g. another secondary took over, stops the failover) | nothing here |
| begin | stop receiving (the receiver's state turns ``failover``) | ``failover`` = {step: begun, generation, the fence's answer} |
| play | play every delta set received (--now: discard those not played) | ``last_played`` as playback records it; step ``played`` |
| restart point | snapshot ``restart-GEN`` stamped with the last played delta set | the snapshot |
| promote | role ``primary``, generation GEN, ``last_cut`` = the restart point's delta set, the change log on, the restart point, step ``done``: one durable transaction | all of it |
| live | the primary's loops start, the core and then the kernel mount turn read-write | nothing (a restart mounts a primary read-write) |

Every step is idempotent, and a failover that a crash (kill -9 of the daemon) cut short is
finished by running it again: it goes on from the step recorded. After ``promote`` the site
is the primary on disk; running failover again only makes sure it runs as one.

Nothing here grows with the volume: playback is what was received, the snapshot and the
promotion are O(1).

The fence. A site that learns that a peer of its group holds a higher generation (a failover
at that peer told it, its send task read it in the peer's receiver state, or the peer refused
to be attached by it as stale) records ``fenced`` durably, turns its core read-only at a
consistency point (writers get EROFS) and asks the kernel to make the mount read-only as
well; it says why in its log and in `status`, and stays fenced across restarts (a remount
read-write is refused) until it is attached as a secondary again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import trio

from ..errors import DomainError
from ..fs.invalidate import volume_changes
from ..mountopts import MountOptionError, MountOptions, current_options, kernel_remount
from ..repl import keys as K
from ..repl.chunk import ChunkError
from ..repl.deltaset import FORWARDING, DeltaSets
from ..repl.receiver import ReceiveError
from ..repl.sender import Primary
from ..repl.transport import PermanentError, ReceiverClient, RejectedError, TransientError
from ..tasks import iso

log = logging.getLogger(__name__)

FAILOVER = b"failover"  # the last failover of this site (JSON): its steps and its report
FENCED = b"fenced"  # this site learnt that a peer holds a newer generation (JSON)
RESTART_POINT = b"restart_point"  # the restart point of the last failover (JSON)
RESTART_PREFIX = "restart-"  # the restart-point snapshot: restart-GEN
SYNC_STALL = 60.0  # s --sync waits for the last delta set without any progress
PEER_TIMEOUT = 15.0  # s for the primary's answer to a failover request
STEPS = ("fence", "sync", "report")  # what a failover asks of the primary


class FailoverError(DomainError):
    """A failover cannot be done as asked (one line for the user)."""

    default_kind = "conflict"


class Unreachable(Exception):
    """The primary cannot be asked: its daemon is down, or its address is not known."""


class PeerRefused(Exception):
    """The primary answered, and refused."""


def _loads(raw: bytes | None) -> dict | None:
    if not raw:
        return None
    try:
        v = json.loads(raw)
    except ValueError:
        return {"unreadable": True}
    return v if isinstance(v, dict) else {"unreadable": True}


def _int(v, default: int = 0) -> int:
    return v if K.is_u64(v) else default


def _lost(report: dict | None, after: int) -> dict:
    """What the primary's `report` (its answer to a fence) says was lost past delta set
    `after`: the delta sets cut after it, and the changes it logged but never cut."""
    if not report:
        return {"known": False}
    sets = [x for x in report.get("delta_sets") or []
            if isinstance(x, dict) and _int(x.get("delta_set")) > after]
    uncut = _int(report.get("uncut_blocks"))
    blocks = sum(_int(x.get("blocks")) for x in sets) + uncut
    return {"known": True, "delta_sets": sets, "uncut_blocks": uncut, "blocks": blocks,
            "bytes": blocks * 4096, "primary_last_cut": _int(report.get("last_cut"))}


def check_report(doc, where: str) -> dict:
    """The primary's answer to a failover request, checked (a peer is trusted no more than
    its requests are)."""
    ok = (isinstance(doc, dict) and K.is_u64(doc.get("generation"))
          and K.is_u64(doc.get("last_cut")) and K.is_u64(doc.get("uncut_blocks", 0))
          and isinstance(doc.get("delta_sets"), list) and len(doc["delta_sets"]) <= 1 << 16
          and all(isinstance(x, dict) and K.is_u64(x.get("delta_set"))
                  and K.is_u64(x.get("blocks")) for x in doc["delta_sets"]))
    if not ok:
        raise PeerRefused(f"{where} gave a malformed answer to a failover request")
    return doc


class Recovery:
    """Failover at a secondary, the fence at a primary (`SiteService.recovery`)."""

    def __init__(self, svc):
        self.svc = svc
        env = self.env = svc.store.env
        self.db_ctx = env.open_db(K.CTX)  # (never open a database inside a transaction)
        self.db_sets = env.open_db(K.DELTASETS)
        self.db_bits = env.open_db(K.DSBITS)
        self.db_dests = env.open_db(K.DESTS)
        self.lock = trio.Lock()  # one failover at a time
        self.fence_lock = trio.Lock()
        fenced = self.fenced
        if fenced is not None:  # a restart of a fenced site: read-only again at once
            svc.core.readonly = True
            svc.readonly = True
            log.info("this site is fenced (%s): its mount is read-only", self.fence_reason())
        if svc.primary is not None and self.restart_point is not None:
            # the change log runs from the restart point on, destinations or not (a later
            # replicate start or resync needs the history); Primary() sets it by them only
            svc.clog.enabled = True

    # ------------------------------------------------------------------ records

    def _get(self, key: bytes) -> dict | None:
        with self.env.begin(db=self.db_ctx) as txn:
            return _loads(txn.get(key))

    def _put(self, key: bytes, value: dict) -> None:
        with self.env.begin(write=True, db=self.db_ctx) as txn:
            txn.put(key, json.dumps(value).encode())

    @property
    def fenced(self) -> dict | None:
        """The fence of this site (a primary that learnt of a newer generation), or None."""
        if self.svc.receiver.role != "primary":
            return None  # (attached as a secondary since: its role keeps it read-only)
        return self._get(FENCED)

    def fence_reason(self) -> str | None:
        f = self.fenced
        if f is None:
            return None
        return (f"{f.get('peer', '?')} holds generation {f.get('generation', '?')} "
                f"(this site's is {f.get('own_generation', '?')})")

    @property
    def restart_point(self) -> dict | None:
        return self._get(RESTART_POINT) if self.svc.receiver.role == "primary" else None

    def last_failover(self) -> dict | None:
        return self._get(FAILOVER)

    def status(self) -> dict:
        """The recovery part of `status`."""
        f = self.fenced
        rp = self.restart_point
        fo = self.last_failover()
        out = {"fenced": (f"fenced: {self.fence_reason()}" if f else None),
               "fenced_at": iso(_int(f.get("at_ns"))) if f else None,
               "restart_point": ({"snapshot": rp.get("snapshot"),
                                  "delta_set": rp.get("delta_set"),
                                  "generation": rp.get("generation"),
                                  "at": iso(_int(rp.get("at_ns")))} if rp else None),
               "last_failover": None}
        if fo and not fo.get("unreadable"):
            out["last_failover"] = {
                "state": "done" if fo.get("step") == "done" else f"in progress "
                         f"({fo.get('step')}): run failover again to finish it",
                "generation": fo.get("generation"), "from_generation": fo.get("from_generation"),
                "primary": (fo.get("primary") or {}).get("site"),
                "sync": fo.get("sync"), "now": fo.get("now"),
                "started": iso(_int(fo.get("started_ns"))),
                "completed": iso(_int(fo.get("completed_ns"))),
                "restart_delta_set": fo.get("restart_delta_set"),
                "fence": fo.get("fence"), "discarded": fo.get("discarded") or [],
                "damaged": fo.get("damaged_delta_set"),
                "lost": fo.get("lost")}
        return out

    # ------------------------------------------------------------------ the fence (any site)

    async def fence(self, peer: str, generation: int, why: str) -> dict:
        """Peer `peer` holds `generation`, newer than this site's: stop accepting writes for
        good (recorded first, then the core read-only at a consistency point, then the
        kernel's mount if it can be). Idempotent."""
        svc = self.svc
        async with self.fence_lock:
            cur = self._get(FENCED)
            own = svc.receiver.generation
            if cur is None or _int(cur.get("generation")) < generation:
                rec = {"peer": peer, "generation": generation, "own_generation": own,
                       "why": why, "at_ns": time.time_ns()}
                await trio.to_thread.run_sync(self._put, FENCED, rec)
                log.warning("fenced: %s holds generation %d (this site's is %d): %s; this site "
                            "accepts no more writes (EROFS) until it is resynced from it",
                            peer, generation, own, why)
            if not svc.core.readonly:
                async with svc.ops.quiesce():  # everything written so far is in the volume
                    svc.core.readonly = True
            svc.readonly = True
            why_not = await self._kernel_readonly(True)
            if why_not:
                log.info("the kernel's mount stays read-write (%s); the file system refuses "
                         "every change itself", why_not)
        return self._get(FENCED)

    async def _kernel_readonly(self, readonly: bool) -> str | None:
        """Make the kernel's mount read-only or read-write (mount(2) MS_REMOUNT: the same
        mount, open files stay valid); None when done, else why not."""
        svc = self.svc
        mp = svc.mountpoint
        if not mp:
            return "no mount point"
        async with svc.remounter.lock:  # one change of the mount's flags at a time
            try:
                cur = await trio.to_thread.run_sync(current_options, mp)
                if cur is None:
                    return f"nothing is mounted at {mp}"
                opts = MountOptions.parse(cur)
                if opts.readonly == readonly:
                    return None
                opts.readonly = readonly
                opts.atime = svc.core.atime_mode  # (the kernel shows relatime for strictatime)
                await trio.to_thread.run_sync(kernel_remount, mp,
                                              opts.ms_flags(root=os.geteuid() == 0))
            except (OSError, MountOptionError) as e:
                return getattr(e, "strerror", None) or str(e)
        return None

    # ------------------------------------------------------------------ at the primary

    async def request(self, step: str, generation: int, by: str, after: int) -> dict:
        """POST /v1/repl/failover at the primary, from a secondary failing over: "report"
        (what this site cut after delta set `after`; changes nothing), "fence" (turn
        read-only: `by` takes over with `generation`), "sync" (fence, then cut the last
        delta set, which the send task ships)."""
        svc = self.svc
        if step not in STEPS:
            raise FailoverError(f"bad failover step {step!r} (one of {', '.join(STEPS)})",
                                "invalid")
        if svc.primary is None:
            raise FailoverError(f"this site is a {svc.receiver.role}, not a primary: it "
                                f"cannot be fenced or synced for a failover")
        own = svc.sets.generation
        cur = self.fenced
        if step != "report" and cur and cur.get("peer") != by and _int(
                cur.get("generation")) >= generation:  # (two secondaries failing over)
            raise FailoverError(f"this site is already fenced: {cur.get('peer')} took over "
                                f"with generation {cur.get('generation')}")
        if step != "report":
            if generation <= own:
                raise FailoverError(f"a failover to generation {generation} cannot fence this "
                                    f"site, which is at generation {own} (a stale request)")
            await self.fence(by, generation, "it took over by failover" +
                             (" --sync" if step == "sync" else ""))
        if step == "sync":
            p = svc.primary
            if svc.clog.enabled and (svc.clog.changed_blocks or p.unready is not None):
                n = await p.cut()
                log.info("failover --sync: delta set %d is the last; %s receives it", n, by)
        return self._report(after)

    def _report(self, after: int) -> dict:
        svc = self.svc
        sets = svc.sets
        recs = [r for r in sets.records() if r["number"] > after]
        return {"generation": sets.generation, "last_cut": sets.last_cut,
                "fenced": self.fenced is not None,
                "delta_sets": [{"delta_set": r["number"], "blocks": r["blocks"],
                                "bytes": r.get("bytes", r["blocks"] * 4096),
                                "state": r.get("state"), "cut": iso(r.get("cut_ns") or 0)}
                               for r in recs],
                "uncut_blocks": svc.clog.changed_blocks if svc.clog.enabled else 0}

    # ------------------------------------------------------------------ reaching the primary

    def _client(self):
        """A client of this secondary's primary (worker thread); Unreachable if there is
        no way to reach it."""
        svc = self.svc
        prim = svc.receiver.primary() or {}
        addr, group, site = prim.get("address"), prim.get("group"), prim.get("site")
        if isinstance(addr, str) and isinstance(group, str):
            from ..rcp.client import RcpReceiverClient
            return RcpReceiverClient(addr, group=group, local=svc.site.path,
                                     uuid=svc.core.sb.uuid.hex(),
                                     name=f"{socket.gethostname()}:{svc.site.path}",
                                     timeout=PEER_TIMEOUT)
        if isinstance(site, str) and site.startswith("/"):
            return ReceiverClient(svc.peer(site), timeout=PEER_TIMEOUT)
        raise Unreachable("its address was not recorded when it attached this site (a "
                          "primary of an older build)")

    async def _ask(self, step: str, generation: int, after: int) -> dict:
        svc = self.svc
        where = ((svc.receiver.primary() or {}).get("site")) or "the primary"
        client = None
        try:
            client = await trio.to_thread.run_sync(self._client)
            doc = await trio.to_thread.run_sync(
                client.request, "POST", "/repl/failover",
                {"step": step, "generation": generation, "after": after,
                 "by": f"{socket.gethostname()}:{svc.site.path}"})
        except TransientError as e:
            raise Unreachable(str(e)) from None
        except (PermanentError, RejectedError) as e:
            raise PeerRefused(str(e)) from None
        finally:
            if client is not None:
                client.close()
        return check_report(doc, where)

    # ------------------------------------------------------------------ failover

    async def failover(self, *, sync: bool = False, now: bool = False,
                       dry_run: bool = False) -> dict:
        async with self.lock:
            return await self._failover(sync, now, dry_run)

    def _refusal(self) -> str | None:
        """Why this site cannot fail over (None: it can)."""
        r = self.svc.receiver
        if r.role == "primary":
            return (f"this site is a primary (generation {r.generation}), not a secondary: "
                    f"failover is run at a secondary to make it the primary")
        if r.role != "secondary":
            return f"this site's role is {r.role!r} (damaged?): it cannot fail over"
        if r.state == "copied":  # (recovery/copy.py: a snapshot's copy follows nobody)
            src = (r.primary() or {}).get("site")
            return (f"this site holds a copy of a snapshot of {src}, not a replica: it has "
                    f"no primary to take over from (mount it and write, or clone it)")
        if r.state == "initial-copy" or (r.last_played == 0 and r.next_to_play() is None):
            return ("this site holds no copy of its primary yet (its initial copy is not "
                    "played): there is nothing to take over")
        return None

    async def _failover(self, sync: bool, now: bool, dry_run: bool) -> dict:
        svc = self.svc
        r = svc.receiver
        rec = self.last_failover()
        if rec is not None and rec.get("unreadable"):
            rec = None
        if r.role == "primary" and rec and rec.get("step") == "done" and _int(
                rec.get("generation")) == r.generation:
            if not dry_run:
                await self._go_live()
            return self._answer(rec, already=True, dry_run=dry_run)
        busy = rec if (rec and rec.get("step") not in (None, "done")
                       and r.role == "secondary") else None
        if busy is None:
            why = self._refusal()
            if why:
                raise FailoverError(why)
        gen = _int(busy.get("generation")) if busy else r.generation + 1
        prim = r.primary() or {}
        pname = prim.get("site") or "its primary"
        if sync and busy and not busy.get("synced"):
            raise FailoverError("a failover without --sync is under way here (this site "
                                "receives nothing more); run failover again without --sync "
                                "to finish it")
        if sync and r.state not in ("replicating", "failover"):
            raise FailoverError(f"--sync needs replication from {pname} running to this site "
                                f"(it is {r.state}); fail over without --sync")
        if dry_run:
            return await self._plan(sync, now, gen, pname, busy)
        report = fence = None
        if sync and not (busy and busy.get("synced")):
            report = await self._sync(gen, pname)
            fence = {"state": "fenced (--sync)"}
        elif not (busy and busy.get("report")):
            # fence the primary if it can be reached, and ask what it cut (FIG. 32 step 561;
            # it ships what it cut until this site stops receiving: less is lost)
            try:
                report = await self._ask("fence", gen, r.last_played)
                fence = {"state": "fenced"}
                log.info("failover: %s is fenced (read-only)", pname)
            except Unreachable as e:
                fence = {"state": "unreachable", "why": str(e)}
                log.info("failover: %s is unreachable (%s): it could not be fenced", pname, e)
            except PeerRefused as e:
                if busy is None:  # (e.g. another secondary took over: this one must not)
                    raise FailoverError(f"{pname} refused to be fenced: {e}; nothing changed"
                                        ) from None
                fence = {"state": "refused", "why": str(e)}
                log.info("failover: %s refused to be fenced: %s", pname, e)
        # begin: no more delta sets are received
        new = dict(busy or {"generation": gen, "from_generation": r.generation,
                            "primary": prim, "started_ns": time.time_ns()})
        new.update(sync=sync or bool(new.get("synced")), now=now)
        new.setdefault("step", "begun")  # (a failover cut short goes on from its step)
        if report is not None:
            new["report"] = report
        if fence is not None:
            new["fence"] = fence
        if sync and report is not None:
            new["synced"] = True

        def begin():
            with self.env.begin(write=True, db=self.db_ctx) as txn:
                txn.put(FAILOVER, json.dumps(new).encode())
                txn.put(b"secondary_state", b"failover")
        async with svc.secondary.lock:  # (no chunk is stored, no attach runs meanwhile)
            why = None if busy else self._refusal()
            if why is None and (r.primary() or {}) != prim:
                why = "this site was attached by another primary meanwhile"
            if why:
                raise FailoverError(f"{why}; nothing changed")
            await trio.to_thread.run_sync(begin)
        log.info("failover to generation %d begun (%s%s)", gen,
                 "--sync" if new["sync"] else "without --sync", ", --now" if now else "")
        async with svc.ops.quiesce_lock:  # a playback under way ends first
            pass
        # play what was received (--now: discard what is not played)
        if new.get("step") == "begun":
            damaged = await self._play_all(copy_only=now)
            discarded = await trio.to_thread.run_sync(self._discard, r.last_played)
            if discarded:
                log.info("failover: delta sets %s received but not played are discarded",
                         ", ".join(str(x["delta_set"]) for x in discarded))
            new.update(step="played", restart_delta_set=r.last_played,
                       discarded=(new.get("discarded") or []) + discarded,
                       damaged_delta_set=damaged)
            await trio.to_thread.run_sync(self._put, FAILOVER, new)
        n = _int(new.get("restart_delta_set"), r.last_played)
        # the restart point
        name = f"{RESTART_PREFIX}{gen}"
        if not any(s.name == name for s in svc.store.queue):
            async with svc.ops.quiesce():  # (a consistency point: the played boundary)
                await trio.to_thread.run_sync(svc.store.create, name, {
                    "delta_set": n, "generation": gen, "purpose": "restart point",
                    "primary": pname})
            log.info("restart point: snapshot %s at delta set %d", name, n)
        # promote: one durable transaction
        forwarder = getattr(svc, "forwarder", None)
        if forwarder is not None and hasattr(forwarder, "reset"):
            async with forwarder.lock:  # (no next hop starts meanwhile)
                await forwarder.reset()  # (what it forwarded belongs to the old generation)
        new.update(step="done", completed_ns=time.time_ns(),
                   lost=_lost(new.get("report"), n) if new.get("report") else
                   {"known": False, "why": (new.get("fence") or {}).get("why")})
        svc.clog.enabled = True  # (logging from the restart point on; before any write)
        await trio.to_thread.run_sync(self._promote, new, n, gen, name)
        log.info("failover done: this site is the primary, generation %d, from delta set %d "
                 "(restart point %s)", gen, n, name)
        if forwarder is not None:
            svc.forwarder = None
        await self._go_live()
        return self._answer(new)

    async def _sync(self, gen: int, pname: str) -> dict:
        """--sync: the primary fences itself and cuts its last delta set; wait until this
        site has received it. Returns the primary's report."""
        r = self.svc.receiver
        try:
            report = await self._ask("sync", gen, r.last_played)
        except Unreachable as e:
            raise FailoverError(f"--sync needs {pname}, which is unreachable ({e}); nothing "
                                f"changed. Without --sync this site takes over with the delta "
                                f"sets it received (what the primary cut after them is lost)"
                                ) from None
        except PeerRefused as e:
            raise FailoverError(f"--sync: {pname} refused: {e}; nothing changed") from None
        target = report["last_cut"]
        log.info("failover --sync: %s is read-only; waiting for its last delta set %d",
                 pname, target)
        seen, since = None, time.monotonic()
        while r.last_received < target:
            p = r.partial
            mark = (r.last_received, p["n"] if p else 0, len(p["checksums"]) if p else 0)
            if mark != seen:
                seen, since = mark, time.monotonic()
            elif time.monotonic() - since > SYNC_STALL:
                raise FailoverError(
                    f"--sync: delta set {target}, the last of {pname}, did not arrive (this "
                    f"site received up to {r.last_received}; nothing came for {SYNC_STALL:g} "
                    f"s); {pname} stays read-only. Run failover --sync again once replication "
                    f"flows (repfs-admin status on both), or failover without --sync")
            await trio.sleep(0.1)
        return report

    async def _play_all(self, copy_only: bool = False) -> dict | None:
        """Play every delta set received, in order (`copy_only`, for --now: only an initial
        copy received whole and not yet played, without which the volume holds nothing of
        the primary's); a damaged one stops it there (it and those after it are discarded:
        reported). Returns the damaged one's report."""
        svc = self.svc
        r = svc.receiver
        while True:
            rec = r.next_to_play()
            if rec is None or (copy_only and not rec.get("copy")):
                return None
            try:
                await volume_changes(svc.ops, lambda: r.play(rec, svc.clog),
                                     lambda: r.extents(rec))
            except (ReceiveError, ChunkError) as e:
                log.error("failover: %s; the restart point is delta set %d", e, r.last_played)
                return {"delta_set": rec["number"], "why": str(e)}

    def _discard(self, after: int) -> list[dict]:
        """Forget the delta sets received after `after` (and one half received)."""
        r = self.svc.receiver
        gone = [x for x in r.incoming() if x["number"] > after]
        r.drop_partial()
        with self.env.begin(write=True) as txn:
            for x in gone:
                txn.delete(K.u64(x["number"]), db=r.db_in)
            txn.put(b"last_received", K.u64(after), db=self.db_ctx)
        for x in gone:
            (r.dir / x.get("file", f"{x['number']}.ds")).unlink(missing_ok=True)
        return [{"delta_set": x["number"], "blocks": x["blocks"],
                 "bytes": x["blocks"] * 4096} for x in gone]

    def _promote(self, rec: dict, n: int, gen: int, snap: str) -> None:
        """The site becomes the primary of generation `gen` at delta set `n` (worker thread;
        one durable transaction)."""
        r = self.svc.receiver
        with self.env.begin(write=True) as txn:
            ctx = self.db_ctx
            # an earlier life's mailbox (as a primary, or a forwarder's) is not this lineage's
            txn.drop(self.db_sets, delete=False)
            txn.drop(self.db_bits, delete=False)
            txn.drop(r.db_in, delete=False)
            cur = txn.cursor(db=self.db_dests)
            for key, raw in list(cur):
                d = _loads(raw) or {}
                if d.get("state") != "stopped" and not d.get("unreadable"):
                    d.update(state="stopped", error=f"stopped by the failover to generation "
                                                    f"{gen}")
                    txn.put(key, json.dumps(d).encode(), db=self.db_dests)
            txn.put(b"role", b"primary", db=ctx)
            txn.put(b"generation", K.u64(gen), db=ctx)
            txn.put(b"last_cut", K.u64(n), db=ctx)
            txn.put(b"secondary_state", b"stopped", db=ctx)
            # (FORWARDING: a forwarder's mailbox ends here too)
            for k in (b"playing", b"copy_progress", FENCED, FORWARDING):
                txn.delete(k, db=ctx)
            txn.put(RESTART_POINT, json.dumps({"snapshot": snap, "delta_set": n,
                                               "generation": gen,
                                               "at_ns": time.time_ns()}).encode(), db=ctx)
            txn.put(FAILOVER, json.dumps(rec).encode(), db=ctx)
        for f in r.dir.glob("*.ds"):
            f.unlink(missing_ok=True)

    async def _go_live(self) -> None:
        """Run as the primary the records say this site is: its replication objects and
        loops, the change log on, then the core and the kernel's mount read-write."""
        svc = self.svc
        if svc.primary is None:
            settings = svc.site.settings()

            def make():
                return DeltaSets(svc.store.env, svc.clog, svc.site.path, svc.layer,
                                 capacity_bytes=svc.site.chunk_capacity(),
                                 max_outstanding=settings.max_outstanding)
            sets = await trio.to_thread.run_sync(make)
            primary = Primary(svc, svc.clog, sets)
            svc.clog.enabled = True
            svc.sets, svc.primary = sets, primary
            await primary.run(svc.nursery)
        if svc.core.error is not None:
            raise FailoverError(f"this site is the primary now, but its file system turned "
                                f"read-only after an error ({svc.core.error}); remount it")
        if svc.core.readonly or svc.readonly:
            svc.core.readonly = False  # the core first, then the kernel (mountopts.remount)
            why = await self._kernel_readonly(False)
            if why:
                log.error("failover: the kernel's mount stays read-only (%s): remount it "
                          "read-write (mount -o remount,rw %s)", why, svc.mountpoint)
            else:
                svc.readonly = False
        svc.secondary.wake.set()  # (the playback loop ends: this site is no secondary now)

    # ------------------------------------------------------------------ reports

    def _answer(self, rec: dict, *, already: bool = False, dry_run: bool = False) -> dict:
        svc = self.svc
        out = {"site": str(svc.site.path), "role": svc.receiver.role,
               "generation": _int(rec.get("generation")),
               "from_generation": _int(rec.get("from_generation")),
               "primary": (rec.get("primary") or {}).get("site"),
               "sync": bool(rec.get("sync")), "now": bool(rec.get("now")),
               "restart_point": f"{RESTART_PREFIX}{_int(rec.get('generation'))}",
               "restart_delta_set": _int(rec.get("restart_delta_set")),
               "fence": rec.get("fence"), "discarded": rec.get("discarded") or [],
               "damaged": rec.get("damaged_delta_set"), "lost": rec.get("lost"),
               "readonly": svc.readonly, "already_done": already, "dry_run": dry_run}
        return out

    async def _plan(self, sync: bool, now: bool, gen: int, pname: str, busy) -> dict:
        """What a failover would do (--dry-run): asks the primary only for its report."""
        r = self.svc.receiver
        try:
            report = await self._ask("report", gen, r.last_played)
            reach = "reachable"
        except (Unreachable, PeerRefused) as e:
            report, reach = None, f"unreachable ({e})"
            if sync:
                raise FailoverError(f"--sync needs {pname}, which is {reach}; nothing would "
                                    f"change") from None
        waiting = [x for x in r.incoming() if x["number"] > r.last_played]
        if sync and report is not None:
            n = max(report["last_cut"], r.last_received)
            lost = {"known": True, "delta_sets": [], "uncut_blocks": 0, "blocks": 0,
                    "bytes": 0}
        else:
            n = r.last_played if now else max([r.last_played] + [x["number"] for x in waiting])
            lost = _lost(report, n) if report else {"known": False, "why": reach}
        steps = []
        if sync:
            steps.append(f"make {pname} read-only, have it cut and ship its last delta set "
                         f"({report['last_cut'] if report else '?'}), wait until it is here")
        else:
            steps.append(f"fence {pname} (read-only): it is {reach}")
        names = ", ".join(str(x["number"]) for x in waiting)
        if not waiting:
            steps.append("play nothing: every delta set received is played")
        elif now:
            steps.append(f"discard the delta sets received but not played: {names}")
        else:
            steps.append(f"play the delta sets received but not played: {names}")
        steps.append(f"snapshot {RESTART_PREFIX}{gen} (the restart point) at delta set {n}")
        steps.append(f"raise the generation to {gen}, become the primary, log changes, turn "
                     f"the mount read-write")
        return {"site": str(self.svc.site.path), "dry_run": True, "generation": gen,
                "from_generation": r.generation, "primary": pname, "primary_state": reach,
                "sync": sync, "now": now, "continues": busy is not None,
                "restart_point": f"{RESTART_PREFIX}{gen}", "restart_delta_set": n,
                "to_play": [] if now else [x["number"] for x in waiting],
                "to_discard": [x["number"] for x in waiting] if now else [],
                "lost": lost, "steps": steps}
