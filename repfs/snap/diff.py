"""Which files and directories changed between two snapshots, found from the changed blocks.

Goes beyond the reference's snapshot delta (FIG. 34-35, 39-40): the block delta says how much
changed; this says where. The work follows the changes, not the size of the trees:

1. The changed blocks (``changed_blocks``) that lie in the inode table are read on both sides
   and compared record by record: the inodes whose record differs (other than atime) are the
   *changed inodes*. Every operation that changes a file, directory, symlink or their
   attributes rewrites the inode record (mtime or ctime is set, the size, block count or map
   changes); an entry added to, removed from or renamed in a directory changes the
   directory's mtime.
2. The changed blocks in the data area are *explained* by the changed inodes that own them in
   the younger snapshot (their block maps and xattr blocks are walked). A changed block no
   changed inode owns whose bytes are the same on both sides is no change at all (a block
   written back unchanged, e.g. by a restore). One whose bytes differ means a file changed
   without its record (a ctime set back through the API): then step 4 runs unpruned and
   checks each file's blocks, as a full walk would.
3. Each changed inode's directories are found upward: a directory's inode holds its parent
   (``Inode.parent``); a file's holds the directory that last got a name of it (a hint). The
   ancestors of all changed inodes on either side are the *relevant* directories.
4. Both trees are walked together from the root, path by path, descending only into
   directories that are relevant or whose identity differs at that path (a subtree that
   appears, disappears or is renamed is listed whole: every path in it changed). A directory
   whose record did not change has the same entries on both sides, so only one side is read.
   Each changed inode must be met under as many names as its link count on each side; if one
   is not (a stale or missing hint: a hard link elsewhere, a volume from before hints), the
   walk is done again without pruning.

The cost is the changed inode-table blocks, the block maps of changed files, the directories
on the way from the root to the changes, and the subtrees the result lists whole; nothing is
done for an unchanged file.
"""

from __future__ import annotations

import stat

import numpy as np

from .. import pagedbits
from ..extents import runs
from ..fs.format import (
    BLOCK_SIZE, INODE_SIZE, INODES_PER_BLOCK, ROOT_INO, Inode,
)

_DIR_TYPE = stat.S_IFDIR >> 12
_READ_RUN = 256  # blocks per read


def _used(layer, snap, page: int) -> np.ndarray:
    """The block bitmap page `page` of snapshot `snap` (None: the live volume)."""
    if snap is None:
        return pagedbits.unpack(layer.read_live(layer.bitmap_start + page, 1))
    with layer.lock:
        return layer.meta_page(snap, page).copy()


def changed_blocks(layer, older, younger) -> np.ndarray:
    """Sorted block numbers that may differ between `older` and `younger` (None: the live
    volume) and are in use in the younger one: SnapLayer.changed_pages (FIG. 39-40) with
    the layer's lock taken per page, not for the whole scan (writers may be copying on write
    meanwhile: the younger side of a live diff is a pinned internal snapshot, and the
    application goes on writing)."""
    store = layer.store
    with layer.lock:
        q = list(store.queue)
        span = q[q.index(older): q.index(younger) if younger is not None else len(q)]
        pages = set().union(*(store.bit_pages(e) for e in span)) if span else set()
    bits = pagedbits.PAGE_BITS
    acc_by_page = {}
    for page in sorted(pages):
        acc = np.zeros(bits, dtype=bool)
        with layer.lock:
            for e in span:
                got = store.page_bits(e, page)
                if got is not None:
                    acc |= got
        acc_by_page[page] = acc
    # blocks newly in use: only in pages whose bitmap block itself changed
    for p in range(-(-layer.nblocks // bits)):
        blk = layer.bitmap_start + p
        acc = acc_by_page.get(blk // bits)
        if acc is None or not acc[blk % bits]:
            continue
        with layer.lock:
            new = _used(layer, younger, p) & ~layer.meta_page(older, p)
        if p in acc_by_page:
            acc_by_page[p] |= new
        elif new.any():
            acc_by_page[p] = new
    parts = []
    for page in sorted(acc_by_page):
        idx = np.flatnonzero(acc_by_page[page] & _used(layer, younger, page))
        if len(idx):
            parts.append(idx.astype(np.int64) + page * bits)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _content_key(r: Inode) -> tuple:
    """What makes an inode 'modified' in the diff's output."""
    return (r.mode, r.uid, r.gid, r.nlink, r.size, r.mtime_ns, r.ctime_ns, tuple(r.map),
            r.xattr)


def _record_key(r: Inode) -> tuple:
    """Every field of a record but atime (an atime update changes nothing a diff shows)."""
    return (*_content_key(r), r.flags, r.generation, r.blocks, r.rdev, r.crtime_ns, r.parent,
            r.orphan_next)


def _differing(dev_a, dev_b, blocks: np.ndarray, unit: int):
    """Yield (first block, bytes on side a, bytes on side b, indexes of the `unit`-byte
    pieces that differ) for runs of sorted `blocks`, read at most _READ_RUN blocks at a time
    (memory stays bounded however many blocks changed); numpy compares, not a loop."""
    for _, start, count in runs(blocks):
        while count:
            m = min(count, _READ_RUN)
            a, b = dev_a.read(start, m), dev_b.read(start, m)
            va = np.frombuffer(a, dtype=np.uint8).reshape(-1, unit)
            vb = np.frombuffer(b, dtype=np.uint8).reshape(-1, unit)
            diff = np.flatnonzero((va != vb).any(axis=1))
            if len(diff):
                yield start, a, b, diff
            start += m
            count -= m


class _Side:
    """One side of the diff: its file system (read-only), and the records read from it."""

    def __init__(self, fs):
        self.fs = fs
        self.sb = fs.sb
        self.recs: dict[int, Inode | None] = {}

    def rec(self, ino: int) -> Inode | None:
        """The inode record of `ino`, None if free or out of range."""
        if ino in self.recs:
            return self.recs[ino]
        r = None
        if 1 <= ino < self.sb.ninodes:
            blk = self.sb.itable_start + ino // INODES_PER_BLOCK
            r = Inode.unpack_from(ino, self.fs.meta.read(blk), (ino % INODES_PER_BLOCK) * INODE_SIZE)
            if not r.mode:
                r = None
        self.recs[ino] = r
        return r

    def entries(self, ino: int) -> dict[bytes, tuple[int, int]]:
        """name -> (ino, type) of a directory ({} if `ino` is not a directory here)."""
        r = self.rec(ino)
        if r is None or not stat.S_ISDIR(r.mode):
            return {}
        return {name: (child, typ) for _, name, child, typ, _ in self.fs.dirs.all_entries(r)}

    def blocks(self, r: Inode) -> np.ndarray:
        """The blocks an inode's content lives in: data, indirect and xattr blocks."""
        out = [self.fs.xattrs.blocks(r).astype(np.int64)]
        for _, _, phys in self.fs.bmap.walk(r):
            out.append(np.atleast_1d(np.asarray(phys, dtype=np.int64)))
        return np.concatenate(out)

    def ancestors(self, start: int, into: set[int]) -> None:
        """Add directory `start` and its ancestors (by parent pointers) to `into`."""
        x = start
        while x and x not in into:
            r = self.rec(x)
            if r is None or not stat.S_ISDIR(r.mode):
                return
            into.add(x)
            if x == ROOT_INO:
                return
            x = r.parent


def _hits(sorted_blocks: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Indexes into `sorted_blocks` of the values that occur in `blocks`."""
    if not len(sorted_blocks) or not len(blocks):
        return np.zeros(0, dtype=np.int64)
    pos = np.searchsorted(sorted_blocks, blocks)
    inside = pos < len(sorted_blocks)
    pos, blocks = pos[inside], blocks[inside]
    return pos[sorted_blocks[pos] == blocks]


class _Diff:
    def __init__(self, old_fs, new_fs, changed, stop=None):
        self.old = _Side(old_fs)
        self.new = _Side(new_fs)
        self.stop = stop
        sb = new_fs.sb
        changed = np.unique(np.asarray(
            sorted(changed) if isinstance(changed, (set, frozenset)) else changed,
            dtype=np.int64))
        self.itable = changed[(changed >= sb.itable_start) & (changed < sb.data_start)]
        self.data = changed[changed >= sb.data_start]
        self.changed_inodes: set[int] = set()  # record differs (other than atime)
        self.modified: set[int] = set()  # ... in a field the output shows
        self.unexplained = np.zeros(0, dtype=np.int64)

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise DiffCancelled()

    # ------------------------------------------------------------ step 1: inode records

    def compare_records(self) -> None:
        sb = self.new.sb
        for first, old_buf, new_buf, slots in _differing(self.old.fs.dev, self.new.fs.dev,
                                                         self.itable, INODE_SIZE):
            self.check()
            base = (first - sb.itable_start) * INODES_PER_BLOCK
            for slot in slots.tolist():
                ino = base + slot
                if not 1 <= ino < sb.ninodes:
                    continue
                ro = Inode.unpack_from(ino, old_buf, slot * INODE_SIZE)
                rn = Inode.unpack_from(ino, new_buf, slot * INODE_SIZE)
                ro = ro if ro.mode else None
                rn = rn if rn.mode else None
                self.old.recs[ino] = ro
                self.new.recs[ino] = rn
                if ro is None and rn is None:
                    continue
                if ro is None or rn is None or _record_key(ro) != _record_key(rn):
                    self.changed_inodes.add(ino)
                if ro is None or rn is None or _content_key(ro) != _content_key(rn):
                    self.modified.add(ino)

    # ------------------------------------------------------------ step 2: data blocks

    def explain_data(self) -> None:
        """Leave in self.unexplained the changed data blocks no modified inode owns and whose
        bytes differ between the two sides."""
        if not len(self.data):
            return
        explained = np.zeros(len(self.data), dtype=bool)
        for ino in sorted(self.modified):
            self.check()
            r = self.new.rec(ino)
            if r is None:
                continue
            explained[_hits(self.data, self.new.blocks(r))] = True
            if explained.all():
                return
        rest = self.data[~explained]
        differ = [first + idx for first, _, _, idx in _differing(
            self.old.fs.dev, self.new.fs.dev, rest, BLOCK_SIZE)]
        self.unexplained = (np.concatenate(differ).astype(np.int64) if differ
                            else np.zeros(0, dtype=np.int64))

    # ------------------------------------------------------------ steps 3 and 4: paths

    def relevant(self) -> set[int]:
        rel: set[int] = set(self.changed_inodes)
        for side in (self.old, self.new):
            up: set[int] = set()
            for ino in self.changed_inodes:
                r = side.rec(ino)
                if r is not None:
                    side.ancestors(ino if stat.S_ISDIR(r.mode) else r.parent, up)
            rel |= up
        return rel

    def walk(self, prune: bool) -> tuple[list[dict], bool]:
        """The changed paths; and whether every changed inode was met under all its names."""
        rel = self.relevant() if prune else set()
        watched = self.changed_inodes
        found = ({}, {})  # (old, new): ino -> names met
        out: list[dict] = []
        content_cache: dict[int, bool] = {}

        def content_changed(ino: int) -> bool:
            hit = content_cache.get(ino)
            if hit is None:
                r = self.new.rec(ino)
                hit = r is not None and bool(len(_hits(self.unexplained, self.new.blocks(r))))
                content_cache[ino] = hit
            return hit

        def meet(side: int, entries) -> None:
            f = found[side]
            for child, _ in entries.values():
                if child in watched:
                    f[child] = f.get(child, 0) + 1

        stack: list[tuple[bytes, int | None, int | None]] = [(b"", ROOT_INO, ROOT_INO)]
        while stack:
            self.check()
            prefix, o, n = stack.pop()
            path = (prefix or b"/").decode(errors="surrogateescape")
            if o is not None and o == n:
                if o in self.modified or (len(self.unexplained) and content_changed(n)):
                    out.append({"path": path, "change": "modified"})
                ro, rn = self.old.rec(o), self.new.rec(n)
                if (prune and o not in watched and ro is not None
                        and stat.S_ISDIR(ro.mode)):  # the same entries on both sides
                    en = self.new.entries(n)
                    meet(0, en)
                    meet(1, en)
                    for name, (child, _) in en.items():
                        if child in rel:
                            stack.append((prefix + b"/" + name, child, child))
                    continue
            elif n is not None:
                out.append({"path": path, "change": "added"})
            else:
                out.append({"path": path, "change": "deleted"})
            eo = self.old.entries(o) if o is not None else {}
            en = self.new.entries(n) if n is not None else {}
            meet(0, eo)
            meet(1, en)
            for name in eo.keys() | en.keys():
                oc = eo[name][0] if name in eo else None
                nc = en[name][0] if name in en else None
                if oc is not None and self.old.rec(oc) is None:
                    oc = None  # an entry naming a free inode (a damaged tree) names nothing
                if nc is not None and self.new.rec(nc) is None:
                    nc = None
                if oc is None and nc is None:
                    continue
                if oc == nc and prune and oc not in rel:
                    continue  # the same unchanged subtree on both sides
                stack.append((prefix + b"/" + name, oc, nc))
        complete = True
        for ino in watched:
            for side, f in ((self.old, found[0]), (self.new, found[1])):
                r = side.rec(ino)
                if r is None or ino == ROOT_INO:
                    continue
                want = 1 if stat.S_ISDIR(r.mode) else r.nlink
                if f.get(ino, 0) < want:
                    complete = False
        return out, complete

    def run(self, limit: int) -> list[dict]:
        self.compare_records()
        self.explain_data()
        out, complete = self.walk(prune=not len(self.unexplained))
        if not complete:
            out, _ = self.walk(prune=False)
        out.sort(key=lambda r: r["path"])
        return out[:limit]


class DiffCancelled(Exception):
    """The diff was cancelled (its caller went away)."""


def changed_paths(old_fs, new_fs, changed, limit: int = 10000, *, stop=None) -> list[dict]:
    """[{path, change}] with change 'added', 'deleted' or 'modified', sorted by path: every
    path whose inode differs between the two trees ('added' where a path names another inode
    than before), whose record differs other than in atime, or whose content changed.

    `changed`: the blocks that may differ and are in use in `new_fs` (changed_blocks), as an
    array or a set. `stop`: a threading.Event that cancels the diff (DiffCancelled)."""
    if not len(changed):
        return []
    return _Diff(old_fs, new_fs, changed, stop).run(limit)
