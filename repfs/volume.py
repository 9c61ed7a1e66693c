"""The block volume: a fixed array of 4 KiB blocks in one sparse image file.

Everything above this module sees a volume only through the small block-device interface
`BlockDevice`: read and write of extents (start block, count), flush, and the size in blocks.
Later layers (the replication change log, the snapshot copy-on-first-write layer) wrap a
device with the same interface, so the file system never knows what sits below it.
"""

from __future__ import annotations

import errno
import os
import threading

BLOCK_SIZE = 4096


def pwrite_all(fd: int, data, off: int) -> None:
    """Write all of `data` at `off` (os.pwrite may write less than asked)."""
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, off)
        mv = mv[n:]
        off += n


def pwritev_all(fd: int, parts, off: int) -> int:
    """Write the buffers `parts` one after the other from `off`, with one system call where
    the kernel takes them all (fewer than IOV_MAX parts; a short write is finished with
    `pwrite_all`). Returns the number of bytes written."""
    parts = [memoryview(p).cast("B") for p in parts]
    total = sum(p.nbytes for p in parts)
    n = os.pwritev(fd, parts, off)
    if n != total:
        pwrite_all(fd, memoryview(b"".join(parts))[n:], off + n)
    return total


def private_dir(path: str | os.PathLike) -> None:
    """Make directory `path` (and missing parents) mode 0700: it holds raw blocks of every
    file (save volumes, delta sets), which must not bypass the files' own permissions.
    An existing directory is tightened too; the umask cannot loosen it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)


def create_private(path: str | os.PathLike, flags: int = os.O_WRONLY) -> int:
    """Create (or truncate) file `path` with mode 0600 whatever the umask; returns its fd."""
    fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


class VolumeError(Exception):
    """A volume cannot be opened or an extent is out of range."""


class ErrnoError(OSError):
    """An operation fails with this POSIX errno: a domain error, not a bug. A layer of the
    stack raises it to refuse an I/O (ENOSPC: the snapshot save volumes are full; EROFS: a
    read-only device); the file-system core raises it as `repfs.fs.errors.FSError` (the same
    class), and the FUSE adapter turns it into FUSEError in one place."""

    def __init__(self, err: int, detail: str | None = None):
        super().__init__(err, detail or os.strerror(err))


class BlockDevice:
    """The interface every layer of the volume stack provides.

    `read(start, count)` returns `count * BLOCK_SIZE` bytes; `write(start, data, meta)` takes a
    bytes-like object whose length is a multiple of `BLOCK_SIZE` (`meta` marks the checkpoint
    of committed file-system metadata, which a layer must never refuse: it may only use
    reserves for it); `flush()` makes every completed write durable. Implementations must accept calls from more than one thread
    (the file system writes back committed metadata from a worker thread).
    """

    block_size = BLOCK_SIZE
    nblocks: int

    def read(self, start: int, count: int) -> bytes:
        raise NotImplementedError

    def write(self, start: int, data, meta: bool = False) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def pending_bytes(self) -> int:
        """Bytes written but held in memory by a layer until its next flush (the FUSE
        adapter releases them early when they grow: see SnapLayer)."""
        return 0

    def release_held(self) -> None:
        """Do what a flush does to let held writes go to the volume, without making the
        volume durable (cheaper than flush)."""

    def close(self) -> None:
        raise NotImplementedError

    def find_layer(self, kind: type) -> "BlockDevice":
        """The layer of type `kind` in this stack: this device or one below it. Layers are
        found by what they are, never by counting `.lower` steps."""
        dev = self
        while not isinstance(dev, kind):
            dev = getattr(dev, "lower", None)
            if dev is None:
                raise LookupError(f"no {kind.__name__} in the volume stack")
        return dev


class Layer(BlockDevice):
    """A device that wraps another one; by default every call passes straight down."""

    def __init__(self, lower: BlockDevice):
        self.lower = lower
        self.nblocks = lower.nblocks

    def read(self, start, count):
        return self.lower.read(start, count)

    def write(self, start, data, meta=False):
        self.lower.write(start, data, meta)

    def flush(self):
        self.lower.flush()

    def pending_bytes(self) -> int:
        return self.lower.pending_bytes()

    def release_held(self) -> None:
        self.lower.release_held()

    def close(self):
        self.lower.close()


class ReadOnlyDevice(BlockDevice):
    """A read-only view as a block device: `read(start, count)` is the given function, every
    write fails with EROFS (a snapshot, the live volume read inside a consistency point, a
    snapshot served to a mount helper)."""

    def __init__(self, read, nblocks: int):
        self.read = read
        self.nblocks = nblocks

    def write(self, start, data, meta=False):
        raise ErrnoError(errno.EROFS)

    def flush(self):
        pass

    def close(self):
        pass


class Volume(BlockDevice):
    """The image file itself: the bottom of every stack."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False):
        self.path = os.fspath(path)
        flags = os.O_RDONLY if readonly else os.O_RDWR
        try:
            self.fd = os.open(self.path, flags | os.O_CLOEXEC)
        except OSError as e:
            raise VolumeError(f"cannot open volume image {self.path}: {e.strerror}") from None
        size = os.fstat(self.fd).st_size
        if size % BLOCK_SIZE:
            os.close(self.fd)
            raise VolumeError(f"volume image {self.path} is not a whole number of 4 KiB blocks")
        self.nblocks = size // BLOCK_SIZE
        self.readonly = readonly
        self._closed = False
        self._lock = threading.Lock()  # guards close() against concurrent I/O only

    @classmethod
    def create(cls, path: str | os.PathLike, nblocks: int) -> "Volume":
        """Create a sparse image of `nblocks` blocks (the file must not exist)."""
        fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, nblocks * BLOCK_SIZE)
        except OSError:
            os.unlink(path)  # leave no half-made image behind
            raise
        finally:
            os.close(fd)
        return cls(path)

    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.nblocks:
            raise VolumeError(f"extent ({start}, {count}) outside volume of {self.nblocks} blocks")

    def read(self, start: int, count: int) -> bytes:
        self._check(start, count)
        want = count * BLOCK_SIZE
        data = os.pread(self.fd, want, start * BLOCK_SIZE)
        if len(data) < want:  # cannot happen for a sparse file of the right size, but be exact
            data += bytes(want - len(data))
        return data

    def write(self, start: int, data, meta: bool = False) -> None:
        n = len(data)
        if n % BLOCK_SIZE:
            raise VolumeError("write of a partial block")
        self._check(start, n // BLOCK_SIZE)
        pwrite_all(self.fd, data, start * BLOCK_SIZE)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
