"""Tier 4: power cuts.

Each site directory lives on powerfs (tests/powerfs.py), which keeps what was not yet made
durable (fsync, fdatasync, O_DSYNC; directory entries only by an fsync of the directory)
apart from what was. A power cut freezes powerfs (every later request fails), keeps none or a
random part of the non-durable state, kills the site's daemon with SIGKILL, and mounts powerfs
again with what survived; `repfs fsck` must then find the site clean, and it is mounted again.
Unlike a `kill -9` alone (tests/t4_crash.py and friends, where the kernel's page cache
survives), this catches a missing or misordered sync.

Cuts land at random moments, or are aimed: powerfs cuts the power right before the N-th
write/fsync of a chosen site file (N random), and the test counts the cuts that landed in each
aimed phase (a snapshot verb in flight, a delta set being cut and pinned — its pinning
snapshot's save volume made and recorded, then copying the blocks overwritten while it is
sent —, received, played back, the initial copy) and requires at least one per phase. After
each cut:

* the file workload: every file whose fsync (file, then directory) returned is byte-exact;
* snapshots: every snapshot reported created reads exactly as the file system did at its
  creation (the core API, which also fscks each snapshot); one whose create or delete was cut
  is either absent or exact; a cut restore leaves the live tree as it was or as the snapshot;
* replication: the secondary shows exactly some delta-set boundary; replication resumes by
  itself and converges to the primary, with every fsync'd file on both.

REPFS_POWER_ROUNDS (default small, for the suite) scales the loops; `tools/soak` runs many.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import fsck_clean, run_repfs
from tests.powerfs import PowerFS, unmount
from tests.t2_repl import NO_AUTO_CUT, Workload, admin, api, log_lines, tree, tree_diff
from tests.t4_crash import WRITER, Record, _fsync, clean_stray, verify
from tests.t4_repl_crash import Writer, check_durable, post
from tests.t4_snap_crash import core_check, hash_tree

# a multiplier of each loop's cuts (the suite: 4 + 6 + 4 cuts in all; tools/soak: hundreds)
ROUNDS = int(os.environ.get("REPFS_POWER_ROUNDS", "1"))
# varies every random choice (tools/soak draws one per run); failures print it
SEED = int(os.environ.get("REPFS_POWER_SEED", "0"))

# what a daemon changes in its site, without its log and pid file ("repfs.*")
SITE_FILES = "site/[!r]*"
MODIFYING = "write|fsync|fsyncdir|create|rename|unlink|truncate|mkdir"


class PowerSite:
    """A repfs site on its own powerfs, and its mount. `.site` and `.path` as conftest's
    Mount, so the replication helpers of t2_repl work on it."""

    def __init__(self, tmp: Path, name: str):
        self.pf = PowerFS(tmp / f"{name}-disk", tmp / f"{name}-pf")
        self.site = self.pf.mnt / "site"
        self.path = tmp / f"{name}-mnt"
        self.path.mkdir()
        self.pid: int | None = None
        self.cuts = 0

    def create(self, size: str, commit_interval: float | None = None) -> None:
        self.pf.start()
        run_repfs("mkfs", self.site, "--size", size)
        if commit_interval is not None:
            cfg = self.site / "site.toml"
            text, k = re.subn(r"commit_interval = [0-9.]+",
                              f"commit_interval = {commit_interval}", cfg.read_text())
            assert k == 1
            tmp = cfg.with_suffix(".tmp")
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, cfg)
            _fsync(self.site)

    def mount(self) -> None:
        run_repfs("mount", self.site, self.path)
        assert os.path.ismount(self.path)
        self.pid = int((self.site / "repfs.pid").read_text().split()[0])

    def power_cut(self, keep: str = "none", seed: int | None = None,
                  kill: tuple = ()) -> dict:
        """Cut the power (unless an armed cut already did), kill the daemon and `kill`
        (processes working on the mount), then bring powerfs back and fsck the site.
        Returns what the cut dropped."""
        if not self.pf.stats()["frozen"]:
            self.pf.freeze(keep, seed)
        out = self.pf.stats()["cut"]
        for p in kill:
            if p.poll() is None:
                p.kill()
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_dead(self.pid)
            self.pid = None
        for p in kill:
            p.wait(60)
        unmount(self.path)
        self.pf.stop()
        self.pf.start()
        self.cuts += 1
        r = run_repfs("fsck", self.site, check=False)
        assert r.returncode == 0, (f"fsck after power cut {self.cuts} ({out}): exit "
                                   f"{r.returncode}\n{r.stdout}{r.stderr}")
        return out

    def dropped(self, out: dict) -> int:
        return out["writes"] - out["writes_kept"] + out["entries"] - out["entries_kept"]

    def finish(self) -> None:
        """A clean end: unmount, fsck, and a log that tells of no crash of its own."""
        run_repfs("umount", self.path)
        _wait_unmounted(self.path)
        fsck_clean(self.site)
        assert not [ln for ln in log_lines(self.site) if "Traceback" in ln]
        self.pf.stop()

    def teardown(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        unmount(self.path)  # alive or dead
        self.pf.kill()


def _wait_dead(pid: int, timeout: float = 30) -> None:
    """Until `pid` has exited (a zombie holds no files or locks any more; this container's
    init may take a second to reap it, which `repfs mount` does not wait for)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        assert time.monotonic() < deadline, f"pid {pid} survived SIGKILL"
        time.sleep(0.005)


def _wait_unmounted(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while os.path.ismount(path):
        assert time.monotonic() < deadline, f"{path} stays mounted"
        time.sleep(0.02)


@pytest.fixture
def power_site(tmp_path):
    made: list[PowerSite] = []

    def make(name: str = "site") -> PowerSite:
        s = PowerSite(tmp_path, name)
        made.append(s)
        return s

    yield make
    for s in made:
        s.teardown()


# ----------------------------------------------------------------------------- file workload


def test_power_cut_after_mkfs_and_during_file_workload(power_site, tmp_path):
    """A site survives a cut right after mkfs; then the kill -9 writer of t4_crash (fsync'd
    files, atomic replaces, renames and deletes made durable by fsync of the directory)
    under random power cuts (nothing or a random part of the unsynced state kept)."""
    rng = random.Random(7001 + SEED)
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    s = power_site()
    s.create("96M", commit_interval=0.2)
    s.power_cut("none")  # mkfs returned: the site must be there
    s.mount()
    writer_py = tmp_path / "writer.py"
    writer_py.write_text(WRITER)
    record_path, phase_path = tmp_path / "record", tmp_path / "phase"
    phases: dict[str, int] = {}
    dropped = promised = 0
    rounds = 4 * ROUNDS
    rnd = 0
    # at least two writer phases must be hit: after the planned rounds, up to eight more cut
    # early (the writer's first phases) until a second phase is hit
    while rnd < rounds or (len(phases) < 2 and rnd < rounds + 8):
        phase_path.write_bytes(b"-")
        with open(tmp_path / "writer.err", "wb") as err:
            writer = subprocess.Popen(
                [sys.executable, writer_py, s.path, record_path, phase_path,
                 str(rng.randrange(1 << 30)), str(rnd)], stderr=err)
            time.sleep(rng.uniform(0.1, 1.2) if rnd < rounds else rng.uniform(0.0, 0.3))
            assert writer.poll() is None, (tmp_path / "writer.err").read_text()
            out = s.power_cut(rng.choice(["none", "random"]), rng.randrange(1 << 30),
                              kill=(writer,))
        ph = phase_path.read_bytes().decode()[:1]
        phases[ph] = phases.get(ph, 0) + 1
        dropped += s.dropped(out) > 0
        s.mount()
        record = Record(record_path)
        present = verify(s.path, record, rnd)
        promised += len(present)
        record.rewrite(present)
        clean_stray(s.path, present)
        rnd += 1
    s.finish()
    print(f"power cuts by writer phase: {phases}; {dropped} of {rnd} dropped unsynced "
          f"state; {promised} promised files checked")
    assert promised > 0 and len(phases) >= 2
    assert dropped >= 1, "no cut found anything unsynced to drop: test too weak"


# ----------------------------------------------------------------------------- snapshots


class Request(threading.Thread):
    """One control-port request; the power goes off under it (or not)."""

    def __init__(self, site: Path, method: str, path: str, body: dict | None = None):
        super().__init__(daemon=True)
        c = json.loads((site / "control.json").read_text())
        self.addr = (c["host"], int(c["port"]))
        self.token = (site / "control.token").read_text().strip()
        self.method, self.path, self.body = method, path, body
        self.status: int | None = None
        self.reply: dict | None = None
        self.start()

    def run(self) -> None:
        import http.client
        conn = http.client.HTTPConnection(*self.addr, timeout=120)
        try:
            conn.request(self.method, "/v1" + self.path,
                         body=json.dumps(self.body or {}).encode(),
                         headers={"Authorization": f"Bearer {self.token}",
                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            self.reply = json.loads(resp.read())
            self.status = resp.status
        except (OSError, http.client.HTTPException, ValueError):
            pass  # the daemon died under the request
        finally:
            conn.close()


def _change_and_sync(root: Path, rng: random.Random, rnd: int) -> None:
    """A few changes, each made durable (file fsync, then its directory)."""
    for _ in range(3):
        p = root / f"f{rng.randrange(8)}"
        with open(p, "ab" if p.exists() else "wb") as f:
            f.write(rng.randbytes(rng.randrange(1, 150_000)))
            f.flush()  # (a small write is buffered by Python until close: after the fsync)
            os.fsync(f.fileno())
    p = root / f"r{rnd}"
    with open(p, "wb") as f:
        f.write(rng.randbytes(rng.randrange(0, 60_000)))
        f.flush()
        os.fsync(f.fileno())
    _fsync(root)


def test_power_cut_during_snapshot_verbs(power_site):
    """Cuts aimed inside snapshot create, delete and restore (a random one of the verb's
    writes and syncs of site files), or just after it returned."""
    rng = random.Random(7002 + SEED)
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    s = power_site()
    s.create("128M", commit_interval=60)  # no background commits: the verbs' I/O only
    s.mount()
    recorded: dict[str, dict] = {}  # name -> tree at its creation
    hits = {"create": 0, "delete": 0, "restore": 0}
    # how many modifying calls each verb makes on the site's files (to aim inside it)
    span = {}
    count = s.pf.add_fault(SITE_FILES, MODIFYING, count=0)
    _change_and_sync(s.path, rng, -1)
    for verb, args in (("create", ("POST", "/snapshots", {"name": "cal"})),
                       ("restore", ("POST", "/snapshots/cal/restore", {})),
                       ("delete", ("DELETE", "/snapshots/cal", None))):
        before = s.pf.stats()["seen"][str(count)]
        r = Request(s.site, *args)
        r.join(120)
        assert r.status == 200, r.reply
        span[verb] = s.pf.stats()["seen"][str(count)] - before
    s.pf.clear_faults()
    rounds = 6 * ROUNDS
    for rnd in range(rounds):
        while len(recorded) < 2:  # snapshots to delete and restore
            _change_and_sync(s.path, rng, rnd)
            base = f"b{rnd}-{len(recorded)}"
            tree_now = hash_tree(s.path)
            r = Request(s.site, "POST", "/snapshots", {"name": base})
            r.join(120)
            assert r.status == 200, r.reply
            recorded[base] = tree_now
        _change_and_sync(s.path, rng, rnd)
        live = hash_tree(s.path)
        verb = ["create", "delete", "restore"][rnd % 3]
        if verb == "create":
            name = f"s{rnd}"
            req = ("POST", "/snapshots", {"name": name})
        else:
            name = rng.choice(sorted(recorded))
            req = (("DELETE", f"/snapshots/{name}", None) if verb == "delete" else
                   ("POST", f"/snapshots/{name}/restore", {}))
        aimed = rng.random() < 0.8 or not hits[verb]
        if aimed:
            s.pf.arm_cut(SITE_FILES, MODIFYING, skip=rng.randrange(max(1, span[verb])),
                         keep=rng.choice(["none", "random"]), seed=rng.randrange(1 << 30))
        r = Request(s.site, *req)
        while r.is_alive() and not s.pf.stats()["frozen"]:
            time.sleep(0.002)
        if not aimed:
            time.sleep(rng.uniform(0, 0.05))
        out = s.power_cut(rng.choice(["none", "random"]), rng.randrange(1 << 30))
        r.join(60)
        done = r.status == 200
        # an armed cut fired while the verb ran (it fails: the power went off under it)
        in_flight = "rule" in out and not done
        assert done or in_flight, (verb, name, r.status, r.reply)
        hits[verb] += in_flight
        # the site as the cut left it: the core API runs recovery and checks the snapshots
        if verb == "create":
            if done:
                recorded[name] = live
            names = core_check(s.site, {**recorded, name: live},
                               allow_gone=None if done else name)
            if name in names:
                recorded[name] = live
        elif verb == "delete":
            names = core_check(s.site, recorded, allow_gone=name)
            if done:
                assert name not in names, f"snapshot {name} was deleted but came back"
            if name not in names:
                del recorded[name]
        else:
            names = core_check(s.site, recorded)
        assert names == list(recorded)
        s.mount()
        now = hash_tree(s.path)
        if verb == "restore":
            want = [recorded[name]] if done else [live, recorded[name]]
            assert now in want, (f"round {rnd}: after a cut restore of {name} the tree is "
                                 f"neither as before nor as the snapshot")
        else:
            assert now == live, f"round {rnd}: fsync'd files changed by a cut during {verb}"
        print(f"round {rnd}: {verb} {name}: {'in flight' if in_flight else 'done'}, "
              f"cut {out}", flush=True)
    s.finish()
    print(f"cuts that landed inside a verb: {hits}")
    assert all(hits.values()), f"a verb was never cut in flight: {hits}"


# ----------------------------------------------------------------------------- replication


def _wait(pred, what: str, timeout: float = 90, sites=()) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {m.site} log:\n" + "\n".join(log_lines(m.site)[-20:])
                            for m in sites)
            raise AssertionError(f"{what} not within {timeout} s{tails}")
        time.sleep(0.1)


def _stable_tree(root: Path) -> dict:
    """The tree of a secondary's mount, read twice alike: a playback that ends while the
    tree is walked would mix two states in one read (the mount shows only boundaries, but a
    walk is not atomic)."""
    def read():
        try:
            return tree(root)
        except FileNotFoundError:  # a playback removed a name the walk had listed
            return None
    t = read()
    for _ in range(50):
        again = read()
        if again == t and t is not None:
            return t
        t = again
    raise AssertionError(f"{root} never held still")


def _dest(m1) -> dict:
    return api(m1.site, "GET", "/status")["destinations"][0]


def _converge(m1, m2, want: dict | None = None) -> int:
    """Cut a delta set and wait until the secondary played it; it must equal the primary
    (and `want`, the primary's tree recorded at the boundary, if given)."""
    status, out = post(m1.site, "/replicate/deltaset", {"wait": True}, timeout=120)
    assert status == 200 and out["state"] == "ready", out
    n = out["delta_set"]

    def played():
        d = _dest(m1)
        return (d["state"] == "replicating" and d["played_delta_set"] >= n
                and api(m2.site, "GET", "/status")["last_played_delta_set"] >= n)
    _wait(played, f"delta set {n} played", sites=(m1, m2))
    t1 = tree(m1.path)
    deadline = time.monotonic() + 2
    while (t2 := tree(m2.path)) != t1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert t2 == t1, "secondary differs from primary: " + "; ".join(tree_diff(t1, t2))
    if want is not None:
        assert t1 == want, "primary changed: " + "; ".join(tree_diff(want, t1))
    return n


def _slowed_cut(m1, m2, active, rng, after=None) -> dict | None:
    """Slow the secondary's disk down (each write to its volume or incoming area returns
    50 ms late), wait until it has written a little, and cut the primary's power while
    `active()` (a transfer in progress) holds. The cut's result; None if the transfer
    ended before the cut (then the primary was not cut), or if `after()` (asked once the
    primary is dead) says it ended before the cut took effect."""
    slow = m2.pf.add_fault("site/volume.img|site/save/incoming/*", "write", count=None,
                           delay=0.05)
    try:
        deadline = time.monotonic() + 60
        while m2.pf.stats()["seen"].get(str(slow), 0) < 2:
            assert time.monotonic() < deadline, "the secondary never received anything"
            time.sleep(0.01)
        if not active():
            return None
        got = m1.power_cut(rng.choice(["none", "random"]), rng.randrange(1 << 30))
        return got if after is None or after() else None
    finally:
        m2.pf.clear_faults()


class Overwriter(threading.Thread):
    """Overwrites a file in place (its first MiB, fsync'd each time) once the primary's next
    pinning snapshot exists (a new save volume in `save`): the file was written in the delta
    set just cut, so each overwrite makes the pin copy the blocks it had not copied yet
    (copy-on-write into its save volume while the delta set is sent). Stops at `stop()` or
    when the mount dies under it. `durable`: the content of the last overwrite whose fsync
    returned; `inflight`: whether an overwrite was under way when it stopped."""

    def __init__(self, path: Path, save: Path, known: set[str], rng: random.Random,
                 durable: bytes):
        super().__init__(daemon=True)
        self.path, self.save, self.known = path, save, known
        self.rng = random.Random(rng.randrange(1 << 30))
        self.durable = durable  # (not read back: the power may be off already)
        self.inflight = False
        self.writes = 0
        self.halt = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            while not self.halt.is_set() and not (
                    {p.name for p in self.save.glob("*.save")} - self.known):
                time.sleep(0.002)
            fd = os.open(self.path, os.O_WRONLY)
            try:
                while not self.halt.is_set():
                    data = self.rng.randbytes(len(self.durable))
                    self.inflight = True
                    os.pwrite(fd, data, 0)
                    os.fsync(fd)
                    self.durable, self.inflight = data, False
                    self.writes += 1
            finally:
                os.close(fd)
        except OSError:
            pass  # the power went off under it

    def stop(self) -> None:
        self.halt.set()
        self.join(60)


def power_pair(power_site, workload: str, seconds: float):
    """Two 128M sites on powerfs, mounted; the first without automatic cuts and a file
    workload of `seconds` in it (named `workload`); not yet replicating."""
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    m1, m2 = power_site("s1"), power_site("s2")
    for m in (m1, m2):
        m.create("128M")
        m.mount()
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    Workload(m1.path, workload).run(seconds)
    return m1, m2


def test_power_cut_during_replication(power_site):
    """Cuts on the secondary and on the primary during the initial copy, on the primary while
    a delta set is cut and pinned (its pinning snapshot's save volume made, the cut recorded
    in meta.lmdb, then the pin copying blocks overwritten while the delta set is sent, and
    released once played) and while it is sent, on the secondary while it receives one and
    while it plays one back."""
    rng = random.Random(7003 + SEED)
    m1, m2 = power_pair(power_site, "power-base", 15)
    with open(m1.path / "big", "wb") as f:
        for _ in range(12):
            f.write(rng.randbytes(1 << 20))
    hits: dict[str, int] = {}

    # the initial copy, with the power cut on the secondary while it copies
    m2.pf.arm_cut("site/volume.img|site/save/incoming/*", "write", skip=rng.randrange(4),
                  keep="random",
                  seed=rng.randrange(1 << 30))
    start = Request(m1.site, "POST", "/replicate/start", {"to": str(m2.site)})
    got = m2.pf.wait_frozen(60)
    start.join(5)
    if got is not None:
        hits["initial copy (secondary)"] = 1
        m2.power_cut()
        m2.mount()
    else:
        m2.pf.clear_faults()
    # the copy resumes; the secondary's disk slowed down, the primary loses power during it
    if _slowed_cut(m1, m2, lambda: _dest(m1)["state"] == "initial-copy", rng):
        hits["initial copy (primary)"] = 1
        m1.mount()
    _wait(lambda: _dest(m1)["state"] == "replicating", "the initial copy", sites=(m1, m2))
    writers: list[Writer] = []
    boundary = _converge(m1, m2)
    want = tree(m1.path)

    # the primary's cut (its pin's save volume made, its directory synced, the cut's LMDB
    # commit), and the pin copying the blocks a writer overwrites while the delta set is sent
    pinned = ("cut and pin (primary)", "pin copies (primary)")
    phases = [(pinned[0], m1, "site/save|site/save/*.save|site/meta.lmdb/*",
               "create|write|fsync|fsyncdir"),
              (pinned[1], m1, "site/save/*.save", "write|fsync"),
              # (blocks free at the last boundary go straight into the volume as they
              # arrive: the cut may take them, unsynced, before the delta set is whole)
              ("receive (secondary)", m2, "site/save/incoming/*|site/volume.img",
               "write|fsync"),
              ("playback (secondary)", m2, "site/volume.img", "write|fsync"),
              ("send (primary)", m1, None, None)]
    seeds = iter(range(1 << 30))
    for rnd in range(ROUNDS):
        for phase, victim, path, ops in phases:
            while len(writers) >= 4:  # room on the 128M volume: the oldest files go
                for name in writers.pop(0).durable:  # (a full one makes writes short)
                    (m1.path / "w" / name).unlink(missing_ok=True)
            w = Writer(m1.path / "w", 1000 * next(seeds) + SEED % 1000,
                       limit=rng.randrange(2, 6) << 20)
            writers.append(w)
            w.proc.wait(120)
            w.stop()
            before = want
            want = tree(m1.path)  # the primary at the next boundary
            ow = None
            if path is None:  # sending: the secondary's disk is slow, the primary dies
                status, out = post(m1.site, "/replicate/deltaset", {"wait": True}, timeout=120)
                assert status == 200, out
                n = out["delta_set"]
                def receiving():
                    return api(m2.site, "GET", "/status")["last_received_delta_set"] < n
                got = _slowed_cut(m1, m2, receiving, rng, after=receiving)
                if got:
                    hits[phase] = hits.get(phase, 0) + 1
                elif m1.pid is not None:  # (sent already: cut it now)
                    m1.power_cut()
            else:
                if phase in pinned:
                    # a file of this delta set, overwritten while it is sent (the secondary's
                    # disk slowed down: the pin lives a while)
                    first = rng.randbytes(1 << 20)
                    (m1.path / "w" / "ow").write_bytes(first)
                    _fsync(m1.path / "w" / "ow")
                    known = {p.name for p in (m1.site / "save").glob("*.save")}
                    m2.pf.add_fault("site/volume.img|site/save/incoming/*", "write",
                                    count=None, delay=0.02)
                victim.pf.arm_cut(path, ops,
                                  skip=rng.randrange(8 if phase == pinned[0] else 3),
                                  keep=rng.choice(["none", "random"]),
                                  seed=rng.randrange(1 << 30))
                req = Request(m1.site, "POST", "/replicate/deltaset", {"wait": True})
                if phase in pinned:
                    ow = Overwriter(m1.path / "w" / "ow", m1.site / "save", known, rng, first)
                got = victim.pf.wait_frozen(30)
                req.join(60 if got is None else 1)
                if ow is not None:
                    ow.stop()
                    m2.pf.clear_faults()
                if got is None:  # the phase did not touch the file often enough: cut now
                    victim.pf.freeze(rng.choice(["none", "random"]), rng.randrange(1 << 30))
                else:
                    hits[phase] = hits.get(phase, 0) + 1
                victim.power_cut()
                if ow is not None:
                    print(f"{phase}: {ow.writes} overwrites, cut at {got}", flush=True)
            if victim is m2:
                # before it plays anything: exactly a delta-set boundary
                victim.mount()
                t2 = _stable_tree(m2.path)
                assert t2 in (before, want), (
                    f"{phase}: after the cut the secondary is at no delta-set boundary "
                    f"({api(m2.site, 'GET', '/status')}): from the earlier boundary "
                    + "; ".join(tree_diff(before, t2)) + "; from the new one: "
                    + "; ".join(tree_diff(want, t2)))
            else:
                victim.mount()
                if ow is not None and not ow.inflight:  # fsync'd while pinned: kept
                    assert (m1.path / "w" / "ow").read_bytes() == ow.durable, phase
            # resumes by itself: nothing lost, nothing applied twice
            boundary = _converge(m1, m2, want if victim is m2 else None)
            if victim is m1:
                want = tree(m1.path)
            check_durable(m1.path / "w", writers)
            check_durable(m2.path / "w", writers)
            assert api(m2.site, "GET", "/status")["role"] == "secondary"
            if ow is not None:
                (m1.path / "w" / "ow").unlink()  # (room on the volume)
            print(f"round {rnd}: {phase}: {'aimed' if got else 'timed'} cut {got}; "
                  f"converged at delta set {boundary}", flush=True)
    for m in (m1, m2):
        m.finish()
    print(f"cuts that landed in their phase: {hits}")
    missing = [p for p in [p for p, *_ in phases] + ["initial copy (secondary)",
                                                     "initial copy (primary)"]
               if not hits.get(p)]
    assert not missing, f"no cut landed during: {missing}"
