"""Tier 4: `snapshot clone` into a directory on powerfs (tests/powerfs.py), with power cuts.

1. The power goes while the clone's blocks are written: the clone fails with one line; after
   the power is back, what is left is `NEWSITE.partial`, which nothing mounts (no superblock
   yet) and NEWSITE does not exist; the next clone into NEWSITE removes the leftover.
2. The power goes right after a clone reported success, keeping nothing that was not made
   durable: NEWSITE is there, complete, fsck-clean, and mounted shows the snapshot's tree.
   (It fails if the image, the files or the directories are not synced before the answer.)
"""

from __future__ import annotations

import os
import subprocess

from tests.conftest import fsck_clean, run_repfs, teardown_mount
from tests.powerfs import PowerFS
from tests.t2_repl import Workload, admin, tree


def test_clone_survives_power_cuts(mount_site, tmp_path):
    m = mount_site("64M", name="src")
    Workload(m.path, "power-clone").run(25)
    (m.path / "data").write_bytes(os.urandom(1 << 20))
    want = tree(m.path)
    admin(m.path, "snapshot", "create", "s1")
    (m.path / "data").write_bytes(b"changed after the snapshot")
    pf = PowerFS(tmp_path / "disk", tmp_path / "pf")
    c = pf.mnt / "c"
    cmnt = tmp_path / "cmnt"
    cmnt.mkdir()
    try:
        pf.start()
        # 1. a cut in the middle of the copy
        pf.arm_cut("c.partial/volume.img", "write", skip=3, keep="random", seed=5)
        r = admin(m.path, "snapshot", "clone", "s1", c, check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "cannot make the clone" in r.stderr, r.stderr
        assert pf.stats()["cut"] is not None, "the cut did not happen: test too weak"
        pf.stop()
        pf.start()
        assert not c.exists()
        left = pf.mnt / "c.partial"
        assert (left / "clone-origin.json").exists()  # (made durable before the copy)
        r = run_repfs("fsck", left, check=False)
        assert r.returncode != 0 and "not a repfs volume" in r.stderr, (r.stdout, r.stderr)
        # 2. the next clone replaces the leftover; a cut right after its answer keeps it
        admin(m.path, "snapshot", "clone", "s1", c, "--label", "after the cut")
        pf.freeze(keep="none")
        pf.stop()
        pf.start()
        assert sorted(os.listdir(pf.mnt)) == ["c"], os.listdir(pf.mnt)
        fsck_clean(c)
        run_repfs("mount", c, cmnt)
        errors: list[str] = []
        try:
            assert tree(cmnt) == want
            (cmnt / "new").write_bytes(b"writable")
        finally:
            teardown_mount(cmnt, c, set(), errors)
        assert not errors, errors
    finally:
        if os.path.ismount(cmnt):
            subprocess.run(["fusermount3", "-u", "-z", cmnt], check=False)
        pf.stop()
