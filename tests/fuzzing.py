"""Hypothesis strategies shared by the fuzz tests (t0_fuzz, t1_fuzz_core).

`mutated(valid, fields)` turns a valid encoding (made by the real encoder) into a damaged one:
bit flips, truncation, extension with random bytes, and fields overwritten with boundary values
(0, 1, the sign bit, the maximum), at the field offsets of the format's struct when given.
`examples(n)` is the number of examples a property runs: n by default, REPFS_FUZZ_EXAMPLES when
set (see tests/conftest.py for the profiles).
"""

from __future__ import annotations

import os
import struct

from hypothesis import strategies as st


def examples(default: int) -> int:
    env = os.environ.get("REPFS_FUZZ_EXAMPLES")
    return int(env) if env else default


def struct_fields(fmt: str, base: int = 0) -> list[tuple[int, int]]:
    """(offset, width) of every integer field of a struct format ("<8sQI" -> [(8, 8), ...])."""
    order = fmt[0] if fmt[0] in "<>=!@" else ""
    body = fmt[len(order):]
    out = []
    pos = base
    i = 0
    while i < len(body):
        j = i
        while body[j].isdigit():
            j += 1
        rep = int(body[i:j]) if j > i else 1
        code = body[j]
        width = struct.calcsize(order + code)
        if code in "sp":
            pos += rep
        else:
            for _ in range(rep):
                out.append((pos, width))
                pos += width
        i = j + 1
    return out


def boundary(width: int) -> list[int]:
    top = 1 << (8 * width)
    return [0, 1, 2, top // 2 - 1, top // 2, top - 2, top - 1]


@st.composite
def mutated(draw, valid: bytes, fields: list[tuple[int, int]] | None = None,
            max_mutations: int = 4, max_extend: int = 64) -> bytes:
    buf = bytearray(valid)
    for _ in range(draw(st.integers(1, max_mutations))):
        kind = draw(st.sampled_from(("flip", "flip", "truncate", "extend", "field", "field")))
        if kind == "flip" and buf:
            bit = draw(st.integers(0, len(buf) * 8 - 1))
            buf[bit >> 3] ^= 1 << (bit & 7)
        elif kind == "truncate" and buf:
            del buf[draw(st.integers(0, len(buf) - 1)):]
        elif kind == "extend":
            buf += draw(st.binary(min_size=1, max_size=max_extend))
        elif kind == "field":
            fits = [(o, w) for o, w in (fields or []) if o + w <= len(buf)]
            if fits:
                off, width = draw(st.sampled_from(fits))
            else:
                width = draw(st.sampled_from((1, 2, 4, 8)))
                if len(buf) < width:
                    continue
                off = draw(st.integers(0, len(buf) - width))
            value = draw(st.sampled_from(boundary(width)) | st.integers(0, (1 << 8 * width) - 1))
            buf[off: off + width] = value.to_bytes(width, "little")
    return bytes(buf)


def damaged(valid: bytes, fields=None, **kw):
    """Arbitrary bytes or a mutation of `valid` (most examples are mutations)."""
    return st.one_of(st.binary(max_size=len(valid) + 64), mutated(valid, fields, **kw),
                     mutated(valid, fields, **kw))
