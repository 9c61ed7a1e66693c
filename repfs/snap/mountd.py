"""A snapshot mount: a read-only FUSE mount of one snapshot, served by a helper process.

pyfuse3 serves one mount per process, so the site's daemon starts this helper for each
``repfs-admin snapshot mount``. The helper asks the daemon for every block it reads over a
Unix socket (the daemon reads it through the snapped volume under its lock, so a
copy-on-write in progress can never show through); it holds no state of its own.

Usage (started by the daemon): python -m repfs.snap.mountd SOCKET MOUNTPOINT FSNAME LOGFILE
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import struct
import sys

from ..volume import ReadOnlyDevice

REQ = struct.Struct("<QI")  # start block, count
RESP = struct.Struct("<i")  # 0 or an errno; the data follows a 0
MAX_BLOCKS = 1024

log = logging.getLogger(__name__)


async def serve_requests(stream, read) -> None:
    """The daemon's side: answer block reads until the helper hangs up."""
    buf = b""
    while True:
        while len(buf) < REQ.size:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
        start, count = REQ.unpack_from(buf)
        buf = buf[REQ.size:]
        if count > MAX_BLOCKS:
            await stream.send_all(RESP.pack(errno.EINVAL))
            continue
        try:
            data = await read(start, count)
        except Exception:  # noqa: BLE001 - report, keep serving
            log.exception("snapshot read (%d, %d) failed", start, count)
            await stream.send_all(RESP.pack(errno.EIO))
            continue
        await stream.send_all(RESP.pack(0) + data)


class RemoteDevice(ReadOnlyDevice):
    """The helper's side: a read-only block device whose blocks come from the daemon."""

    def __init__(self, sock: socket.socket, nblocks: int):
        super().__init__(self._read, nblocks)
        self.sock = sock

    def _recv(self, n: int) -> bytes:
        parts = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise OSError(errno.EIO, "the site daemon closed the snapshot connection")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def _read(self, start: int, count: int) -> bytes:
        out = []
        while count:
            n = min(count, MAX_BLOCKS)
            self.sock.sendall(REQ.pack(start, n))
            (status,) = RESP.unpack(self._recv(RESP.size))
            if status:
                raise OSError(status, os.strerror(status))
            out.append(self._recv(n * 4096))
            start += n
            count -= n
        return b"".join(out)

    def close(self):
        self.sock.close()


def main(argv) -> int:
    sock_path, mountpoint, fsname, logfile = argv
    import pyfuse3
    import trio

    from ..common import fuse_opt_value, setup_logging
    from ..fs.core import FileSystem
    from ..fs.format import Superblock
    from ..fs.ops import Operations
    setup_logging(logfile)
    out = sys.stdout
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sock_path)
        probe = RemoteDevice(sock, 1)
        sb = Superblock.unpack(probe.read(0, 1))
        dev = RemoteDevice(sock, sb.nblocks)
        fs = FileSystem(dev, None, readonly=True)
        ops = Operations(fs)
        opts = set(pyfuse3.default_options) | {f"fsname={fuse_opt_value(fsname)}",
                                                "subtype=repfs", "allow_other", "ro"}
        pyfuse3.init(ops, mountpoint, opts)
    except Exception as e:  # noqa: BLE001 - tell the daemon in one line
        out.write(f"{e}\n")
        out.flush()
        return 1
    out.write("ok\n")
    out.flush()

    async def run():
        async with trio.open_nursery() as n:
            async def signals():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        pyfuse3.terminate()
                        return
            n.start_soon(signals)
            await pyfuse3.main()
            n.cancel_scope.cancel()

    unmounted = False
    try:
        trio.run(run)
        unmounted = True
    finally:
        pyfuse3.close(unmount=not unmounted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
