"""Tier 2: a delta-set cut whose "ready" commit fails (Primary.cut's `durable`,
Primary.ready_unready, deltaset.undo_unready), and the undo's line in a mount's log.

A primary runs in the test's trio run, assembled as the daemon assembles it (Site.open_fs,
Operations, SiteService: its cut loop under the supervisor and its send task), without a
FUSE mount, and replicates to a real secondary daemon. Its DeltaSets' `cut_ready` is wrapped
to fail once, as an LMDB commit can (a full map, an I/O error): the delta set then stays
"cut", is not sent, and is made ready by the cut loop even when nothing is written after it;
it is shipped once, whole, and its blocks are not marked again. A stop while it is not ready
undoes it at the next open (its blocks back in the change log).

Writes go through the file-system core while the test holds the cut lock (no cut point can
then run: the core is written only where a writer would pass the gate).
"""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import sys
import threading

import lmdb
import numpy as np
import pytest
import trio

from repfs.fs.format import ROOT_INO
from repfs.fs.ops import Operations
from repfs.repl import keys as K
from repfs.service import SiteService
from repfs.site import Site
from repfs.snap.store import SnapError
from tests.conftest import run_repfs
from tests.t1_changelog import ROOT_DIR, Stack
from tests.t1_cut_point import CHILD
from tests.t2_repl import api

SIZE = 64 << 20


class FailingReady:
    """Wraps a DeltaSets' cut_ready: while armed, the next call fails (before its commit),
    once, and the calls after it wait until `resume` is set (in their worker thread: the
    test looks at the failed state first); with `fail_all`, every call fails. Records the
    delta set and its state at each failure."""

    def __init__(self, sets):
        self.sets = sets
        self.real = sets.cut_ready
        self.armed = False
        self.fail_all = False
        self.resume = threading.Event()
        self.resume.set()
        self.failed: list[tuple[int, str]] = []
        sets.cut_ready = self

    def __call__(self, n: int) -> None:
        if not self.armed and not self.fail_all:
            assert self.resume.wait(60), "the test never let the retry go on"
        if self.armed or self.fail_all:
            if self.armed:
                self.resume.clear()
            self.armed = False
            self.failed.append((n, self.sets.record(n)["state"]))
            raise lmdb.Error("injected: the ready commit failed")
        self.real(n)


def write_file(core, name: str, data: bytes) -> None:
    ino = core.create(ROOT_INO, name.encode(), 0o644).ino
    core.write(ino, 0, data)
    core.release(ino)
    core.forget(ino, 1)


async def wait_for(what: str, cond, timeout: float = 30.0) -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def secondary(site) -> dict:
    return await trio.to_thread.run_sync(api, site, "GET", "/status")


async def release_at_exit(fault: FailingReady) -> None:
    """A retry held in its worker thread must not keep the test's nursery from ending."""
    try:
        await trio.sleep_forever()
    finally:
        fault.fail_all = True
        fault.resume.set()


def take_logged(caplog, needle: str) -> list[str]:
    """The log records of this test that contain `needle`, removed (they are its point)."""
    hits = [r for r in caplog.records if needle in r.getMessage()]
    for r in hits:
        caplog.records.remove(r)
    return [r.getMessage() for r in hits]


async def test_a_failed_ready_commit_is_retried_without_new_writes_and_shipped_once(
        tmp_path, mount_site, caplog):
    caplog.set_level(logging.INFO, "repfs")
    m2 = mount_site("64M", name="sec")
    site = Site.create(tmp_path / "pri", SIZE)
    ops = Operations(site.open_fs())
    svc = SiteService(site, ops, mountpoint=str(tmp_path / "pri-mnt"), readonly=False)
    p, sets, core = svc.primary, svc.sets, ops.core
    rng = random.Random(8)
    try:
        async with trio.open_nursery() as nursery:
            await svc.run(nursery)
            p.set_policy(timeout=0.0)  # cut as soon as anything changed
            await svc.replicate.start(str(m2.site))
            await wait_for("the initial copy", lambda: p.dests()[0]["state"] == "replicating")
            fault = FailingReady(sets)
            nursery.start_soon(release_at_exit, fault)
            polls = []  # the send task's looks for the next delta set while it is not ready
            real_send_next = p._send_next

            def send_next(*a):
                sent = real_send_next(*a)
                if p.unready is not None:
                    polls.append(sent)
                return sent
            p._send_next = send_next

            # 1. the ready commit of the cut that ships file a fails
            fault.armed = True
            a = rng.randbytes(300 << 10)
            async with p.cut_lock:
                write_file(core, "a", a)
            await wait_for("the failed ready commit", lambda: fault.failed
                           and svc.supervisor.tasks["cut"].state in ("retrying", "recovering"))
            n, state = fault.failed[0]
            assert state == "cut" and p.unready == n and n == sets.last_cut
            cut_error = take_logged(caplog, "injected")
            assert cut_error, "the cut loop's failure was not logged"
            task = svc.status()["tasks"]["cut"]
            assert "injected" in task["last_error"] and task["errors"] == 1, task
            rec = sets.record(n)
            assert rec["state"] == "cut" and rec["blocks"] >= len(a) // 4096
            # what the sender ships of it, made now (the pin keeps its boundary)
            expect = sum(map(len, await trio.to_thread.run_sync(
                lambda: list(sets.stream(rec).chunks()))))
            sent_before = p.dest(p.dests()[0]["name"]).get("sent_bytes", 0)
            # 2. not sent while it is not ready: the send task looked and found nothing
            await wait_for("two looks of the send task", lambda: len(polls) >= 2)
            assert not any(polls), "a delta set that was not ready was sent"
            assert (await secondary(m2.site))["last_received_delta_set"] < n
            assert p.unready == n and sets.record(n)["state"] == "cut"

            # 3. made ready with nothing written after it (the cut loop, not the next cut),
            # shipped and played; the cut task recovered
            fault.resume.set()
            await wait_for(f"delta set {n} ready", lambda: p.unready is None)
            assert sets.record(n)["state"] == "ready"
            assert sets.last_cut == n, "made ready by a new cut"
            await wait_for(f"delta set {n} shipped", lambda: p.dests()[0]["acked"] >= n)
            await wait_for("the cut task recovering",
                           lambda: svc.supervisor.tasks["cut"].state == "running")
            d = p.dests()[0]
            assert d["acked"] == n and sets.last_cut == n
            assert d["sent_bytes"] - sent_before == expect, "not shipped exactly once"
            assert not core.dev.changed_blocks, "its blocks were marked again"
            with trio.fail_after(30):
                while (await secondary(m2.site))["last_played_delta_set"] < n:
                    await trio.sleep(0.05)
            got = await trio.to_thread.run_sync((m2.path / "a").read_bytes)
            assert got == a

            # 4. the next delta set carries only what changed after it
            b = rng.randbytes(100 << 10)
            async with p.cut_lock:
                write_file(core, "b", b)
            await wait_for(f"delta set {n + 1} shipped", lambda: p.dests()[0]["acked"] > n)
            assert sets.block_list(n + 1).count() < sets.block_list(n).count()
            with trio.fail_after(30):
                while (await secondary(m2.site))["last_played_delta_set"] <= n:
                    await trio.sleep(0.05)
            assert await trio.to_thread.run_sync((m2.path / "b").read_bytes) == b

            # 5. `replicate deltaset` whose ready commit fails says so in one line; the cut
            # loop makes it ready (no automatic cut meanwhile: the policy's timeout is long)
            p.set_policy(timeout=3600.0)
            fault.armed = True
            async with p.cut_lock:
                write_file(core, "v", rng.randbytes(50 << 10))
            with pytest.raises(SnapError, match=f"delta set {n + 2} was cut but could not be "
                                                f"made ready .*injected"):
                await svc.replicate.deltaset()
            assert sets.record(n + 2)["state"] == "cut"
            fault.resume.set()
            await wait_for(f"delta set {n + 2} shipped", lambda: p.dests()[0]["acked"] > n + 1)
            assert sets.last_cut == n + 2 and p.unready is None
            p.set_policy(timeout=0.0)

            # 6. fails again (and at every retry), and the primary stops before it is ready
            fault.fail_all = True
            async with p.cut_lock:
                write_file(core, "c", rng.randbytes(200 << 10))
            await wait_for("the third failure", lambda: len(fault.failed) == 3)
            n2 = fault.failed[2][0]
            assert p.unready == n2
            blocks = np.flatnonzero(sets.block_list(n2).get_range(0, SIZE // 4096))
            nursery.cancel_scope.cancel()
        take_logged(caplog, "injected")
        assert sets.record(n2)["state"] == "cut"
        assert (await secondary(m2.site))["last_received_delta_set"] == n + 2 == n2 - 1
    finally:
        with trio.CancelScope(shield=True):
            core.close()
            core.dev.close()

    # reopened: undone, its blocks back in the change log, the line logged
    core = site.open_fs()
    try:
        assert take_logged(caplog, f"delta set {n2} was cut but its boundary was not durable")
        clog = core.dev
        with clog.env.begin(db=clog.env.open_db(K.CTX)) as txn:
            assert K.from_u64(txn.get(b"last_cut")) == n2 - 1
        marks = clog.new.get_range(0, clog.nblocks)
        assert len(blocks) and marks[blocks].all(), "the undone delta set's blocks unmarked"
    finally:
        core.close()
        core.dev.close()


def crash_between_cut_and_ready(site_path) -> int:
    """A site with one delta set cut whole, then one cut whose syncs all ran (the redo log
    emptied) and whose process was killed (SIGKILL) before "ready"
    (tests/t1_cut_point.py's child). Returns that delta set's number."""
    st = Stack(site_path)
    for _ in range(10):
        st.op()
    st.cut()
    st.close()
    code = CHILD.format(root=str(ROOT_DIR), args={"site": str(site_path), "at": "cleared"})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=ROOT_DIR)
    assert r.returncode == -signal.SIGKILL, f"child exited {r.returncode}: {r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])["n"]


@pytest.mark.parametrize("fsck_first", [False, True], ids=["mount", "fsck-then-mount"])
def test_the_undo_at_open_is_in_the_sites_log(tmp_path, mount_site, fsck_first):
    """The undo of a delta set left "cut" by a kill -9 says so in SITE/repfs.log, once,
    whichever opens the site first: the daemon of a mount, or `repfs fsck` before it (which
    sets up no logging of its own; the mount after it finds nothing left to undo)."""
    site_path = tmp_path / "site"
    n = crash_between_cut_and_ready(site_path)
    log_file = site_path / "repfs.log"
    log_file.unlink(missing_ok=True)  # (only what the opens below write)
    if fsck_first:
        r = run_repfs("fsck", site_path)
        assert not r.stderr, r.stderr
    m = mount_site(name="site")
    assert api(m.site, "GET", "/status")["last_cut_delta_set"] == n - 1
    text = log_file.read_text()
    needle = (f"delta set {n} was cut but its boundary was not durable when the daemon "
              f"stopped: undone")
    assert text.count(needle) == 1, text
