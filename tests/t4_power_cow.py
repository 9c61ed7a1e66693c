"""Tier 4: power cuts while files are overwritten under active snapshots (issue 8).

Copy-on-write no longer syncs a save volume per write: before-images are appended unsynced,
and the writes they protect are held by the snapped-volume layer until a flush has synced the
save volumes (repfs/snap/layer.py). This loop proves the order with powerfs (tests/powerfs.py),
which keeps none or a random part of everything not yet synced: cuts are aimed at a random
write or sync of a save volume, of the volume image, or of any site file, while a writer
overwrites files in place and fsyncs some of them. After each cut, every snapshot must read
exactly as the file system did when it was taken (the core API, which also fscks each one),
and every file whose fsync returned must be byte-exact.
"""

from __future__ import annotations

import os
import random

from tests.t4_crash import _fsync
from tests.t4_power import ROUNDS, SEED, SITE_FILES, Request, power_site  # noqa: F401
from tests.t4_snap_crash import core_check, hash_tree

FILES = 6
FILE_SIZE = 256 * 1024
AIMS = [("save volumes", "site/save/*.save", "write|fsync"),
        ("volume image", "site/volume.img", "write|fsync"),
        ("any site file", SITE_FILES, "write|fsync")]


def fill(s, rng: random.Random, files: int = FILES, size: int = FILE_SIZE) -> dict:
    """Files f0.. of `size` random bytes each, fsync'd with their directory: the model."""
    model = {}
    for i in range(files):
        data = rng.randbytes(size)
        with open(s.path / f"f{i}", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        model[f"f{i}"] = bytearray(data)
    _fsync(s.path)
    return model


def _overwrite(root, rng: random.Random, model: dict, durable: dict, limit: int) -> str | None:
    """Overwrite ranges of the files in place, fsyncing each file now and then, until the
    power goes (an OSError) or `limit` writes. Returns the file written when it failed."""
    for _ in range(limit):
        name = f"f{rng.randrange(FILES)}"
        size = rng.randrange(1, 64 * 1024)
        off = rng.randrange(FILE_SIZE - size)
        data = rng.randbytes(size)
        try:
            with open(root / name, "r+b") as f:
                f.seek(off)
                f.write(data)
                model[name][off: off + size] = data
                if rng.random() < 0.4:
                    f.flush()  # (Python buffers a small write: it would reach the file
                    os.fsync(f.fileno())  # at close, after the fsync)
                    durable[name] = bytes(model[name])
        except OSError:
            return name
    return None


def test_power_cut_during_overwrites_with_snapshots(power_site):
    rng = random.Random(8001 + SEED)
    print(f"REPFS_POWER_SEED={SEED} REPFS_POWER_ROUNDS={ROUNDS}")  # shown if it fails
    s = power_site()
    s.create("128M")
    s.mount()
    model = fill(s, rng)
    durable = {k: bytes(v) for k, v in model.items()}
    recorded: dict[str, dict] = {}
    hits: dict[str, int] = {}
    rounds = 6 * ROUNDS
    for rnd in range(rounds):
        if len(recorded) < 3:  # one to three snapshots: copy-on-write walks the queue
            name = f"s{rnd}"
            tree_now = hash_tree(s.path)
            r = Request(s.site, "POST", "/snapshots", {"name": name})
            r.join(120)
            assert r.status == 200, r.reply
            recorded[name] = tree_now
        aim, path, ops = AIMS[rnd % len(AIMS)]
        keep = rng.choice(["none", "random", "random"])
        s.pf.arm_cut(path, ops, skip=rng.randrange(30), keep=keep,
                     seed=rng.randrange(1 << 30))
        failed = _overwrite(s.path, rng, model, durable, limit=400)
        fired = s.pf.stats()["frozen"]
        hits[aim] = hits.get(aim, 0) + bool(fired)
        out = s.power_cut(keep, rng.randrange(1 << 30))
        names = core_check(s.site, recorded)
        assert names == list(recorded)
        s.mount()
        for name, want in durable.items():
            got = (s.path / name).read_bytes()
            if got != want:
                # a file written since its last fsync may hold any mix of its writes
                assert name == failed or bytes(model[name]) != want, (
                    f"round {rnd}: {name}, fsync'd, changed by a power cut ({aim}, {out})")
            model[name] = bytearray(got)
            durable[name] = got
        print(f"round {rnd}: cut aimed at {aim} {'fired' if fired else 'not reached'}; "
              f"{s.dropped(out)} unsynced writes/entries dropped; snapshots {names}",
              flush=True)
        if len(recorded) == 3:  # delete the oldest now and then: its images move
            r = Request(s.site, "DELETE", f"/snapshots/{next(iter(recorded))}", None)
            r.join(120)
            assert r.status == 200, r.reply
            del recorded[next(iter(recorded))]
    s.finish()
    print(f"cuts that fired by aim: {hits}")
    assert hits.get("save volumes"), f"no cut landed on a save volume's write or sync: {hits}"
