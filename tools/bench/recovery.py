"""Recovery (issue 10 item 9): resync without a full copy against a full copy and rsync, and
failover time on a small and a huge volume, each against baselines measured in the same run.

Run from the repository root, as root (page caches are dropped before each timed copy):

    .venv/bin/python tools/bench/recovery.py --quick [--json FILE]      # ~3-4 minutes
    .venv/bin/python tools/bench/recovery.py [--json FILE]              # ~10 minutes
    .venv/bin/python tools/bench/recovery.py --only resync --size 10G   # the issue's size

Sections (`--only`):

  resync    a primary P and its secondary S (sites on this host; with --transport rcp, over
            RCP on 127.0.0.1, fixed ports) on volumes of --size filled with 4 MiB files up to
            --fill of the volume; the initial copy; S is stopped (unmounted), P overwrites
            --change (1%) of the volume's blocks in --run-kib (64 KiB) runs at random 4 KiB-aligned
            offsets of random files (fsync), half of them before a cut (a delta set S never
            gets), half after (only in P's change log); then P dies (variant `crash`:
            kill -9, its change log over-marks whole intent regions) or stops cleanly
            (variant `clean`: `repfs umount`). S is mounted and fails over (`failover`, timed),
            overwrites --change of the blocks the same way; P is mounted again and fences
            itself. Ground truth: a hash of every 4 KiB block of S's image at the restart
            point (R), of P's image (O) and of S's image (N) right before the resync: the
            blocks changed on both sides are |O != R or N != R|, the blocks that must cross
            at least |O != N|. Then, page caches dropped before each:
              resync    `repfs-admin resync --peer P`, timed from the command's start until P
                        played the resync (its last_played_delta_set reached the intermediate
                        point, the destination is `replicating`); blocks sent: the
                        destination's resync.copied_blocks (x 4096 bytes; over RCP also the
                        repfs_destination_wire_bytes counter of /metrics);
              rsync     `rsync -a --inplace --stats` of S's mount into a plain directory
                        holding a copy (`cp -a`, not timed) of P's tree as it was before the
                        resync: the same two trees;
              full copy `replicate stop --to P` + `replicate start --to P --force` of the
                        same state, timed until it returns (the copy is played).
            Checked after the resync: P's image equals S's in every block S uses (a hash
            pass; a mismatch is reported as an error, not measured around).
  failover  for each size in --fo-sizes (default 1G and 1T: `repfs mkfs --size 1T` makes a
            sparse 1 TiB image in well under a second), --fo-rounds rounds interleaved, a fresh
            pair each round: replicate start, a 1 MiB file, a cut, played; P killed (kill -9);
            `repfs-admin --site S failover` (no --sync) timed from the command's start to its
            return (the CLI's start-up included; the daemon's part from its log's lines is
            printed as well). Median per size; the ratio 1T / 1G (target: under 1 s, equal).

Nothing here asserts on time. Every mount, daemon and child this run started is stopped, also
on failure, Ctrl-C or SIGTERM; a section that fails prints its error and the run goes on
(exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import rcp as rcpb  # noqa: E402  tools/bench/rcp.py: BenchSite, run, drop_caches, cleanup
from common import lazy_unmount, log, tool, wait_gone  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
BS = 4096
_WEIGHTS = np.random.default_rng(20261130).integers(1, 2 ** 63, size=BS // 8,
                                                   dtype=np.uint64) | np.uint64(1)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", s.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 2G, 10G, 1T)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def human(n: int) -> str:
    for unit, sh in (("T", 40), ("G", 30), ("M", 20)):
        if n >= 1 << sh and n % (1 << sh) == 0:
            return f"{n >> sh}{unit}"
    return str(n)


# ----------------------------------------------------------------------------- ground truth

def block_hashes(img: Path) -> np.ndarray:
    """One 64-bit hash per 4 KiB block of an image file (a random linear map of its 64-bit
    words, mod 2^64; holes read as zeros): vectorised, a few seconds per 10 GiB."""
    n = os.path.getsize(img) // BS
    out = np.empty(n, dtype=np.uint64)
    step = 16384  # blocks per read: 64 MiB
    with open(img, "rb", buffering=0) as f:
        for i in range(0, n, step):
            k = min(step, n - i)
            buf = np.frombuffer(f.read(k * BS), dtype=np.uint64)
            if buf.size != k * BS // 8:
                raise RuntimeError(f"short read of {img} at block {i}")
            with np.errstate(over="ignore"):
                out[i:i + k] = buf.reshape(k, BS // 8) @ _WEIGHTS
    return out


# ----------------------------------------------------------------------------- workload

def fill(mnt: Path, total: int, buf: bytes) -> list[Path]:
    """4 MiB files (1 MiB writes) up to `total` bytes, 64 files per directory; fsync'd."""
    files = []
    for i in range(total // (4 * MiB)):
        d = mnt / f"d{i // 64}"
        d.mkdir(exist_ok=True)
        p = d / f"f{i}"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for j in range(4):
                os.write(fd, buf[j * 4096:] + buf[:j * 4096])  # (no two MiB alike)
        finally:
            os.close(fd)
        files.append(p.relative_to(mnt))
    os.sync()
    return files


def change(mnt: Path, files: list[Path], blocks: int, rng: random.Random, run_blocks: int = 16,
           tag: bytes = b"") -> int:
    """Overwrite `blocks` 4 KiB blocks of the files in runs of `run_blocks` at random 4 KiB
    aligned offsets of random files (runs may overlap: the blocks really changed are counted
    from the images); fsync each file touched. Returns the blocks written."""
    written = 0
    touched: dict[Path, int] = {}
    try:
        while written < blocks:
            rel = rng.choice(files)
            fd = touched.get(rel)
            if fd is None:
                fd = touched[rel] = os.open(mnt / rel, os.O_WRONLY)
            k = min(run_blocks, blocks - written)
            off = rng.randrange(0, 1024 - k + 1) * BS
            os.pwrite(fd, rng.randbytes(k * BS - len(tag)) + tag, off)
            written += k
        for fd in touched.values():
            os.fsync(fd)
    finally:
        for fd in touched.values():
            os.close(fd)
    return written


# ----------------------------------------------------------------------------- sites

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site(root: Path, name: str, size: str, rcp: bool) -> rcpb.BenchSite:
    return rcpb.BenchSite(root, name, size, listen=f"127.0.0.1:{free_port()}" if rcp
                          else "127.0.0.1:0")


def kill9(s: rcpb.BenchSite) -> None:
    os.kill(s.pid, signal.SIGKILL)
    wait_gone(s.pid, 30)
    lazy_unmount(s.mnt)
    if s in rcpb._sites:
        rcpb._sites.remove(s)


def remount(s: rcpb.BenchSite) -> None:
    lazy_unmount(s.mnt)
    for _ in range(100):
        if not os.path.ismount(s.mnt):
            break
        time.sleep(0.05)
    s.mount()


def target(s: rcpb.BenchSite, rcp: bool) -> str:
    return s.listen if rcp else str(s.site)


def dest(s: rcpb.BenchSite, name: str) -> dict | None:
    return next((d for d in s.status()["destinations"] if d["name"] == name), None)


def wait_for(fn, what: str, limit: float = 1800, every: float = 0.05):
    deadline = time.monotonic() + limit
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {limit:.0f} s waiting for {what}")
        time.sleep(every)


def wire_bytes(s: rcpb.BenchSite, name: str) -> float | None:
    """repfs_destination_wire_bytes(_total) of destination `name` from the site's /metrics."""
    import http.client
    conn = http.client.HTTPConnection(*s.ctl, timeout=60)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {s.token}"})
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith("repfs_destination_wire_bytes") and f'"{name}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def start_repl(p: rcpb.BenchSite, s: rcpb.BenchSite, rcp: bool, force: bool = False) -> float:
    t0 = time.monotonic()
    p.admin("replicate", "start", "--to", target(s, rcp),
            *(["--group", rcpb.GROUP] if rcp else []), *(["--force"] if force else []),
            timeout=3600)
    return time.monotonic() - t0


def timed_admin(s: rcpb.BenchSite, *args, timeout=600) -> tuple[float, str]:
    t0 = time.monotonic()
    out = rcpb.run([tool("repfs-admin"), "--site", s.mnt, *args], timeout=timeout).stdout
    return time.monotonic() - t0, out


# ----------------------------------------------------------------------------- resync

def start_profile(a, tag: str, sites: dict) -> list:
    """py-spy (the venv's, or on PATH) of each daemon while the resync runs: --profile DIR."""
    if not a.profile:
        return []
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if not spy:
        log("  (no py-spy: not profiled)")
        return []
    Path(a.profile).mkdir(parents=True, exist_ok=True)
    out = []
    for role, s in sites.items():
        f = Path(a.profile) / f"resync-{tag}-{role}.txt"
        out.append(rcpb.spawn([spy, "record", "-p", s.pid, "-r", "100", "--threads",
                               "--format", "raw", "-o", f]))
    time.sleep(1.0)  # (py-spy attached)
    return out


def stop_profile(spies: list) -> None:
    for sp in spies:
        sp.send_signal(signal.SIGINT)
        try:
            sp.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            sp.kill()
            sp.communicate()
        if sp in rcpb._procs:
            rcpb._procs.remove(sp)


def timeline(wall0: float, sites: dict) -> list[str]:
    """The daemons' log lines (INFO and up) since `wall0`, in time order, as offsets."""
    from datetime import datetime
    lines = []
    for role, s in sites.items():
        for line in (s.site / "repfs.log").read_text(errors="replace").splitlines():
            try:
                ts = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if ts >= wall0 - 0.01:
                lines.append((ts, f"{ts - wall0:7.2f} s  {role}: {line[24:][:150]}"))
    return [x for _, x in sorted(lines)]


def resync_round(root: Path, a, variant: str, rcp: bool, out: dict) -> dict:
    tag = f"{variant}-{'rcp' if rcp else 'local'}"
    d = root / tag
    d.mkdir()
    size = human(a.size)
    log(f"\n-- resync, {tag}: {size} volumes, fill {a.fill:.0%}, change {a.change:.1%} of the "
        f"blocks on each side (load {rcpb.loadavg()}) --")
    r: dict = {"variant": variant, "transport": "rcp" if rcp else "local", "size": a.size}
    out.setdefault("rounds", []).append(r)
    rng = random.Random(a.seed)
    p, s = site(d, "P", size, rcp), site(d, "S", size, rcp)
    p.admin("replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    buf = os.urandom(MiB)
    t0 = time.monotonic()
    files = fill(p.mnt, int(a.size * a.fill), buf)
    r["fill_s"] = time.monotonic() - t0
    r["initial_copy_s"] = start_repl(p, s, rcp)
    log(f"  filled {len(files)} files of 4 MiB in {r['fill_s']:.1f} s; initial copy "
        f"{r['initial_copy_s']:.1f} s")
    st = p.status()
    wait_for(lambda: all(x["played_delta_set"] >= st["last_cut_delta_set"]
                         for x in p.status()["destinations"]), "the initial copy played")
    nblocks = a.size // BS
    k = int(nblocks * a.change)
    s.down()  # the secondary stops: what P cuts and writes now, it never gets
    hr = block_hashes(s.site / "volume.img")
    rb = a.run_kib // 4
    r["old_written_blocks"] = change(p.mnt, files, k // 2, rng, rb)
    p.admin("replicate", "deltaset")
    r["old_written_blocks"] += change(p.mnt, files, k - k // 2, rng, rb)
    os.sync()
    if variant == "crash":
        kill9(p)
    else:
        p.down()
    s.mount()
    r["failover_s"], _ = timed_admin(s, "failover")
    r["new_written_blocks"] = change(s.mnt, files, k, rng, rb)
    os.sync()
    remount(p)
    wait_for(lambda: p.status().get("fenced"), "the old primary's fence", limit=120)
    rdir = d / "rsync-dst"
    t0 = time.monotonic()
    rcpb.run(["cp", "-a", f"{p.mnt}/.", str(rdir)], timeout=3600)
    r["cp_old_tree_s"] = time.monotonic() - t0
    os.sync()
    ho, hn = block_hashes(p.site / "volume.img"), block_hashes(s.site / "volume.img")
    old_changed, new_changed = ho != hr, hn != hr
    r["old_changed_blocks"] = int(old_changed.sum())
    r["new_changed_blocks"] = int(new_changed.sum())
    r["changed_blocks"] = int((old_changed | new_changed).sum())
    r["differ_blocks"] = int((ho != hn).sum())
    del hr
    log(f"  failover {r['failover_s']:.2f} s; blocks written: old primary "
        f"{r['old_written_blocks']}, new {r['new_written_blocks']}; changed (images vs the "
        f"restart point): old {r['old_changed_blocks']}, new {r['new_changed_blocks']}, "
        f"union {r['changed_blocks']}; differ old vs new {r['differ_blocks']}")
    name = p.listen if rcp else p.site.name
    plan = json.loads(s.admin("--json", "resync", "--peer", target(p, rcp), "--dry-run"))
    r["dry_run"] = {k2: plan.get(k2) for k2 in ("old_primary_marked_blocks",
                                                 "old_primary_changed_blocks",
                                                 "new_primary_changed_blocks", "blocks",
                                                 "full_copy")}
    rcpb.drop_caches()
    spies = start_profile(a, tag, {"new": s, "old": p})
    wall0 = time.time()
    t0 = time.monotonic()
    ans = json.loads(rcpb.run([tool("repfs-admin"), "--site", s.mnt, "--json", "resync",
                               "--peer", target(p, rcp)], timeout=3600).stdout)
    r["resync_cmd_s"] = time.monotonic() - t0
    if ans.get("full_copy"):
        raise RuntimeError(f"the resync was a full copy: {ans.get('warning')}")
    stamp = ans["stamp"]
    wait_for(lambda: (x := dest(s, name)) and x["state"] == "replicating"
             and p.status()["last_played_delta_set"] >= stamp, "the resync played",
             every=0.02)
    r["resync_s"] = time.monotonic() - t0
    stop_profile(spies)
    r["timeline"] = timeline(wall0, {"new": s, "old": p})
    for line in r["timeline"]:
        log(f"    {line}")
    dd = dest(s, name)
    r["resync_blocks"] = (dd.get("resync") or {}).get("blocks")
    r["copied_blocks"] = (dd.get("resync") or {}).get("copied_blocks")
    if rcp:
        r["wire_bytes"] = wire_bytes(s, name)
    r["wire_ratio"] = r["copied_blocks"] / r["changed_blocks"] if r["changed_blocks"] else None
    log(f"  resync {r['resync_s']:.2f} s (the command {r['resync_cmd_s']:.2f} s); blocks "
        f"sent {r['copied_blocks']} of {r['resync_blocks']} listed (dry run: old primary "
        f"marked {plan.get('old_primary_marked_blocks')}, differing granules' blocks "
        f"{plan.get('old_primary_changed_blocks')}, new {plan.get('new_primary_changed_blocks')})"
        f"; {r['wire_ratio']:.3f}x the changed blocks, "
        f"{r['copied_blocks'] / max(1, r['differ_blocks']):.3f}x the differing blocks"
        + (f"; /metrics wire bytes {r['wire_bytes']:.0f} = "
           f"{r['wire_bytes'] / (r['changed_blocks'] * BS):.3f}x the changed blocks' bytes"
           if rcp and r.get("wire_bytes") else ""))
    # check: the old primary now holds the new primary's blocks wherever that one differs
    os.sync()
    ho, hn = block_hashes(p.site / "volume.img"), block_hashes(s.site / "volume.img")
    r["after_differ_blocks"] = int((ho != hn).sum())
    log(f"  after the resync the images differ in {r['after_differ_blocks']} blocks")
    del ho, hn
    # rsync of the same two trees
    rcpb.drop_caches()
    t0 = time.monotonic()
    rs = rcpb.run(["rsync", "-a", "--inplace", "--stats", f"{s.mnt}/", f"{rdir}/"],
                  timeout=3600)
    r["rsync_s"] = time.monotonic() - t0
    m = re.search(r"Total bytes sent: ([\d,.]+)", rs.stdout)
    r["rsync_sent"] = int(re.sub(r"[,.]", "", m.group(1))) if m else None
    m = re.search(r"Number of regular files transferred: ([\d,.]+)", rs.stdout)
    r["rsync_files"] = int(re.sub(r"[,.]", "", m.group(1))) if m else None
    shutil.rmtree(rdir)
    log(f"  rsync -a --inplace {r['rsync_s']:.2f} s ({r['rsync_files']} files transferred, "
        f"{(r['rsync_sent'] or 0) / MiB:.0f} MiB sent)")
    # a full copy of the same state
    s.admin("replicate", "stop", "--to", name)
    rcpb.drop_caches()
    r["full_copy_s"] = start_repl(s, p, rcp, force=True)
    dd = dest(s, name)
    r["full_copy_blocks"] = ((dd or {}).get("copy_progress") or {}).get("total_blocks")
    log(f"  full copy (replicate start --force) {r['full_copy_s']:.2f} s")
    log(f"  => resync vs full copy {r['full_copy_s'] / r['resync_s']:.1f}x faster, vs rsync "
        f"{r['rsync_s'] / r['resync_s']:.1f}x faster")
    rcpb.down_all(s, p)
    shutil.rmtree(d, ignore_errors=True)
    return r


def sec_resync(root: Path, a, out: dict) -> None:
    table = out.setdefault("table", [])
    for variant in a.variants:
        for rcp in a.transports:
            tag = f"{variant}, {'RCP 127.0.0.1' if rcp else 'local'}, {human(a.size)}"
            try:
                r = resync_round(root, a, variant, rcp, out)
            except Exception as e:  # noqa: BLE001 - one failed round must not stop the run
                log(f"  resync {tag} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stdout)
                table.append((f"resync ({tag}): ERROR {e}", None, None, None, ""))
                rcpb.cleanup_all()
                continue
            table.append((f"resync ({tag}): blocks sent / blocks changed on both sides",
                          r["wire_ratio"], None, "<= 1.05", "x"))
            table.append((f"resync ({tag}): blocks sent / blocks that differ",
                          r["copied_blocks"] / max(1, r["differ_blocks"]), None, None, "x"))
            if r.get("wire_bytes"):
                table.append((f"resync ({tag}): /metrics wire bytes / changed bytes",
                              r["wire_bytes"] / (r["changed_blocks"] * BS), None, "<= 1.05",
                              "x"))
            table.append((f"resync ({tag}): time until played", r["resync_s"], None, None, "s"))
            table.append((f"resync ({tag}): full copy time / resync time",
                          r["full_copy_s"] / r["resync_s"], None, ">= 10", "x"))
            table.append((f"resync ({tag}): rsync -a --inplace time / resync time",
                          r["rsync_s"] / r["resync_s"], None, ">= 10", "x"))
            table.append((f"resync ({tag}): failover time (a full volume)", r["failover_s"],
                          None, "< 1", "s"))
            if r["after_differ_blocks"]:
                table.append((f"resync ({tag}): ERROR the images differ in "
                              f"{r['after_differ_blocks']} blocks after it", None, None, None,
                              ""))


# ----------------------------------------------------------------------------- failover

def daemon_failover_s(s: rcpb.BenchSite) -> float | None:
    """From the daemon's log: the first failover line to 'is now the primary' (seconds)."""
    from datetime import datetime
    t = {}
    for line in (s.site / "repfs.log").read_text(errors="replace").splitlines():
        if "repfs.recovery.failover" in line:
            try:
                ts = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            t.setdefault("first", ts)
            t["last"] = ts
    return t["last"] - t["first"] if len(t) == 2 else None


def failover_round(root: Path, size: int, i: int) -> dict:
    d = root / f"fo-{human(size)}-{i}"
    d.mkdir()
    p, s = site(d, "P", human(size), False), site(d, "S", human(size), False)
    try:
        p.admin("replicate", "policy", "--timeout", "3600", "--hwm", "100G")
        rcpb.write_file(p.mnt / "a", 1, os.urandom(MiB))
        start_repl(p, s, False)
        rcpb.write_file(p.mnt / "b", 1, os.urandom(MiB))
        n = json.loads(p.admin("--json", "replicate", "deltaset"))["delta_set"]
        wait_for(lambda: all(x["played_delta_set"] >= n for x in p.status()["destinations"]),
                 "delta set played")
        kill9(p)
        secs, text = timed_admin(s, "failover")
        st = s.status()
        if st["role"] != "primary":
            raise RuntimeError(f"not the primary after failover: {text}")
        status_s, _ = timed_admin(s, "status")  # the CLI's own cost: start-up, one request
        return {"size": size, "cli_s": secs, "daemon_s": daemon_failover_s(s),
                "status_cli_s": status_s,
                "rss_kib": int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{s.pid}/status")
                                         .read_text()).group(1))}
    finally:
        rcpb.down_all(s)
        shutil.rmtree(d, ignore_errors=True)


def sec_failover(root: Path, a, out: dict) -> None:
    res = {sz: [] for sz in a.fo_sizes}
    for i in range(a.fo_rounds):
        for sz in a.fo_sizes:  # interleaved: the load changes the same way for each
            r = failover_round(root, sz, i)
            res[sz].append(r)
            log(f"  round {i + 1}, {human(sz)}: failover {r['cli_s']:.3f} s (the daemon's log: "
                f"{r['daemon_s'] if r['daemon_s'] is None else round(r['daemon_s'], 3)} s; "
                f"repfs-admin status right after {r['status_cli_s']:.3f} s; "
                f"RSS {r['rss_kib'] // 1024} MiB) (load {rcpb.loadavg()})")
    out["failover"] = {human(k): v for k, v in res.items()}
    table = out.setdefault("table", [])
    base = med([r["cli_s"] for r in res[a.fo_sizes[0]]])
    for sz in a.fo_sizes:
        m = med([r["cli_s"] for r in res[sz]])
        rounds = ", ".join(f"{r['cli_s']:.2f}" for r in res[sz])
        table.append((f"failover, {human(sz)} volume, median of {a.fo_rounds} "
                      f"(rounds {rounds})", m,
                      m / base if sz != a.fo_sizes[0] else None, "< 1", "s"))
        dm = med([r["daemon_s"] for r in res[sz]])
        table.append((f"  failover, {human(sz)}: the daemon's part (its log)", dm, None, None,
                      "s"))
        table.append((f"  failover, {human(sz)}: repfs-admin status (the CLI's own cost)",
                      med([r["status_cli_s"] for r in res[sz]]), None, None, "s"))


# ----------------------------------------------------------------------------- main

SECTIONS = {"resync": sec_resync, "failover": sec_failover}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="resync on 1G volumes, crash variant only; 2 failover rounds")
    p.add_argument("--only", default="resync,failover", help="resync,failover")
    p.add_argument("--size", type=parse_size, help="resync: volume size (default 2G, --quick "
                   "1G; the issue's is 10G: ~10 minutes a round here)")
    p.add_argument("--fill", type=float, default=0.5, help="resync: fraction of the volume "
                   "filled with files (default 0.5)")
    p.add_argument("--change", type=float, default=0.01, help="resync: fraction of the "
                   "volume's blocks overwritten on each side (default 0.01)")
    p.add_argument("--run-kib", type=int, default=64, help="resync: each overwrite's size "
                   "in KiB, a multiple of 4 up to 4096 (default 64: 16 blocks)")
    p.add_argument("--variants", default=None, help="resync: crash,clean (default both; "
                   "--quick crash)")
    p.add_argument("--transport", default="local", help="resync: local,rcp (default local)")
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--fo-sizes", default="1G,1T", help="failover: volume sizes (default 1G,1T)")
    p.add_argument("--fo-rounds", type=int, help="failover: rounds per size (default 5, "
                   "--quick 2)")
    p.add_argument("--profile", metavar="DIR", help="resync: py-spy (raw, 100 Hz, threads) "
                   "of both daemons during each timed resync, into DIR")
    p.add_argument("--tmpdir", help="where to make the temp directory (default $TMPDIR or /tmp)")
    p.add_argument("--json", help="also write every number to this file")
    a = p.parse_args(argv)
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    for x in only:
        if x not in SECTIONS:
            p.error(f"unknown section {x!r} (choose from {', '.join(SECTIONS)})")
    a.size = a.size or (GiB if a.quick else 2 * GiB)
    a.variants = [v.strip() for v in (a.variants or ("crash" if a.quick else "crash,clean"))
                  .split(",") if v.strip()]
    for v in a.variants:
        if v not in ("crash", "clean"):
            p.error(f"unknown variant {v!r} (crash, clean)")
    a.transports = []
    for t in a.transport.split(","):
        if t.strip() not in ("local", "rcp"):
            p.error(f"unknown transport {t!r} (local, rcp)")
        a.transports.append(t.strip() == "rcp")
    try:
        a.fo_sizes = [parse_size(x) for x in a.fo_sizes.split(",") if x.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    a.fo_rounds = a.fo_rounds or (2 if a.quick else 5)
    if not 0 < a.fill < 0.95 or not 0 < a.change < 0.2 or a.fo_rounds < 1 or not a.fo_sizes:
        p.error("--fill must be in (0, 0.95), --change in (0, 0.2), --fo-rounds >= 1")
    if a.run_kib % 4 or not 4 <= a.run_kib <= 4096:
        p.error("--run-kib must be a multiple of 4 in [4, 4096]")
    if a.size % (4 * MiB):
        p.error("--size must be a multiple of 4 MiB")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="repfs-recovery-", dir=a.tmpdir)).resolve()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    head = [f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}",
            f"date:    {started}; nproc {os.cpu_count()}; commit {rcpb.commit()}",
            f"load:    {rcpb.loadavg()} (1/5/15 min load average at the start)",
            f"tmpdir:  {root}",
            f"resync:  {human(a.size)} volumes, fill {a.fill:.0%}, change {a.change:.1%} each "
            f"side in {a.run_kib} KiB writes, variants {','.join(a.variants)}, transport "
            f"{a.transport}",
            f"failover: sizes {', '.join(human(x) for x in a.fo_sizes)}, {a.fo_rounds} rounds"]
    for line in head:
        log(line)
    out: dict = {"command": getattr(sys, "orig_argv", sys.argv), "header": head}
    failed = False
    try:
        for name, fn in SECTIONS.items():
            if name not in only:
                continue
            log(f"\n== {name} ==  ({time.strftime('%H:%M:%S')}, load {rcpb.loadavg()})")
            t0 = time.monotonic()
            try:
                fn(root, a, out)
            except Exception as e:  # noqa: BLE001
                failed = True
                log(f"  {name} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stdout)
                out.setdefault("table", []).append((f"{name}: ERROR {e}", None, None, None, ""))
            finally:
                rcpb.cleanup_all()
            log(f"  ({name}: {time.monotonic() - t0:.0f} s)")
    except KeyboardInterrupt:
        failed = True
        log("\ninterrupted: tearing down")
    finally:
        rcpb.cleanup_all()
        shutil.rmtree(root, ignore_errors=True)
    log("\n== issue 10 recovery (every baseline from this run) ==")
    for title, v, ratio, tgt, unit in out.get("table", []):
        if v is None:
            failed = True
            log(f"  {title}")
            continue
        met = ""
        if tgt == "<= 1.05":
            met = "met" if v <= 1.05 else "MISSED"
        elif tgt == ">= 10":
            met = "met" if v >= 10 else "MISSED"
        elif tgt == "< 1":
            met = "met" if v < 1 else "MISSED"
        log(f"  {title:<78} {v:>9.3f} {unit:<2}" + (f"  ratio {ratio:.2f}x" if ratio else "")
            + (f"  target {tgt}: {met}" if tgt else ""))
    log(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S %Z')} (started {started}); load "
        f"average now {rcpb.loadavg()}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
