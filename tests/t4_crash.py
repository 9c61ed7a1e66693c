"""Tier 4: crash tests with several processes.

A writer process works on a mounted site: it creates files and fsyncs them, deletes, renames
and atomically replaces them (write a temporary file, fsync, rename over, fsync the directory),
and in between does unsynced writes, renames and unlinks on scratch files. Every durable step
is logged to a record file outside the mount, fsync'd, *after* the file-system call that made
it durable returned; an intent is logged *before* a step whose outcome a crash may leave
either way. Then the daemon is killed with SIGKILL at a random moment, the dead mount is
cleared, `repfs fsck` must find the site clean (it replays the redo log), and after mounting
again everything the record promises must be there, byte for byte. The same site goes on to
the next round, so damage would accumulate.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


from tests.conftest import fsck_clean, run_repfs

ROUNDS = int(os.environ.get("REPFS_CRASH_ROUNDS", "12"))  # tools/soak runs many more
SITE_SIZE = "96M"
COMMIT_INTERVAL = 0.2  # frequent background commits, so kills land inside commits too

WRITER = r'''
import errno, hashlib, os, random, sys

mnt, record, phase_path, seed, rnd = sys.argv[1:6]
rng = random.Random(int(seed))
S, T = os.path.join(mnt, "s"), os.path.join(mnt, "t")
for d in (S, T):
    try:
        os.mkdir(d)
    except FileExistsError:
        pass
rec = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
phase_fd = os.open(phase_path, os.O_RDWR | os.O_CREAT, 0o644)
live = {}
for line in open(record):
    f = line.split()
    if f and f[0] == "PUT":
        live[f[1]] = f[2]


def phase(c):
    os.pwrite(phase_fd, c.encode(), 0)


def log(line):
    phase("L")
    os.write(rec, (line + "\n").encode())
    os.fsync(rec)


def payload():
    n = rng.choice([0, 1, 100, 4095, 4096, 4097, 20000, 65536, 131072 + 7,
                    rng.randint(1, 600000)])
    return rng.randbytes(n)


def write_file(path, data, excl=True):
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | (os.O_EXCL if excl else 0), 0o644)
    try:
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv[:rng.choice([4096, 65536, 1 << 20])]):]
        phase("F")
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(d):
    phase("D")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


open_fds = []


def scratch():
    """Unsynced changes on scratch files only."""
    name = os.path.join(T, "x%d" % rng.randrange(16))
    other = os.path.join(T, "x%d" % rng.randrange(16))
    k = rng.random()
    phase("W")
    try:
        if k < 0.3:
            fd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o644)
            os.pwrite(fd, payload(), rng.choice([0, 4096, rng.randint(0, 300000)]))
            os.close(fd)
        elif k < 0.4:
            os.truncate(name, rng.randint(0, 200000))
        elif k < 0.55:
            os.rename(name, other)
        elif k < 0.7:
            os.unlink(name)
        elif k < 0.75:
            os.link(name, other)
        elif k < 0.82:
            os.setxattr(name, "user.k", rng.randbytes(rng.randint(0, 300)))
        elif k < 0.9:  # unlink while open, write on
            fd = os.open(name, os.O_RDWR)
            open_fds.append(fd)
            os.unlink(name)
            os.pwrite(fd, payload(), 0)
            if len(open_fds) > 3:
                os.close(open_fds.pop(0))
        else:
            d = os.path.join(T, "dir%d" % rng.randrange(4))
            if os.path.isdir(d):
                for n in os.listdir(d):
                    os.unlink(os.path.join(d, n))
                os.rmdir(d)
            else:
                os.mkdir(d)
                for i in range(rng.randint(1, 40)):
                    open(os.path.join(d, "e%d" % i), "wb").write(b"e" * i)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOSPC, errno.EISDIR,
                           errno.ENOTEMPTY, errno.ENOTDIR):
            raise


n = 0
while True:
    n += 1
    k = rng.random()
    try:
        if k < 0.35 or len(live) < 4:  # a new durable file
            name = "s/%s-%d" % (rnd, n)
            data = payload()
            phase("W")
            write_file(os.path.join(mnt, name), data)
            live[name] = hashlib.sha256(data).hexdigest()
            log("PUT %s %s" % (name, live[name]))
        elif k < 0.45 or len(live) > 40:  # delete, maybe durably
            name = rng.choice(sorted(live))
            log("DEL? %s" % name)
            phase("U")
            os.unlink(os.path.join(mnt, name))
            del live[name]
            if rng.random() < 0.5:
                fsync_dir(S)
                log("GONE %s" % name)
        elif k < 0.55:  # rename, maybe durably
            old = rng.choice(sorted(live))
            new = "s/%s-%d-mv" % (rnd, n)
            log("MV? %s %s" % (old, new))
            phase("R")
            os.rename(os.path.join(mnt, old), os.path.join(mnt, new))
            live[new] = live.pop(old)
            if rng.random() < 0.5:
                fsync_dir(S)
                log("MV %s %s" % (old, new))
        elif k < 0.65:  # atomic replace: temporary file, fsync, rename over, fsync dir
            name = rng.choice(sorted(live))
            data = payload()
            new_sha = hashlib.sha256(data).hexdigest()
            log("REPL? %s %s" % (name, new_sha))
            tmp = os.path.join(T, "tmp-%s-%d" % (rnd, n))
            phase("W")
            write_file(tmp, data)
            phase("R")
            os.rename(tmp, os.path.join(mnt, name))
            fsync_dir(S)
            live[name] = new_sha
            log("PUT %s %s" % (name, new_sha))
        else:
            for _ in range(rng.randint(1, 6)):
                scratch()
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        log("ENOSPC")  # make room: scratch files go; the next rounds delete durable ones
        for d in (T,):
            for name in os.listdir(d):
                p = os.path.join(d, name)
                if os.path.isfile(p):
                    os.unlink(p)
'''


class Record:
    """The writer's record, read back: what each name must (or may) hold."""

    def __init__(self, path: Path):
        self.path = path
        self.lines = []
        if path.exists():
            raw = path.read_bytes()
            cut = raw.rfind(b"\n") + 1  # a line torn by the kill is no promise
            if cut != len(raw):
                path.write_bytes(raw[:cut])
            self.lines = raw[:cut].decode().splitlines()

    def expectations(self) -> tuple[dict, list]:
        """name -> set of acceptable shas (None in the set: may be absent); and the groups of
        names linked by renames that may not have become durable: at most one name of a
        group exists, and at least one unless a deletion touched the group."""
        state: dict[str, set] = {}
        group_of: dict[str, list] = {}  # name -> [names, may_vanish]
        for line in self.lines:
            f = line.split()
            if not f or f[0] == "ENOSPC":
                continue
            if f[0] == "PUT":
                state[f[1]] = {f[2]}
            elif f[0] == "DEL?":
                state[f[1]] = state[f[1]] | {None}
                if f[1] in group_of:
                    group_of[f[1]][1] = True
            elif f[0] == "GONE":
                state[f[1]] = {None}
            elif f[0] == "MV?":
                sha = state[f[1]] - {None}
                state[f[1]] = state[f[1]] | {None}
                state[f[2]] = sha | {None}
                g = group_of.get(f[1]) or [[f[1]], False]
                g[0].append(f[2])
                group_of[f[1]] = group_of[f[2]] = g
            elif f[0] == "MV":
                state[f[2]] = state[f[1]] - {None}
                state[f[1]] = {None}
            elif f[0] == "REPL?":
                state[f[1]] = state[f[1]] | {f[2]}
            else:
                raise AssertionError(f"bad record line {line!r}")
        groups = {id(g): g for g in group_of.values()}
        return state, list(groups.values())

    def rewrite(self, present: dict[str, str]) -> None:
        """After a verified round: only what exists now, as plain PUTs."""
        text = "".join(f"PUT {k} {v}\n" for k, v in sorted(present.items()))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)


def file_sha(p: Path) -> str | None:
    try:
        with open(p, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def daemon_pid(site: Path) -> int:
    return int((site / "repfs.pid").read_text().split("\n", 1)[0])


def wait_gone(pid: int, timeout: float = 60) -> None:
    """Until the killed daemon has been reaped (a zombie still counts as the site's owner)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"daemon {pid} not reaped after SIGKILL"
        time.sleep(0.01)


def crash(site: Path, mnt: Path, writer: subprocess.Popen) -> int:
    pid = daemon_pid(site)
    os.kill(pid, signal.SIGKILL)
    writer.kill()
    writer.wait(timeout=60)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
    deadline = time.monotonic() + 30
    while os.path.ismount(mnt) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.ismount(mnt)
    return pid


def verify(mnt: Path, record: Record, rnd: int) -> dict[str, str]:
    """Check every promise of the record; return the durable files that exist now."""
    state, groups = record.expectations()
    present = {}
    problems = []
    for name, allowed in sorted(state.items()):
        got = file_sha(mnt / name)
        if got not in allowed:
            want = "absent" if allowed == {None} else " or ".join(
                "absent" if a is None else a[:12] for a in allowed)
            problems.append(f"{name}: {'absent' if got is None else got[:12]}, want {want}")
        if got is not None:
            present[name] = got
    for names, may_vanish in groups:
        exist = [n for n in names if (mnt / n).exists()]
        if len(exist) > 1 or (not exist and not may_vanish):
            problems.append(f"renames {' -> '.join(names)}: {exist or 'none'} exist")
    assert not problems, f"round {rnd}: " + "; ".join(problems)
    # the whole tree reads without errors
    for dirpath, _, filenames in os.walk(mnt):
        for n in filenames:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    while f.read(1 << 20):
                        pass
    return present


def clean_stray(mnt: Path, present: dict[str, str]) -> None:
    """Files in s/ that the record does not promise (written, killed before the PUT line)
    would only use up space: remove them, and the writer's temporary files."""
    for name in os.listdir(mnt / "s"):
        if f"s/{name}" not in present:
            os.unlink(mnt / "s" / name)
    for name in os.listdir(mnt / "t"):
        if name.startswith("tmp-"):
            os.unlink(mnt / "t" / name)


def test_kill_daemon_during_writes(tmp_path):
    rng = random.Random(4242)
    site, mnt = tmp_path / "site", tmp_path / "mnt"
    mnt.mkdir()
    run_repfs("mkfs", site, "--size", SITE_SIZE)
    cfg = site / "site.toml"
    text, k = re.subn(r"commit_interval = [0-9.]+", f"commit_interval = {COMMIT_INTERVAL}",
                      cfg.read_text())
    assert k == 1
    cfg.write_text(text)
    writer_py = tmp_path / "writer.py"
    writer_py.write_text(WRITER)
    record_path = tmp_path / "record"
    phase_path = tmp_path / "phase"
    phases: dict[str, int] = {}
    replayed = 0
    promised = 0
    try:
        run_repfs("mount", site, mnt)
        for rnd in range(ROUNDS):
            phase_path.write_bytes(b"-")
            with open(tmp_path / "writer.err", "wb") as err:
                writer = subprocess.Popen(
                    [sys.executable, writer_py, mnt, record_path, phase_path,
                     str(rng.randrange(1 << 30)), str(rnd)], stderr=err)
                # let it run, then kill the daemon wherever it is
                time.sleep(rng.uniform(0.05, 1.5))
                assert writer.poll() is None, (tmp_path / "writer.err").read_text()
                pid = crash(site, mnt, writer)
            ph = phase_path.read_bytes().decode()[:1]
            phases[ph] = phases.get(ph, 0) + 1
            # the site is left as a crash leaves it: fsck must find it clean
            r = run_repfs("fsck", site, check=False)
            assert r.returncode == 0, f"round {rnd}: fsck exit {r.returncode}\n{r.stdout}{r.stderr}"
            replayed += "replayed" in r.stdout
            # (this container's init reaps slowly; until then the zombie looks like a live
            # daemon to `repfs mount`)
            wait_gone(pid)
            run_repfs("mount", site, mnt)
            record = Record(record_path)
            present = verify(mnt, record, rnd)
            promised += len(present)
            record.rewrite(present)
            clean_stray(mnt, present)
        run_repfs("umount", mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    out = fsck_clean(site)
    assert "note:" not in out  # a clean unmount leaves nothing to replay
    log = (site / "repfs.log").read_text()
    assert "Traceback" not in log
    print(f"kills by writer phase: {phases}; fsck replayed the redo log in {replayed} of "
          f"{ROUNDS} rounds; {promised} promised files checked")
    # the kills must have hit the writer in different phases, durable files must exist, and
    # some kill must have left commits in the redo log only (fsck then replays it)
    assert len(phases) >= 2 and promised > 0, (phases, promised)
    assert replayed >= 1, "no kill left a redo log to replay: test too weak"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_mib(path: Path, mib: int, mode: str = "wb") -> None:
    with open(path, mode) as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())


def _status(site: Path) -> dict:
    from tests.t2_repl import api
    return api(site, "GET", "/status")


def _reuse_round(tmp_path: Path, attempt: int) -> tuple[list[str], int]:
    """One try at a crash inside a commit whose freed blocks were already handed out again.
    Returns the problems found and how many writes were refused inside that commit."""
    import errno
    import threading
    site, mnt = tmp_path / f"site{attempt}", tmp_path / f"mnt{attempt}"
    mnt.mkdir()
    run_repfs("mkfs", site, "--size", "128M")
    run_repfs("mount", site, mnt)
    problems = []
    hits = 0
    try:
        _write_mib(mnt / "filler", 90)
        (mnt / "small").write_bytes(b"s")
        (mnt / "Y").write_bytes(b"")
        xdata = os.urandom(8 << 20)
        (mnt / "X").write_bytes(xdata)
        _fsync(mnt / "X")
        try:  # fill the volume, so the next allocations can only use freed blocks
            _write_mib(mnt / "Z", 40)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        _fsync(mnt / "small")
        # lots of dirty data in the image file makes the next commit's volume flush slow
        with open(mnt / "filler", "r+b") as f:
            for _ in range(90):
                f.write(os.urandom(1 << 20))
        os.unlink(mnt / "X")  # not durable yet: a crash may bring X back, but intact
        pid = daemon_pid(site)
        committer = threading.Thread(target=lambda: _ignore_oserror(_fsync, mnt / "small"))
        fd = os.open(mnt / "Y", os.O_WRONLY)
        try:
            deadline = time.monotonic() + 30
            while _status(site)["committing"]:  # any commit from now on frees X's blocks
                assert time.monotonic() < deadline
            c0 = _status(site)["commits"]
            committer.start()  # a commit starts: it frees X's blocks, then flushes slowly
            while True:  # aim: wait until that commit is being written
                st = _status(site)
                running = st["committing"] and st["commits"] == c0
                if running or st["commits"] > c0:
                    break  # (or it is over already: this round misses the window)
                assert time.monotonic() < deadline, "the commit never started"
            while True:  # the first write that gets space gets X's old blocks
                try:
                    os.pwrite(fd, b"Y" * (1 << 20), 0)
                    got_space = True
                except OSError as e:
                    assert e.errno == errno.ENOSPC and time.monotonic() < deadline
                    got_space = False
                # the window: a write issued while the commit that frees X's blocks was being
                # written. It may get space only once that commit is durable (the bug gave it
                # X's blocks at once); a refused one counts if the commit still runs after it
                st = _status(site)
                now = st["committing"] and st["commits"] == c0
                if running and got_space:
                    hits += 1
                    if now:
                        problems.append("a write got space while the commit that freed it "
                                        "was still being written")
                    break
                hits += running and now
                running = now
                if got_space:
                    break
            os.kill(pid, signal.SIGKILL)  # (with the bug: while that commit was being written)
        finally:
            _ignore_oserror(os.close, fd)
            committer.join()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
        r = run_repfs("fsck", site, check=False)
        if r.returncode != 0:
            problems.append(f"fsck after the crash exit {r.returncode}: " + " / ".join(
                ln.strip() for ln in r.stdout.splitlines() if ln.startswith("  ")))
        wait_gone(pid)
        run_repfs("mount", site, mnt)
        if (mnt / "X").exists():
            try:
                got = (mnt / "X").read_bytes()
            except OSError as e:
                problems.append(f"reading X after the crash: {e}")
            else:
                if got != xdata:
                    problems.append("X came back from the crash with other data in it")
        if os.path.ismount(mnt):
            r = run_repfs("umount", mnt, check=False)
            if r.returncode != 0:
                problems.append(f"umount: {r.stderr.strip()}")
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    return problems, hits


def _ignore_oserror(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


def test_blocks_freed_by_a_commit_are_not_reused_before_it_is_durable(tmp_path):
    """A commit frees blocks in its image but must not let the running transaction reuse
    them before its commit point: otherwise a crash inside the commit brings back the freed
    file (and its indirect blocks) holding the new data, with leaked blocks and block
    pointers into nowhere (found by this test; repfs now quarantines such blocks).
    The window is the commit's slow volume flush: the test waits until the status shows that
    commit being written (committing, and the commits count unchanged), then writes; such a
    write may get space only after that commit (the status after it shows the commit done).
    Up to four rounds run until at least one write was issued inside the window."""
    problems, hits = [], 0
    for attempt in range(4):  # the window is a volume flush long: until a write hit it
        problems, n = _reuse_round(tmp_path, attempt)
        hits += n
        if problems or (hits and attempt >= 1):
            break
    assert not problems, "; ".join(problems)
    assert hits >= 1, "no write was issued inside the commit that freed X: test too weak"


HOLDER = r"""
import ctypes, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans become ours
subprocess.run(sys.argv[1:], check=True)
print("mounted", flush=True)
sys.stdin.readline()  # until told, a killed daemon stays an unreaped zombie
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def test_mount_after_a_crash_while_the_daemon_is_unreaped(tmp_path):
    site, mnt = tmp_path / "site", tmp_path / "mnt"
    mnt.mkdir()
    run_repfs("mkfs", site, "--size", "64M")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, sys.executable, "-m", "repfs",
                               "mount", str(site), str(mnt)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mounted"
        pid = daemon_pid(site)
        with open(mnt / "f", "wb") as f:
            f.write(b"durable")
            f.flush()
            os.fsync(f.fileno())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # dead: a zombie of the holder
            with open(f"/proc/{pid}/stat") as st:
                if st.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        r = run_repfs("fsck", site, check=False)
        assert r.returncode == 0, r.stdout + r.stderr  # the lock knows the daemon is gone
        r = run_repfs("mount", site, mnt, check=False)
        assert r.returncode == 0, r.stderr
        assert (mnt / "f").read_bytes() == b"durable"
        run_repfs("umount", mnt)
    finally:
        if holder.poll() is None:
            holder.stdin.write("\n")
            holder.stdin.close()
            holder.wait(timeout=60)
        holder.stdout.close()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
