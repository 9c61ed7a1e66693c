"""Tier 4: `snapshot clone` into a directory on powerfs (tests/powerfs.py), with power cuts.

1. On a slow disk (powerfs delays the clone's first write), the snapshot a clone is reading
   cannot be deleted (one line, exit 1), and the clone finishes. The power goes right after
   it reported success, keeping nothing that was not made durable: NEWSITE is there,
   complete, fsck-clean, and mounted shows the snapshot's tree. (It fails if the image, the
   files or the directories are not synced before the answer.)
2. A crash while a clone's blocks are written (a power cut that keeps everything written, as
   a kill -9 of the daemon would): the clone fails with one line; after
   the power is back, what is left is `NEWSITE.partial`, which nothing mounts (no superblock
   yet) and NEWSITE does not exist; the next clone into NEWSITE removes the leftover.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from repfs.cli.admin import main as admin_main
from tests.conftest import fsck_clean, run_repfs, teardown_mount
from tests.powerfs import PowerFS
from tests.t2_repl import ADMIN, Workload, admin, tree


def test_clone_survives_power_cuts(mount_site, tmp_path, capsys):
    m = mount_site("64M", name="src")
    Workload(m.path, "power-clone").run(25)
    (m.path / "data").write_bytes(os.urandom(1 << 20))
    want = tree(m.path)
    admin(m.path, "snapshot", "create", "s1")
    (m.path / "data").write_bytes(b"changed after the snapshot")
    pf = PowerFS(tmp_path / "disk", tmp_path / "pf")
    c, d = pf.mnt / "c", pf.mnt / "d"
    dmnt = tmp_path / "dmnt"
    dmnt.mkdir()
    try:
        pf.start()
        # 1. a slow disk under NEWSITE: while the clone runs, its snapshot cannot be deleted;
        # the power goes right after the clone answered, keeping nothing unsynced
        rule = pf.add_fault("d.partial/volume.img", "write", delay=1.5, count=1)
        proc = subprocess.Popen([ADMIN, "--site", str(m.path), "snapshot", "clone", "s1",
                                 str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            deadline = time.monotonic() + 30
            while not pf.stats()["seen"].get(str(rule)):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the clone did not begin its copy"
                time.sleep(0.02)
            capsys.readouterr()
            with pytest.raises(SystemExit) as ei:  # (the CLI's main in this process: quick)
                admin_main(["--site", str(m.path), "snapshot", "delete", "s1"])
            err = capsys.readouterr().err
            assert ei.value.code == 1 and "is being cloned" in err, err
            assert proc.poll() is None, "the clone ended before the delete: test too weak"
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0 and out.startswith("cloned snapshot s1"), (out, err)
        pf.freeze(keep="none")
        pf.stop()
        pf.start()
        assert sorted(os.listdir(pf.mnt)) == ["d"], os.listdir(pf.mnt)
        fsck_clean(d)
        run_repfs("mount", d, dmnt)
        errors: list[str] = []
        try:
            assert tree(dmnt) == want
            (dmnt / "new").write_bytes(b"writable")
        finally:
            teardown_mount(dmnt, d, set(), errors)
        assert not errors, errors
        # 2. a cut in the middle of the copy: one line; NEWSITE.partial is left, which
        # nothing mounts, and the next clone replaces it
        # (everything written survives, as after a kill -9: the image with part of the
        # blocks is there)
        pf.arm_cut("c.partial/volume.img", "write", skip=3, keep="all")
        r = admin(m.path, "snapshot", "clone", "s1", c, check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "cannot make the clone" in r.stderr, r.stderr
        assert pf.stats()["cut"] is not None, "the cut did not happen: test too weak"
        pf.stop()
        pf.start()
        assert not c.exists()
        left = pf.mnt / "c.partial"
        assert (left / "clone-origin.json").exists()  # (made durable before the copy)
        r = run_repfs("fsck", left, check=False)  # (its image has no superblock yet)
        assert r.returncode != 0 and "not a repfs volume" in r.stderr, r.stderr
        admin(m.path, "snapshot", "clone", "s1", c, "--label", "after the cut")
        assert sorted(os.listdir(pf.mnt)) == ["c", "d"], os.listdir(pf.mnt)
        fsck_clean(c)
    finally:
        if os.path.ismount(dmnt):
            subprocess.run(["fusermount3", "-u", "-z", dmnt], check=False)
        pf.stop()
