"""The redo log: the committed-but-not-yet-checkpointed transaction, kept outside the volume.

The journal file holds at most one transaction record, always at offset 0::

    header   _HDR: magic, sequence number, block count            (padded to 4 KiB with
    numbers  count x uint32 volume block numbers                   the header, so data
    data     count x 4 KiB block images                            starts block-aligned)
    trailer  _TRAILER: xxh3_64 over header+numbers+data, magic

Commit protocol (see docs/crash-safety.md): the caller first flushes the volume, which makes
the previous transaction's checkpoint durable, so the previous record is no longer needed
and may be overwritten; it then writes this record and fdatasyncs the journal (the commit
point), then writes the blocks to the volume without waiting. A torn record fails its
checksum and is ignored on replay; a whole record is replayed, and replay is idempotent.
"""

from __future__ import annotations

import os
import struct

import xxhash

from ..volume import pwrite_all
from .format import BLOCK_SIZE

_MAGIC = b"REPFSJNL"
_HDR = struct.Struct("<8sQI")  # magic, seq, count
_TRAILER = struct.Struct("<Q8s")  # checksum, magic


def _header_len(count: int) -> int:
    raw = _HDR.size + 4 * count
    return -(-raw // BLOCK_SIZE) * BLOCK_SIZE


class Journal:
    def __init__(self, path: str | os.PathLike, *, readonly: bool = False):
        self.path = os.fspath(path)
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        self.fd = os.open(self.path, flags | os.O_CLOEXEC, 0o600)

    def write(self, seq: int, blocks: dict[int, bytes]) -> None:
        """Write one transaction record and make it durable (the commit point)."""
        numbers = sorted(blocks)
        count = len(numbers)
        hlen = _header_len(count)
        head = bytearray(hlen)
        _HDR.pack_into(head, 0, _MAGIC, seq, count)
        struct.pack_into(f"<{count}I", head, _HDR.size, *numbers)
        h = xxhash.xxh3_64()
        h.update(head)
        parts = [head]
        for b in numbers:
            data = blocks[b]
            h.update(data)
            parts.append(data)
        parts.append(_TRAILER.pack(h.intdigest(), _MAGIC))
        off = 0
        for p in parts:
            pwrite_all(self.fd, p, off)
            off += len(p)
        os.fdatasync(self.fd)

    def read(self) -> tuple[int, dict[int, bytes]] | None:
        """The record in the journal if it is whole and its checksum holds, else None."""
        head = os.pread(self.fd, BLOCK_SIZE, 0)
        if len(head) < _HDR.size:
            return None
        magic, seq, count = _HDR.unpack_from(head, 0)
        if magic != _MAGIC:
            return None
        hlen = _header_len(count)
        total = hlen + count * BLOCK_SIZE + _TRAILER.size
        if total > os.fstat(self.fd).st_size:  # a torn or damaged header: never trust it
            return None
        raw = os.pread(self.fd, total, 0)
        if len(raw) < total:
            return None
        csum, tmagic = _TRAILER.unpack_from(raw, total - _TRAILER.size)
        if tmagic != _MAGIC or csum != xxhash.xxh3_64_intdigest(raw[: total - _TRAILER.size]):
            return None
        numbers = struct.unpack_from(f"<{count}I", raw, _HDR.size)
        mv = memoryview(raw)
        blocks = {b: bytes(mv[hlen + i * BLOCK_SIZE: hlen + (i + 1) * BLOCK_SIZE])
                  for i, b in enumerate(numbers)}
        return seq, blocks

    def clear(self) -> None:
        """Forget the record (after its blocks are durable in the volume)."""
        os.pwrite(self.fd, bytes(_HDR.size), 0)
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
