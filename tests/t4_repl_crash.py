"""Tier 4: kill -9 during replication.

Two mounted sites replicating, a writer process on the primary (every file fsync'd before it
reports it), and SIGKILL of

* the primary's daemon while a delta set is being cut,
* the primary's daemon while the cut delta set's chunks are being copied (a writer running,
  so the change log is persisted by group commits meanwhile),
* the secondary's daemon while it plays a delta set back,

a few times each at random instants. Each loop proves it hit its window at least once, from
what the remounted daemon logs anyway: "cut when the daemon stopped" (a delta set was still
being cut or copied) or "finishing the interrupted playback"; it goes on for a few more rounds
until it has. After each kill the dead mount is lazily unmounted, the
site mounted again, a delta set cut and played back: the secondary must then equal the primary
byte for byte, and every file the writer fsync'd must be on both (invariant 3: crash safety,
replication resumes, playback is idempotent). The fixtures check clean unmounts, clean fsck of
both sites and logs without warnings at the end.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_repfs
from tests.t2_repl import (
    NO_AUTO_CUT, Workload, admin, api, assert_same_tree, cut, log_lines,
    make_pair, wait_converged,
)

WRITER = r"""
import hashlib, os, random, sys
root, seed, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
os.makedirs(root, exist_ok=True)
contents = {}
total = 0
i = 0
try:
    while total < limit:
        if contents and rng.random() < 0.3:  # overwrite part of an earlier file
            name = rng.choice(sorted(contents))
            buf = bytearray(contents[name])
            off = rng.randrange(0, len(buf) + 1)
            data = rng.randbytes(rng.choice([4096, 65536, 300000]))
            print("begin", name, flush=True)
            fd = os.open(os.path.join(root, name), os.O_WRONLY)
            os.pwrite(fd, data, off)
            end = off + len(data)
            if len(buf) < end:
                buf.extend(bytes(end - len(buf)))
            buf[off:end] = data
        else:
            name = "f%d-%d" % (seed, i)
            i += 1
            data = rng.randbytes(rng.choice([4096, 65536, 262144, 1 << 20]))
            buf = bytearray(data)
            print("begin", name, flush=True)
            fd = os.open(os.path.join(root, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        contents[name] = bytes(buf)
        total += len(data)
        print("done", name, hashlib.sha256(buf).hexdigest(), total, flush=True)
except OSError:
    pass  # the mount died under us
"""


TICKER = r"""
import os, sys
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
i = 0
try:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    while True:  # a small fsync'd write, as fast as it goes: group commits all the time
        i += 1
        os.pwrite(fd, b"%012d" % i, (i % 64) * 4096)
        os.fsync(fd)
except OSError:
    pass
"""


class Writer:
    """The writer process and what it reported as durable; optionally a ticker process that
    makes the primary commit (and so persist its change log) every few milliseconds."""

    def __init__(self, root: Path, seed: int, limit: int = 1 << 40, ticker: bool = False):
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(seed),
                                      str(limit)], stdout=subprocess.PIPE, text=True)
        self.ticker = subprocess.Popen([sys.executable, "-c", TICKER,
                                        str(Path(root).parent / "tick")]) if ticker else None
        self.durable: dict[str, str] = {}
        self.open: set[str] = set()
        self.total = 0
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.split()
            with self.lock:
                if parts[0] == "begin":
                    self.open.add(parts[1])
                elif parts[0] == "done":
                    self.open.discard(parts[1])
                    self.durable[parts[1]] = parts[2]
                    self.total = int(parts[3])

    def wait_total(self, nbytes: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.total < nbytes:
            assert self.proc.poll() is None or self.total >= nbytes, "the writer died"
            assert time.monotonic() < deadline, f"the writer wrote only {self.total} bytes"
            time.sleep(0.02)

    def stop(self) -> None:
        for p in (self.proc, self.ticker):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait(30)
        self.reader.join(30)
        self.proc.stdout.close()


def check_durable(root: Path, writers: list[Writer]) -> int:
    """Every file a writer fsync'd (and did not start changing again) has its content."""
    n = 0
    for w in writers:
        with w.lock:
            items = [(k, v) for k, v in w.durable.items() if k not in w.open]
        for name, sha in items:
            data = (root / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha, f"fsync'd file {name} lost its data"
            n += 1
    return n


def daemon_pid(site: Path) -> int:
    from repfs.site import Site
    owner = Site(site).owner()
    assert owner is not None, f"no daemon for {site}"
    return owner[0]


def kill9(site: Path, pid: int | None = None) -> int:
    """SIGKILL the site's daemon (or `pid`, its pid looked up earlier) and wait until it is
    gone."""
    pid = pid or daemon_pid(site)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        assert time.monotonic() < deadline, f"pid {pid} survived SIGKILL"
        time.sleep(0.01)


def remount(m) -> None:
    """Lazily unmount the dead mount and mount the site again."""
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False, capture_output=True)
    deadline = time.monotonic() + 30
    while os.path.ismount(m.path):
        assert time.monotonic() < deadline, f"{m.path} stays mounted"
        time.sleep(0.05)
    run_repfs("mount", m.site, m.path)
    assert os.path.ismount(m.path)


def post(site: Path, path: str, body: dict, timeout: float = 60.0):
    """A control-port POST from the test process (precise timing, unlike the CLI)."""
    c = json.loads((Path(site) / "control.json").read_text())
    token = (Path(site) / "control.token").read_text().strip()
    conn = http.client.HTTPConnection(c["host"], c["port"], timeout=timeout)
    try:
        conn.request("POST", "/v1" + path, body=json.dumps(body).encode(), headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def post_in_thread(site: Path, path: str, body: dict) -> threading.Thread:
    def run():
        try:
            post(site, path, body)
        except (OSError, http.client.HTTPException, ValueError):
            pass  # the daemon was killed under the request
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def converge_and_compare(pair, writers: list[Writer]) -> None:
    m1, m2 = pair.m1, pair.m2
    for w in writers:
        w.stop()
    n = cut(m1)
    wait_converged(m1, m2, n, timeout=90)
    checked = check_durable(m1.path / "w", writers)
    assert checked or not any(w.durable for w in writers)
    assert_same_tree(m1.path, m2.path)
    check_durable(m2.path / "w", writers)


@pytest.fixture
def repl_pair(mount_site):
    pair = make_pair(mount_site)
    Workload(pair.m1.path, "crash-base").run(25)
    wait_converged(pair.m1, pair.m2, cut(pair.m1))
    return pair


def _dropped(site: Path) -> int:
    return sum("cut when the daemon stopped" in ln for ln in log_lines(site))


def _wait_cutting(site: Path, request: threading.Thread) -> bool:
    """Poll the primary's status until a delta set shows in state "cutting" (True) or the
    cut request has ended first (False)."""
    deadline = time.monotonic() + 30
    while request.is_alive():
        st = api(site, "GET", "/status")
        if any(r["state"] == "cutting" for r in st["outstanding_delta_sets"]):
            return True
        assert time.monotonic() < deadline, "the cut neither started nor ended in 30 s"
    return False


def test_kill_primary_during_cut(repl_pair):
    """kill -9 while a cut delta set is not yet complete: the test waits until the status
    shows the delta set "cutting", then kills at a random instant a few ms later. A kill that
    landed inside the cut is proven by the remounted daemon, which drops the incomplete delta
    set and logs it ("cut when the daemon stopped"; the record is "cutting" from the cut's
    commit until the set is ready, and there is no other cut: automatic cuts are off). The
    loop goes on (up to 6 rounds) until at least one kill provably landed inside a cut."""
    pair = repl_pair
    rng = random.Random(41)
    writers = []
    hits = it = 0
    dropped = _dropped(pair.m1.site)
    while it < 2 or (hits == 0 and it < 6):
        w = Writer(pair.m1.path / "w", 100 + it, ticker=True)
        writers.append(w)
        w.wait_total(rng.randrange(4, 10) << 20)
        t = post_in_thread(pair.m1.site, "/replicate/deltaset", {"wait": True})
        if _wait_cutting(pair.m1.site, t):
            time.sleep(rng.uniform(0.0, 0.01))
        kill9(pair.m1.site)
        t.join(30)
        w.stop()
        remount(pair.m1)
        hits, dropped = hits + (_dropped(pair.m1.site) > dropped), _dropped(pair.m1.site)
        converge_and_compare(pair, writers)
        it += 1
    assert hits >= 1, "no kill landed inside a cut: test too weak"


def test_kill_primary_during_chunk_copying(repl_pair):
    pair = repl_pair
    rng = random.Random(42)
    writers = []
    dropped_before = _dropped(pair.m1.site)
    hits = it = 0
    while it < 2 or (hits == 0 and it < 5):  # until a kill provably lands inside a copy
        w = Writer(pair.m1.path / "w", 200 + it, ticker=True)
        writers.append(w)
        w.wait_total(rng.randrange(16, 28) << 20)  # a big delta set: copying takes a while
        status, out = post(pair.m1.site, "/replicate/deltaset", {"wait": False})
        assert status == 200, out
        # the writer goes on (fsync: group commits persist the change log during the copy)
        time.sleep(rng.uniform(0.02, 0.12))
        kill9(pair.m1.site)
        w.stop()
        remount(pair.m1)
        hits = _dropped(pair.m1.site) - dropped_before  # the set was still "cutting"
        converge_and_compare(pair, writers)
        it += 1
    assert hits >= 1, "no kill landed while a delta set was being copied: test too weak"


def _interrupted(site: Path) -> int:
    return sum("finishing the interrupted playback" in ln for ln in log_lines(site))


def test_kill_secondary_during_playback(repl_pair):
    """kill -9 of the secondary while it may be playing a delta set back. A kill inside a
    playback is proven by the remounted daemon, which finds the playback marked as running
    (it is marked before the first block is written and cleared with the record that it was
    played) and logs that it finishes it. After a first round at a random instant, rounds
    without a hit yet aim: they kill as soon as the status shows the delta set playing. The
    loop goes on until one kill did."""
    pair = repl_pair
    m1, m2 = pair.m1, pair.m2
    rng = random.Random(43)
    writers = []
    during = 0
    before = _interrupted(m2.site)
    it = 0
    while it < 2 or (during == 0 and it < 6):  # until a kill lands inside a playback
        w = Writer(m1.path / "w", 300 + it, limit=rng.randrange(12, 24) << 20)
        writers.append(w)
        w.proc.wait(120)
        w.stop()
        deadline = time.monotonic() + 60
        if during == 0 and it >= 1:  # no hit yet: aim at the playback the status shows
            n = api(m1.site, "GET", "/status")["current_delta_set"]  # (no automatic cuts)
            pid = daemon_pid(m2.site)
            t = post_in_thread(m1.site, "/replicate/deltaset", {"wait": True})
            s = api(m2.site, "GET", "/status")
            while s["playing_delta_set"] != n and s["last_played_delta_set"] < n:
                assert time.monotonic() < deadline, f"delta set {n} never played: {s}"
                s = api(m2.site, "GET", "/status")
            kill9(m2.site, pid)  # at once
            t.join(60)
        else:
            n = cut(m1)
            while True:  # the delta set has arrived; playback starts at once
                s = api(m2.site, "GET", "/status")
                if s["last_received_delta_set"] >= n:
                    break
                assert time.monotonic() < deadline, f"delta set {n} never arrived: {s}"
            time.sleep(rng.uniform(0.0, 0.1))
            kill9(m2.site)
        remount(m2)
        during = _interrupted(m2.site) - before
        converge_and_compare(pair, writers)
        assert api(m2.site, "GET", "/status")["role"] == "secondary"
        it += 1
    assert during >= 1, "no kill landed inside a playback: test too weak"


def test_interrupted_initial_copy_resumes(mount_site):
    """kill -9 of the secondary, then of the primary, during the initial copy (FIG. 11):
    after remounting, the copy resumes and the secondary converges."""
    m1 = mount_site("1G", name="s1")
    m2 = mount_site("1G", name="s2")
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    rng = random.Random(44)
    (m1.path / "w").mkdir()
    pieces = [rng.randbytes(1 << 20) for _ in range(4)]
    for i in range(40):  # 160 MiB of valid data: the copy takes a moment
        with open(m1.path / "w" / f"big{i}", "wb") as f:
            for j in range(4):
                f.write(pieces[(i + j) % 4])
    status_code, out = post(m1.site, "/replicate/start", {"to": str(m2.site)})
    assert status_code == 200 and out["state"] == "initial-copy", out

    def copying() -> dict | None:
        d = api(m1.site, "GET", "/status")["destinations"][0]
        return d if d["state"] == "initial-copy" else None

    killed = []
    time.sleep(rng.uniform(0.05, 0.15))
    if copying():
        kill9(m2.site)
        killed.append("secondary")
        time.sleep(0.5)  # the sender retries meanwhile
        remount(m2)
        deadline = time.monotonic() + 60
        start = (copying() or {}).get("copy_progress", {}).get("copied_blocks", 0)
        while True:  # the copy goes on, then the primary dies
            d = copying()
            if d is None or d.get("copy_progress", {}).get("copied_blocks", 0) > start:
                break
            assert time.monotonic() < deadline, "the initial copy does not resume"
            time.sleep(0.01)
        if d is not None:
            kill9(m1.site)
            killed.append("primary")
            remount(m1)
    assert killed, "the initial copy ended before any kill: test too weak"
    deadline = time.monotonic() + 120
    while copying() is not None:
        assert time.monotonic() < deadline, "the initial copy never finished"
        time.sleep(0.2)
    d = api(m1.site, "GET", "/status")["destinations"][0]
    assert d["state"] == "replicating", d
    (m1.path / "after").write_bytes(b"after the copy")
    wait_converged(m1, m2, cut(m1), timeout=90)
    assert_same_tree(m1.path, m2.path)
    for i in range(40):
        assert (m2.path / "w" / f"big{i}").read_bytes() == b"".join(
            pieces[(i + j) % 4] for j in range(4))
    assert api(m2.site, "GET", "/status")["role"] == "secondary"
