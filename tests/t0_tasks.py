"""t0: the background-task supervisor (repfs/tasks.py) alone, on trio's autojump clock."""

from __future__ import annotations

import errno
import logging

import pytest
import trio

from repfs.tasks import Supervisor, describe, is_transient


def _take(caplog, needle: str) -> list[logging.LogRecord]:
    """The records naming `needle` (removed: the suite fails on unexpected warnings)."""
    hits = [r for r in caplog.records if needle in r.getMessage()]
    for r in hits:
        caplog.records.remove(r)
    return hits


async def test_failure_is_contained_logged_once_and_retried_with_backoff(autojump_clock, caplog):
    caplog.set_level(logging.INFO, "repfs.tasks")
    sup = Supervisor(first_backoff=0.2, transient_cap=1.0)
    calls = []

    async def task():
        calls.append(trio.current_time())
        if len(calls) <= 5:
            raise OSError(errno.EIO, "disk says no")
        sup.ok("t")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run, "t", task)
        await trio.sleep(0.1)
        st = sup.report()["t"]
        assert st["state"] == "retrying" and st["error_kind"] == "transient"
        assert st["last_error"] == "EIO: disk says no" and st["last_error_at"]
        await trio.sleep(20)
        st = sup.report()["t"]
        assert st["state"] == "running", st  # recovered by itself
        assert st["errors"] == 5 and st["restarts"] == 5
        assert st["last_error"] == "EIO: disk says no"  # kept, with its time
        nursery.cancel_scope.cancel()
    gaps = [round(b - a, 3) for a, b in zip(calls, calls[1:])]
    assert gaps == [0.2, 0.4, 0.8, 1.0, 1.0]  # doubling up to the cap
    assert len(_take(caplog, "disk says no")) == 2  # once when it failed, once recovered


async def test_permanent_errors_are_retried_more_slowly_and_logged_with_traceback(
        autojump_clock, caplog):
    sup = Supervisor(permanent_first=1.0, permanent_cap=4.0)
    calls = []

    async def task():
        calls.append(trio.current_time())
        raise KeyError("snapshot-7")

    with trio.move_on_after(12):
        await sup.run("cut", task)
    gaps = [round(b - a, 3) for a, b in zip(calls, calls[1:])]
    assert gaps[:4] == [1.0, 2.0, 4.0, 4.0]
    st = sup.report()["cut"]
    assert st["error_kind"] == "permanent" and st["last_error"] == "KeyError: 'snapshot-7'"
    hits = _take(caplog, "snapshot-7")
    assert len(hits) == 1 and hits[0].levelno == logging.ERROR and hits[0].exc_info


async def test_cancellation_is_never_swallowed(autojump_clock):
    sup = Supervisor()
    done = []

    async def task():
        try:
            await trio.sleep_forever()
        finally:
            done.append(True)

    with trio.move_on_after(1) as scope:
        await sup.run("x", task)
    assert scope.cancelled_caught and done == [True]
    assert sup.report()["x"]["errors"] == 0


async def test_a_task_that_returns_is_done(autojump_clock):
    sup = Supervisor()

    async def task():
        await trio.sleep(1)

    await sup.run("once", task)
    assert sup.report()["once"]["state"] == "done"


@pytest.mark.parametrize("exc,transient", [
    (OSError(errno.EIO, "x"), True),
    (OSError(errno.ENOSPC, "x"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "x"), True),
    (trio.TooSlowError(), True),
    (OSError(errno.ENOENT, "x"), False),
    (KeyError("k"), False),
    (ValueError("corrupt"), False),
])
def test_transient_or_not(exc, transient):
    assert is_transient(exc) is transient


def test_caller_named_transient_types():
    class Busy(Exception):
        pass
    assert is_transient(Busy(), (Busy,)) and not is_transient(Busy())


def test_describe():
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/site/save/1.ds")) == \
        "ENOSPC: No space left on device: /site/save/1.ds"
    assert describe(KeyError("a")) == "KeyError: 'a'"
    assert describe(RuntimeError("boom")) == "boom"
