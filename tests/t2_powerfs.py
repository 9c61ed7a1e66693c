"""The power-cut test file system (tests/powerfs.py) keeps its promises.

The durability model on its state object (no FUSE), then the same through a real mount:
fsync'd data and fsync'd directory entries survive a cut, nothing else does (or, with a random
cut, a part of it in order and never a torn page), fault rules fire where and when they say,
and LMDB (mmap reads, pwrite + fdatasync commits) works on it.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess

import pytest

from tests.powerfs import PAGE, ROOT, PowerFS, State, mounted


def _reopen(st: State, keep="none", seed=None) -> tuple[State, dict]:
    out = st.freeze(keep, seed)
    return State(st.backing), out


def _content(st: State, path: bytes) -> bytes | None:
    ino = ROOT
    try:
        for part in path.split(b"/"):
            ino = st.lookup(ino, part)
    except OSError:
        return None
    return st.read(ino, 0, 1 << 30)


def test_state_fsync_file_and_directory(tmp_path):
    st = State(tmp_path / "b")
    d = st.make(ROOT, b"d", "d", 0o40755)
    a = st.make(d, b"a", "f", 0o100644)
    st.write(a, 0, b"synced")
    st.fsync(a)
    st.fsyncdir(d)
    st.write(a, 6, b" lost")
    st.truncate(a, 3)
    b = st.make(d, b"b", "f", 0o100644)  # created and fsync'd, directory not: may vanish
    st.write(b, 0, b"b")
    st.fsync(b)
    st.unlink(d, b"a")  # not durable: a comes back
    st, out = _reopen(st)
    assert _content(st, b"d/a") == b"synced"
    assert _content(st, b"d/b") is None
    assert out["entries_kept"] == 0 and out["writes_kept"] == 0
    assert sorted(p.name for p in st.files.iterdir()) == [str(st.lookup(d, b"a"))]


def test_state_rename_is_atomic_and_durable_only_after_fsyncdir(tmp_path):
    st = State(tmp_path / "b")
    a = st.make(ROOT, b"a", "f", 0o100644)
    st.write(a, 0, b"old")
    st.fsync(a)
    st.fsyncdir(ROOT)
    t = st.make(ROOT, b"tmp", "f", 0o100644)
    st.write(t, 0, b"new")
    st.fsync(t)
    st.rename(ROOT, b"tmp", ROOT, b"a")
    st, _ = _reopen(st)
    assert _content(st, b"a") == b"old" and _content(st, b"tmp") is None
    t = st.make(ROOT, b"tmp", "f", 0o100644)
    st.write(t, 0, b"new")
    st.fsync(t)
    st.rename(ROOT, b"tmp", ROOT, b"a")
    st.fsyncdir(ROOT)
    st, _ = _reopen(st)
    assert _content(st, b"a") == b"new" and _content(st, b"tmp") is None
    # random cuts keep a prefix of the entry log: a rename is never half done
    outcomes = set()
    for seed in range(30):
        for name in (b"x", b"y"):
            if _content(st, name) is not None:
                st.unlink(ROOT, name)
        if _content(st, b"z") is not None:
            st.rename(ROOT, b"z", ROOT, b"a")
        x = st.make(ROOT, b"x", "f", 0o100644)
        st.write(x, 0, b"x")
        st.fsync(x)
        st.fsyncdir(ROOT)
        st.rename(ROOT, b"x", ROOT, b"y")
        st.rename(ROOT, b"a", ROOT, b"z")
        st.rename(ROOT, b"z", ROOT, b"a")
        st, _ = _reopen(st, "random", seed)
        x, y = _content(st, b"x"), _content(st, b"y")
        assert (x is None) != (y is None) and (x or y) == b"x"
        assert _content(st, b"a") == b"new" or _content(st, b"z") == b"new"
        outcomes.add(x is None)
    assert outcomes == {True, False}


def test_state_random_cut_keeps_whole_pages_in_order(tmp_path):
    st = State(tmp_path / "b")
    f = st.make(ROOT, b"f", "f", 0o100644)
    st.fsyncdir(ROOT)
    npages = 8
    st.write(f, 0, b"A" * (npages * PAGE))
    st.fsync(f)
    kinds = set()
    for seed in range(40):
        st.write(f, 0, b"B" * (npages * PAGE))  # one write, torn only at page boundaries
        st.write(f, npages * PAGE, b"C" * 100)  # extends the file
        st, out = _reopen(st, "random", seed)
        data = _content(st, b"f")
        pages = [data[i:i + PAGE] for i in range(0, npages * PAGE, PAGE)]
        assert all(p in (b"A" * PAGE, b"B" * PAGE) for p in pages), seed
        assert data[npages * PAGE:] in (b"", b"C" * 100)
        kinds.add("".join(p[:1].decode() for p in pages) + ("C" if len(data) > npages * PAGE
                                                             else ""))
        st.write(f, 0, b"A" * (npages * PAGE))
        st.truncate(f, npages * PAGE)
        st.fsync(f)
    # all kept, none kept, and torn (a mixture) all occur
    assert "A" * npages in kinds and "B" * npages + "C" in kinds
    assert any("A" in k and "B" in k for k in kinds)


def test_state_truncate_undo_and_fault_rules(tmp_path):
    st = State(tmp_path / "b")
    d = st.make(ROOT, b"d", "d", 0o40755)
    f = st.make(d, b"f", "f", 0o100644)
    st.write(f, 0, b"0123456789")
    st.fsync(f)
    st.fsyncdir(ROOT)
    st.fsyncdir(d)
    st.truncate(f, 4)
    st.write(f, 8, b"xy")
    st.truncate(f, 20)
    rule = st.add_fault("d/*", "write", "ENOSPC", skip=1, count=2)
    st.check("write", "d/f")
    for _ in range(2):
        with pytest.raises(OSError) as e:
            st.check("write", "d/f")
        assert e.value.errno == errno.ENOSPC
    st.check("write", "d/f")
    st.check("read", "d/f")
    st.check("write", "e/f")
    assert st.stats()["faults"] == {rule: 2}
    with pytest.raises(ValueError):
        st.add_fault("*", "frobnicate")
    st, _ = _reopen(st)
    assert _content(st, b"d/f") == b"0123456789"


@pytest.fixture
def pf(tmp_path):
    p = PowerFS(tmp_path / "backing", tmp_path / "mnt")
    p.start()
    yield p
    p.kill()
    assert not mounted(tmp_path / "mnt")


def _fsync_path(path, flags=os.O_RDONLY):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_mount_cut_keeps_exactly_what_was_made_durable(pf):
    m = pf.mnt
    (m / "d").mkdir()
    with open(m / "d" / "kept", "wb") as f:
        f.write(b"kept")
        f.flush()
        os.fdatasync(f.fileno())
    fd = os.open(m / "d" / "osync", os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
    os.write(fd, b"dsync")
    os.close(fd)
    _fsync_path(m / "d")
    with open(m / "d" / "kept", "ab") as f:
        f.write(b" and lost")
    (m / "d" / "new").write_bytes(b"new")
    os.rename(m / "d" / "osync", m / "d" / "renamed")
    subprocess.run(["sync"], check=True)  # syncfs/sync do not reach FUSE: no effect
    assert (m / "d" / "kept").read_bytes() == b"kept and lost"
    assert pf.stats()["pending_entries"] == 2
    out = pf.cut("none")
    assert out["entries"] == 2 and out["writes_kept"] == 0
    pf.start()
    assert sorted(os.listdir(m / "d")) == ["kept", "osync"]
    assert (m / "d" / "kept").read_bytes() == b"kept"
    assert (m / "d" / "osync").read_bytes() == b"dsync"
    # a clean stop keeps everything
    (m / "d" / "new").write_bytes(b"new")
    pf.stop()
    pf.start()
    assert (m / "d" / "new").read_bytes() == b"new"


def test_mount_freeze_fails_everything_after_the_cut(pf):
    m = pf.mnt
    fd = os.open(m / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before")
        pf.freeze("all")
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"after", 100)
        assert e.value.errno == errno.EIO
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    pf.stop()
    pf.start()
    assert (m / "f").read_bytes() == b"before"


def test_mount_fault_rules(pf):
    m = pf.mnt
    (m / "s").mkdir()
    rid = pf.add_fault("s/vol*", "write", errno="EIO", skip=1, count=1)
    sid = pf.add_fault("s/vol*", "fsync", errno="ENOSPC")
    with open(m / "s" / "vol.img", "wb", buffering=0) as f:
        f.write(b"a")
        with pytest.raises(OSError) as e:
            f.write(b"b")
        assert e.value.errno == errno.EIO
        f.write(b"c")
        with pytest.raises(OSError) as e:
            os.fsync(f.fileno())
        assert e.value.errno == errno.ENOSPC
        (m / "s" / "other").write_bytes(b"fine")
        assert pf.stats()["faults"] == {str(rid): 1, str(sid): 1}
        pf.clear_faults()
        os.fsync(f.fileno())
    _fsync_path(m / "s")
    _fsync_path(m)
    pf.add_fault("s/new", "create", errno="EACCES")
    with pytest.raises(PermissionError):
        (m / "s" / "new").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown errno"):
        pf.add_fault("*", "write", errno="EWHATEVER")
    pf.cut("none")
    pf.start()
    assert (m / "s" / "vol.img").read_bytes() == b"ac"


def test_mount_random_cut_of_a_large_file(pf):
    """Many unsynced writes to one file: a random cut keeps some of them, in whole pages."""
    m = pf.mnt
    rng = random.Random(7)
    base = rng.randbytes(64 * PAGE)
    with open(m / "v", "wb") as f:
        f.write(base)
        os.fsync(f.fileno())
    _fsync_path(m)
    seen = set()
    for seed in range(6):
        new = rng.randbytes(64 * PAGE)
        with open(m / "v", "r+b", buffering=0) as f:
            for off in range(0, len(new), 3 * PAGE):
                f.seek(off)
                f.write(new[off:off + 3 * PAGE])
        pf.cut("random", seed)
        pf.start()
        got = (m / "v").read_bytes()
        assert len(got) == len(base)
        pages = []
        for i in range(0, len(got), PAGE):
            p = got[i:i + PAGE]
            assert p in (base[i:i + PAGE], new[i:i + PAGE]), f"seed {seed} page {i // PAGE}"
            pages.append(p == new[i:i + PAGE])
        seen.add(tuple(pages))
        base = got
    assert len(seen) >= 2


def test_mount_lmdb_commits_survive_and_uncommitted_do_not(pf):
    import lmdb
    m = pf.mnt
    (m / "site").mkdir()
    _fsync_path(m)
    env = lmdb.open(str(m / "site" / "meta.lmdb"), map_size=1 << 30, max_dbs=4)
    # LMDB never fsyncs its directory: without this, its files may vanish (as on any file
    # system that does not journal a create with the file's fsync)
    _fsync_path(m / "site" / "meta.lmdb")
    with env.begin(write=True) as t:
        t.put(b"a", b"1" * 5000)
    env.close()
    env = lmdb.open(str(m / "site" / "meta.lmdb"), map_size=1 << 30, max_dbs=4, sync=False,
                    metasync=False)
    with env.begin(write=True) as t:  # not synced: may not survive
        t.put(b"b", b"2" * 5000)
    with env.begin() as t:
        assert t.get(b"b") == b"2" * 5000
    env.close()
    pf.cut("none")
    pf.start()
    env = lmdb.open(str(m / "site" / "meta.lmdb"), map_size=1 << 30, max_dbs=4)
    try:
        with env.begin() as t:
            assert t.get(b"a") == b"1" * 5000
            assert t.get(b"b") is None
    finally:
        env.close()


def test_mount_armed_cut_hits_the_aimed_call(pf):
    m = pf.mnt
    (m / "j").write_bytes(b"")
    _fsync_path(m)
    fd = os.open(m / "j", os.O_WRONLY)
    for i in range(3):
        os.write(fd, b"%d" % i)
        os.fsync(fd)
    pf.arm_cut("j", "fsync|fsyncdir", skip=2, keep="none")
    for i in range(3, 5):
        os.write(fd, b"%d" % i)
        os.fsync(fd)
    assert pf.stats()["cut"] is None
    os.write(fd, b"5")
    with pytest.raises(OSError) as e:
        os.fsync(fd)  # the third fsync after arming: the power goes off first
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError):
        os.close(fd)  # (the flush at close fails too: the power is off)
    got = pf.wait_frozen(5)
    assert got["path"] == "j" and got["op"] == "fsync" and got["writes"] == 1
    pf.stop()
    pf.start()
    assert (m / "j").read_bytes() == b"01234"


def test_mount_delay_rule_fails_nothing(pf):
    m = pf.mnt
    rid = pf.add_fault("slow*", "write", delay=0.01)
    with open(m / "slow", "wb", buffering=0) as f:
        for i in range(3):
            f.write(b"%d" % i)
    (m / "fast").write_bytes(b"x")
    assert (m / "slow").read_bytes() == b"012"
    assert pf.stats()["faults"] == {str(rid): 3}


def test_mount_corrupt_rule_flips_a_bit_on_the_way_up(pf):
    """errno="corrupt": the matching read returns one flipped bit; the file stays intact and
    a read after the next open gets the right bytes (the damaged cached pages are dropped)."""
    m = pf.mnt
    data = os.urandom(300_000)
    (m / "c").write_bytes(data)
    pf.stop()  # a clean stop and a new mount: nothing of "c" in the kernel's cache
    pf.start()
    rid = pf.add_fault("c", "read", errno="corrupt", count=1)
    got = (m / "c").read_bytes()
    diff = [(a ^ b) for a, b in zip(got, data) if a != b]
    assert len(got) == len(data) and len(diff) == 1 and bin(diff[0]).count("1") == 1
    assert (m / "c").read_bytes() == data
    assert pf.stats()["faults"] == {str(rid): 1}
    with pytest.raises(ValueError, match="corrupt"):
        pf.add_fault("c", "write", errno="corrupt")
