"""Tier 1: the snapshot facility through its core API (no mount).

The stack is the one a site builds: Volume -> SnapLayer -> FileSystem. Snapshots are taken at a
consistency point (``fs.checkpoint()`` then ``store.create``). Each snapshot is checked against
two copies taken when it was created: the file tree (every path and every byte) and the raw
volume image (every block the snapshot's own meta bit map marks in use).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess

import numpy as np
import pytest

from repfs.fs.core import FileSystem
from repfs.fs.errors import FSError
from repfs.fs.format import ROOT_INO
from repfs.fs.fsck import fsck
from repfs.site import Site
from repfs.snap.layer import SnapLayer, SnapshotDevice
from repfs.snap.store import SnapError

BS = 4096
BITS_PER_BLOCK = BS * 8


# ----------------------------------------------------------------------------- helpers


def read_tree(fs: FileSystem) -> dict[bytes, bytes | None]:
    """path -> file content (None for a directory), for the whole tree."""
    out: dict[bytes, bytes | None] = {}

    def walk(dino: int, prefix: bytes) -> None:
        for name, inode, _ in list(fs.readdir(dino, 0)):
            if name in (b".", b".."):
                continue
            path = prefix + name
            if stat.S_ISDIR(inode.mode):
                out[path] = None
                walk(inode.ino, path + b"/")
            elif stat.S_ISREG(inode.mode):
                data = fs.read(inode.ino, 0, inode.size)
                assert len(data) == inode.size, path
                out[path] = data
            else:
                out[path] = b"<special>"

    walk(ROOT_INO, b"")
    return out


def in_use(bitmap_raw: bytes, nblocks: int) -> np.ndarray:
    """Block numbers marked in use in the concatenated block bitmap blocks."""
    bits = np.unpackbits(np.frombuffer(bitmap_raw, dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:nblocks])


def bitmap_raw(read, sb) -> bytes:
    n = -(-sb.nblocks // BITS_PER_BLOCK)
    return read(sb.bbitmap_start, n)


def blocks_of(image: bytes, blocks) -> list[bytes]:
    return [image[b * BS:(b + 1) * BS] for b in blocks]


def find_snap_layer(dev) -> SnapLayer:
    """The snapped volume in a site's stack (layers above it, e.g. a change log, may wrap it)."""
    while not isinstance(dev, SnapLayer):
        dev = dev.lower
    return dev


def restore_fs(site: Site, fs: FileSystem, layer: SnapLayer, snap) -> FileSystem:
    """Restore the live file system to `snap` (as the daemon does: at a consistency point with
    an empty redo log, writing through the top of the stack) and open it again."""
    top = fs.dev
    fs.checkpoint()
    if top is not layer and hasattr(layer, "restore_through"):
        layer.restore_through(snap, top)
    else:
        layer.restore(snap)
    fs.journal.close()
    return FileSystem(top, site.journal_path)


def live_fsck(site: Site, fs: FileSystem) -> None:
    fs.checkpoint()
    ro = FileSystem(fs.dev, site.journal_path, readonly=True)
    try:
        assert_fsck_clean(ro, "the live file system")
    finally:
        ro.journal.close()


def snap_fs(layer, snap) -> FileSystem:
    return FileSystem(SnapshotDevice(layer, snap), None, readonly=True)


def assert_fsck_clean(fs: FileSystem, what: str) -> None:
    report = fsck(fs)
    assert report.clean, f"fsck of {what}: " + "; ".join(p.message for p in report.problems)


def du_kib(path) -> int:
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


class Model:
    """The live file system and what it should hold, driven by random operations."""

    DIRS = [b"", b"d0/", b"d1/", b"d1/e/"]

    def __init__(self, site: Site, rng: random.Random, maxsize: int = 48 * 1024):
        self.site = site
        self.rng = rng
        self.maxsize = maxsize
        self.fs = site.open_fs()
        self.layer = find_snap_layer(self.fs.dev)
        self.store = self.layer.store
        self.files: dict[bytes, bytearray] = {}
        self.snaps: dict[str, dict] = {}  # name -> {"snap", "tree", "image", "used"}
        self.counter = 0
        for d in self.DIRS[1:]:
            parent, name = self._parent(d.rstrip(b"/"))
            ino = self.fs.mkdir(parent, name, 0o755).ino
            self.fs.forget(ino, 1)

    # -- paths

    def _parent(self, path: bytes) -> tuple[int, bytes]:
        *dirs, name = path.split(b"/")
        ino = ROOT_INO
        for d in dirs:
            ino = self.fs.dirs.lookup(self.fs.iget(ino), d)[0]
        return ino, name

    def _ino(self, path: bytes) -> int:
        parent, name = self._parent(path)
        return self.fs.dirs.lookup(self.fs.iget(parent), name)[0]

    def expected_tree(self) -> dict[bytes, bytes | None]:
        out: dict[bytes, bytes | None] = {d.rstrip(b"/"): None for d in self.DIRS[1:]}
        out.update({p: bytes(c) for p, c in self.files.items()})
        return out

    # -- file operations

    def _data(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def new_file(self) -> None:
        self.counter += 1
        path = self.rng.choice(self.DIRS) + b"f%d" % self.counter
        parent, name = self._parent(path)
        inode = self.fs.create(parent, name, 0o644)
        self.fs.release(inode.ino)
        self.fs.forget(inode.ino, 1)
        data = self._data(self.rng.randrange(0, self.maxsize))
        if data:
            assert self.fs.write(inode.ino, 0, data) == len(data)
        self.files[path] = bytearray(data)

    def overwrite(self) -> None:
        path = self.rng.choice(sorted(self.files))
        cur = self.files[path]
        off = self.rng.randrange(0, len(cur) + 1)
        data = self._data(self.rng.randrange(1, 3 * BS))
        assert self.fs.write(self._ino(path), off, data) == len(data)
        if off + len(data) > len(cur):
            cur.extend(bytes(off + len(data) - len(cur)))
        cur[off:off + len(data)] = data

    def truncate(self) -> None:
        path = self.rng.choice(sorted(self.files))
        cur = self.files[path]
        size = self.rng.randrange(0, max(len(cur), BS) + 2 * BS)
        self.fs.setattr(self._ino(path), size=size)
        if size < len(cur):
            del cur[size:]
        else:
            cur.extend(bytes(size - len(cur)))

    def delete(self) -> None:
        path = self.rng.choice(sorted(self.files))
        parent, name = self._parent(path)
        self.fs.unlink(parent, name)
        del self.files[path]

    def random_file_op(self) -> None:
        r = self.rng.random()
        if not self.files or r < 0.3:
            self.new_file()
        elif r < 0.65:
            self.overwrite()
        elif r < 0.8:
            self.truncate()
        elif r < 0.95:
            self.delete()
        else:
            self.fs.commit()

    # -- snapshots

    def live_image(self) -> bytes:
        return self.layer.lower.read(0, self.layer.nblocks)

    def create_snapshot(self) -> str:
        self.counter += 1
        name = f"s{self.counter}"
        self.fs.checkpoint()
        snap = self.store.create(name)
        image = self.live_image()  # the volume as the snapshot must read it, forever
        used = in_use(bitmap_raw(lambda s, n: image[s * BS:(s + n) * BS], self.fs.sb),
                      self.layer.nblocks)
        self.snaps[name] = {"snap": snap, "tree": self.expected_tree(), "image": image,
                            "used": used}
        assert read_tree(self.fs) == self.snaps[name]["tree"]
        return name

    def delete_snapshot(self, which: str) -> str:
        queue = [s.name for s in self.store.queue]
        assert queue == list(self.snaps), "the snapshot queue lost its order"
        if which == "oldest":
            name = queue[0]
        elif which == "newest":
            name = queue[-1]
        else:
            name = queue[len(queue) // 2]
        self.fs.commit()  # what the daemon's quiesce does
        self.layer.delete(self.store.find(name))
        del self.snaps[name]
        with pytest.raises(SnapError):
            self.store.find(name)
        return name

    def restore_snapshot(self, name: str) -> None:
        rec = self.snaps[name]
        self.fs = restore_fs(self.site, self.fs, self.layer, rec["snap"])
        self.files = {p: bytearray(c) for p, c in rec["tree"].items() if c is not None}
        assert read_tree(self.fs) == rec["tree"], "the live tree differs from the restored one"
        live_fsck(self.site, self.fs)

    # -- checks

    def check_snapshot(self, name: str) -> None:
        rec = self.snaps[name]
        snap = rec["snap"]
        nblocks = self.layer.nblocks
        got = self.layer.read_snapshot(snap, 0, nblocks)
        used = rec["used"]
        # the snapshot's own meta bit map is exactly the one it was taken with
        sb = self.fs.sb
        assert np.array_equal(
            in_use(bitmap_raw(lambda s, n: got[s * BS:(s + n) * BS], sb), nblocks), used), name
        bad = [int(b) for b, x, y in zip(used, blocks_of(got, used), blocks_of(rec["image"], used))
               if x != y]
        assert not bad, f"snapshot {name}: blocks in use that changed: {bad[:20]}"
        # reading by odd extents gives the same bytes as one big read
        for _ in range(4):
            s = self.rng.randrange(0, nblocks)
            n = self.rng.randrange(1, min(600, nblocks - s) + 1)
            assert self.layer.read_snapshot(snap, s, n) == got[s * BS:(s + n) * BS]
        sfs = snap_fs(self.layer, snap)
        assert read_tree(sfs) == rec["tree"], f"snapshot {name}: the file tree changed"
        assert_fsck_clean(sfs, f"snapshot {name}")
        with pytest.raises(FSError) as ei:
            sfs.dev.write(0, bytes(BS))
        assert ei.value.errno == errno.EROFS

    def check_all(self) -> None:
        assert read_tree(self.fs) == self.expected_tree(), "the live tree is wrong"
        for name in self.snaps:
            self.check_snapshot(name)

    def check_live_fsck(self) -> None:
        live_fsck(self.site, self.fs)

    def close(self) -> None:
        self.fs.close()
        self.fs.dev.close()


def expected_delta(model: Model, older: str, younger: str | None) -> dict[int, bytes]:
    """Brute force: every block in use in `younger` whose content differs from `older`'s, from
    the image copies taken at creation (younger None: the live volume now)."""
    a = model.snaps[older]["image"]
    if younger is None:
        model.fs.checkpoint()
        b = model.live_image()
        used = in_use(bitmap_raw(lambda s, n: b[s * BS:(s + n) * BS], model.fs.sb),
                      model.layer.nblocks)
    else:
        b = model.snaps[younger]["image"]
        used = model.snaps[younger]["used"]
    return {int(blk): y for blk, x, y in zip(used, blocks_of(a, used), blocks_of(b, used))
            if x != y}


def collect_delta(model: Model, older: str, younger: str | None) -> dict[int, bytes]:
    layer = model.layer
    L = model.snaps[older]["snap"]
    M = model.snaps[younger]["snap"] if younger else None
    out: dict[int, bytes] = {}
    last = -1
    for (start, count), data in layer.delta(L, M):
        assert count >= 1 and len(data) == count * BS
        assert start > last, "the delta is not in block order (or overlaps)"
        last = start + count - 1
        for i in range(count):
            out[start + i] = data[i * BS:(i + 1) * BS]
    return out


def check_delta(model: Model, older: str, younger: str | None) -> None:
    want = expected_delta(model, older, younger)
    got = collect_delta(model, older, younger)
    missing = sorted(set(want) - set(got))
    assert not missing, (f"delta {older}->{younger or 'live'} misses {len(missing)} changed "
                         f"blocks in use, e.g. {missing[:10]} (of {len(want)} changed)")
    wrong = [b for b in want if got[b] != want[b]]
    assert not wrong, f"delta {older}->{younger or 'live'} has wrong data for {wrong[:10]}"
    # It may send blocks whose content did not change (FIG. 39 sends every block some save
    # volume L..M-1 holds, without comparing; a restore rewrites blocks with the content they
    # had): harmless as long as they are in use in the younger one and carry its content.
    extra = sorted(set(got) - set(want))
    image = model.snaps[younger]["image"] if younger else model.live_image()
    used = set(model.snaps[younger]["used"].tolist()) if younger else None
    for blk in extra:
        assert used is None or blk in used, f"delta sends block {blk}, not in use in {younger}"
        assert got[blk] == image[blk * BS:(blk + 1) * BS], f"delta: wrong data for block {blk}"


# ----------------------------------------------------------------------------- the model test


SEEDS = [1, 2, 3, 4, 5]


def run_model(tmp_path, seed: int, *, deltas: bool) -> Model:
    rng = random.Random(seed)
    site = Site.create(tmp_path / f"site{seed}", 16 << 20)
    m = Model(site, rng)
    steps = 0
    deletes = {"oldest": 0, "newest": 0, "middle": 0}
    restores = 0
    try:
        for _ in range(14):
            for _ in range(rng.randrange(3, 15)):
                m.random_file_op()
                steps += 1
            r = rng.random()
            if len(m.snaps) < 2 or r < 0.45:
                m.create_snapshot()
            elif r < 0.75:
                which = rng.choice(["oldest", "newest", "middle"])
                m.delete_snapshot(which)
                deletes[which] += 1
            else:
                m.restore_snapshot(rng.choice(list(m.snaps)))
                restores += 1
            if deltas and len(m.snaps) >= 2:
                names = list(m.snaps)
                i = rng.randrange(0, len(names) - 1)
                j = rng.randrange(i + 1, len(names))
                check_delta(m, names[i], names[j])
                check_delta(m, names[i], None)
            else:
                m.check_all()
        # every kind of delete and at least one restore, whatever the seed chose
        for which in ("middle", "oldest", "newest"):
            while len(m.snaps) < 3:
                for _ in range(5):
                    m.random_file_op()
                m.create_snapshot()
            m.delete_snapshot(which)
            if not deltas:
                m.check_all()
        m.random_file_op()
        m.restore_snapshot(list(m.snaps)[0])
        for _ in range(10):
            m.random_file_op()
        m.fs.commit()
        if not deltas:
            m.check_all()
            m.check_live_fsck()
            assert m.layer.cow_blocks > 0
    except BaseException:
        m.close()
        raise
    return m


@pytest.mark.parametrize("seed", SEEDS)
def test_model_snapshots_stay_exact(tmp_path, seed):
    """Random writes interleaved with snapshot creates, deletes (oldest, newest, middle) and
    restores; every live snapshot reads exactly what it held when it was taken."""
    m = run_model(tmp_path, seed, deltas=False)
    m.close()
    # and once more after a reopen: the index is durable
    site = m.site
    fs = site.open_fs()
    layer = find_snap_layer(fs.dev)
    try:
        assert [s.name for s in layer.store.queue] == list(m.snaps)
        for name, rec in m.snaps.items():
            snap = layer.store.find(name)
            sfs = snap_fs(layer, snap)
            assert read_tree(sfs) == rec["tree"]
            got = layer.read_snapshot(snap, 0, layer.nblocks)
            assert blocks_of(got, rec["used"]) == blocks_of(rec["image"], rec["used"])
        assert read_tree(fs) == m.expected_tree()
    finally:
        fs.close()
        layer.close()


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_model_delta_matches_brute_force(tmp_path, seed):
    """delta L->M (and L->live) against a block-by-block comparison of the image copies taken
    when the snapshots were created, restricted to blocks in use in M."""
    m = run_model(tmp_path, seed, deltas=True)
    m.close()


# ----------------------------------------------------------------------------- focused tests


def _site(tmp_path, size=16 << 20, name="site"):
    site = Site.create(tmp_path / name, size)
    fs = site.open_fs()
    return site, fs, find_snap_layer(fs.dev)


def _mkfile(fs, name: bytes, data: bytes, parent=ROOT_INO) -> int:
    inode = fs.create(parent, name, 0o644)
    fs.release(inode.ino)
    fs.forget(inode.ino, 1)
    if data:
        assert fs.write(inode.ino, 0, data) == len(data)
    return inode.ino


def test_delta_includes_blocks_allocated_after_older(tmp_path):
    """Minimal case: L on an empty fs, a new file, M. Applying delta L->M to L's image must
    give M's image on every block in use in M (replication ships exactly this)."""
    site, fs, layer = _site(tmp_path)
    try:
        fs.checkpoint()
        L = layer.store.create("L")
        image = bytearray(layer.lower.read(0, layer.nblocks))
        payload = b"new data ".ljust(2 * BS, b"x")
        ino = _mkfile(fs, b"f", payload)
        fs.checkpoint()
        M = layer.store.create("M")
        for (s, c), data in layer.delta(L, M):
            image[s * BS:(s + c) * BS] = data
        replica = FileSystem(_ImageDevice(bytes(image)), None, readonly=True)
        assert read_tree(replica) == {b"f": payload}
        del ino
    finally:
        fs.close()
        layer.close()


class _ImageDevice:
    block_size = BS

    def __init__(self, image: bytes):
        self.image = image
        self.nblocks = len(image) // BS

    def read(self, s, n):
        return self.image[s * BS:(s + n) * BS]

    def write(self, *a, **k):
        raise FSError(errno.EROFS)

    def flush(self):
        pass

    def close(self):
        pass


def test_delta_of_overwrites_and_to_live(tmp_path):
    """Overwrites of blocks in use in both L and M (the part of the delta the save volumes
    track): delta L->M and L->live carry exactly them, with M's (the live) data."""
    site, fs, layer = _site(tmp_path)
    try:
        rng = random.Random(7)
        inos = [_mkfile(fs, b"f%d" % i, rng.randbytes(20 * BS)) for i in range(6)]
        fs.checkpoint()
        L = layer.store.create("L")
        img_l = layer.lower.read(0, layer.nblocks)
        for ino in inos[:3]:
            fs.write(ino, 5 * BS, rng.randbytes(3 * BS))
        fs.checkpoint()
        M = layer.store.create("M")
        img_m = layer.lower.read(0, layer.nblocks)
        for ino in inos[2:5]:
            fs.write(ino, 12 * BS, rng.randbytes(2 * BS))
        fs.checkpoint()
        img_live = layer.lower.read(0, layer.nblocks)
        sb = fs.sb
        for younger, img in ((M, img_m), (None, img_live)):
            used = in_use(bitmap_raw(lambda s, n: img[s * BS:(s + n) * BS], sb), layer.nblocks)
            want = {int(b): y for b, x, y in zip(used, blocks_of(img_l, used),
                                                  blocks_of(img, used)) if x != y}
            got = {}
            for (s, c), data in layer.delta(L, younger):
                for i in range(c):
                    got[s + i] = data[i * BS:(i + 1) * BS]
            assert set(want) <= set(got)
            assert all(got[b] == want[b] for b in want)
            # anything more must at least be M's own content (harmless to ship)
            for b in set(got) - set(want):
                assert got[b] == img[b * BS:(b + 1) * BS]
            # the three (six) overwritten files' blocks are all there
            assert len([b for b in want if b >= sb.data_start]) >= (9 if younger else 15)
        with pytest.raises(SnapError):
            list(layer.delta(M, L))
    finally:
        fs.close()
        layer.close()


def test_create_is_o1_on_a_1tib_sparse_volume(tmp_path):
    site = Site.create(tmp_path / "big", 1 << 40)
    fs = site.open_fs()
    layer = find_snap_layer(fs.dev)
    try:
        ino = _mkfile(fs, b"f", b"x" * 3 * BS)
        fs.checkpoint()
        before = du_kib(site.path)
        reads = []
        orig_read = layer.lower.read
        layer.lower.read = lambda s, n: (reads.append((s, n)), orig_read(s, n))[1]
        try:
            snap = layer.store.create("s1")
            layer.store.flush()
        finally:
            layer.lower.read = orig_read
        assert reads == [], "creating a snapshot read the volume"
        assert layer.store.usage() == 0
        assert not any((site.path / "save").iterdir()) or all(
            p.stat().st_size == 0 for p in (site.path / "save").iterdir())
        assert du_kib(site.path) - before < 1024, "creating a snapshot wrote a lot"
        # the first write after it copies only what it overwrites
        fs.write(ino, 0, b"y" * BS)
        assert layer.cow_blocks == 1
        fs.checkpoint()
        assert layer.cow_blocks < 16
        assert du_kib(site.path) - before < 4096
        sfs = snap_fs(layer, snap)
        assert read_tree(sfs) == {b"f": b"x" * 3 * BS}
        assert read_tree(fs) == {b"f": b"y" * BS + b"x" * 2 * BS}
    finally:
        fs.close()
        layer.close()


def test_writes_into_free_blocks_are_not_saved(tmp_path):
    site, fs, layer = _site(tmp_path, 64 << 20)
    try:
        _mkfile(fs, b"old", b"o" * 4 * BS)
        fs.checkpoint()
        snap = layer.store.create("s")
        ino = _mkfile(fs, b"new", os.urandom(256 * BS))  # 1 MiB into free blocks
        fs.write(ino, 256 * BS, os.urandom(64 * BS))
        assert layer.cow_blocks == 0, "before-images of blocks that held no valid data"
        fs.checkpoint()
        meta_cow = layer.cow_blocks
        assert 0 < meta_cow < 16, meta_cow  # the metadata the commit rewrote, not the data
        assert layer.store.usage() < 32 * BS
        assert read_tree(snap_fs(layer, snap)) == {b"old": b"o" * 4 * BS}
        # a second commit touching the same metadata blocks copies nothing again
        ino2 = _mkfile(fs, b"new2", os.urandom(8 * BS))
        fs.checkpoint()
        assert layer.cow_blocks - meta_cow <= 4
        del ino2
    finally:
        fs.close()
        layer.close()


def test_save_capacity_enospc_keeps_snapshots_exact(tmp_path, caplog):
    site, fs, layer = _site(tmp_path, 32 << 20)
    store = layer.store
    try:
        rng = random.Random(3)
        content = {b"f%d" % i: rng.randbytes(64 * BS) for i in range(4)}
        inos = {n: _mkfile(fs, n, d) for n, d in content.items()}
        fs.checkpoint()
        snap = store.create("s")
        tree = read_tree(fs)
        image = layer.lower.read(0, layer.nblocks)
        used = in_use(bitmap_raw(lambda s, n: image[s * BS:(s + n) * BS], fs.sb), layer.nblocks)
        layer.reserve = 8 * BS  # room kept for metadata before-images
        store.capacity = store.usage() + layer.reserve + 40 * BS
        live = dict(content)
        # small overwrites fit ...
        fs.write(inos[b"f0"], 0, b"a" * 8 * BS)
        live[b"f0"] = b"a" * 8 * BS + live[b"f0"][8 * BS:]
        # ... a large one does not: ENOSPC, and the file keeps its content (blocks 16..63 are
        # one extent past the indirect block, so this is one device write)
        with pytest.raises(FSError) as ei:
            fs.write(inos[b"f1"], 16 * BS, b"b" * 48 * BS)
        assert ei.value.errno == errno.ENOSPC
        assert any("save volumes full" in r.getMessage() for r in caplog.records)
        caplog.clear()
        assert fs.read(inos[b"f1"], 0, 64 * BS) == content[b"f1"]
        # writing new data into free blocks still works (nothing to save)
        _mkfile(fs, b"new", b"n" * 32 * BS)
        live[b"new"] = b"n" * 32 * BS
        fs.checkpoint()
        caplog.clear()
        assert read_tree(fs) == live
        sfs = snap_fs(layer, snap)
        assert read_tree(sfs) == tree
        got = layer.read_snapshot(snap, 0, layer.nblocks)
        assert blocks_of(got, used) == blocks_of(image, used)
        assert_fsck_clean(sfs, "the snapshot")
        # deleting the snapshot frees the space: the write goes through
        layer.delete(snap)
        assert store.usage() == 0
        fs.write(inos[b"f1"], 0, b"b" * 64 * BS)
        fs.checkpoint()
        live[b"f1"] = b"b" * 64 * BS
        assert read_tree(fs) == live
        live_fsck(site, fs)
    finally:
        fs.close()
        layer.close()
    caplog.clear()


def test_enospc_write_is_all_or_nothing_or_short(tmp_path, caplog):
    site, fs, layer = _site(tmp_path, 32 << 20)
    store = layer.store
    try:
        old = os.urandom(64 * BS)
        ino = _mkfile(fs, b"f", old)
        fs.checkpoint()
        store.create("s")
        layer.reserve = 8 * BS
        store.capacity = store.usage() + layer.reserve + 40 * BS
        new = b"b" * 64 * BS  # 12 direct blocks, an indirect block, 52 more: two extents
        try:
            n = fs.write(ino, 0, new)
        except FSError as e:
            assert e.errno == errno.ENOSPC
            n = 0
        caplog.clear()
        assert fs.read(ino, 0, 64 * BS) == new[:n] + old[n:], (
            f"the write reported {n} bytes written but the file changed otherwise")
        fs.checkpoint()
        caplog.clear()
    finally:
        fs.close()
        layer.close()
    caplog.clear()


def test_enospc_on_reused_blocks_leaks_no_stale_data(tmp_path, caplog):
    """A write into blocks freed after the snapshot (so they need before-images) gets ENOSPC
    when the save volumes are full; the file must not end up mapping blocks it never wrote."""
    site, fs, layer = _site(tmp_path)
    store = layer.store
    try:
        secret = b"S" * 48 * BS
        _mkfile(fs, b"secret", secret)
        fs.checkpoint()
        snap = store.create("s")
        fs.unlink(ROOT_INO, b"secret")
        fs.checkpoint()
        layer.reserve = 0
        store.capacity = store.usage() + 8 * BS  # a few metadata before-images, no data
        ino = _mkfile(fs, b"filler", b"")
        free = fs.statfs()["f_bavail"]
        try:
            # every free block, among them the deleted secret's, which need saving: either
            # ENOSPC, or a short write of what could be written
            n = fs.write(ino, 0, b"F" * free * BS)
            assert n < free * BS
            assert fs.read(ino, 0, n) == b"F" * n
        except FSError as e:
            assert e.errno == errno.ENOSPC
        caplog.clear()
        assert read_tree(snap_fs(layer, snap)) == {b"secret": secret}
        problems = fsck(FileSystem(_LiveView(layer), None, readonly=True)).problems
        fs.setattr(ino, size=free * BS)  # extend: what was never written must read zero
        stale = fs.read(ino, 0, free * BS).count(b"S")
        fs.checkpoint()
        caplog.clear()
        assert stale == 0, f"{stale} bytes of a deleted file show through"
        assert not problems, [p.message for p in problems][:3]
    finally:
        fs.close()
        layer.close()
    caplog.clear()


class _LiveView(_ImageDevice):
    def __init__(self, layer):
        self.layer = layer
        self.nblocks = layer.nblocks

    def read(self, s, n):
        return self.layer.read_live(s, n)


def test_index_survives_reopen(tmp_path):
    site, fs, layer = _site(tmp_path)
    rng = random.Random(11)
    inos = [_mkfile(fs, b"f%d" % i, rng.randbytes(16 * BS)) for i in range(5)]
    fs.checkpoint()
    recs = {}
    for k in range(3):
        snap = layer.store.create(f"s{k}", {"k": str(k)})
        recs[snap.name] = (read_tree(fs), layer.lower.read(0, layer.nblocks))
        for ino in rng.sample(inos, 3):
            fs.write(ino, rng.randrange(0, 16) * BS, rng.randbytes(4 * BS))
        fs.checkpoint()
    live = read_tree(fs)
    fs.close()
    layer.close()

    fs = site.open_fs()
    layer = find_snap_layer(fs.dev)
    try:
        store = layer.store
        assert [s.name for s in store.queue] == ["s0", "s1", "s2"]
        assert [s.attrs for s in store.queue] == [{"k": "0"}, {"k": "1"}, {"k": "2"}]
        for snap in store.queue:
            tree, image = recs[snap.name]
            assert read_tree(snap_fs(layer, snap)) == tree
            used = in_use(bitmap_raw(lambda s, n: image[s * BS:(s + n) * BS], fs.sb),
                          layer.nblocks)
            got = layer.read_snapshot(snap, 0, layer.nblocks)
            assert blocks_of(got, used) == blocks_of(image, used)
        assert read_tree(fs) == live
        with pytest.raises(SnapError) as ei:
            store.create("s1")
        assert ei.value.kind == "conflict"
        new = store.create("s3")
        assert new.id > max(s.id for s in store.queue[:-1])
    finally:
        fs.close()
        layer.close()


def test_unflushed_index_is_recovered_from_the_save_volume(tmp_path):
    """A crash after before-images were saved but before the LMDB index was written (and with
    a torn record at the end of a save volume): reopening re-indexes them and every snapshot
    is exact."""
    site, fs, layer = _site(tmp_path)
    rng = random.Random(5)
    inos = [_mkfile(fs, b"f%d" % i, rng.randbytes(16 * BS)) for i in range(4)]
    fs.checkpoint()
    snap = layer.store.create("s")
    tree = read_tree(fs)
    image = layer.lower.read(0, layer.nblocks)
    fs.checkpoint()
    for ino in inos:
        fs.write(ino, 0, rng.randbytes(10 * BS))  # data before-images: saved, not indexed
    assert layer.cow_blocks >= 40
    assert layer.store.bits.dirty, "expected the index to be pending in memory"
    # the crash image: what is on disk right now
    crash = tmp_path / "crash"
    shutil.copytree(site.path, crash, ignore=shutil.ignore_patterns("lock"))
    save = crash / "save" / f"{snap.id}.save"
    with open(save, "ab") as f:  # a torn record: a header and half a body
        f.write(b"RSAVEREC" + bytes(BS - 8) + b"junk" * 100)
    fs.close()
    layer.close()

    csite = Site(crash)
    cfs = csite.open_fs()
    clayer = find_snap_layer(cfs.dev)
    try:
        csnap = clayer.store.find("s")
        assert read_tree(snap_fs(clayer, csnap)) == tree
        used = in_use(bitmap_raw(lambda s, n: image[s * BS:(s + n) * BS], cfs.sb),
                      clayer.nblocks)
        got = clayer.read_snapshot(csnap, 0, clayer.nblocks)
        assert blocks_of(got, used) == blocks_of(image, used)
        assert os.path.getsize(save) % BS == 0
    finally:
        cfs.close()
        clayer.close()


def test_restore_then_write_keeps_younger_snapshots(tmp_path):
    """Restore an older snapshot while a younger one exists; the younger one keeps reading its
    own tree, the live tree is the older one's, and writes after the restore save what the
    younger still needs."""
    site, fs, layer = _site(tmp_path)
    try:
        a = _mkfile(fs, b"a", b"A" * 5 * BS)
        fs.checkpoint()
        old = layer.store.create("old")
        t_old = read_tree(fs)
        fs.write(a, 0, b"B" * 2 * BS)
        _mkfile(fs, b"b", b"b" * 3 * BS)
        fs.checkpoint()
        young = layer.store.create("young")
        t_young = read_tree(fs)
        fs.unlink(ROOT_INO, b"a")
        _mkfile(fs, b"c", b"c" * 9 * BS)
        fs = restore_fs(site, fs, layer, old)
        assert read_tree(fs) == t_old
        ino = _mkfile(fs, b"d", os.urandom(20 * BS))
        fs.write(fs.dirs.lookup(fs.iget(ROOT_INO), b"a")[0], 0, b"Z" * 5 * BS)
        fs.checkpoint()
        assert read_tree(snap_fs(layer, old)) == t_old
        assert read_tree(snap_fs(layer, young)) == t_young
        layer.delete(old)
        assert read_tree(snap_fs(layer, young)) == t_young
        del ino
        live_fsck(site, fs)
    finally:
        fs.close()
        layer.close()


def test_bad_snapshot_names(tmp_path):
    site, fs, layer = _site(tmp_path)
    try:
        fs.checkpoint()
        for bad in ("", "a/b", "x" * 201, "tab\there", "nul\0"):
            with pytest.raises(SnapError):
                layer.store.create(bad)
        layer.store.create("ok")
        with pytest.raises(SnapError) as ei:
            layer.store.create("ok")
        assert ei.value.kind == "conflict"
        with pytest.raises(SnapError) as ei:
            layer.store.find("nope")
        assert ei.value.kind == "not_found"
        assert [s.name for s in layer.store.queue] == ["ok"]
    finally:
        fs.close()
        layer.close()


def test_snapshot_keeps_the_old_xattrs(tmp_path):
    """Extended attributes live in volume blocks (the root block and the xattr file): a
    snapshot keeps them as they were, while the live file system changes, removes and frees
    them, and snapshot diff sees a change in any of their blocks."""
    from repfs.snap.diff import changed_paths
    site, fs, layer = _site(tmp_path, size=32 << 20)
    try:
        rng = random.Random(11)
        f = _mkfile(fs, b"f", b"data")
        g = _mkfile(fs, b"g", b"gone")
        old = {b"user.s%03d" % i: b"small %d" % i for i in range(300)}
        old[b"user.big"] = rng.randbytes(65536)
        old[b"trusted.t"] = rng.randbytes(9000)
        for k, v in old.items():
            fs.setxattr(f, k, v)
        fs.setxattr(g, b"user.g", rng.randbytes(40000))
        fs.checkpoint()
        s1 = layer.store.create("S1")
        # change a value in place (same size: only its blocks), remove, add, and free g's
        # blocks, then let new xattrs reuse them
        new = dict(old)
        new[b"user.big"] = rng.randbytes(65536)
        for k in list(new)[:100]:
            del new[k]
        new[b"user.added"] = b"after the snapshot"
        fs.setxattr(f, b"user.big", new[b"user.big"])
        for k in list(old)[:100]:
            fs.removexattr(f, k)
        fs.setxattr(f, b"user.added", new[b"user.added"])
        fs.unlink(ROOT_INO, b"g")
        fs.checkpoint()
        h = _mkfile(fs, b"h", b"")
        fs.setxattr(h, b"user.h", rng.randbytes(65536))
        fs.checkpoint()
        s2 = layer.store.create("S2")
        sfs = snap_fs(layer, s1)
        assert {k: sfs.getxattr(f, k) for k in sfs.listxattr(f)} == old
        assert len(sfs.getxattr(g, b"user.g")) == 40000
        assert fsck(sfs).clean
        assert {k: fs.getxattr(f, k) for k in fs.listxattr(f)} == new
        # a change only in the xattr file's blocks (same inode record: ctime put back, root
        # block unchanged) makes the file 'modified' in the diff
        ctime = fs.getattr(f).ctime_ns
        fs.setxattr(f, b"user.big", rng.randbytes(65536))
        fs.setattr(f, ctime_ns=ctime)
        fs.checkpoint()
        s3 = layer.store.create("S3")
        changed = set()
        for page, acc in layer.changed_pages(s2, s3):
            changed.update(((acc & layer._used(s3, page)).nonzero()[0] + page * 32768).tolist())
        a, b = snap_fs(layer, s2), snap_fs(layer, s3)
        assert a.getattr(f).ctime_ns == b.getattr(f).ctime_ns
        assert a.getattr(f).xattr == b.getattr(f).xattr
        assert a.meta.read(a.getattr(f).xattr) == b.meta.read(b.getattr(f).xattr)
        assert {"path": "/f", "change": "modified"} in changed_paths(a, b, changed)
    finally:
        fs.close()
        layer.close()
