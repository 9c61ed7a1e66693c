"""Tier 0: resync's block list travels in parts (recovery/resync.py): each blocklist answer
fits one RCP control answer, and the parts put together are the whole list with the hashes of
all its granules, in order — as the new primary's `_blocklist` puts them together."""

from __future__ import annotations

import base64
import random
from types import SimpleNamespace

import numpy as np

from repfs.pagedbits import PAGE_BITS, PagedBits
from repfs.recovery.resync import (ANSWER_BYTES, Resync, _hashes, granule_hashes,
                                   granule_size, granules, pack_bits, unpack_bits)


def content(start: int, count: int) -> bytes:
    """A volume whose every block says where it is."""
    return b"".join(np.full(4096 // 8, b, dtype=np.int64).tobytes()
                    for b in range(start, start + count))


def test_parts_put_together_are_the_whole_list_and_each_fits_an_answer():
    rng = random.Random(7)
    nblocks = 40 * PAGE_BITS
    bits = PagedBits()
    for page in range(40):  # scattered runs (an over-marked log: whole regions too)
        for _ in range(rng.randrange(1, 60)):
            s = page * PAGE_BITS + rng.randrange(PAGE_BITS - 300)
            bits.set_range(s, rng.randrange(1, 300))
    bits.set_range(5 * PAGE_BITS, 2048)
    g = granule_size(bits.count())
    r = Resync.__new__(Resync)
    r.svc = SimpleNamespace(layer=SimpleNamespace(read=content))
    whole, digests, first, answers = PagedBits(), bytearray(), 0, 0
    while first is not None:
        part, nxt = r._part(bits, g, first)
        answers += 1
        size = len(part["bits"]) + len(part["hashes"])
        assert size < 64 << 10, size  # (base64 included: one RCP control answer)
        got = unpack_bits(part["bits"], nblocks)
        gran, h = _hashes({**part, "granule": g}, got)
        assert all(p >= first for p in got.pages) and not set(got.pages) & set(whole.pages)
        whole.pages.update(got.pages)
        digests += h
        first = nxt
    assert answers > 1  # (the list is long enough to need parts)
    assert sorted(whole.pages) == sorted(bits.pages)
    assert all((whole.pages[p] == bits.pages[p]).all() for p in bits.pages)
    assert bytes(digests) == granule_hashes(bits, content, g)
    assert len(digests) == 16 * sum(1 for _ in granules(bits, g))
    assert ANSWER_BYTES < 48 << 10


def test_a_damaged_list_is_refused():
    bits = PagedBits()
    bits.set_range(10, 20)
    text = pack_bits(bits)
    for bad in (text[:-4] + "AAAA", "not base64!", base64.b64encode(b"\0" * 7).decode()):
        try:
            unpack_bits(bad, 4 * PAGE_BITS)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
    beyond = PagedBits()
    beyond.set_range(PAGE_BITS + 5, 1)
    try:
        unpack_bits(pack_bits(beyond), PAGE_BITS)  # (a volume of one page)
    except ValueError:
        pass
    else:
        raise AssertionError("a block beyond the volume was accepted")


def test_each_block_is_read_once_across_the_parts():
    """The page that does not fit a part is left to the next one unread: the old primary
    reads (and hashes) its marked blocks once, not the first page of every part twice."""
    bits = PagedBits()
    for page in range(6):  # whole pages marked: about one page's hashes fill an answer
        bits.set_range(page * PAGE_BITS, PAGE_BITS)
    g = granule_size(bits.count())
    reads: dict[int, int] = {}

    def read(start: int, count: int) -> bytes:
        for b in range(start, start + count):
            reads[b] = reads.get(b, 0) + 1
        return content(start, count)

    r = Resync.__new__(Resync)
    r.svc = SimpleNamespace(layer=SimpleNamespace(read=read))
    first, answers = 0, 0
    while first is not None:
        _, first = r._part(bits, g, first)
        answers += 1
    assert answers > 1
    assert len(reads) == bits.count()
    assert set(reads.values()) == {1}, sorted(set(reads.values()))
