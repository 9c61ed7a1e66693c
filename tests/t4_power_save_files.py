"""Tier 4: a snapshot's save volume never outlives its snapshot (issue 8: space only).

* Deleting a snapshot removes its save volume durably (the directory is synced after the
  unlink): after a power cut that keeps nothing unsynced (powerfs, tests/powerfs.py), the
  file does not come back.
* A save volume no snapshot owns (left by a crash in a create or a delete, or by an older
  version whose unlink was not durable) is removed when the site is opened — by a mount or by
  `repfs fsck`, which says so in a note — so its space is never lost; the snapshots' own
  save volumes stay.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from repfs.site import Site
from tests.conftest import fsck_clean, run_repfs
from tests.powerfs import PowerFS

ROOT_DIR = Path(__file__).resolve().parent.parent

CHILD = r"""
import os, sys, time
sys.path.insert(0, {root!r})
from repfs.fs.format import ROOT_INO
from repfs.site import Site
from repfs.snap.layer import SnapLayer
fs = Site({site!r}).open_fs()
layer = fs.dev.find_layer(SnapLayer)
ino = fs.create(ROOT_INO, b"f", 0o644).ino
fs.write(ino, 0, os.urandom(256 << 10))
fs.checkpoint()
keep = layer.store.create("keep")
doomed = layer.store.create("doomed")
fs.write(ino, 0, os.urandom(256 << 10))  # before-images: into the youngest, "doomed"
fs.checkpoint()
assert doomed.save.path.stat().st_size > 0
layer.delete(doomed)  # its images move to "keep", its save volume goes
print(doomed.save.path.name, keep.save.path.name, flush=True)
time.sleep(600)  # until the power cut and the kill
"""


def test_a_deleted_snapshots_save_volume_stays_gone_after_a_power_cut(tmp_path):
    pf = PowerFS(tmp_path / "disk", tmp_path / "pf")
    site = pf.mnt / "site"
    try:
        pf.start()
        Site.create(site, 64 << 20)
        pf.sync()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD.format(root=str(ROOT_DIR), site=str(site))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR)
        try:
            line = child.stdout.readline()
            assert line, f"the child failed: {child.communicate(timeout=60)[1][-3000:]}"
            doomed, kept = line.split()
            assert not (site / "save" / doomed).exists()
            pf.freeze("none")  # the power cut: only what was made durable survives
        finally:
            child.kill()
            child.communicate()
        pf.stop()
        pf.start()
        saves = sorted(p.name for p in (site / "save").glob("*.save"))
        assert saves == [kept], f"after the power cut: {saves} (deleted: {doomed})"
        out = fsck_clean(site)
        assert "removed save/" not in out, out
    finally:
        pf.stop()


def test_save_volumes_no_snapshot_owns_are_removed_when_the_site_opens(tmp_path):
    site = tmp_path / "s"
    run_repfs("mkfs", site, "--size", "64M")
    fs = Site(site).open_fs()
    try:
        from repfs.snap.layer import SnapLayer
        store = fs.dev.find_layer(SnapLayer).store
        snap = store.create("keep")
        own = snap.save.path
        fs.checkpoint()
    finally:
        fs.close()
        fs.dev.close()
    (site / "save" / "99.save").write_bytes(b"\1" * 3 * 4096)  # a crash's leftovers
    (site / "save" / f"{snap.id + 1}.save").write_bytes(b"")
    (site / "save" / "notes.save").write_bytes(b"not a save volume's name: left alone")
    out = fsck_clean(site)
    assert "note: removed save/99.save (12288 bytes), which no snapshot owned" in out, out
    assert f"note: removed save/{snap.id + 1}.save (0 bytes)" in out, out
    assert sorted(p.name for p in (site / "save").glob("*.save")) == sorted(
        [own.name, "notes.save"])
    out = fsck_clean(site)  # nothing left to remove
    assert "removed" not in out, out
    fs = Site(site).open_fs(readonly=True)  # the snapshot is still there, whole
    try:
        store = fs.dev.find_layer(SnapLayer).store
        assert [s.name for s in store.queue] == ["keep"] and store.orphans_removed == []
    finally:
        fs.close()
        fs.dev.close()
