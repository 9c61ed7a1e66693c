"""Tier 1: consistency points and the site's small state files, through the core API.

* A consistency point includes the checkpoint: a snapshot taken right after a commit keeps that
  commit even when power fails before the volume's writes reach the disk (the redo log's
  replay must never pass through the snapshot layer after the snapshot was recorded).
* While the core is held (a restore or a playback changes the volume underneath), no inode is
  destroyed; a read-only core never frees an inode into its volume.
* Small state files are written durably, and an empty one left by a crash is regenerated.
"""

from __future__ import annotations

import os
import stat

import pytest

from repfs.control import ensure_token
from repfs.fs.core import FileSystem
from repfs.fs.format import ROOT_INO, Superblock
from repfs.fs.journal import Journal
from repfs.fs.ops import Operations
from repfs.site import Site
from repfs.snap.layer import SnapLayer, SnapshotDevice
from repfs.snap.store import open_env
from repfs.statefile import write_durably
from repfs.volume import BLOCK_SIZE, Layer, Volume

BS = BLOCK_SIZE


class LossyDevice(Layer):
    """Keeps every write in memory until flush(); cut() loses what was not flushed, as a power
    cut loses what the disk had not made durable."""

    def __init__(self, lower):
        super().__init__(lower)
        self.pending: dict[int, bytes] = {}
        self.lost = 0

    def read(self, start, count):
        data = bytearray(self.lower.read(start, count))
        for b in range(start, start + count):
            if b in self.pending:
                data[(b - start) * BS:(b - start + 1) * BS] = self.pending[b]
        return bytes(data)

    def write(self, start, data, meta=False):
        mv = memoryview(data)
        for i in range(len(data) // BS):
            self.pending[start + i] = bytes(mv[i * BS:(i + 1) * BS])

    def flush(self):
        for b in sorted(self.pending):
            self.lower.write(b, self.pending[b])
        self.pending.clear()
        self.lower.flush()

    def cut(self):
        self.lost = len(self.pending)
        self.pending.clear()


def _stack(site: Site, lossy: bool):
    vol = Volume(site.volume_path)
    sb = Superblock.unpack(vol.read(0, 1))
    env = open_env(site.path)
    low = LossyDevice(vol) if lossy else vol
    return SnapLayer(low, site.open_store(env), sb.bbitmap_start), low, env


def _tree_file(fs: FileSystem, name: bytes) -> bytes | None:
    try:
        ino = fs.lookup(ROOT_INO, name).ino
    except Exception:  # noqa: BLE001 - missing is the answer we test for
        return None
    size = fs.getattr(ino).size
    return fs.read(ino, 0, size)


async def test_snapshot_after_commit_survives_power_cut(tmp_path):
    site = Site.create(tmp_path / "site", 64 << 20)
    layer, lossy, env = _stack(site, lossy=True)
    core = FileSystem(layer, site.journal_path)
    ops = Operations(core)
    payload = os.urandom(3 * BS + 100)
    ino = core.create(ROOT_INO, b"f", 0o644).ino
    core.write(ino, 0, payload)
    await ops.commit()  # fsync returned: the file is durable (in the redo log)
    async with ops.quiesce():
        snap = layer.store.create("s1")
    assert Journal(site.journal_path).read() is None, "the consistency point left a redo record"
    # power cut: whatever the volume had not flushed is gone; nothing is closed cleanly
    lossy.cut()
    core.journal.close()
    for s in layer.store.queue:  # drop the store without its clean-close flush
        s.save.close()
    env.close()
    lossy.lower.close()

    layer, _, env = _stack(site, lossy=False)
    live = FileSystem(layer, site.journal_path)
    snap = layer.store.find("s1")
    in_snap = FileSystem(SnapshotDevice(layer, snap), None, readonly=True)
    assert _tree_file(live, b"f") == payload
    assert _tree_file(in_snap, b"f") == payload, "the snapshot lost the commit before it"
    live.close()
    layer.close()
    env.close()


def test_no_inode_destroyed_while_frozen(make_fs):
    fs = make_fs()
    ino = fs.create(ROOT_INO, b"open-unlinked", 0o644).ino  # create opens it
    fs.write(ino, 0, b"x" * (2 * BS))
    fs.unlink(ROOT_INO, b"open-unlinked")
    fs.commit()
    free_before = fs.statfs()["f_bfree"]
    fs.freeze()
    fs.release(ino)
    fs.forget(ino, 1)
    assert not fs.has_changes(), "an inode was destroyed while the core was held"
    fs.reload()  # what a playback or restore does while held: must not trip on pending frees
    fs.thaw()
    assert fs.has_changes()
    fs.commit()
    assert fs.statfs()["f_bfree"] >= free_before + 2
    with pytest.raises(Exception):
        fs.getattr(ino)


def test_readonly_core_never_frees_into_its_volume(make_fs, tmp_path):
    fs = make_fs()
    ino = fs.create(ROOT_INO, b"gone", 0o644).ino
    fs.write(ino, 0, b"y" * BS)
    fs.commit()
    img, jnl = make_fs.made[0][1], make_fs.made[0][2]
    fs.forget(ino, 1)
    fs.close()
    fs.dev.close()
    ro = FileSystem(Volume(img), jnl, readonly=True)
    make_fs.made[0] = (ro, img, jnl)
    got = ro.lookup(ROOT_INO, b"gone")
    ro.open(got.ino, os.O_RDONLY)
    # the volume changes underneath (a playback unlinks the file): the inode has no name left
    ro.iget(got.ino).nlink = 0
    ro.release(got.ino)
    ro.forget(got.ino, 1)
    assert not ro.has_changes(), "a read-only core freed an inode"
    make_fs.reopen(ro)


def test_empty_token_is_regenerated_durably(tmp_path, caplog):
    (tmp_path / "control.token").write_text("")
    os.chmod(tmp_path / "control.token", 0o600)  # as a crash leaves it: made 0600, never filled
    token = ensure_token(tmp_path)
    assert "control.token is empty or damaged" in caplog.text
    assert len(token) >= 32
    st = os.stat(tmp_path / "control.token")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (tmp_path / "control.token").read_text().strip() == token
    assert ensure_token(tmp_path) == token  # a good token is kept
    (tmp_path / "control.token").write_bytes(b"\0" * 44)  # torn: zeros
    assert ensure_token(tmp_path) != token
    caplog.clear()  # the two warnings were expected


def test_empty_site_toml_is_regenerated(tmp_path, caplog):
    site = Site.create(tmp_path / "s", 16 << 20)
    site.config_path.write_bytes(b"")
    cfg = site.config()
    assert "site.toml is empty or zeroed" in caplog.text
    caplog.clear()
    assert cfg["fs"]["commit_interval"] > 0
    site.config_path.write_text("[fs\nbroken")
    with pytest.raises(Exception, match="site.toml"):
        site.config()


def test_write_durably_leaves_no_temporary_file(tmp_path):
    os.umask(0o077)
    try:
        write_durably(tmp_path / "a", "hello", 0o644)
    finally:
        os.umask(0o022)
    assert (tmp_path / "a").read_text() == "hello"
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o644
    assert os.listdir(tmp_path) == ["a"]


def test_invalidation_plan_reports_an_inode_the_change_damaged(make_fs):
    """A change underneath (a playback, a restore) that leaves a known inode damaged in the
    volume: finish() names it as stale for the kernel instead of failing the change."""
    from repfs.fs.format import Inode
    from repfs.fs.invalidate import InvalidationPlan
    fs = make_fs()
    ino = fs.create(ROOT_INO, b"f", 0o644).ino  # known: open and looked up
    fs.checkpoint()  # the volume alone holds the file system
    plan = InvalidationPlan(fs, None)
    blk, off = fs._inode_pos(ino)
    good = bytes(fs.dev.read(blk, 1))
    bad = bytearray(good)
    inode = Inode.unpack_from(ino, bad, off)
    inode.nlink = 0  # a named, unlisted inode with no links: refused by iget
    inode.pack_into(bad, off)
    fs.dev.write(blk, bytes(bad), meta=True)
    fs.reload()
    entries, inodes = plan.finish(fs)
    assert ino in inodes
    fs.dev.write(blk, good, meta=True)  # undone, so the teardown's fsck is clean
    fs.reload()
    fs.release(ino)
