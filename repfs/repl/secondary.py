"""The secondary role of a running site: the receiver's control-port endpoints (attach,
initial copy, chunks, commits) and the playback loop that integrates complete delta sets in
order (FIG. 9), each one consistent step with exactly the stale kernel caches dropped."""

from __future__ import annotations

import json
import logging
import time

import trio

from ..fs.invalidate import volume_changes
from .receiver import ReceiveError
from ..snap.store import SnapError

log = logging.getLogger(__name__)


class Secondary:
    def __init__(self, svc, receiver):
        self.svc = svc
        self.receiver = receiver
        self.db_ctx = svc.store.env.open_db(b"replctx")  # never open a database inside a txn
        self.wake = trio.Event()
        self.playback_ms: list[float] = []

    # ------------------------------------------------------------------ receiver endpoints

    def info(self) -> dict:
        svc = self.svc
        info = self.receiver.info()
        root = svc.core.iget(1)
        info.update(uuid=svc.core.sb.uuid.hex(), site=str(svc.site.path),
                    root_entries=svc.core.dirs.header(root).count,
                    destinations=[d["name"] for d in svc.primary.dests()
                                  if d["state"] != "stopped"] if svc.primary else [])
        return info

    async def attach(self, primary: dict, generation: int) -> dict:
        svc = self.svc
        async with svc.ops.quiesce():
            await trio.to_thread.run_sync(svc.core.checkpoint)
            if svc.primary is not None:
                for name in list(svc.primary.tasks):
                    svc.primary.tasks.pop(name).cancel()
                svc.clog.disable()
                svc.primary = None
                svc.sets = None
            self.receiver.attach(primary, generation)
            svc.core.readonly = True
            svc.readonly = True
        svc.nursery.start_soon(self.playback_loop)
        log.info("this site is now a secondary of %s: its mount is read-only; waiting for the "
                 "initial copy", primary.get("site"))
        return self.receiver.info()

    async def copy(self, body: bytes) -> dict:
        start, data = self.receiver.check_copy(body)
        await trio.to_thread.run_sync(self.svc.clog.write, start, data, True)
        return {"written": len(data) // 4096}

    async def start_playback(self, after: int) -> dict:
        clog = self.svc.clog

        def apply():
            clog.flush()
            self.receiver.start_playback(after)
        await volume_changes(self.svc.ops, apply, lambda: None)
        log.info("initial copy received; playback starts after delta set %d", after)
        return self.receiver.info()

    def chunk(self, body: bytes) -> dict:
        return self.receiver.receive_chunk(body)

    def commit(self, args: dict) -> dict:
        try:
            header = bytes.fromhex(args.get("header", ""))
        except ValueError:
            raise ReceiveError("the header is not hex", "invalid") from None
        out = self.receiver.commit(header, args)
        self.wake.set()
        return out

    # ------------------------------------------------------------------ verbs run here

    def stop(self) -> dict:
        self.receiver.detach()
        self.wake.set()
        return {"stopped": "playback"}

    def policy(self) -> dict:
        with self.svc.store.env.begin(db=self.db_ctx) as txn:
            raw = txn.get(b"playback_policy")
        pol = {"playback_timeout": 0.0, "playback_hwm": 64 << 20}
        if raw:
            pol.update(json.loads(raw))
        return pol

    def set_policy(self, changes: dict) -> dict:
        bad = {"timeout", "hwm"} & {k for k, v in changes.items() if v is not None}
        if bad:
            raise SnapError("--timeout and --hwm are set on the primary")
        pol = self.policy()
        pol.update({k: v for k, v in changes.items()
                    if k in ("playback_timeout", "playback_hwm") and v is not None})
        with self.svc.store.env.begin(write=True, db=self.db_ctx) as txn:
            txn.put(b"playback_policy", json.dumps(pol).encode())
        self.wake.set()
        return pol

    # ------------------------------------------------------------------ playback

    async def playback_loop(self) -> None:
        """Integrate complete delta sets in order, one consistent step at a time (FIG. 9)."""
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
            pol = self.policy()
            waiting = self.receiver.incoming()
            age = (time.time_ns() - rec["received_ns"]) / 1e9
            if age < pol["playback_timeout"] and sum(
                    x["blocks"] for x in waiting) * 4096 < pol["playback_hwm"]:
                continue
            t0 = time.monotonic()
            await volume_changes(svc.ops, lambda: self.receiver.play(rec, svc.clog),
                                 lambda: self.receiver.extents(rec))
            self.playback_ms.append((time.monotonic() - t0) * 1000)
            del self.playback_ms[:-1000]
            self.wake.set()  # maybe more to play
