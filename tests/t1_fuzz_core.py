"""Fuzzing a whole file system: damaged metadata blocks read through the core, and fsck.

A small site is made once and filled through the core (directories large enough to have
overflow chains, a sparse file reaching the double-indirect tree, symlinks, extended
attributes, a hard link, an orphan). Each example copies its volume, damages one metadata
block (an inode field set to a boundary value, or a directory, indirect, symlink, xattr,
bitmap or inode-table block, or the superblock: bit flips, truncation, fields set to boundary
values, zeroes, random content) and then:

* opens the core on it and drives lookup, readdir, getattr, read, readlink, listxattr and
  getxattr over the whole tree, and writes, truncation, xattr changes, entries made, moved and
  removed on the damaged inode and a few others: every request returns or fails with the file
  system's own errors (FSError, FormatError, VolumeError: the FUSE adapter answers EIO for the
  last two), never another exception, never a hang; file data is never written into the
  metadata area (superblock, bitmaps, inode table), whatever a damaged pointer says; and no
  commit fails (nothing is logged as a warning or an error);
* runs `repfs fsck` (in this process, through the CLI's own entry point) before and after,
  with and without --repair: it exits 0, 1, 4 or 8, never with a traceback.

A second test does the same exhaustively for every important field of every kind of inode at
its boundary values; a third checks that a damaged meta.lmdb refuses the mount in one line.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repfs.cli import run_cli
from repfs.cli.main import _main as repfs_main
from repfs.fs import format as F
from repfs.fs.core import FileSystem
from repfs.fs.errors import FSError
from repfs.fs.format import BLOCK_SIZE, ROOT_INO, FormatError
from repfs.site import Site
from repfs.volume import Layer, Volume, VolumeError
from tests.fuzzing import examples, mutated, struct_fields

BS = BLOCK_SIZE
# a failing example of a large input must report its error, not hypothesis's warning about it
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
ALLOWED = (FSError, FormatError, VolumeError)
DEEP = (12 + 1024 + 5) * BS  # an offset mapped through the double-indirect tree
FUZZ = settings(max_examples=examples(120),
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------- the image

def _populate(fs: FileSystem) -> dict[str, int]:
    d = fs.mkdir(ROOT_INO, b"dir", 0o755)
    for i in range(220):  # enough to double the hash table and chain overflow blocks
        f = fs.create(d.ino, b"entry-with-a-long-name-%04d-" % i + b"x" * (i % 40), 0o644)
        fs.release(f.ino)
    sub = fs.mkdir(d.ino, b"sub", 0o700)
    deeper = fs.mkdir(sub.ino, b"deeper", 0o700)
    small = fs.create(deeper.ino, b"small", 0o644)
    fs.write(small.ino, 0, b"hello world\n")
    fs.release(small.ino)
    big = fs.create(ROOT_INO, b"sparse", 0o644)
    for off in (0, 13 * BS, DEEP):
        fs.write(big.ino, off, bytes([off % 251]) * BS)
    fs.release(big.ino)
    fs.symlink(ROOT_INO, b"link", b"dir/sub/deeper/small")
    fs.symlink(d.ino, b"long-link", b"t" * 3000)
    fs.setxattr(big.ino, b"user.small", b"v")
    fs.setxattr(small.ino, b"user.big", b"x" * 2000)
    fs.setxattr(small.ino, b"trusted.other", b"y" * 100)
    fs.link(small.ino, ROOT_INO, b"hardlink")
    orphan = fs.create(ROOT_INO, b"orphan", 0o644)
    fs.write(orphan.ino, 0, b"o" * (3 * BS))
    fs.unlink(ROOT_INO, b"orphan")  # still open: on the orphan list, as after a crash
    fs.commit()
    return {"root": ROOT_INO, "dir": d.ino, "sub": sub.ino, "deeper": deeper.ino,
            "small": small.ino, "sparse": big.ino, "link": fs.lookup(ROOT_INO, b"link").ino,
            "long-link": fs.lookup(d.ino, b"long-link").ino, "orphan": orphan.ino}


def _metadata_blocks(fs: FileSystem, extra=()):
    """(kind, block, field list, owner inode) of every metadata block of the populated file
    system, and (inode, table block, offset) of every inode in use."""
    sb = fs.sb
    out = [("superblock", 0, struct_fields(F._SB.format), None)]
    out += [("bitmap", b, [], None) for b in range(sb.bbitmap_start, sb.itable_start)]
    inodes = []
    queue = [ROOT_INO, *extra]
    seen = set()
    while queue:
        ino = queue.pop()
        if ino in seen:
            continue
        seen.add(ino)
        inode = fs.iget(ino)
        blk, off = fs._inode_pos(ino)
        inodes.append((ino, blk, off))
        for kind, _, phys in fs.bmap.walk(inode):
            if kind == "meta":
                out.append(("indirect", int(phys), [(i * 4, 4) for i in range(0, 1024, 7)], ino))
            elif not stat.S_ISREG(inode.mode):
                for p in phys.tolist():
                    what = "directory" if stat.S_ISDIR(inode.mode) else "symlink"
                    out.append((what, int(p), struct_fields(F._DIR_HDR.format)
                                + struct_fields(F._BUCKET_HDR.format)
                                + struct_fields(F._DIRENT.format, F.BUCKET_HDR_SIZE), ino))
        if inode.xattr:
            out.append(("xattr", inode.xattr, struct_fields("<4sIIII15I")
                        + struct_fields("<HHBH"), ino))
        if stat.S_ISDIR(inode.mode):
            queue.extend(child for _, _, child, _, _ in fs.dirs.all_entries(inode))
    return out, inodes


# the inode fields a damaged value does most with: mode, nlink, size, blocks, parent, xattr,
# orphan_next and the 15 block pointers
_INODE_FIELDS = [f for i, f in enumerate(struct_fields(F._INODE.format))
                 if i in (0, 3, 6, 7, 13, 14, 15) or i >= 17]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(site directory, pristine volume bytes, metadata blocks, inodes, data_start, the
    inodes by name)."""
    site_dir = tmp_path_factory.mktemp("fuzz") / "site"
    site = Site.create(site_dir, 4 << 20)
    fs = site.open_fs()
    special = _populate(fs)
    blocks, inodes = _metadata_blocks(fs, [special["orphan"]])
    data_start = fs.sb.data_start
    fs.close()
    fs.dev.close()
    pristine = (site_dir / "volume.img").read_bytes()
    assert fsck(site_dir) == 0
    return site_dir, pristine, blocks, inodes, data_start, special


class Damage:
    """One damaged block (its repr names it without 4 KiB of bytes); `ino`: the inode it
    belongs to, driven first."""

    def __init__(self, what: str, blk: int, content: bytes, ino: int | None):
        self.what, self.blk, self.content, self.ino = what, blk, content, ino

    def __repr__(self) -> str:
        return f"<{self.what}>"


def damage(pristine: bytes, blocks, inodes, data_start: int):
    """A strategy: one damaged metadata block (a Damage)."""
    nblocks = len(pristine) // BS
    # block numbers that matter: the metadata area, its edge, the volume's edge
    pointers = [1, 2, data_start - 1, data_start, nblocks - 1, nblocks, nblocks + 1]

    @st.composite
    def inode_field(draw):
        ino, blk, off = draw(st.sampled_from(inodes))
        foff, width = draw(st.sampled_from(_INODE_FIELDS))
        top = 1 << 8 * width
        value = draw(st.sampled_from(pointers + [0, top // 2, top - 1])
                     | st.integers(0, top - 1))
        old = bytearray(pristine[blk * BS: (blk + 1) * BS])
        old[off + foff: off + foff + width] = (value % top).to_bytes(width, "little")
        return Damage(f"inode {ino}: field at {foff} = {value}", blk, bytes(old), ino)

    @st.composite
    def block(draw):
        kind, blk, fields, owner = draw(st.sampled_from(blocks))
        old = pristine[blk * BS: (blk + 1) * BS]
        how = draw(st.sampled_from(("mutate", "mutate", "mutate", "zero", "random")))
        if how == "zero":
            new = bytes(BS)
        elif how == "random":
            new = draw(st.binary(min_size=BS, max_size=BS))
        else:
            new = draw(mutated(old, fields, max_mutations=6))[:BS].ljust(BS, b"\0")
        return Damage(f"{how} {kind} block {blk} of inode {owner}", blk, new, owner)

    return inode_field() | block()


# ---------------------------------------------------------------------------- the checks

class DataWrites(Layer):
    """Records the file-data writes (meta=False) that reach the volume."""

    def __init__(self, lower):
        super().__init__(lower)
        self.data = []

    def write(self, start, data, meta=False):
        if not meta:
            self.data.append((start, len(data) // BS))
        self.lower.write(start, data, meta)


class MemVolume(Volume):
    """The volume in memory (as the image file, VolumeError outside it): the exhaustive test
    opens the file system a thousand times."""

    def __init__(self, image: bytes):
        self.buf = bytearray(image)
        self.nblocks = len(image) // BS
        self.readonly = False
        self._closed = False

    def read(self, start, count):
        self._check(start, count)
        return bytes(self.buf[start * BS: (start + count) * BS])

    def write(self, start, data, meta=False):
        self._check(start, len(data) // BS)
        self.buf[start * BS: start * BS + len(data)] = data

    def flush(self):
        pass

    def close(self):
        self._closed = True


class Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def attempt(fn, *args):
    """Run one request: its result, or None if it failed with one of the allowed errors."""
    try:
        return fn(*args)
    except ALLOWED:
        return None


def visit(fs: FileSystem, ino: int, *, modify: bool) -> list[int]:
    """The requests a user could make on one inode; returns the children of a directory.
    `modify`: also the changing ones (writes, truncation, xattrs, entries made and removed)."""
    inode = attempt(fs.getattr, ino)
    if inode is None:
        return []
    children = []
    mode = inode.mode
    if stat.S_ISDIR(mode):
        entries = attempt(lambda: list(itertools.islice(fs.readdir(ino, 0), 400))) or []
        for name, _, _ in entries:
            if name not in (b".", b".."):
                found = attempt(fs.lookup, ino, name)
                if found is not None:
                    children.append(found.ino)
        if len(entries) > 4:
            attempt(lambda: list(itertools.islice(fs.readdir(ino, entries[3][2]), 5)))
        attempt(fs.lookup, ino, b"no-such-name")
        attempt(fs.lookup, ino, b"..")
        if modify and attempt(fs.create, ino, b"new-file", 0o644) is not None:
            made = attempt(fs.lookup, ino, b"new-file")
            if made is not None:
                attempt(fs.write, made.ino, 0, b"new")
                attempt(fs.release, made.ino)
            attempt(fs.unlink, ino, b"new-file")
        if modify and attempt(fs.mkdir, ino, b"new-dir", 0o755) is not None:
            # moving a directory in and out walks the parents of both ends
            attempt(fs.rename, ino, b"new-dir", ROOT_INO, b"new-dir-moved")
            attempt(fs.rename, ROOT_INO, b"new-dir-moved", ino, b"new-dir")
            attempt(fs.rmdir, ino, b"new-dir")
            attempt(fs.rmdir, ROOT_INO, b"new-dir-moved")
    elif stat.S_ISREG(mode):
        for off, size in ((0, 65536), (13 * BS, BS), (DEEP, 2 * BS),
                          (max(0, inode.size - 10), 20)):
            attempt(fs.read, ino, off, size)
        if modify and attempt(fs.open, ino, 2) is not None:
            attempt(fs.write, ino, 5, b"written by the fuzz test")
            attempt(fs.write, ino, 13 * BS, b"w" * BS)
            attempt(fs.write, ino, DEEP + BS, b"d" * BS)
            attempt(lambda: fs.setattr(ino, size=20 * BS))
            attempt(fs.release, ino)
    elif stat.S_ISLNK(mode):
        attempt(fs.readlink, ino)
    names = attempt(fs.listxattr, ino) or []
    for n in names[:5]:
        attempt(fs.getxattr, ino, n)
    if modify:
        attempt(fs.setxattr, ino, b"user.fuzz", b"v" * 300)
        attempt(fs.removexattr, ino, b"user.fuzz")
    return children


def drive(fs: FileSystem, focus: int | None) -> None:
    """Every request on the damaged inode, then the read-side ones over the whole tree and
    changes to a few files; bounded. Ends with a commit."""
    if focus is not None:
        visit(fs, focus, modify=True)
    queue = [ROOT_INO]
    seen = set()
    while queue and len(seen) < 300:
        ino = queue.pop()
        if ino in seen:
            continue
        seen.add(ino)
        queue.extend(visit(fs, ino, modify=len(seen) < 6))
    attempt(fs.commit)


def fsck(site_dir, *args) -> int:
    """`repfs fsck` in this process: its exit code (an exception here is a traceback there)."""
    return run_cli("repfs", repfs_main, ["fsck", "-q", *map(str, args), str(site_dir)])


def test_damaged_metadata_through_the_core_and_fsck(image, tmp_path, capsys, caplog):
    site_dir, pristine, blocks, inodes, data_start, _ = image
    work = tmp_path / "site"
    shutil.copytree(site_dir, work)
    vol_path = work / "volume.img"
    journal = work / "journal"

    @FUZZ
    @given(damage(pristine, blocks, inodes, data_start), st.booleans())
    def prop(case, repair):
        what = case.what
        vol = bytearray(pristine)
        vol[case.blk * BS: (case.blk + 1) * BS] = case.content
        vol_path.write_bytes(vol)
        journal.write_bytes(b"")
        assert fsck(work) in (0, 4, 8), what
        dev = DataWrites(Volume(vol_path))
        try:
            fs = FileSystem(dev, journal)
        except FormatError:
            dev.close()
        else:
            data_start = fs.sb.data_start
            errors = Errors()
            logging.getLogger("repfs").addHandler(errors)
            try:
                drive(fs, case.ino)
            finally:
                attempt(fs.close)
                dev.close()
                logging.getLogger("repfs").removeHandler(errors)
            # damage fails the requests that meet it; it never fails a commit (which would
            # lose the other changes of the transaction and turn the file system read-only)
            assert not errors.records, f"{what}: {errors.records}"
            wrong = [(s, n) for s, n in dev.data if s < data_start]
            assert not wrong, f"{what}: file data written into the metadata area: {wrong}"
        if repair:
            assert fsck(work, "--repair") in (0, 1, 4, 8), what
        assert fsck(work) in (0, 1, 4, 8), what

    prop()
    capsys.readouterr()
    caplog.clear()  # what the property checked per example


def test_every_inode_field_at_its_boundaries(image, tmp_path, caplog):
    """Each field of each kind of inode (directory, file, sparse file, symlinks, an orphan) set
    to its boundary values and to block numbers at the edges of the metadata area and of the
    volume, then every request on that inode: the same rules as above, exhaustively."""
    site_dir, pristine, _, inodes, data_start, special = image
    where = {ino: (blk, off) for ino, blk, off in inodes}
    # the redo log is a file: keep it in memory too where the machine has a tmpfs
    shm = Path("/dev/shm")
    jdir = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path
    journal = jdir / "journal"
    try:
        tried = _every_field(pristine, where, special, data_start, journal)
    finally:
        if jdir != tmp_path:
            shutil.rmtree(jdir)
    assert tried > 100
    caplog.clear()


def _every_field(pristine, where, special, data_start, journal) -> int:
    nblocks = len(pristine) // BS
    names = {"sparse": (ROOT_INO, b"sparse"), "small": (ROOT_INO, b"hardlink"),
             "link": (ROOT_INO, b"link"), "long-link": (special["dir"], b"long-link")}
    tried = 0
    for name, ino in special.items():
        blk, off = where[ino]
        for foff, width in _INODE_FIELDS:
            top = 1 << 8 * width
            values = {0, 1, top - 1} | ({data_start - 1, nblocks, ino} if width == 4
                                        else {top // 2})
            for value in sorted(values):
                vol = bytearray(pristine)
                vol[blk * BS + off + foff: blk * BS + off + foff + width] = value.to_bytes(
                    width, "little")
                journal.write_bytes(b"")
                what = f"inode {ino} ({name}): field at {foff} = {value}"
                dev = DataWrites(MemVolume(vol))
                try:
                    fs = FileSystem(dev, journal)
                except FormatError:
                    dev.close()
                    continue
                errors = Errors()
                logging.getLogger("repfs").addHandler(errors)
                try:
                    visit(fs, ino, modify=True)
                    if name in names:  # and last, its name goes (looked up first, as
                        attempt(fs.lookup, *names[name])  # the kernel does)
                        attempt(fs.unlink, *names[name])
                    attempt(fs.commit)
                finally:
                    attempt(fs.close)
                    dev.close()
                    logging.getLogger("repfs").removeHandler(errors)
                tried += 1
                assert not errors.records, f"{what}: {errors.records}"
                wrong = [(s, n) for s, n in dev.data if s < data_start]
                assert not wrong, f"{what}: file data written into the metadata area: {wrong}"
    return tried


@pytest.mark.parametrize("name,value", [("last_received", b"\1" * 9), ("last_received", b"abc")])
def test_damaged_replication_context_refuses_the_mount_in_one_line(tmp_path, name, value):
    """A value of meta.lmdb that does not decode (MetaError) stops `repfs mount` with one line
    and leaves no mount behind (it used to kill the daemon after the FUSE mount was made, with
    a traceback in the log and the mount point left dead)."""
    from repfs.repl import keys as RK
    from repfs.snap.store import open_env
    from tests.conftest import run_repfs

    site, mnt = tmp_path / "site", tmp_path / "mnt"
    run_repfs("mkfs", site, "--size", "4M")
    mnt.mkdir()
    env = open_env(site)
    db = env.open_db(RK.CTX)
    with env.begin(write=True, db=db) as txn:
        txn.put(b"role", b"secondary")
        txn.put(b"secondary_state", b"replicating")
        txn.put(name.encode(), value)
    env.close()
    try:
        r = run_repfs("mount", site, mnt, check=False)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "meta.lmdb" in lines[0], r.stderr
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
