"""Tier 4: kill -9 during replication.

Two mounted sites replicating, a writer process on the primary (every file fsync'd before it
reports it), and SIGKILL of

* the primary's daemon inside a cut (between the pinning snapshot's save volume being made
  and the cut's transaction committing),
* the primary's daemon while a pinned delta set is being sent and the writer (and a ticker
  that makes the primary commit every few milliseconds) overwrite its blocks, so that its
  pinning snapshot copies them,
* the secondary's daemon while it plays a delta set back,

a few times each at random instants. Each loop proves it hit its window at least once, from
what the dead site left on disk (a save volume made for a cut that never committed; a pinned
delta set whose pin holds copied blocks) or what the remounted daemon logs ("finishing the
interrupted playback"); it goes on for a few more rounds until it has. After each kill the
dead mount is lazily unmounted, the site mounted again, a delta set cut and played back: the
secondary must then equal the primary byte for byte, and every file the writer fsync'd must
be on both (invariant 3: crash safety, replication resumes, playback is idempotent). The
fixtures check clean unmounts, clean fsck of both sites and logs without warnings at the end.
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


def _meta(site: Path):
    """The dead site's LMDB environment, read-only (close it before remounting)."""
    import lmdb
    return lmdb.open(str(site / "meta.lmdb"), map_size=1 << 40, max_dbs=32, subdir=True,
                     readonly=True, lock=False)


def _save_ids(site: Path) -> set[int]:
    return {int(p.stem) for p in (site / "save").glob("*.save") if p.stem.isdigit()}


def _uncommitted_save(site: Path) -> set[int]:
    """Save volumes of snapshots made but never recorded: a cut killed between making its
    pinning snapshot's save volume and committing (its id is not below next_id)."""
    from repfs.snap import keys as SK
    env = _meta(site)
    try:
        with env.begin() as txn:
            raw = txn.get(b"next_id", db=env.open_db(SK.STATE, txn=txn, create=False))
    finally:
        env.close()
    next_id = int.from_bytes(raw, "big") if raw else 1
    return {i for i in _save_ids(site) if i >= next_id}


def _pin_copies(site: Path, n: int) -> int:
    """Bytes the pinning snapshot of delta set n holds on the dead site's disk (0: not
    pinned, or nothing of it was overwritten)."""
    from repfs.repl import keys as RK
    from repfs.snap import keys as SK
    env = _meta(site)
    try:
        with env.begin() as txn:
            rec = txn.get(RK.u64(n), db=env.open_db(RK.DELTASETS, txn=txn, create=False))
            key = txn.get(f"repl-ds-{n}".encode(),
                          db=env.open_db(SK.NAMES, txn=txn, create=False))
    finally:
        env.close()
    if rec is None or not json.loads(rec).get("pinned") or key is None:
        return 0
    save = site / "save" / f"{SK.unpack_id(key)}.save"
    return save.stat().st_size if save.exists() else 0


def _wait_released(site: Path) -> None:
    """Every delta set played by the secondary: the pins are released, nothing held."""
    deadline = time.monotonic() + 30
    while True:
        st = api(site, "GET", "/status")
        if st["chunk_area_bytes"] == 0 and not st["outstanding_delta_sets"]:
            return
        assert time.monotonic() < deadline, f"pins never released: {st}"
        time.sleep(0.1)


def test_kill_primary_during_cut(repl_pair):
    """kill -9 inside a cut: the test watches the save area and kills the moment the cut's
    pinning snapshot's save volume appears (sometimes a few ms later), so the kill lands
    between making it and committing the cut, or just after. A kill that landed before the
    commit is proven by what the dead site left: a save volume no snapshot record owns; the
    cut then left no delta set (the mailbox is as before) and the change log still holds its
    blocks, which the next cut ships. The loop goes on (up to 6 rounds) until at least one
    kill provably landed inside a cut."""
    pair = repl_pair
    m1 = pair.m1
    rng = random.Random(41)
    writers = []
    hits = it = 0
    while it < 2 or (hits == 0 and it < 6):
        w = Writer(m1.path / "w", 100 + it, ticker=True)
        writers.append(w)
        w.wait_total(rng.randrange(4, 10) << 20)
        last = api(m1.site, "GET", "/status")["last_cut_delta_set"]
        known = _save_ids(m1.site)
        pid = daemon_pid(m1.site)
        t = post_in_thread(m1.site, "/replicate/deltaset", {"wait": True})
        deadline = time.monotonic() + 30
        while t.is_alive() and not (_save_ids(m1.site) - known):
            assert time.monotonic() < deadline, "the cut neither made its pin nor ended"
        if hits or it == 0:  # (no hit yet after the first round: at once)
            time.sleep(rng.uniform(0.0, 0.003))
        kill9(m1.site, pid)
        t.join(30)
        w.stop()
        left = _uncommitted_save(m1.site)
        remount(m1)
        if left:
            hits += 1
            st = api(m1.site, "GET", "/status")
            assert st["last_cut_delta_set"] == last, st  # no trace of the cut
            assert st["current_delta_set_blocks"] > 0, st  # its blocks still logged
        converge_and_compare(pair, writers)
        _wait_released(m1.site)
        assert not _save_ids(m1.site) - known, "a leftover save volume was not reused"
        it += 1
    assert hits >= 1, "no kill landed inside a cut: test too weak"


def test_kill_primary_while_pinned_delta_sets_are_sent(repl_pair):
    """kill -9 while a big delta set is sent from its pinning snapshot and the writer and the
    ticker overwrite its blocks (copy-on-write into the pin, before-images synced by group
    commits). A kill in that window is proven from the dead site's disk: the delta set is
    still pinned and its pin holds copied blocks. After the remount the pin is used again
    (its delta set arrives as it was at its boundary: the trees compare equal) and then
    released."""
    pair = repl_pair
    m1 = pair.m1
    rng = random.Random(42)
    writers = []
    hits = it = 0
    while it < 2 or (hits == 0 and it < 5):  # until a kill provably lands in the window
        w = Writer(m1.path / "w", 200 + it, ticker=True)
        writers.append(w)
        w.wait_total(rng.randrange(16, 28) << 20)  # a big delta set: sending takes a while
        status, out = post(m1.site, "/replicate/deltaset", {"wait": False})
        assert status == 200, out
        n = out["delta_set"]
        # the writer goes on (fsync: group commits make the pin's copies durable)
        time.sleep(rng.uniform(0.02, 0.12))
        kill9(m1.site)
        w.stop()
        hits += _pin_copies(m1.site, n) > 0
        remount(m1)
        converge_and_compare(pair, writers)
        _wait_released(m1.site)
        it += 1
    assert hits >= 1, "no kill landed while a pinned delta set was overwritten: test too weak"


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
