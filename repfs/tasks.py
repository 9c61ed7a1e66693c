"""Supervised background tasks: a failure is contained, logged once, shown and retried.

Every background task of a site (the commit loop, the cut, background-copy and send tasks of
a primary, the playback task of a secondary) runs under `Supervisor.run`. An exception that
escapes the task (anything but cancellation) never reaches the daemon's nursery, so it never
unmounts the file system: it is logged once per distinct error, recorded for `status`
(state, last error and when) and the task is started again after a back-off that doubles up
to a cap. Errors that can be transient (EIO, ENOSPC, a refused or reset connection, a
timeout, or a type the caller names) are retried quickly; the others (a bug, a corrupt
record) are retried too, more slowly, in case what caused them is repaired meanwhile.

A restarted task is "recovering" until it reports progress with `Supervisor.ok(name)`; the
state is then "running" again, the recovery is logged and the back-off starts over. The status report is a plain
dict of strings and numbers (zrepl's habit: states are strings, the CLI renders them).
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR, errno.ENOMEM,
    errno.EBUSY, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
    errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
})


def is_transient(exc: BaseException, extra: tuple[type, ...] = ()) -> bool:
    if extra and isinstance(exc, extra):
        return True
    if isinstance(exc, (TimeoutError, trio.TooSlowError, ConnectionError)):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def describe(exc: BaseException) -> str:
    """One line naming the error: the errno's name for OS errors, the type for the errors
    whose message alone says little (a KeyError's message is just the key)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        text = f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}"
        return text + (f": {exc.filename}" if exc.filename else "")
    msg = str(exc)
    if not msg or isinstance(exc, (LookupError, AttributeError, TypeError, AssertionError)):
        return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg


@dataclass
class TaskState:
    name: str
    state: str = "starting"  # running | retrying | recovering | stopped | done
    transient: bool | None = None
    last_error: str | None = None
    last_error_ns: int = 0
    errors: int = 0
    restarts: int = 0
    retry_at_ns: int = 0
    backoff: float = 0.0
    _logged: str | None = field(default=None, repr=False)
    _quiet: bool = field(default=False, repr=False)

    def report(self) -> dict:
        return {
            "state": self.state,
            "last_error": self.last_error,
            "last_error_at": iso(self.last_error_ns),
            "error_kind": (None if self.transient is None
                           else "transient" if self.transient else "permanent"),
            "errors": self.errors,
            "restarts": self.restarts,
            "next_retry_at": iso(self.retry_at_ns) if self.state == "retrying" else None,
        }


class Supervisor:
    """The background tasks of one daemon and their health."""

    def __init__(self, *, first_backoff: float = 0.2, transient_cap: float = 5.0,
                 permanent_first: float = 1.0, permanent_cap: float = 30.0):
        self.tasks: dict[str, TaskState] = {}
        self.first_backoff = first_backoff
        self.transient_cap = transient_cap
        self.permanent_first = permanent_first
        self.permanent_cap = permanent_cap

    def state(self, name: str) -> TaskState:
        st = self.tasks.get(name)
        if st is None:
            st = self.tasks[name] = TaskState(name)
        return st

    def ok(self, name: str) -> None:
        """Task `name` made progress: it has recovered from its last error, if any."""
        st = self.tasks.get(name)
        if st is not None and st.state in ("recovering", "retrying"):
            if st._logged is not None and not st._quiet:
                log.info("%s: recovered (last error: %s)", name, st.last_error)
            st.state = "running"
            st.backoff = 0.0
            st._logged = None

    def error(self, name: str, exc: BaseException, *, transient: bool,
              context: str | None = None, quiet: bool = False) -> TaskState:
        """Record (and log once per distinct error, unless the caller logs it: `quiet`) a
        failure of task `name`."""
        st = self.state(name)
        text = describe(exc)
        st.errors += 1
        st.last_error = text if context is None else f"{context}: {text}"
        st.last_error_ns = time.time_ns()
        st.transient = transient
        st.state = "retrying"
        st._quiet = quiet
        if st.last_error != st._logged:
            st._logged = st.last_error
            if quiet:
                return st
            if transient:
                log.warning("%s: %s (transient; retrying with back-off)", name, st.last_error)
            else:
                log.error("%s failed: %s (retrying with back-off)", name, st.last_error,
                          exc_info=exc)
        return st

    async def run(self, name: str, fn, *args, transient: tuple[type, ...] = ()) -> None:
        """Run `await fn(*args)` until it returns, restarting it after any Exception.
        Cancellation (and any other BaseException) passes through untouched."""
        st = self.state(name)
        st.state = "running"
        while True:
            started = time.monotonic()
            try:
                await fn(*args)
            except Exception as exc:  # noqa: BLE001 - contained: this is the point
                was_transient = is_transient(exc, transient)
                self.error(name, exc, transient=was_transient)
                delay = self._next_backoff(st, was_transient, time.monotonic() - started)
                st.state = "retrying"
                st.retry_at_ns = time.time_ns() + int(delay * 1e9)
                await trio.sleep(delay)
                st.restarts += 1
                st.state = "recovering"  # until the task reports progress (ok)
                continue
            st.state = "done"
            return

    def _next_backoff(self, st: TaskState, transient: bool, ran: float) -> float:
        first = self.first_backoff if transient else self.permanent_first
        cap = self.transient_cap if transient else self.permanent_cap
        if st.backoff == 0.0 or ran > 4 * max(st.backoff, cap):
            st.backoff = first  # it ran well for a long while before this failure
        else:
            st.backoff = min(cap, max(first, st.backoff * 2))
        return st.backoff

    def stopped(self, name: str) -> None:
        st = self.tasks.get(name)
        if st is not None:
            st.state = "stopped"

    def forget(self, name: str) -> None:
        self.tasks.pop(name, None)

    def report(self) -> dict:
        return {name: st.report() for name, st in sorted(self.tasks.items())}


def iso(ns: int) -> str | None:
    """A time in nanoseconds since the epoch as ISO 8601 UTC with milliseconds (None for 0),
    as every status report shows times."""
    if not ns:
        return None
    secs, ms = divmod(ns // 1_000_000, 1000)  # in integers: a float rounds up .9999999
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"
