"""Tier 1: `snapshot diff` with paths, through the core API (no mount).

The paths of a diff are found from the changed blocks (repfs/snap/diff.py): changed inode
records, the owners of changed data blocks, the directories above them. The oracle is the
diff as it was before: a walk of both whole trees matching every inode's record and blocks
against the changed set. It is kept here, not in production. On random trees changed by
random operations (files, directories, hard links, renames across directories and
exchanges, xattrs, symlinks, truncates, times), both must give the same answer; and the new
one must read a small part of what the full walk reads when little changed.
"""

from __future__ import annotations

import errno
import os
import random
import stat

import numpy as np
import pytest

from repfs.fs.core import FileSystem
from repfs.fs.errors import FSError
from repfs.fs.format import ROOT_INO
from repfs.fs.fsck import fsck
from repfs.site import Site
from repfs.snap.diff import DiffCancelled, changed_blocks, changed_paths
from repfs.snap.layer import SnapLayer, SnapshotDevice
from repfs.volume import ReadOnlyDevice

BS = 4096
RENAME_EXCHANGE = 2


# ----------------------------------------------------------------------------- the oracle


def _walk(fs):
    """Yield (path, inode) for every name in the tree, depth first."""
    stack = [(b"", ROOT_INO)]
    yield "/", fs.iget(ROOT_INO)
    while stack:
        prefix, dino = stack.pop()
        d = fs.iget(dino)
        for _, name, ino, _ in list(fs.dirs.iter_from(d, None)):
            try:
                inode = fs.iget(ino)
            except FSError:
                continue
            path = prefix + b"/" + name
            yield path.decode(errors="surrogateescape"), inode
            if stat.S_ISDIR(inode.mode):
                stack.append((path, ino))


def _blocks(fs, inode) -> set[int]:
    out = set()
    for _, _, phys in fs.bmap.walk(inode):
        if isinstance(phys, int):
            out.add(phys)
        else:
            out.update(int(p) for p in phys)
    out.update(fs.xattrs.blocks(inode).tolist())
    return out


def _same_inode(a, b) -> bool:
    return (a.mode, a.uid, a.gid, a.nlink, a.size, a.mtime_ns, a.ctime_ns, a.map, a.xattr) == (
        b.mode, b.uid, b.gid, b.nlink, b.size, b.mtime_ns, b.ctime_ns, b.map, b.xattr)


def oracle_paths(old_fs, new_fs, changed: set[int]) -> list[dict]:
    """The diff before issue 8: both whole trees walked, every file's blocks collected."""
    if not changed:
        return []
    old = {p: i for p, i in _walk(old_fs)}
    out = []
    seen = set()
    for path, inode in _walk(new_fs):
        seen.add(path)
        before = old.get(path)
        if before is None or before.ino != inode.ino:
            out.append({"path": path, "change": "added"})
        elif not _same_inode(before, inode) or _blocks(new_fs, inode) & changed:
            out.append({"path": path, "change": "modified"})
    for path in old:
        if path not in seen:
            out.append({"path": path, "change": "deleted"})
    out.sort(key=lambda r: r["path"])
    return out


# ----------------------------------------------------------------------------- helpers


class CountingDevice(ReadOnlyDevice):
    """A read-only device that counts the blocks read through it."""

    def __init__(self, inner):
        self.blocks_read = 0

        def read(start, count):
            self.blocks_read += count
            return inner.read(start, count)
        super().__init__(read, inner.nblocks)


def _layer(fs) -> SnapLayer:
    return fs.dev.find_layer(SnapLayer)


def snap_fs(layer, snap, counting=False):
    dev = SnapshotDevice(layer, snap) if snap is not None else ReadOnlyDevice(
        layer.read_live, layer.nblocks)
    if counting:
        dev = CountingDevice(dev)
    return FileSystem(dev, None, readonly=True)


def both(layer, a, b, **kw):
    """(new result, oracle result) of the diff from snapshot a to b (None: live)."""
    changed = changed_blocks(layer, a, b)
    old_fs, new_fs = snap_fs(layer, a), snap_fs(layer, b)
    got = changed_paths(old_fs, new_fs, changed, **kw)
    want = oracle_paths(snap_fs(layer, a), snap_fs(layer, b), set(changed.tolist()))
    return got, want


def mkfile(fs, parent, name: bytes, data: bytes = b"") -> int:
    inode = fs.create(parent, name, 0o644)
    fs.release(inode.ino)
    fs.forget(inode.ino, 1)
    if data:
        assert fs.write(inode.ino, 0, data) == len(data)
    return inode.ino


def mkdir(fs, parent, name: bytes) -> int:
    ino = fs.mkdir(parent, name, 0o755).ino
    fs.forget(ino, 1)
    return ino


def tree(fs):
    """[(parent, name, inode)] of every name, and [dir inos]."""
    names, dirs = [], [ROOT_INO]
    stack = [ROOT_INO]
    while stack:
        d = stack.pop()
        for _, name, ino, _ in list(fs.dirs.iter_from(fs.iget(d), None)):
            inode = fs.iget(ino)
            names.append((d, name, inode))
            if stat.S_ISDIR(inode.mode):
                dirs.append(ino)
                stack.append(ino)
    return names, dirs


def random_op(fs, rng: random.Random) -> None:
    names, dirs = tree(fs)
    files = [(p, n, i) for p, n, i in names if stat.S_ISREG(i.mode)]
    d = rng.choice(dirs)
    name = b"n%d" % rng.randrange(60)
    op = rng.choices(
        ["create", "mkdir", "write", "append", "truncate", "unlink", "rmdir", "rename",
         "exchange", "link", "xattr", "rmxattr", "chmod", "utime", "symlink", "read",
         "ctime_back"],
        [8, 4, 8, 4, 3, 4, 2, 6, 2, 4, 3, 1, 2, 2, 2, 2, 1])[0]
    try:
        if op == "create":
            mkfile(fs, d, name, rng.randbytes(rng.choice([0, 10, 5000, 70000])))
        elif op == "mkdir":
            mkdir(fs, d, name)
        elif op == "symlink":
            ino = fs.symlink(d, name, b"target-%d" % rng.randrange(9)).ino
            fs.forget(ino, 1)
        elif files and op in ("write", "append", "truncate", "xattr", "rmxattr", "chmod",
                              "utime", "read", "ctime_back", "link"):
            _, _, f = rng.choice(files)
            ino = f.ino
            if op == "write":  # in place, sometimes past the direct blocks (indirect)
                fs.write(ino, rng.randrange(0, max(1, f.size + 1)),
                         rng.randbytes(rng.choice([1, 100, 4096, 60000])))
            elif op == "append":
                fs.write(ino, f.size, rng.randbytes(rng.randrange(1, 9000)))
            elif op == "truncate":
                fs.setattr(ino, size=rng.randrange(0, f.size + 5000))
            elif op == "xattr":
                fs.setxattr(ino, b"user.k%d" % rng.randrange(3),
                            rng.randbytes(rng.choice([5, 3000, 20000])))
            elif op == "rmxattr":
                fs.removexattr(ino, b"user.k%d" % rng.randrange(3))
            elif op == "chmod":
                fs.setattr(ino, mode=rng.choice([0o600, 0o644, 0o755]))
            elif op == "utime":
                fs.setattr(ino, mtime_ns=rng.randrange(10**18))
            elif op == "read":  # an atime update at most: no change a diff shows
                fs.read(ino, 0, 100)
            elif op == "ctime_back":  # the content changes, the record is put back whole
                r = fs.getattr(ino)
                before = (r.mtime_ns, r.ctime_ns)
                if r.size:
                    fs.write(ino, 0, rng.randbytes(min(r.size, 100)))
                    fs.setattr(ino, mtime_ns=before[0], ctime_ns=before[1])
            elif op == "link":
                fs.forget(fs.link(ino, d, name).ino, 1)
        elif op == "unlink" and names:
            p, n, i = rng.choice(names)
            if not stat.S_ISDIR(i.mode):
                fs.unlink(p, n)
        elif op == "rmdir" and len(dirs) > 1:
            p, n, i = rng.choice([x for x in names if stat.S_ISDIR(x[2].mode)])
            fs.rmdir(p, n)
        elif op in ("rename", "exchange") and names:
            p, n, i = rng.choice(names)
            if op == "exchange" and len(names) > 1:
                p2, n2, _ = rng.choice(names)
                fs.rename(p, n, p2, n2, RENAME_EXCHANGE)
            else:
                fs.rename(p, n, d, name)
    except FSError as e:
        assert e.errno in (errno.EEXIST, errno.ENOENT, errno.ENOTEMPTY, errno.EINVAL,
                           errno.ENOTDIR, errno.EISDIR, errno.ENODATA, errno.EPERM), e


@pytest.fixture
def site_fs(tmp_path):
    site = Site.create(tmp_path / "site", 24 << 20, inodes=8192)
    fs = site.open_fs()
    yield fs
    fs.checkpoint()
    report = fsck(fs)
    fs.close()
    assert report.clean, [p.message for p in report.problems]


def snapshot(fs, name):
    fs.checkpoint()
    return _layer(fs).store.create(name)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", range(int(os.environ.get("REPFS_FUZZ_EXAMPLES") or 40)))
def test_same_paths_as_the_full_walk_on_random_trees(site_fs, seed):
    """Random tree, snapshot, random changes, snapshot, more changes: the diff of the two
    snapshots and of each against the live file system equal the full walk's."""
    fs = site_fs
    rng = random.Random(seed)
    for _ in range(rng.randrange(20, 80)):
        random_op(fs, rng)
    a = snapshot(fs, "a")
    for _ in range(rng.randrange(1, 40)):
        random_op(fs, rng)
    b = snapshot(fs, "b")
    for _ in range(rng.randrange(0, 20)):
        random_op(fs, rng)
    fs.checkpoint()
    layer = _layer(fs)
    for x, y in ((a, b), (a, None), (b, None)):
        got, want = both(layer, x, y)
        assert got == want, (x.name, y and y.name)
        # the diff's own scan (the lock per page) finds what SnapLayer.changed_pages finds
        ref = [np.flatnonzero(acc & layer._used(y, page)) + page * 32768
               for page, acc in layer.changed_pages(x, y)]
        assert changed_blocks(layer, x, y).tolist() == np.concatenate(
            ref or [np.zeros(0, dtype=np.int64)]).tolist()


def test_a_renamed_directory_lists_its_whole_subtree(site_fs):
    fs = site_fs
    d = mkdir(fs, ROOT_INO, b"d")
    sub = mkdir(fs, d, b"sub")
    for i in range(5):
        mkfile(fs, sub, b"f%d" % i, b"x")
    mkfile(fs, ROOT_INO, b"keep", b"k")
    a = snapshot(fs, "a")
    fs.rename(ROOT_INO, b"d", ROOT_INO, b"e")
    b = snapshot(fs, "b")
    got, want = both(_layer(fs), a, b)
    assert got == want
    changes = {r["path"]: r["change"] for r in got}
    assert changes["/"] == "modified" and "/keep" not in changes
    for i in range(5):
        assert changes[f"/d/sub/f{i}"] == "deleted" and changes[f"/e/sub/f{i}"] == "added"


def test_hard_links_are_all_listed_even_with_a_stale_hint(site_fs):
    """A file's parent hint names the directory of its newest link; after that link is
    removed, the hint is stale: the diff still finds every name (by a walk without
    pruning), as the full walk does."""
    fs = site_fs
    d1, d2, d3 = (mkdir(fs, ROOT_INO, n) for n in (b"d1", b"d2", b"d3"))
    f = mkfile(fs, d1, b"f", b"one")
    fs.forget(fs.link(f, d2, b"g").ino, 1)
    fs.forget(fs.link(f, d3, b"h").ino, 1)
    fs.unlink(d3, b"h")  # the hint (d3) no longer names it
    a = snapshot(fs, "a")
    fs.write(f, 0, b"two")
    b = snapshot(fs, "b")
    got, want = both(_layer(fs), a, b)
    assert got == want
    assert {r["path"] for r in got if r["change"] == "modified"} == {"/d1/f", "/d2/g"}


def test_a_block_written_back_unchanged_is_no_change(site_fs):
    """A block rewritten with the bytes it had (as a restore does) is in the changed set;
    with no record changed and the same bytes, no file changed. (The full walk listed such
    a file as modified: the one place where the answers differ, on purpose.)"""
    fs = site_fs
    f = mkfile(fs, ROOT_INO, b"f", b"z" * 3 * BS)
    a = snapshot(fs, "a")
    layer = _layer(fs)
    ino = fs.iget(f)
    blk = int(fs.bmap.lookup(ino, 1, 1)[0])
    layer.write(blk, layer.read_live(blk, 1))  # through copy-on-write: a before-image
    b = snapshot(fs, "b")
    changed = changed_blocks(layer, a, b)
    assert blk in changed.tolist()
    assert changed_paths(snap_fs(layer, a), snap_fs(layer, b), changed) == []
    # different bytes under an unchanged record: found, by the owner's blocks
    layer.write(blk, b"y" * BS)
    got, want = both(layer, b, None)
    assert got == want == [{"path": "/f", "change": "modified"}]


def test_the_work_follows_the_changes(site_fs):
    """Many unchanged files, one changed, one added: the diff reads a small, bounded part of
    what the full walk reads (counted in blocks read through the snapshot devices)."""
    fs = site_fs
    dirs = [mkdir(fs, ROOT_INO, b"d%d" % i) for i in range(20)]
    for d in dirs:
        for j in range(150):
            mkfile(fs, d, b"f%d" % j, b"data %d" % j * 100)
    a = snapshot(fs, "a")
    fs.write(fs.lookup(dirs[7], b"f3").ino, 0, b"changed")
    mkfile(fs, dirs[12], b"new", b"n")
    b = snapshot(fs, "b")
    layer = _layer(fs)
    changed = changed_blocks(layer, a, b)
    old_fs, new_fs = snap_fs(layer, a, True), snap_fs(layer, b, True)
    got = changed_paths(old_fs, new_fs, changed)
    assert {(r["path"], r["change"]) for r in got} == {
        ("/d7/f3", "modified"), ("/d12/new", "added"), ("/d12", "modified")}
    new_reads = old_fs.dev.blocks_read + new_fs.dev.blocks_read
    o_old, o_new = snap_fs(layer, a, True), snap_fs(layer, b, True)
    assert oracle_paths(o_old, o_new, set(changed.tolist())) == got
    full_reads = o_old.dev.blocks_read + o_new.dev.blocks_read
    assert new_reads * 10 < full_reads, (new_reads, full_reads)


def test_a_diff_can_be_cancelled(site_fs):
    import threading
    fs = site_fs
    mkfile(fs, ROOT_INO, b"f", b"x")
    a = snapshot(fs, "a")
    mkfile(fs, ROOT_INO, b"g", b"y")
    fs.checkpoint()
    layer = _layer(fs)
    stop = threading.Event()
    stop.set()
    with pytest.raises(DiffCancelled):
        changed_paths(snap_fs(layer, a), snap_fs(layer, None), changed_blocks(layer, a, None),
                      stop=stop)
