"""Copies of snapshots between sites and pull updates (FIG. 34-40; the reference's `fs_copy`).

`repfs-admin --site SOURCE copy SNAP [--base OLDER] --to PEER [--force]` ships snapshot SNAP
of this site to PEER: every block in use in SNAP (a full copy), or with `--base OLDER` only
the blocks that differ between OLDER and SNAP and are in use in SNAP (FIG. 39-40, the
snapshot delta OLDER→SNAP: `snap/diff.changed_blocks`), which PEER must already hold as a
copy of OLDER from this site. `repfs-admin --site COPY pull --from SOURCE` brings such a copy,
at version Q, up to the source's youngest snapshot by FIG. 37-38's rule: nothing if Q is the
youngest; the delta Q→youngest if the source still holds Q; else (Q is too old: deleted at
the source) a full copy of the youngest.

The transfer is the initial copy's (FIG. 11, repl/receiver.py): the peer is attached as a
secondary of this site expecting a copy (its attach carries what the copy is, `COPY_FIELDS`),
stages the copy records in `incoming/copy.ds` at its own durable position, and plays the
staged copy as one delta set when told to start playback; nothing of its volume that its
mount shows changes before that. Playing it records "copied" (source, snapshot name, id,
creation time, base) and leaves the peer in state `copied`: read-only, following nobody, no
delta sets after it. The blocks sent are read from the snapshot, in block order, as
`sender.Primary._initial_copy` reads them; the block list is a pure function of the two
snapshots (recomputed, not stored: a re-issued copy sends the same list).

| step | where | recorded | after a kill -9 or a lost answer |
|---|---|---|---|
| checks | source | nothing | re-issue |
| attach | peer | role secondary, `copy_pending`, state `initial-copy` | re-issue: the peer is found expecting this very copy and is not attached again |
| records | peer | `copy.ds`, its durable position | re-issue: resumes at the peer's position |
| start playback | peer | the staged copy as delta set 1 | the peer plays it at its next mount |
| play | peer | `copied`, state `copied` (one transaction with "played") | as any playback (finished before the mount) |

A copy runs while the command waits (the peer's answer timeout applies); it is not retried by
itself: re-issuing the same command continues it.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import trio

from ..errors import DomainError
from ..extents import runs
from ..repl import keys as K
from ..repl.sender import BS, COPY_PIECE, MIN_BWLIMIT, TokenBucket, identity, make_client
from ..repl.verbs import _my_address
from .resync import call_peer
from ..repl.transport import PermanentError, ReceiverClient, RejectedError, TransientError
from ..snap.diff import changed_blocks

log = logging.getLogger(__name__)

PLAYED_WAIT = 600.0  # s a copy waits for the peer to play what it received
# snapshots that are not versions of the file system (replication's, diff's, verify's, the
# divergent state a resync kept): never offered to a pull
_NOT_VERSIONS = ("delta set", "diff", "verify", "initial copy", "divergence")


class CopyError(DomainError):
    default_kind = "conflict"


def versions(store) -> list:
    """The snapshots a pull may be brought to, oldest first (the reference's J .. J+K)."""
    return [s for s in store.queue if s.attrs.get("purpose") not in _NOT_VERSIONS
            and not s.name.startswith("repl-") and s.state == "ok"]


def is_copy_of(rec, snap) -> bool:
    """Record `rec` (a peer's "copied" or "copy_pending") names snapshot `snap`."""
    return (isinstance(rec, dict) and rec.get("copy_id") == snap.id
            and rec.get("copy_created_ns") == snap.created_ns)


def _what(rec) -> str:
    if not isinstance(rec, dict):
        return "no copy"
    return f"a copy of snapshot {rec.get('copy_snapshot')!r} (id {rec.get('copy_id')})"


class Copies:
    """`copy` (at the source), `pull` (at a copy) and a pull's request at the source;
    `SiteService.copies`."""

    def __init__(self, svc):
        self.svc = svc
        self.lock = trio.Lock()  # one copy at a time from this site
        self._held: set[str] = set()  # the snapshots the running copy reads
        # the copy being sent (status "copy"): snapshot, base, to, sent_blocks, blocks
        self.progress: dict | None = None

    def holds(self, name: str) -> bool:
        """Snapshot `name` is being copied (`snapshot delete` refuses it meanwhile)."""
        return name in self._held

    # ------------------------------------------------------------------ at the source

    def _find(self, name: str, what: str):
        try:
            return self.svc.store.find(name)
        except DomainError:
            raise CopyError(f"no snapshot named {name!r} on this site ({what}; repfs-admin "
                            f"snapshot list)", "not_found") from None

    async def copy(self, snapshot: str, to: str, *, base: str | None = None,
                   group: str | None = None, force: bool = False, bwlimit: int = 0,
                   update: bool = False, dry_run: bool = False) -> dict:
        """Copy snapshot `snapshot` (only its delta from `base`) to `to`; `update`: only if
        `to` already holds a copy from this site (a pull); `dry_run`: check, count the
        blocks it would send, change nothing."""
        async with self.lock:
            self._held = {snapshot} | ({base} if base else set())
            try:
                return await self._copy(snapshot, to, base, group, force, bwlimit, update,
                                        dry_run)
            finally:
                self._held = set()
                self.progress = None

    async def _copy(self, snapshot, to, base, group, force, bwlimit, update,
                    dry_run) -> dict:
        svc = self.svc
        store = svc.store
        snap = self._find(snapshot, "the snapshot to copy")
        older = self._find(base, "--base") if base is not None else None
        if older is not None and store.position(older) >= store.position(snap):
            raise CopyError(f"--base {base} is not older than {snapshot}: a copy ships the "
                            f"changes from an older snapshot to a younger one (FIG. 34 step "
                            f"581)", "invalid")
        if 0 < bwlimit < MIN_BWLIMIT:
            raise CopyError(f"bandwidth limit of {bwlimit} bytes/s is too low: at least "
                            f"{MIN_BWLIMIT >> 10}K, or 0 for none", "invalid")
        if to.startswith("/"):
            if group is not None:
                raise CopyError("--group is for a remote peer (HOST:PORT)", "invalid")
            target = await trio.to_thread.run_sync(svc.peer, to)
            if target.path == svc.site.path:
                raise CopyError("a site cannot copy to itself", "invalid")
            if not await trio.to_thread.run_sync(target.volume_path.is_file):
                raise CopyError(f"{to} is not a repfs site (make it with repfs mkfs)",
                                "invalid")
            dest = {"kind": "local", "site": str(target.path)}
        else:
            dest = await svc.replicate._remote(to, group)
        me = identity(svc, dest)
        gen = svc.receiver.generation
        nblocks = svc.layer.nblocks
        ident = {"copy_snapshot": snap.name, "copy_id": snap.id,
                 "copy_created_ns": snap.created_ns,
                 "copy_base": older.name if older else "",
                 "copy_base_id": older.id if older else 0}
        client = make_client(svc, dest)
        try:
            info = await self._call(client.info, to)
            if info.get("volume_blocks") != nblocks:
                raise CopyError(f"{to} has a volume of {info.get('volume_blocks')} blocks, "
                                f"this site {nblocks}: a copy needs one of the same size")
            theirs = info.get("primary") or {}
            ours = (theirs.get("uuid"), theirs.get("site")) == (me["uuid"], me["site"]) and (
                info.get("role") == "secondary")
            pending, copied = info.get("copy_pending"), info.get("copied")
            if update and not (ours and (copied or pending)):
                raise CopyError(f"{to} holds no copy from this site: a pull only updates one")
            state = info.get("state")
            if ours and state == "copied" and is_copy_of(copied, snap):
                return self._answer(snap, older, to, 0, 0, None, already=True)
            resume = (ours and is_copy_of(pending, snap)
                      and (pending or {}).get("copy_base_id") == ident["copy_base_id"]
                      and info.get("generation") == gen
                      and state in ("initial-copy", "replicating"))
            if not resume:
                self._refusal(info, to, snap, older, ours, copied, gen, force)
            if dry_run:
                at = (info.get("copy") or {}).get("next_block", 0) if resume else 0
                total, todo = await trio.to_thread.run_sync(self._count, snap, older, at)
                return {**self._answer(snap, older, to, todo, total, at), "dry_run": True,
                        "state": "not copied (dry run)",
                        "replaces": _what(copied) if ours else (
                            f"a {info.get('role')} ({info.get('state')}) holding "
                            f"{info.get('root_entries', 0)} entries in its root")}
            if not resume:
                await self._call(lambda: client.attach(
                    {**me, **ident}, gen, nblocks,
                    force or older is not None or ours), to)
                info = await self._call(client.info, to)
                state = info.get("state")
                log.info("copy of snapshot %s%s to %s begins", snap.name,
                         f" (its changes since {older.name})" if older else "", to)
            at = None
            sent = total = 0
            if state == "initial-copy":
                at = (info.get("copy") or {}).get("next_block", 0)
                if resume:
                    log.info("copy of snapshot %s to %s resumes at block %d", snap.name, to,
                             at)
                sent, total = await trio.to_thread.run_sync(
                    self._send, client, snap, older, at, gen, bwlimit, to)
                await self._call(lambda: client.start_playback(1, gen, total), to)
            done = await self._wait_played(client, to, snap)
            log.info("copy of snapshot %s to %s %s: %d blocks sent%s", snap.name, to,
                     "done" if done else "received (the peer plays it)", sent,
                     f" of {total}" if at else "")
            return self._answer(snap, older, to, sent, total, at, played=done)
        finally:
            client.close()

    def _refusal(self, info, to, snap, older, ours, copied, gen, force) -> None:
        """Why PEER (its receiver state `info`) cannot be attached for this copy: raises."""
        if info.get("generation", 0) > gen:
            raise CopyError(f"{to} is at generation {info['generation']}, newer than this "
                            f"site's {gen}: a copy from here cannot take it")
        if older is not None:
            if not (ours and is_copy_of(copied, older)):
                raise CopyError(f"{to} does not hold a copy of snapshot {older.name!r} of this "
                                f"site (it holds {_what(copied) if ours else 'none from here'})"
                                f": copy {snap.name} without --base for a full copy")
            return
        state = info.get("state")
        if force or (ours and (state == "copied" or (
                state == "initial-copy" and info.get("copy_pending")))):
            return  # (a copy of this site's, or one begun, is replaced by a newer one)
        if info.get("role") == "secondary" and info.get("state") in (
                "replicating", "initial-copy"):
            raise CopyError(f"{to} is a replicating secondary; --force replaces its content")
        if info.get("destinations"):
            raise CopyError(f"{to} is itself replicating; --force replaces its content")
        if info.get("root_entries"):
            raise CopyError(f"{to} holds files; --force replaces its content")

    def _plan(self, snap, older):
        """Yield sorted arrays of block numbers to send, page by page: the blocks in use in
        `snap` (a full copy), or those that differ from `older` and are in use in `snap`
        (FIG. 39-40)."""
        layer = self.svc.layer
        if older is not None:
            yield changed_blocks(layer, older, snap)
            return
        nblocks = layer.nblocks
        for page in range(-(-nblocks // K.PAGE_BITS)):
            arr = layer.meta_page(snap, page)[:nblocks - page * K.PAGE_BITS]
            yield np.flatnonzero(arr).astype(np.int64) + page * K.PAGE_BITS

    def _count(self, snap, older, at: int) -> tuple[int, int]:
        """(blocks in the copy, those from block `at` on)."""
        total = todo = 0
        for blocks in self._plan(snap, older):
            total += len(blocks)
            todo += int(np.count_nonzero(blocks >= at))
        return total, todo

    def _send(self, client: ReceiverClient, snap, older, at: int, gen: int,
              bwlimit: int, to: str) -> tuple[int, int]:
        """In a worker thread: the copy records from block `at` on (the peer holds those
        below); returns (blocks sent, blocks in the copy)."""
        layer = self.svc.layer
        bucket = TokenBucket(bwlimit)
        take = None
        if hasattr(client, "pace"):  # (an RCP client paces its frames itself)
            client.pace = bucket.take
        else:
            take = bucket.take
        # (a delta's block list is one array: made once, not again for the count)
        cached = list(self._plan(snap, older)) if older is not None else None

        def plan():
            return iter(cached) if cached is not None else self._plan(snap, older)

        total = todo = 0
        for blocks in plan():
            total += len(blocks)
            todo += int(np.count_nonzero(blocks >= at))
        sent = [0]
        prog = self.progress = {"snapshot": snap.name, "base": older.name if older else None,
                                "to": to, "resumed_at_block": at or None,
                                "sent_blocks": 0, "blocks_to_send": todo, "blocks": total}
        last = [time.monotonic()]

        def pieces():
            for blocks in plan():
                blocks = blocks[blocks >= at]
                for _, s, c in runs(blocks):
                    while c:
                        m = min(c, COPY_PIECE)
                        if take is not None:
                            take(m * BS)
                        yield gen, s, layer.read_snapshot(snap, s, m)
                        sent[0] += m
                        prog["sent_blocks"] = sent[0]
                        if time.monotonic() - last[0] >= 10:  # (a long copy: its progress)
                            last[0] = time.monotonic()
                            log.info("copy of snapshot %s to %s: %d of %d blocks sent",
                                     snap.name, prog["to"], sent[0], todo)
                        s += m
                        c -= m

        window = getattr(self.svc.primary, "send_window", None)
        try:
            client.send_copies(pieces(), window=window)
        except TransientError as e:
            raise CopyError(f"the copy stopped: cannot reach the peer: {e}; the peer keeps "
                            f"what it received: re-issue the command to continue") from None
        except (PermanentError, RejectedError) as e:
            raise CopyError(f"the peer refused the copy: {e}") from None
        return sent[0], total

    async def _wait_played(self, client, to: str, snap) -> bool:
        """Until the peer has played the copy (True), or PLAYED_WAIT (False)."""
        deadline = trio.current_time() + PLAYED_WAIT
        while trio.current_time() < deadline:
            info = await self._call(client.info, to)
            if info.get("state") == "copied" and is_copy_of(info.get("copied"), snap):
                return True
            if info.get("state") not in ("replicating", "initial-copy"):
                raise CopyError(f"{to} is {info.get('state')} now, not playing the copy")
            await trio.sleep(0.1)
        return False

    async def _call(self, fn, peer: str):
        return await call_peer(fn, peer, CopyError, " (re-issue the command to continue)")

    def _answer(self, snap, older, to, sent, total, at, *, already=False,
                played=True) -> dict:
        return {"snapshot": snap.name, "snapshot_id": snap.id,
                "base": older.name if older else None, "to": to, "sent_blocks": sent,
                "blocks": total, "resumed_at_block": at or None, "already": already,
                "state": "copied" if played else "playing"}

    async def serve_pull(self, have: dict | None, to: str, group: str | None,
                         dry_run: bool = False) -> dict:
        """POST /v1/repl/pull from a copy at version `have` (its "copied" record): FIG.
        37-38 at this (the network file server's) side."""
        vs = versions(self.svc.store)
        if not vs:
            raise CopyError("this site has no snapshot to pull (repfs-admin snapshot create)")
        young = vs[-1]
        if is_copy_of(have, young):  # step 646: no more recent version
            return {"decision": "current", "snapshot": young.name, "snapshot_id": young.id,
                    "sent_blocks": 0}
        held = next((s for s in vs[:-1] if is_copy_of(have, s)), None)
        # step 648 (Q is too old: not held here any more): the youngest, whole; step 649:
        # the delta Q -> youngest
        out = await self.copy(young.name, to, base=held.name if held else None, group=group,
                              update=True, dry_run=dry_run)
        return {**out, "decision": "delta" if held else "full"}

    # ------------------------------------------------------------------ at a copy

    async def pull(self, peer: str, group: str | None = None,
                   min_interval: float | None = None, dry_run: bool = False) -> dict:
        """`pull --from PEER`: bring this site's copy up to PEER's youngest snapshot."""
        svc = self.svc
        r = svc.receiver
        info = r.info()
        copied, pending = info.get("copied"), info.get("copy_pending")
        if r.role != "secondary" or (copied is None and pending is None):
            raise CopyError(f"this site holds no copy of a snapshot to update (it is a "
                            f"{r.role}); make one at the source: repfs-admin --site SOURCE "
                            f"copy SNAP --to {svc.site.path}")
        src = r.primary() or {}
        if peer.startswith("/"):
            if group is not None:
                raise CopyError("--group is for a remote peer (HOST:PORT)", "invalid")
            source = await trio.to_thread.run_sync(svc.peer, peer)
            if os.path.realpath(source.path) != os.path.realpath(src.get("site") or "/"):
                raise CopyError(f"this site's copy came from {src.get('site')}, not {peer}")
            client = ReceiverClient(source, timeout=3600.0)  # (it copies, then answers)
            me = str(svc.site.path)
        else:  # over RCP: the source pushes the copy back to this site's own address
            client = make_client(svc, await svc.replicate._remote(peer, group))
            client.timeout = 3600.0  # (it copies, then answers)
            try:
                theirs = await self._call(client.info, peer)
            except BaseException:
                client.close()
                raise
            if theirs.get("uuid") != src.get("uuid") or not str(src.get("site")).endswith(
                    f":{theirs.get('site')}"):
                client.close()
                raise CopyError(f"this site's copy came from {src.get('site')}, not {peer}")
            me = _my_address(svc)
            if me is None:
                client.close()
                raise CopyError("this site does not listen (repfs mount --listen): its "
                                "source cannot reach it with the copy")
        now = time.time_ns()
        last = (copied or {}).get("checked_ns") or (copied or {}).get("played_ns") or 0
        if min_interval is not None and copied and (now - last) / 1e9 < min_interval:
            # FIG. 37 step 642: not time to ask for a newer version yet (Tmin)
            return {"decision": "not due", "snapshot": copied.get("copy_snapshot"),
                    "next_check_in": round(min_interval - (now - last) / 1e9, 1),
                    "sent_blocks": 0}
        have = copied  # (what the mount shows: an unfinished copy after it continues)
        try:
            doc = await self._call(lambda: client.request(
                "POST", "/repl/pull", {"have": have and {
                    k: have.get(k) for k in ("copy_snapshot", "copy_id", "copy_created_ns")},
                    "to": me, "group": group, "dry_run": dry_run}), peer)
        finally:
            client.close()
        if doc.get("decision") == "current" and not dry_run:  # step 646: the time of the last update
            await trio.to_thread.run_sync(self._checked, now)
        log.info("pull from %s: %s (snapshot %s, %d blocks sent)", peer, doc.get("decision"),
                 doc.get("snapshot"), doc.get("sent_blocks", 0))
        return doc

    def _checked(self, ns: int) -> None:
        """Record when the copy last asked its source (its Tu)."""
        r = self.svc.receiver
        copied = r.info().get("copied")
        if copied is None:
            return
        copied["checked_ns"] = ns
        with r.env.begin(write=True) as txn:
            txn.put(b"copied", json.dumps(copied).encode(), db=r.db_ctx)
