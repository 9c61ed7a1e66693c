"""t1: the FileSystem core without a mount, checked against what ext4 does.

Every test runs on a fresh volume (`core_fs` / `make_fs`); afterwards the fixture checkpoints,
reopens and fsck's each volume, so every test also proves that it left a clean file system.

The core keeps the kernel's lookup counts: create/mkdir/mknod/symlink/link/lookup take one
reference, `forget` drops them; an unlinked inode lives until it is closed and forgotten.
The helpers below drop the references the way the kernel eventually would.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import stat
import time

import pytest

from repfs.fs import core as core_mod
from repfs.fs.core import Ctx, FileSystem
from repfs.fs.errors import FSError
from repfs.fs.format import (
    BLOCK_SIZE, HASH_BITS, MAX_FILE_SIZE, ROOT_INO, FormatError, name_hash,
)
from repfs.fs.fsck import fsck
from repfs.volume import Volume

BS = BLOCK_SIZE
ROOT = ROOT_INO


# ------------------------------------------------------------------------------ helpers


def mkfile(fs, name: bytes, data: bytes = b"", parent: int = ROOT, mode: int = 0o644) -> int:
    """create + write + release + forget: a closed file nobody references."""
    f = fs.create(parent, name, mode)
    if data:
        assert fs.write(f.ino, 0, data) == len(data)
    fs.release(f.ino)
    fs.forget(f.ino, 1)
    return f.ino


def mkdir(fs, name: bytes, parent: int = ROOT, mode: int = 0o755) -> int:
    d = fs.mkdir(parent, name, mode)
    fs.forget(d.ino, 1)
    return d.ino


def look(fs, parent: int, name: bytes):
    """lookup without keeping the reference."""
    inode = fs.lookup(parent, name)
    fs.forget(inode.ino, 1)
    return inode


def names(fs, ino: int) -> list[bytes]:
    ents = [n for n, _, _ in fs.readdir(ino, 0)]
    assert ents[:2] == [b".", b".."]
    return ents[2:]


def nlink(fs, ino: int) -> int:
    return fs.getattr(ino).nlink


def err(code: int, fn, *args, **kw):
    with pytest.raises(FSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == code, f"{fn.__name__}: {errno.errorcode.get(ei.value.errno)}, " \
                                   f"want {errno.errorcode[code]}"


def paths_of(make_fs, fs):
    for f, img, jnl in make_fs.made:
        if f is fs:
            return img, jnl
    raise KeyError(fs)


def replace_fs(make_fs, old, new) -> None:
    for i, (f, img, jnl) in enumerate(make_fs.made):
        if f is old:
            make_fs.made[i] = (new, img, jnl)
            return
    raise KeyError(old)


def crash_reopen(make_fs, fs) -> FileSystem:
    """Drop the FileSystem without any commit or checkpoint (kill -9) and open it again."""
    img, jnl = paths_of(make_fs, fs)
    fs.journal.close()
    fs.dev.close()
    new = FileSystem(Volume(img), jnl)
    replace_fs(make_fs, fs, new)
    return new


def fsck_now(make_fs, fs) -> FileSystem:
    """Remount read-only, fsck, remount read-write; returns the new FileSystem."""
    ro = make_fs.reopen(fs, readonly=True)
    report = fsck(ro)
    assert report.clean, "fsck: " + "; ".join(p.message for p in report.problems)
    return make_fs.reopen(ro)


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def free_blocks(fs) -> int:
    return fs.statfs()["f_bfree"]


# ------------------------------------------------------------------------------ data


def test_create_write_read_roundtrip(core_fs):
    fs = core_fs
    f = fs.create(ROOT, b"f", 0o644)
    assert stat.S_ISREG(f.mode) and f.size == 0 and f.nlink == 1
    assert fs.read(f.ino, 0, 10) == b""
    assert fs.write(f.ino, 0, b"hello") == 5
    assert fs.read(f.ino, 0, 100) == b"hello"
    assert fs.read(f.ino, 1, 3) == b"ell"
    assert fs.read(f.ino, 5, 10) == b""
    assert fs.read(f.ino, 500, 10) == b""
    assert fs.write(f.ino, 0, b"") == 0
    assert fs.getattr(f.ino).size == 5
    fs.release(f.ino)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_writes_and_reads_against_model(make_fs, seed):
    rng = random.Random(seed)
    fs = make_fs()
    f = fs.create(ROOT, b"data", 0o644)
    ino = f.ino
    model = bytearray()
    far = [0, 4095, 4096, 12 * BS - 3, 1036 * BS - 1, 3 << 20, (1036 + 1024) * BS + 7]
    for step in range(250):
        r = rng.random()
        if r < 0.6:
            off = rng.choice([rng.randrange(0, len(model) + 9000), rng.choice(far)
                              + rng.randrange(-3, 4)])
            off = max(0, off)
            n = rng.choice([1, 2, 100, 4095, 4096, 4097, rng.randrange(1, 70000)])
            data = rng.randbytes(n)
            assert fs.write(ino, off, data) == n
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + n] = data
        elif r < 0.75:
            size = rng.choice([0, rng.randrange(0, len(model) + 1), len(model) + rng.randrange(
                0, 50000), rng.choice(far)])
            fs.setattr(ino, size=size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        else:
            if step % 37 == 0:
                fs.commit()
        assert fs.getattr(ino).size == len(model)
        off = rng.randrange(0, len(model) + 10)
        n = rng.randrange(0, 80000)
        assert fs.read(ino, off, n) == bytes(model[off:off + n]), (seed, step)
    assert fs.read(ino, 0, len(model) + 1) == bytes(model)
    fs.release(ino)
    fs.forget(ino, 1)
    fs = make_fs.reopen(fs)
    assert fs.getattr(ino).size == len(model)
    assert fs.read(ino, 0, len(model)) == bytes(model)


def test_holes_read_zeros_and_take_no_space(core_fs):
    fs = core_fs
    free0 = free_blocks(fs)
    ino = mkfile(fs, b"sparse")
    off = 10 << 20
    assert fs.write(ino, off, b"tail") == 4
    inode = fs.getattr(ino)
    assert inode.size == off + 4
    assert inode.blocks <= 3  # one data block and its indirect blocks
    assert free0 - free_blocks(fs) == inode.blocks
    assert fs.read(ino, 0, 4096) == bytes(4096)
    assert fs.read(ino, off - 5000, 5004) == bytes(5000) + b"tail"
    assert fs.read(ino, 123457, 1 << 20) == bytes(1 << 20)
    # write in the middle of the hole
    assert fs.write(ino, 5 << 20, b"mid") == 3
    assert fs.read(ino, (5 << 20) - 1, 5) == b"\0mid\0"


def test_sparse_file_near_one_tib(make_fs):
    fs = make_fs()
    free0 = free_blocks(fs)
    ino = mkfile(fs, b"sparse")
    tib = 1 << 40
    assert fs.write(ino, tib - 3, b"0123456") == 7  # straddles the 1 TiB mark
    a = fs.getattr(ino)
    assert a.size == tib + 4
    assert a.blocks <= 2 + 5  # two data blocks and their triple-indirect path
    assert free0 - free_blocks(fs) == a.blocks
    assert fs.read(ino, tib - 10, 100) == bytes(7) + b"0123456"
    assert fs.read(ino, tib // 2, 1 << 16) == bytes(1 << 16)
    fs.commit()
    fs = make_fs.reopen(fs)
    assert fs.read(ino, tib - 3, 7) == b"0123456"
    fs.setattr(ino, size=tib - 2)
    fs.setattr(ino, size=tib + 4)
    assert fs.read(ino, tib - 3, 7) == b"0" + bytes(6)
    fs.unlink(ROOT, b"sparse")
    fs.commit()
    assert free_blocks(fs) == free0


def test_write_past_eof_zero_fills_gap_in_same_block(core_fs):
    fs = core_fs
    ino = mkfile(fs, b"f", b"abc")
    assert fs.write(ino, 10, b"xyz") == 3
    assert fs.read(ino, 0, 100) == b"abc" + bytes(7) + b"xyz"
    assert fs.write(ino, 4090, b"0123456789") == 10  # straddles a block boundary
    assert fs.read(ino, 4085, 20) == bytes(5) + b"0123456789"
    assert fs.getattr(ino).size == 4100


def test_overwrite_in_place_keeps_blocks(core_fs):
    fs = core_fs
    data = pattern(300_000, 1)
    ino = mkfile(fs, b"f", data)
    blocks = fs.getattr(ino).blocks
    free = free_blocks(fs)
    patch = pattern(5000, 2)
    assert fs.write(ino, 4000, patch) == 5000
    want = data[:4000] + patch + data[9000:]
    assert fs.read(ino, 0, 400_000) == want
    assert fs.getattr(ino).blocks == blocks and free_blocks(fs) == free


def test_truncate_down_then_up_reads_zeros(core_fs):
    fs = core_fs
    data = pattern(5 * BS + 123, 3)
    ino = mkfile(fs, b"t", data)
    fs.setattr(ino, size=5000)
    assert fs.getattr(ino).size == 5000
    assert fs.read(ino, 0, 10 * BS) == data[:5000]
    fs.setattr(ino, size=6 * BS)
    assert fs.read(ino, 0, 10 * BS) == data[:5000] + bytes(6 * BS - 5000)
    # re-extending by writing past EOF also shows zeros between
    fs.setattr(ino, size=100)
    assert fs.write(ino, 3 * BS, b"Z") == 1
    assert fs.read(ino, 0, 10 * BS) == data[:100] + bytes(3 * BS - 100) + b"Z"
    # truncate to a block boundary, then grow inside the same block range
    fs.setattr(ino, size=BS)
    fs.setattr(ino, size=BS + 10)
    assert fs.read(ino, 0, 2 * BS) == data[:100] + bytes(BS - 100) + bytes(10)
    fs.setattr(ino, size=0)
    assert fs.read(ino, 0, 10) == b""
    fs.setattr(ino, size=BS * 3)
    assert fs.read(ino, 0, BS * 3) == bytes(BS * 3)
    assert fs.getattr(ino).blocks == 0


def test_truncate_zeroes_tail_across_commit_and_reopen(make_fs):
    fs = make_fs()
    data = pattern(3 * BS, 4)
    ino = mkfile(fs, b"t", data)
    fs.commit()
    fs.setattr(ino, size=BS + 1)
    fs.commit()
    fs = make_fs.reopen(fs)
    fs.setattr(ino, size=3 * BS)
    assert fs.read(ino, 0, 3 * BS) == data[:BS + 1] + bytes(2 * BS - 1)


def test_truncate_frees_blocks_after_commit(core_fs):
    fs = core_fs
    free0 = free_blocks(fs)
    ino = mkfile(fs, b"big", pattern(5 << 20, 5))  # single and double indirect
    used = free0 - free_blocks(fs)
    assert fs.getattr(ino).blocks == used == (5 << 20) // BS + 1 + 2
    fs.setattr(ino, size=100 * BS + 1)
    fs.commit()
    assert fs.getattr(ino).blocks == 101 + 1  # data + single indirect block
    assert free0 - free_blocks(fs) == 102
    fs.setattr(ino, size=0)
    fs.commit()
    assert fs.getattr(ino).blocks == 0
    assert free_blocks(fs) == free0


def test_efbig_write_and_truncate_allocate_nothing(core_fs):
    fs = core_fs
    f = fs.create(ROOT, b"huge", 0o644)
    ino = f.ino
    free = free_blocks(fs)
    err(errno.EFBIG, fs.write, ino, MAX_FILE_SIZE, b"x")
    err(errno.EFBIG, fs.write, ino, MAX_FILE_SIZE + 12345, b"x" * 5000)
    err(errno.EFBIG, fs.write, ino, 2**62, b"x")
    err(errno.EFBIG, fs.setattr, ino, size=MAX_FILE_SIZE + 1)
    err(errno.EFBIG, fs.setattr, ino, size=2**63 - 1)
    inode = fs.getattr(ino)
    assert inode.size == 0 and inode.blocks == 0 and inode.map == [0] * 15
    assert free_blocks(fs) == free
    # exactly the limit is allowed
    fs.setattr(ino, size=MAX_FILE_SIZE)
    assert fs.getattr(ino).size == MAX_FILE_SIZE and fs.getattr(ino).blocks == 0
    assert fs.read(ino, MAX_FILE_SIZE - 10, 100) == bytes(10)
    # a write crossing the limit is short (as ext4 does), then EFBIG
    assert fs.write(ino, MAX_FILE_SIZE - 10, b"y" * 100) == 10
    assert fs.read(ino, MAX_FILE_SIZE - 11, 100) == b"\0" + b"y" * 10
    assert fs.getattr(ino).size == MAX_FILE_SIZE
    err(errno.EFBIG, fs.write, ino, MAX_FILE_SIZE, b"y")
    fs.setattr(ino, size=0)
    fs.release(ino)
    fs.forget(ino, 1)
    fs.commit()
    assert free_blocks(fs) == free


def test_enospc_fill_volume_nothing_damaged(make_fs):
    fs = make_fs(size=8 << 20)
    keep = pattern(100_000, 6)
    keep_ino = mkfile(fs, b"keep", keep)
    fs.commit()
    free_before_fill = free_blocks(fs)
    f = fs.create(ROOT, b"fill", 0o644)
    chunk = 256 << 10
    written = 0
    saw_short = False
    with pytest.raises(FSError) as ei:
        for i in range(1000):
            n = fs.write(f.ino, written, pattern(chunk, 100 + i))
            assert 0 < n <= chunk
            if n < chunk:
                saw_short = True
            written += n
    assert ei.value.errno == errno.ENOSPC
    assert written > (6 << 20)
    assert fs.getattr(f.ino).size == written
    st = fs.statfs()
    assert st["f_bavail"] <= 8  # the data area is full (bar rounding)
    # everything acknowledged reads back
    got = fs.read(f.ino, 0, written)
    want = b"".join(pattern(chunk, 100 + i) for i in range(-(-written // chunk)))[:written]
    assert got == want
    assert saw_short or written % chunk == 0
    assert fs.read(keep_ino, 0, 200_000) == keep
    # further writes fail without changing anything
    size = fs.getattr(f.ino).size
    err(errno.ENOSPC, fs.write, f.ino, size, b"x" * 10000)
    g = fs.create(ROOT, b"other", 0o644)
    err(errno.ENOSPC, fs.write, g.ino, 0, b"x" * BS * 20)
    assert fs.getattr(g.ino).size == 0
    fs.release(g.ino)
    fs.forget(g.ino, 1)
    assert fs.getattr(f.ino).size == size
    fs.release(f.ino)
    fs.forget(f.ino, 1)
    fs.commit()
    fs = fsck_now(make_fs, fs)
    assert fs.read(look(fs, ROOT, b"fill").ino, 0, written) == want
    # delete: the space comes back once the deletion committed
    fs.unlink(ROOT, b"fill")
    fs.unlink(ROOT, b"other")
    fs.commit()
    assert free_blocks(fs) == free_before_fill
    h = mkfile(fs, b"again", pattern(4 << 20, 7))
    assert fs.read(h, 0, 4 << 20) == pattern(4 << 20, 7)
    assert fs.read(keep_ino, 0, 200_000) == keep


L3_START = 12 + 1024 + 1024**2  # first logical block mapped through the triple indirect


def test_enospc_failed_write_allocates_nothing(make_fs):
    # A write the volume cannot hold fails with ENOSPC (or is short) and leaves nothing
    # behind: no block allocated, nothing mapped past EOF, no stale data exposed.
    # Two bytes straddling two triple-indirect subtrees need five indirect blocks besides
    # the two data blocks; tried at every free-space level near full.
    fs = make_fs(size=8 << 20)
    # blocks that get freed hold an old file's bytes ("S"); they must never reappear
    old = fs.create(ROOT, b"old", 0o644)
    off = 0
    with pytest.raises(FSError):
        while True:
            off += fs.write(old.ino, off, b"S" * (1 << 20))
    fs.setattr(old.ino, size=0)
    fs.release(old.ino)
    fs.forget(old.ino, 1)
    fs.commit()
    fill = fs.create(ROOT, b"fill", 0o644).ino
    pos = 0
    while fs.statfs()["f_bavail"] > 40:
        pos += fs.write(fill, pos, b"x" * (16 * BS))
    victim_off = (L3_START + 1024**2 - 1) * BS + BS - 1
    for level in range(12, -1, -1):
        while fs.statfs()["f_bavail"] > level:
            pos += fs.write(fill, pos, b"x" * BS)
        v = fs.create(ROOT, b"victim", 0o644).ino
        fs.commit()
        free = free_blocks(fs)
        try:
            n = fs.write(v, victim_off, b"ab")
        except FSError as e:
            assert e.errno == errno.ENOSPC
            a = fs.getattr(v)
            assert (a.size, a.blocks) == (0, 0), f"level {level}: a failed write left " \
                f"{a.blocks} blocks allocated to the file"
            assert free_blocks(fs) == free, f"level {level}: a failed write took " \
                f"{free - free_blocks(fs)} blocks"
            fs.setattr(v, size=victim_off + 2)
            assert fs.read(v, victim_off - BS, BS + 2) == bytes(BS + 2), \
                f"level {level}: bytes of a deleted file are readable past a failed write"
        else:
            assert n in (1, 2)
            assert fs.read(v, victim_off, 2) == b"ab"[:n]
        fs.release(v)
        fs.forget(v, 1)
        fs.unlink(ROOT, b"victim")
        fs.commit()
    fs.release(fill)
    fs.forget(fill, 1)


def _colliding_names(count: int, top_bits: int = 12) -> list[bytes]:
    """255-byte names whose hashes share their top bits: they share one bucket chain."""
    out, i = [], 0
    while len(out) < count:
        n = (b"%d-" % i).ljust(255, b"c")
        if name_hash(n) >> (HASH_BITS - top_bits) == 0:
            out.append(n)
        i += 1
    return out


def test_enospc_directory_insert_leaks_nothing(make_fs):
    # A directory whose next overflow block is its 13th (the first one reached through the
    # single-indirect block) on a volume with one free block: the insert must fail with
    # ENOSPC and allocate nothing (the indirect block would fit, the bucket block not).
    fs = make_fs(size=8 << 20)
    names_ = _colliding_names(61)
    d = mkdir(fs, b"D")
    for n in names_[:60]:
        fs.forget(fs.mknod(d, n, stat.S_IFREG | 0o644, 0).ino, 1)
    hdr = fs.dirs.header(fs.getattr(d))
    assert hdr.nblocks == 12 and fs.getattr(d).map[12] == 0, hdr  # the scenario's premise
    spare = [fs.mknod(ROOT, b"x%d" % k, stat.S_IFREG | 0o644, 0).ino for k in range(40)]
    for ino in spare:
        fs.forget(ino, 1)
    fill = fs.create(ROOT, b"fill", 0o644).ino
    off = 0
    with pytest.raises(FSError):
        while True:
            off += fs.write(fill, off, b"z" * (1 << 20))
    fs.release(fill)
    fs.forget(fill, 1)
    k = 0
    while fs.statfs()["f_bfree"] > 1:  # metadata may use the reserve: one xattr block each
        fs.setxattr(spare[k], b"user.a", b"1")
        k += 1
    fs.commit()
    assert free_blocks(fs) == 1
    err(errno.ENOSPC, fs.mknod, d, names_[60], stat.S_IFREG | 0o644, 0)
    err(errno.ENOSPC, fs.link, spare[0], d, names_[60])
    fs.commit()
    assert free_blocks(fs) == 1, "a failed directory insert kept a block"
    assert fs.getattr(d).blocks == 12
    assert len(names(fs, d)) == 60
    fsck_now(make_fs, fs)


def test_enospc_metadata_exhausted(make_fs):
    fs = make_fs(size=2 << 20, inodes=1024)
    free0 = free_blocks(fs)
    root_blocks0 = fs.getattr(ROOT).blocks
    ffree0 = fs.statfs()["f_ffree"]
    made = []
    with pytest.raises(FSError) as ei:
        for i in range(10000):
            mkdir(fs, b"d%d" % i)
            made.append(b"d%d" % i)
    assert ei.value.errno == errno.ENOSPC
    assert len(made) > 100
    # with no blocks left, everything that needs one fails cleanly
    err(errno.ENOSPC, fs.mkdir, ROOT, b"more", 0o755)
    err(errno.ENOSPC, fs.symlink, ROOT, b"sl", b"target")
    d0 = look(fs, ROOT, made[0]).ino
    err(errno.ENOSPC, fs.setxattr, d0, b"user.a", b"v")
    assert fs.listxattr(d0) == []
    # operations that need no block still work (or fail with ENOSPC, nothing in between)
    try:
        mkfile(fs, b"empty-file")
    except FSError as e:
        assert e.errno == errno.ENOSPC
    fs.rename(ROOT, made[1], d0, b"moved")
    assert names(fs, d0) == [b"moved"]
    fs.commit()
    fs = fsck_now(make_fs, fs)
    fs.rename(look(fs, ROOT, made[0]).ino, b"moved", ROOT, made[1])
    for n in made:
        fs.rmdir(ROOT, n)
    try:
        fs.unlink(ROOT, b"empty-file")
    except FSError as e:
        assert e.errno == errno.ENOENT
    fs.commit()
    # directories do not shrink (as in ext4): the root keeps the blocks it grew by
    assert free_blocks(fs) == free0 - (fs.getattr(ROOT).blocks - root_blocks0)
    assert fs.statfs()["f_ffree"] == ffree0
    assert nlink(fs, ROOT) == 2
    mkdir(fs, b"works-again")


def test_enospc_inodes(make_fs):
    fs = make_fs(inodes=32)
    st = fs.statfs()
    assert st["f_files"] == 31 and st["f_ffree"] == 30
    inos = []
    with pytest.raises(FSError) as ei:
        for i in range(100):
            inos.append(mkfile(fs, b"f%d" % i))
    assert ei.value.errno == errno.ENOSPC
    assert len(inos) == 30 and len(set(inos)) == 30
    assert fs.statfs()["f_ffree"] == 0
    for fn, args in [(fs.mkdir, (ROOT, b"d", 0o755)), (fs.symlink, (ROOT, b"s", b"t")),
                     (fs.mknod, (ROOT, b"p", stat.S_IFIFO | 0o600, 0)),
                     (fs.create, (ROOT, b"c", 0o644))]:
        err(errno.ENOSPC, fn, *args)
    assert len(names(fs, ROOT)) == 30
    # a hard link needs no inode
    fs.link(inos[0], ROOT, b"hard")
    fs.forget(inos[0], 1)
    fs.unlink(ROOT, b"f3")
    assert fs.statfs()["f_ffree"] == 1
    ino = mkfile(fs, b"new")
    assert ino == inos[3]  # the freed inode is reused
    assert fs.getattr(ino).generation != 0
    err(errno.ENOSPC, fs.create, ROOT, b"c", 0o644)


# ------------------------------------------------------------------------------ namespace


def test_mkdir_rmdir_errors(core_fs):
    fs = core_fs
    d = mkdir(fs, b"d")
    f = mkfile(fs, b"f", b"x")
    sub = mkdir(fs, b"sub", parent=d)
    err(errno.EEXIST, fs.mkdir, ROOT, b"d", 0o755)
    err(errno.EEXIST, fs.mkdir, ROOT, b"f", 0o755)
    err(errno.EEXIST, fs.create, ROOT, b"d", 0o644)
    err(errno.EEXIST, fs.symlink, ROOT, b"f", b"x")
    err(errno.EEXIST, fs.mknod, ROOT, b"f", stat.S_IFIFO | 0o644, 0)
    err(errno.EEXIST, fs.link, f, ROOT, b"d")
    err(errno.ENOTEMPTY, fs.rmdir, ROOT, b"d")
    err(errno.ENOTDIR, fs.rmdir, ROOT, b"f")
    err(errno.ENOTDIR, fs.mkdir, f, b"x", 0o755)
    err(errno.ENOTDIR, fs.create, f, b"x", 0o644)
    err(errno.ENOTDIR, fs.lookup, f, b"x")
    err(errno.ENOTDIR, lambda: list(fs.readdir(f, 0)))
    err(errno.EISDIR, fs.unlink, ROOT, b"d")
    err(errno.ENOENT, fs.rmdir, ROOT, b"nope")
    err(errno.ENOENT, fs.unlink, ROOT, b"nope")
    err(errno.ENOENT, fs.lookup, ROOT, b"nope")
    err(errno.EINVAL, fs.rmdir, d, b".")
    err(errno.ENOTEMPTY, fs.rmdir, d, b"..")
    err(errno.EINVAL, fs.mkdir, ROOT, b"a/b", 0o755)
    err(errno.EINVAL, fs.create, ROOT, b"", 0o644)
    err(errno.EINVAL, fs.create, ROOT, b"a\0b", 0o644)
    # nothing above changed the tree
    assert sorted(names(fs, ROOT)) == [b"d", b"f"]
    assert names(fs, d) == [b"sub"]
    fs.rmdir(d, b"sub")
    err(errno.ENOENT, fs.getattr, sub)
    fs.rmdir(ROOT, b"d")
    assert names(fs, ROOT) == [b"f"]
    assert nlink(fs, ROOT) == 2


def test_removed_directory_refuses_new_entries(core_fs):
    fs = core_fs
    d = fs.mkdir(ROOT, b"d", 0o755)  # keep the reference: it is someone's cwd
    f = mkfile(fs, b"f")
    fs.rmdir(ROOT, b"d")
    assert fs.getattr(d.ino).nlink == 0
    err(errno.ENOENT, fs.create, d.ino, b"x", 0o644)
    err(errno.ENOENT, fs.mkdir, d.ino, b"x", 0o755)
    err(errno.ENOENT, fs.link, f, d.ino, b"x")
    assert names(fs, d.ino) == []
    fs.forget(d.ino, 1)
    err(errno.ENOENT, fs.getattr, d.ino)


def test_name_length_limits(core_fs):
    fs = core_fs
    n255, n256 = b"a" * 255, b"b" * 256
    f = mkfile(fs, n255, b"x")
    assert look(fs, ROOT, n255).ino == f
    assert names(fs, ROOT) == [n255]
    d = mkdir(fs, b"c" * 255)
    fs.symlink(ROOT, b"s" * 255, b"t")
    fs.mknod(ROOT, b"p" * 255, stat.S_IFIFO | 0o644, 0)
    fs.link(f, d, b"l" * 255)
    for fn, args in [(fs.create, (ROOT, n256, 0o644)), (fs.mkdir, (ROOT, n256, 0o755)),
                     (fs.symlink, (ROOT, n256, b"t")),
                     (fs.mknod, (ROOT, n256, stat.S_IFIFO | 0o644, 0)),
                     (fs.link, (f, ROOT, n256)), (fs.lookup, (ROOT, n256)),
                     (fs.unlink, (ROOT, n256)), (fs.rmdir, (ROOT, n256)),
                     (fs.rename, (ROOT, n255, ROOT, n256))]:
        err(errno.ENAMETOOLONG, fn, *args)
    fs.rename(ROOT, n255, d, b"z" * 255)
    assert sorted(names(fs, d)) == [b"l" * 255, b"z" * 255]
    assert nlink(fs, f) == 2


def test_directory_link_counts(core_fs):
    fs = core_fs
    assert nlink(fs, ROOT) == 2
    a = mkdir(fs, b"a")
    assert nlink(fs, ROOT) == 3 and nlink(fs, a) == 2
    b = mkdir(fs, b"b", parent=a)
    c = mkdir(fs, b"c", parent=a)
    assert nlink(fs, a) == 4 and nlink(fs, b) == 2
    mkfile(fs, b"f", parent=a)
    fs.symlink(a, b"s", b"x")
    fs.forget(look(fs, a, b"s").ino, 1)
    assert nlink(fs, a) == 4  # files and symlinks do not count
    fs.rename(a, b"b", ROOT, b"b2")
    assert nlink(fs, a) == 3 and nlink(fs, ROOT) == 4
    assert look(fs, b, b"..").ino == ROOT
    fs.rename(ROOT, b"b2", a, b"c")  # replaces the empty directory c
    assert nlink(fs, a) == 3 and nlink(fs, ROOT) == 3
    err(errno.ENOENT, fs.getattr, c)
    assert look(fs, b, b"..").ino == a
    fs.rmdir(a, b"c")
    assert nlink(fs, a) == 2
    err(errno.EPERM, fs.link, a, ROOT, b"dirlink")
    assert look(fs, ROOT, b".").ino == ROOT and look(fs, ROOT, b"..").ino == ROOT
    assert look(fs, a, b".").ino == a and look(fs, a, b"..").ino == ROOT


def test_hard_links(core_fs):
    fs = core_fs
    d = mkdir(fs, b"d")
    f = mkfile(fs, b"f", b"shared")
    got = fs.link(f, d, b"g")
    fs.forget(f, 1)
    assert got.ino == f and nlink(fs, f) == 2
    fs.link(f, ROOT, b"h")
    fs.forget(f, 1)
    assert nlink(fs, f) == 3
    assert look(fs, d, b"g").ino == look(fs, ROOT, b"h").ino == f
    fs.unlink(ROOT, b"f")
    assert nlink(fs, f) == 2
    assert fs.read(f, 0, 10) == b"shared"
    ctime = fs.getattr(f).ctime_ns
    time.sleep(0.002)
    fs.unlink(ROOT, b"h")
    assert fs.getattr(f).ctime_ns > ctime
    fs.commit()
    free = free_blocks(fs)
    fs.unlink(d, b"g")
    err(errno.ENOENT, fs.getattr, f)
    fs.commit()
    assert free_blocks(fs) == free + 1


def test_emlink(core_fs, monkeypatch):
    fs = core_fs
    monkeypatch.setattr(core_mod, "LINK_MAX", 20)
    f = mkfile(fs, b"f")
    for i in range(19):
        fs.link(f, ROOT, b"l%d" % i)
        fs.forget(f, 1)
    assert nlink(fs, f) == 20
    err(errno.EMLINK, fs.link, f, ROOT, b"one-more")
    assert nlink(fs, f) == 20
    full = mkdir(fs, b"full")
    for i in range(18):
        mkdir(fs, b"s%d" % i, parent=full)
    assert nlink(fs, full) == 20
    err(errno.EMLINK, fs.mkdir, full, b"one-more", 0o755)
    # files may still be added to it
    mkfile(fs, b"file", parent=full)
    # moving a directory in from elsewhere would add a link
    other = mkdir(fs, b"other")
    mkdir(fs, b"x", parent=other)
    err(errno.EMLINK, fs.rename, other, b"x", full, b"x")
    assert nlink(fs, full) == 20 and nlink(fs, other) == 3
    # within the directory, renames are fine
    fs.rename(full, b"s0", full, b"s0-renamed")
    assert nlink(fs, full) == 20


def test_emlink_rename_exchange(core_fs, monkeypatch):
    # vfs_rename() refuses (EMLINK) a RENAME_EXCHANGE that moves a directory into a parent
    # already at the link limit in exchange for a non-directory; FUSE leaves that check to
    # the file system (s_max_links is 0), so the core must make it.
    fs = core_fs
    monkeypatch.setattr(core_mod, "LINK_MAX", 20)
    full = mkdir(fs, b"full")
    for i in range(18):
        mkdir(fs, b"s%d" % i, parent=full)
    mkfile(fs, b"file", parent=full)
    other = mkdir(fs, b"other")
    mkdir(fs, b"x", parent=other)
    assert nlink(fs, full) == 20
    err(errno.EMLINK, fs.rename, other, b"x", full, b"file", 2)
    assert nlink(fs, full) == 20 and nlink(fs, other) == 3
    # the other direction too: the file's old parent receives the directory
    err(errno.EMLINK, fs.rename, full, b"file", other, b"x", 2)
    assert nlink(fs, full) <= 20


def test_rename_basic(core_fs):
    fs = core_fs
    a, b = mkdir(fs, b"a"), mkdir(fs, b"b")
    f = mkfile(fs, b"f", b"content", parent=a)
    fs.rename(a, b"f", a, b"g")
    assert names(fs, a) == [b"g"]
    fs.rename(a, b"g", b, b"h")
    assert names(fs, a) == [] and names(fs, b) == [b"h"]
    assert look(fs, b, b"h").ino == f
    assert fs.read(f, 0, 100) == b"content"
    # over an existing file: the victim goes away
    v = mkfile(fs, b"victim", b"old", parent=a)
    fs.commit()
    free = free_blocks(fs)
    fs.rename(b, b"h", a, b"victim")
    assert names(fs, b) == [] and names(fs, a) == [b"victim"]
    assert look(fs, a, b"victim").ino == f
    err(errno.ENOENT, fs.getattr, v)
    fs.commit()
    assert free_blocks(fs) == free + 1
    # renaming to itself
    fs.rename(a, b"victim", a, b"victim")
    assert names(fs, a) == [b"victim"]
    err(errno.ENOENT, fs.rename, a, b"nope", a, b"x")
    err(errno.EINVAL, fs.rename, a, b"victim", a, b"x", 3)
    err(errno.EINVAL, fs.rename, a, b"victim", a, b"x", 4)


def test_rename_noreplace(core_fs):
    fs = core_fs
    f = mkfile(fs, b"f", b"1")
    g = mkfile(fs, b"g", b"2")
    err(errno.EEXIST, fs.rename, ROOT, b"f", ROOT, b"g", 1)
    assert look(fs, ROOT, b"f").ino == f and look(fs, ROOT, b"g").ino == g
    fs.rename(ROOT, b"f", ROOT, b"h", 1)
    assert sorted(names(fs, ROOT)) == [b"g", b"h"]


def test_rename_exchange(core_fs):
    fs = core_fs
    a, b = mkdir(fs, b"a"), mkdir(fs, b"b")
    f = mkfile(fs, b"f", b"file", parent=a)
    sub = mkdir(fs, b"sub", parent=b)
    mkfile(fs, b"inner", parent=sub)
    fs.rename(a, b"f", b, b"sub", 2)
    assert look(fs, a, b"f").ino == sub
    assert look(fs, b, b"sub").ino == f
    assert look(fs, sub, b"..").ino == a
    assert nlink(fs, a) == 3 and nlink(fs, b) == 2
    assert names(fs, sub) == [b"inner"]
    # exchange two directories in one parent
    d1, d2 = mkdir(fs, b"d1"), mkdir(fs, b"d2")
    fs.rename(ROOT, b"d1", ROOT, b"d2", 2)
    assert look(fs, ROOT, b"d1").ino == d2 and look(fs, ROOT, b"d2").ino == d1
    assert nlink(fs, ROOT) == 2 + 4
    err(errno.ENOENT, fs.rename, ROOT, b"d1", ROOT, b"missing", 2)
    # a directory cannot be exchanged into its own subtree
    err(errno.EINVAL, fs.rename, ROOT, b"a", sub, b"inner", 2)
    err(errno.EINVAL, fs.rename, sub, b"inner", ROOT, b"a", 2)
    # exchanging a name with a hard link of the same file changes nothing
    fs.link(f, ROOT, b"flink")
    fs.forget(f, 1)
    fs.rename(b, b"sub", ROOT, b"flink", 2)
    assert look(fs, b, b"sub").ino == f and nlink(fs, f) == 2


def test_rename_directory_into_own_subtree(core_fs):
    fs = core_fs
    a = mkdir(fs, b"a")
    b = mkdir(fs, b"b", parent=a)
    c = mkdir(fs, b"c", parent=b)
    err(errno.EINVAL, fs.rename, ROOT, b"a", c, b"x")
    err(errno.EINVAL, fs.rename, ROOT, b"a", a, b"x")
    err(errno.EINVAL, fs.rename, a, b"b", c, b"b")
    assert names(fs, ROOT) == [b"a"] and names(fs, c) == []
    # upwards is fine
    fs.rename(b, b"c", ROOT, b"c")
    assert look(fs, c, b"..").ino == ROOT


def test_rename_replacing_directories(core_fs):
    fs = core_fs
    src = mkdir(fs, b"src")
    mkfile(fs, b"x", parent=src)
    full = mkdir(fs, b"full")
    mkfile(fs, b"y", parent=full)
    empty = mkdir(fs, b"empty")
    f = mkfile(fs, b"f")
    err(errno.ENOTEMPTY, fs.rename, ROOT, b"src", ROOT, b"full")
    err(errno.ENOTDIR, fs.rename, ROOT, b"src", ROOT, b"f")
    err(errno.EISDIR, fs.rename, ROOT, b"f", ROOT, b"empty")
    assert sorted(names(fs, ROOT)) == [b"empty", b"f", b"full", b"src"]
    assert nlink(fs, ROOT) == 5
    fs.rename(ROOT, b"src", ROOT, b"empty")
    err(errno.ENOENT, fs.getattr, empty)
    assert look(fs, ROOT, b"empty").ino == src
    assert nlink(fs, ROOT) == 4
    assert look(fs, ROOT, b"f").ino == f


def test_rename_onto_hard_link_of_itself_is_noop(core_fs):
    fs = core_fs
    d = mkdir(fs, b"d")
    f = mkfile(fs, b"f", b"data")
    fs.link(f, d, b"g")
    fs.forget(f, 1)
    fs.rename(ROOT, b"f", d, b"g")
    # POSIX: "If the old argument and the new argument resolve to the same existing file,
    # rename() shall return successfully and perform no other action."
    assert sorted(names(fs, ROOT)) == [b"d", b"f"]
    assert names(fs, d) == [b"g"]
    assert nlink(fs, f) == 2
    err(errno.EEXIST, fs.rename, ROOT, b"f", d, b"g", 1)


def test_unlink_while_open(make_fs):
    fs = make_fs()
    fs.commit()
    free0, ffree0 = free_blocks(fs), fs.statfs()["f_ffree"]
    data = pattern(200_000, 8)
    f = fs.create(ROOT, b"f", 0o644)  # open, one lookup reference
    assert fs.write(f.ino, 0, data) == len(data)
    fs.unlink(ROOT, b"f")
    assert names(fs, ROOT) == []
    err(errno.ENOENT, fs.lookup, ROOT, b"f")
    inode = fs.getattr(f.ino)
    assert inode.nlink == 0
    assert fs.read(f.ino, 0, len(data)) == data
    assert fs.write(f.ino, len(data), b"more") == 4  # still writable while open
    err(errno.ENOENT, fs.link, f.ino, ROOT, b"relinked")  # no new name for a dead file
    fs.commit()
    fs.release(f.ino)  # closed, but the kernel still references it
    assert fs.read(f.ino, 0, len(data)) == data
    fs.commit()
    fs.forget(f.ino, 1)
    err(errno.ENOENT, fs.getattr, f.ino)
    fs.commit()
    assert free_blocks(fs) == free0 and fs.statfs()["f_ffree"] == ffree0
    assert fs.sb.orphan_head == 0
    fsck_now(make_fs, fs)


def test_unlink_open_file_forget_before_release(core_fs):
    fs = core_fs
    fs.commit()
    free0 = free_blocks(fs)
    f = fs.create(ROOT, b"f", 0o644)
    fs.write(f.ino, 0, b"x" * 10000)
    fs.unlink(ROOT, b"f")
    fs.forget(f.ino, 1)
    assert fs.read(f.ino, 0, 5) == b"xxxxx"  # still open
    fs.release(f.ino)
    err(errno.ENOENT, fs.getattr, f.ino)
    fs.commit()
    assert free_blocks(fs) == free0


def test_several_open_handles(core_fs):
    fs = core_fs
    f = fs.create(ROOT, b"f", 0o644)
    fs.write(f.ino, 0, b"abc")
    fs.open(f.ino, os.O_RDWR)
    fs.unlink(ROOT, b"f")
    fs.forget(f.ino, 1)
    fs.release(f.ino)
    assert fs.read(f.ino, 0, 3) == b"abc"  # one handle left
    fs.release(f.ino)
    err(errno.ENOENT, fs.getattr, f.ino)


def test_lookup_counts_keep_unlinked_inode(core_fs):
    fs = core_fs
    fs.commit()
    free0 = free_blocks(fs)
    ino = mkfile(fs, b"f", b"q" * 5000)
    fs.link(ino, ROOT, b"g")  # +1 reference
    assert fs.lookup(ROOT, b"f").ino == ino  # +1
    assert fs.lookup(ROOT, b"g").ino == ino  # +1
    fs.unlink(ROOT, b"f")
    fs.unlink(ROOT, b"g")
    assert fs.read(ino, 0, 10) == b"q" * 10
    fs.forget(ino, 2)
    assert fs.getattr(ino).nlink == 0 and fs.read(ino, 0, 3) == b"qqq"
    fs.commit()
    fs.forget(ino, 1)
    err(errno.ENOENT, fs.getattr, ino)
    fs.commit()
    assert free_blocks(fs) == free0
    assert fs.sb.orphan_head == 0


def test_rename_over_open_file(core_fs):
    fs = core_fs
    fs.commit()
    free0 = free_blocks(fs)
    victim = fs.create(ROOT, b"victim", 0o644)
    fs.write(victim.ino, 0, b"old content")
    mkfile(fs, b"new", b"new content")
    fs.rename(ROOT, b"new", ROOT, b"victim")
    assert fs.read(look(fs, ROOT, b"victim").ino, 0, 100) == b"new content"
    assert fs.getattr(victim.ino).nlink == 0
    assert fs.read(victim.ino, 0, 100) == b"old content"  # still open
    fs.release(victim.ino)
    fs.forget(victim.ino, 1)
    err(errno.ENOENT, fs.getattr, victim.ino)
    fs.unlink(ROOT, b"victim")
    fs.commit()
    assert free_blocks(fs) == free0


def test_directory_times(core_fs):
    fs = core_fs
    a, b = mkdir(fs, b"a"), mkdir(fs, b"b")

    def reset():
        for ino in (a, b):
            fs.setattr(ino, mtime_ns=1, ctime_ns=1)

    def changed(ino):
        x = fs.getattr(ino)
        return x.mtime_ns > 1 and x.ctime_ns > 1

    reset()
    f = mkfile(fs, b"f", parent=a)
    assert changed(a) and not changed(b)
    reset()
    fs.write(f, 0, b"data")
    fs.setxattr(f, b"user.x", b"1")
    assert not changed(a)
    fs.rename(a, b"f", b, b"g")
    assert changed(a) and changed(b)
    reset()
    fs.link(f, a, b"h")
    fs.forget(f, 1)
    assert changed(a) and not changed(b)
    reset()
    fs.unlink(b, b"g")
    assert changed(b) and not changed(a)
    reset()
    mkdir(fs, b"sub", parent=a)
    assert changed(a)
    reset()
    fs.rmdir(a, b"sub")
    assert changed(a)
    fs.setattr(f, ctime_ns=1)
    fs.rename(a, b"h", a, b"h2")
    assert fs.getattr(f).ctime_ns > 1  # as ext4: a rename changes the inode's ctime


def test_open_rejects_foreign_and_resized_images(make_fs, tmp_path):
    img = tmp_path / "zero.img"
    Volume.create(img, 1024).close()
    with pytest.raises(FormatError):
        FileSystem(Volume(img), tmp_path / "zero.jnl")
    fs = make_fs(size=4 << 20)
    mkfile(fs, b"f", b"x")
    fs.commit()
    path, jnl = paths_of(make_fs, fs)
    fs = make_fs.reopen(fs)  # leave it closed and clean below
    fs.close()
    fs.dev.close()
    with open(path, "r+b") as f:  # the image grew by one block
        f.truncate(os.path.getsize(path) + BS)
    with pytest.raises(FormatError):
        FileSystem(Volume(path), jnl)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - BS)
    new = FileSystem(Volume(path), jnl)
    replace_fs(make_fs, fs, new)
    assert new.read(look(new, ROOT, b"f").ino, 0, 10) == b"x"


def test_orphans_survive_reopen_and_are_reaped(make_fs):
    fs = make_fs()
    fs.commit()
    free0, ffree0 = free_blocks(fs), fs.statfs()["f_ffree"]
    f = fs.create(ROOT, b"f", 0o644)
    fs.write(f.ino, 0, pattern(1 << 20, 9))
    fs.setxattr(f.ino, b"user.x", b"y")
    g = fs.create(ROOT, b"g", 0o644)
    fs.write(g.ino, 0, b"g" * 5000)
    d = fs.mkdir(ROOT, b"d", 0o755)
    fs.unlink(ROOT, b"f")
    fs.unlink(ROOT, b"g")
    fs.rmdir(ROOT, b"d")
    assert fs.sb.orphan_head != 0
    fs.commit()
    fs = make_fs.reopen(fs)  # the kernel's references died with the mount
    assert fs.sb.orphan_head == 0
    for ino in (f.ino, g.ino, d.ino):
        err(errno.ENOENT, fs.getattr, ino)
    assert free_blocks(fs) == free0
    assert fs.statfs()["f_ffree"] == ffree0
    assert names(fs, ROOT) == [] and nlink(fs, ROOT) == 2


def test_orphans_reaped_after_crash(make_fs):
    fs = make_fs()
    fs.commit()
    free0, ffree0 = free_blocks(fs), fs.statfs()["f_ffree"]
    keep = mkfile(fs, b"keep", b"k" * 9000)
    f = fs.create(ROOT, b"f", 0o644)
    fs.write(f.ino, 0, pattern(300_000, 10))
    fs.unlink(ROOT, b"f")
    fs.commit()
    fs = crash_reopen(make_fs, fs)
    assert fs.sb.orphan_head == 0
    err(errno.ENOENT, fs.getattr, f.ino)
    assert fs.read(keep, 0, 10000) == b"k" * 9000
    fs.unlink(ROOT, b"keep")
    fs.commit()
    assert free_blocks(fs) == free0 and fs.statfs()["f_ffree"] == ffree0


def test_many_orphans_unlisted_in_any_order(core_fs):
    fs = core_fs
    fs.commit()
    free0 = free_blocks(fs)
    handles = []
    for i in range(20):
        f = fs.create(ROOT, b"f%d" % i, 0o644)
        fs.write(f.ino, 0, b"z" * (i * 1000 + 1))
        handles.append(f.ino)
    for i in range(20):
        fs.unlink(ROOT, b"f%d" % i)
    rng = random.Random(1)
    rng.shuffle(handles)
    for k, ino in enumerate(handles):
        fs.release(ino)
        fs.forget(ino, 1)
        if k % 5 == 0:
            fs.commit()
    assert fs.sb.orphan_head == 0
    fs.commit()
    assert free_blocks(fs) == free0


# ------------------------------------------------------------------------------ xattrs


def test_xattrs(make_fs):
    fs = make_fs()
    f = mkfile(fs, b"f")
    d = mkdir(fs, b"d")
    fs.symlink(ROOT, b"s", b"target")
    s = look(fs, ROOT, b"s").ino
    fs.forget(s, 1)
    blocks = fs.getattr(f).blocks
    for ino in (f, d, s):
        for name in (b"user.a", b"trusted.b", b"security.c"):
            fs.setxattr(ino, name, b"v-" + name)
        assert sorted(fs.listxattr(ino)) == [b"security.c", b"trusted.b", b"user.a"]
        assert fs.getxattr(ino, b"trusted.b") == b"v-trusted.b"
    assert fs.getattr(f).blocks == blocks + 1
    for bad in (b"system.posix_acl_access", b"foo", b"", b"user", b"USER.x", b"os2.x"):
        err(errno.EOPNOTSUPP, fs.setxattr, f, bad, b"v")
        err(errno.EOPNOTSUPP, fs.getxattr, f, bad)
        err(errno.EOPNOTSUPP, fs.removexattr, f, bad)
    err(errno.ENODATA, fs.getxattr, f, b"user.missing")
    err(errno.ENODATA, fs.removexattr, f, b"user.missing")
    # XATTR_CREATE / XATTR_REPLACE
    err(errno.EEXIST, fs.setxattr, f, b"user.a", b"new", 1)
    assert fs.getxattr(f, b"user.a") == b"v-user.a"
    err(errno.ENODATA, fs.setxattr, f, b"user.new", b"x", 2)
    err(errno.ENODATA, fs.getxattr, f, b"user.new")
    fs.setxattr(f, b"user.new", b"x", 1)
    fs.setxattr(f, b"user.new", b"y", 2)
    assert fs.getxattr(f, b"user.new") == b"y"
    fs.setxattr(f, b"user.new", b"")
    assert fs.getxattr(f, b"user.new") == b""
    fs.setxattr(f, b"user.bin", bytes(range(256)))
    # names up to 255 bytes (ERANGE beyond), values up to 64 KiB (E2BIG beyond), as Linux
    err(errno.ERANGE, fs.setxattr, f, b"user." + b"n" * 251, b"x")
    fs.setxattr(f, b"user." + b"n" * 250, b"x")
    err(errno.E2BIG, fs.setxattr, f, b"user.big", b"x" * 65537)
    fs.setxattr(f, b"user.big", b"x" * 65536)
    assert fs.getxattr(f, b"user.big") == b"x" * 65536
    assert fs.getxattr(f, b"user.a") == b"v-user.a"  # the failures changed nothing
    fs.removexattr(f, b"user.big")
    fs.removexattr(f, b"user.bin")
    fs.commit()
    fs = make_fs.reopen(fs)
    assert sorted(fs.listxattr(f)) == sorted([b"user.a", b"trusted.b", b"security.c",
                                              b"user.new", b"user." + b"n" * 250])
    assert fs.getxattr(f, b"user.new") == b""
    assert fs.getxattr(s, b"security.c") == b"v-security.c"
    # removing the last one frees the block
    for name in fs.listxattr(f):
        fs.removexattr(f, name)
    assert fs.listxattr(f) == [] and fs.getattr(f).xattr == 0
    assert fs.getattr(f).blocks == blocks


def test_xattr_name_without_suffix_is_invalid(core_fs):
    # ext4 (xattr_resolve_name): a namespace prefix alone is not a name -> EINVAL
    fs = core_fs
    f = mkfile(fs, b"f")
    for name in (b"user.", b"trusted.", b"security."):
        err(errno.EINVAL, fs.setxattr, f, name, b"v")
    assert fs.listxattr(f) == []


def test_xattr_ctime_and_freed_with_inode(core_fs):
    fs = core_fs
    fs.commit()
    free0 = free_blocks(fs)
    f = mkfile(fs, b"f")
    c0 = fs.getattr(f).ctime_ns
    time.sleep(0.002)
    fs.setxattr(f, b"user.a", b"1")
    assert fs.getattr(f).ctime_ns > c0
    fs.unlink(ROOT, b"f")
    fs.commit()
    assert free_blocks(fs) == free0


def _xattr_blocks(fs, ino) -> int:
    """Blocks held by an inode's extended attributes (root, xattr file, its indirect blocks)."""
    return len(fs.xattrs.blocks(fs.getattr(ino)))


def test_xattrs_thousands_of_small_ones(make_fs):
    fs = make_fs()
    fs.commit()
    free0 = free_blocks(fs)
    f = mkfile(fs, b"f")
    blocks0 = fs.getattr(f).blocks
    want = {b"user.attr-%05d" % i: b"value %d" % i for i in range(3000)}
    for k, v in want.items():
        fs.setxattr(f, k, v)
    assert fs.listxattr(f) == list(want)  # in the order they were set
    assert fs.getxattr(f, b"user.attr-01234") == b"value 1234"
    # 3000 x ~30 bytes: the root block and about 20 blocks of the xattr file
    held = _xattr_blocks(fs, f)
    assert 15 < held < 40 and fs.getattr(f).blocks == blocks0 + held
    # replace a few (same size, longer, shorter), remove every third one
    fs.setxattr(f, b"user.attr-00000", b"VALUE 0", 2)
    fs.setxattr(f, b"user.attr-00001", b"v" * 5000)
    fs.setxattr(f, b"user.attr-02999", b"")
    want.update({b"user.attr-00000": b"VALUE 0", b"user.attr-00001": b"v" * 5000,
                 b"user.attr-02999": b""})
    for k in list(want)[::3]:
        fs.removexattr(f, k)
        del want[k]
    fs.commit()
    fs = fsck_now(make_fs, fs)
    assert {k: fs.getxattr(f, k) for k in fs.listxattr(f)} == want
    # removing them all gives every block back
    for k in fs.listxattr(f):
        fs.removexattr(f, k)
    assert fs.getattr(f).xattr == 0 and fs.getattr(f).blocks == blocks0
    fs.unlink(ROOT, b"f")
    fs.commit()
    assert free_blocks(fs) == free0


def test_xattr_values_up_to_64k(make_fs):
    fs = make_fs()
    fs.commit()
    free0 = free_blocks(fs)
    f = mkfile(fs, b"f", b"data")
    d = mkdir(fs, b"d")
    big = pattern(65536, 1)
    fs.setxattr(f, b"user.big", big)
    fs.setxattr(f, b"trusted.mid", pattern(10000, 2))
    fs.setxattr(d, b"user.big", big[::-1])
    assert fs.getxattr(f, b"user.big") == big
    assert _xattr_blocks(fs, f) >= 1 + (65536 + 10000) // BS
    err(errno.E2BIG, fs.setxattr, f, b"user.bigger", big + b"x")
    err(errno.EEXIST, fs.setxattr, f, b"user.big", b"x", 1)
    # replacing a 64 KiB value by a small one and back
    fs.setxattr(f, b"user.big", b"small", 2)
    assert fs.getxattr(f, b"user.big") == b"small"
    fs.setxattr(f, b"user.big", big)
    fs.commit()
    fs = make_fs.reopen(fs)
    assert fs.getxattr(f, b"user.big") == big
    assert fs.getxattr(f, b"trusted.mid") == pattern(10000, 2)
    assert fs.getxattr(d, b"user.big") == big[::-1]
    assert fs.read(f, 0, 10) == b"data"
    fs = fsck_now(make_fs, fs)
    # unlinking frees all their blocks, for a file and for a directory
    fs.unlink(ROOT, b"f")
    fs.rmdir(ROOT, b"d")
    fs.commit()
    assert free_blocks(fs) == free0


def test_xattr_freed_at_last_close_of_unlinked_file(make_fs):
    fs = make_fs()
    fs.commit()
    free0 = free_blocks(fs)
    f = fs.create(ROOT, b"f", 0o644).ino
    fs.setxattr(f, b"user.v", pattern(65536, 3))
    fs.unlink(ROOT, b"f")
    fs.commit()
    assert fs.getxattr(f, b"user.v") == pattern(65536, 3)  # still open: still there
    assert free_blocks(fs) < free0 - 16
    fs.release(f)
    fs.forget(f, 1)
    fs.commit()
    assert free_blocks(fs) == free0


def test_xattr_limits_names_list_and_total(make_fs):
    fs = make_fs()
    f = mkfile(fs, b"f")
    # names: listxattr can return at most 64 KiB (XATTR_LIST_MAX), NULs included
    def name(i):
        return b"user.%05d" % i + b"n" * 244  # 254 bytes, 255 with its NUL

    for i in range(256):
        fs.setxattr(f, name(i), b"")
    fill = b"user." + b"f" * 250  # 256 bytes left: 255 and a NUL
    fs.setxattr(f, fill, b"v")
    assert sum(len(k) + 1 for k in fs.listxattr(f)) == 65536
    err(errno.ENOSPC, fs.setxattr, f, b"user.z", b"")
    fs.setxattr(f, fill, b"replacing a value adds no name")
    fs.removexattr(f, name(0))
    fs.setxattr(f, b"user.z", b"fits again")
    err(errno.ENOSPC, fs.setxattr, f, b"user." + b"y" * 250, b"")
    for k in fs.listxattr(f):
        fs.removexattr(f, k)
    # total: at most XATTR_TOTAL_MAX (8 MiB) of packed entries per inode
    from repfs.fs.format import XATTR_ENTRY_HDR, XATTR_TOTAL_MAX
    v = b"\xa5" * 65536
    i = 0
    while (i + 1) * (XATTR_ENTRY_HDR + 11 + len(v)) <= XATTR_TOTAL_MAX:
        fs.setxattr(f, b"user.v%05d" % i, v)
        i += 1
    assert i == 127
    err(errno.ENOSPC, fs.setxattr, f, b"user.v%05d" % i, v)
    fs.setxattr(f, b"user.v%05d" % i, v[:1000])  # what is left still fits
    assert fs.getxattr(f, b"user.v00100") == v
    fs.commit()
    fs = fsck_now(make_fs, fs)
    assert len(fs.listxattr(f)) == 128


def test_xattr_enospc_changes_nothing(make_fs):
    fs = make_fs(size=4 << 20)
    f = mkfile(fs, b"f")
    fs.setxattr(f, b"user.keep", b"k" * 10000)
    fill = fs.create(ROOT, b"fill", 0o644).ino
    off = 0
    with pytest.raises(FSError):
        while True:
            off += fs.write(fill, off, b"z" * (1 << 16))
    fs.release(fill)
    fs.forget(fill, 1)
    fs.commit()
    free = free_blocks(fs)
    blocks = fs.getattr(f).blocks
    assert free <= fs.alloc.reserve  # only the metadata reserve is left: xattr values are data
    err(errno.ENOSPC, fs.setxattr, f, b"user.big", pattern(65536, 1))
    err(errno.ENOSPC, fs.setxattr, f, b"user.keep", b"k" * 65536)
    assert fs.getxattr(f, b"user.keep") == b"k" * 10000
    assert fs.getattr(f).blocks == blocks
    fs.commit()
    assert free_blocks(fs) == free
    # shrinking needs no block, and gives blocks back
    fs.setxattr(f, b"user.keep", b"small")
    fs.commit()
    assert free_blocks(fs) > free
    fsck_now(make_fs, fs)


def test_xattrs_journaled_and_crash_safe(make_fs):
    fs = make_fs()
    f = mkfile(fs, b"f")
    fs.setxattr(f, b"user.big", pattern(65536, 5))
    for i in range(200):
        fs.setxattr(f, b"user.s%d" % i, b"%d" % i)
    fs.commit()
    # changed after the commit: a crash loses these changes, and only these
    fs.setxattr(f, b"user.big", pattern(30000, 6))
    fs.removexattr(f, b"user.s7")
    fs.setxattr(f, b"user.new", b"n")
    fs = crash_reopen(make_fs, fs)
    assert fs.getxattr(f, b"user.big") == pattern(65536, 5)
    assert fs.getxattr(f, b"user.s7") == b"7"
    err(errno.ENODATA, fs.getxattr, f, b"user.new")
    fs = fsck_now(make_fs, fs)
    # committed but not checkpointed: the redo log brings it back
    fs.setxattr(f, b"user.big", pattern(30000, 6))
    fs.commit()
    fs = crash_reopen(make_fs, fs)
    assert fs.replayed > 0
    assert fs.getxattr(f, b"user.big") == pattern(30000, 6)
    fsck_now(make_fs, fs)


def test_xattrs_of_a_version_1_volume(make_fs):
    """A volume made before format version 2 keeps one xattr block per inode in the old layout:
    it mounts, its xattrs read, and the first change rewrites the block in the new layout."""
    from repfs.fs.format import XATTR_ENTRY_HDR, XATTR_INLINE, is_xattr_root, pack_xattrs
    fs = make_fs()
    f, g = mkfile(fs, b"f"), mkfile(fs, b"g")
    old = {b"user.a": b"1", b"trusted.b": b"two", b"user.bin": bytes(range(256))}
    for ino in (f, g):  # what version 1 wrote: one block, the version-1 layout
        inode = fs.getattr(ino)
        (blk, _), = fs.alloc.alloc_blocks(1, None, data=False)
        fs.meta.new(blk)[:] = pack_xattrs(old)
        inode.xattr = blk
        inode.blocks += 1
        fs._dirty(inode)
    fs.sb.version = 1
    fs.commit()
    fs = make_fs.reopen(fs, readonly=True)
    assert fs.sb.version == 1
    assert fsck(fs).clean
    fs = make_fs.reopen(fs)
    for ino in (f, g):
        assert fs.listxattr(ino) == list(old)
        assert fs.getxattr(ino, b"user.bin") == bytes(range(256))
    fs.commit()
    assert fs.sb.version == 1  # reading changes nothing
    fs.commit()
    free = free_blocks(fs)
    fs.setxattr(f, b"user.big", pattern(20000, 1))
    assert is_xattr_root(fs.meta.read(fs.getattr(f).xattr))
    assert fs.sb.version == 2
    fs.removexattr(g, b"user.a")
    fs.commit()
    fs = fsck_now(make_fs, fs)
    assert fs.sb.version == 2
    assert fs.getxattr(f, b"user.big") == pattern(20000, 1)
    assert fs.listxattr(g) == [b"trusted.b", b"user.bin"]
    length = sum(XATTR_ENTRY_HDR + len(k) + len(fs.getxattr(f, k)) for k in fs.listxattr(f))
    assert free_blocks(fs) == free - -(-(length - XATTR_INLINE) // BS)  # past the root block
    # a version-1 block is freed like any with its inode
    h = mkfile(fs, b"h")
    fs.commit()
    free = free_blocks(fs)
    inode = fs.getattr(h)
    (blk, _), = fs.alloc.alloc_blocks(1, None, data=False)
    fs.meta.new(blk)[:] = pack_xattrs({b"user.x": b"y"})
    inode.xattr, inode.blocks = blk, inode.blocks + 1
    fs._dirty(inode)
    fs.unlink(ROOT, b"h")
    fs.commit()
    assert free_blocks(fs) == free


def test_fsck_finds_damaged_xattrs(make_fs):
    fs = make_fs()
    f = mkfile(fs, b"f")
    fs.setxattr(f, b"user.big", pattern(20000, 1))
    fs.commit()
    inode = fs.getattr(f)
    root = fs.meta.read(inode.xattr)
    from repfs.fs.format import XattrRoot
    hdr = XattrRoot.unpack(root)
    # the xattr file loses a block: a hole inside the stream
    broken = bytearray(root)
    hdr2 = XattrRoot(hdr.count, hdr.length, hdr.names, [0] + hdr.map[1:])
    broken[:] = hdr2.pack(bytes(fs.xattrs._stream(hdr, root)))
    fs.meta.modify(inode.xattr)[:] = broken
    fs.commit()
    ro = make_fs.reopen(fs, readonly=True)
    report = fsck(ro)
    checks = {p.check for p in report.problems}
    assert "check_xattrs" in checks and "check_block_bitmap" in checks, report.problems
    err(errno.EIO, ro.getxattr, f, b"user.big")
    # the names count disagrees with the entries
    fs = make_fs.reopen(ro)
    buf = fs.meta.modify(fs.getattr(f).xattr)
    buf[:] = XattrRoot(hdr.count, hdr.length, hdr.names + 1, hdr.map).pack(
        bytes(fs.xattrs._stream(hdr, root)))
    fs.commit()
    ro = make_fs.reopen(fs, readonly=True)
    msgs = [p.message for p in fsck(ro).problems]
    assert any("names" in m for m in msgs), msgs
    # the xattr file shares a block with a file's data
    fs = make_fs.reopen(ro)
    d = mkfile(fs, b"d", b"D" * BS)
    data_blk = int(fs.bmap.lookup(fs.getattr(d), 0, 1)[0])
    fs.meta.modify(fs.getattr(f).xattr)[:] = XattrRoot(
        hdr.count, hdr.length, hdr.names, [data_blk] + hdr.map[1:]).pack(
        bytes(fs.xattrs._stream(hdr, root)))
    fs.commit()
    ro = make_fs.reopen(fs, readonly=True)
    msgs = [p.message for p in fsck(ro).problems if p.check == "check_block_maps"]
    assert any("used twice" in m and str(data_blk) in m for m in msgs), msgs
    # put it right so the fixture's final fsck passes
    fs = make_fs.reopen(ro)
    fs.meta.modify(fs.getattr(f).xattr)[:] = root
    fs.commit()


def test_damaged_xattr_root_is_eio_and_freed_with_its_inode(make_fs):
    import struct
    fs = make_fs()
    fs.commit()
    free0 = free_blocks(fs)
    f = mkfile(fs, b"f")
    fs.setxattr(f, b"user.big", pattern(30000, 1))
    fs.commit()
    fs = make_fs.reopen(fs)
    struct.pack_into("<I", fs.meta.modify(fs.getattr(f).xattr), 8, 0xFFFFFFF0)  # its length
    fs.commit()
    fs = make_fs.reopen(fs)
    err(errno.EIO, fs.getxattr, f, b"user.big")
    err(errno.EIO, fs.listxattr, f)
    err(errno.EIO, fs.setxattr, f, b"user.x", b"1")
    ro = make_fs.reopen(fs, readonly=True)
    assert "check_xattrs" in {p.check for p in fsck(ro).problems}
    fs = make_fs.reopen(ro)
    fs.unlink(ROOT, b"f")  # frees the root; what it pointed to is leaked, not freed blindly
    fs.commit()
    report = fsck(fs, repair=True)
    assert report.problems and all(p.repaired for p in report.problems), report.problems
    assert free_blocks(fs) == free0


# ------------------------------------------------------------------------------ special files


def test_symlinks(make_fs):
    fs = make_fs()
    s = fs.symlink(ROOT, b"s", b"../some/where")
    fs.forget(s.ino, 1)
    assert stat.S_ISLNK(s.mode) and s.size == len(b"../some/where")
    assert fs.readlink(s.ino) == b"../some/where"
    t4095 = bytes(random.Random(1).choice(b"abcdef/") for _ in range(4095))
    long = fs.symlink(ROOT, b"long", t4095)
    fs.forget(long.ino, 1)
    assert fs.readlink(long.ino) == t4095 and long.size == 4095
    err(errno.ENAMETOOLONG, fs.symlink, ROOT, b"toolong", b"x" * 4096)
    err(errno.ENOENT, fs.symlink, ROOT, b"empty", b"")
    err(errno.ENOENT, fs.lookup, ROOT, b"toolong")
    f = mkfile(fs, b"f")
    err(errno.EINVAL, fs.readlink, f)
    err(errno.EINVAL, fs.readlink, ROOT)
    err(errno.EINVAL, fs.write, s.ino, 0, b"x")
    # a link to a symlink is a link to the symlink
    fs.link(s.ino, ROOT, b"s2")
    fs.forget(s.ino, 1)
    assert nlink(fs, s.ino) == 2
    fs.commit()
    fs = make_fs.reopen(fs)
    assert fs.readlink(look(fs, ROOT, b"long").ino) == t4095
    assert fs.readlink(look(fs, ROOT, b"s2").ino) == b"../some/where"
    free = free_blocks(fs)
    fs.unlink(ROOT, b"long")
    fs.commit()
    assert free_blocks(fs) == free + 1


def test_mknod(make_fs):
    fs = make_fs()
    fifo = fs.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o640, 0)
    chr_ = fs.mknod(ROOT, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    blk = fs.mknod(ROOT, b"sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    sock = fs.mknod(ROOT, b"sock", stat.S_IFSOCK | 0o755, 0)
    reg = fs.mknod(ROOT, b"reg", 0o600, 0)
    for x in (fifo, chr_, blk, sock, reg):
        fs.forget(x.ino, 1)
    assert stat.S_ISFIFO(fifo.mode) and stat.S_IMODE(fifo.mode) == 0o640 & ~0o022
    assert stat.S_ISCHR(chr_.mode) and chr_.rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(blk.mode) and blk.rdev == os.makedev(8, 0)
    assert stat.S_ISSOCK(sock.mode)
    assert stat.S_ISREG(reg.mode)
    assert fs.getattr(chr_.ino).blocks == 0
    err(errno.EINVAL, fs.mknod, ROOT, b"dir", stat.S_IFDIR | 0o755, 0)
    err(errno.EINVAL, fs.mknod, ROOT, b"lnk", stat.S_IFLNK | 0o777, 0)
    fs.commit()
    fs = make_fs.reopen(fs)
    n = look(fs, ROOT, b"null")
    assert stat.S_ISCHR(n.mode) and n.rdev == os.makedev(1, 3)
    assert look(fs, ROOT, b"sda").rdev == os.makedev(8, 0)
    assert stat.S_ISFIFO(look(fs, ROOT, b"fifo").mode)
    for nm in (b"fifo", b"null", b"sda", b"sock", b"reg"):
        fs.unlink(ROOT, nm)


# ------------------------------------------------------------------------------ attributes


def test_setattr_mode_and_times(make_fs):
    fs = make_fs()
    f = mkfile(fs, b"f", b"x")
    c0 = fs.getattr(f).ctime_ns
    time.sleep(0.002)
    fs.setattr(f, mode=0o4751)
    a = fs.getattr(f)
    assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == 0o4751 and a.ctime_ns > c0
    fs.setattr(f, mode=stat.S_IFDIR | 0o644)  # the type never changes
    assert stat.S_ISREG(fs.getattr(f).mode)
    at, mt, ct = 1_700_000_000_123_456_789, 1_600_000_000_987_654_321, 1_650_000_000_000_000_001
    fs.setattr(f, atime_ns=at, mtime_ns=mt, ctime_ns=ct)
    a = fs.getattr(f)
    assert (a.atime_ns, a.mtime_ns, a.ctime_ns) == (at, mt, ct)
    fs.setattr(f, atime_ns=-1_000_000_001)  # before the epoch
    fs.commit()
    fs = make_fs.reopen(fs)
    a = fs.getattr(f)
    assert (a.atime_ns, a.mtime_ns) == (-1_000_000_001, mt)
    assert a.ctime_ns >= ct  # changed by the last setattr
    d = mkdir(fs, b"d")
    err(errno.EISDIR, fs.setattr, d, size=0)
    fs.symlink(ROOT, b"s", b"t")
    s = look(fs, ROOT, b"s").ino
    fs.forget(s, 1)
    err(errno.EINVAL, fs.setattr, s, size=0)
    err(errno.EINVAL, fs.setattr, f, size=-1)


def test_out_of_range_values_never_fail_the_commit(make_fs):
    """`touch -d 'May 30 2514'` once killed the daemon at the next commit (struct.error): times
    outside the format's range (signed 64-bit ns: 1677..2262) are clamped, as ext4 clamps to
    its own; other fields out of range are refused at the request and change nothing."""
    fs = make_fs()
    f = mkfile(fs, b"f", b"data")
    lo, hi = -(2**63), 2**63 - 1
    far = 17_288_000_000 * 10**9  # 2514-05-30 in ns: past 2262
    for t, want in ((far, hi), ((2**31 - 1) * 10**9 * 10**3, hi), (-62_000_000_000 * 10**9, lo),
                    (2**200, hi), (-(2**200), lo), (hi, hi), (lo, lo)):
        fs.setattr(f, atime_ns=t, mtime_ns=t, ctime_ns=t)
        a = fs.getattr(f)
        assert (a.atime_ns, a.mtime_ns, a.ctime_ns) == (want, want, want), t
        fs.commit()  # must not raise
    before = fs.getattr(f)
    snapshot = (before.uid, before.gid, before.mode, before.size, before.atime_ns)
    for kw, code in (({"uid": 2**32 - 1}, errno.EINVAL), ({"gid": 2**32}, errno.EINVAL),
                     ({"uid": -1}, errno.EINVAL), ({"gid": -5}, errno.EINVAL),
                     ({"uid": 0, "gid": 2**40, "atime_ns": 5}, errno.EINVAL),
                     ({"size": MAX_FILE_SIZE + 1}, errno.EFBIG),
                     ({"size": 2**64}, errno.EFBIG), ({"size": -1}, errno.EINVAL)):
        err(code, fs.setattr, f, **kw)
        a = fs.getattr(f)
        assert (a.uid, a.gid, a.mode, a.size, a.atime_ns) == snapshot, kw
    fs.setattr(f, uid=2**32 - 2, gid=2**32 - 2, mode=0o170777 | 0o7777)  # the largest ids
    err(errno.EINVAL, fs.mknod, ROOT, b"bad", stat.S_IFCHR | 0o600, 2**64)
    err(errno.EINVAL, fs.mknod, ROOT, b"bad", stat.S_IFCHR | 0o600, -1)
    err(errno.EINVAL, fs.mknod, ROOT, b"bad", 0o030000 | 0o600, 0)  # no such file type
    err(errno.EINVAL, fs.mknod, ROOT, b"bad", stat.S_IFREG | 0o600 | 1 << 40, 0)
    dev = fs.mknod(ROOT, b"dev", stat.S_IFBLK | 0o600, 2**64 - 1)
    fs.forget(dev.ino, 1)
    g = fs.create(ROOT, b"g", 0o644)
    err(errno.EINVAL, fs.write, g.ino, -1, b"x")
    err(errno.EFBIG, fs.write, g.ino, 2**64, b"x")
    fs.release(g.ino)
    fs.forget(g.ino, 1)
    err(errno.ERANGE, fs.setxattr, f, b"user." + b"n" * 251, b"v")
    fs.commit()
    fs = make_fs.reopen(fs)
    a = fs.getattr(f)
    assert (a.atime_ns, a.uid, a.gid, stat.S_IMODE(a.mode)) == (lo, 2**32 - 2, 2**32 - 2, 0o7777)
    assert stat.S_ISREG(a.mode) and fs.getattr(dev.ino).rdev == 2**64 - 1
    assert fs.read(f, 0, 10) == b"data"


def test_dot_lookup_on_any_inode(core_fs):
    """The kernel decodes a file handle by looking up "." in the inode itself (any type):
    that takes a reference like any lookup; a freed inode is ENOENT (the kernel: ESTALE)."""
    fs = core_fs
    f = mkfile(fs, b"f", b"x")
    d = mkdir(fs, b"d")
    fs.symlink(ROOT, b"s", b"f")
    s = look(fs, ROOT, b"s").ino
    fs.forget(s, 1)
    for ino in (f, d, s, ROOT):
        inode = fs.lookup(ino, b".")
        assert inode.ino == ino and inode.lookups == 1
        fs.forget(ino, 1)
    assert look(fs, d, b"..").ino == ROOT
    err(errno.ENOTDIR, fs.lookup, f, b"..")
    err(errno.ENOTDIR, fs.lookup, f, b"x")
    gen = fs.getattr(f).generation
    fs.unlink(ROOT, b"f")
    err(errno.ENOENT, fs.lookup, f, b".")
    g = mkfile(fs, b"g")  # may reuse the inode number: then with another generation
    if g == f:
        assert fs.getattr(g).generation != gen
    fs.unlink(ROOT, b"s")


def test_write_updates_mtime_and_size_change_updates_mtime(core_fs):
    fs = core_fs
    f = mkfile(fs, b"f")
    fs.setattr(f, mtime_ns=1, ctime_ns=1)
    fs.write(f, 0, b"abc")
    a = fs.getattr(f)
    assert a.mtime_ns > 1 and a.ctime_ns > 1
    fs.setattr(f, mtime_ns=1, ctime_ns=1)
    fs.setattr(f, size=1)
    assert fs.getattr(f).mtime_ns > 1


def test_with_the_writeback_cache_a_write_keeps_the_kernels_times(core_fs):
    """With FUSE's writeback cache the kernel keeps a regular file's mtime and ctime and sends
    them in a SETATTR (at close, fsync, inode writeback). A WRITE that reaches the daemon after
    that SETATTR (the close's page writeback racing its flush of the times) must not stamp the
    daemon's clock over them: the site then held other times than the mount showed, and they
    changed at the next remount (tools/conformance REPLICATE=1 MOUNT_ARGS=--writeback-cache:
    the secondary's mtime and ctime of fio's state file 2.6 ms off the primary's mount)."""
    from repfs.fs.ops import Operations
    fs = core_fs
    Operations(fs, writeback_cache=True)  # the mount tells the core who keeps the times
    f = mkfile(fs, b"f")
    fs.write(f, 0, b"a" * 10000)
    fs.setattr(f, mtime_ns=5_000_000_000, ctime_ns=6_000_000_000)  # the kernel's flush
    fs.write(f, 0, b"b" * 100)  # an overwrite (one block)
    fs.write(f, 9000, b"c" * 9000)  # across blocks, extending the file
    fs.write(f, 40000, b"d" * 8192)  # fresh blocks past a hole
    a = fs.getattr(f)
    assert (a.mtime_ns, a.ctime_ns, a.size) == (5_000_000_000, 6_000_000_000, 48192)


@pytest.mark.parametrize("mode,change,want", [
    (0o4755, {"uid": 1000}, 0o0755),  # set-uid cleared on chown
    (0o6755, {"gid": 100}, 0o0755),  # set-gid with group exec: cleared too
    (0o2745, {"uid": 1000}, 0o2745),  # set-gid without group exec (locking): kept
    (0o6755, {"uid": 1000, "gid": 100}, 0o0755),
    (0o4755, {"uid": 1000, "mode": 0o4755}, 0o4755),  # an explicit mode wins
])
def test_chown_clears_setuid_on_files(core_fs, mode, change, want):
    fs = core_fs
    f = mkfile(fs, b"f")
    fs.setattr(f, mode=mode)
    fs.setattr(f, **change)
    a = fs.getattr(f)
    assert stat.S_IMODE(a.mode) == want
    assert a.uid == change.get("uid", 0) and a.gid == change.get("gid", 0)


def test_chown_keeps_setgid_on_directories(core_fs):
    fs = core_fs
    d = mkdir(fs, b"d")
    fs.setattr(d, mode=0o2775)
    fs.setattr(d, uid=5, gid=6)
    a = fs.getattr(d)
    assert stat.S_IMODE(a.mode) == 0o2775 and (a.uid, a.gid) == (5, 6)


def test_setgid_directory_inheritance(core_fs):
    fs = core_fs
    sg = mkdir(fs, b"sg")
    fs.setattr(sg, mode=0o2775, gid=100)
    user = Ctx(uid=1000, gid=5, pid=0, umask=0o022)
    f = fs.create(sg, b"f", 0o666, user)
    fs.release(f.ino)
    assert f.gid == 100 and f.uid == 1000
    assert stat.S_IMODE(f.mode) == 0o644
    sub = fs.mkdir(sg, b"sub", 0o777, user)
    assert sub.gid == 100 and sub.mode & stat.S_ISGID and stat.S_IMODE(sub.mode) == 0o2755
    subsub = fs.mkdir(sub.ino, b"subsub", 0o700, user)
    assert subsub.gid == 100 and subsub.mode & stat.S_ISGID
    node = fs.mknod(sg, b"fifo", stat.S_IFIFO | 0o644, 0, user)
    assert node.gid == 100 and not node.mode & stat.S_ISGID
    sl = fs.symlink(sg, b"sl", b"x", user)
    assert sl.gid == 100
    # a set-gid file created by a non-member of the group loses the bit
    g = fs.create(sg, b"g", 0o2755, user)
    fs.release(g.ino)
    assert g.gid == 100 and not g.mode & stat.S_ISGID
    # outside set-gid directories the creator's group applies
    plain = fs.mkdir(ROOT, b"plain", 0o777, user)
    h = fs.create(plain.ino, b"h", 0o666, user)
    fs.release(h.ino)
    assert h.gid == 5 and plain.gid == 5 and not plain.mode & stat.S_ISGID
    # umask applies
    um = fs.create(plain.ino, b"um", 0o777, Ctx(uid=1, gid=1, umask=0o077))
    fs.release(um.ino)
    assert stat.S_IMODE(um.mode) == 0o700


# ------------------------------------------------------------------------------ read-only


def _image_digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_readonly_refuses_every_change(make_fs):
    fs = make_fs(size=32 << 20)
    f = mkfile(fs, b"f", b"data")
    d = mkdir(fs, b"d")
    mkdir(fs, b"empty")
    fs.setxattr(f, b"user.x", b"1")
    img, _ = paths_of(make_fs, fs)
    ro = make_fs.reopen(fs, readonly=True)
    digest = _image_digest(img)
    E = errno.EROFS
    err(E, ro.create, ROOT, b"n", 0o644)
    err(E, ro.mkdir, ROOT, b"n", 0o755)
    err(E, ro.mknod, ROOT, b"n", stat.S_IFIFO | 0o644, 0)
    err(E, ro.symlink, ROOT, b"n", b"t")
    err(E, ro.link, f, ROOT, b"n")
    err(E, ro.unlink, ROOT, b"f")
    err(E, ro.rmdir, ROOT, b"empty")
    err(E, ro.rename, ROOT, b"f", ROOT, b"g")
    err(E, ro.rename, ROOT, b"f", ROOT, b"d", 2)
    err(E, ro.setattr, f, mode=0o600)
    err(E, ro.setattr, f, size=0)
    err(E, ro.setattr, f, uid=1)
    err(E, ro.setattr, f, mtime_ns=5)
    err(E, ro.write, f, 0, b"x")
    err(E, ro.setxattr, f, b"user.y", b"2")
    err(E, ro.removexattr, f, b"user.x")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        err(E, ro.open, f, flags)
    # reading works
    ro.open(f, os.O_RDONLY)
    assert ro.read(f, 0, 10) == b"data"
    ro.release(f)
    assert ro.getxattr(f, b"user.x") == b"1"
    assert sorted(names(ro, ROOT)) == [b"d", b"empty", b"f"]
    assert look(ro, ROOT, b"d").ino == d
    ro.commit()
    ro.checkpoint()
    assert _image_digest(img) == digest
    fs = make_fs.reopen(ro)
    assert fs.read(f, 0, 10) == b"data"


# ------------------------------------------------------------------------------ statfs


def test_statfs_numbers(make_fs):
    fs = make_fs(size=64 << 20, inodes=1000)
    st0 = fs.statfs()
    assert st0["f_bsize"] == st0["f_frsize"] == BS
    assert st0["f_blocks"] == fs.sb.nblocks - fs.sb.data_start
    assert st0["f_files"] == 999 and st0["f_ffree"] == 998  # root uses one
    assert st0["f_namemax"] == 255
    assert 0 < st0["f_bavail"] < st0["f_bfree"] < st0["f_blocks"]
    reserve = st0["f_bfree"] - st0["f_bavail"]
    f = fs.create(ROOT, b"f", 0o644)
    st1 = fs.statfs()
    assert st1["f_ffree"] == 998 - 1 and st1["f_favail"] == st1["f_ffree"]
    fs.write(f.ino, 0, b"x" * (10 * BS))
    st2 = fs.statfs()
    assert st1["f_bfree"] - st2["f_bfree"] == 10
    assert st2["f_bfree"] - st2["f_bavail"] == reserve
    fs.write(f.ino, 20 * BS, b"y")  # past the direct blocks: data + single indirect
    assert st2["f_bfree"] - fs.statfs()["f_bfree"] == 2
    assert fs.statfs()["f_blocks"] == st0["f_blocks"]
    fs.release(f.ino)
    fs.forget(f.ino, 1)
    fs.unlink(ROOT, b"f")
    fs.commit()
    st3 = fs.statfs()
    assert st3["f_bfree"] == st0["f_bfree"] and st3["f_ffree"] == st0["f_ffree"]


# ------------------------------------------------------------------------------ readdir


def test_readdir_offsets(core_fs):
    fs = core_fs
    d = mkdir(fs, b"d")
    want = {b"e%03d" % i for i in range(300)}
    inos = {n: mkfile(fs, n, parent=d) for n in sorted(want)}
    ents = list(fs.readdir(d, 0))
    assert [e[0] for e in ents[:2]] == [b".", b".."]
    assert ents[0][1].ino == d and ents[1][1].ino == ROOT
    assert [e[2] for e in ents[:2]] == [1, 2]
    got = [e[0] for e in ents[2:]]
    assert sorted(got) == sorted(want) and len(got) == len(want)
    offs = [e[2] for e in ents]
    assert offs == sorted(offs) and len(set(offs)) == len(offs)
    assert all(inos[n] == i.ino for n, i, _ in ents[2:])
    # resuming at any returned offset gives exactly the rest
    for k in range(0, len(ents), 17):
        rest = [e[0] for e in fs.readdir(d, ents[k][2])]
        assert rest == [e[0] for e in ents[k + 1:]]
    assert [e[0] for e in fs.readdir(d, 1)][:1] == [b".."]
    assert list(fs.readdir(d, ents[-1][2])) == []
    # offsets stay the same when the directory grows around the entries
    for i in range(2000):
        mkfile(fs, b"more%d" % i, parent=d)
    offs2 = {n: o for n, _, o in fs.readdir(d, 0)}
    assert all(offs2[n] == o for n, _, o in ents[2:])


@pytest.mark.parametrize("seed", [1, 2])
def test_readdir_paged_with_changes(core_fs, seed):
    rng = random.Random(seed)
    fs = core_fs
    d = mkdir(fs, b"d")
    present = set()
    for i in range(1500):
        mkfile(fs, b"n%d" % i, parent=d)
        present.add(b"n%d" % i)
    stable = set(present)
    seen = []
    off = 0
    serial = 0
    while True:
        page = []
        want = rng.randrange(1, 50)
        for name, inode, nxt in fs.readdir(d, off):
            page.append((name, nxt))
            if len(page) == want:
                break
        if not page:
            break
        seen.extend(n for n, _ in page)
        off = page[-1][1]
        for _ in range(rng.randrange(0, 4)):
            victim = rng.choice(sorted(present))
            fs.unlink(d, victim)
            present.discard(victim)
            stable.discard(victim)
        for _ in range(rng.randrange(0, 8)):
            n = b"new%d" % serial
            serial += 1
            mkfile(fs, n, parent=d)
            present.add(n)
    assert seen[:2] == [b".", b".."]
    listed = seen[2:]
    assert len(listed) == len(set(listed)), "an entry was listed twice"
    assert stable <= set(listed)


# ------------------------------------------------------------------------------ scale


def test_directory_with_100k_entries(make_fs):
    # 100,000 names; most are hard links (to files with many links) so that the test spends
    # its time in the directory, not in inode allocation; 2,000 names are separate inodes
    t0 = time.monotonic()
    fs = make_fs(size=512 << 20, inodes=4096)
    d = mkdir(fs, b"big")
    n_total, n_own = 100_000, 2_000
    targets = [mkfile(fs, b"target%d" % k, b"T%d" % k) for k in range(2)]

    def name(i: int) -> bytes:
        return (b"entry-%06d-" % i).ljust(48 + i % 16, b"x")

    want = {}
    for i in range(n_total):
        if i < n_own:
            ino = fs.mknod(d, name(i), stat.S_IFREG | 0o644, 0).ino
            fs.forget(ino, 1)
        else:
            ino = targets[i % 2]
            fs.link(ino, d, name(i))
            fs.forget(ino, 1)
        want[name(i)] = ino
        if i % 25_000 == 0:
            fs.commit()
    t_create = time.monotonic()
    assert nlink(fs, targets[0]) == 1 + (n_total - n_own) // 2
    fs = make_fs.reopen(fs)
    for n, ino in want.items():
        assert look(fs, d, n).ino == ino
    t_lookup = time.monotonic()
    listed = {}
    off = 0
    while True:  # in pages, as the kernel reads a directory
        page = 0
        for n, inode, nxt in fs.readdir(d, off):
            if n not in (b".", b".."):
                assert n not in listed
                listed[n] = inode.ino
            off = nxt
            page += 1
            if page == 500:
                break
        if page < 500:
            break
    assert listed == want
    t_list = time.monotonic()
    for i, n in enumerate(want):
        fs.unlink(d, n)
        if i % 25_000 == 0:
            fs.commit()
    assert names(fs, d) == []
    assert nlink(fs, targets[0]) == 1
    fs.rmdir(ROOT, b"big")
    fs.commit()
    t_end = time.monotonic()
    print(f"100k dir: create {t_create - t0:.1f}s lookup {t_lookup - t_create:.1f}s "
          f"list {t_list - t_lookup:.1f}s delete {t_end - t_list:.1f}s")


# ------------------------------------------------------------------------------ durability


def _snapshot_tree(fs, ino=ROOT, path=b"") -> dict:
    out = {}
    for n, inode, _ in fs.readdir(ino, 0):
        if n in (b".", b".."):
            continue
        p = path + b"/" + n
        data = None
        if stat.S_ISREG(inode.mode):  # read first: the read may update atime (relatime)
            data = hashlib.sha256(fs.read(inode.ino, 0, inode.size)).hexdigest()
        a = fs.getattr(inode.ino)
        rec = dict(ino=a.ino, mode=a.mode, uid=a.uid, gid=a.gid, nlink=a.nlink, size=a.size,
                   rdev=a.rdev, atime=a.atime_ns, mtime=a.mtime_ns, ctime=a.ctime_ns,
                   blocks=a.blocks, gen=a.generation,
                   xattrs={k: fs.getxattr(a.ino, k) for k in fs.listxattr(a.ino)})
        if stat.S_ISREG(a.mode):
            rec["data"] = data
        elif stat.S_ISLNK(a.mode):
            rec["target"] = fs.readlink(a.ino)
        out[p] = rec
        if stat.S_ISDIR(a.mode):
            out.update(_snapshot_tree(fs, a.ino, p))
    return out


def _build_tree(fs, rng: random.Random) -> None:
    d = mkdir(fs, b"dir")
    sub = mkdir(fs, b"sub", parent=d)
    for i, size in enumerate([0, 1, 4095, 4096, 4097, 12 * BS, 13 * BS + 1, 1 << 20 | 3]):
        mkfile(fs, b"f%d" % i, rng.randbytes(size), parent=d if i % 2 else sub)
    sp = mkfile(fs, b"sparse")
    fs.write(sp, 20 << 20, b"end")
    fs.write(sp, 7 * BS + 5, b"mid")
    fs.symlink(d, b"link", b"../sparse")
    fs.forget(look(fs, d, b"link").ino, 1)
    fs.mknod(sub, b"tty", stat.S_IFCHR | 0o620, os.makedev(4, 1))
    fs.forget(look(fs, sub, b"tty").ino, 1)
    fs.link(sp, sub, b"sparse-link")
    fs.forget(sp, 1)
    fs.setxattr(sp, b"user.k", rng.randbytes(300))
    fs.setattr(sp, mode=0o4711, uid=12, gid=34, atime_ns=123, mtime_ns=456_789)


def test_data_durable_across_reopen(make_fs):
    fs = make_fs()
    _build_tree(fs, random.Random(12))
    before = _snapshot_tree(fs)
    fs.commit()
    fs = make_fs.reopen(fs)
    assert _snapshot_tree(fs) == before
    ro = make_fs.reopen(fs, readonly=True)
    assert _snapshot_tree(ro) == before
    fs = make_fs.reopen(ro)
    assert _snapshot_tree(fs) == before


def test_crash_after_commit_keeps_everything_committed(make_fs):
    fs = make_fs()
    _build_tree(fs, random.Random(13))
    before = _snapshot_tree(fs)  # reading may update atimes (relatime): commit them too
    fs.commit()
    # uncommitted changes after the last commit may be lost, but never damage anything
    mkfile(fs, b"late", b"not committed")
    fs = crash_reopen(make_fs, fs)
    after = _snapshot_tree(fs)
    after.pop(b"/late", None)
    assert after == before


def _revert_blocks(img, saved: dict[int, bytes]) -> None:
    fd = os.open(img, os.O_RDWR)
    try:
        for b, data in saved.items():
            os.pwrite(fd, data, b * BS)
    finally:
        os.close(fd)


def _read_image_blocks(img, numbers) -> dict[int, bytes]:
    fd = os.open(img, os.O_RDONLY)
    try:
        return {b: os.pread(fd, BS, b * BS) for b in numbers}
    finally:
        os.close(fd)


def test_journal_replay_after_crash_past_commit_point(make_fs):
    fs = make_fs()
    img, jnl = paths_of(make_fs, fs)
    base = mkfile(fs, b"base", b"committed before")
    fs.commit()
    # the transaction under test
    data = pattern(70_000, 14)
    f = mkfile(fs, b"new-file", data)
    d = mkdir(fs, b"new-dir")
    fs.symlink(d, b"sl", b"target")
    fs.forget(look(fs, d, b"sl").ino, 1)
    fs.setxattr(base, b"user.tx", b"in the journal")
    fs.write(base, 0, b"COMMITTED")
    txn = fs.prepare_commit()
    assert txn is not None
    seq, blocks = txn
    before = _read_image_blocks(img, blocks)
    fs.write_commit(txn)  # the redo record is durable: this is the commit point
    # ... and the crash comes before any metadata write reached the volume
    _revert_blocks(img, before)
    fs.journal.close()
    fs.dev.close()
    new = FileSystem(Volume(img), jnl)
    replace_fs(make_fs, fs, new)
    fs = new
    assert fs.replayed == len(blocks)
    assert fs.sb.commit_seq == seq
    assert fs.read(look(fs, ROOT, b"new-file").ino, 0, 100_000) == data
    assert look(fs, ROOT, b"new-file").ino == f
    assert fs.readlink(look(fs, d, b"sl").ino) == b"target"
    assert fs.getxattr(base, b"user.tx") == b"in the journal"
    assert fs.read(base, 0, 100) == b"COMMITTED before"
    assert sorted(names(fs, ROOT)) == [b"base", b"new-dir", b"new-file"]
    # replay is complete: the redo log is empty now
    assert fs.journal.read() is None


def test_torn_journal_record_keeps_previous_state(make_fs):
    fs = make_fs()
    img, jnl = paths_of(make_fs, fs)
    mkfile(fs, b"base", b"old")
    fs.commit()
    state = _snapshot_tree(fs)
    fs.checkpoint()  # with the atimes the reads set (relatime)
    mkfile(fs, b"new-file", b"lost")
    mkdir(fs, b"new-dir")
    txn = fs.prepare_commit()
    before = _read_image_blocks(img, txn[1])
    fs.write_commit(txn)
    _revert_blocks(img, before)
    os.truncate(jnl, os.path.getsize(jnl) - 1)  # the record never completed
    fs.journal.close()
    fs.dev.close()
    new = FileSystem(Volume(img), jnl)
    replace_fs(make_fs, fs, new)
    assert new.replayed == 0
    assert _snapshot_tree(new) == state


def test_blocks_freed_by_a_closing_transaction_are_not_reused_before_its_commit_point(make_fs):
    # The FUSE adapter runs write_commit() in a worker thread while new requests go on
    # (core.py: "the next transaction goes on"). Blocks freed by the transaction being
    # committed still belong to a file in the last durable state until its redo record is
    # written: data written meanwhile must not land in them, or a crash in that window
    # leaves the committed file holding someone else's bytes.
    fs = make_fs(size=8 << 20)
    a_data = b"A" * (1 << 20)
    a = mkfile(fs, b"A", a_data)
    fill = fs.create(ROOT, b"fill", 0o644).ino
    off = 0
    with pytest.raises(FSError):
        while True:  # leave no room but A's blocks once A is deleted
            off += fs.write(fill, off, b"F" * (1 << 18))
    fs.release(fill)
    fs.forget(fill, 1)
    fs.commit()  # T0: A is durable
    fs.unlink(ROOT, b"A")  # T1 frees A's blocks
    txn = fs.prepare_commit()  # T1 is closed; write_commit() would now run in a thread
    assert txn is not None
    b = fs.create(ROOT, b"B", 0o644)  # T2 goes on meanwhile
    try:
        fs.write(b.ino, 0, b"B" * (1 << 20))
    except FSError as e:  # refusing for lack of space is fine; overwriting A is not
        assert e.errno == errno.ENOSPC
    # crash before T1's redo record is durable: the volume must still hold T0
    fs = crash_reopen(make_fs, fs)
    assert look(fs, ROOT, b"A").ino == a
    got = fs.read(a, 0, len(a_data))
    assert got == a_data, (f"a committed file lost {len(got) - got.count(b'A')} of its bytes "
                           f"to data written while the next transaction was committing")


def test_mkfs_over_a_stale_redo_log(tmp_path):
    # A journal left by an earlier file system at the same path (its volume replaced after
    # a crash) must not be replayed onto the freshly made volume.
    from repfs.fs.mkfs import mkfs
    jnl = tmp_path / "journal"
    old_dev = Volume.create(tmp_path / "old.img", 4096)
    mkfs(old_dev, jnl)
    old = FileSystem(old_dev, jnl)
    old.forget(old.create(ROOT, b"old-file", 0o644).ino, 1)
    old.commit()  # the redo log keeps this record until a checkpoint
    old.journal.close()
    old_dev.close()  # crash
    dev = Volume.create(tmp_path / "new.img", 2048)
    try:
        mkfs(dev, jnl)
        fs = FileSystem(dev, jnl)
        assert fs.sb.nblocks == 2048
        assert names(fs, ROOT) == []
        fs.close()
    finally:
        dev.close()


# ------------------------------------------------------------------------------ failed commits
# A commit that fails (EIO or ENOSPC under the redo log or the volume, a value that does not
# fit the format) turns the core read-only, as ext4's errors=remount-ro does: the in-memory
# state stays readable, every later commit fails with EIO (no assertion about a commit still
# in progress), and the next open finds the last durable commit, fsck clean.


class FailingLayer:
    """The volume with faults switched on by the test: EIO from flush() and/or from writes
    of committed metadata (the checkpoint); everything else passes through."""

    def __init__(self, lower):
        self.lower = lower
        self.nblocks = lower.nblocks
        self.block_size = BS
        self.fail_flush = False
        self.fail_meta_writes = False
        self.fail_reads = False
        self.meta_writes = 0

    def read(self, start, count):
        if self.fail_reads:
            raise OSError(errno.EIO, "injected: volume read")
        return self.lower.read(start, count)

    def write(self, start, data, meta=False):
        if meta and self.fail_meta_writes:
            self.meta_writes += 1
            if self.meta_writes > 1:  # the first extent lands, the rest fails: a torn checkpoint
                raise OSError(errno.EIO, "injected: checkpoint write")
        self.lower.write(start, data, meta)

    def flush(self):
        if self.fail_flush:
            raise OSError(errno.EIO, "injected: volume flush")
        self.lower.flush()

    def close(self):
        self.lower.close()


def _on_failing_layer(make_fs, fs):
    img, jnl = paths_of(make_fs, fs)
    fs.close()
    fs.dev.close()
    new = FileSystem(FailingLayer(Volume(img)), jnl)
    replace_fs(make_fs, fs, new)
    return new


def _after_failure(fs, before_ino: int, new_ino: int, new_data: bytes) -> None:
    """What a core that turned read-only must still do and refuse."""
    assert fs.readonly and fs.error
    # readable, including what the failed transaction holds in memory
    assert fs.read(new_ino, 0, len(new_data) + 10) == new_data
    assert look(fs, ROOT, b"before").ino == before_ino
    # every change is refused, every commit fails cleanly and keeps failing
    err(errno.EROFS, fs.create, ROOT, b"x", 0o644)
    err(errno.EROFS, fs.write, new_ino, 0, b"y")
    for _ in range(2):
        err(errno.EIO, fs.prepare_commit)
        err(errno.EIO, fs.commit)


def _expect_logged_once(caplog, needle: str) -> None:
    """The failure is logged, once, at ERROR (and taken out of the records the fixture
    checks for unexpected warnings)."""
    hits = [r for r in caplog.records if needle in r.getMessage()]
    assert len(hits) == 1 and hits[0].levelno == logging.ERROR, [r.getMessage() for r in hits]
    assert "read-only" in hits[0].getMessage()
    caplog.records.remove(hits[0])


def _reopen_after_failure(make_fs, fs) -> FileSystem:
    img, jnl = paths_of(make_fs, fs)
    fs.close()  # read-only now: no checkpoint, nothing written
    fs.dev.close()
    new = FileSystem(Volume(img), jnl)
    replace_fs(make_fs, fs, new)
    replayed = new.replayed
    new = fsck_now(make_fs, new)
    new.replayed = replayed  # what the first open after the failure replayed
    return new


def test_failed_redo_log_write_keeps_the_previous_commit(make_fs, caplog):
    fs = make_fs()
    before = mkfile(fs, b"before", b"durable")
    fs.commit()
    state = _snapshot_tree(fs)
    fs.commit()  # the atimes the snapshot's reads set (relatime)
    data = pattern(50_000, 21)
    new = mkfile(fs, b"new", data)
    txn = fs.prepare_commit()
    real = fs.journal.fd
    fs.journal.fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    try:
        with pytest.raises(FSError) as ei:
            fs.write_commit(txn)
    finally:
        os.close(fs.journal.fd)
        fs.journal.fd = real
    assert ei.value.errno == errno.EIO
    assert "redo log" in fs.error and "No space left" in fs.error
    _after_failure(fs, before, new, data)
    _expect_logged_once(caplog, "failed writing the redo log")
    # the transaction never reached its commit point: the previous state is what remains
    fs = _reopen_after_failure(make_fs, fs)
    assert _snapshot_tree(fs) == state


def test_failed_checkpoint_is_replayed_from_the_redo_log(make_fs, caplog):
    fs = _on_failing_layer(make_fs, make_fs())
    before = mkfile(fs, b"before", b"durable")
    fs.commit()
    data = pattern(70_000, 22)
    new = mkfile(fs, b"new", data)
    mkdir(fs, b"dir")
    fs.dev.fail_meta_writes = True
    with pytest.raises(FSError) as ei:
        fs.commit()  # the redo record is durable, then the checkpoint fails half way
    assert ei.value.errno == errno.EIO
    assert fs.dev.meta_writes > 1, "the injected fault did not fire"
    assert "checkpoint" in fs.error
    _after_failure(fs, before, new, data)
    _expect_logged_once(caplog, "failed writing the checkpoint")
    fs = _reopen_after_failure(make_fs, fs)
    assert fs.replayed > 0, "the committed transaction was not replayed"
    assert fs.read(look(fs, ROOT, b"new").ino, 0, 100_000) == data
    assert sorted(names(fs, ROOT)) == [b"before", b"dir", b"new"]


def test_failed_volume_flush_keeps_the_previous_commit(make_fs, caplog):
    fs = _on_failing_layer(make_fs, make_fs())
    before = mkfile(fs, b"before", b"durable")
    fs.commit()
    data = b"not yet durable"
    new = mkfile(fs, b"new", data)
    fs.dev.fail_flush = True
    err(errno.EIO, fs.commit)
    assert "flushing the volume" in fs.error
    _after_failure(fs, before, new, data)
    _expect_logged_once(caplog, "failed flushing the volume")
    fs = _reopen_after_failure(make_fs, fs)
    assert names(fs, ROOT) == [b"before"]
    assert fs.read(before, 0, 100) == b"durable"


def test_commit_that_cannot_be_prepared_changes_nothing(make_fs, caplog):
    # A value the format cannot hold (a bug elsewhere let it in) fails the commit before
    # any block of the transaction changed; the core stays readable and turns read-only.
    fs = make_fs()
    before = mkfile(fs, b"before", b"durable")
    fs.commit()
    new = mkfile(fs, b"new", b"in memory")
    fs.getattr(new).uid = 1 << 40  # does not fit the on-disk field (u32)
    seq = fs.sb.commit_seq
    dirty = set(fs.dirty_inodes)
    err(errno.EIO, fs.commit)
    assert fs.sb.commit_seq == seq and fs.dirty_inodes == dirty and not fs.meta.committing
    assert "could not be prepared" in fs.error
    _after_failure(fs, before, new, b"in memory")
    _expect_logged_once(caplog, "could not be prepared")
    fs = _reopen_after_failure(make_fs, fs)
    assert names(fs, ROOT) == [b"before"]


def test_metadata_read_error_while_preparing_a_commit(make_fs, caplog):
    # Preparing a commit reads the inode-table blocks it packs into when they are not
    # cached: EIO there turns the core read-only instead of escaping half way.
    fs = _on_failing_layer(make_fs, make_fs())
    before = mkfile(fs, b"before", b"durable")
    fs.commit()
    new = mkfile(fs, b"new", b"in memory")
    fs.meta.clean.clear()  # evicted from the clean cache (as a large tree would do)
    fs.dev.fail_reads = True
    err(errno.EIO, fs.commit)
    assert "could not be prepared" in fs.error and "volume read" in fs.error
    fs.dev.fail_reads = False
    _after_failure(fs, before, new, b"in memory")
    _expect_logged_once(caplog, "could not be prepared")
    fs = _reopen_after_failure(make_fs, fs)
    assert names(fs, ROOT) == [b"before"]


class _DataWriteFails(FailingLayer):
    """EIO from every data (non-metadata) write: a disk that fails under a file's blocks."""

    fail_data = False

    def write(self, start, data, meta=False):
        if self.fail_data and not meta:
            raise OSError(errno.EIO, "injected: data write")
        super().write(start, data, meta)


def test_failed_data_write_leaves_no_stale_blocks_mapped(make_fs):
    # A data write that fails with a plain OSError (EIO from the disk, not a layer's
    # refusal) must not leave the blocks it just allocated mapped into the file: they hold
    # whatever a deleted file left there.
    img, jnl = paths_of(make_fs, make_fs(size=16 << 20))
    fs = make_fs.made[-1][0]
    fs.close()
    fs.dev.close()
    fs = FileSystem(_DataWriteFails(Volume(img)), jnl)
    replace_fs(make_fs, make_fs.made[-1][0], fs)
    secret = b"S" * (1 << 20)
    old = mkfile(fs, b"old", secret)
    fs.unlink(ROOT, b"old")
    fs.commit()
    fs.commit()  # its blocks are free for reuse now
    f = fs.create(ROOT, b"new", 0o644).ino
    fs.dev.fail_data = True
    with pytest.raises(OSError) as ei:
        fs.write(f, 0, b"N" * (1 << 20))
    assert ei.value.errno == errno.EIO
    fs.dev.fail_data = False
    inode = fs.getattr(f)
    assert inode.size == 0 and not fs.bmap.lookup(inode, 0, 256).any(), \
        "the failed write left blocks mapped into the file"
    fs.setattr(f, size=1 << 20)  # extend over what the failed write had mapped
    got = fs.read(f, 0, 1 << 20)
    assert b"S" not in got, f"a failed write exposed {got.count(b'S')} bytes of a deleted file"
    assert got == bytes(1 << 20)
    fs.release(f)
    fs.forget(f, 1)
    assert old


def test_failed_checkpoint_flush_turns_read_only(make_fs, caplog):
    # checkpoint() (a consistency point: snapshot, cut, unmount) flushes the volume and then
    # clears the redo log; a failure there is a failed commit too
    fs = _on_failing_layer(make_fs, make_fs())
    before = mkfile(fs, b"before", b"durable")
    fs.commit()
    new = mkfile(fs, b"new", b"committed")
    fs.commit()
    fs.dev.fail_flush = True
    err(errno.EIO, fs.checkpoint)
    assert "a checkpoint failed flushing the volume" in fs.error
    fs.dev.fail_flush = False
    err(errno.EIO, fs.checkpoint)  # and keeps failing: read-only for good
    _after_failure(fs, before, new, b"committed")
    _expect_logged_once(caplog, "a checkpoint failed")
    fs = _reopen_after_failure(make_fs, fs)
    assert sorted(names(fs, ROOT)) == [b"before", b"new"]  # the redo record had it
    assert fs.read(look(fs, ROOT, b"new").ino, 0, 100) == b"committed"


def _new_file_among_stale_free_blocks(make_fs):
    """A 16 MiB file system whose data writes can be made to fail (fs.dev.fail_data), every
    free block holding b"S" (what deleted files left there), and an empty new file in it."""
    img, jnl = paths_of(make_fs, make_fs(size=16 << 20))
    fs = make_fs.made[-1][0]
    fs.close()
    fs.dev.close()
    fs = FileSystem(_DataWriteFails(Volume(img)), jnl)
    replace_fs(make_fs, make_fs.made[-1][0], fs)
    fs.commit()
    for b in range(fs.sb.data_start, fs.sb.nblocks):
        if not fs.alloc.blocks.test(b):
            fs.dev.write(b, b"S" * BS)
    return fs, fs.create(ROOT, b"new", 0o644).ino


@pytest.mark.parametrize("lblk", [3, 200, 5000])  # direct, single and double indirect
def test_small_writes_into_reused_blocks_expose_nothing(make_fs, lblk):
    # The one-block write path (no numpy): a partial write into a hole gets zeros around
    # it, never the deleted file's bytes its new block held; a failed one leaves no block
    # mapped. Then overwrites of mapped blocks (the other fast path) read back exactly.
    fs, f = _new_file_among_stale_free_blocks(make_fs)
    base = lblk * BS
    fs.dev.fail_data = True
    with pytest.raises(OSError):
        fs.write(f, base + 100, b"N" * 10)
    fs.dev.fail_data = False
    inode = fs.getattr(f)
    assert inode.size == 0 and not fs.bmap.lookup(inode, 0, lblk + 1).any()
    assert fs.write(f, base + 100, b"N" * 10) == 10
    assert fs.write(f, base + BS + 4000, b"T" * 96) == 96  # ends at the block's end
    want = bytearray(2 * BS)
    want[100:110] = b"N" * 10
    want[BS + 4000:] = b"T" * 96
    assert fs.read(f, base, 2 * BS) == bytes(want)
    assert fs.write(f, base + 50, b"O" * 4000) == 4000  # across two mapped blocks
    want[50:4050] = b"O" * 4000
    assert fs.write(f, base + BS, b"W" * BS) == BS  # one whole mapped block
    want[BS:] = b"W" * BS
    assert fs.read(f, base, 2 * BS) == bytes(want)
    assert fs.getattr(f).size == base + 2 * BS
    fs.release(f)
    fs.forget(f, 1)


@pytest.mark.parametrize("lblk", [2, 600, 3000])  # direct, single and double indirect
def test_multi_block_writes_into_holes_expose_nothing(make_fs, lblk):
    # The path for a run of holes within one map leaf (the kernel writing back fresh
    # pages): partial ends are zeros, never what deleted files left in the new blocks; a
    # write that fails partway is short and leaves only the written blocks mapped.
    fs, f = _new_file_among_stale_free_blocks(make_fs)
    base = lblk * BS
    fs.dev.fail_data = True
    with pytest.raises(OSError):
        fs.write(f, base + 100, b"N" * (2 * BS))
    fs.dev.fail_data = False
    inode = fs.getattr(f)
    assert inode.size == 0 and not fs.bmap.lookup(inode, 0, lblk + 4).any()
    assert fs.write(f, base + 100, b"N" * (2 * BS)) == 2 * BS  # 3 blocks, both ends partial
    want = bytearray(3 * BS)
    want[100: 100 + 2 * BS] = b"N" * (2 * BS)
    assert fs.getattr(f).size == base + 100 + 2 * BS
    fs.setattr(f, size=base + 3 * BS)
    assert fs.read(f, base, 3 * BS) == bytes(want)
    assert fs.write(f, base + 3 * BS, b"W" * (4 * BS)) == 4 * BS  # whole blocks
    assert fs.read(f, base + 3 * BS, 4 * BS) == b"W" * (4 * BS)
    assert fs.getattr(f).blocks >= 7
    fs.release(f)
    fs.forget(f, 1)


def test_reads_across_map_leaf_boundaries(make_fs):
    """A sequentially written file has an indirect block between the data runs of two map
    leaves: reads across that boundary (read() then takes one read per run, BlockMap.extents)
    return the file's bytes, at any offset and size, also with a hole or a rewritten block
    in the range (the general path)."""
    fs = make_fs(size=64 << 20)
    data = bytearray(random.Random(7).randbytes(6 << 20))
    f = fs.create(ROOT, b"seq", 0o644)
    for off in range(0, len(data), 1 << 20):  # 1 MiB writes, as the kernel sends them
        assert fs.write(f.ino, off, bytes(data[off: off + (1 << 20)])) == 1 << 20
    BS = 4096
    edges = [12 * BS, (12 + 1024) * BS, (12 + 2048) * BS]  # direct | leaf 0 | leaf 1 | ...
    rng = random.Random(8)
    for _ in range(300):
        e = rng.choice(edges)
        off = max(0, e - rng.randrange(1, 600_000))
        size = rng.randrange(1, 1_300_000)
        assert fs.read(f.ino, off, size) == bytes(data[off: off + size]), (off, size)
    # a punched range (truncate and rewrite past it) and an overwrite elsewhere: still right
    fs.setattr(f.ino, size=(12 + 1024) * BS + 100)
    del data[(12 + 1024) * BS + 100:]
    data += bytes(3 * BS)  # a hole...
    tail = random.Random(9).randbytes(BS)
    assert fs.write(f.ino, len(data), tail) == BS  # ...then data again
    data += tail
    assert fs.write(f.ino, 5 * BS, b"\xff" * BS) == BS
    data[5 * BS: 6 * BS] = b"\xff" * BS
    for off, size in [(0, len(data)), (1030 * BS, 12 * BS), ((12 + 1024) * BS - 1, 5 * BS)]:
        assert fs.read(f.ino, off, size) == bytes(data[off: off + size]), (off, size)
    fs.release(f.ino)
