"""Tier 2: `repfs-admin snapshot clone NAME NEWSITE` (issue 10, item 6: DR drills without
stopping replication), with real daemons and mounts.

A primary replicates to a secondary while a writer keeps overwriting, creating and deleting
files on the primary and delta sets are cut every 0.3 s and played. A snapshot of the primary
is cloned, then (after the secondary is seen to have converged meanwhile) a snapshot taken on
the secondary, while it receives and plays. Each clone is mounted as a site of its own: it
shows the tree as it was when its snapshot was taken (contents, modes, times, inode numbers,
link counts, xattrs, symlinks: `tree` of tests/t2_repl.py), it is writable, a primary of
generation 1 with no destinations and no snapshots, with its own volume uuid (the source's
and its replica's are the same: one lineage), and fsck finds it clean (the fixture's
teardown, also before its first mount). The secondary still converges at the end. Bad input
gets a one-line error, a non-zero exit and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from repfs.cli.admin import main as admin_main
from repfs.site import Site
from tests.conftest import fsck_clean
from tests.t2_repl import (
    NO_AUTO_CUT, admin, admin_json, api, assert_same_tree, cut, start_replication, tree,
    wait_converged, Workload,
)

BIG = 2 << 20  # bytes of each big file (overwritten in place under the snapshots)


class Writer(threading.Thread):
    """Overwrites big files in place (copy-on-write under the snapshots), creates and deletes
    small ones, until finished; pause() waits until no request of it is in flight."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root = root
        self.rng = random.Random(7)
        self.go = threading.Event()
        self.go.set()
        self.idle = threading.Event()
        self.stop = threading.Event()
        self.steps = 0
        self.error: BaseException | None = None

    def _one(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.6:
            p = self.root / f"big{rng.randrange(3)}"
            with open(p, "r+b") as f:
                f.seek(rng.randrange(0, BIG - 65536))
                f.write(rng.randbytes(rng.choice([4096, 65536])))
        elif r < 0.85:
            (self.root / f"small{rng.randrange(40)}").write_bytes(rng.randbytes(
                rng.randrange(1, 20000)))
        else:
            (self.root / f"small{rng.randrange(40)}").unlink(missing_ok=True)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.go.is_set():
                    self.idle.set()
                    self.go.wait(0.05)
                    continue
                self.idle.clear()
                self._one()
                self.steps += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.idle.set()

    def pause(self) -> None:
        self.go.clear()
        self.idle.clear()
        assert self.idle.wait(30), "the writer did not pause"

    def resume(self) -> None:
        self.go.set()

    def finish(self) -> None:
        self.stop.set()
        self.go.set()
        self.join(30)
        if self.error:
            raise self.error


def clone(target, name: str, newsite: Path, *extra) -> None:
    """`snapshot clone` by the CLI, its output checked (what it did, how to mount it)."""
    r = admin(target, "snapshot", "clone", name, newsite, *extra)
    assert r.stdout.startswith(f"cloned snapshot {name} into {newsite}: "), r.stdout
    assert " blocks (" in r.stdout and "MiB) in " in r.stdout and "volume uuid" in r.stdout
    assert f"repfs mount {newsite} MOUNTPOINT" in r.stdout, r.stdout
    origin = json.loads((newsite / "clone-origin.json").read_text())
    assert origin["snapshot"] == name, origin


def check_clone(mount_site, newsite: Path, want: dict, source_uuid: str, *,
                label: str | None = None):
    """NEWSITE is complete, sparse, fsck-clean; mounted, it shows `want`, is writable and a
    site of its own."""
    assert not Path(f"{newsite}.partial").exists()
    sb = Site(newsite).superblock()
    assert sb.uuid.hex() != source_uuid  # a new lineage
    if label is not None:
        assert sb.label == label
    used = sb.nblocks - sb.free_blocks
    allocated = os.stat(newsite / "volume.img").st_blocks * 512
    assert allocated <= used * 4096 + (1 << 20), (allocated, used)  # valid blocks only
    assert not (newsite / "meta.lmdb").exists()  # made by its first mount, as after mkfs
    fsck_clean(newsite)
    m = mount_site(name=newsite.name)
    got = tree(m.path)
    assert got == want, [k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)][:8]
    (m.path / "written-in-the-clone").write_bytes(b"drill" * 1000)
    with open(m.path / "big0", "r+b") as f:
        f.write(b"x" * 8192)
    os.sync()
    assert (m.path / "written-in-the-clone").read_bytes() == b"drill" * 1000
    st = api(m.site, "GET", "/status")
    assert st["uuid"] == sb.uuid.hex()
    assert (st["role"], st["generation"], st["destinations"], st["snapshots"]) == (
        "primary", 1, [], []), st
    return m


def test_clone_on_a_primary_and_on_a_secondary_while_replicating(mount_site, tmp_path):
    m1 = mount_site("256M", name="p")
    m2 = mount_site("256M", name="s")
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    start_replication(m1, m2)
    (m1.path / "tree").mkdir()
    Workload(m1.path / "tree", "clone").run(30)
    for i in range(3):
        (m1.path / f"big{i}").write_bytes(random.Random(i).randbytes(BIG))
    wait_converged(m1, m2, cut(m1))
    uuid = api(m1.site, "GET", "/status")["uuid"]
    assert api(m2.site, "GET", "/status")["uuid"] == uuid  # a replica: the same lineage
    admin(m1.path, "replicate", "policy", "--timeout", "0.3")  # cuts go on by themselves
    w = Writer(m1.path)
    w.start()
    try:
        # 1. a snapshot of the primary, cloned while the writer and replication go on
        w.pause()
        want_p = tree(m1.path)
        admin(m1.path, "snapshot", "create", "drill-p")
        w.resume()
        before = w.steps
        clone(m1.path, "drill-p", tmp_path / "clone-p")
        assert w.steps > before, "the writer did not run during the clone: test too weak"
        # the secondary kept converging meanwhile (its tree is compared at the end)
        w.pause()
        wait_converged(m1, m2, cut(m1))
        # 2. a snapshot taken on the secondary (between two playbacks), cloned while it
        # receives and plays
        want_s = tree(m2.path)
        admin(m2.path, "snapshot", "create", "drill-s")
        w.resume()
        played = api(m2.site, "GET", "/status")["last_played_delta_set"]
        out = admin_json(m2.path, "snapshot", "clone", "drill-s", tmp_path / "clone-s",
                         "--label", "drill on s")
        assert out["clone"] == str(tmp_path / "clone-s") and out["snapshot"] == "drill-s"
        assert out["blocks"] > 3 * BIG // 4096 and out["bytes"] == out["blocks"] * 4096
        w.pause()
        n = cut(m1)
        wait_converged(m1, m2, n)
        assert n > played  # it went on receiving and playing
        assert_same_tree(m1.path, m2.path)
    finally:
        w.finish()
    assert want_p != want_s  # (the writer changed the tree between the two snapshots)
    check_clone(mount_site, tmp_path / "clone-p", want_p, uuid)
    c = check_clone(mount_site, tmp_path / "clone-s", want_s, uuid, label="drill on s")
    assert out["uuid"] == api(c.site, "GET", "/status")["uuid"]
    # the secondary's snapshot goes like any other; the clone is independent of it
    admin(m2.path, "snapshot", "delete", "drill-s")
    assert (c.path / "written-in-the-clone").exists()


def _refused(capsys, target, *args, rc: int = 1, needle: str) -> str:
    """`repfs-admin --site TARGET snapshot clone ARGS` refused: exit status `rc` and one line
    naming the problem. (The CLI's own main, in this process: no interpreter start per case.)"""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        admin_main(["--site", str(target), "snapshot", "clone", *map(str, args)])
    out, err = capsys.readouterr()
    assert ei.value.code == rc, (ei.value.code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "internal error" not in err
    return lines[0]


def test_clone_bad_input_leaves_nothing(mount_site, tmp_path, capsys):
    m = mount_site("64M", name="src")
    Workload(m.path, "bad").run(20)
    (m.path / "data").write_bytes(os.urandom(1 << 20))
    admin(m.path, "snapshot", "create", "s1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "full").mkdir()
    (out / "full" / "x").write_text("x")
    (out / "file").write_text("x")
    _refused(capsys, m.path, "nope", out / "c", needle="no snapshot named 'nope'")
    _refused(capsys, m.path, "s1", out / "full", needle="exists and is not empty")
    _refused(capsys, m.path, "s1", out / "file", needle="exists and is not a directory")
    _refused(capsys, m.path, "s1", m.site / "c", needle="inside the site")
    _refused(capsys, m.path, "s1", m.site, needle="inside the site")
    _refused(capsys, m.path, "s1", m.path / "c", needle="on the site's own mount")
    _refused(capsys, m.path, "s1", out / "no" / "c", needle="does not exist")
    smnt = tmp_path / "smnt"
    smnt.mkdir()
    admin(m.path, "snapshot", "mount", "s1", smnt)
    try:
        _refused(capsys, m.path, "s1", smnt / "c", needle="on the mount of snapshot s1")
    finally:
        subprocess.run(["repfs", "umount", smnt], check=False)
        if os.path.ismount(smnt):
            subprocess.run(["fusermount3", "-u", "-z", smnt], check=False)
    _refused(capsys, m.path, "s1", out / "c", "--label", "x" * 65, rc=2, needle="bad --label")
    # a leftover that is not a clone's is refused; a clone's own (a crash) is replaced
    (out / "c.partial").mkdir()
    _refused(capsys, m.path, "s1", out / "c", needle="is not a clone's leftover")
    (out / "c.partial" / "clone-origin.json").write_text("{}")
    (out / "c.partial" / "volume.img").write_bytes(bytes(4096))
    assert sorted(os.listdir(out)) == ["c.partial", "file", "full"]
    # the disk under NEWSITE: too small, or full while the clone is made
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", small], check=True)
    try:
        _refused(capsys, m.path, "s1", small / "c", needle="not enough space")
        subprocess.run(["umount", small], check=True)
        # room for the blocks, not for the files: ENOSPC once the blocks are copied
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M,nr_inodes=6", "tmpfs", small],
                       check=True)
        _refused(capsys, m.path, "s1", small / "c", needle="No space left on device")
        assert os.listdir(small) == []  # the partial clone is gone
    finally:
        subprocess.run(["umount", small], check=False)
    # an empty NEWSITE is fine, and so is a crash's leftover beside it
    (out / "c").mkdir()
    clone(m.path, "s1", out / "c", "--label", "empty dir")
    assert sorted(os.listdir(out)) == ["c", "file", "full"]
    assert Site(out / "c").superblock().label == "empty dir"
    fsck_clean(out / "c")
