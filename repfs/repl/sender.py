"""The primary's side of replication: destinations, the cut policy, the initial copy (FIG. 11)
and one send task per destination (FIG. 12), which streams each delta set's chunks from its
pinning snapshot (repl/deltaset.py) with a window of chunks in flight.

The plan (what to send next) is a function of the mailbox and the receiver's report; the send
task drives it, retries temporary failures with back-off, resends what a receiver rejected,
and resumes from the mailbox and the receiver's report after a restart of either daemon.
The transport is behind `ReceiverClient`; the local one talks to a secondary daemon on the
same host over its control port (the network transport will implement the same calls).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import trio

from ..common import Latencies
from ..extents import runs
from . import keys as K
from ..snap.store import DamagedRecord
from .chunk import ChunkError
from .transport import PermanentError, ReceiverClient, RejectedError, TransientError

log = logging.getLogger(__name__)
BS = 4096
COPY_PIECE = 256  # blocks per initial-copy request
DEFAULT_POLICY = {"timeout": 5.0, "hwm": 64 << 20, "playback_timeout": 0.0,
                  "playback_hwm": 64 << 20, "retention": 7 * 86400.0}
# a destination's own policy, kept in its record (`replicate policy --to NAME`): its bandwidth
# limit in bytes per second (0: none) and whether its RCP sessions offer zstd compression
DEST_POLICY = {"bwlimit": 0, "compress": True}
MIN_BWLIMIT = 64 << 10  # a chunk frame (up to 1 MiB) goes within the peer's idle timeout
BURST = 0.5  # s of the limit a destination may send at once after a pause


class TokenBucket:
    """A bandwidth limit: `take(n)` before n bytes go on the wire sleeps as long as needed
    for the bytes taken to stay within `rate` bytes per second (0: no limit) plus a burst
    of BURST seconds' worth. A body larger than the bucket is taken whole (the bucket goes
    into debt, and the next take sleeps it off), so bodies of any size pass at the rate.
    `rate` may be changed at any time (the policy verb, from another thread); `sleep` is
    where the sender's worker thread waits (and learns it was stopped)."""

    def __init__(self, rate: int = 0, *, clock=time.monotonic, sleep=time.sleep):
        self.rate = rate
        self.clock, self.sleep = clock, sleep
        self.tokens = 0.0
        self.stamp: float | None = None

    def take(self, n: int) -> float:
        """Account for n bytes; returns the seconds slept."""
        rate = self.rate
        if not rate:
            self.stamp = None  # (a limit set later starts with a full bucket)
            return 0.0
        now = self.clock()
        cap = rate * BURST
        if self.stamp is None:
            self.tokens = cap
        else:
            self.tokens = min(cap, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens >= 0:
            return 0.0
        wait = -self.tokens / rate  # (refilled by the next take: its clock has moved on)
        self.sleep(wait)
        return wait


def make_client(service, d: dict) -> ReceiverClient:
    """The transport to destination `d` (its record, or the part `replicate start` has made):
    an RCP session to HOST:PORT for a remote one (kind "rcp"), else the control port of a
    site on this host."""
    if d.get("kind") == "rcp":
        from ..rcp.client import RcpReceiverClient
        return RcpReceiverClient(d["site"], group=d["group"], local=service.site.path,
                                 uuid=service.core.sb.uuid.hex(),
                                 name=identity(service, d)["site"],
                                 compress=d.get("compress", True))
    return ReceiverClient(service.peer(d["site"]))


def identity(service, d: dict) -> dict:
    """How this primary names itself to destination `d` (ATTACH's "primary"): its uuid and
    site directory; to a remote one, the directory prefixed by this host's name (a site at the
    same path on another host is another site)."""
    return d.get("me") or {"uuid": service.core.sb.uuid.hex(), "site": str(service.site.path)}


RETRY_FAST = 2.0  # s: the longest back-off while a destination's failures are new
RETRY_SLOW_AFTER = 60.0  # s of failing after which it retries more slowly
RETRY_SLOW = 30.0  # s: the longest back-off then (no retry storm for a site that is gone)


def retry_delay(backoff: float, failing_for: float) -> float:
    """The back-off after `backoff`, once a destination has been failing for `failing_for`
    seconds: doubled, up to RETRY_FAST at first, up to RETRY_SLOW after RETRY_SLOW_AFTER."""
    return min(backoff * 2, RETRY_FAST if failing_for < RETRY_SLOW_AFTER else RETRY_SLOW)


def subtree(d: dict) -> int:
    """The lowest delta set destination `d` and every site below it (when it forwards:
    forward.py) have played, as far as this site last heard from `d`."""
    fwd = d.get("forward") or {}
    below = fwd.get("played")
    return min(d["played"], below) if isinstance(below, int) else d["played"]


class Superseded(Exception):
    """A send task's worker thread found its task cancelled (`replicate stop`, `start
    --force`): it stops at the next piece or chunk instead of sending on."""


class SendTask:
    """One destination's send task: its cancel scope, a flag its worker threads can read
    (a cancel scope's own state must be read in the trio thread), and an event set when it
    has ended. Cancelling it also aborts its client's connection, so that a worker thread
    blocked on a wedged or unreachable peer returns at once instead of after its timeouts."""

    def __init__(self):
        self.scope = trio.CancelScope()
        self.stop = threading.Event()
        self.ended = trio.Event()
        self.client: ReceiverClient | None = None
        self.bucket = TokenBucket(sleep=self._sleep)  # the destination's bandwidth limit

    def _sleep(self, seconds: float) -> None:
        """In a worker thread: wait for the bandwidth limit; Superseded once cancelled."""
        if self.stop.wait(seconds):
            raise Superseded()

    def pace(self, client: ReceiverClient, d: dict):
        """Apply destination `d`'s policy to this task: its limit to the bucket, which an
        RCP client applies to its frames as they go on the wire (returns None); for a local
        destination, returns the bucket's `take` for the bodies' generator."""
        self.bucket.rate = d.get("bwlimit", 0)
        if hasattr(client, "pace"):
            client.pace = self.bucket.take
            if client.compress != d.get("compress", True):  # (the next session offers it)
                client.compress = d.get("compress", True)
                client.close()
            return None
        return self.bucket.take

    def cancel(self) -> None:
        self.stop.set()
        self.scope.cancel()
        if self.client is not None:
            self.client.abort()

    def check(self) -> None:
        """In a worker thread: raise Superseded once the task is cancelled."""
        if self.stop.is_set():
            raise Superseded()


class Primary:
    """Replication at a primary site: owns the cut and copy loops and the send tasks. (A
    forwarder's send tasks are this class's too: forward.Forwarder, which never cuts.)"""

    cuts = True  # its delta sets are cut from the change log

    def __init__(self, service, clog, sets):
        self.service = service
        self.clog = clog
        self.sets = sets
        self.env = sets.env
        self.db_dests = self.env.open_db(K.DESTS)
        self.work = trio.Event()  # a delta set became ready
        self.cut_lock = trio.Lock()
        self.tasks: dict[str, SendTask] = {}
        self._dest_locks: dict[str, trio.Lock] = {}
        self.flow_control = False
        self.stall_ms: list[float] = []
        # cuts: the writers' stall and the whole cut, boundary durable (/metrics)
        self.cut_stall = Latencies()
        self.cut_latency = Latencies()
        self.unready: int | None = None  # a delta set cut whose "ready" commit failed
        self.sent_bytes = 0
        # destination -> when it last showed progress (an answer, a chunk's room in the
        # window): a forwarder silent for [repl] bypass_after is bypassed, also when its link
        # died silently and no error comes before the 60 s answer timeout (_watch_forwarders)
        self.progress: dict[str, float] = {}
        self.rate_window: list[tuple[float, int]] = []
        self.sup = service.supervisor  # contains, logs, shows and retries task failures
        settings = service.site.settings()
        self.send_window = settings.send_window  # site.toml [repl] send_window
        self.bypass_after = settings.bypass_after  # [repl] bypass_after: s before a bypass
        if self.cuts:
            self.clog.enabled = any(d["state"] != "stopped" for d in self.dests())

    # ------------------------------------------------------------------ state

    def policy(self) -> dict:
        raw = self.sets.ctx_get("policy")
        p = dict(DEFAULT_POLICY)
        if raw:
            p.update(json.loads(raw))
        return p

    def set_policy(self, **changes) -> dict:
        p = self.policy()
        p.update({k: v for k, v in changes.items() if v is not None})
        self.sets.ctx_put("policy", json.dumps(p).encode())
        return p

    def dests(self) -> list[dict]:
        with self.env.begin(db=self.db_dests) as txn:
            return [json.loads(v) for _, v in txn.cursor()]

    def dest(self, name: str) -> dict | None:
        with self.env.begin(db=self.db_dests) as txn:
            raw = txn.get(name.encode())
        return json.loads(raw) if raw else None

    def put_dest(self, d: dict) -> None:
        """Record destination `d`; its policy (DEST_POLICY's keys) is the recorded one, set
        only by `set_dest_policy` (a send task's copy of the record may predate a change;
        a destination started again keeps its policy). `d` gets the recorded policy too."""
        with self.env.begin(write=True, db=self.db_dests) as txn:
            old = txn.get(d["name"].encode())
            old = json.loads(old) if old else {}
            for k in DEST_POLICY:
                d.pop(k, None)
                if k in old:
                    d[k] = old[k]
            txn.put(d["name"].encode(), json.dumps(d).encode())

    def set_dest_policy(self, name: str, **changes) -> dict:
        """Change destination `name`'s own policy (None: unchanged); its whole policy. A
        running send task takes the limit at once, compression from its next session."""
        with self.env.begin(write=True, db=self.db_dests) as txn:
            raw = txn.get(name.encode())
            if raw is None:
                raise KeyError(name)
            d = json.loads(raw)
            d.update({k: v for k, v in changes.items() if k in DEST_POLICY and v is not None})
            txn.put(name.encode(), json.dumps(d).encode())
        task = self.tasks.get(name)
        if task is not None:
            task.bucket.rate = d.get("bwlimit", 0)
        return {k: d.get(k, v) for k, v in DEST_POLICY.items()}

    def del_dest(self, name: str) -> None:
        with self.env.begin(write=True, db=self.db_dests) as txn:
            txn.delete(name.encode())

    # ------------------------------------------------------------------ loops

    async def run(self, nursery) -> None:
        nursery.start_soon(self.sup.run, "bypass", self._watch_forwarders)
        nursery.start_soon(self.sup.run, "cut", self._cut_loop)
        for d in self.dests():  # (a resync waiting to attach its peer: resync goes on)
            if d["state"] not in ("stopped", "resync-attach"):
                self.start_sender(nursery, d["name"])

    async def _cut_loop(self) -> None:
        while True:
            await trio.sleep(0.1)
            if not self.clog.enabled or not self.tasks:
                continue  # (no destination: a new primary's log only logs, recovery/)
            if self.unready is not None:  # its "ready" commit failed: made ready now, also
                async with self.cut_lock:  # when nothing was written since (no cut follows,
                    await self.ready_unready()  # and the send task waits for it)
                self.work.set()
                self.work = trio.Event()
                self.sup.ok("cut")
            if self.service.core.error is not None:
                continue  # the file system turned read-only: nothing to cut at a commit
            why = self.sets.flow_control()
            if why:
                if not self.flow_control:
                    log.warning("flow control: %s; cutting paused until destinations catch "
                                "up (the change log keeps coalescing)", why)
                self.flow_control = True
                continue
            self.flow_control = False
            p = self.policy()
            changed = self.clog.changed_blocks * BS
            age = (time.time_ns() - self.clog.first_change_ns) / 1e9 if changed else 0
            if changed and (changed >= p["hwm"] or age >= p["timeout"]):
                await self.cut()
                self.sup.ok("cut")

    async def ready_unready(self) -> None:
        """Before any other cut (the caller holds cut_lock): the delta set whose syncs ran
        but whose "ready" commit failed is made ready first, so no delta set is ready
        after one that is not (a restart would undo it behind its successor)."""
        if self.unready is not None:
            await trio.to_thread.run_sync(self.sets.cut_ready, self.unready)
            n, self.unready = self.unready, None
            await trio.to_thread.run_sync(self.sets.reserve, n)  # (its cut did not get to it)

    async def cut(self) -> int:
        """Cut the accumulating delta set at a consistency point. Writers pause only while
        the boundary is recorded (the closing commit prepared in memory, one LMDB commit:
        the delta set in state "cut"); its syncs run after they go on (Operations.
        cut_point), and the delta set turns "ready" (sent from then on) once its boundary
        is durable. A crash before that undoes it (deltaset.undo_unready)."""
        async with self.cut_lock:
            ops = self.service.ops
            t0 = time.monotonic()
            await self.ready_unready()
            token = []
            prepared = []  # the pin, its save volume made before the gate

            def prepare():
                prepared.append(self.sets.cut_prepare())

            def begin(meta_blocks):
                # (the change log lock keeps a write from the table while it turns into
                # the block list; the commit lock is held: no group commit writes the
                # volume between the prepared commit and the cut)
                n = self.sets.cut_begin(meta_blocks,
                                        prepared=prepared[0] if prepared else None)
                if prepared and self.sets.pin(n) is prepared[0]:
                    prepared.clear()  # taken
                token[:] = [n, meta_blocks]
                return token

            def written(tok):
                self.sets.cut_written(*tok)

            def durable(tok):
                try:
                    self.sets.cut_ready(tok[0])
                except BaseException:
                    self.unready = tok[0]  # (never sent before it is ready)
                    raise

            try:
                await ops.cut_point(begin, written, durable, prepare)
            finally:
                with trio.CancelScope(shield=True):
                    for snap in prepared:  # not taken (an empty delta set, a failed cut)
                        await trio.to_thread.run_sync(self.sets.store.discard_prepared, snap)
            n = token[0]
            self.stall_ms.append(ops.gate_ms)  # what writers waited (the gate was closed)
            self.cut_stall.add(ops.gate_ms / 1000)
            self.cut_latency.add(time.monotonic() - t0)
            await trio.to_thread.run_sync(self.sets.reserve, n)
            del self.stall_ms[:-1000]
            self.work.set()
            self.work = trio.Event()
            return n

    # ------------------------------------------------------------------ destinations

    def start_sender(self, nursery, name: str) -> None:
        old = self.tasks.get(name)
        if old is not None:  # (one task per destination)
            old.cancel()
        task = self.tasks[name] = SendTask()
        nursery.start_soon(self._supervised_send, name, task)

    def dest_lock(self, name: str) -> trio.Lock:
        """Held by `replicate start` and `stop` of destination `name`: two of them at once
        could leave the first one's send thread running beside the second's task (review
        of issue 9)."""
        return self._dest_locks.setdefault(name, trio.Lock())

    async def stop_senders(self, *names: str) -> list[str]:
        """Cancel the send tasks of destinations `names` and wait until they have all ended;
        returns the names whose task was still running. A worker thread may be in the middle
        of a send: until it returns, it may still record its destination, over what
        `replicate stop` or `start --force` records next (CI, 5c06c21: the old task of a
        `start --force` found the secondary taking the new copy and put the destination in
        error). All are cancelled before any is waited for; a cancel aborts the task's
        connection (`SendTask.cancel`) and the thread gives up at its next piece or chunk
        (`SendTask.check`), so this takes moments, not the peers' timeouts. A task stays in
        `tasks` until it has ended, so a concurrent stop waits for it too."""
        found = [(n, self.tasks[n]) for n in names if n in self.tasks]
        live = [n for n, t in found if not t.ended.is_set()]
        for _, t in found:
            t.cancel()
        with trio.CancelScope(shield=True):
            for _, t in found:
                await t.ended.wait()
        for n, t in found:
            if self.tasks.get(n) is t:
                del self.tasks[n]
        return live

    async def _supervised_send(self, name: str, task: SendTask) -> None:
        # `replicate stop` cancels the scope; any other failure (a chunk file that cannot be
        # read, a damaged record) is contained, shown in status and retried
        try:
            with task.scope:
                await self.sup.run(f"send {name}", self._send_task, name, task)
            if self.tasks.get(name) in (task, None):  # (not when a new task replaced it)
                self.sup.stopped(f"send {name}")
        finally:
            task.ended.set()

    async def _send_task(self, name: str, me: SendTask) -> None:
        task = f"send {name}"
        d = self.dest(name)
        if d is None:
            return
        client = make_client(self.service, d)
        me.client = client
        if me.stop.is_set():  # (cancelled before it had a client to abort)
            return
        try:
            backoff, failing_since = 0.2, None
            last_error = None
            while True:
                d = self.dest(name)
                if d is None or d["state"] == "stopped":
                    return
                try:
                    if d["state"] == "initial-copy":
                        await trio.to_thread.run_sync(self._initial_copy, client, name, me)
                        await self.service.snapshots.delete(d["snapshot"], internal=True)
                        self.sup.ok(task)
                        continue
                    sent = await trio.to_thread.run_sync(self._send_next, client, name, me)
                    self.sup.ok(task)
                    if self.bypassed(name):  # the forwarder answers again: it sends on
                        await self.bypass(name, False)
                    if last_error:
                        log.info("destination %s: reachable again", name)
                        last_error = None
                        d = self.dest(name)
                        d.pop("last_error", None)
                        d.pop("failing_since_ns", None)
                        self.put_dest(d)
                    backoff, failing_since = 0.2, None
                    if not sent:
                        with trio.move_on_after(0.5):
                            await self.work.wait()
                except Superseded:
                    return
                except (TransientError, RejectedError) as e:
                    if me.stop.is_set():  # (a worker thread's error arrives even after
                        return  # the task was cancelled: the record may be a new task's)
                    self.sup.error(task, e, transient=True, quiet=True)  # logged here
                    now = time.monotonic()
                    if failing_since is None:
                        failing_since = now
                    if str(e) != last_error:
                        log.info("destination %s: %s (retrying)", name, e)
                        last_error = str(e)
                        d = self.dest(name)
                        if d is not None:
                            d["last_error"] = last_error
                            d.setdefault("failing_since_ns", time.time_ns())
                            self.put_dest(d)
                    client.close()
                    if (now - failing_since >= self.bypass_after and d is not None
                            and (d.get("forward") or {}).get("hops")
                            and not self.bypassed(name)):
                        await self.bypass(name, True)
                    await trio.sleep(backoff)
                    slower = retry_delay(backoff, now - failing_since)
                    if slower > RETRY_FAST >= backoff:
                        log.info("destination %s: failing for %.0f s; retrying every %.0f s "
                                 "at most", name, now - failing_since, RETRY_SLOW)
                    backoff = slower
                except PermanentError as e:
                    if me.stop.is_set():  # (a worker thread's error arrives even after
                        return  # the task was cancelled: the record may be a new task's)
                    self.sup.error(task, e, transient=False, quiet=True)  # logged here
                    log.error("destination %s: %s; replication to it stopped", name, e)
                    d = self.dest(name)
                    d["state"] = "error"
                    d["error"] = str(e)
                    self.put_dest(d)
                    return
        finally:
            client.close()

    # ------------------------------------------------------------------ bypass (FIG. 16 text)

    async def _watch_forwarders(self) -> None:
        """Bypass a forwarder that has shown no progress for [repl] bypass_after seconds
        while it lacks a delta set this site holds: its send task may be waiting out a
        silent link's timeouts (60 s per answer) before it sees any error."""
        while True:
            await trio.sleep(1.0)
            now = time.monotonic()
            for d in await trio.to_thread.run_sync(self.dests):
                name = d["name"]
                if d["acked"] >= self.sets.last_cut:  # (nothing to send: nothing to wait for)
                    self.progress.pop(name, None)
                    continue
                if (d["state"] != "replicating" or not (d.get("forward") or {}).get("hops")
                        or name not in self.tasks):
                    continue
                since = self.progress.setdefault(name, now)
                if now - since >= self.bypass_after and not self.bypassed(name):
                    log.info("destination %s: no progress for %.0f s", name, now - since)
                    await self.bypass(name, True)

    def bypassed(self, name: str) -> list[str]:
        """The destinations standing in for forwarder `name` while it does not answer."""
        return [d["name"] for d in self.dests() if d.get("bypass_of") == name]

    async def bypass(self, name: str, on: bool) -> None:
        """Forwarder `name` stopped acknowledging (for [repl] bypass_after seconds): send
        straight to its next hops, each from where it last said it was, until it answers
        again (`on` False: those destinations end; the forwarder goes on from where its
        next hops are). Delta sets are kept until the forwarder's whole subtree has played
        them (`prune`), so the next hops are sent what they lack, never a copy."""
        if not on:
            names = self.bypassed(name)
            for b in names:  # (bypasses of a bypassed forwarder's own next hops too)
                if self.bypassed(b):
                    await self.bypass(b, False)
            await self.stop_senders(*names)
            for b in names:
                await trio.to_thread.run_sync(self.del_dest, b)
            if names:
                log.info("destination %s answers again: it forwards to its next hops itself",
                         name)
            return
        d = self.dest(name)
        if d is None or d.get("kind") != "rcp":  # (its next hops are reached by RCP)
            return
        fwd = d.get("forward") or {}
        started = []
        for hop in fwd.get("hops") or []:
            if hop.get("state") != "replicating" or not isinstance(hop.get("site"), str):
                continue  # (one still taking its copy from the forwarder waits for it)
            b = f"{hop['site']} (bypassing {name})"
            if self.dest(b) is not None or self.dest(hop["site"]) is not None:
                continue  # (also sent to directly: nothing to stand in for)
            rec = {"name": b, "kind": "rcp", "site": hop["site"],
                   "group": hop.get("group") or d.get("group"), "me": d.get("me"),
                   "state": "replicating", "acked": hop["acked"], "played": hop["played"],
                   "bypass_of": name, "via": fwd.get("me"), "forward": hop.get("forward"),
                   "started_ns": time.time_ns()}
            if not self.cuts:  # (a forwarder's records of its own: forward.Forwarder.dests)
                rec["route"] = True
            await trio.to_thread.run_sync(self.put_dest, rec)
            self.start_sender(self.service.nursery, b)
            started.append(hop["site"])
        if started:
            log.warning("destination %s (a forwarder) has not answered for %d s: sending "
                        "straight to its next hops %s until it does", name, self.bypass_after,
                        ", ".join(started))

    def _initial_copy(self, client: ReceiverClient, name: str,
                      me: SendTask) -> None:
        """Copy the valid extents of the stamped snapshot (FIG. 11) in block order, resuming
        where the receiver says it holds the copy whole (after a crash of either side, its
        durable position, which may be behind what was sent)."""
        d = self.dest(name)
        take = me.pace(client, d)  # (None: the RCP client paces its frames itself)
        layer = self.service.layer
        snap = self.service.store.find(d["snapshot"])
        gen = self.sets.generation
        info = client.info()
        self._check_generation(info, d)
        self._check_follows(info, d)
        if (info.get("state") == "replicating" and info.get("generation") == gen
                and info.get("last_received", 0) >= d["stamp"]):
            # it took the copy, but its answer to "start playback" was lost (a crash of
            # either side, a dropped connection): the copy is done
            self._copy_done(d, name, d.get("copied", 0))
            return
        if info.get("state") != "initial-copy" or not info.get("copy"):
            raise PermanentError(f"{d['site']} is not expecting an initial copy")
        nblocks = layer.nblocks
        pos = info["copy"]["next_block"]
        d["copy_pos"] = pos
        # a resync sends only the blocks that differ (recovery/resync.py): page -> bools
        only = self.service.resync.mask(name) if d.get("resync") else None

        def valid(page: int):
            """The blocks of `page` the copy sends: valid in the snapshot (its file
            system's bitmap), and, for a resync, in its block list."""
            arr = layer.meta_page(snap, page)[:nblocks - page * K.PAGE_BITS]
            if only is not None:
                mask = only.get(page)
                return np.zeros(0, dtype=bool) if mask is None else arr & mask[:len(arr)]
            return arr

        if "copy_total" not in d:  # the blocks it sends in all (status, the progress line)
            d["copy_total"] = sum(int(np.count_nonzero(valid(p)))
                                  for p in range(-(-nblocks // K.PAGE_BITS)))
            self.put_dest(d)
        counted = [0]  # valid blocks of the snapshot, all of which the receiver must hold

        def pieces():
            """The snapshot's valid extents from `pos` on, read a piece at a time as the
            window of the pipelined send makes room (bounded memory)."""
            last_save = time.monotonic()
            page = pos // K.PAGE_BITS
            for p in range(page):  # below the resume position: counted, not sent
                counted[0] += int(np.count_nonzero(valid(p)))
            while page * K.PAGE_BITS < nblocks:
                base = page * K.PAGE_BITS
                idx = np.flatnonzero(valid(page))
                counted[0] += len(idx)
                idx = idx[idx + base >= pos]
                for _, first, c in runs(idx):
                    s = base + first
                    while c:
                        m = min(c, COPY_PIECE)
                        me.check()
                        if take is not None:
                            take(m * BS)
                        yield gen, s, layer.read_snapshot(snap, s, m)
                        d["copied"] = d.get("copied", 0) + m
                        self.sent_bytes += m * BS
                        s += m
                        c -= m
                        d["copy_pos"] = s
                        if time.monotonic() - last_save > 1.0:
                            self.put_dest(d)
                            last_save = time.monotonic()
                page += 1
                d["copy_pos"] = max(d["copy_pos"], page * K.PAGE_BITS)

        client.send_copies(pieces(), window=self.send_window)
        me.check()
        total = counted[0]
        client.start_playback(d["stamp"], gen, total)
        self._copy_done(d, name, total)

    def _copy_done(self, d: dict, name: str, blocks: int) -> None:
        d.update(state="replicating", acked=d["stamp"], played=d["stamp"] - 1,
                 copy_done_ns=time.time_ns())
        self.put_dest(d)
        if d.get("resync"):  # (its block list has served)
            self.service.resync.forget(name)
        log.info("destination %s: initial copy done (%d blocks); the secondary plays it as "
                 "delta set %d", name, blocks, d["stamp"])

    def _check_generation(self, info: dict, d: dict) -> None:
        """Invariant 5 (in a worker thread): a destination at a newer generation than this
        site's was failed over to (or follows a site that was). This primary is stale: it
        fences itself (read-only, recovery/failover.py) and sends it nothing."""
        theirs, mine = info.get("generation", 0), self.sets.generation
        if theirs <= mine:
            return
        recovery = getattr(self.service, "recovery", None)
        if recovery is not None and self.service.primary is self:
            trio.from_thread.run(recovery.fence, d["site"], theirs,
                                 "its receiver state says so (this site's send task)")
        raise PermanentError(f"{d['site']} holds generation {theirs}, newer than this site's "
                             f"{mine}: this site is a stale primary, fenced read-only (resync "
                             f"it from the new primary)")

    def _check_follows(self, info: dict, d: dict) -> None:
        """The destination still follows this primary: another primary of its group (at the
        same generation: nobody failed over) may have taken it with `start --force` while
        this one was away. Its numbers are that primary's then; sending on would mix two
        primaries' blocks in one volume (review of issue 9)."""
        theirs = info.get("primary") or {}
        mine = identity(self.service, d)
        ok = [(mine["uuid"], mine["site"])]
        via = d.get("via")  # a bypass: the next hop follows the forwarder it stands in for
        if isinstance(via, dict) and via.get("uuid") and via.get("site"):
            ok.append((via["uuid"], via["site"]))
        if (theirs.get("uuid"), theirs.get("site")) not in ok:
            raise PermanentError(f"{d['site']} now follows {theirs.get('site') or 'no primary'}"
                                 f", not this site")

    def _send_next(self, client: ReceiverClient, name: str,
                   me: SendTask) -> bool:
        """Send the next delta set the destination lacks; False when there is none ready."""
        d = self.dest(name)
        take = me.pace(client, d)  # (None: the RCP client paces its frames itself)
        info = client.info()
        self.progress[name] = time.monotonic()
        self._check_generation(info, d)
        if info.get("state") == "failover":  # (its generation is raised when it is done)
            raise TransientError(f"{d['site']} is failing over")
        if info.get("role") != "secondary" or info.get("state") != "replicating":
            raise PermanentError(f"{d['site']} is no longer a replicating secondary")
        self._check_follows(info, d)
        changed = (d["acked"], d["played"]) != (info["last_received"], info["last_played"])
        d["acked"], d["played"] = info["last_received"], info["last_played"]
        fwd = info.get("forward")  # it forwards (forward.py): its next hops, their progress
        fwd = fwd if isinstance(fwd, dict) else None
        if fwd != d.get("forward"):
            d["forward"] = fwd
            changed = True
        if info.get("generation") != d.get("peer_generation"):  # (status: its peers)
            d["peer_generation"] = info.get("generation")
            changed = True
        if changed:
            self.put_dest(d)
            self.prune()  # played further: chunk files may go
        n = d["acked"] + 1  # behind what it acked before if it quarantined a delta set
        rec = self.sets.record(n)
        if rec is None or rec["state"] != "ready":
            return False
        if not self.sets.held(rec):
            raise PermanentError(f"{d['site']} asks for delta set {n} again, which this site "
                                 f"no longer holds; resync it")
        skip = 0
        if info.get("partial") and info["partial"]["delta_set"] == n:
            skip = info["partial"]["chunks"]
        stream = self.sets.stream(rec)
        sent = [0]

        def wanted():
            # made as they are sent (one chunk read and encoded at a time, the window's
            # chunks in flight); the chunks the receiver holds are made again, not sent,
            # as the header's checksum covers every chunk
            for number, raw in enumerate(stream.chunks()):
                me.check()
                self.progress[name] = time.monotonic()  # (the window had room: answers come)
                if number >= skip:
                    sent[0] += len(raw)
                    if take is not None:
                        take(len(raw))
                    yield raw
        try:
            client.send_chunks(wanted(), window=self.send_window)
            header = stream.header()
        except (ChunkError, DamagedRecord) as e:
            raise PermanentError(f"delta set {n} cannot be read on this site ({e}); "
                                 f"{d['site']} needs a full resync (replicate start --force)"
                                 ) from None
        self.sent_bytes += sent[0]
        me.check()
        ack = client.commit(header, {"cut_ns": rec["cut_ns"],
                                     "first_change_ns": rec["first_change_ns"]})
        d["acked"], d["played"] = ack["acked"], ack["played"]
        d["sent_bytes"] = d.get("sent_bytes", 0) + sent[0]
        self.put_dest(d)
        self.rate_window.append((time.monotonic(), sent[0], name))
        self.prune()
        return True

    def prune(self) -> None:
        """Release the delta sets every destination has played (runs in a worker thread).
        Not when they have only received them: a secondary that finds a received delta set
        damaged asks for it again."""
        # (not one in error: it needs a new copy, `replicate start`, not these delta sets)
        active = [d for d in self.dests() if d["state"] not in ("stopped", "error")]
        # (a forwarder's next hops too: they are sent to directly while it is bypassed)
        played = min((subtree(d) for d in active), default=self.sets.last_cut)
        self.sets.prune(played, self.policy()["retention"])

    # ------------------------------------------------------------------ reporting

    def lag(self, d: dict) -> float:
        """Age in seconds of the oldest write not yet played back at destination `d`."""
        now = time.time_ns()
        for n in range(d["played"] + 1, self.sets.last_cut + 1):
            rec = self.sets.record(n)
            if rec and rec["blocks"] and rec["first_change_ns"]:
                return (now - rec["first_change_ns"]) / 1e9
        if self.clog.changed_blocks and self.clog.first_change_ns:
            return (now - self.clog.first_change_ns) / 1e9
        return 0.0

    def rate(self, name: str | None = None) -> float:
        """Bytes per second of delta chunks sent over the last 10 s (to destination `name`,
        or to all)."""
        now = time.monotonic()
        self.rate_window = [x for x in self.rate_window if now - x[0] < 10]
        return sum(b for _, b, n in self.rate_window if name in (None, n)) / 10.0
