"""Tier 1: a delta-set cut whose syncs run after the writers' gate opens (Primary.cut,
Operations.cut_point, DeltaSets.cut_begin / cut_written / cut_ready, deltaset.undo_unready).

Under the gate only the running transaction is closed in memory (prepare_commit) and the cut
recorded in one LMDB commit, as state "cut" with the transaction's metadata blocks in its
block list; the writers go on; the transaction is then committed (its blocks reach the
volume after the cut: the pin must not save them as before-images), the redo log emptied,
and only then is the delta set "ready" (sent). Driven here on a real site's stack without a
mount, in the order cut_point runs them (tests/t1_changelog.py's Stack and checks).

A crash between the cut and "ready" (kill -9 in a child process, at each step) must undo
the delta set at the next open: its block list back in the change log (its old table, which
the change log's recovery merges), the record, block list and pin gone, last_cut back, and
the next cut ships every one of its blocks with their content at the new boundary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from repfs.pagedbits import PagedBits
from repfs.repl import keys as K
from repfs.repl.deltaset import PIN_PREFIX, undo_unready
from repfs.site import Site
from repfs.snap.store import open_env
from tests.conftest import fsck_clean
from tests.t1_changelog import (BS, ROOT_DIR, VOL, Image, Stack, block_list, check_set,
                                digest, image, read_stream)


def cut_point(st: Stack, between=None, after_commit=None,
              prepare: bool = False) -> tuple[int, set[int], Image, list]:
    """What Operations.cut_point and Primary.cut do, on the stack: returns the delta set's
    number, the blocks its list must hold, the volume at its boundary and the closing
    commit's metadata blocks. `between()` runs
    where writers go on (after the gate, before the commit); `after_commit()` after the
    commit, before "ready" — no commit may run there (the commit lock is held)."""
    pre = st.sets.cut_prepare() if prepare else None  # (Primary.cut: before the gate)
    txn = st.fs.prepare_commit()
    meta = sorted(txn[1]) if txn else []
    written = st.rec.take() | set(meta)
    n = st.sets.cut_begin(meta, prepared=pre)
    if pre is not None:
        assert st.sets.pin(n) is pre, "the prepared pin was not taken"
    rec = st.sets.record(n)
    assert rec["state"] == "cut" and rec["blocks"] == len(written)
    assert block_list(st.sets, n) == written
    boundary = image(st.clog)  # the volume now, plus the transaction's blocks
    raw = bytearray(boundary.raw)
    for b, data in (txn[1].items() if txn else ()):
        raw[b * BS:(b + 1) * BS] = data
        boundary.digests[b] = digest(data)
    boundary.raw = bytes(raw)
    if between is not None:
        between()
    if txn is not None:
        st.fs.write_commit(txn)
        st.sets.cut_written(n, meta)
        st.fs.finish_commit()
        # the commit's blocks are this delta set's content, not a change after it (only the
        # commit writes metadata blocks, and no other commit runs in between)
        assert not st.clog.new.get_range(0, st.clog.nblocks)[meta].any()
        st.rec.written.difference_update(meta)
    if after_commit is not None:
        after_commit()
    st.fs.clear_journal()
    st.sets.cut_ready(n)
    assert st.sets.record(n)["state"] == "ready"
    return n, written, boundary, meta


def test_a_cut_point_ships_its_boundary_though_its_commit_and_writes_come_after_it(tmp_path):
    """The closing commit's metadata blocks (inode, bitmap, block-map blocks, some of them
    also written by an earlier commit of the same interval) reach the volume after the cut,
    and writers overwrite the delta set's blocks before that commit: the delta set still
    streams exactly its boundary, and the previous boundary plus it is this boundary."""
    st = Stack(tmp_path / "s")
    try:
        prev = image(st.clog)
        twice = 0
        for rnd in range(5):
            big = [st.new_file(256 << 10) for _ in range(3)]
            for _ in range(25):
                st.op()
            st.fs.commit()  # the interval's metadata written once ...
            alive = [f for f in big if f in st.files]
            for ino in alive:  # ... and changed again (sizes, block maps) before the cut
                st.fs.write(ino, st.fs.getattr(ino).size, st.rng.randbytes(3 * BS + 5))

            def writers_go_on():  # (no commit: the commit lock is held)
                for ino in alive:
                    st.overwrite_all(ino)
                st.new_file(100 << 10)

            interval = set(np.flatnonzero(st.clog.new.get_range(0, st.clog.nblocks)).tolist())
            n, written, boundary, meta = cut_point(st, between=writers_go_on,
                                                   prepare=rnd % 2 == 0)
            twice += len(interval & set(meta))
            # a later commit overwrites the same metadata blocks: the pin keeps them
            for _ in range(10):
                st.op()
            st.fs.commit()
            check_set(st, n, written, prev, boundary)
            prev = boundary
        assert twice, "no metadata block was written both before and at the cut"
    finally:
        st.close()


def test_an_empty_interval_with_only_a_commit_still_cuts_its_metadata(tmp_path):
    """No block was written since the last cut, but the running transaction holds changes
    (times of a file read and touched): the delta set is those metadata blocks."""
    st = Stack(tmp_path / "s")
    try:
        ino = st.new_file(64 << 10)
        st.cut()
        prev = image(st.clog)
        st.rec.take()
        st.fs.setattr(ino, mode=0o600)
        assert not st.clog.new, "a setattr wrote a block before its commit"
        n, written, boundary, meta = cut_point(st, prepare=True)
        assert written == set(meta) and st.sets.pin(n) is not None
        check_set(st, n, written, prev, boundary)
    finally:
        st.close()


CHILD = r"""
import json, os, random, signal, sys
sys.path.insert(0, {root!r})
from tests.t1_cut_point import child_main
child_main({args!r})
"""


def child_main(args: dict) -> None:
    """In a child: a stack with one delta set cut whole, then writes through the file
    system, a cut point killed by SIGKILL at `args["at"]`: after the cut's commit, after
    the closing commit, or after the redo log was emptied (each before "ready")."""
    st = Stack(Path(args["site"]), create=False)
    for _ in range(20):
        st.op()
    st.cut()
    for _ in range(30):
        st.op()
    ino = st.new_file(200 << 10)
    st.fs.write(ino, 0, st.rng.randbytes(5 * BS))
    txn = st.fs.prepare_commit()
    meta = sorted(txn[1])
    n = st.sets.cut_begin(meta)
    report = {"n": n, "blocks": sorted(block_list(st.sets, n)),
              "pin": st.sets.pin(n).id, "meta": meta}
    at = args["at"]
    if at != "cut":
        st.fs.write_commit(txn)
        st.sets.cut_written(n, meta)
        st.fs.finish_commit()
        if at == "cleared":
            st.fs.clear_journal()
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("at", ["cut", "committed", "cleared"])
def test_a_cut_killed_before_it_is_ready_is_undone_at_reopen(tmp_path, at):
    site_path = tmp_path / "s"
    st = Stack(site_path)
    for _ in range(10):
        st.op()
    st.cut()
    st.close()
    code = CHILD.format(root=str(ROOT_DIR), args={"site": str(site_path), "at": at})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=ROOT_DIR)
    assert r.returncode == -signal.SIGKILL, f"child exited {r.returncode}: {r.stderr[-3000:]}"
    report = json.loads(r.stdout.strip().splitlines()[-1])
    n, blocks = report["n"], np.array(report["blocks"], dtype=np.int64)
    assert len(blocks)

    # the undo itself, on the LMDB environment before anything else opens the site: the
    # block list is in the change log's old table, the delta set gone, last_cut back
    env = open_env(site_path)
    try:
        db_sets = env.open_db(K.DELTASETS)
        with env.begin(db=db_sets) as txn:
            assert json.loads(txn.get(K.u64(n)))["state"] == "cut"
        assert undo_unready(env) == [n]
        old = PagedBits()
        db_old, db_bits, db_ctx = (env.open_db(K.CLOG_OLD), env.open_db(K.DSBITS),
                                   env.open_db(K.CTX))
        with env.begin() as txn:
            for key, val in txn.cursor(db=db_old):
                old.pages[K.from_u32(key)] = np.frombuffer(val, np.uint8).copy()
            assert txn.get(K.u64(n), db=db_sets) is None
            cur = txn.cursor(db=db_bits)
            assert not (cur.set_range(K.ds_page(n, 0)) and cur.key()[:8] == K.u64(n))
            assert K.from_u64(txn.get(b"last_cut", db=db_ctx)) == n - 1
            assert K.from_u64(txn.get(b"first_change_ns", db=db_ctx)) > 0
        missing = blocks[~old.get_range(0, VOL // BS)[blocks]]
        assert not len(missing), f"{len(missing)} blocks of the undone delta set not in " \
                                 f"the change log, e.g. {missing[:8].tolist()}"
        assert undo_unready(env) == []  # idempotent
    finally:
        env.close()

    # reopened as a mount does: the pin is gone, its blocks marked, the next cut ships them
    st = Stack(site_path, create=False)
    try:
        assert st.sets.last_cut == n - 1
        assert st.sets.pin(n) is None
        assert f"{PIN_PREFIX}{n}" not in [p.name for p in st.snap.store.queue]
        assert not (site_path / "save" / f"{report['pin']}.save").exists()
        marks = st.clog.new.get_range(0, st.clog.nblocks)
        assert marks[blocks].all(), "the undone delta set's blocks lost their marks"
        n2, _, boundary = st.cut()
        assert n2 == n
        entries, _ = read_stream(st.sets, n2)
        shipped = {b for b, _ in entries}
        assert set(blocks.tolist()) <= shipped
        for b, data in entries:
            assert data == boundary[b]
    finally:
        st.close()
    fsck_clean(site_path)


def test_a_prepared_pin_not_taken_by_an_empty_cut_is_discarded(tmp_path):
    """Primary.cut makes the pin's save volume before the gate; a cut with nothing to ship
    pins nothing, and the prepared save volume goes (its file too)."""
    st = Stack(tmp_path / "s")
    try:
        st.new_file(64 << 10)
        st.cut()
        pre = st.sets.cut_prepare()
        assert pre.save.path.exists()
        assert st.fs.prepare_commit() is None  # nothing changed since the cut
        n = st.sets.cut_begin((), prepared=pre)
        assert st.sets.pin(n) is None and not st.sets.record(n)["pinned"]
        st.sets.store.discard_prepared(pre)  # what Primary.cut does with an untaken one
        assert not pre.save.path.exists()
        st.sets.cut_ready(n)
        assert [p.name for p in st.sets.pins()] == [f"{PIN_PREFIX}{n - 1}"]
    finally:
        st.close()
