"""Resync without a full copy (FIG. 28-29): after a failover, bring the old primary up to
date from the new one by shipping only the blocks that differ.

`repfs-admin --site NEWPRIMARY resync --peer OLDPRIMARY [--group G] [--dry-run]`, run at the
new primary (a site that failed over: it has a restart point R, the delta set it had played
when it took over, and its change log has run since).

Which blocks differ. At boundary R both sites held the same volume (the new primary played
exactly the old one's delta sets up to R). Since then the old primary changed the blocks of
its delta sets after R (their block lists are kept for the retention period) and of its
change log (what it had not cut yet: the writes failover lost); the new primary changed the
blocks of its own delta sets after R (cut by its change log since the failover). A block in
neither set is at R on both sites. So the new primary sends, for every block in the union,
its own content at an intermediate point I — which for a block only the old primary changed
is R's content (the reference's before-image from the restart-point snapshot), and for the
others the new content — and the old primary is then exactly at I. One pass instead of the
reference's two (before-images, then the R→I delta set): the same blocks cross the wire once.

The steps, each recorded so that running resync again (or the send task, by itself) goes on
after a kill -9 or a power cut of either side:

| step | where | what | recorded |
|---|---|---|---|
| blocklist | old | fence itself (the newer generation asks), list the blocks changed after R | its fence |
| intermediate point | new | a cut and snapshot `repl-init-PEER` at one consistency point (delta set I) | the destination, state `resync-attach` |
| union | new | the old primary's list ∪ its own delta sets' block lists (R, I] | LMDB `resyncbits` |
| attach | old | snapshot `divergence-GEN` (its state as it was: the writes failover lost stay readable), then become a secondary of the new primary expecting a copy | its role, the snapshot |
| copy | new→old | the union's blocks valid at I, from the snapshot, in block order (resumable) | the destination `initial-copy`, the receiver's copy position |
| play | old | the staged blocks are played as delta set I, then delta sets after I follow | as any copy |

When the old primary cannot tell what it changed — its block lists are past retention, its
change log was off, it is not of this lineage (another volume uuid), or it cut fewer delta
sets than R — a full copy of the valid blocks is made instead, with a warning logged and
printed (FIG. 28 steps 536-537): `replicate start --force`, resumable, with its progress.
"""

from __future__ import annotations

import base64
import json
import logging
import struct

import numpy as np
import trio
import xxhash
import zstandard

from ..errors import DomainError
from ..extents import runs
from ..pagedbits import PAGE_BITS, PAGE_BYTES, PagedBits
from ..repl import keys as K
from ..repl.sender import make_client
from ..repl.transport import PermanentError, RejectedError, TransientError
from ..repl.verify import owners

log = logging.getLogger(__name__)

RESYNC_BITS = b"resyncbits"  # LMDB: destination name + NUL + page (u32) -> packed page
DIVERGENCE_PREFIX = "divergence-"
MAX_PATHS = 1000  # files a dry run names


class ResyncError(DomainError):
    default_kind = "conflict"


async def call_peer(fn, peer: str, error, unreachable_hint: str = ""):
    """`fn()` (a call on a peer's client) in a worker thread, its transport errors as one
    line of `error`: "cannot reach PEER: ..." (transient), "PEER refused: ..." (permanent or
    rejected). Shared by resync and copy (recovery/copy.py)."""
    try:
        return await trio.to_thread.run_sync(fn)
    except TransientError as e:
        raise error(f"cannot reach {peer}: {e}{unreachable_hint}") from None
    except (PermanentError, RejectedError) as e:
        raise error(f"{peer} refused: {e}") from None


# ---------------------------------------------------------------------- block lists on the wire

def pack_bits(bits: PagedBits) -> str:
    """A paged bit map as text for a JSON answer: (page u32, packed page) records,
    zstd-compressed, base64."""
    raw = b"".join(struct.pack(">I", p) + bits.pages[p].tobytes() for p in sorted(bits.pages))
    return base64.b64encode(zstandard.ZstdCompressor().compress(raw)).decode()


def unpack_bits(text, nblocks: int) -> PagedBits:
    """`pack_bits` read back, checked against a volume of `nblocks` blocks (ValueError)."""
    if not isinstance(text, str):
        raise ValueError("a block list must be text")
    npages = -(-nblocks // PAGE_BITS)
    rec = 4 + PAGE_BYTES
    try:
        raw = zstandard.ZstdDecompressor().decompress(base64.b64decode(text, validate=True),
                                                      max_output_size=npages * rec)
    except (ValueError, zstandard.ZstdError) as e:
        raise ValueError(f"a block list that does not decode ({e})") from None
    if len(raw) % rec:
        raise ValueError("a block list of torn pages")
    bits = PagedBits()
    for off in range(0, len(raw), rec):
        (page,) = struct.unpack_from(">I", raw, off)
        if page >= npages or page in bits.pages:
            raise ValueError(f"a block list with page {page} out of place")
        arr = np.frombuffer(raw, dtype=np.uint8, count=PAGE_BYTES, offset=off + 4).copy()
        if page == npages - 1 and nblocks % PAGE_BITS:  # no block beyond the volume
            tail = np.unpackbits(arr, bitorder="little")[nblocks % PAGE_BITS:]
            if tail.any():
                raise ValueError("a block list reaching beyond the volume")
        if arr.any():
            bits.pages[page] = arr
    return bits


GRANULE = 16  # blocks per hash of the old primary's changed blocks (64 KiB)
MAX_GRANULES = 1 << 20  # hashes for one resync at most (16 MiB): larger granules beyond
BLOCK_HASHES = 2048  # blocks whose own hashes one answer carries (32 KiB, in base64 43)
ANSWER_BYTES = 40 << 10  # a blocklist answer's bits and hashes, before base64: it travels
#                          as one RCP control answer (at most 64 KiB: rcp/wire.py), so a
#                          long list comes a few pages of the volume at a time


def granule_size(nbits: int) -> int:
    """Blocks per granule for a block list of `nbits` blocks: GRANULE, larger for a list
    so long that its hashes would exceed MAX_GRANULES."""
    return max(GRANULE, -(-nbits // MAX_GRANULES))


def granules(bits: PagedBits, g: int):
    """The granules of a block list: runs of consecutive listed blocks, cut every `g`
    blocks, in block order: yields (start, count). Both sites cut the same list the same
    way."""
    for page in sorted(bits.pages):
        blocks = bits.page_blocks(page)
        if not len(blocks):
            continue
        breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
        for run in np.split(blocks, breaks):
            s, c = int(run[0]), len(run)
            while c:
                m = min(c, g)
                yield s, m
                s += m
                c -= m


def granule_hashes(bits: PagedBits, read, g: int) -> bytes:
    """xxh3-128 of each granule's blocks as `read(start, count)` returns them, joined."""
    out = bytearray()
    for s, c in granules(bits, g):
        out += xxhash.xxh3_128_digest(read(s, c))
    return bytes(out)


def _hashes(doc: dict, bits: PagedBits) -> tuple[int, bytes]:
    """The granule size and hashes of a blocklist answer, checked against its block list
    (ValueError)."""
    g = doc.get("granule")
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"a bad granule {g!r}")
    try:
        digests = base64.b64decode(doc.get("hashes") or "", validate=True)
    except ValueError:
        raise ValueError("hashes that do not decode") from None
    if len(digests) != 16 * sum(1 for _ in granules(bits, g)):
        raise ValueError("hashes that do not match its block list")
    return g, digests


class Resync:
    """Resync at the new primary (`run`) and its steps at the old one (`request`);
    `SiteService.resync`."""

    def __init__(self, svc):
        self.svc = svc
        self.env = svc.store.env
        self.db_bits = self.env.open_db(RESYNC_BITS)  # (never inside a transaction)
        self.lock = trio.Lock()

    # ------------------------------------------------------------------ at the old primary

    async def request(self, args: dict) -> dict:
        """POST /v1/repl/resync from a new primary: "blocklist" (fence, then the blocks
        changed after delta set `after`, with their content's hashes), "paths" (a dry run:
        the files that own the given blocks here), "attach" (keep the divergent state in a
        snapshot, then become its secondary, expecting the copy)."""
        svc = self.svc
        step, gen, by = args["step"], args["generation"], args["by"]
        own = svc.receiver.generation
        if step == "blocklist":
            if svc.primary is None:
                raise ResyncError(f"this site is a {svc.receiver.role}, not a primary: it "
                                  f"has no history of its own to resync from")
            self._check_newer(gen)
            if not args.get("dry_run"):  # (a dry run changes nothing here either)
                await svc.recovery.fence(by, gen, "a resync from it began")
            async with svc.primary.cut_lock:  # (no cut moves blocks between the two reads)
                bits, why = await trio.to_thread.run_sync(self._changed_since, args["after"])
            out = {"history": bits is not None, "why": why, "generation": own,
                   "last_cut": svc.sets.last_cut}
            if bits is not None:
                n = bits.count()
                g = granule_size(n)
                # its content, so that blocks it only marked (the change log over-marks
                # after a crash: whole intent regions) and that still hold what the new
                # primary has are not sent; a part of the list at a time (`first_page`)
                part, nxt = await trio.to_thread.run_sync(
                    self._part, bits, g, args.get("first_page", 0))
                out.update(blocks=n, granule=g, next_page=nxt, **part)
            return out
        if step == "blockhashes":  # (the blocks of its granules that differ, one by one)
            try:
                bits = unpack_bits(args.get("bits"), svc.layer.nblocks)
            except ValueError as e:
                raise ResyncError(f"bad block list: {e}", "invalid") from None
            if bits.count() > BLOCK_HASHES:
                raise ResyncError(f"at most {BLOCK_HASHES} blocks' hashes at a time",
                                  "invalid")
            h = await trio.to_thread.run_sync(granule_hashes, bits, svc.layer.read, 1)
            return {"hashes": base64.b64encode(h).decode()}
        if step == "paths":  # (a dry run: what the resync would discard here)
            try:
                bits = unpack_bits(args.get("bits"), svc.layer.nblocks)
            except ValueError as e:
                raise ResyncError(f"bad block list: {e}", "invalid") from None
            return {"paths": await trio.to_thread.run_sync(self._paths, bits)}
        if step == "attach":
            return await self._attach(args["primary"], gen, args["nblocks"], by,
                                      args.get("keep", True))
        raise ResyncError(f"bad resync step {step!r}", "invalid")

    def _check_newer(self, gen: int) -> None:
        """A request of generation `gen` may take this site only if `gen` is newer than
        its own and than any it was fenced by (a site fenced by generation 3 does not
        follow a stale generation 2)."""
        own = self.svc.receiver.generation
        fenced = (self.svc.recovery.fenced or {}).get("generation") or 0
        fenced = fenced if isinstance(fenced, int) else 0
        if gen <= own or gen < fenced:
            raise ResyncError(f"a resync from generation {gen} cannot take this site, which "
                              f"is at generation {own}" + (f" and was fenced by generation "
                                                           f"{fenced}" if fenced > own else "")
                              + " (a stale request)")

    def _part(self, bits: PagedBits, g: int, first: int) -> tuple[dict, int | None]:
        """The pages of `bits` from `first` on, with their granules' hashes, as many as
        fit in ANSWER_BYTES (at least one); and the next page to ask for (None: done)."""
        svc = self.svc
        part = PagedBits()
        digests = bytearray()
        size = 0
        pages = sorted(p for p in bits.pages if p >= first)
        for page in pages:
            one = PagedBits()
            one.pages[page] = bits.pages[page]
            n = 16 * sum(1 for _ in granules(one, g))  # (its hashes' size, before reading it:
            # a page that does not fit is read by the next part only)
            z = len(zstandard.ZstdCompressor().compress(bits.pages[page].tobytes())) + 4
            if part.pages and size + n + z > ANSWER_BYTES:
                return ({"bits": pack_bits(part), "hashes": base64.b64encode(digests).decode(),
                         "first_page": first}, page)
            part.pages[page] = bits.pages[page]
            digests += granule_hashes(one, svc.layer.read, g)
            size += n + z  # (the pages compressed together take no more)
        return ({"bits": pack_bits(part), "hashes": base64.b64encode(digests).decode(),
                 "first_page": first}, None)

    def _changed_since(self, after: int) -> tuple[PagedBits | None, str | None]:
        """The blocks this (old) primary changed after boundary `after`: its delta sets'
        block lists after it, and its change log; (None, why) when that cannot be told."""
        svc = self.svc
        sets, clog = svc.sets, svc.clog
        last = sets.last_cut
        if after > last:
            return None, (f"this site cut delta sets up to {last} only, and the new primary "
                          f"played up to {after}: they are not of one lineage")
        bits = PagedBits()
        for n in range(after + 1, last + 1):
            rec = sets.record(n)
            if rec is None:
                return None, (f"the block list of delta set {n} is gone (kept for the "
                              f"retention period only)")
            bits.merge(sets.block_list(n))
        if not clog.enabled:
            return None, (f"its change log was off (no destination): what it wrote after "
                          f"delta set {last} is not known")
        with clog.lock:
            bits.merge(clog.new)
        return bits, None

    def _paths(self, bits: PagedBits) -> list[str]:
        """The files and directories that own `bits` here (what a resync discards)."""
        blocks = np.concatenate([bits.page_blocks(p) for p in sorted(bits.pages)]
                                or [np.zeros(0, dtype=np.int64)])
        own = owners(self.svc.core, blocks)
        # (files and directories whose content differs; not "inode of ...", whose inode
        # shares a table block with a changed one, nor the fixed areas)
        paths = sorted({p for who in own.values() for p in who if p.startswith("/")})
        return paths[:MAX_PATHS]

    async def _attach(self, primary: dict, gen: int, nblocks: int, by: str,
                      keep: bool = True) -> dict:
        svc = self.svc
        r = svc.receiver
        if not isinstance(primary, dict) or primary.get("uuid") != svc.core.sb.uuid.hex():
            raise ResyncError("the new primary's volume is not this site's lineage (another "
                              "volume uuid): only a full copy can resync it")
        if r.role == "secondary":
            theirs = r.primary() or {}
            if (theirs.get("uuid"), theirs.get("site")) != (primary["uuid"], primary["site"]):
                raise ResyncError(f"this site is a secondary of {theirs.get('site')}, not an "
                                  f"old primary of {primary['site']}")
            if gen == r.generation and r.state in ("initial-copy", "replicating"):
                return r.info()  # attached already (the answer was lost): nothing to redo
        self._check_newer(gen)
        if r.role != "secondary" and keep:  # (nothing of its own differs: no snapshot)
            name = f"{DIVERGENCE_PREFIX}{gen}"
            if not any(s.name == name for s in svc.store.queue):
                async with svc.ops.quiesce():
                    await trio.to_thread.run_sync(svc.store.create, name, {
                        "purpose": "divergence", "generation": r.generation, "by": by})
                log.info("resync from %s: this site's state is kept in snapshot %s (the "
                            "writes the failover lost can be read and copied from it); the "
                            "site becomes a secondary of %s", by, name, primary["site"])
        return await svc.secondary.attach(primary, gen, nblocks, True)

    # ------------------------------------------------------------------ at the new primary

    async def run(self, peer: str, group: str | None = None, dry_run: bool = False) -> dict:
        async with self.lock:
            return await self._run(peer, group, dry_run)

    async def _run(self, peer: str, group: str | None, dry_run: bool) -> dict:
        svc = self.svc
        p = svc.primary
        rp = svc.recovery.restart_point
        if p is None:
            raise ResyncError("run resync at the new primary (this site is a secondary)")
        if rp is None:
            raise ResyncError("this site never failed over (it has no restart point): resync "
                              "brings an old primary up to date after a failover; to make a "
                              "new secondary use replicate start")
        after, gen = int(rp["delta_set"]), p.sets.generation
        if peer.startswith("/"):
            target = await trio.to_thread.run_sync(svc.peer, peer)
            base, name = {"kind": "local", "site": str(target.path)}, target.path.name
        else:
            if group is None:  # the group it followed the old primary in
                group = ((svc.recovery.last_failover() or {}).get("primary") or {}).get("group")
            base, name = await svc.replicate._remote(peer, group), peer
        d = p.dest(name)
        if d is not None and d.get("resync") and d["state"] in ("initial-copy", "replicating"):
            return self._answer(name, d, already=True)
        # (a remote one: with this site's address and group, which the old primary records
        # so that a later failover or switchover there can reach this site)
        me = dict(base.get("me") or {"uuid": svc.core.sb.uuid.hex(),
                                     "site": str(svc.site.path)})
        nblocks = svc.layer.nblocks
        client = make_client(svc, base)
        try:
            info = await self._call(client.info, peer)
            if info.get("volume_blocks") != nblocks:
                raise ResyncError(f"{peer} has a volume of {info.get('volume_blocks')} blocks, "
                                  f"this site {nblocks}: it is not an old copy of this site")
            resume = bool(d is not None and d.get("state") == "resync-attach"
                          and d.get("resync"))
            theirs_now = info.get("primary") or {}
            attached = (resume and info.get("role") == "secondary"
                        and info.get("generation") == gen
                        and (theirs_now.get("uuid"), theirs_now.get("site")) ==
                        (me["uuid"], me["site"]))  # (its answer to the attach was lost)
            if info.get("generation", 0) >= gen and not attached:
                raise ResyncError(f"{peer} is at generation {info.get('generation')}, not older "
                                  f"than this site's {gen}: nothing to resync")
            marker = (await trio.to_thread.run_sync(self._marker, name)) if resume else None
            stored = marker is not None and marker.get("stamp") == d.get("stamp")
            if dry_run and (stored or attached):
                raise ResyncError(f"a resync of {peer} is under way (its blocks are chosen: "
                                  f"{await trio.to_thread.run_sync(self._bits_count, name)}); "
                                  f"run resync without --dry-run to go on")
            why = None
            doc = {}
            if not stored:
                if attached:
                    raise ResyncError(f"{peer} follows this site already but the blocks to "
                                      f"send were not kept; resync it with a full copy: "
                                      f"replicate start --to {peer} --force")
                if info.get("uuid") != svc.core.sb.uuid.hex():
                    why = f"{peer} holds another volume (uuid {info.get('uuid')})"
                elif info.get("role") != "primary":
                    theirs = (info.get("primary") or {}).get("site")
                    why = (f"{peer} is a {info.get('role')}" + (f" of {theirs}" if theirs
                                                                else "") +
                           ", not an old primary: it has no history of its own to resync "
                           "from")
                else:
                    doc = await self._blocklist(client, peer, after, gen, me, dry_run)
                    if not doc.get("history"):
                        why = f"{peer} cannot tell what it changed: {doc.get('why')}"
            if why is None and not stored:
                theirs, hashes = doc["theirs"], doc["hashes"]
                ours, why_ours = await trio.to_thread.run_sync(self._own_since, after,
                                                               svc.sets.last_cut)
                if ours is None:
                    why = why_ours
            if why is not None:
                return await self._full_copy(peer, name, group, why, dry_run, base)
            if dry_run:
                ours.merge(svc.clog.new)
                cand = await trio.to_thread.run_sync(
                    self._union, theirs, hashes, PagedBits(), svc.layer.read)
                differ = await self._differing(client, peer, cand, svc.layer.read, gen, me)
                both = PagedBits()
                both.merge(differ)
                both.merge(ours)
                n = both.count()
                paths = await self._paths_of(client, peer, differ, gen, me)
                return {"dry_run": True, "peer": peer, "full_copy": False,
                        "restart_delta_set": after, "generation": gen,
                        "old_primary_changed_blocks": differ.count(),
                        "old_primary_marked_blocks": theirs.count(),
                        "new_primary_changed_blocks": ours.count(),
                        "blocks": n, "bytes_at_most": n * 4096,
                        "discarded_paths": paths}
            async with p.dest_lock(name):
                await p.stop_senders(name)
                if not resume:  # the intermediate point: a cut and its snapshot
                    await trio.to_thread.run_sync(self.forget, name)  # (an older resync's)
                    await svc.replicate._start_copy(
                        p, name, base, extra={"state": "resync-attach",
                                              "resync": {"after": after}}, start=False)
                d = p.dest(name)
                if not stored:  # (compared with the intermediate point's snapshot)
                    snap = svc.store.find(d["snapshot"])

                    def read(s, c):
                        return svc.layer.read_snapshot(snap, s, c)
                    cand = await trio.to_thread.run_sync(self._union, theirs, hashes,
                                                         PagedBits(), read)
                    differ = await self._differing(client, peer, cand, read, gen, me)
                    await trio.to_thread.run_sync(self._store_union, name, differ, after, d)
                marker = await trio.to_thread.run_sync(self._marker, name)
                total = await trio.to_thread.run_sync(self._bits_count, name)
                log.info("resync of %s: %d blocks differ since delta set %d (restart point); "
                         "the intermediate point is delta set %d", peer, total, after,
                         d["stamp"])
                if not attached:
                    await self._call(lambda: client.request("POST", "/repl/resync", {
                        "step": "attach", "primary": me, "generation": gen,
                        "nblocks": nblocks, "by": me["site"], "after": after,
                        "keep": bool(marker.get("differ", 1))}), peer)
                d = p.dest(name)
                d.update(state="initial-copy", resync={"after": after, "blocks": total})
                p.put_dest(d)
                p.start_sender(svc.nursery, name)
            return self._answer(name, d)
        finally:
            client.close()

    async def _blocklist(self, client, peer: str, after: int, gen: int, me: dict,
                         dry_run: bool) -> dict:
        """The old primary's block list and granule hashes, asked a part at a time (each
        answer fits an RCP control answer); {"history": False, "why"} when it cannot tell."""
        theirs, digests, first, g = PagedBits(), bytearray(), 0, None
        nblocks = self.svc.layer.nblocks
        for _ in range(-(-nblocks // PAGE_BITS) + 1):
            doc = await self._call(lambda: client.request("POST", "/repl/resync", {
                "step": "blocklist", "after": after, "generation": gen, "by": me["site"],
                "dry_run": dry_run, "first_page": first}), peer)
            if not doc.get("history"):
                return doc
            try:
                part = await trio.to_thread.run_sync(unpack_bits, doc.get("bits"), nblocks)
                gran, h = _hashes(doc, part)
                if g is not None and gran != g or any(p < first or p in theirs.pages
                                                      for p in part.pages):
                    raise ValueError("a part of its block list out of place")
            except ValueError as e:
                raise ResyncError(f"{peer} sent {e}") from None
            g = gran
            theirs.pages.update(part.pages)
            digests += h
            nxt = doc.get("next_page")
            if nxt is None:
                return {"history": True, "theirs": theirs, "hashes": (g, bytes(digests))}
            if not isinstance(nxt, int) or nxt <= first:
                raise ResyncError(f"{peer} sent a bad next page {nxt!r}")
            first = nxt
        raise ResyncError(f"{peer} sent its block list in too many parts")

    async def _paths_of(self, client, peer: str, bits: PagedBits, gen: int,
                        me: dict) -> list[str]:
        """The old primary's files that own `bits` (a dry run), asked a few pages at a time
        (each request fits an RCP control message)."""
        out: set[str] = set()
        pages = sorted(bits.pages)
        for i in range(0, len(pages), 8):
            part = PagedBits()
            for p in pages[i:i + 8]:
                part.pages[p] = bits.pages[p]
            doc = await self._call(lambda: client.request("POST", "/repl/resync", {
                "step": "paths", "bits": pack_bits(part), "generation": gen,
                "by": me["site"]}), peer)
            out.update(x for x in doc.get("paths") or [] if isinstance(x, str))
        return sorted(out)[:MAX_PATHS]

    async def _call(self, fn, peer: str):
        return await call_peer(fn, peer, ResyncError)

    async def _full_copy(self, peer, name, group, why: str, dry_run: bool, base) -> dict:
        svc = self.svc
        warning = (f"WARNING: {why}; the resync of {peer} is a FULL COPY of every block in "
                   f"use (its content is replaced)")
        if dry_run:
            st = svc.core.statfs()
            return {"dry_run": True, "peer": peer, "full_copy": True, "warning": warning,
                    "bytes_at_most": (st["f_blocks"] - st["f_bfree"]) * 4096}
        log.warning("%s", warning)
        local = base["kind"] == "local"
        out = await svc.replicate.start(base["site"] if local else peer, force=True, name=name,
                                        group=None if local else group)
        d = svc.primary.dest(out.get("destination", name))
        if d is not None:  # (status: "full copy N% (warning: history lost: ...)")
            d["history_lost"] = why
            await trio.to_thread.run_sync(svc.primary.put_dest, d)
        return {**out, "peer": peer, "full_copy": True, "warning": warning}

    def _own_since(self, after: int, last: int) -> tuple[PagedBits | None, str | None]:
        """This site's changes after `after` up to delta set `last` (its block lists)."""
        sets = self.svc.sets
        bits = PagedBits()
        for n in range(after + 1, last + 1):
            if sets.record(n) is None:
                return None, (f"this site's block list of delta set {n} is gone (kept for "
                              f"the retention period only)")
            bits.merge(sets.block_list(n))
        return bits, None

    def _key(self, name: str, page: int) -> bytes:
        return name.encode() + b"\0" + K.u32(page)

    def _union(self, theirs: PagedBits, hashes: tuple[int, bytes], ours: PagedBits,
               read) -> PagedBits:
        """The old primary's changed blocks whose granule does not already hold what `read`
        (the new primary at the intermediate point) returns, and every block this site
        changed. (`_differing` then narrows the granules to their differing blocks.)"""
        g, digests = hashes
        out = PagedBits()
        for i, (s, c) in enumerate(granules(theirs, g)):
            if xxhash.xxh3_128_digest(read(s, c)) != digests[16 * i: 16 * i + 16]:
                out.set_range(s, c)
        out.merge(ours)
        return out

    async def _differing(self, client, peer: str, cand: PagedBits, read, gen: int,
                         me: dict) -> PagedBits:
        """Of the blocks of the old primary's differing granules (`cand`), those whose own
        content differs from what `read` returns: their hashes asked of it, BLOCK_HASHES at
        a time. A granule of 16 blocks is sent whole otherwise, for one block written in it
        (scattered 4 KiB writes sent 12x the changed blocks: the benchmark, helper-55)."""
        out = PagedBits()
        part, n = PagedBits(), 0

        async def ask():
            doc = await self._call(lambda: client.request("POST", "/repl/resync", {
                "step": "blockhashes", "bits": pack_bits(part), "generation": gen,
                "by": me["site"]}), peer)
            try:
                theirs = base64.b64decode(doc.get("hashes") or "", validate=True)
            except ValueError:
                raise ResyncError(f"{peer} sent block hashes that do not decode") from None
            blocks = [b for p in sorted(part.pages) for b in part.page_blocks(p).tolist()]
            if len(theirs) != 16 * len(blocks):
                raise ResyncError(f"{peer} sent block hashes that do not match the blocks")

            def compare():
                for i, b in enumerate(blocks):
                    if xxhash.xxh3_128_digest(read(b, 1)) != theirs[16 * i: 16 * i + 16]:
                        out.set_range(b, 1)
            await trio.to_thread.run_sync(compare)

        for page in sorted(cand.pages):
            blocks = cand.page_blocks(page)
            for k in range(0, len(blocks), BLOCK_HASHES):
                chunk = blocks[k:k + BLOCK_HASHES]
                if n + len(chunk) > BLOCK_HASHES:
                    await ask()
                    part, n = PagedBits(), 0
                for _, s, c in runs(chunk):
                    part.set_range(int(s), int(c))
                n += len(chunk)
        if n:
            await ask()
        return out

    def _store_union(self, name: str, differ: PagedBits, after: int, d: dict) -> None:
        ours, why = self._own_since(after, d["stamp"])
        if ours is None:
            raise ResyncError(why)
        both = PagedBits()
        both.merge(differ)
        both.merge(ours)
        with self.env.begin(write=True, db=self.db_bits) as txn:
            self._drop(txn, name)
            for page, arr in both.pages.items():
                txn.put(self._key(name, page), arr.tobytes())
            # (stored whole, for this intermediate point)
            txn.put(name.encode() + b"\0", json.dumps({"stamp": d["stamp"], "after": after,
                                                        "differ": differ.count()}).encode())

    def _drop(self, txn, name: str) -> None:
        prefix = name.encode() + b"\0"
        cur = txn.cursor()
        if cur.set_range(prefix):
            while cur.key().startswith(prefix):
                if not cur.delete():
                    break

    def _marker(self, name: str) -> dict | None:
        """The stored union's record: the intermediate point it was made for (`stamp`) and
        how many of the old primary's blocks differ (`differ`); None: none stored whole."""
        with self.env.begin(db=self.db_bits) as txn:
            raw = txn.get(name.encode() + b"\0")
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def mask(self, name: str) -> dict[int, np.ndarray]:
        """page -> the blocks of destination `name`'s resync (unpacked bools): what its
        copy sends (sender.Primary._initial_copy)."""
        prefix = name.encode() + b"\0"
        out = {}
        with self.env.begin(db=self.db_bits) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for key, val in cur:
                    if not key.startswith(prefix):
                        break
                    if len(key) == len(prefix) + 4:
                        page = int.from_bytes(key[len(prefix):], "big")
                        out[page] = np.unpackbits(np.frombuffer(val, np.uint8),
                                                  bitorder="little").astype(bool)
        return out

    def _bits_count(self, name: str) -> int:
        return int(sum(int(a.sum()) for a in self.mask(name).values()))

    def forget(self, name: str) -> None:
        """The copy is done: its block list goes."""
        with self.env.begin(write=True, db=self.db_bits) as txn:
            self._drop(txn, name)

    def _answer(self, name: str, d: dict, already: bool = False) -> dict:
        return {"destination": name, "site": d.get("site"), "state": d["state"],
                "stamp": d.get("stamp"), "restart_delta_set": (d.get("resync") or {}).get(
                    "after"), "blocks": (d.get("resync") or {}).get("blocks"),
                "full_copy": False, "already": already}
