"""Tier 2: `repfs-admin verify --to DEST` between real daemons (repfs/repl/verify.py).

A primary and its secondary, on this host (the control port) and over RCP on 127.0.0.1: in
sync, verify says so and exits 0; a block of a file damaged in the secondary's volume.img
(the secondary unmounted, the block overwritten, mounted again) is listed with the file's
path and verify exits 1; `--repair` re-sends it, a second verify is in sync and the file
reads back equal on the secondary. Bad input gets one line and a non-zero exit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import run_repfs
from tests.t2_rcp import GROUP, address, port_of, remote_pair
from tests.t2_repl import admin, cut, start_replication, status, wait_converged

BS = 4096
MARK = b"VERIFY-VICTIM-%04d"


def victim_data(blocks: int = 8) -> bytes:
    """File content whose every block starts with a marker naming it (found in a volume)."""
    out = bytearray()
    for i in range(blocks):
        out += (MARK % i).ljust(BS, bytes([i + 1]))
    return bytes(out)


def block_of(site: Path, marker: bytes) -> int:
    """The block of SITE's volume.img that starts with `marker` (exactly one)."""
    found = []
    with open(site / "volume.img", "rb") as f:
        base = 0
        while True:
            buf = f.read(16 << 20)
            if not buf:
                break
            at = buf.find(marker)
            while at >= 0:
                if at % BS == 0:
                    found.append((base + at) // BS)
                at = buf.find(marker, at + 1)
            base += len(buf)
    assert len(found) == 1, found
    return found[0]


def verify(m1, to, *args):
    r = admin(m1.path, "verify", "--to", to, *args, check=False)
    assert len(r.stderr.strip().splitlines()) <= 1, r.stderr
    return r


def verify_json(m1, to, *args) -> tuple[int, dict]:
    r = admin(m1.path, "verify", "--to", to, *args, check=False, json_out=True)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def damage_and_repair(m1, m2, to: str, mount_args=(), *, text: bool = True) -> None:
    """Damage one block of /dir/victim.bin in the secondary's volume, then find and repair
    it (`text`: also check the text output of a verify that finds it)."""
    m1.expect_log("differs at delta set")  # (a differing secondary is a warning)
    (m1.path / "dir").mkdir()
    data = victim_data()
    (m1.path / "dir" / "victim.bin").write_bytes(data)
    (m1.path / "other.bin").write_bytes(os.urandom(64 << 10))
    wait_converged(m1, m2, cut(m1))
    r = verify(m1, to)
    assert r.returncode == 0, r.stderr
    assert "in sync at delta set" in r.stdout, r.stdout

    # damage block 3 of the file in the secondary's volume (unmounted meanwhile)
    b = block_of(m2.site, MARK % 3)
    run_repfs("umount", m2.path)
    with open(m2.site / "volume.img", "r+b") as f:
        f.seek(b * BS)
        f.write(b"\xa5" * BS)
    run_repfs("mount", m2.site, m2.path, *mount_args)
    assert (m2.path / "dir" / "victim.bin").read_bytes() != data  # (the damage shows)

    if text:
        r = verify(m1, to)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert f"block {b}: /dir/victim.bin" in r.stdout, r.stdout
        assert "differs at delta set" in r.stdout and "1 blocks" in r.stdout, r.stdout
    rc, doc = verify_json(m1, to, "--repair")
    assert rc == 0, doc
    before = doc["repaired"]["before"]
    assert not before["in_sync"] and before["differing_blocks"] == 1, before
    assert before["files"] == ["/dir/victim.bin"], before
    assert before["differences"] == [{"start": b, "count": 1, "owners": ["/dir/victim.bin"]}]
    # verified again after the repair, at a later boundary: in sync
    assert doc["in_sync"] and doc["differing_blocks"] == 0, doc
    assert doc["delta_set"] > doc["repaired"]["delta_set"] > before["delta_set"], doc
    # the secondary's kernel cache of the file dropped (it was read damaged above)
    assert (m2.path / "dir" / "victim.bin").read_bytes() == data
    # no verify snapshot left on the primary, none shown
    assert not [s for s in status(m1.path)["snapshots"] if "verify" in s["name"]]


def test_verify_local_destination(mount_site):
    m1 = mount_site("256M", name="s1")
    m2 = mount_site("256M", name="s2")
    admin(m1.path, "replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    start_replication(m1, m2)
    r = verify(m1, "s2")  # by its name (then by its site directory)
    assert r.returncode == 0 and "s2: in sync at delta set" in r.stdout, (r.stdout, r.stderr)
    damage_and_repair(m1, m2, str(m2.site))
    # bad input: one line, non-zero
    r = verify(m1, "nosuch")
    assert r.returncode == 1 and "no destination 'nosuch'" in r.stderr, r.stderr
    assert "replicates to: s2" in r.stderr, r.stderr
    r = verify(m2, str(m1.site))  # a secondary is not the one to ask
    assert r.returncode == 1 and "secondary" in r.stderr, r.stderr


def test_verify_over_rcp(mount_site):
    m1, m2 = remote_pair(mount_site)
    to = address(m2)
    start_replication(m1, m2, "--group", GROUP, to=to)
    damage_and_repair(m1, m2, to, mount_args=("--listen", f"127.0.0.1:{port_of(m2.site)}"),
                      text=False)
