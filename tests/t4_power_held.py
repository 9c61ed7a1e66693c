"""Tier 4: power cuts while held writes are released behind the writer (issue 8, d4731f2).

A write that overwrites a block a snapshot still needs is *held* in memory until the
before-image it displaces is durable (repfs/snap/layer.py). Past `[memory] held_limit` the
FUSE adapter releases the held writes behind the writer: a supervised task ("release-held")
syncs the save volumes, then writes the held data to the volume, while the writer goes on;
past twice the limit the writer waits for a release itself (Operations._maybe_flush_held).
With the default 64 MiB no other test gets there; here the site's held_limit is the lowest
the setting allows (1M) and each round overwrites 6 MiB under a new snapshot, fsyncing
what it wrote every 1.5-3 MiB in a second thread while it goes on writing. The volume
image's first sync in a sweep is slowed down (powerfs), so while that commit holds the
commit lock the writer passes twice the limit and waits. Sweeps without a cut run first
until status's "held_releases" counters (behind, waited) show that both paths ran.

Cuts (powerfs, tests/t4_power.py) are aimed at a random fsync of a save volume, a random
write of the volume image, or a random moment. The commit loop is off (commit_interval 60),
so a save-volume sync or a volume write while the writer is inside a write() and no fsync
is under way belongs to a release past the limit: such a cut is counted as "in a release",
and at least one is required (up to four extra rounds aimed early in a sweep get one).
After each cut: `repfs fsck` clean, every snapshot byte-exact with the tree at its creation
(the core API, which fscks each), every fsync'd file byte-exact.

A second test injects EIO into the save volumes' syncs (a powerfs fault, below the daemon):
the release behind fails, is shown in status as the "release-held" task with its error, and is
logged once however many writes wake it again; the next commit turns the file system
read-only, the held writes never reach the volume, and the snapshot stays exact.

REPFS_POWER_ROUNDS scales the cuts (the suite: 4 to 8); REPFS_POWER_SEED varies every choice.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from tests.t2_repl import api, log_lines
from tests.t2_settings import set_setting
from tests.t4_crash import _fsync
from tests.t4_power import ROUNDS, SEED, Request, power_site  # noqa: F401
from tests.t4_power_cow import fill
from tests.t4_snap_crash import core_check, hash_tree

FILES = 4
FILE_SIZE = 3 << 19  # 6 MiB in all: a new snapshot makes each block's next overwrite held
SAVES = "site/save/*.save"
AIMS = ["save volume fsync", "volume write", "random moment"]


def _make_site(power_site):
    """A 128M site on powerfs with held_limit 1M and no background commits, mounted."""
    s = power_site()
    s.create("128M", commit_interval=60)
    set_setting(s.site, "memory", "held_limit", '"1M"')  # the setting's minimum
    _fsync(s.site / "site.toml")
    s.mount()
    return s


def _slow_volume(s, delay: float) -> None:
    """A slow disk under the volume image: its next sync returns `delay` s late (powerfs).
    That is the first commit's of a sweep (a release does not sync the volume), which
    syncs it holding the commit lock, while the writer has 4.5 MiB left to write: it
    passes twice held_limit meanwhile and waits. (A slow sync of a save volume would not
    do: the kernel holds the file's inode lock through a FUSE fsync, so the daemon's
    appends of before-images, and with them the writer, wait for it too.)"""
    s.pf.add_fault("site/volume.img", "fsync", count=1, delay=delay)


def _snapshot(s, name: str) -> dict:
    tree_now = hash_tree(s.path)
    r = Request(s.site, "POST", "/snapshots", {"name": name})
    r.join(120)
    assert r.status == 200, r.reply
    return tree_now


def _next_snapshot(s, recorded: dict, name: str) -> None:
    """A new snapshot (every block's next overwrite is held again); the oldest of three is
    deleted first (its before-images move to the next younger one or go)."""
    if len(recorded) == 3:
        oldest = next(iter(recorded))
        r = Request(s.site, "DELETE", f"/snapshots/{oldest}", None)
        r.join(120)
        assert r.status == 200, r.reply
        del recorded[oldest]
    recorded[name] = _snapshot(s, name)


class Sweep:
    """Overwrites every file once, front to back in 128-512 KiB pieces, in a random file
    order. When it has written 1.5-3 MiB since the last fsync (the first time: at the end
    of the `first` files), it fsyncs the files it finished in a second thread and goes on with
    the next: held writes pass held_limit between fsyncs (released behind the writer), and
    pass twice it while a commit holds the commit lock (the writer waits, then releases
    them itself). (Not the file being written: the kernel holds a file's inode lock through
    an fsync, which would hold its writer too.) Stops at the first OSError (the power went
    off): `failed_in` is then "write" or "fsync" (the first to fail), `failed` the file
    whose write failed (it may hold part of it), `fsync_failed` whether an fsync failed."""

    def __init__(self, root, rng: random.Random, model: dict, durable: dict, first: int = 1):
        self.root, self.rng, self.model, self.durable = root, rng, model, durable
        self.first = first  # files written before the first fsync
        self.failed_in: str | None = None
        self.failed: str | None = None
        self.fsync_failed = False

    def run(self) -> None:
        rng, dirty, since, threshold = self.rng, set(), 0, self.first * FILE_SIZE
        fds = {n: os.open(self.root / n, os.O_WRONLY) for n in self.model}
        fsyncer = None
        try:
            names = list(self.model)
            rng.shuffle(names)
            for name in names:
                if since >= threshold and (fsyncer is None or not fsyncer.is_alive()):
                    fsyncer = threading.Thread(target=self._fsync, args=(fds, dirty))
                    fsyncer.start()
                    dirty, since, threshold = set(), 0, rng.randrange(3, 7) << 19
                off = 0
                while off < FILE_SIZE:
                    size = min(FILE_SIZE - off, rng.randrange(1, 5) << 17)
                    data = rng.randbytes(size)
                    if self.fsync_failed:
                        return
                    self.failed = name
                    os.pwrite(fds[name], data, off)
                    self.failed = None
                    self.model[name][off: off + size] = data
                    dirty.add(name)
                    off += size
                    since += size
            if fsyncer is not None:
                fsyncer.join()
            self._fsync(fds, dirty)
        except OSError:
            self.failed_in = self.failed_in or "write"
        finally:
            if fsyncer is not None:
                fsyncer.join()
            for fd in fds.values():
                os.close(fd)

    def _fsync(self, fds: dict, names: set) -> None:
        for name in names:
            want = bytes(self.model[name])  # (every write in it has returned)
            try:
                os.fsync(fds[name])
            except OSError:
                self.fsync_failed = True
                self.failed_in = self.failed_in or "fsync"
                return
            self.durable[name] = want


def _check_durable(s, model: dict, durable: dict, failed: str | None, what: str) -> None:
    """Every file as its last returned fsync left it, unless written since (then any mix of
    its writes); the model follows what survived."""
    for name, want in durable.items():
        got = (s.path / name).read_bytes()
        if got != want:
            assert name == failed or bytes(model[name]) != want, (
                f"{what}: {name}, fsync'd, changed by a power cut")
        model[name] = bytearray(got)
        durable[name] = got


def test_power_cut_while_held_writes_are_released_behind_the_writer(power_site):
    rng = random.Random(8101 + SEED)
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    s = _make_site(power_site)
    model = fill(s, rng, FILES, FILE_SIZE)
    durable = {k: bytes(v) for k, v in model.items()}
    recorded: dict[str, dict] = {}

    # sweeps without a cut, each under a new snapshot, until status shows both paths ran
    # (at most four); the first one counts the save-volume syncs and volume writes a sweep
    # makes, to aim the cuts inside one
    counters = {aim: s.pf.add_fault(path, op, count=0)
                for aim, path, op in (("save", SAVES, "fsync"),
                                      ("volume", "site/volume.img", "write"))}
    span = None
    for i in range(4):
        _next_snapshot(s, recorded, f"cal{i}")
        _slow_volume(s, 1.0)
        Sweep(s.path, rng, model, durable).run()
        if span is None:
            seen = s.pf.stats()["seen"]
            span = {aim: seen[str(rid)] for aim, rid in counters.items()}
        st = api(s.site, "GET", "/status")
        released = st["held_releases"]
        print(f"sweep {i}: {span}, held_releases {released}", flush=True)
        if released["behind"] and released["waited"]:
            break
    s.pf.clear_faults()
    assert released["behind"] >= 1, f"nothing was released behind the writer: {st}"
    assert released["waited"] >= 1, f"no writer waited at twice held_limit: {st}"
    assert st["tasks"]["release-held"]["state"] == "running", st["tasks"]
    assert st["held_bytes"] == 0  # (the last fsync released everything)

    hits: dict[str, int] = {}
    in_release = 0
    rounds = 4 * ROUNDS
    rnd = 0
    # after the planned rounds, up to four more until a cut lands in a release, aimed at
    # the first quarter of a sweep whose first fsync comes after 3 MiB: before it, only
    # releases behind the writer sync save volumes and write the volume
    while rnd < rounds or (not in_release and rnd < rounds + 4):
        extra = rnd >= rounds
        part = 4 if extra else 1  # the part of a sweep's syncs or writes aimed at
        _next_snapshot(s, recorded, f"s{rnd}")
        aim = AIMS[rnd % (2 if extra else 3)]
        _slow_volume(s, 0.5)  # (shorter: a wait is likely, not needed)
        keep = rng.choice(["none", "random", "random"])
        timer = None
        if aim == "save volume fsync":
            s.pf.arm_cut(SAVES, "fsync", skip=rng.randrange(-(-span["save"] // part)),
                         keep=keep, seed=rng.randrange(1 << 30))
        elif aim == "volume write":
            s.pf.arm_cut("site/volume.img", "write",
                         skip=rng.randrange(-(-span["volume"] // part)),
                         keep=keep, seed=rng.randrange(1 << 30))
        else:
            timer = threading.Timer(rng.uniform(0.05, 1.5), s.pf.freeze,
                                    (keep, rng.randrange(1 << 30)))
            timer.start()
        sweep = Sweep(s.path, rng, model, durable, first=2 if extra else 1)
        sweep.run()
        if timer is not None:
            timer.join()
        fired = s.pf.stats()["cut"]
        cut_in = sweep.failed_in if fired else None
        hits[aim] = hits.get(aim, 0) + (cut_in is not None)
        # no commit runs outside an fsync: a save-volume sync or volume write while the
        # writer is in a write() and no fsync is under way is a release past the limit
        released = (aim != "random moment" and cut_in == "write"
                    and not sweep.fsync_failed)
        in_release += released
        out = s.power_cut(keep, rng.randrange(1 << 30))
        names = core_check(s.site, recorded)
        assert names == list(recorded)
        s.mount()
        _check_durable(s, model, durable, sweep.failed, f"round {rnd} ({aim}, {out})")
        print(f"round {rnd}: cut at {aim}: "
              f"{'during a ' + cut_in if cut_in else 'after the sweep'}"
              f"{' (in a release of held writes)' if released else ''}; "
              f"{s.dropped(out)} unsynced writes/entries dropped; snapshots {names}",
              flush=True)
        rnd += 1
    s.finish()
    print(f"cuts inside a sweep by aim: {hits}; in a release past held_limit: {in_release}")
    assert in_release >= 1, f"no cut landed in a release of held writes: {hits}"


def test_a_failed_release_behind_is_a_supervised_task_logged_once(power_site):
    """EIO from the save volumes' sync (powerfs, under the daemon) fails the release behind
    the writer; writes between held_limit and twice it wake the task again and again."""
    rng = random.Random(8102 + SEED)
    s = _make_site(power_site)
    model = fill(s, rng, FILES, FILE_SIZE)
    recorded = {"s": _snapshot(s, "s")}
    fault = s.pf.add_fault(SAVES, "fsync", errno="EIO")
    # 1.5 MiB of overwrites in 32 KiB writes over ~2.2 s: past 1 MiB each write wakes the
    # release task, which fails, backs off (0.2 s, 0.4 s, ...) and fails again when woken
    fd = os.open(s.path / "f0", os.O_WRONLY)
    try:
        for i in range(48):  # (f0 whole: FILE_SIZE)
            os.pwrite(fd, rng.randbytes(32 << 10), i << 15)
            time.sleep(0.045)
    finally:
        os.close(fd)
    st = api(s.site, "GET", "/status")
    task = st["tasks"].get("release-held")
    print(f"held {st['held_bytes']}, releases {st['held_releases']}, task {task}, "
          f"EIO injected {s.pf.stats()['faults'][str(fault)]} times")
    assert task is not None, f"the failed release is not shown as a task: {st['tasks']}"
    assert task["state"] in ("retrying", "recovering"), task
    assert task["errors"] >= 2, f"the task was not woken and failed again: {task}"
    assert "EIO" in task["last_error"] and task["error_kind"] == "transient", task
    assert st["held_releases"] == {"behind": 0, "waited": 0}
    assert st["held_bytes"] >= 1 << 20  # nothing released: the held writes stay held
    lines = log_lines(s.site)
    print("\n".join(ln for ln in lines if " WARNING " in ln or " ERROR " in ln))
    assert len([ln for ln in lines if "release-held: EIO" in ln]) == 1, lines[-20:]
    assert len([ln for ln in lines if "could not be synced" in ln]) == 1, lines[-20:]
    # an fsync commits: its flush refuses (the failed sync is final) and the file system
    # turns read-only
    with open(s.path / "f0", "r+b") as f, pytest.raises(OSError):
        os.fsync(f.fileno())
    st = api(s.site, "GET", "/status")
    assert st["state"] == "read-only after an error" and st["fs_error"], st
    s.pf.clear_faults()
    s.power_cut("random", rng.randrange(1 << 30))
    assert core_check(s.site, recorded) == ["s"]
    s.mount()
    # no overwrite reached the volume: their before-images never became durable
    for name, want in model.items():
        assert (s.path / name).read_bytes() == want, name
    st = api(s.site, "GET", "/status")
    assert "release-held" not in st["tasks"] or st["tasks"]["release-held"]["errors"] == 0
    s.finish()
