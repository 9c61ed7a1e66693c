"""Tier 4: kill -9 of the site daemon during copy-on-write and during snapshot delete.

One site lives through every round: mount, change the tree, take a snapshot (its content is
read back through the live mount right before, so it is exactly known), then a writer process
overwrites existing files (each first write of a block copies it to the newest save volume)
while `repfs-admin snapshot delete` runs, and the daemon is killed with SIGKILL at a random
moment. After a lazy unmount the site is mounted again and every snapshot that survives must
read exactly what it held: through `repfs-admin snapshot mount` (real FUSE) and, at the end,
through the core API with fsck of each snapshot's file system. A snapshot whose delete was
interrupted may be gone or intact, never damaged.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from repfs.cli import run_cli
from repfs.cli.admin import _main as admin_main
from repfs.fs.core import FileSystem
from repfs.fs.format import ROOT_INO
from repfs.fs.fsck import fsck
from repfs.site import Site
from repfs.snap.layer import SnapLayer, SnapshotDevice
from tests.conftest import fsck_clean, run_repfs

ROUNDS = int(os.environ.get("REPFS_CRASH_ROUNDS", "8"))  # tools/soak runs many more

WRITER = r"""
import os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
n = 0
try:
    names = sorted(os.listdir(root))
    while True:
        n += 1
        if n % 9 == 0:
            p = os.path.join(root, "w%d_%d" % (seed, n))
            with open(p, "wb") as f:
                f.write(os.urandom(rng.randrange(1, 200000)))
            continue
        p = os.path.join(root, rng.choice(names))
        if not os.path.isfile(p):
            continue
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            f.seek(rng.randrange(0, max(size, 1)))
            f.write(os.urandom(rng.randrange(4096, 300000)))
            if n % 4 == 0:
                f.flush()  # (a write under Python's buffer size reaches the file at close)
                os.fsync(f.fileno())
        print(n, flush=True)
except OSError:
    pass  # the daemon died under us: that is the point
"""


def admin(*args) -> tuple[int, str, str]:
    """repfs-admin through its entry point, in this process (a process per call costs seconds
    on a loaded host)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = run_cli("repfs-admin", admin_main, [str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def admin_ok(target, *args):
    rc, out, err = admin("--site", target, "--json", *args)
    assert rc == 0, f"repfs-admin {' '.join(map(str, args))}: {err.strip()}"
    return json.loads(out)


class Deleter(threading.Thread):
    """DELETE /v1/snapshots/NAME straight to the control port (the daemon dies under it)."""

    def __init__(self, site: Path, name: str):
        super().__init__(daemon=True)
        c = json.loads((site / "control.json").read_text())
        self.addr = (c["host"], int(c["port"]))
        self.token = (site / "control.token").read_text().strip()
        self.name = name
        self.status = None
        self.sent = threading.Event()

    def run(self):
        conn = http.client.HTTPConnection(*self.addr, timeout=60)
        try:
            conn.connect()
            self.sent.set()
            conn.request("DELETE", f"/v1/snapshots/{self.name}",
                         headers={"Authorization": f"Bearer {self.token}"})
            self.status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            self.status = None
        finally:
            self.sent.set()
            conn.close()


def hash_tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = "dir"
        for f in filenames:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.normpath(os.path.join(rel, f))] = hashlib.sha256(fh.read()).hexdigest()
    return out


def core_hash_tree(fs: FileSystem) -> dict[str, str]:
    out = {}

    def walk(dino, prefix):
        for name, inode, _ in list(fs.readdir(dino, 0)):
            if name in (b".", b".."):
                continue
            path = prefix + name.decode()
            if stat.S_ISDIR(inode.mode):
                out[path] = "dir"
                walk(inode.ino, path + "/")
            else:
                out[path] = hashlib.sha256(fs.read(inode.ino, 0, inode.size)).hexdigest()

    walk(ROOT_INO, "")
    return out


def wait_unmounted(path: Path, timeout=20) -> None:
    deadline = time.monotonic() + timeout
    while os.path.ismount(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def daemon_pid(site: Path) -> int:
    return int((site / "repfs.pid").read_text().split()[0])


def kill_daemon(site: Path, mnt: Path) -> None:
    pid = daemon_pid(site)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"daemon {pid} survived SIGKILL")
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
    wait_unmounted(mnt)
    assert not os.path.ismount(mnt)


def verify_by_snapshot_mount(mnt: Path, smnt: Path, name: str, want: dict) -> None:
    smnt.mkdir(exist_ok=True)
    admin_ok(mnt, "snapshot", "mount", name, smnt)
    try:
        got = hash_tree(smnt)
    finally:
        run_repfs("umount", smnt)
        wait_unmounted(smnt)
    assert got == want, f"snapshot {name} changed: " + ", ".join(
        sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:10])
    # the daemon forgets the mount once its helper exits
    deadline = time.monotonic() + 10
    while name in admin_status(mnt)["snapshot_mounts"] and time.monotonic() < deadline:
        time.sleep(0.05)


def admin_status(mnt: Path) -> dict:
    return admin_ok(mnt, "status")


def snapshot_names(mnt: Path) -> list[str]:
    return [s["name"] for s in admin_ok(mnt, "snapshot", "list")]


def finish(proc: subprocess.Popen, timeout=20) -> str:
    """Wait for a helper process (killing it if it hangs); its stdout."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


@pytest.mark.slow
def _interrupted_deletes(site: Path, caplog) -> int:
    """Deletes a kill interrupted, which the next opening of the site finished: it logs each
    (to repfs.log when the daemon opens it, to this process when core_check does)."""
    needle = "finishing the interrupted delete of snapshot"
    return (sum(needle in ln for ln in (site / "repfs.log").read_text().splitlines())
            + sum(needle in r.getMessage() for r in caplog.records))


def _wait_deleting(site: Path, name: str, deleter: Deleter) -> bool:
    """Poll the status until snapshot `name` shows as being deleted (True), or the delete
    has ended first (False)."""
    c = json.loads((site / "control.json").read_text())
    token = (site / "control.token").read_text().strip()
    deadline = time.monotonic() + 30
    while deleter.is_alive() and time.monotonic() < deadline:
        conn = http.client.HTTPConnection(c["host"], int(c["port"]), timeout=30)
        try:
            conn.request("GET", "/v1/status", headers={"Authorization": f"Bearer {token}"})
            st = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        if any(s["name"] == name and s.get("state") == "deleting" for s in st["snapshots"]):
            return True
    return False


def test_kill_during_copy_on_write_and_delete(mount_site, tmp_path, caplog):
    """The kills must hit both windows: copy-on-write (the writer reported a write before
    each kill) and a delete in progress (the recovery finished an interrupted delete, which
    it logs); after half the rounds without one, the kill is aimed at a delete the status
    shows under way, and the rounds go on (up to four more) until a delete was interrupted."""
    caplog.set_level(logging.INFO, logger="repfs")
    rng = random.Random(20240611)
    m = mount_site("256M", name="site")
    site, mnt = m.site, m.path
    smnt = tmp_path / "snapmnt"
    # a first tree
    for i in range(24):
        (mnt / f"f{i:02d}").write_bytes(os.urandom(rng.choice([4096, 65536, 200_000, 400_000])))
    os.mkdir(mnt / "d")
    (mnt / "d" / "inner").write_bytes(os.urandom(50_000))

    # how long a delete that moves before-images takes here (the kill is timed against it)
    def overwrite_all():
        for i in range(24):
            with open(mnt / f"f{i:02d}", "r+b") as f:
                size = f.seek(0, 2)
                f.seek(0)
                f.write(os.urandom(size))

    admin_ok(mnt, "snapshot", "create", "cal0")
    admin_ok(mnt, "snapshot", "create", "cal1")  # cal0 reads through cal1's save volume
    overwrite_all()
    t0 = time.monotonic()
    moved = admin_ok(mnt, "snapshot", "delete", "cal1")["moved_blocks"]
    delete_time = max(time.monotonic() - t0, 0.1)
    assert moved > 500
    admin_ok(mnt, "snapshot", "delete", "cal0")
    print(f"a delete moving {moved} blocks takes {delete_time:.2f} s")

    recorded: dict[str, dict] = {}
    stats = {"interrupted": 0, "survived": 0, "gone": 0, "completed": 0}
    hits = rnd = 0
    try:
        while rnd < ROUNDS or (hits == 0 and rnd < ROUNDS + 4):
            t_round = time.monotonic()
            # keep the queue short: delete the oldest normally
            while len(recorded) >= 4:
                old = next(iter(recorded))
                admin_ok(mnt, "snapshot", "delete", old)
                del recorded[old]
            # and the live tree: the files of rounds older than four go (the writer adds and
            # grows files every round; a soak's hundreds of rounds filled the 256M site)
            for p in mnt.iterdir():
                if p.name[0] in "rw" and int(p.name[1:].split("_")[0]) < rnd - 4:
                    p.unlink()

            # change the tree a little, then take a snapshot of exactly what the mount shows
            for _ in range(3):
                p = mnt / f"f{rng.randrange(24):02d}"
                with open(p, "r+b") as f:
                    f.seek(rng.randrange(0, 100_000))
                    f.write(os.urandom(rng.randrange(1, 50_000)))
            (mnt / f"r{rnd}").write_bytes(os.urandom(rng.randrange(0, 120_000)))
            name = f"s{rnd}"
            want = hash_tree(mnt)
            admin_ok(mnt, "snapshot", "create", name)
            recorded[name] = want

            # writer (copy-on-write into the newest save volume) and a delete, then SIGKILL
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt), str(rnd)],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True)
            first = writer.stdout.readline()  # it is writing
            assert first, "the writer failed before its first write"
            time.sleep(rng.uniform(0.0, 0.4))
            victim = None
            deleter = None
            aimed = None
            if len(recorded) >= 2 and rng.random() < 0.85:
                victim = rng.choice(list(recorded))
                older = list(recorded)[list(recorded).index(victim) - 1] \
                    if list(recorded).index(victim) > 0 else None
                deleter = Deleter(site, victim)
                deleter.start()
                deleter.sent.wait(10)
                # a delete moves before-images to the next older snapshot: kill before it,
                # in it, or just after it; once half the rounds passed without a kill inside
                # one, aim: wait until the status shows the victim "deleting", then kill
                if hits == 0 and rnd >= ROUNDS // 2:
                    aimed = _wait_deleting(site, victim, deleter)  # then kill at once
                else:
                    time.sleep(rng.uniform(0.0, delete_time) if rng.random() < 0.6 else
                               rng.uniform(0.0, 3 * delete_time))
            kill_daemon(site, mnt)
            writes = 1 + len(finish(writer).split())
            deleted_ok = False
            if deleter is not None:
                deleter.join(30)
                deleted_ok = deleter.status == 200

            # recovery (finishing an interrupted delete, replaying the redo log) runs when the
            # site is opened next: in odd rounds by this process through the core API, which
            # then checks every snapshot; in even rounds by the daemon, and the snapshots most
            # at risk are checked through real snapshot mounts
            if rnd % 2:
                names = core_check(site, recorded, allow_gone=victim)
                run_repfs("mount", site, mnt)
                assert snapshot_names(mnt) == names
            else:
                run_repfs("mount", site, mnt)
                names = snapshot_names(mnt)
            if victim is not None:
                if victim in names:
                    assert not deleted_ok, f"{victim} was deleted (status 200) but came back"
                    stats["survived"] += 1
                else:
                    stats["gone"] += 1
                    del recorded[victim]
                stats["completed" if deleted_ok else "interrupted"] += 1
            assert names == list(recorded), (names, list(recorded), victim)
            if not rnd % 2:
                # the newest (where the writer's copies went), and the delete victim's older
                # neighbour (where its before-images moved) or the victim if it survived
                check = {name, victim, older if victim else None} & set(recorded)
                for n in [n for n in recorded if n in check]:
                    verify_by_snapshot_mount(mnt, smnt, n, recorded[n])
            hits = _interrupted_deletes(site, caplog)
            print(f"round {rnd}: {writes} writes, delete {victim}: "
                  f"{'done' if deleted_ok else 'interrupted' if victim else '-'}"
                  f"{' (aimed: seen deleting)' if aimed else ''}, "
                  f"{time.monotonic() - t_round:.1f} s", flush=True)
            rnd += 1

        # the end: a clean unmount, fsck clean, every snapshot exact (and its fs clean)
        run_repfs("umount", mnt)
        fsck_clean(site)
        assert core_check(site, recorded) == list(recorded)
        run_repfs("mount", site, mnt)  # for the fixture's own umount + fsck + log check
    finally:
        if os.path.ismount(smnt):
            subprocess.run(["fusermount3", "-u", "-z", str(smnt)], check=False)
            wait_unmounted(smnt)
    print(f"deletes: {stats}; interrupted inside the delete and finished by recovery: {hits}")
    assert hits >= 1, f"no kill landed inside a delete in {rnd} rounds: test too weak"


def core_check(site: Path, recorded: dict, allow_gone: str | None = None) -> list[str]:
    """Open the (unmounted) site through the core API - this runs crash recovery - and check
    every snapshot's tree byte for byte and its file system with fsck. Returns the names."""
    fs = Site(site).open_fs()
    try:
        layer = fs.dev
        while not isinstance(layer, SnapLayer):
            layer = layer.lower
        names = [x.name for x in layer.store.queue]
        expected = [n for n in recorded if n in names or n != allow_gone]
        assert names == expected, (names, list(recorded), allow_gone)
        for snap in layer.store.queue:
            sfs = FileSystem(SnapshotDevice(layer, snap), None, readonly=True)
            assert core_hash_tree(sfs) == recorded[snap.name], f"snapshot {snap.name} changed"
            report = fsck(sfs)
            assert report.clean, (snap.name, [p.message for p in report.problems])
        fs.checkpoint()
        report = fsck(fs)
        assert report.clean, ("live", [p.message for p in report.problems])
    finally:
        fs.close()
        fs.dev.close()
    return names
