"""powerfs: a test file system that can lose power, and can fail on command.

A small pyfuse3 file system, run as its own process, mounted over a *backing directory*. It
keeps apart what a program has made durable from what it has only written, so that a test can
cut the power: everything not yet durable is discarded (all of it, or a random part of it, as a
real power cut may), and the next mount sees only what survived. A ``kill -9`` of a daemon
leaves the kernel's page cache intact and so cannot notice a missing or misordered sync; a cut
on powerfs can. It also injects errors (EIO, ENOSPC, ...) into chosen operations on chosen
paths, for fault-containment tests.

Durability model (what survives a cut)
---------------------------------------
* File data. Each regular file's content lives in a backing file (BACKING/files/INO) that
  always holds the *visible* content; every write(), truncate (setattr size, O_TRUNC) since
  the file's last sync is also kept in memory as an operation log with an undo record (the
  before-image). ``fsync``/``fdatasync`` of the file, a write through an O_SYNC/O_DSYNC handle,
  or the control command ``sync`` make the whole log durable (it is dropped). At a cut the log
  is undone and then, per file, a chosen part of it replayed: nothing (``keep="none"``), or in
  ``keep="random"`` one of: nothing, a random prefix, a random subset in order, or all of it.
  Writes are split at 4 KiB file offsets for this, so a write may be torn at page boundaries
  (a page is never torn inside). Writes that extend a file may leave holes if earlier pages
  are dropped and later ones kept, as on a real file system.
* Directory entries (create, mkdir, mknod, symlink, link, unlink, rmdir, rename) are one
  ordered log, as a journaling file system keeps them. An ``fsync`` of a directory makes
  every entry change up to the last one that touched that directory durable (a prefix of the
  log; a rename counts for both parents, and is atomic: after a cut the name is either old or
  new). A file that was created and fsync'd, but whose directory was not fsync'd after the
  create, may vanish with its data; a rename that was not followed by an fsync of its
  directory may be undone. At a cut, ``keep="none"`` keeps only the durable prefix,
  ``keep="random"`` a random longer prefix.
* Inode metadata (mode, owner, times) is durable at once (no test here depends on it).
* ``sync(2)``/``syncfs(2)`` on the mount do not reach a FUSE file system (the kernel sends
  nothing), so they make nothing durable here; programs must fsync. mmap'd writes reach
  powerfs as writes (the mount does not use direct I/O) and are durable after fsync/msync
  with MS_SYNC (which the kernel turns into an fsync).
* Unreachable inodes (unlinked, or whose creation was lost) are removed at the cut.

A cut *freezes* the file system first: from that moment every request fails with EIO, so
nothing the still-running programs do afterwards can reach the durable state, just as nothing
reaches a disk after the power is gone. The caller then kills its programs, and stops powerfs
(which unmounts it); ``start()`` mounts the surviving state again. The durable state is kept
in BACKING/powerfs.meta (the namespace and inode table; written at a cut and at a clean stop)
and BACKING/files/.

Fault injection
---------------
A rule: ``add_fault(path, op, errno="EIO", skip=0, count=None)``. ``path`` is an fnmatch
glob relative to the mount root (``"site/volume.img"``, ``"site/save/*"``, ``"*"``, or
several joined by ``|``); ``op`` is one of OPS below or ``"*"`` (or several joined by
``|``: ``"write|fsync"``); the first ``skip`` matching calls pass, the next ``count`` (None:
all) fail with ``errno`` (a name like ``"ENOSPC"`` or a number). For ops on names (create,
mkdir, unlink, rmdir, rename, link, symlink, mknod, lookup) the path is the name's path; a
rename matches on its old or new path. ``fsync`` covers fsync and fdatasync of files,
``fsyncdir`` fsync of directories. A failed write or fsync changes nothing (a failed fsync
leaves the data non-durable). ``stats()["faults"]`` counts each rule's hits and
``stats()["seen"]`` the calls it matched (``count=0``: a rule that only counts).
``delay=SECONDS`` makes a rule fail nothing: each call it fires on returns that much later
(a slow disk), which widens a window a test wants to hit.
``errno="corrupt"`` (op ``read`` only) fails nothing: the bytes go wrong on their way up, as
from a bad cable or controller. A matching read returns its data with one bit flipped in the
middle; the backing file stays intact, and the next open of that file drops the kernel's
cached pages of it (no keep_cache), so a read after a new open gets the right bytes again.

API for tests (the ``PowerFS`` class at the bottom)
----------------------------------------------------
    pf = PowerFS(backing_dir, mountpoint)   # log and control socket next to the backing dir
    pf.start()                              # mounts; returns when ready
    pf.sync()                               # everything so far becomes durable
    pf.freeze(keep="none" | "random" | "all", seed=N) -> dict   # the power cut: decide what
                                            #   survives, fail every later request
    pf.stop()                               # unmount (after freeze: the cut state remains;
                                            #   without freeze: a clean stop, all durable)
    pf.cut(keep=..., seed=...)              # freeze + stop, for programs already gone
    pf.add_fault(path, op, errno="EIO", skip=0, count=None, delay=0) -> rule id
    pf.arm_cut(path, op, skip=0, keep="none", seed=None) -> rule id   # a power cut right
                                            #   before the (skip+1)-th matching call
    pf.wait_frozen(timeout) -> the cut's result, or None if it did not happen
    pf.clear_faults()
    pf.stats() -> {"pending_files", "pending_writes", "pending_bytes", "pending_entries",
                   "syncs", "ops": {op: calls}, "faults": {id: hits}, "seen": {id: calls
                   matched}, "frozen",
                   "cut": what an armed cut dropped and where it hit, or None}
Control protocol: one JSON object per line over the Unix socket pf.sock, one JSON reply line.
Run alone: ``python tests/powerfs.py BACKING MOUNTPOINT --control SOCKET``.
"""

from __future__ import annotations

import errno as errno_mod
import fnmatch
import json
import os
import pickle
import random
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

OPS = ("lookup", "getattr", "setattr", "truncate", "open", "create", "read", "write", "fsync",
       "fsyncdir", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename",
       "readdir", "statfs")
PAGE = 4096
ROOT = 1


class _Node:
    __slots__ = ("ino", "kind", "mode", "uid", "gid", "rdev", "target", "ops", "parent",
                 "name", "mtime_ns")

    def __init__(self, ino, kind, mode, uid=0, gid=0, rdev=0, target=b""):
        self.ino, self.kind, self.mode = ino, kind, mode
        self.uid, self.gid, self.rdev, self.target = uid, gid, rdev, target
        self.ops: list = []  # files: unsynced ops, (kind, args, undo)
        self.parent, self.name = 0, b""
        self.mtime_ns = time.time_ns()


class _Rule:
    delay = 0.0  # seconds a matching call is held back (a slow disk); it then goes on

    def __init__(self, rid, path, op, err, skip, count, cut=None):
        self.id, self.paths, self.err, self.cut = rid, path.split("|"), err, cut
        self.ops = set(op.split("|"))
        self.skip, self.count, self.seen, self.hits = skip, count, 0, 0


CORRUPT = -1  # a rule's "errno" that flips a bit in what a read returns


def _errno(v) -> int:
    if isinstance(v, int):
        return v
    if v == "corrupt":
        return CORRUPT
    n = getattr(errno_mod, str(v), None)
    if not isinstance(n, int):
        raise ValueError(f"unknown errno {v!r}")
    return n


class State:
    """The file system's state, without FUSE (so its semantics can be unit-tested)."""

    def __init__(self, backing: Path):
        self.backing = Path(backing)
        self.files = self.backing / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[int, _Node] = {}
        self.dirs: dict[int, dict[bytes, int]] = {}
        self.log: list[list] = []  # unsynced entry changes: [(dir, name, old ino or None)]
        self.next_ino = ROOT + 1
        self.fds: dict[int, int] = {}
        self.frozen = False
        self.syncs = 0
        self.calls: dict[str, int] = {}
        self.rules: list[_Rule] = []
        self.next_rule = 1
        self.cut_result: dict | None = None
        self.delay = 0.0  # what the rules ask the current call to wait
        self._load()

    # ---------------------------------------------------------------- persistence

    def _load(self) -> None:
        meta = self.backing / "powerfs.meta"
        if meta.exists():
            m = pickle.loads(meta.read_bytes())
            self.next_ino = m["next"]
            for ino, (kind, mode, uid, gid, rdev, target) in m["nodes"].items():
                self.nodes[ino] = _Node(ino, kind, mode, uid, gid, rdev, target)
            self.dirs = m["dirs"]
        else:
            self.nodes[ROOT] = _Node(ROOT, "d", stat.S_IFDIR | 0o755)
            self.dirs[ROOT] = {}
        for d, ents in self.dirs.items():
            for name, ino in ents.items():
                self.nodes[ino].parent, self.nodes[ino].name = d, name
        self._collect()

    def save(self) -> None:
        m = {"next": self.next_ino, "dirs": self.dirs,
             "nodes": {i: (n.kind, n.mode, n.uid, n.gid, n.rdev, n.target)
                       for i, n in self.nodes.items()}}
        tmp = self.backing / "powerfs.meta.tmp"
        tmp.write_bytes(pickle.dumps(m))
        os.replace(tmp, self.backing / "powerfs.meta")

    def _collect(self) -> None:
        """Drop inodes no name reaches (unlinked, or whose creation did not survive)."""
        seen, todo = {ROOT}, [ROOT]
        while todo:
            for ino in self.dirs.get(todo.pop(), {}).values():
                if ino not in seen:
                    seen.add(ino)
                    if self.nodes[ino].kind == "d":
                        todo.append(ino)
        for ino in [i for i in self.nodes if i not in seen]:
            del self.nodes[ino]
            self.dirs.pop(ino, None)
        for p in self.files.iterdir():
            if not p.name.isdigit() or int(p.name) not in seen:
                p.unlink()
        for ino, n in self.nodes.items():
            if n.kind == "f" and not (self.files / str(ino)).exists():
                (self.files / str(ino)).touch()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    # ---------------------------------------------------------------- helpers

    def fd(self, ino: int) -> int:
        fd = self.fds.get(ino)
        if fd is None:
            fd = self.fds[ino] = os.open(self.files / str(ino), os.O_RDWR | os.O_CLOEXEC)
        return fd

    def path(self, ino: int) -> str:
        parts = []
        while ino != ROOT and ino in self.nodes and self.nodes[ino].parent:
            n = self.nodes[ino]
            parts.append(os.fsdecode(n.name))
            ino = n.parent
        return "/".join(reversed(parts))

    def child_path(self, parent: int, name: bytes) -> str:
        p = self.path(parent)
        return f"{p}/{os.fsdecode(name)}" if p else os.fsdecode(name)

    def check(self, op: str, *paths: str) -> bool:
        """Count the call; raise OSError if frozen or a fault rule fires. True: a "corrupt"
        rule fired (the caller damages what it returns)."""
        if self.frozen:
            raise OSError(errno_mod.EIO, "powerfs: the power is off")
        self.calls[op] = self.calls.get(op, 0) + 1
        for r in self.rules:
            if ((op in r.ops or "*" in r.ops)
                    and any(fnmatch.fnmatchcase(p, g) for p in paths for g in r.paths)):
                r.seen += 1
                if r.seen > r.skip and (r.count is None or r.seen <= r.skip + r.count):
                    r.hits += 1
                    if r.delay:
                        self.delay += r.delay
                        continue
                    if r.cut is not None:  # the power goes off before this call
                        self.cut_result = self.freeze(*r.cut)
                        self.cut_result.update(rule=r.id, op=op, path=paths[0])
                        raise OSError(errno_mod.EIO, "powerfs: the power is off")
                    if r.err == CORRUPT:
                        return True
                    raise OSError(r.err, f"powerfs: injected {errno_mod.errorcode.get(r.err)}")
        return False

    def lookup(self, parent: int, name: bytes) -> int:
        d = self.dirs.get(parent)
        if d is None:
            raise OSError(errno_mod.ENOTDIR, "not a directory")
        ino = d.get(name)
        if ino is None:
            raise OSError(errno_mod.ENOENT, "no such entry")
        return ino

    def _change(self, changes: list) -> None:
        """Apply entry changes [(dir, name, new ino or None)] as one logged operation."""
        undo = []
        for d, name, new in changes:
            old = self.dirs[d].get(name)
            undo.append((d, name, old))
            if new is None:
                del self.dirs[d][name]
            else:
                self.dirs[d][name] = new
                self.nodes[new].parent, self.nodes[new].name = d, name
        self.log.append(undo)

    # ---------------------------------------------------------------- namespace

    def make(self, parent: int, name: bytes, kind: str, mode: int, uid=0, gid=0, rdev=0,
             target=b"") -> int:
        if name in self.dirs[parent]:
            raise OSError(errno_mod.EEXIST, "exists")
        ino = self.next_ino
        self.next_ino += 1
        self.nodes[ino] = _Node(ino, kind, mode, uid, gid, rdev, target)
        if kind == "d":
            self.dirs[ino] = {}
        elif kind == "f":
            fd = os.open(self.files / str(ino), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o600)
            self.fds[ino] = fd
        self._change([(parent, name, ino)])
        return ino

    def link(self, ino: int, parent: int, name: bytes) -> None:
        if name in self.dirs[parent]:
            raise OSError(errno_mod.EEXIST, "exists")
        self._change([(parent, name, ino)])

    def unlink(self, parent: int, name: bytes, rmdir: bool = False) -> None:
        ino = self.lookup(parent, name)
        if rmdir:
            if self.nodes[ino].kind != "d":
                raise OSError(errno_mod.ENOTDIR, "not a directory")
            if self.dirs[ino]:
                raise OSError(errno_mod.ENOTEMPTY, "not empty")
        elif self.nodes[ino].kind == "d":
            raise OSError(errno_mod.EISDIR, "is a directory")
        self._change([(parent, name, None)])

    def rename(self, p0: int, n0: bytes, p1: int, n1: bytes, flags: int = 0) -> None:
        ino = self.lookup(p0, n0)
        other = self.dirs[p1].get(n1)
        if other is not None:
            if flags & 1:  # RENAME_NOREPLACE
                raise OSError(errno_mod.EEXIST, "exists")
            if self.nodes[other].kind == "d":
                if self.nodes[ino].kind != "d":
                    raise OSError(errno_mod.EISDIR, "is a directory")
                if self.dirs[other]:
                    raise OSError(errno_mod.ENOTEMPTY, "not empty")
            elif self.nodes[ino].kind == "d":
                raise OSError(errno_mod.ENOTDIR, "not a directory")
        if flags & 2:  # RENAME_EXCHANGE
            if other is None:
                raise OSError(errno_mod.ENOENT, "no such entry")
            self._change([(p0, n0, other), (p1, n1, ino)])
        elif (p0, n0) != (p1, n1) and other != ino:
            self._change([(p1, n1, ino), (p0, n0, None)])

    def nlink(self, ino: int) -> int:
        if self.nodes[ino].kind == "d":
            return 2
        return sum(1 for d in self.dirs.values() for i in d.values() if i == ino) or 0

    def fsyncdir(self, ino: int) -> None:
        """Every entry change up to the last that touched this directory is now durable."""
        last = -1
        for k, undo in enumerate(self.log):
            if any(d == ino for d, _, _ in undo):
                last = k
        del self.log[:last + 1]
        self.syncs += 1

    # ---------------------------------------------------------------- data

    def size(self, ino: int) -> int:
        return os.fstat(self.fd(ino)).st_size

    def read(self, ino: int, off: int, size: int) -> bytes:
        return os.pread(self.fd(ino), size, off)

    def write(self, ino: int, off: int, data: bytes) -> int:
        fd = self.fd(ino)
        old = os.fstat(fd).st_size
        before = os.pread(fd, max(0, min(len(data), old - off)), off) if off < old else b""
        n = os.pwrite(fd, data, off)
        self.nodes[ino].ops.append(("w", off, bytes(data[:n]), before, old))
        self.nodes[ino].mtime_ns = time.time_ns()
        return n

    def truncate(self, ino: int, size: int) -> None:
        fd = self.fd(ino)
        old = os.fstat(fd).st_size
        tail = os.pread(fd, old - size, size) if size < old else b""
        os.ftruncate(fd, size)
        self.nodes[ino].ops.append(("t", size, None, tail, old))
        self.nodes[ino].mtime_ns = time.time_ns()

    def fsync(self, ino: int) -> None:
        if ino in self.nodes:
            self.nodes[ino].ops.clear()
        self.syncs += 1

    def sync_all(self) -> None:
        for n in self.nodes.values():
            n.ops.clear()
        self.log.clear()
        self.syncs += 1

    # ---------------------------------------------------------------- the cut

    def freeze(self, keep: str = "none", seed: int | None = None) -> dict:
        """The power goes off: decide what survives, make that the durable state on disk,
        and fail every later request."""
        if keep not in ("none", "random", "all"):
            raise ValueError(f"keep must be none, random or all, not {keep!r}")
        rng = random.Random(seed)
        self.frozen = True
        out = {"files": 0, "writes": 0, "writes_kept": 0, "entries": len(self.log),
               "entries_kept": 0}
        for ino, n in self.nodes.items():
            if n.kind != "f" or not n.ops:
                continue
            out["files"] += 1
            pieces = []
            for kind, a, data, _, _ in n.ops:
                if kind == "t":
                    pieces.append(("t", a, None))
                    continue
                off = 0
                while off < len(data):
                    end = min(len(data), (a + off) // PAGE * PAGE + PAGE - a)
                    pieces.append(("w", a + off, data[off:end]))
                    off = end
            out["writes"] += len(pieces)
            how = keep if keep != "random" else rng.choice(
                ("none", "prefix", "subset", "all"))
            if how == "none":
                kept = []
            elif how == "all":
                kept = pieces
            elif how == "prefix":
                kept = pieces[:rng.randint(0, len(pieces))]
            else:
                kept = [p for p in pieces if rng.random() < 0.5]
            out["writes_kept"] += len(kept)
            if len(kept) == len(pieces):
                n.ops.clear()
                continue
            fd = self.fd(ino)
            for kind, a, data, before, old in reversed(n.ops):  # back to the durable state
                if kind == "w":
                    if before:
                        os.pwrite(fd, before, a)
                    if os.fstat(fd).st_size > old:
                        os.ftruncate(fd, old)
                else:
                    os.ftruncate(fd, old)
                    if before:
                        os.pwrite(fd, before, a)
            for kind, a, data in kept:
                if kind == "w":
                    os.pwrite(fd, data, a)
                else:
                    os.ftruncate(fd, a)
            n.ops.clear()
        k = len(self.log) if keep == "all" else (
            rng.randint(0, len(self.log)) if keep == "random" else 0)
        out["entries_kept"] = k
        for undo in reversed(self.log[k:]):
            for d, name, old in reversed(undo):
                if old is None:
                    self.dirs[d].pop(name, None)
                else:
                    self.dirs[d][name] = old
        self.log.clear()
        self.close()
        self._collect()
        for d, ents in self.dirs.items():
            for name, ino in ents.items():
                self.nodes[ino].parent, self.nodes[ino].name = d, name
        self.save()
        self.cut_result = out
        return out

    def stats(self) -> dict:
        files = [n for n in self.nodes.values() if n.ops]
        return {"pending_files": len(files),
                "pending_writes": sum(len(n.ops) for n in files),
                "pending_bytes": sum(len(op[2] or b"") for n in files for op in n.ops),
                "pending_entries": len(self.log), "syncs": self.syncs,
                "ops": dict(self.calls), "frozen": self.frozen, "cut": self.cut_result,
                "faults": {r.id: r.hits for r in self.rules},
                "seen": {r.id: r.seen for r in self.rules}}

    def add_fault(self, path: str, op: str, err="EIO", skip: int = 0,
                  count: int | None = None, cut: tuple | None = None,
                  delay: float = 0.0) -> int:
        for o in op.split("|"):
            if o != "*" and o not in OPS:
                raise ValueError(f"unknown op {o!r}; one of {', '.join(OPS)} or *")
        if cut is not None and cut[0] not in ("none", "random", "all"):
            raise ValueError(f"keep must be none, random or all, not {cut[0]!r}")
        if _errno(err) == CORRUPT and op != "read":
            raise ValueError("errno='corrupt' applies to op 'read' alone")
        r = _Rule(self.next_rule, path, op, _errno(err), int(skip),
                  None if count is None else int(count), cut)
        r.delay = float(delay)
        self.next_rule += 1
        self.rules.append(r)
        return r.id


# -------------------------------------------------------------------- the FUSE adapter

def _serve(backing: Path, mountpoint: Path, control: Path) -> None:
    import pyfuse3
    import trio

    st = State(backing)

    def fuse_errors(fn):
        async def wrapper(self, *a, **kw):
            try:
                return fn(self, *a, **kw)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno or errno_mod.EIO) from None
            except KeyError:
                raise pyfuse3.FUSEError(errno_mod.ENOENT) from None
            finally:
                if st.delay:  # a slow disk: this call returns late, others go on
                    d, st.delay = st.delay, 0.0
                    await trio.sleep(d)
        wrapper.__name__ = fn.__name__
        return wrapper

    class Ops(pyfuse3.Operations):
        supports_dot_lookup = False
        enable_writeback_cache = False

        def __init__(self):
            super().__init__()
            self.handles: dict[int, tuple[int, int]] = {}
            self.next_fh = 1
            self.tainted: set[int] = set()  # files whose cached pages hold corrupted reads

        def _attr(self, ino):
            n = st.nodes[ino]
            a = pyfuse3.EntryAttributes()
            a.st_ino, a.st_mode, a.st_uid, a.st_gid, a.st_rdev = (
                ino, n.mode, n.uid, n.gid, n.rdev)
            a.st_nlink = st.nlink(ino)
            if n.kind == "f":
                s = os.fstat(st.fd(ino))
                a.st_size, a.st_blocks = s.st_size, s.st_blocks
            elif n.kind == "l":
                a.st_size = len(n.target)
            else:
                a.st_size = 4096
            a.st_blksize = PAGE
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = n.mtime_ns
            a.entry_timeout = a.attr_timeout = 1.0
            return a

        def _fh(self, ino, flags):
            fh = self.next_fh
            self.next_fh += 1
            self.handles[fh] = (ino, flags)
            return fh

        @fuse_errors
        def lookup(self, parent, name, ctx=None):
            st.check("lookup", st.child_path(parent, name))
            if name == b".":
                return self._attr(parent)
            if name == b"..":
                return self._attr(st.nodes[parent].parent or ROOT)
            return self._attr(st.lookup(parent, name))

        @fuse_errors
        def getattr(self, inode, ctx=None):
            st.check("getattr", st.path(inode))
            return self._attr(inode)

        @fuse_errors
        def setattr(self, inode, attr, fields, fh, ctx):
            st.check("setattr", st.path(inode))
            n = st.nodes[inode]
            if fields.update_size:
                st.check("truncate", st.path(inode))
                st.truncate(inode, attr.st_size)
            if fields.update_mode:
                n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(attr.st_mode)
            if fields.update_uid:
                n.uid = attr.st_uid
            if fields.update_gid:
                n.gid = attr.st_gid
            if fields.update_mtime:
                n.mtime_ns = attr.st_mtime_ns
            return self._attr(inode)

        @fuse_errors
        def readlink(self, inode, ctx):
            return st.nodes[inode].target

        @fuse_errors
        def open(self, inode, flags, ctx):
            st.check("open", st.path(inode))
            if flags & os.O_TRUNC:
                st.check("truncate", st.path(inode))
                st.truncate(inode, 0)
            keep = inode not in self.tainted
            self.tainted.discard(inode)
            return pyfuse3.FileInfo(fh=self._fh(inode, flags), keep_cache=keep)

        @fuse_errors
        def create(self, parent, name, mode, flags, ctx):
            st.check("create", st.child_path(parent, name))
            ino = st.make(parent, name, "f", stat.S_IFREG | stat.S_IMODE(mode), ctx.uid,
                          ctx.gid)
            return (pyfuse3.FileInfo(fh=self._fh(ino, flags), keep_cache=True),
                    self._attr(ino))

        @fuse_errors
        def read(self, fh, off, size):
            ino, _ = self.handles[fh]
            corrupt = st.check("read", st.path(ino))
            data = st.read(ino, off, size)
            if corrupt and data:
                bad = bytearray(data)
                bad[len(bad) // 2] ^= 0x10
                data = bytes(bad)
                self.tainted.add(ino)  # the kernel caches the damage: dropped at the next open
            return data

        @fuse_errors
        def write(self, fh, off, buf):
            ino, flags = self.handles[fh]
            st.check("write", st.path(ino))
            n = st.write(ino, off, buf)
            if flags & (os.O_SYNC | os.O_DSYNC):
                st.fsync(ino)
            return n

        @fuse_errors
        def fsync(self, fh, datasync):
            ino, _ = self.handles[fh]
            st.check("fsync", st.path(ino))
            st.fsync(ino)

        @fuse_errors
        def flush(self, fh):
            if st.frozen:
                raise OSError(errno_mod.EIO, "frozen")

        @fuse_errors
        def release(self, fh):
            self.handles.pop(fh, None)

        @fuse_errors
        def opendir(self, inode, ctx):
            st.check("readdir", st.path(inode))
            return self._fh(inode, 0)

        @fuse_errors
        def readdir(self, fh, start_id, token):
            ino, _ = self.handles[fh]
            st.check("readdir", st.path(ino))
            for i, (name, child) in enumerate(sorted(st.dirs[ino].items())):
                if i < start_id:
                    continue
                if not pyfuse3.readdir_reply(token, name, self._attr(child), i + 1):
                    break

        @fuse_errors
        def releasedir(self, fh):
            self.handles.pop(fh, None)

        @fuse_errors
        def fsyncdir(self, fh, datasync):
            ino, _ = self.handles[fh]
            st.check("fsyncdir", st.path(ino))
            st.fsyncdir(ino)

        @fuse_errors
        def mkdir(self, parent, name, mode, ctx):
            st.check("mkdir", st.child_path(parent, name))
            return self._attr(st.make(parent, name, "d", stat.S_IFDIR | stat.S_IMODE(mode),
                                      ctx.uid, ctx.gid))

        @fuse_errors
        def mknod(self, parent, name, mode, rdev, ctx):
            st.check("mknod", st.child_path(parent, name))
            kind = "f" if stat.S_ISREG(mode) else "n"
            return self._attr(st.make(parent, name, kind, mode, ctx.uid, ctx.gid, rdev))

        @fuse_errors
        def symlink(self, parent, name, target, ctx):
            st.check("symlink", st.child_path(parent, name))
            return self._attr(st.make(parent, name, "l", stat.S_IFLNK | 0o777, ctx.uid,
                                      ctx.gid, target=target))

        @fuse_errors
        def link(self, inode, new_parent, new_name, ctx):
            st.check("link", st.child_path(new_parent, new_name))
            st.link(inode, new_parent, new_name)
            return self._attr(inode)

        @fuse_errors
        def unlink(self, parent, name, ctx):
            st.check("unlink", st.child_path(parent, name))
            st.unlink(parent, name)

        @fuse_errors
        def rmdir(self, parent, name, ctx):
            st.check("rmdir", st.child_path(parent, name))
            st.unlink(parent, name, rmdir=True)

        @fuse_errors
        def rename(self, p0, n0, p1, n1, flags, ctx):
            st.check("rename", st.child_path(p0, n0), st.child_path(p1, n1))
            st.rename(p0, n0, p1, n1, flags)

        @fuse_errors
        def statfs(self, ctx):
            st.check("statfs", "")
            s = os.statvfs(st.backing)
            out = pyfuse3.StatvfsData()
            for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
                setattr(out, k, getattr(s, k))
            return out

        async def forget(self, inode_list):
            pass

    def command(req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {}
        if cmd == "sync":
            st.sync_all()
            return {}
        if cmd == "freeze":
            return st.freeze(req.get("keep", "none"), req.get("seed"))
        if cmd == "add_fault":
            return {"id": st.add_fault(req["path"], req["op"], req.get("errno", "EIO"),
                                       req.get("skip", 0), req.get("count"),
                                       delay=req.get("delay", 0.0))}
        if cmd == "arm_cut":
            return {"id": st.add_fault(req["path"], req["op"], "EIO", req.get("skip", 0), 1,
                                       (req.get("keep", "none"), req.get("seed")))}
        if cmd == "clear_faults":
            st.rules.clear()
            return {}
        if cmd == "stats":
            return st.stats()
        if cmd == "stop":
            if not st.frozen:
                st.sync_all()
                st.frozen = True
                st.close()
                st.save()
            pyfuse3.terminate()
            return {}
        raise ValueError(f"unknown command {cmd!r}")

    async def client(conn):
        async with conn:
            buf = b""
            while True:
                data = await conn.receive_some(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        reply = {"ok": True, **command(json.loads(line))}
                    except (ValueError, KeyError, TypeError, OSError) as e:
                        reply = {"ok": False, "error": str(e)}
                    await conn.send_all(json.dumps(reply).encode() + b"\n")

    async def main():
        control.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(control))
        sock.listen(8)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, client, [listener])
            print("ready", flush=True)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    opts = set(pyfuse3.default_options)
    opts.discard("default_permissions")
    opts |= {"fsname=powerfs", "subtype=powerfs"}
    pyfuse3.init(Ops(), str(mountpoint), opts)
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
        control.unlink(missing_ok=True)


# -------------------------------------------------------------------- the test's handle

def mounted(path: Path) -> bool:
    """Whether a file system is mounted at `path`, dead ones included (os.path.ismount says
    False for a FUSE mount whose process is gone: its stat fails with ENOTCONN)."""
    want = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == want for line in f)


def unmount(path: Path, timeout: float = 30) -> None:
    """Lazily unmount whatever is mounted at `path` (alive or dead) and wait until it is."""
    deadline = time.monotonic() + timeout
    while mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False,
                       capture_output=True)
        if not mounted(path):
            break
        assert time.monotonic() < deadline, f"{path} stays mounted"
        time.sleep(0.02)


class PowerFS:
    """A powerfs process for a test: see the module docstring."""

    def __init__(self, backing: Path, mountpoint: Path):
        self.backing = Path(backing)
        self.mnt = Path(mountpoint)
        self.sock = self.backing.parent / (self.backing.name + ".sock")
        self.log = self.backing.parent / (self.backing.name + ".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.proc is None, "already running"
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(self.backing), str(self.mnt),
                 "--control", str(self.sock)],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            raise RuntimeError(f"powerfs did not start: {self.log.read_text()[-2000:]}")
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            assert time.monotonic() < deadline, "powerfs mount did not appear"
            time.sleep(0.01)

    def _call(self, **req) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(120)
            s.connect(str(self.sock))
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(65536)
                if not data:
                    raise RuntimeError(f"powerfs closed the control connection on {req}")
                buf += data
        reply = json.loads(buf)
        if not reply.pop("ok"):
            raise ValueError(f"powerfs: {reply['error']}")
        return reply

    def sync(self) -> None:
        self._call(cmd="sync")

    def freeze(self, keep: str = "none", seed: int | None = None) -> dict:
        return self._call(cmd="freeze", keep=keep, seed=seed)

    def stats(self) -> dict:
        return self._call(cmd="stats")

    def add_fault(self, path: str, op: str, errno="EIO", skip: int = 0,
                  count: int | None = None, delay: float = 0.0) -> int:
        return self._call(cmd="add_fault", path=path, op=op, errno=errno, skip=skip,
                          count=count, delay=delay)["id"]

    def clear_faults(self) -> None:
        self._call(cmd="clear_faults")

    def arm_cut(self, path: str, op: str, skip: int = 0, keep: str = "none",
                seed: int | None = None) -> int:
        """Cut the power right before the (skip+1)-th call of `op` on `path` (the call fails
        with EIO, as does everything after it). stats()["cut"] says whether and where it
        happened (None: not yet)."""
        return self._call(cmd="arm_cut", path=path, op=op, skip=skip, keep=keep,
                          seed=seed)["id"]

    def wait_frozen(self, timeout: float = 60) -> dict | None:
        """Until an armed cut happened (its result), or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s["frozen"]:
                return s["cut"]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)

    def stop(self) -> None:
        """Unmount and end the process (a clean stop, unless frozen by a cut first)."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                try:
                    self._call(cmd="stop")
                except (OSError, RuntimeError):
                    pass  # the process may end before its reply is read
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc = None
            unmount(self.mnt)

    def cut(self, keep: str = "none", seed: int | None = None) -> dict:
        """Power cut with nothing running above: freeze, then stop."""
        out = self.freeze(keep, seed)
        self.stop()
        return out

    def kill(self) -> None:
        """Tear down without saving anything (for test cleanup after a failure)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stop()


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="powerfs: a file system that can lose power")
    ap.add_argument("backing", type=Path)
    ap.add_argument("mountpoint", type=Path)
    ap.add_argument("--control", type=Path, required=True)
    args = ap.parse_args()
    _serve(args.backing, args.mountpoint, args.control)
