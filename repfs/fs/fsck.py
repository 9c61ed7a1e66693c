"""fsck: a fixed sequence of named checks over an unmounted repfs volume.

Each ``check_*`` method appends problems to the report; ``--repair`` fixes the kinds of damage
that have one safe fix (free counts, leaked blocks and inodes, link counts, orphans) and
leaves the rest for a person. Exit codes (``repfs fsck``)::

    0  the file system is clean
    1  problems were found and all were repaired
    4  problems remain (run with --repair, or they need a person)
    8  fsck could not run (not a repfs site, site in use, damaged superblock, I/O error)

Memory grows with the number of used blocks and inodes, not with the volume's size.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

import numpy as np

from ..volume import VolumeError
from .alloc import BITS_PER_BLOCK
from .core import ORPHAN_FLAG, XATTR_NAMESPACES, FileSystem
from .errors import FSError
from .format import (
    INODES_PER_BLOCK, Inode, BLOCK_SIZE, BUCKET_CAPACITY, HASH_BITS, ROOT_INO, FormatError, bucket_header, iter_bucket,
    name_hash, XATTR_LIST_MAX, XATTR_NAME_MAX, XATTR_SIZE_MAX,
    xattr_list_size,
)
from .xattrs import XattrMap

CHECKS = (
    "check_journal",
    "check_inodes",
    "check_block_maps",
    "check_xattrs",
    "check_directories",
    "check_link_counts",
    "check_block_bitmap",
    "check_counts",
    "check_orphans",
)


@dataclass
class Problem:
    check: str
    message: str
    repaired: bool = False


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        if not self.problems:
            return 0
        return 1 if all(p.repaired for p in self.problems) else 4


_VALID_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                stat.S_IFIFO, stat.S_IFSOCK}


class Fsck:
    def __init__(self, fs: FileSystem, repair: bool = False):
        self.fs = fs
        self.repair = repair
        self.report = Report()
        self.inodes: dict[int, object] = {}
        self.refs: dict[int, int] = {}
        self.subdirs: dict[int, int] = {}
        self.used: list[np.ndarray] = []  # volume blocks referenced by inodes
        self.maps_incomplete = False  # a block map could not be read: `used` lacks its blocks

    def problem(self, check: str, msg: str, repaired: bool = False) -> None:
        self.report.problems.append(Problem(check, msg, repaired and self.repair))

    def run(self) -> Report:
        for name in CHECKS:
            try:
                getattr(self, name)()
            except (FormatError, VolumeError, OSError) as e:
                # damage this check cannot step over (found by tests/t1_fuzz_core.py: it
                # ended fsck with a traceback); later checks need its results, so stop here
                # and write none of the repairs decided so far
                self.problem(name, f"stopped by damage it cannot step over: {e}")
                for p in self.report.problems:
                    p.repaired = False
                self._discard()
                return self.report
        if self.repair and self.report.problems:
            self.fs.checkpoint()
        return self.report

    def _discard(self) -> None:
        """Forget every change made in the core, so closing it writes nothing."""
        fs = self.fs
        fs.meta.dirty.clear()
        fs.dirty_inodes.clear()
        fs.alloc.pending = []
        fs.data_dirty = fs.sb_dirty = False

    # -------------------------------------------------------------------------------------

    def check_journal(self) -> None:
        if self.fs.replayed:
            self.report.notes.append(
                f"replayed {self.fs.replayed} blocks from the redo log (normal after a crash)")

    def check_inodes(self) -> None:
        fs = self.fs
        bm = fs.alloc.inodes
        for idx in range(fs.sb.ibitmap_blocks):
            bits = np.unpackbits(bm._bits(idx), bitorder="little")
            for off in np.flatnonzero(bits).tolist():
                ino = idx * BITS_PER_BLOCK + off
                if ino == 0 or ino >= fs.sb.ninodes:
                    continue
                blk, o = fs._inode_pos(ino)
                inode = fs.inodes.get(ino) or Inode.unpack_from(ino, fs.meta.read(blk), o)
                if stat.S_IFMT(inode.mode) not in _VALID_TYPES:
                    self.problem("check_inodes", f"inode {ino} is in use but has mode {inode.mode:o}")
                    continue
                self.inodes[ino] = inode
        if ROOT_INO not in self.inodes or not stat.S_ISDIR(self.inodes[ROOT_INO].mode):
            self.problem("check_inodes", "the root directory (inode 1) is missing")

    def check_block_maps(self) -> None:
        fs = self.fs
        sb = fs.sb
        for ino, inode in self.inodes.items():
            count = 0
            limit = -(-inode.size // BLOCK_SIZE)
            bad = False
            try:
                for kind, lblks, phys in fs.bmap.walk(inode):
                    arr = np.atleast_1d(np.asarray(phys, dtype=np.int64))
                    if ((arr < sb.data_start) | (arr >= sb.nblocks)).any():
                        self.problem("check_block_maps",
                                     f"inode {ino} points outside the data area")
                        bad = True
                        continue
                    self.used.append(arr)
                    count += len(arr)
                    if kind == "data" and len(lblks) and int(lblks.max()) >= limit:
                        self.problem("check_block_maps",
                                     f"inode {ino} maps blocks past its size {inode.size}")
            except (FormatError, VolumeError, OSError) as e:
                self.problem("check_block_maps", f"inode {ino}: its block map is damaged ({e})")
                self.maps_incomplete = bad = True
            if inode.xattr:
                xb = self._xattr_blocks(ino, inode)
                if xb is None:
                    bad = True
                else:
                    self.used.append(xb)
                    count += len(xb)
            if not bad and count != inode.blocks:
                self.problem("check_block_maps",
                             f"inode {ino} counts {inode.blocks} blocks but holds {count}",
                             repaired=True)
                if self.repair:
                    inode.blocks = count
                    self._save(inode)
        allused = np.sort(np.concatenate(self.used)) if self.used else np.zeros(0, np.int64)
        dup = allused[1:][np.diff(allused) == 0]
        if len(dup):
            self.problem("check_block_maps",
                         f"{len(np.unique(dup))} blocks are used twice (first: {int(dup[0])})")
        self.used_sorted = np.unique(allused)

    def _xattr_blocks(self, ino: int, inode):
        """The blocks of an inode's extended attributes; None (and a problem) if they cannot
        all be read or point outside the data area. Then the bitmap cannot tell their blocks
        from leaked ones (maps_incomplete), so nothing is freed as leaked."""
        sb = self.fs.sb
        problem = None
        if not sb.data_start <= inode.xattr < sb.nblocks:
            problem = f"xattr block {inode.xattr} is outside the data area"
        else:
            try:
                root = self.fs.xattrs._root(inode)
                bad = [p for p in (root.map if root else ()) if p and not
                       sb.data_start <= p < sb.nblocks]
                if bad:
                    raise FormatError(f"xattr map pointer {bad[0]} is outside the data area")
                xb = self.fs.xattrs.blocks(inode)
                if ((xb < sb.data_start) | (xb >= sb.nblocks)).any():
                    raise FormatError("xattr blocks outside the data area")
            except (FormatError, IndexError, ValueError, OSError, VolumeError) as e:
                problem = f"xattr blocks: {e}"
        if problem is None:
            return xb
        self.problem("check_block_maps", f"inode {ino}: {problem}")
        self.maps_incomplete = True
        return None

    def check_xattrs(self) -> None:
        """Every inode's extended attributes parse, their headers agree with their entries,
        every entry keeps the limits, and the xattr file maps exactly the stream's blocks."""
        fs = self.fs
        for ino, inode in self.inodes.items():
            if not inode.xattr or not fs.sb.data_start <= inode.xattr < fs.sb.nblocks:
                continue  # none, or reported by check_block_maps
            where = f"inode {ino}: extended attributes"
            try:
                attrs = fs.xattrs.load(inode)
                root = fs.xattrs._root(inode)
            except (FSError, FormatError, IndexError, ValueError) as e:
                self.problem("check_xattrs", f"{where}: {e}")
                continue
            if not attrs:
                self.problem("check_xattrs", f"{where}: a block holds no attribute")
            for name, value in attrs.items():
                if (not name.startswith(XATTR_NAMESPACES) or name in XATTR_NAMESPACES
                        or len(name) > XATTR_NAME_MAX or len(value) > XATTR_SIZE_MAX):
                    self.problem("check_xattrs", f"{where}: bad entry {name[:40]!r}")
            if root is None:
                continue  # version 1: one block
            if root.names != xattr_list_size(attrs) or root.names > XATTR_LIST_MAX:
                self.problem("check_xattrs", f"{where}: header counts {root.names} bytes of "
                                             f"names, there are {xattr_list_size(attrs)}")
            mapped = [lb for kind, lb, _ in fs.bmap.walk(XattrMap(root.map)) if kind == "data"]
            past = [int(a.max()) for a in mapped if len(a) and int(a.max()) >= root.file_blocks]
            if past:
                self.problem("check_xattrs", f"{where}: block {max(past)} is mapped past the "
                                             f"end ({root.file_blocks} blocks)")

    def check_directories(self) -> None:
        fs = self.fs
        for ino, inode in self.inodes.items():
            if not stat.S_ISDIR(inode.mode):
                continue
            try:
                hdr = fs.dirs.header(inode)
            except (FormatError, OSError) as e:
                self.problem("check_directories", f"directory {ino}: {e}")
                continue
            count = 0
            try:
                for b in range(1 << hdr.depth):
                    seen_blocks = 0
                    for lblk, buf in fs.dirs._chain(inode, hdr, b):
                        seen_blocks += 1
                        if seen_blocks > hdr.nblocks:
                            raise OSError("bucket chain loops")
                        c, used, _ = bucket_header(buf)
                        if used > BUCKET_CAPACITY:
                            raise OSError(f"bucket block {lblk} overfull")
                        for _, h, child, typ, name in iter_bucket(buf):
                            count += 1
                            if h != name_hash(name) or h >> (HASH_BITS - hdr.depth) != b:
                                self.problem("check_directories",
                                             f"directory {ino}: entry {name!r} is in the wrong bucket")
                            target = self.inodes.get(child)
                            if target is None:
                                self.problem("check_directories",
                                             f"directory {ino}: entry {name!r} names free inode {child}")
                                continue
                            if target.mode >> 12 != typ:
                                self.problem("check_directories",
                                             f"directory {ino}: entry {name!r} has the wrong type")
                            self.refs[child] = self.refs.get(child, 0) + 1
                            if stat.S_ISDIR(target.mode):
                                self.subdirs[ino] = self.subdirs.get(ino, 0) + 1
                                if target.parent != ino:
                                    self.problem("check_directories",
                                                 f"directory {child} is in {ino} but its parent is "
                                                 f"{target.parent}")
            except (OSError, FormatError) as e:
                self.problem("check_directories", f"directory {ino}: {e}")
                continue
            if count != hdr.count:
                self.problem("check_directories",
                             f"directory {ino}: header counts {hdr.count} entries, holds {count}")

    def check_link_counts(self) -> None:
        for ino, inode in self.inodes.items():
            refs = self.refs.get(ino, 0)
            if ino == ROOT_INO:
                refs = 1
            if stat.S_ISDIR(inode.mode):
                want = 0 if refs == 0 else 1 + refs + self.subdirs.get(ino, 0)
                if refs > 1:
                    self.problem("check_link_counts", f"directory {ino} has {refs} names")
                    continue
            else:
                want = refs
            if refs == 0:
                if inode.flags & ORPHAN_FLAG and inode.nlink == 0:
                    continue  # open-but-unlinked: freed by the next mount
                self.problem("check_link_counts", f"inode {ino} is in use but has no name",
                             repaired=True)
                if self.repair:
                    inode.nlink = 0
                    self._save(inode)
                    self.fs.inodes[ino] = inode
                    self.fs._destroy(inode)
                continue
            if inode.nlink != want:
                self.problem("check_link_counts",
                             f"inode {ino} has link count {inode.nlink}, should be {want}",
                             repaired=True)
                if self.repair:
                    inode.nlink = want
                    self._save(inode)

    def check_block_bitmap(self) -> None:
        if self.maps_incomplete:  # what looks leaked may belong to the unreadable maps
            self.problem("check_block_bitmap", "skipped: some block maps could not be read")
            return
        fs = self.fs
        sb = fs.sb
        used = self.used_sorted
        for idx in range(sb.bbitmap_blocks):
            lo = idx * BITS_PER_BLOCK
            hi = min(lo + BITS_PER_BLOCK, sb.nblocks)
            bits = np.unpackbits(fs.alloc.blocks._bits(idx), bitorder="little")[: hi - lo]
            want = np.zeros(hi - lo, dtype=np.uint8)
            meta_hi = min(max(sb.itable_start - lo, 0), hi - lo)
            want[:meta_hi] = 1
            a, b = np.searchsorted(used, [lo, hi])
            want[used[a:b] - lo] = 1
            # inode-table blocks: valid once used; an over-marked table block is harmless
            t0 = min(max(sb.itable_start - lo, 0), hi - lo)
            t1 = min(max(sb.data_start - lo, 0), hi - lo)
            want[t0:t1] = bits[t0:t1]
            for i in self.inodes:
                tb = sb.itable_start + i // INODES_PER_BLOCK - lo
                if 0 <= tb < hi - lo and not bits[tb]:
                    self.problem("check_block_bitmap",
                                 f"inode-table block {tb + lo} holds inode {i} but is marked free",
                                 repaired=True)
                    want[tb] = 1
            missing = np.flatnonzero(want & ~bits & 1)
            leaked = np.flatnonzero(bits & ~want & 1)
            if len(missing):
                self.problem("check_block_bitmap",
                             f"{len(missing)} blocks in use are marked free (first: {lo + int(missing[0])})",
                             repaired=True)
            if len(leaked):
                self.problem("check_block_bitmap",
                             f"{len(leaked)} blocks are marked used but nothing uses them "
                             f"(first: {lo + int(leaked[0])})", repaired=True)
            if self.repair and (len(missing) or len(leaked)):
                buf = fs.meta.modify(sb.bbitmap_start + idx)
                full = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
                full[: hi - lo] = want
                buf[:] = np.packbits(full, bitorder="little").tobytes()

    def check_counts(self) -> None:
        fs = self.fs
        sb = fs.sb
        in_data = int(np.count_nonzero(self.used_sorted >= sb.data_start))
        if not self.maps_incomplete:
            self._count("free_blocks", "free blocks", (sb.nblocks - sb.data_start) - in_data)
        self._count("free_inodes", "free inodes",
                    sb.ninodes - 1 - (fs.alloc.inodes.count_set() - 1))

    def _count(self, field: str, what: str, want: int) -> None:
        sb = self.fs.sb
        have = getattr(sb, field)
        if have != want:
            self.problem("check_counts", f"superblock counts {have} {what}, there are {want}",
                         repaired=True)
            if self.repair:
                setattr(sb, field, want)
                self.fs.sb_dirty = True

    def check_orphans(self) -> None:
        fs = self.fs
        seen = set()
        ino = fs.sb.orphan_head
        while ino:
            if ino in seen or ino not in self.inodes:
                self.problem("check_orphans", f"the orphan list is damaged at inode {ino}")
                break
            seen.add(ino)
            ino = self.inodes[ino].orphan_next
        for i, inode in self.inodes.items():
            if inode.nlink == 0 and i not in seen:
                self.problem("check_orphans", f"inode {i} has no links and is not an orphan")

    def _save(self, inode) -> None:
        self.fs.inodes[inode.ino] = inode
        self.fs._dirty(inode)


def fsck(fs: FileSystem, repair: bool = False) -> Report:
    return Fsck(fs, repair).run()
