"""t4: fdatasync without a redo-log record, under power cuts (issue 8 item 5).

An fdatasync whose file changed only in data inside blocks already mapped (and committed),
and in timestamps, makes the data durable by flushing the volume alone: no redo-log record,
as ext4's fdatasync skips an inode whose only change is its times (FileSystem.data_only,
sync_data). Any other change (a new block, a larger size) still commits. The site lives on
powerfs (tests/powerfs.py), so a power cut drops whatever was not synced: fdatasync'd blocks
must be there after it, unsynced ones may hold their old or their new content, nothing else;
fsck finds the site clean after every cut (PowerSite.power_cut). powerfs counts the fsyncs of
the redo log and of the volume image, so the test also proves which path ran.
"""

from __future__ import annotations

import os
import random

from tests.t4_crash import _fsync
from tests.t4_power import power_site  # noqa: F401 - the fixture

BS = 4096
NB = 64  # blocks in the file


def _counters(s) -> tuple[int, int]:
    """Rules that fail nothing and count the fsyncs of the redo log and of the volume."""
    return (s.pf.add_fault("site/journal", "fsync", count=0),
            s.pf.add_fault("site/volume.img", "fsync", count=0))


def _seen(s, rule: int) -> int:
    return s.pf.stats()["seen"][str(rule)]


def test_fdatasync_of_overwrites_skips_the_redo_log_and_survives_power_cuts(power_site):
    rng = random.Random(8005)
    s = power_site()
    s.create("64M", commit_interval=3600)  # no group commit makes anything durable for us
    s.mount()
    path = s.path / "db"
    blocks = [os.urandom(BS) for _ in range(NB)]
    with open(path, "wb") as f:
        f.write(b"".join(blocks))
        f.flush()
        os.fsync(f.fileno())  # allocated and committed
    _fsync(s.path)
    for rnd in range(3):
        journal, volume = _counters(s)
        fd = os.open(path, os.O_RDWR)
        for _ in range(6):  # overwrites, each made durable by fdatasync
            b = rng.randrange(NB)
            blocks[b] = os.urandom(BS)
            os.pwrite(fd, blocks[b], b * BS)
            os.fdatasync(fd)
        assert _seen(s, journal) == 0, "fdatasync of overwrites wrote a redo-log record"
        assert _seen(s, volume) >= 6
        maybe: dict[int, list[bytes]] = {}
        for _ in range(6):  # overwrites nobody synced: old or new content after the cut
            b = rng.randrange(NB)
            data = os.urandom(BS)
            os.pwrite(fd, data, b * BS)
            maybe.setdefault(b, []).append(data)
        os.close(fd)
        s.power_cut(rng.choice(["none", "random"]), rng.randrange(1 << 30))
        s.mount()
        got = path.read_bytes()
        assert len(got) == NB * BS
        for b in range(NB):
            blk = got[b * BS:(b + 1) * BS]
            assert blk == blocks[b] or blk in maybe.get(b, ()), (
                f"round {rnd}: block {b} holds neither its fdatasync'd nor a later content")
            blocks[b] = blk
    # A larger size is metadata fdatasync must keep: within the last mapped block (no new
    # block), then into a new block. Both commit (the redo log is synced) and survive a cut.
    journal, _ = _counters(s)
    with open(path, "r+b") as f:
        f.truncate(NB * BS - 1000)
        os.fsync(f.fileno())
        synced = _seen(s, journal)
        f.seek(NB * BS - 1000)
        f.write(b"a" * 500)  # grows the size inside a mapped block
        f.flush()
        os.fdatasync(f.fileno())
        assert _seen(s, journal) > synced, "fdatasync of a larger size skipped the commit"
        synced = _seen(s, journal)
        f.write(b"b" * 1000)  # into a new block
        f.flush()
        os.fdatasync(f.fileno())
        assert _seen(s, journal) > synced
    s.power_cut("none")
    s.mount()
    got = path.read_bytes()
    assert got == b"".join(blocks)[:NB * BS - 1000] + b"a" * 500 + b"b" * 1000
    s.finish()
