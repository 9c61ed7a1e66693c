"""Tier 2: the edges of replication a user hits, through real daemons and mounts.

* `replicate start` to a secondary of another size, smaller or larger, is refused with a
  one-line error and exit 1 before any byte is sent (even with --force); nothing of the
  target changes.
* `attach` (the receiver's endpoint) refuses another primary, an older generation, another
  volume size and a malformed identity; `force` overrides only what it may.
* During the initial copy the secondary's mount shows its earlier state, whole, until the
  copy is played; a reader looping over it sees only whole states (and the test proves it
  read while the copy was running).
* Every file holding raw blocks is 0600 and the directories holding them 0700, even when the
  daemons run under a umask of 0.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

from tests.conftest import run_repfs
from tests.t2_repl import (
    NO_AUTO_CUT, admin, api, assert_same_tree, cut, log_tail, start_replication, status, tree,
    wait_converged,
)
from tests.t4_repl_crash import kill9, post, remount


def incoming_files(site: Path) -> list[str]:
    d = Path(site) / "save" / "incoming"
    return sorted(p.name for p in d.iterdir() if p.stat().st_size) if d.exists() else []


def test_start_to_a_secondary_of_another_size_is_refused(mount_site):
    m1 = mount_site("256M", name="s1")
    (m1.path / "data").write_bytes(os.urandom(300_000))
    for size, name in (("128M", "small"), ("512M", "large")):
        m2 = mount_site(size, name=name)
        before = tree(m2.path)
        for extra in ((), ("--force",)):
            r = admin(m1.path, "replicate", "start", "--to", m2.site, *extra, check=False)
            err = r.stderr.strip()
            assert r.returncode == 1, (r.returncode, r.stdout, err)
            assert "Traceback" not in err and len(err.splitlines()) == 1, err
            assert "exactly the primary's size" in err and "256 MiB" in err, err
        # nothing was sent: the target is still a writable primary with its own content
        assert tree(m2.path) == before
        s = status(m2.path)
        assert s["role"] == "primary" and s["readonly"] is False, s
        assert incoming_files(m2.site) == []
        (m2.path / "still-writable").write_bytes(b"yes")
        p = status(m1.path)
        assert p["destinations"] == [] and not p["replicating"], p
        assert not [s for s in p["snapshots"] if s["name"].startswith("repl-init")]


def test_attach_checks_primary_generation_size_and_force(mount_site):
    m1 = mount_site("256M", name="s1")
    m2 = mount_site("256M", name="s2")
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    (m1.path / "f").write_bytes(b"from the primary")
    start_replication(m1, m2)
    wait_converged(m1, m2)
    s2 = api(m2.site, "GET", "/repl/receiver")
    me = s2["primary"]
    gen, nblocks = s2["generation"], s2["volume_blocks"]
    assert me["site"] == str(m1.site) and gen >= 1 and nblocks == 65536
    other = {"uuid": "cd" * 16, "site": str(m1.site.parent / "elsewhere")}

    def attach(primary, generation, n=nblocks, force=False):
        return post(m2.site, "/repl/attach", {"primary": primary, "generation": generation,
                                              "nblocks": n, "force": force})
    refusals = [
        (attach(other, gen + 5), 409, f"secondary of {m1.site}"),
        (attach(me, gen, force=False), 409, "already a replicating secondary"),
        (attach(me, gen, n=nblocks + 1, force=True), 409, "exactly the primary's size"),
        (attach({"site": str(m1.site)}, gen, force=True), 409, "no valid primary"),
        (attach({"site": str(m2.site), "uuid": me["uuid"]}, gen, force=True), 409,
         "its own secondary"),
        (attach(me, "1"), 400, "generation"),
        (post(m2.site, "/repl/attach", {"primary": me, "generation": gen}), 400, "nblocks"),
    ]
    for (code, doc), want_code, want in refusals:
        assert code == want_code and want in doc["error"], (code, doc, want)
    # none of them changed anything: m2 still follows m1, which still replicates to it
    after = api(m2.site, "GET", "/repl/receiver")
    assert (after["primary"], after["generation"], after["state"]) == (me, gen, "replicating")
    (m1.path / "g").write_bytes(b"more")
    wait_converged(m1, m2, cut(m1))
    assert_same_tree(m1.path, m2.path)
    # once stopped, force lets another primary take it over (its copy would replace the
    # content); then that primary's older generation, and the first primary, are refused
    admin(m2.path, "replicate", "stop")
    # (the first primary finds it stopped before another primary takes it: had it found it
    # at the newer generation instead, it would have fenced itself, recovery/failover.py)
    deadline = time.monotonic() + 30
    while api(m1.site, "GET", "/status")["destinations"][0]["state"] != "error":
        assert time.monotonic() < deadline, log_tail(m1.site)
        time.sleep(0.1)
    m1.expect_log("no longer a replicating secondary")
    code, doc = attach(other, gen + 5, force=True)
    assert code == 200 and doc["primary"] == other and doc["state"] == "initial-copy", doc
    assert doc["generation"] == gen + 5
    code, doc = attach(other, gen + 4)
    assert code == 409 and f"older than this site's {gen + 5}" in doc["error"], doc
    code, doc = attach(me, gen + 5)
    assert code == 409 and "secondary of" in doc["error"], doc
    # the first primary stopped replicating to it, with the reason


# ----------------------------------------------------------------------------- torn states


BEFORE = {f"f{i}": bytes([0x42 + i]) * (48 * 1024 + i * 4096) for i in range(8)}
AFTER = {f"f{i}": bytes([0x61 + i]) * (48 * 1024 + i * 4096) for i in range(8)}


def _observe(root: Path) -> list[str]:
    """Read the state files one call at a time; each observation, in time order, is
    "before", "after" or a description of a torn one."""
    d = root / "d"
    names = set(os.listdir(d))
    obs = ["before" if names == set(BEFORE) else
           "after" if names == set(AFTER) | {"only-after"} else f"names {sorted(names)}"]
    for n in sorted(BEFORE):
        fd = os.open(d / n, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read the volume, not a cache
            data = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        obs.append("before" if data == BEFORE[n] else "after" if data == AFTER[n] else
                   f"{n}: {len(data)} bytes of neither state")
    return obs


def _before_and_after(m1, m2) -> None:
    """Automatic cuts off on the primary m1; the same names (and so, on two fresh file
    systems, the same inodes and blocks) with other content on each side, the secondary m2
    holding its "before" state; 64 MiB behind the small files, so the copy takes a while."""
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    for m, state in ((m2, BEFORE), (m1, AFTER)):
        (m.path / "d").mkdir()
        for n, data in state.items():
            (m.path / "d" / n).write_bytes(data)
    (m1.path / "d" / "only-after").write_bytes(b"new")
    filler = os.urandom(1 << 20)
    for i in range(64):
        (m1.path / f"big{i}").write_bytes(filler[i:] + filler[:i])


def test_the_secondary_never_shows_a_torn_state_during_the_initial_copy(mount_site):
    m1 = mount_site("1G", name="s1")
    m2 = mount_site("1G", name="s2")
    _before_and_after(m1, m2)
    want_after = tree(m1.path)

    stop = threading.Event()
    seen = {"before": 0, "after": 0, "during_copy": 0}
    problems: list[str] = []

    def copying() -> bool:
        return api(m2.site, "GET", "/status").get("replication_state") == "initial-copy"

    def reader():
        while not stop.is_set():
            try:
                was_copying = copying()
                obs = _observe(m2.path)
                still_copying = copying()
            except Exception as e:  # noqa: BLE001 - reported below
                problems.append(f"read failed: {e!r}")
                return
            for o in obs:  # the states follow each other: the earlier one, then the new one
                if o not in ("before", "after"):
                    problems.append(f"a torn state: {o}")
                elif o == "before" and seen["after"]:
                    problems.append(f"the earlier state came back after the new one: {obs}")
                else:
                    seen[o] += 1
            if was_copying and still_copying:
                seen["during_copy"] += 1
                if "after" in obs:
                    problems.append(f"the copied state showed while the copy ran: {obs}")
            if len(problems) > 3:
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        start_replication(m1, m2, "--force")  # m2 holds files
        wait_converged(m1, m2)
        deadline = time.monotonic() + 10
        while seen["after"] < 3 and not problems and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(30)
    assert not problems, problems[:3]
    assert seen["during_copy"] >= 1, f"no read landed during the copy: test too weak {seen}"
    assert seen["before"] >= 1 and seen["after"] >= 1, seen
    assert tree(m2.path) == want_after


def test_a_secondary_killed_during_the_copy_shows_its_earlier_state_then_resumes(mount_site):
    """kill -9 of the secondary while it stages the copy: remounted, it shows its earlier
    state whole (the copy never touched its volume), and the copy resumes to a byte-exact
    secondary."""
    m1 = mount_site("1G", name="s1")
    m2 = mount_site("1G", name="s2")
    _before_and_after(m1, m2)
    code, out = post(m1.site, "/replicate/start", {"to": str(m2.site), "force": True})
    assert code == 200 and out["state"] == "initial-copy", out
    deadline = time.monotonic() + 60
    while True:  # kill once the secondary holds part of the copy
        r = api(m2.site, "GET", "/repl/receiver")
        if r["state"] == "initial-copy" and (r["copy"] or {}).get("blocks", 0) > 0:
            break
        assert r["state"] == "initial-copy", f"the copy ended before the kill: {r}"
        assert time.monotonic() < deadline, r
        time.sleep(0.005)
    kill9(m2.site)
    remount(m2)
    r = api(m2.site, "GET", "/repl/receiver")
    assert r["state"] == "initial-copy", f"the kill missed the copy: {r}"
    assert _observe(m2.path) == ["before"] * 9, "torn or new state after the kill"
    wait_converged(m1, m2, timeout=90)
    assert_same_tree(m1.path, m2.path)
    assert api(m2.site, "GET", "/status")["role"] == "secondary"


# ----------------------------------------------------------------------------- file modes


def test_raw_block_files_are_private_under_umask_0(mount_site):
    old = os.umask(0)
    try:
        m1 = mount_site("256M", name="s1")
        m2 = mount_site("256M", name="s2")
    finally:
        os.umask(old)
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    start_replication(m1, m2)
    admin(m2.path, "replicate", "policy", "--playback-timeout", "3600")
    admin(m1.path, "snapshot", "create", "s")  # a save volume on the primary
    (m1.path / "x").write_bytes(os.urandom(200_000))
    n = cut(m1)
    deadline = time.monotonic() + 30
    while api(m2.site, "GET", "/status")["last_received_delta_set"] < n:  # held, not played
        assert time.monotonic() < deadline, log_tail(m2.site)
        time.sleep(0.05)
    assert incoming_files(m2.site) == [f"{n}.ds"]
    m2.umount()  # the next delta set stays pinned on the primary
    (m1.path / "y").write_bytes(os.urandom(100_000))
    saves = set((m1.site / "save").glob("*.save"))
    n2 = cut(m1)
    # overwritten before it was shipped: its pinning snapshot's save volume copies the
    # blocks of delta set n2 (raw blocks of a file)
    with open(m1.path / "y", "r+b") as f:
        f.write(os.urandom(100_000))
        f.flush()
        os.fsync(f.fileno())
    pins = set((m1.site / "save").glob("*.save")) - saves
    assert len(pins) == 1 and next(iter(pins)).stat().st_size >= 100_000, pins
    checked = 0
    for site in (m1.site, m2.site):
        assert stat.S_IMODE(site.stat().st_mode) == 0o700, site
        for p in [site / "volume.img", site / "journal", site / "save", site / "meta.lmdb",
                  site / "meta.lmdb" / "data.mdb"] + list((site / "save").rglob("*")):
            mode = stat.S_IMODE(p.stat().st_mode)
            want = 0o700 if p.is_dir() else 0o600
            assert mode == want, f"{p} is {mode:o}, want {want:o}"
            checked += 1
    assert checked >= 10
    run_repfs("mount", m2.site, m2.path)
    admin(m2.path, "replicate", "policy", "--playback-timeout", "0")
    wait_converged(m1, m2, n2)


def test_start_force_over_a_running_destination_restarts_it_once(mount_site):
    """`replicate start --force` to a destination that is already replicating: a new initial
    copy, then replication as before. The first send task was left running beside the new
    one; both asked the secondary to start playback, the second was refused ('this site is
    not receiving an initial copy') and the destination stopped in error."""
    m1 = mount_site("64M", name="s1")
    m2 = mount_site("64M", name="s2")
    (m1.path / "a").write_bytes(os.urandom(200_000))
    start_replication(m1, m2)
    (m1.path / "b").write_bytes(os.urandom(100_000))
    start_replication(m1, m2, "--force")
    d = status(m1.path)["destinations"]
    assert [(x["name"], x["state"]) for x in d] == [("s2", "replicating")], d
    (m1.path / "c").write_bytes(os.urandom(100_000))
    cut(m1)
    wait_converged(m1, m2)
    assert status(m1.path)["destinations"][0]["state"] == "replicating"
    assert_same_tree(m1.path, m2.path)
    assert [t for t in status(m1.path)["tasks"] if t.startswith("send ")] == ["send s2"]


def test_start_tells_the_primary_died_while_it_waited_for_the_copy(mount_site):
    """The primary's daemon gone while `replicate start` waits for the initial copy: the
    start was done (the copy resumes after the next mount), so the CLI says so, not only
    'no daemon ... is the site mounted?' as if nothing had happened."""
    import signal
    import subprocess
    import sys
    m1 = mount_site("128M", name="s1")
    m2 = mount_site("128M", name="s2")
    (m1.path / "a").write_bytes(os.urandom(40 << 20))
    p = subprocess.Popen([sys.executable, "-c", "from repfs.cli.admin import main; main()",
                          "--site", str(m1.path), "replicate", "start", "--to", str(m2.site)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sec = int((m2.site / "repfs.pid").read_text().split()[0])
    try:
        assert p.stdout.readline().startswith("replicating to s2")  # the start was accepted
        os.kill(sec, signal.SIGSTOP)  # the copy cannot finish meanwhile
        kill9(m1.site)
        out, err = p.communicate(timeout=60)
    finally:
        os.kill(sec, signal.SIGCONT)
    assert p.returncode in (3, 4) and len(err.strip().splitlines()) == 1, err
    assert "replication to s2 started" in err and "goes on by itself" in err, err
    remount(m1)
    wait_converged(m1, m2, timeout=120)
    assert_same_tree(m1.path, m2.path)



def test_stop_does_not_wait_for_a_wedged_destination(mount_site):
    """A destination whose daemon is stopped (SIGSTOP: it takes connections and never
    answers). `replicate stop` waits for the send task to end (7b226b0), and the task's
    thread was blocked in a call on that daemon for the transport's timeouts (60 s, twice):
    the stop took ~2 min, past the CLI's --timeout. Cancelling aborts the connection now."""
    import signal
    m1 = mount_site("64M", name="s1")
    m2 = mount_site("64M", name="s2")
    (m1.path / "a").write_bytes(os.urandom(100_000))
    start_replication(m1, m2)
    sec = int((m2.site / "repfs.pid").read_text().split()[0])
    os.kill(sec, signal.SIGSTOP)
    try:
        time.sleep(1.0)  # the send task asks the stopped daemon for its state
        admin(m1.path, "--timeout", "30", "replicate", "stop")  # exit 4 if it waited longer
    finally:
        os.kill(sec, signal.SIGCONT)
    assert [d["state"] for d in status(m1.path)["destinations"]] == ["stopped"]


def test_a_primary_made_a_secondary_drops_the_snapshot_of_an_unfinished_copy(mount_site):
    """A primary whose initial copy to a wedged destination is under way is made the
    secondary of a third site: its send task ends at once (its connection aborted) and the
    `repl-init-` snapshot of the unfinished copy goes with its pins. Kept, it copied every
    block playback overwrites into the save area, for ever, and a read-only site cannot
    delete it (review of 7b226b0)."""
    import signal
    m1 = mount_site("256M", name="s1")
    m2 = mount_site("256M", name="s2")
    m3 = mount_site("256M", name="s3")
    (m1.path / "a").write_bytes(os.urandom(120 << 20))
    sec = int((m2.site / "repfs.pid").read_text().split()[0])
    admin(m1.path, "replicate", "start", "--to", str(m2.site), "--no-wait")
    os.kill(sec, signal.SIGSTOP)
    try:
        assert [d["state"] for d in status(m1.path)["destinations"]] == ["initial-copy"]
        start_replication(m3, m1, "--force", timeout=60.0)
    finally:
        os.kill(sec, signal.SIGCONT)
    snaps = [s["name"] for s in api(m1.site, "GET", "/snapshots")]
    assert not [n for n in snaps if n.startswith("repl-")], snaps
    (m3.path / "b").write_bytes(os.urandom(1 << 20))
    cut(m3)
    wait_converged(m3, m1)
    assert_same_tree(m3.path, m1.path)
    assert status(m1.path)["save_used_bytes"] == 0


def test_a_primary_back_from_away_does_not_send_to_a_secondary_another_primary_took(
        mount_site):
    """A replicates to B; while A is unmounted, C takes B with `start --force` (the same
    generation: nobody failed over). Back, A must not send on: B's numbers are C's now, and
    A's delta sets would mix two primaries' blocks in B's volume (review of issue 9). A's
    destination goes into error naming the primary B follows; B keeps C's tree."""
    m1 = mount_site("64M", name="s1")
    m2 = mount_site("64M", name="s2")
    m3 = mount_site("64M", name="s3")
    (m1.path / "a").write_bytes(os.urandom(100_000))
    start_replication(m1, m2)
    run_repfs("umount", m1.path)
    (m3.path / "c").write_bytes(os.urandom(100_000))
    start_replication(m3, m2, "--force")
    run_repfs("mount", m1.site, m1.path)
    (m1.path / "b").write_bytes(os.urandom(100_000))
    cut(m1)
    deadline = time.monotonic() + 60
    while (d := status(m1.path)["destinations"][0])["state"] != "error":
        assert time.monotonic() < deadline, log_tail(m1.site)
        time.sleep(0.2)
    assert f"now follows {m3.site}" in d["error"], d
    m1.expect_log("now follows")
    (m3.path / "d").write_bytes(b"more")
    wait_converged(m3, m2, cut(m3))
    assert_same_tree(m3.path, m2.path)
