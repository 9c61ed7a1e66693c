"""t3: randomized model test of the FileSystem core.

Random operations go to the core and to an in-memory model (a tree of nodes: directories,
files with their bytes, symlinks, xattrs, hard links as shared nodes, files unlinked while
open). The model predicts success or the errno of every operation; the whole tree (names,
types, contents, sizes, link counts, xattrs, inode numbers) is compared to the model
periodically, the core commits now and then and is remounted (cleanly, or after a simulated
kill -9 right after a commit) and fsck'd.

A failure prints the seed; run one seed with REPFS_MODEL_SEED=<seed> [REPFS_MODEL_OPS=<n>].
"""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest

from repfs.fs.core import FileSystem
from repfs.fs.errors import FSError
from repfs.fs.format import ROOT_INO, XATTR_CAPACITY, xattrs_size
from repfs.fs.fsck import fsck
from repfs.volume import Volume

NAMES = [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"long-" + b"n" * 200, b"x.txt", b"y"]
XNAMES = [b"user.a", b"user.b", b"trusted.t", b"security.s", b"user.big"]
SEEDS = [11, 22, 33, 44]
OPS = int(os.environ.get("REPFS_MODEL_OPS", "2500"))
MAX_OFF = 600_000
FAR_OFFSETS = [4096 * 12 - 100, 4096 * 1036 - 50, 4096 * 1100]  # around the indirect levels


class Node:
    __slots__ = ("kind", "data", "target", "xattrs", "children", "ino", "parent")

    def __init__(self, kind: str, ino: int):
        self.kind = kind  # 'f' file, 'd' directory, 'l' symlink
        self.ino = ino
        self.data = bytearray()
        self.target = b""
        self.xattrs: dict[bytes, bytes] = {}
        self.children: dict[bytes, Node] = {}
        self.parent: Node | None = None  # directories only

    def __repr__(self):
        return f"<{self.kind} ino={self.ino}>"


class Expect(Exception):
    pass


class ModelRun:
    def __init__(self, make_fs, seed: int):
        self.make_fs = make_fs
        self.rng = random.Random(seed)
        self.fs: FileSystem = make_fs(size=64 << 20, inodes=512)
        self.root = Node("d", ROOT_INO)
        self.root.parent = self.root
        self.open: list[tuple[Node, int]] = []  # (node, ino): open handles, maybe unlinked
        self.log: list[str] = []

    # ------------------------------------------------------------------ model queries

    def dirs(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            d = stack.pop()
            out.append(d)
            stack.extend(c for c in d.children.values() if c.kind == "d")
        return out

    def entries(self) -> list[tuple[Node, bytes, Node]]:
        return [(d, n, c) for d in self.dirs() for n, c in d.children.items()]

    def nlinks(self) -> dict[int, int]:
        count: dict[int, int] = {}
        for d, _, c in self.entries():
            if c.kind != "d":
                count[id(c)] = count.get(id(c), 0) + 1
        return count

    def linked_nondirs(self) -> list[Node]:
        seen, out = set(), []
        for _, _, c in self.entries():
            if c.kind != "d" and id(c) not in seen:
                seen.add(id(c))
                out.append(c)
        return out

    def files(self) -> list[Node]:
        """Regular files reachable by name or through an open handle."""
        out = {id(n): n for n in self.linked_nondirs() if n.kind == "f"}
        for n, _ in self.open:
            out[id(n)] = n
        return list(out.values())

    @staticmethod
    def in_subtree(top: Node, d: Node) -> bool:
        """True if directory d is top or below it."""
        while True:
            if d is top:
                return True
            if d.parent is d:
                return False
            d = d.parent

    def live_inodes(self) -> int:
        ids = {id(self.root)}
        for _, _, c in self.entries():
            ids.add(id(c))
        for n, _ in self.open:
            ids.add(id(n))
        return len(ids)

    # ------------------------------------------------------------------ running one op

    def call(self, expect, fn, *args, **kw):
        """Run fn; `expect` is None (must succeed) or a set of acceptable errnos."""
        try:
            result = fn(*args, **kw)
        except FSError as e:
            if expect is None:
                raise AssertionError(f"{fn.__name__}{args} failed with "
                                     f"{errno.errorcode.get(e.errno)}; the model expected "
                                     f"success") from e
            if e.errno not in expect:
                raise AssertionError(f"{fn.__name__}{args}: {errno.errorcode.get(e.errno)}, "
                                     f"expected {[errno.errorcode[x] for x in expect]}") from e
            return Expect
        if expect is not None:
            raise AssertionError(f"{fn.__name__}{args} succeeded; the model expected "
                                 f"{[errno.errorcode[x] for x in expect]}")
        return result

    def pick_dir(self) -> Node:
        return self.rng.choice(self.dirs())

    def op_create(self):
        d, name = self.pick_dir(), self.rng.choice(NAMES)
        self.log.append(f"create {d.ino}/{name!r}")
        exp = {errno.EEXIST} if name in d.children else None
        inode = self.call(exp, self.fs.create, d.ino, name, 0o644)
        if inode is Expect:
            return
        node = Node("f", inode.ino)
        d.children[name] = node
        if self.rng.random() < 0.5:
            self.open.append((node, inode.ino))  # keep it open
        else:
            self.fs.release(inode.ino)
        self.fs.forget(inode.ino, 1)

    def op_mkdir(self):
        d, name = self.pick_dir(), self.rng.choice(NAMES)
        self.log.append(f"mkdir {d.ino}/{name!r}")
        exp = {errno.EEXIST} if name in d.children else None
        inode = self.call(exp, self.fs.mkdir, d.ino, name, 0o755)
        if inode is Expect:
            return
        node = Node("d", inode.ino)
        node.parent = d
        d.children[name] = node
        self.fs.forget(inode.ino, 1)

    def op_symlink(self):
        d, name = self.pick_dir(), self.rng.choice(NAMES)
        target = self.rng.randbytes(self.rng.choice([1, 10, 300, 4095])).replace(b"\0", b"0")
        self.log.append(f"symlink {d.ino}/{name!r}")
        exp = {errno.EEXIST} if name in d.children else None
        inode = self.call(exp, self.fs.symlink, d.ino, name, target)
        if inode is Expect:
            return
        node = Node("l", inode.ino)
        node.target = target
        d.children[name] = node
        self.fs.forget(inode.ino, 1)

    def op_write(self):
        files = self.files()
        if not files:
            return
        node = self.rng.choice(files)
        r = self.rng.random()
        if r < 0.05:
            off = self.rng.choice(FAR_OFFSETS) + self.rng.randrange(-5000, 5000)
        elif r < 0.5:
            off = len(node.data) + self.rng.randrange(0, 10000)  # at or past EOF
        else:
            off = self.rng.randrange(0, max(1, min(len(node.data) + 1, MAX_OFF)))
        n = self.rng.choice([1, 100, 4095, 4096, 4097, self.rng.randrange(1, 30000)])
        data = self.rng.randbytes(n)
        self.log.append(f"write {node.ino} off={off} n={n}")
        assert self.call(None, self.fs.write, node.ino, off, data) == n
        if off > len(node.data):
            node.data.extend(bytes(off - len(node.data)))
        node.data[off:off + n] = data

    def op_truncate(self):
        files = self.files()
        if not files:
            return
        node = self.rng.choice(files)
        size = self.rng.choice([0, self.rng.randrange(0, len(node.data) + 1),
                                len(node.data) + self.rng.randrange(0, 20000),
                                self.rng.choice(FAR_OFFSETS)])
        self.log.append(f"truncate {node.ino} {size}")
        self.call(None, self.fs.setattr, node.ino, size=size)
        if size < len(node.data):
            del node.data[size:]
        else:
            node.data.extend(bytes(size - len(node.data)))

    def op_read(self):
        files = self.files()
        if not files:
            return
        node = self.rng.choice(files)
        off = self.rng.randrange(0, len(node.data) + 100)
        n = self.rng.randrange(0, 70000)
        self.log.append(f"read {node.ino} off={off} n={n}")
        assert self.fs.read(node.ino, off, n) == bytes(node.data[off:off + n])

    def op_link(self):
        cands = self.linked_nondirs()
        if not cands:
            return
        node = self.rng.choice(cands)
        d, name = self.pick_dir(), self.rng.choice(NAMES)
        self.log.append(f"link {node.ino} -> {d.ino}/{name!r}")
        exp = {errno.EEXIST} if name in d.children else None
        if self.call(exp, self.fs.link, node.ino, d.ino, name) is Expect:
            return
        d.children[name] = node
        self.fs.forget(node.ino, 1)

    def op_link_dir(self):
        dirs = [d for d in self.dirs() if d is not self.root]
        if not dirs:
            return
        src = self.rng.choice(dirs)
        d, name = self.pick_dir(), self.rng.choice(NAMES)
        self.log.append(f"link dir {src.ino} -> {d.ino}/{name!r}")
        self.call({errno.EPERM}, self.fs.link, src.ino, d.ino, name)

    def op_unlink(self):
        ents = self.entries()
        if not ents:
            return
        d, name, child = self.rng.choice(ents)
        if self.rng.random() < 0.1:
            name = name + b"-missing"
            child = None
        self.log.append(f"unlink {d.ino}/{name!r}")
        if child is None:
            exp = {errno.ENOENT}
        elif child.kind == "d":
            exp = {errno.EISDIR}
        else:
            exp = None
            if child.kind == "f" and self.rng.random() < 0.3:
                # unlink while open: open it first, keep reading it afterwards
                self.fs.open(child.ino, os.O_RDWR)
                self.open.append((child, child.ino))
        if self.call(exp, self.fs.unlink, d.ino, name) is Expect:
            return
        del d.children[name]

    def op_rmdir(self):
        ents = self.entries()
        if not ents:
            return
        d, name, child = self.rng.choice(ents)
        self.log.append(f"rmdir {d.ino}/{name!r}")
        if child.kind != "d":
            exp = {errno.ENOTDIR}
        elif child.children:
            exp = {errno.ENOTEMPTY}
        else:
            exp = None
        if self.call(exp, self.fs.rmdir, d.ino, name) is Expect:
            return
        del d.children[name]

    def op_rename(self):
        ents = self.entries()
        if not ents:
            return
        pold, nold, src = self.rng.choice(ents)
        pnew, nnew = self.pick_dir(), self.rng.choice(NAMES)
        if self.rng.random() < 0.3:  # aim at an existing entry
            pnew, nnew, _ = self.rng.choice(ents)
        flags = self.rng.choices([0, 1, 2], weights=[6, 2, 2])[0]
        dst = pnew.children.get(nnew)
        self.log.append(f"rename {pold.ino}/{nold!r} -> {pnew.ino}/{nnew!r} flags={flags}")
        src_dir = src.kind == "d"
        if flags == 2:
            if dst is None:
                exp = {errno.ENOENT}
            elif dst is src:
                exp = "noop"
            elif src_dir and self.in_subtree(src, pnew):
                exp = {errno.EINVAL}
            elif dst.kind == "d" and self.in_subtree(dst, pold):
                exp = {errno.EINVAL}
            else:
                exp = None
            if exp == "noop":
                self.call(None, self.fs.rename, pold.ino, nold, pnew.ino, nnew, flags)
                return
            if self.call(exp, self.fs.rename, pold.ino, nold, pnew.ino, nnew, flags) is Expect:
                return
            pold.children[nold], pnew.children[nnew] = dst, src
            if src_dir:
                src.parent = pnew
            if dst.kind == "d":
                dst.parent = pold
            return
        if dst is not None and flags == 1:
            exp = {errno.EEXIST}
        elif src_dir and self.in_subtree(src, pnew):
            exp = {errno.EINVAL}
        elif dst is src:
            exp = "noop"
        elif dst is not None and dst.kind == "d" and self.in_subtree(dst, pold):
            exp = {errno.ENOTEMPTY, errno.EISDIR}  # the target is an ancestor of the source
        elif dst is not None and src_dir and dst.kind != "d":
            exp = {errno.ENOTDIR}
        elif dst is not None and not src_dir and dst.kind == "d":
            exp = {errno.EISDIR}
        elif dst is not None and dst.kind == "d" and dst.children:
            exp = {errno.ENOTEMPTY}
        else:
            exp = None
        if exp == "noop":
            self.call(None, self.fs.rename, pold.ino, nold, pnew.ino, nnew, flags)
            return
        if self.call(exp, self.fs.rename, pold.ino, nold, pnew.ino, nnew, flags) is Expect:
            return
        del pold.children[nold]
        pnew.children[nnew] = src
        if src_dir:
            src.parent = pnew

    def _any_node(self) -> Node | None:
        cands = [c for _, _, c in self.entries()] + [n for n, _ in self.open]
        return self.rng.choice(cands) if cands else None

    def op_setxattr(self):
        node = self._any_node()
        if node is None:
            return
        name = self.rng.choice(XNAMES)
        size = 3000 if name == b"user.big" and self.rng.random() < 0.5 else \
            self.rng.randrange(0, 300)
        value = self.rng.randbytes(size)
        flags = self.rng.choices([0, 1, 2], weights=[6, 2, 2])[0]
        self.log.append(f"setxattr {node.ino} {name!r} {size} flags={flags}")
        new = dict(node.xattrs)
        new[name] = value
        if flags == 1 and name in node.xattrs:
            exp = {errno.EEXIST}
        elif flags == 2 and name not in node.xattrs:
            exp = {errno.ENODATA}
        elif xattrs_size(new) > XATTR_CAPACITY:
            exp = {errno.ENOSPC}
        else:
            exp = None
        if self.call(exp, self.fs.setxattr, node.ino, name, value, flags) is Expect:
            return
        node.xattrs = new

    def op_removexattr(self):
        node = self._any_node()
        if node is None:
            return
        name = self.rng.choice(XNAMES)
        self.log.append(f"removexattr {node.ino} {name!r}")
        exp = None if name in node.xattrs else {errno.ENODATA}
        if self.call(exp, self.fs.removexattr, node.ino, name) is Expect:
            return
        del node.xattrs[name]

    def op_close(self):
        if not self.open:
            return
        node, ino = self.open.pop(self.rng.randrange(len(self.open)))
        self.log.append(f"release {ino}")
        self.fs.release(ino)
        still_open = any(n is node for n, _ in self.open)
        named = any(c is node for _, _, c in self.entries())
        if not still_open and not named:  # the last user is gone: the inode is freed
            with pytest.raises(FSError) as ei:
                self.fs.getattr(ino)
            assert ei.value.errno == errno.ENOENT

    # ------------------------------------------------------------------ whole-tree checks

    def compare(self) -> None:
        fs = self.fs
        nl = self.nlinks()
        seen_ino: dict[int, int] = {}
        for d in self.dirs():
            ents = list(fs.readdir(d.ino, 0))
            assert [e[0] for e in ents[:2]] == [b".", b".."]
            assert ents[0][1].ino == d.ino and ents[1][1].ino == d.parent.ino
            got = {n: i.ino for n, i, _ in ents[2:]}
            assert len(got) == len(ents) - 2, "a name is listed twice"
            assert got == {n: c.ino for n, c in d.children.items()}, f"dir {d.ino}"
            di = fs.getattr(d.ino)
            assert stat.S_ISDIR(di.mode)
            nsub = sum(1 for c in d.children.values() if c.kind == "d")
            assert di.nlink == 2 + nsub, f"dir {d.ino} nlink"
            assert {k: fs.getxattr(d.ino, k) for k in fs.listxattr(d.ino)} == d.xattrs
            for name, c in d.children.items():
                # one model node is one inode
                assert seen_ino.setdefault(id(c), c.ino) == c.ino
                if c.kind == "d":
                    continue
                a = fs.getattr(c.ino)
                assert a.nlink == nl[id(c)], f"{name!r} ino {c.ino} nlink"
                assert {k: fs.getxattr(c.ino, k) for k in fs.listxattr(c.ino)} == c.xattrs
                if c.kind == "f":
                    assert stat.S_ISREG(a.mode)
                    assert a.size == len(c.data), f"{name!r} ino {c.ino} size"
                else:
                    assert stat.S_ISLNK(a.mode) and fs.readlink(c.ino) == c.target
        for c in self.files():
            got = fs.read(c.ino, 0, len(c.data) + 10)
            if got != bytes(c.data):
                diff = next((i for i in range(min(len(got), len(c.data)))
                             if got[i] != c.data[i]), min(len(got), len(c.data)))
                raise AssertionError(f"ino {c.ino}: content differs at byte {diff} "
                                     f"(size {len(got)} vs {len(c.data)})")
        for n, ino in self.open:
            assert fs.getattr(ino).nlink == nl.get(id(n), 0)
        st = fs.statfs()
        assert st["f_files"] - st["f_ffree"] == self.live_inodes(), "inode count"

    def remount(self, crash: bool) -> None:
        """Unmount (or kill -9 right after a commit) and mount again; fsck in between."""
        fs = self.fs
        fs.commit()
        idx = next(i for i, (f, _, _) in enumerate(self.make_fs.made) if f is fs)
        _, img, jnl = self.make_fs.made[idx]
        if crash:  # no checkpoint, no close: the redo log still holds the last commit
            fs.journal.close()
        else:
            fs.close()
        fs.dev.close()
        # a read-only mount replays the redo log but does not reap orphans: fsck sees them
        ro = FileSystem(Volume(img), jnl, readonly=True)
        report = fsck(ro)
        assert report.clean, "fsck: " + "; ".join(p.message for p in report.problems)
        ro.journal.close()
        ro.dev.close()
        new = FileSystem(Volume(img), jnl)
        self.make_fs.made[idx] = (new, img, jnl)
        self.fs = new
        # open handles (and the kernel's references) died with the mount: orphans are reaped
        self.open.clear()
        assert new.sb.orphan_head == 0

    def run(self, nops: int) -> None:
        ops = [(self.op_create, 10), (self.op_mkdir, 4), (self.op_symlink, 2),
               (self.op_write, 18), (self.op_truncate, 5), (self.op_read, 6),
               (self.op_link, 5), (self.op_link_dir, 1), (self.op_unlink, 8),
               (self.op_rmdir, 4), (self.op_rename, 12), (self.op_setxattr, 5),
               (self.op_removexattr, 3), (self.op_close, 6)]
        fns, weights = zip(*ops)
        for step in range(nops):
            fn = self.rng.choices(fns, weights)[0]
            fn()
            if step % 100 == 99:
                self.compare()
            if step % 97 == 0:
                self.fs.commit()
            if step % 600 == 599:
                self.remount(crash=self.rng.random() < 0.5)
                self.compare()
        self.compare()
        for node, ino in self.open:
            self.fs.release(ino)
        self.open.clear()
        self.compare()


def _seeds():
    if os.environ.get("REPFS_MODEL_SEED"):
        return [int(os.environ["REPFS_MODEL_SEED"])]
    return SEEDS


@pytest.mark.parametrize("seed", _seeds())
def test_model(make_fs, monkeypatch, seed):
    if seed % 2 == 0:
        # tiny caches: inodes are evicted and metadata blocks re-read all the time
        monkeypatch.setattr(FileSystem, "INODE_CACHE", 8)
        monkeypatch.setitem(FileSystem.__init__.__kwdefaults__, "cache_blocks", 16)
    run = ModelRun(make_fs, seed)
    try:
        run.run(OPS)
    except BaseException:
        print(f"\nMODEL TEST FAILED: seed={seed} (rerun: REPFS_MODEL_SEED={seed}); "
              f"last operations:\n  " + "\n  ".join(run.log[-15:]))
        raise
    # a final clean remount keeps everything
    run.remount(crash=False)
    run.compare()
