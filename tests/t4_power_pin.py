"""Tier 4: power cuts around a delta-set pin that breaks (issue 8).

A delta set's pinning snapshot whose save volume cannot take a copy of committed metadata
*breaks* instead of failing the commit (SnapStore.break_pin): it keeps nothing from then on,
the break is recorded in LMDB (its delta set can no longer be sent: the destination needs a
resync), and older snapshots that read those blocks through it get their own copies first.

The child process below drives the core API on a site on powerfs (tests/powerfs.py): a
user's snapshot S and a delta set cut at the same consistency point (its pin younger than
S, so S reads the pinned blocks through it), then powerfs makes every
write into the pin's save volume fail (EIO) while new files are created and committed — each
commit's metadata overwrites blocks the pin keeps, so the pin breaks. The power is cut at the
N-th write or sync of the LMDB environment (where the break is recorded), of S's save volume
(its own copies) or of the volume image, keeping none or a random part of what was not
synced. After powerfs comes back:

* fsck finds the site clean;
* S reads exactly as the file system did when it was taken (and its file system is clean);
* the live file system is exactly the last committed state, or the one whose commit the cut
  interrupted;
* the pin is consistent: recorded broken (its delta set refuses to be read), or not broken
  and its delta set streams exactly the blocks' content at the cut.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from repfs.fs.core import FileSystem
from repfs.fs.fsck import fsck
from repfs.repl.chunk import ChunkError
from repfs.repl.deltaset import DeltaSets
from repfs.site import Site
from repfs.snap.layer import SnapLayer, SnapshotDevice
from tests.conftest import fsck_clean
from tests.powerfs import PowerFS
from tests.t1_changelog import digest, read_stream
from tests.t4_power import ROUNDS, SEED
from tests.t4_snap_crash import core_hash_tree

ROOT_DIR = Path(__file__).resolve().parent.parent
BS = 4096
# (what, powerfs path ({S} is S's save volume), operations, the N of "before the N-th": at most)
AIMS = [("the break's record (LMDB)", "site/meta.lmdb/*", "write|fsync", 8),
        ("the older snapshot's copies", "site/save/{S}", "write|fsync", 6),
        ("volume image", "site/volume.img", "write|fsync", 40)]

CHILD = r"""
import sys
sys.path.insert(0, {root!r})
from tests.t4_power_pin import child_main
child_main({args!r})
"""


def child_main(args: dict) -> None:
    import numpy as np
    from repfs.fs.format import ROOT_INO
    rng = random.Random(args["seed"])
    site = Site(args["site"])
    fs = site.open_fs()
    clog = fs.dev
    layer = clog.find_layer(SnapLayer)
    fs.checkpoint()
    clog.enabled = True
    sets = DeltaSets(clog.env, clog, site.path, layer)

    def new_file(name: bytes, size: int) -> int:
        ino = fs.create(ROOT_INO, name, 0o644).ino
        fs.write(ino, 0, rng.randbytes(size))
        fs.release(ino)
        return ino

    def say(**kw) -> None:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    a = new_file(b"a", 200_000)
    new_file(b"c", 30_000)
    fs.checkpoint()
    # S and the cut at the same consistency point: the pin (younger) keeps the blocks
    # written since logging began, file data and metadata, and S reads them through it
    s = layer.store.create("S")
    tree_s = core_hash_tree(fs)
    blocks = np.flatnonzero(clog.new.get_range(0, clog.nblocks))
    n = sets.cut()
    pinned = [[int(b), digest(clog.read(int(b), 1))] for b in blocks]
    pin = sets.pin(n)
    say(S=s.save.path.name, pin=pin.save.path.name, n=n, tree_s=tree_s, pinned=pinned,
        tree=core_hash_tree(fs))
    sys.stdin.readline()  # the pin's save volume fails and the cut is armed
    for k in range(1, 7):
        new_file(b"b%d" % k, rng.choice([100, 5000, 70_000]))
        fs.setattr(a, mode=0o600 + k)  # the inode table block: kept by the pin and S
        say(pending=core_hash_tree(fs))
        fs.checkpoint()  # committed metadata overwrites pinned blocks: the pin breaks
        say(durable=True, broken=bool(pin.attrs.get("broken")))


def test_power_cut_around_a_breaking_pin(tmp_path):
    rng = random.Random(9301 + SEED)
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    pf = PowerFS(tmp_path / "disk", tmp_path / "pf")
    site = pf.mnt / "site"
    seen = {"fired": 0, "broken before the cut": 0, "broken after": 0}
    rounds = 1 if ROUNDS == 1 else len(AIMS) * ROUNDS
    try:
        pf.start()
        for rnd in range(rounds):
            Site.create(site, 64 << 20, force=rnd > 0)
            pf.sync()
            # (the suite's one round, with the default seed: S's own copies after the break)
            aim, path, ops, most = AIMS[(rnd + SEED + 1) % len(AIMS)]
            keep = rng.choice(["none", "random", "all"])
            code = CHILD.format(root=str(ROOT_DIR),
                                args={"site": str(site), "seed": rng.randrange(1 << 30)})
            child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT_DIR)
            durable_tree = pending = None
            broke = False
            try:
                line = child.stdout.readline()
                assert line, f"the child failed before the pin: {child.communicate()[1][-3000:]}"
                start = json.loads(line)
                durable_tree = start["tree"]
                pf.add_fault(f"site/save/{start['pin']}", "write", errno="EIO")
                pf.arm_cut(path.format(S=start["S"]), ops, skip=rng.randrange(most),
                           keep=keep, seed=rng.randrange(1 << 30))
                child.stdin.write("go\n")
                child.stdin.flush()
                for line in child.stdout:  # until the power cut fails the child
                    msg = json.loads(line)
                    if "pending" in msg:
                        pending = msg["pending"]
                    else:
                        durable_tree, pending = pending, None
                        broke |= msg["broken"]
                child.wait(60)
                fired = pf.stats()["frozen"]
                if not fired:  # every commit went through: cut now
                    pf.freeze(keep, rng.randrange(1 << 30))
                out = pf.stats()["cut"]
            finally:
                if child.poll() is None:
                    child.kill()
                child.communicate()
            pf.clear_faults()
            pf.stop()
            pf.start()
            fsck_clean(site)
            fs = Site(site).open_fs()
            try:
                layer = fs.dev.find_layer(SnapLayer)
                sets = DeltaSets(fs.dev.env, fs.dev, site, layer)
                (s,) = [x for x in layer.store.queue if x.name == "S"]
                sfs = FileSystem(SnapshotDevice(layer, s), None, readonly=True)
                assert core_hash_tree(sfs) == start["tree_s"], (
                    f"round {rnd} ({aim}, {out}): snapshot S changed")
                report = fsck(sfs)
                assert report.clean, [p.message for p in report.problems]
                live = core_hash_tree(fs)
                assert live in (durable_tree, pending), (
                    f"round {rnd} ({aim}, {out}): the live tree is neither the last "
                    f"committed one nor the one being committed")
                pin = sets.pin(start["n"])
                assert pin is not None, "the pin of an unsent delta set went"
                if pin.attrs.get("broken"):
                    try:
                        read_stream(sets, start["n"])
                        raise AssertionError("a broken pin's delta set was streamed")
                    except ChunkError as e:
                        assert "could not be kept" in str(e), e
                    state = "broken"
                else:
                    assert not broke, (f"round {rnd} ({aim}, {out}): the break was "
                                       f"reported durable by a commit, then lost")
                    entries, _ = read_stream(sets, start["n"])
                    got = [[b, digest(d)] for b, d in entries]
                    assert got == start["pinned"], (
                        f"round {rnd} ({aim}, {out}): the unbroken pin does not stream "
                        f"its delta set's boundary")
                    state = "intact"
                seen["fired"] += bool(fired)
                seen["broken before the cut"] += broke
                seen["broken after"] += state == "broken"
                print(f"round {rnd}: cut aimed at {aim} {'fired' if fired else 'not reached'}"
                      f" (keep {keep}); pin {state}; live tree "
                      f"{'committed' if live == durable_tree else 'being committed'}",
                      flush=True)
            finally:
                fs.close()
                fs.dev.close()
    finally:
        pf.stop()
    print(f"seen: {seen}")
    assert seen["fired"], f"no cut landed where it was aimed: {seen}"
