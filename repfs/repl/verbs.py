"""The `replicate` verbs of a running site (start, stop, policy, deltaset). At a primary they
drive `sender.Primary`; `stop` and `policy` at a secondary go to its playback."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from pathlib import Path

import trio

from ..snap.store import NAME_RULE, SnapError, valid_name
from ..tasks import describe
from ..rcp.client import parse_address
from ..rcp.groups import GroupStore
from .sender import DEST_POLICY, MIN_BWLIMIT, Primary, identity, make_client
from .transport import PermanentError, TransientError

log = logging.getLogger(__name__)


class ReplicateVerbs:
    def __init__(self, svc):
        self.svc = svc

    def _need_primary(self) -> Primary:
        if self.svc.primary is None:
            raise SnapError("this site is a secondary; run this on its primary", "conflict")
        return self.svc.primary

    async def start(self, to: str, *, force: bool = False, name: str | None = None,
                    group: str | None = None):
        """Start replicating to `to`: a site directory on this host, or HOST:PORT, a site
        reached by RCP in replication `group` (which this site must hold)."""
        svc = self.svc
        p = self._need_primary()
        svc.check_writable()
        if to.startswith("/"):
            if group is not None:
                raise SnapError("--group is for a remote destination (HOST:PORT); a site on "
                                "this host needs none", "invalid")
            # (paths are looked at from a worker thread: a path on this site's own mount is
            # served by this daemon's loop, which a stat from the loop itself would wait on
            # for ever)
            target = await trio.to_thread.run_sync(svc.peer, to)
            own = Path(svc.mountpoint or "/nonexistent")
            if target.path == own or own in target.path.parents:
                raise SnapError(f"{to} is on this site's own mount {own}", "invalid")
            if not await trio.to_thread.run_sync(target.volume_path.is_file):
                raise SnapError(f"{to} is not a repfs site (make it with repfs mkfs)", "invalid")
            if target.path == svc.site.path:
                raise SnapError("a site cannot replicate to itself", "invalid")
            name = name or target.path.name
            base = {"kind": "local", "site": str(target.path)}
        else:
            base = await self._remote(to, group)
            name = name or to
        if not valid_name(f"repl-init-{name}"):  # (it names an LMDB key and a snapshot)
            raise SnapError(f"bad destination name {name!r} ({NAME_RULE}, after the prefix "
                            "'repl-init-'): give one with --name", "invalid")
        old = p.dest(name)
        if old and old["state"] not in ("stopped", "error") and not force:
            raise SnapError(f"already replicating to {name} ({old['state']})", "conflict")
        client = make_client(svc, base)
        try:
            info = await trio.to_thread.run_sync(client.info)
        except PermanentError as e:
            raise SnapError(f"{to} refused: {_unprefixed(e, to)}", "conflict") from None
        except TransientError as e:
            hint = (f"mount it first: repfs mount {to} MOUNTPOINT" if base["kind"] == "local"
                    else "is its daemon running with --listen on that address?")
            raise SnapError(f"cannot reach the daemon of {to}: {_unprefixed(e, to)} ({hint})",
                            "conflict") from None
        me = identity(svc, base)
        if base["kind"] == "local":
            peer_site = await trio.to_thread.run_sync(svc.peer, info["site"])
            if peer_site.path == svc.site.path:  # (a replica shares the volume uuid)
                raise SnapError("the target is this very site", "invalid")
        elif (info.get("uuid"), info.get("site")) == (svc.core.sb.uuid.hex(), str(
                svc.site.path)) and _my_port(svc) == parse_address(to)[1]:
            raise SnapError(f"{to} is this very site", "invalid")
        nblocks = svc.layer.nblocks
        if info.get("volume_blocks") != nblocks:  # --force cannot mend this
            theirs = info.get("volume_blocks")
            raise SnapError(
                f"{to} has a volume of {_bytes(theirs)}, this site {_bytes(nblocks)}: a "
                f"secondary must be exactly the primary's size (repfs mkfs SITE --size "
                f"{nblocks * 4096})", "conflict")
        if info.get("generation", 0) > p.sets.generation:  # (invariant 5: before the rest)
            recovery = getattr(svc, "recovery", None)
            if recovery is not None:  # it learnt of a newer generation: read-only for good
                await recovery.fence(to, info["generation"], "replicate start found it so")
            raise SnapError(f"{to} knows generation {info['generation']}, newer than this "
                            f"site's {p.sets.generation}: this site is a stale primary and "
                            f"cannot take it, not even with --force", "conflict")
        if not force:
            if info["role"] == "secondary" and info["state"] != "stopped":
                raise SnapError(f"{to} is already a replicating secondary; --force replaces "
                                "its content", "conflict")
            if info.get("root_entries"):
                raise SnapError(f"{to} holds files; --force replaces its content", "conflict")
            if info["role"] == "primary" and info.get("destinations"):
                raise SnapError(f"{to} is itself replicating; --force replaces its content",
                                "conflict")
        async with p.dest_lock(name):  # (one start or stop of a destination at a time)
            # a send task to this destination ends before the secondary is told to take a
            # new copy: else it finds it no longer replicating and puts the destination in
            # error
            live = await p.stop_senders(name)
            try:
                await trio.to_thread.run_sync(client.attach, me, p.sets.generation, nblocks,
                                              force)
            except (TransientError, PermanentError) as e:
                if live:  # (nothing changed: it goes on as before)
                    p.start_sender(svc.nursery, name)
                raise SnapError(f"{to} refused to become a secondary: {e}",
                                "conflict") from None
            finally:
                client.close()
            begun = time.time_ns()
            try:
                return await self._start_copy(p, name, base)
            except BaseException as e:
                # the destination waits for a copy this start did not begin: an old record
                # of it must not say it replicates (no task runs for it now)
                d = p.dest(name)
                if d is not None and d.get("started_ns", 0) < begun:
                    d.update(state="error", error=f"replicate start failed after the "
                                                  f"destination was attached ({describe(e)}); "
                                                  f"start it again")
                    p.put_dest(d)
                raise

    async def _start_copy(self, p: Primary, name: str, base: dict, *,
                          extra: dict | None = None, start: bool = True) -> dict:
        """Begin the initial copy to an attached destination: its snapshot at a consistency
        point, its record (with `extra`: a resync's, recovery/resync.py), its send task
        (unless not `start`)."""
        svc = self.svc
        snap_name = f"repl-init-{name}"
        if any(s.name == snap_name for s in svc.store.queue):
            await svc.snapshots.delete(snap_name, internal=True)
        async with p.cut_lock:
            await p.ready_unready()  # (review of d22669a: else a restart undoes it behind n)

            def start_at_consistency_point() -> int:
                svc.clog.enabled = True
                n = p.sets.cut()
                svc.store.create(snap_name, {"delta_set": n, "purpose": "initial copy",
                                             "destination": name})
                return n

            # (durable LMDB commits, fsyncs: in a worker thread, as in Primary.cut; writers
            # stay gated, the cut and commit locks keep cuts and group commits out)
            async with svc.ops.quiesce(), svc.ops.commit_lock:
                stamp = await trio.to_thread.run_sync(start_at_consistency_point)
        d = {"name": name, **base, "state": "initial-copy", "snapshot": snap_name,
             "stamp": stamp, "acked": stamp, "played": stamp,
             "copy_pos": 0, "copied": 0, "started_ns": time.time_ns(), **(extra or {})}
        p.put_dest(d)
        if not start:
            return {"destination": name, "stamp": stamp}
        p.start_sender(svc.nursery, name)
        log.info("replication to %s (%s) started: initial copy of snapshot %s (delta set %d)",
                 name, base["site"], snap_name, stamp)
        return {"destination": name, "site": base["site"], "stamp": stamp,
                "state": "initial-copy"}

    async def _remote(self, to: str, group: str | None) -> dict:
        """The record of a remote destination HOST:PORT (checked) in `group`."""
        svc = self.svc
        try:
            parse_address(to)
        except ValueError as e:
            raise SnapError(f"{e}: --to takes a site directory or HOST:PORT", "invalid"
                            ) from None
        if group is None:
            raise SnapError(f"a remote destination ({to}) needs --group NAME, a replication "
                            "group this site and the destination hold (repfs-admin group list)",
                            "invalid")
        if await trio.to_thread.run_sync(GroupStore(svc.site.path).secret, group) is None:
            raise SnapError(f"this site holds no replication group {group!r} (repfs-admin "
                            f"group add {group} --secret-file FILE, with the file the "
                            f"destination's group was made from)", "invalid")
        # (`address` and `group`: how the secondary reaches this primary at a failover, to
        # fence it and ask what it cut: recovery/failover.py)
        return {"kind": "rcp", "site": to, "group": group,
                "me": {"uuid": svc.core.sb.uuid.hex(),
                       "site": f"{socket.gethostname()}:{svc.site.path}",
                       "address": _my_address(svc), "group": group}}

    async def stop(self, to: str | None) -> dict:
        svc = self.svc
        if svc.primary is None:
            return await svc.secondary.stop()
        p = svc.primary
        names = [d["name"] for d in p.dests()] if to is None else [to]
        for n in names:
            if p.dest(n) is None:
                raise SnapError(f"no destination named {n!r}", "not_found")
        async with contextlib.AsyncExitStack() as locks:
            for n in sorted(set(names)):  # (one start or stop of a destination at a time)
                await locks.enter_async_context(p.dest_lock(n))
            await p.stop_senders(*names)
            for n in names:
                d = p.dest(n)  # (as the ended task left it)
                d["state"] = "stopped"
                p.put_dest(d)
                if any(s.name == d.get("snapshot") for s in svc.store.queue):
                    await svc.snapshots.delete(d["snapshot"], internal=True)
        # (after a failover the change log runs from the restart point on, destinations or
        # not: a resync needs every change since; recovery/failover.py)
        if not any(d["state"] != "stopped" for d in p.dests()) and (
                svc.recovery.restart_point is None):
            async with p.cut_lock:
                svc.clog.disable()
            # no destination is left to ship to: release what the delta sets pinned
            await trio.to_thread.run_sync(p.prune)
        return {"stopped": names}

    async def policy(self, changes: dict) -> dict:
        svc = self.svc
        to = changes.get("to")
        own = {k: changes.get(k) for k in DEST_POLICY if changes.get(k) is not None}
        if to is not None or own:
            return await self._dest_policy(to, own, changes)
        if svc.primary is None:
            return await svc.secondary.set_policy(changes)
        bad = {"playback_timeout", "playback_hwm"} & {k for k, v in changes.items()
                                                      if v is not None}
        if bad:
            raise SnapError("--playback-timeout and --playback-hwm are set on a secondary")
        return svc.primary.set_policy(**{k: changes.get(k) for k in ("timeout", "hwm",
                                                                     "retention")})

    async def _dest_policy(self, to: str | None, own: dict, changes: dict) -> dict:
        """`replicate policy --to NAME [--bwlimit RATE] [--compress on|off]`: destination
        NAME's own policy, shown or changed (nothing changes if anything is wrong)."""
        if to is None:
            raise SnapError(f"--{'/--'.join(sorted(own))} is set per destination: give --to "
                            f"NAME (repfs-admin status lists them)", "invalid")
        site_wide = sorted(k for k, v in changes.items()
                           if v is not None and k not in DEST_POLICY and k != "to")
        if site_wide:
            raise SnapError(f"--{', --'.join(k.replace('_', '-') for k in site_wide)} "
                            f"apply to the whole site: set them without --to", "invalid")
        p = self._need_primary()
        rate = own.get("bwlimit")
        if rate is not None and 0 < rate < MIN_BWLIMIT:
            raise SnapError(f"bandwidth limit of {rate} bytes/s is too low: at least "
                            f"{MIN_BWLIMIT >> 10}K (a chunk of 1 MiB must pass within the "
                            f"peer's idle timeout), or 0 for none", "invalid")
        if p.dest(to) is None:
            raise SnapError(f"no destination named {to!r}", "not_found")
        try:  # (a durable LMDB commit: not in the trio thread)
            out = await trio.to_thread.run_sync(lambda: p.set_dest_policy(to, **own))
        except KeyError:
            raise SnapError(f"no destination named {to!r}", "not_found") from None
        if own:
            log.info("destination %s: policy %s", to,
                     ", ".join(f"{k}={v}" for k, v in sorted(own.items())))
        return {"destination": to, **out}

    async def deltaset(self, wait: bool = True) -> dict:
        svc = self.svc
        p = self._need_primary()
        if not svc.clog.enabled or not p.tasks:  # (a new primary logs with no destination)
            raise SnapError("replication is not running (replicate start --to SITE)", "conflict")
        why = p.sets.flow_control()
        if why:
            raise SnapError(f"flow control: {why}; cutting is paused until the destinations "
                            f"catch up; every change stays in the change log", "conflict")
        try:
            n = await p.cut()
        except Exception as e:  # noqa: BLE001 - said in one line either way
            if p.unready is not None:  # cut, its boundary durable, its "ready" commit failed
                raise SnapError(f"delta set {p.unready} was cut but could not be made ready "
                                f"({describe(e)}); the cut loop retries, and it is sent once "
                                f"it is ready", "failed") from None
            if not isinstance(e, OSError):
                raise
            # nothing was recorded: the changes stay in the change log
            raise SnapError(f"the delta set could not be cut ({describe(e)}); its changes stay "
                            f"in the change log and the next cut ships them", "failed") from None
        rec = p.sets.record(n)
        return {"delta_set": n, "blocks": rec["blocks"], "state": rec["state"]}


def _unprefixed(e: Exception, where: str) -> str:
    """An error's message without the destination it starts with (the caller names it)."""
    msg = str(e)
    return msg[len(where) + 2:] if msg.startswith(f"{where}: ") else msg


def _my_address(svc) -> str | None:
    """HOST:PORT where this site's daemon listens, as a peer on another host reaches it (a
    wildcard address names this host)."""
    addr = svc.site.control_address()
    if addr is None:
        return None
    host, port = addr
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _my_port(svc) -> int | None:
    addr = svc.site.control_address()
    return addr[1] if addr else None


def _bytes(nblocks) -> str:
    if not isinstance(nblocks, int):
        return "unknown size"
    n = nblocks * 4096
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit} ({nblocks} blocks)"
        n /= 1024
    return str(n)
