"""The secondary role of a running site: the receiver's control-port endpoints (attach,
initial copy, chunks, commits) and the playback loop that integrates complete delta sets in
order (FIG. 9), each one consistent step with exactly the stale kernel caches dropped."""

from __future__ import annotations

import contextlib
import json
import logging
import time

import lmdb
import trio

from ..fs.invalidate import volume_changes
from ..tasks import describe, is_transient
from .chunk import ChunkError
from .deltaset import PIN_PREFIX, clear_mailbox
from .receiver import ReceiveError, attach_refusal
from .verify import PURPOSE as VERIFY_PURPOSE, SecondaryVerify
from ..snap.store import SnapError

log = logging.getLogger(__name__)


class Secondary:
    def __init__(self, svc, receiver):
        self.svc = svc
        self.receiver = receiver
        self.db_ctx = svc.store.env.open_db(b"replctx")  # never open a database inside a txn
        self.wake = trio.Event()
        self.lock = trio.Lock()  # one receiver request at a time (they run in worker threads)
        self.playing = False  # the playback loop runs
        self.playback_ms: list[float] = []
        self.verify = SecondaryVerify(self)  # verify's hold of playback, hashes (verify.py)

    # ------------------------------------------------------------------ receiver endpoints

    def info(self) -> dict:
        svc = self.svc
        info = self.receiver.info()
        root = svc.core.iget(1)
        info.update(uuid=svc.core.sb.uuid.hex(), site=str(svc.site.path),
                    root_entries=svc.core.dirs.header(root).count,
                    destinations=[d["name"] for d in svc.primary.dests()
                                  if d["state"] != "stopped"] if svc.primary else [])
        if svc.forwarder is not None:  # its next hops (forward.py): the upstream's route tree
            try:
                info["forward"] = svc.forwarder.info()
            except Exception as e:  # noqa: BLE001 - its upstream must still reach it
                log.warning("the route tree cannot be reported: %s", describe(e))
                info["forward"] = None
        return info

    async def attach(self, primary: dict, generation: int, nblocks: int, force: bool) -> dict:
        """Become a secondary of `primary` (checked by receiver.attach_refusal). The mount
        turns read-only and keeps showing this site's state until the initial copy, staged
        meanwhile, is played."""
        svc = self.svc
        async with self.lock:
            why = attach_refusal(self.info(), primary, generation, nblocks, force)
            if why is None and svc.ops.enable_writeback_cache:
                why = ("this site is mounted with --writeback-cache: its kernel would keep "
                       "stale file sizes and times after each playback; remount it without")
            if why:
                raise ReceiveError(why)
            if svc.primary is not None:  # (its send tasks end first: writers stay ungated)
                await svc.primary.stop_senders(*svc.primary.tasks)
            fwd = svc.forwarder
            async with contextlib.AsyncExitStack() as stack:
                if fwd is not None:  # what it forwarded belongs to its old copy; no next
                    await stack.enter_async_context(fwd.lock)  # hop starts meanwhile
                    await fwd.reset()
                async with svc.ops.quiesce():
                    await trio.to_thread.run_sync(svc.core.checkpoint)
                    if svc.primary is not None:
                        svc.clog.disable()
                        svc.primary = None
                        svc.sets = None
                    # the delta sets this site pinned as a primary will never be sent: their
                    # pins would copy blocks at every playback; its mailbox is not the one a
                    # forwarder of the new copy keeps
                    await trio.to_thread.run_sync(self._drop_pins)
                    await trio.to_thread.run_sync(clear_mailbox, svc.store.env)
                    await trio.to_thread.run_sync(self.receiver.attach, primary, generation)
                    svc.core.readonly = True
                    svc.readonly = True
        # (a playback loop waiting out a back-off after an error is not `playing`, but lives)
        if not self.playing and svc.supervisor.state("playback").state not in (
                "running", "retrying", "recovering"):
            svc.nursery.start_soon(svc.supervisor.run, "playback", self.playback_loop)
        if svc.forwarder is None:  # (a primary until now: its routes may make it forward)
            from .forward import Forwarder
            svc.forwarder = Forwarder(svc)
            await svc.forwarder.run(svc.nursery)
        log.info("this site is now a secondary of %s (generation %d): its mount is read-only "
                 "and shows its earlier state until the initial copy is played",
                 primary["site"], generation)
        return self.receiver.info()

    def _drop_pins(self) -> None:
        """The snapshots this site kept for its replication as a primary: its delta sets'
        pins and its initial copies' snapshots (`repl-init-*`, left when the copy never
        finished). Kept, each would copy every block playback overwrites, and a read-only
        site cannot delete them."""
        layer = self.svc.layer
        for snap in [s for s in list(layer.store.queue) if s.name.startswith(PIN_PREFIX)
                     or (s.name.startswith("repl-init-") and "destination" in s.attrs)
                     or s.attrs.get("purpose") == VERIFY_PURPOSE]:
            layer.delete(snap)

    async def _store(self, fn, *args):
        """Run a receiver call in a worker thread. A disk error here (EIO, ENOSPC of the
        save area) is contained: recorded for status as the "receiver" task, logged once,
        and refused as "busy" so the primary sends again later; a delta set whose sync
        failed is dropped whole (a failed fsync may have lost written pages)."""
        try:
            out = await trio.to_thread.run_sync(fn, *args)
        except (OSError, lmdb.Error) as e:  # lmdb.Error: a disk error under meta.lmdb
            self.svc.supervisor.error("receiver", e, transient=is_transient(e, (lmdb.Error,)))
            if fn == self.receiver.commit:
                try:
                    await trio.to_thread.run_sync(self.receiver.drop_partial)
                except (OSError, lmdb.Error) as e2:
                    log.error("dropping the partial delta set failed: %s", describe(e2))
            raise ReceiveError(f"this site cannot store what was sent: {describe(e)}",
                               "busy") from None
        self.svc.supervisor.ok("receiver")
        return out

    async def copy(self, body: bytes) -> dict:
        async with self.lock:
            return await self._store(self.receiver.receive_copy, body)

    async def start_playback(self, after: int, generation: int, blocks: int) -> dict:
        async with self.lock:
            await trio.to_thread.run_sync(self.receiver.start_playback, after, generation,
                                          blocks)
        self.wake.set()
        log.info("initial copy received (%d blocks); it is played as delta set %d", blocks,
                 after)
        return self.receiver.info()

    async def chunk(self, body: bytes) -> dict:
        async with self.lock:
            return await self._store(self.receiver.receive_chunk, body)

    async def chunks(self, bodies: list) -> tuple[list[dict], Exception | None]:
        """Several delta chunks in one worker-thread hand-off (rcp/server.py: those a session
        received while the ones before them were stored), each stored as `chunk` stores it,
        in order, up to the first that fails: the answers of the chunks stored, and the
        failure (None, or what `chunk` would raise: a disk error contained as in `_store`)."""
        def store() -> tuple[list[dict], Exception | None]:
            out = []
            for body in bodies:
                try:
                    out.append(self.receiver.receive_chunk(body))
                except Exception as e:  # noqa: BLE001 - the caller answers it as `chunk` would
                    return out, e
            return out, None

        async with self.lock:
            out, err = await trio.to_thread.run_sync(store)
        if isinstance(err, (OSError, lmdb.Error)):
            self.svc.supervisor.error("receiver", err, transient=is_transient(err, (lmdb.Error,)))
            err = ReceiveError(f"this site cannot store what was sent: {describe(err)}", "busy")
        elif out:
            self.svc.supervisor.ok("receiver")
        return out, err

    async def commit(self, args: dict) -> dict:
        try:
            header = bytes.fromhex(args.get("header", ""))
        except ValueError:
            raise ReceiveError("the header is not hex", "invalid") from None
        async with self.lock:
            out = await self._store(self.receiver.commit, header, args)
        self.wake.set()
        return out

    # ------------------------------------------------------------------ verbs run here

    async def stop(self) -> dict:
        async with self.lock:  # (a durable LMDB commit: in a worker thread)
            await trio.to_thread.run_sync(self.receiver.detach)
        self.wake.set()
        return {"stopped": "playback"}

    def policy(self) -> dict:
        with self.svc.store.env.begin(db=self.db_ctx) as txn:
            raw = txn.get(b"playback_policy")
        pol = {"playback_timeout": 0.0, "playback_hwm": 64 << 20}
        if raw:
            pol.update(json.loads(raw))
        return pol

    async def set_policy(self, changes: dict) -> dict:
        bad = {"timeout", "hwm"} & {k for k, v in changes.items() if v is not None}
        if bad:
            raise SnapError("--timeout and --hwm are set on the primary")

        def update() -> dict:  # (a durable LMDB commit: in a worker thread)
            pol = self.policy()
            pol.update({k: v for k, v in changes.items()
                        if k in ("playback_timeout", "playback_hwm") and v is not None})
            with self.svc.store.env.begin(write=True, db=self.db_ctx) as txn:
                txn.put(b"playback_policy", json.dumps(pol).encode())
            return pol

        async with self.lock:  # one read-modify-write at a time
            pol = await trio.to_thread.run_sync(update)
        self.wake.set()
        return pol

    # ------------------------------------------------------------------ playback

    async def playback_loop(self) -> None:
        """Integrate complete delta sets in order, one consistent step at a time (FIG. 9)."""
        svc = self.svc
        self.playing = True
        try:
            await self._playback()
        finally:
            self.playing = False

    async def _playback(self) -> None:
        svc = self.svc
        while self.receiver.role == "secondary":
            with trio.move_on_after(0.2):
                await self.wake.wait()
            self.wake = trio.Event()
            if self.receiver.state != "replicating":
                continue
            rec = self.receiver.next_to_play()
            if rec is None:
                continue
            if self.verify.holds(rec["number"]):  # a verify compares the volume as it is
                continue
            if svc.forwarder is not None and svc.forwarder.playback_pause():
                continue  # its next hops hold up the forwarded delta sets (flow control)
            pol = self.policy()
            waiting = self.receiver.incoming()
            age = (time.time_ns() - rec["received_ns"]) / 1e9
            if age < pol["playback_timeout"] and sum(
                    x["blocks"] for x in waiting) * 4096 < pol["playback_hwm"]:
                continue
            t0 = time.monotonic()
            try:
                await volume_changes(svc.ops, lambda: self.receiver.play(rec, svc.clog),
                                     lambda: self.receiver.extents(rec))
            except (ReceiveError, ChunkError) as e:  # damaged here: verified, nothing written
                if rec.get("copy"):
                    raise  # the initial copy cannot be sent again: shown, retried slowly
                kept = await trio.to_thread.run_sync(self.receiver.quarantine, rec, str(e))
                log.error("%s: quarantined%s, never played; asking the primary for delta "
                          "set %d again", e, f" in {kept}" if kept else "", rec["number"])
                self.svc.supervisor.error("playback", e, transient=False, quiet=True)
                continue
            self.svc.supervisor.ok("playback")
            self.playback_ms.append((time.monotonic() - t0) * 1000)
            if svc.forwarder is not None:  # a delta set may be ready for the next hops
                svc.forwarder.work.set()
                svc.forwarder.work = trio.Event()
            del self.playback_ms[:-1000]
            self.wake.set()  # maybe more to play
