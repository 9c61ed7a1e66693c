"""The LMDB layout of the snapshot facility, declared in one place.

The environment is ``SITE/meta.lmdb``. Integers in keys are big-endian so LMDB's byte order is
numeric order and range scans walk blocks in order. Values of paged structures are fixed-size
pages; a page that would be all zero is not stored (FIG. 43).

| sub-database | key | value |
|---|---|---|
| ``snaps``     | snapshot id (u64)              | JSON record: id, name, created_ns, attrs (free-form map; the replication issues stamp a delta-set number there), state ("ok" or "deleting"), indexed_end (save-volume blocks covered by the index), saved (before-images held) |
| ``snapnames`` | name (UTF-8)                   | snapshot id (u64) |
| ``snapbits``  | id (u64) + page (u32)          | bit map page, ``BITS_PAGE_BYTES`` bytes: bit b of page p set <=> block p*BITS_PER_PAGE+b has a before-image in this snapshot's save volume (FIG. 25, 43) |
| ``snapbmap``  | id (u64) + page (u32)          | block map page: ``BMAP_PER_PAGE`` little-endian u32, entry i = Si+1 for block page*BMAP_PER_PAGE+i, 0 = none (FIG. 24, 44: an LMDB B-tree of pages in place of hash lists) |
| ``state``     | ASCII name                     | facility state: ``next_id`` (u64), ``restoring`` (u64 id while a restore runs) |

The per-snapshot meta bit map (FIG. 42, 45) is not stored here: the file system's block bitmap
lives in the volume (invariant 1), so the snapshot of the volume already holds the meta bit map
as it was at the snapshot's creation, and reading the bitmap blocks through the snapshot gives
it. Snapshot creation therefore copies nothing (O(1) in the volume size).
"""

import struct

SNAPS = b"snaps"
NAMES = b"snapnames"
BITS = b"snapbits"
BMAP = b"snapbmap"
STATE = b"state"

BITS_PAGE_BYTES = 4096
BITS_PER_PAGE = BITS_PAGE_BYTES * 8  # = blocks covered by one file-system bitmap block
BMAP_PER_PAGE = 256

_ID = struct.Struct(">Q")
_ID_PAGE = struct.Struct(">QI")


class MetaError(Exception):
    """A key or value in SITE/meta.lmdb does not decode: the site's index database is damaged
    (shared by the snapshot facility and replication, whose keys live in the same environment)."""


def _unpack(st: struct.Struct, raw: bytes, what: str) -> tuple:
    if len(raw) != st.size:
        raise MetaError(f"meta.lmdb: {what} of {len(raw)} bytes (expected {st.size})")
    return st.unpack(raw)


def snap_key(sid: int) -> bytes:
    return _ID.pack(sid)


def unpack_id(key: bytes) -> int:
    return _unpack(_ID, key[:8], "snapshot id")[0]


def page_key(sid: int, page: int) -> bytes:
    return _ID_PAGE.pack(sid, page)


def unpack_page_key(key: bytes) -> tuple[int, int]:
    return _unpack(_ID_PAGE, key, "page key")
