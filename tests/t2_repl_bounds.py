"""Tier 2: replication's bounds, through real mounts (issue 8, "Tests").

* A delta set larger than the memory bound is cut, sent, received and played with each daemon
  inside a memory cgroup whose limit is that bound (RLIMIT_AS cannot bound a daemon that maps
  LMDB's address space): neither daemon is OOM-killed, the secondary equals the primary, and
  each daemon's peak resident set (VmHWM) stays below the bound.
* With two destinations, one that stops answering (SIGSTOP of its daemon) keeps every delta set
  it has not played pinned and sendable, while the other one plays them all; when the pins
  hold more than the site's capacity, cutting pauses (flow control) and writes go on; when the
  stopped destination resumes, it gets each delta set exactly at its boundary (the blocks
  overwritten meanwhile come from the pins' copies) and then every pin is released.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPFS, run_repfs, teardown_mount
from tests.t2_repl import (
    NO_AUTO_CUT, admin, admin_json, api, assert_same_tree, cut, daemon_alive, log_tail, status,
    set_chunk_capacity, start_replication, tree, tree_diff, wait_converged,
)

MiB = 1 << 20


# ----------------------------------------------------------------------------- memory cgroup



def _own_memory_cgroup() -> Path | None:
    """This process's cgroup-v1 memory directory (children of it keep the hierarchy that
    whoever runs the tests set up)."""
    root = Path("/sys/fs/cgroup/memory")
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return root / path.lstrip("/")
    except OSError:
        return None
    return None


class MemoryCgroup:
    """A cgroup-v1 memory cgroup limited to `limit` bytes (memory + swap when the kernel
    accounts swap). Processes are put in by `enter_cmd` (a shell that joins it, then execs)."""

    def __init__(self, name: str, limit: int):
        parent = _own_memory_cgroup()
        if parent is None or not (parent / "memory.limit_in_bytes").exists():
            pytest.skip("no cgroup-v1 memory controller for this process "
                        "(/sys/fs/cgroup/memory): cannot bound a daemon's memory")
        self.path = parent / name
        try:
            self.path.mkdir()
            self._write("memory.limit_in_bytes", limit)
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                self._write("memory.memsw.limit_in_bytes", limit)
        except OSError as e:
            self.remove()
            pytest.skip(f"cannot make a memory cgroup at {self.path}: {e}")
        self.limit = limit

    def _write(self, name: str, value) -> None:
        (self.path / name).write_text(f"{value}\n")

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def oom_kills(self) -> int:
        for line in self.read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0  # (kernels before 4.13 do not count them: the pids' survival still shows)

    def pids(self) -> list[int]:
        return [int(x) for x in self.read("cgroup.procs").split()]

    def enter_cmd(self, *cmd) -> list[str]:
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path),
                *map(str, cmd)]

    def remove(self) -> None:
        """Remove it (its processes have exited, or are moved to the parent first)."""
        if not self.path.exists():
            return
        try:
            for pid in self.pids():
                try:
                    (self.path.parent / "cgroup.procs").write_text(f"{pid}\n")
                except OSError:
                    pass
        except OSError:
            pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        self.path.rmdir()


def vm_hwm(pid: int) -> int:
    """Peak resident set of a process in bytes (/proc/PID/status VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


class BoundedMount:
    """A site mounted by `repfs mount` started inside a memory cgroup (the daemonized daemon
    stays in it); teardown as conftest's mount_site: a clean umount, a log without warnings,
    a clean fsck, always a forced unmount."""

    def __init__(self, tmp_path: Path, name: str, cgroup: MemoryCgroup):
        self.site = tmp_path / name
        self.path = tmp_path / f"{name}-mnt"
        self.cgroup = cgroup
        self.pid: int | None = None

    def mount(self, size: str) -> None:
        from repfs.site import Site
        run_repfs("mkfs", self.site, "--size", size)
        self.path.mkdir()
        r = subprocess.run(self.cgroup.enter_cmd(*REPFS, "mount", self.site, self.path),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (
            f"repfs mount {self.site} in {self.cgroup.path} exited {r.returncode} "
            f"(OOM kills there: {self.cgroup.oom_kills()}): {r.stderr.strip()}")
        assert os.path.ismount(self.path)
        owner = Site(self.site).owner()
        assert owner is not None, f"no daemon serves {self.site}"
        self.pid = owner[0]
        assert self.pid in self.cgroup.pids(), (
            f"the daemon {self.pid} of {self.site} is not in {self.cgroup.path}: "
            f"{self.cgroup.pids()}")

    def teardown(self, errors: list[str]) -> None:
        teardown_mount(self.path, self.site, (), errors)


def _wait_exit(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _calibrate(tmp_path: Path, g: MemoryCgroup, groups: list) -> None:
    """The limit is what the test needs: in the cgroup, writing DELTA bytes of file data
    (page cache, charged to the cgroup but reclaimable) passes, and holding DELTA bytes in a
    process's own memory is OOM-killed. Removes the probe cgroup."""
    groups.append(g)
    probe = tmp_path / "probe"
    r = subprocess.run(g.enter_cmd("dd", "if=/dev/zero", f"of={probe}", f"bs={MiB}",
                                   f"count={DELTA // MiB}", "conv=fsync"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and g.oom_kills() == 0, (
        f"writing {DELTA // MiB} MiB of file data in {g.path} failed ({r.returncode}): "
        f"{r.stderr.strip()}; {g.read('memory.oom_control')}")
    probe.unlink()
    r = subprocess.run(g.enter_cmd(sys.executable, "-c",
                                   f"b = bytearray({DELTA}); b[::4096] = b'x' * len(b[::4096])"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL and g.oom_kills() == 1, (
        f"a process holding {DELTA // MiB} MiB was not OOM-killed in {g.path} "
        f"(exit {r.returncode}): the limit does not bound memory here")
    groups.remove(g)
    g.remove()


BOUND = 160 * MiB  # each daemon's memory (cgroup limit; the default bound is 256 MiB)
DELTA = 384 * MiB  # the delta set: well above the bound


def test_a_delta_set_larger_than_the_memory_bound(tmp_path):
    """Each daemon runs in its own memory cgroup limited to BOUND (memory and swap); page
    cache is charged there too but is reclaimable, so only what the daemon itself holds can
    break the limit. A DELTA-byte delta set (new files, fsync'd) is cut on demand, sent,
    received and played; no daemon is OOM-killed (the cgroup counts none, both still run),
    the secondary's tree equals the primary's, and each daemon's VmHWM is below BOUND."""
    made: list[BoundedMount] = []
    groups: list[MemoryCgroup] = []
    errors: list[str] = []
    tag = f"repfs-test-{os.getpid()}"
    try:
        _calibrate(tmp_path, MemoryCgroup(f"{tag}-probe", BOUND), groups)
        for name in ("s1", "s2"):
            g = MemoryCgroup(f"{tag}-{name}", BOUND)
            groups.append(g)
            made.append(BoundedMount(tmp_path, name, g))
            made[-1].mount("512M")
        m1, m2 = made
        admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
        start_replication(m1, m2)
        rng = random.Random(8)
        files = 4
        for i in range(files):  # new data, every MiB different (nothing to coalesce)
            piece = rng.randbytes(MiB)
            with open(m1.path / f"big{i}", "wb") as f:
                for k in range(DELTA // files // MiB):
                    f.write(piece[k:] + piece[:k])
                os.fsync(f.fileno())
        before = api(m1.site, "GET", "/status")["current_delta_set_blocks"]
        assert before * 4096 >= DELTA, before
        out = admin_json(m1.path, "replicate", "deltaset")  # cut on demand
        assert out["state"] == "ready" and out["blocks"] * 4096 >= DELTA, out
        n = out["delta_set"]
        wait_converged(m1, m2, n, timeout=120)
        for m in made:
            assert daemon_alive(m.site), f"the daemon of {m.site} died:\n{log_tail(m.site)}"
            assert m.cgroup.oom_kills() == 0, (m.site, m.cgroup.read("memory.oom_control"))
        assert_same_tree(m1.path, m2.path)
        peaks = {m.site.name: vm_hwm(m.pid) for m in made}
        used = {m.site.name: int(m.cgroup.read("memory.max_usage_in_bytes")) for m in made}
        print(f"delta set {n}: {DELTA // MiB} MiB; VmHWM (MiB): "
              + ", ".join(f"{k} {v / MiB:.1f}" for k, v in peaks.items())
              + "; cgroup peak incl. page cache (MiB): "
              + ", ".join(f"{k} {v / MiB:.1f}" for k, v in used.items())
              + f"; bound {BOUND // MiB} MiB")
        for name, peak in peaks.items():
            assert peak < BOUND, f"the daemon of {name} peaked at {peak / MiB:.1f} MiB RSS"
        # the delta set was released once played (nothing pins it any more)
        deadline = time.monotonic() + 30
        while held(m1) or save_volumes(m1):
            assert time.monotonic() < deadline, (held(m1), save_volumes(m1))
            time.sleep(0.1)
    finally:
        for m in made:
            m.teardown(errors)
            if m.pid is not None:
                _wait_exit(m.pid)
        for g in groups:
            try:
                g.remove()
            except OSError as e:
                errors.append(f"cannot remove {g.path}: {e}")
    assert not errors, "\n".join(errors)


# ----------------------------------------------------------------------------- retention


def _dest(m1, m) -> dict:
    rows = [d for d in api(m1.site, "GET", "/status")["destinations"]
            if d["name"] == m.site.name]
    assert len(rows) == 1, rows
    return rows[0]


def wait_played(m1, m, n: int, timeout: float = 60.0) -> None:
    """Until destination `m` of the primary `m1` acked and played delta set `n` (as the
    primary records it, and as the secondary reports it)."""
    deadline = time.monotonic() + timeout
    while True:
        d = _dest(m1, m)
        if d["state"] == "replicating" and d["acked_delta_set"] == d["played_delta_set"] == n:
            s = api(m.site, "GET", "/status")
            if s["last_played_delta_set"] == n:
                return
        assert time.monotonic() < deadline, (
            f"{m.site.name} did not play delta set {n} in {timeout} s: {d}\n--- primary log:"
            f"\n{log_tail(m1.site)}\n--- secondary log:\n{log_tail(m.site)}")
        for x in (m1, m):
            assert daemon_alive(x.site), f"the daemon of {x.site} died:\n{log_tail(x.site)}"
        time.sleep(0.1)


def held(m1) -> list[int]:
    """The delta sets the primary still holds (pinned), from its status."""
    return [x["delta_set"] for x in api(m1.site, "GET", "/status")["outstanding_delta_sets"]]


def save_volumes(m) -> list[str]:
    return sorted(p.name for p in (m.site / "save").glob("*.save"))


def write_file(path: Path, data: bytes, offset: int | None = None) -> None:
    with open(path, "r+b" if offset is not None else "wb") as f:
        if offset is not None:
            f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def test_a_stopped_destination_keeps_its_delta_sets_while_another_plays_them(
        mount_site, tmp_path):
    """One primary, two local secondaries (`replicate start --to` twice). S3's daemon is
    stopped (SIGSTOP: it answers nothing, while its kernel keeps the connections): S2 plays
    every delta set cut meanwhile, and the primary keeps each of them pinned (status lists
    them; `snapshot list` does not, the pins being internal), because S3 has not played
    them. Overwriting the pinned blocks copies their before-images into the pins until they
    hold more than the site's capacity (4 MiB here): the cut loop pauses (flow control), an
    on-demand cut is refused with a clear error, and writes go on into the change log. S3
    resumes: it plays each delta set as it was at its boundary (its tree equals S2's, which
    played the same sets, not the primary's overwrites), then every pin is released and the
    next cut brings all three together."""
    run_repfs("mkfs", tmp_path / "s1", "--size", "256M")
    set_chunk_capacity(tmp_path / "s1", "4M")
    m1 = mount_site("256M", name="s1")
    m2 = mount_site("256M", name="s2")
    m3 = mount_site("256M", name="s3")
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    start_replication(m1, m2)
    start_replication(m1, m3)
    st = api(m1.site, "GET", "/status")
    assert sorted((d["name"], d["state"]) for d in st["destinations"]) == [
        ("s2", "replicating"), ("s3", "replicating")], st["destinations"]
    assert st["chunk_area_capacity_bytes"] == 4 * MiB
    rng = random.Random(9)
    write_file(m1.path / "base", rng.randbytes(MiB))
    n0 = cut(m1)
    wait_played(m1, m2, n0)
    wait_played(m1, m3, n0)
    # played by both: released (its pin deleted), as every delta set before it
    deadline = time.monotonic() + 10
    while held(m1) or save_volumes(m1):
        assert time.monotonic() < deadline, (held(m1), save_volumes(m1))
        time.sleep(0.1)

    from repfs.site import Site
    pid3 = Site(m3.site).owner()[0]
    os.kill(pid3, signal.SIGSTOP)  # S3 stops answering (its mount is not touched meanwhile)
    try:
        cuts = []
        for i in range(3):
            write_file(m1.path / f"f{i}", rng.randbytes(2 * MiB))
            cuts.append(cut(m1))
            wait_played(m1, m2, cuts[-1])
            assert held(m1) == cuts, (held(m1), cuts)  # each pinned until S3 plays it
            d3 = _dest(m1, m3)
            assert d3["played_delta_set"] == n0 and d3["lag_seconds"] > 0, d3
            assert len(save_volumes(m1)) == len(cuts), save_volumes(m1)
        listed = admin_json(m1.path, "snapshot", "list")
        assert "repl-ds-" not in str(listed), listed  # internal: not the user's snapshots
        r = admin(m1.path, "snapshot", "delete", f"repl-ds-{cuts[0]}", check=False)
        assert r.returncode != 0 and "belongs to replication" in r.stderr, r
        assert_same_tree(m1.path, m2.path)
        boundary = tree(m2.path)  # S2 at the last cut's boundary
        st = api(m1.site, "GET", "/status")
        assert not st["flow_control"] and st["chunk_area_bytes"] < 4 * MiB, st

        # overwrite every pinned block: the pins copy their before-images, past capacity
        for i in range(3):
            write_file(m1.path / f"f{i}", rng.randbytes(2 * MiB), offset=0)
        deadline = time.monotonic() + 15
        while not (st := api(m1.site, "GET", "/status"))["flow_control"]:
            assert time.monotonic() < deadline, f"no flow control: {st}"
            time.sleep(0.1)
        assert st["chunk_area_bytes"] >= 4 * MiB, st
        assert held(m1) == cuts
        r = admin(m1.path, "replicate", "deltaset", check=False, timeout=30)
        assert r.returncode == 1 and "flow control" in r.stderr, (r.returncode, r.stderr)
        write_file(m1.path / "during", rng.randbytes(MiB))  # writes go on
        st = api(m1.site, "GET", "/status")
        assert st["flow_control"] and st["current_delta_set_blocks"] >= 7 * MiB // 4096, st
        assert st["last_cut_delta_set"] == cuts[-1], st
        assert tree_diff(tree(m1.path), boundary), "the overwrites did not change the primary"
    finally:
        os.kill(pid3, signal.SIGCONT)
    m1.expect_log("flow control")  # the WARNING that cutting paused is this test's point

    wait_played(m1, m3, cuts[-1])
    # the pins kept each delta set as it was at its boundary: S3 equals S2, not the primary
    assert_same_tree(m2.path, m3.path)
    assert tree(m3.path) == boundary
    # played by all: every pin released, and cutting resumes
    deadline = time.monotonic() + 15
    while (st := api(m1.site, "GET", "/status"))["flow_control"] or held(m1) \
            or save_volumes(m1):
        assert time.monotonic() < deadline, (st, save_volumes(m1))
        time.sleep(0.1)
    assert st["chunk_area_bytes"] == 0, st
    n = cut(m1)
    wait_played(m1, m2, n)
    wait_played(m1, m3, n)
    assert_same_tree(m1.path, m2.path)
    assert_same_tree(m1.path, m3.path)
    deadline = time.monotonic() + 10
    while held(m1) or save_volumes(m1):
        assert time.monotonic() < deadline, (held(m1), save_volumes(m1))
        time.sleep(0.1)
    assert [d["state"] for d in status(m1.path)["destinations"]] == ["replicating"] * 2
