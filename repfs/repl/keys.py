"""The LMDB layout of replication, declared in one place (environment ``SITE/meta.lmdb``,
shared with the snapshot facility). Integers in keys are big-endian.

| sub-database | key | value |
|---|---|---|
| ``replctx``   | ASCII name | the replication context: ``role`` ("primary"/"secondary"), ``generation`` (u64), ``last_cut`` (u64), ``policy`` (JSON: timeout, hwm, playback_timeout, playback_hwm, retention), ``primary`` (JSON, on a secondary: the primary's uuid and site), ``last_received``, ``last_played`` (u64, on a secondary), ``first_change_ns`` (u64: first write into the accumulating delta set) |
| ``clognew``   | page (u32) | change log, new table: 4096-byte page of bits, bit b of page p = block p*32768+b changed since the last cut |
| ``clogold``   | page (u32) | change log, old table of before issue 8 (the blocks of a delta set being copied); only read by recovery now |
| ``clogintent``| region (u32) | (empty) a write-intent mark: blocks of this 8 MiB region may have changed without their bits being in ``clognew`` yet; recovery marks the whole region |
| ``deltasets`` | delta set (u64) | mailbox entry (JSON): number, generation, state ("ready"; "cutting" only in sites of before issue 8), blocks, bytes, first_change_ns, cut_ns, ready_ns, pinned (its pinning snapshot ``repl-ds-N`` holds it; false once released) — or, made before issue 8: chunks, data_checksum, file (a chunk file under save/deltasets/) |
| ``dsbits``    | delta set (u64) + page (u32) | the delta set's block list (bit page), kept for the retention period (resync without a full copy needs it) |
| ``dests``     | name (UTF-8) | destination (JSON): name, site, kind ("local"), state, acked, played, copy_pos, snapshot, started_ns, counters |
| ``incoming``  | delta set (u64) | on a secondary: a received delta set (JSON): chunks, blocks, data_checksum, cut_ns, first_change_ns, received_ns, file; removed after playback |
"""

import struct

from ..snap.keys import MetaError, _unpack  # noqa: F401  (one error for the shared environment)

CTX = b"replctx"
CLOG_NEW = b"clognew"
CLOG_OLD = b"clogold"
CLOG_INTENT = b"clogintent"
DELTASETS = b"deltasets"
DSBITS = b"dsbits"
DESTS = b"dests"
INCOMING = b"incoming"

PAGE_BITS = 32768
PAGE_BYTES = PAGE_BITS // 8
REGION_BLOCKS = 2048  # write-intent granularity: 8 MiB

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U64_U32 = struct.Struct(">QI")


def u32(n: int) -> bytes:
    return _U32.pack(n)


def u64(n: int) -> bytes:
    return _U64.pack(n)


def is_u64(v) -> bool:
    """A value decoded from JSON (a record, a peer's answer) is an unsigned 64-bit integer
    (not a bool, not a float)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


def from_u32(b: bytes) -> int:
    return _unpack(_U32, b, "32-bit value")[0]


def from_u64(b: bytes) -> int:
    return _unpack(_U64, b, "64-bit value")[0]


def ds_page(n: int, page: int) -> bytes:
    return _U64_U32.pack(n, page)
