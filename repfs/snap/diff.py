"""Which files and directories own the blocks that changed between two snapshots.

Goes beyond the reference's snapshot delta (FIG. 34-35): the block delta says how much
changed; this says where, by walking both trees and matching each inode's blocks (data,
indirect, xattr and its inode-table block) against the changed set.
"""

from __future__ import annotations

import stat

from ..fs.errors import FSError
from ..fs.format import ROOT_INO


def _walk(fs):
    """Yield (path, inode) for every name in the tree, depth first."""
    stack = [(b"", ROOT_INO)]
    yield "/", fs.iget(ROOT_INO)
    while stack:
        prefix, dino = stack.pop()
        d = fs.iget(dino)
        for _, name, ino, _ in list(fs.dirs.iter_from(d, None)):
            try:
                inode = fs.iget(ino)
            except FSError:
                continue
            path = prefix + b"/" + name
            yield path.decode(errors="surrogateescape"), inode
            if stat.S_ISDIR(inode.mode):
                stack.append((path, ino))


def _blocks(fs, inode) -> set[int]:
    """The blocks an inode's content lives in (its inode record is compared separately)."""
    out = set()
    for _, _, phys in fs.bmap.walk(inode):
        if isinstance(phys, int):
            out.add(phys)
        else:
            out.update(int(p) for p in phys)
    out.update(fs.xattrs.blocks(inode).tolist())
    return out


def _same_inode(a, b) -> bool:
    return (a.mode, a.uid, a.gid, a.nlink, a.size, a.mtime_ns, a.ctime_ns, a.map, a.xattr) == (
        b.mode, b.uid, b.gid, b.nlink, b.size, b.mtime_ns, b.ctime_ns, b.map, b.xattr)


def changed_paths(old_fs, new_fs, changed: set[int], limit: int = 10000) -> list[dict]:
    """[{path, change}] with change 'added', 'deleted' or 'modified', sorted by path."""
    if not changed:
        return []
    old = {p: i for p, i in _walk(old_fs)}
    out = []
    seen = set()
    for path, inode in _walk(new_fs):
        seen.add(path)
        before = old.get(path)
        if before is None or before.ino != inode.ino:
            out.append({"path": path, "change": "added"})
        elif not _same_inode(before, inode) or _blocks(new_fs, inode) & changed:
            out.append({"path": path, "change": "modified"})
        if len(out) >= limit:
            break
    for path in old:
        if path not in seen and len(out) < limit:
            out.append({"path": path, "change": "deleted"})
    out.sort(key=lambda r: r["path"])
    return out
