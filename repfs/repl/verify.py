"""`repfs-admin verify --to DEST`: compare a primary and one of its secondaries block by
block at the same delta-set boundary, by a tree of range hashes, without copying the volume.

**The boundary.** A secondary that has played delta set N holds the primary's volume at
boundary N. The primary cuts a delta set N for the verify and, at the same consistency point
(one quiesce: the volume durable, the redo log empty), takes an internal snapshot
``repl-verify-N`` (purpose "verify", hidden from `snapshot list`) of the whole volume. A
delta set's own pin (``repl-ds-N``) cannot serve: it keeps only its delta set's blocks, and a
read of any other block through it sees later writes. Before the cut (under the cut lock, so
no other cut comes first) the secondary is asked to *hold* its playback after N (`hold`): it
plays N and nothing after it while the verify runs, so its volume stays at boundary N. The
hold lapses by itself HOLD_SECONDS after the primary's last request (a primary that dies
mid-verify does not stop playback for good); every hash request renews it, `release` ends it.
The primary then waits until the destination has played N (at most `wait` seconds).

**What is compared.** Blocks in use on either side. A block free on both sides is not
compared: free blocks are never copied by the initial copy (valid blocks only), and a
secondary writes the blocks of delta sets it has received but not yet played straight into
blocks free at its played boundary (repl/receiver.py, direct writes), so its free blocks hold
other content legitimately. Each side decides "in use" by its own block bitmap (the primary's
at boundary N, through the snapshot; the secondary's live one), and the bitmap's bits are
hashed with the blocks: the bitmap blocks and everything below `data_start` are in use on
both sides, so a block in use on one side only shows as a differing bitmap block and as
itself.

**The tree.** The volume is cut into FANOUT ranges of at most TOP_RANGE blocks; each side
hashes each range (xxh3-128 over the range's in-use bits and its in-use blocks, read in runs
of READ_BLOCKS). Only ranges whose hashes differ are descended: a range of more than LEAF
blocks is cut into FANOUT sub-ranges, one of at most LEAF blocks into single blocks. An
identical secondary costs one read of each side's in-use blocks and ~FANOUT hashes on the
wire; a difference costs log_FANOUT(volume) rounds of at most FANOUT hashes per differing
range. A request carries at most MAX_RANGES ranges and MAX_REQUEST_BLOCKS blocks (its answer
comes within the transport's timeout and fits an RCP control body). More than
MAX_DIFF_RANGES differing ranges at one level stop the descent: the ranges are reported
whole (`truncated`).

**The files that own them.** The differing blocks are looked up in the primary's file system
at boundary N (read-only, through the snapshot): each file's and directory's data, indirect
and xattr blocks (the walk snapshot diff uses, repfs/snap/diff.py), the inode-table block of
each inode, and the fixed areas (superblock, bitmaps).

**Repair** (`--repair`). The differing blocks are marked in the change log
(`ChangeLogLayer.mark`), as if they had been written; a delta set is cut at once and ships
them with their content at its boundary, and the primary waits until the destination has
played it, then verifies again at a new boundary. This is the ordinary path of delta sets
(checksummed chunks, acknowledgement, playback as one consistent step), so nothing else
needs trusting; the other destinations get the same blocks too, which changes nothing for
them. The files whose blocks were re-sent have the same inode numbers on the secondary
(a block-level copy): it is asked to drop its kernel's cache of them (`invalidate`), since
playback drops the cache only of inodes whose records changed, and a repair changes data
alone. If the daemon stops between the mark and the cut, the mark is lost (it is not made
durable): the repair did not happen, and a verify says so.

**Transport.** The primary's requests go to the secondary's POST /v1/repl/verify (JSON
{step: hold | hashes | release, at, generation, ...}); over RCP, as a CONTROL message
{op: "verify", args} (rcp/client.py, rcp/server.py). The secondary refuses a request of
another generation (invariant 5) and answers hashes only while it has played exactly N.
"""

from __future__ import annotations

import logging
import stat
import time

import numpy as np
import trio
import xxhash

from .. import pagedbits
from ..errors import DomainError
from ..extents import runs
from ..fs.format import INODES_PER_BLOCK, ROOT_INO

log = logging.getLogger(__name__)

FANOUT = 64  # sub-ranges per differing range (and ranges of the volume at the top)
LEAF = 64  # a differing range of at most this many blocks is compared block by block
TOP_RANGE = 1 << 18  # blocks (1 GiB) at most in a top-level range
READ_BLOCKS = 256  # blocks read at a time
MAX_RANGES = 1024  # ranges per hash request (its answer: ~36 KiB of JSON or msgpack)
MAX_REQUEST_BLOCKS = 1 << 18  # blocks covered by one hash request (read within a timeout)
MAX_DIFF_RANGES = 4096  # differing ranges at one level beyond which the descent stops
MAX_LISTED = 1000  # differing runs listed in the answer
MAX_INVALIDATE = 4096  # inodes whose kernel cache a repair drops at the secondary (the list
#                       fits a 64 KiB JSON body or RCP control body)
HOLD_SECONDS = 300.0  # a secondary's hold lapses this long after the last request
WAIT = 120.0  # default seconds the primary waits for the destination to play a delta set
STEPS = ("hold", "hashes", "release", "invalidate")  # the secondary's part (POST /v1/repl/verify)
VERIFY_PREFIX = "repl-verify-"
PURPOSE = "verify"


class VerifyError(DomainError):
    """A verify cannot be done (or a secondary refuses a verify request)."""

    default_kind = "conflict"


# ----------------------------------------------------------------------------- the tree


def top_ranges(nblocks: int) -> list[tuple[int, int]]:
    """The volume [0, nblocks) as the tree's top level: FANOUT ranges (more for a volume of
    more than FANOUT * TOP_RANGE blocks)."""
    size = min(max(1, -(-nblocks // FANOUT)), TOP_RANGE)
    return [(s, min(size, nblocks - s)) for s in range(0, nblocks, size)]


def split(start: int, count: int) -> list[tuple[int, int]]:
    """A differing range's children: single blocks for at most LEAF blocks, else FANOUT
    sub-ranges."""
    if count <= LEAF:
        return [(start + i, 1) for i in range(count)]
    size = -(-count // FANOUT)
    return [(s, min(size, start + count - s)) for s in range(start, start + count, size)]


def batches(ranges: list[tuple[int, int]]):
    """`ranges` in requests of at most MAX_RANGES ranges and MAX_REQUEST_BLOCKS blocks (a
    range larger than that alone in its request)."""
    out, blocks = [], 0
    for r in ranges:
        if out and (len(out) >= MAX_RANGES or blocks + r[1] > MAX_REQUEST_BLOCKS):
            yield out
            out, blocks = [], 0
        out.append(r)
        blocks += r[1]
    if out:
        yield out


def hash_ranges(read, in_use, ranges) -> list[str]:
    """The hash (hex) of each range: xxh3-128 over, piece by piece (READ_BLOCKS blocks),
    the piece's in-use bits packed and its in-use blocks. `read(start, count)`: blocks;
    `in_use(start, count)`: a bool array."""
    out = []
    for s, c in ranges:
        h = xxhash.xxh3_128()
        pos, end = s, s + c
        while pos < end:
            m = min(READ_BLOCKS, end - pos)
            mask = np.asarray(in_use(pos, m), dtype=bool)
            h.update(np.packbits(mask).tobytes())
            for _, a, k in runs(np.flatnonzero(mask)):
                h.update(read(pos + a, k))
            pos += m
        out.append(h.hexdigest())
    return out


def check_ranges(ranges, nblocks: int) -> list[tuple[int, int]]:
    """A hash request's ranges ((start, count) pairs of integers, as the control port
    checked them) inside a volume of `nblocks` blocks and not too many blocks in all
    (VerifyError "invalid" otherwise)."""
    out, total = [], 0
    for s, c in ranges:
        if s < 0 or c <= 0 or s + c > nblocks:
            raise VerifyError(f"range ({s}, {c}) is not inside this volume ({nblocks} "
                              f"blocks)", "invalid")
        total += c
        out.append((s, c))
    if total > MAX_REQUEST_BLOCKS and len(out) > 1:
        raise VerifyError(f"the ranges cover {total} blocks (at most {MAX_REQUEST_BLOCKS})",
                          "invalid")
    return out


def live_in_use(layer):
    """`in_use(start, count)` from the live block bitmap of `layer` (a SnapLayer), its pages
    read once per call of the function made here."""
    pages: dict[int, np.ndarray] = {}

    def in_use(s: int, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=bool)
        for page, off, at, m in pagedbits.spans(s, n):
            arr = pages.get(page)
            if arr is None:
                arr = pages[page] = pagedbits.unpack(
                    layer.read_live(layer.bitmap_start + page, 1))
            out[at: at + m] = arr[off: off + m]
        return out
    return in_use


# ----------------------------------------------------------------------------- the secondary


class SecondaryVerify:
    """The secondary's side: the playback hold and the hashes of its volume."""

    def __init__(self, secondary):
        self.secondary = secondary
        self.at: int | None = None  # playback holds after this delta set
        self.until = 0.0  # (monotonic) when the hold lapses

    def holds(self, n: int) -> bool:
        """Whether playback must not play delta set `n` now."""
        if self.at is None:
            return False
        if time.monotonic() >= self.until:
            log.info("verify: the hold of playback after delta set %d lapsed (no request "
                     "from the primary for %g s)", self.at, HOLD_SECONDS)
            self.at = None
            return False
        return n > self.at

    async def request(self, step: str, gen: int, *, at: int | None = None,
                      ranges: list | None = None, inodes: list | None = None) -> dict:
        """One step of a verify, for the primary: "hold" (playback holds after delta set
        `at`), "hashes" (of `ranges` of the volume, played exactly to `at`), "release",
        "invalidate" (drop the kernel's cache of `inodes`). The control port checked the
        arguments' types (control.py); `gen` is the primary's generation."""
        sec = self.secondary
        recv = sec.receiver
        if recv.role != "secondary" or recv.state != "replicating":
            raise VerifyError("this site is not a replicating secondary")
        if gen != recv.generation:
            raise VerifyError(f"verify request of generation {gen}: this site is at "
                              f"generation {recv.generation}")
        if step == "release":
            if self.at is not None:
                log.info("verify: playback after delta set %d goes on", self.at)
            self.at = None
            sec.wake.set()
            return {"last_played": recv.last_played}
        if step == "invalidate":  # after a repair: the kernel's cache of the files it fixed
            from ..fs.invalidate import invalidate_all
            await trio.to_thread.run_sync(invalidate_all, [], list(inodes or ()))
            return {"invalidated": len(inodes or ())}
        if at is None:
            raise VerifyError(f"verify step {step!r} needs the delta set (at)", "invalid")
        played = recv.last_played
        if step == "hold":
            if played > at:
                raise VerifyError(f"this site has played delta set {played}, past {at}")
            if self.at != at:
                log.info("verify: playback holds after delta set %d while the primary "
                         "verifies", at)
            self.at, self.until = at, time.monotonic() + HOLD_SECONDS
            return {"last_played": played}
        if step != "hashes":
            raise VerifyError(f"unknown verify step {step!r}", "invalid")
        layer = sec.svc.layer
        ranges = check_ranges(ranges or (), layer.nblocks)
        if played != at:
            raise VerifyError(f"this site has played delta set {played}, not {at}")
        if self.at is not None:
            self.until = time.monotonic() + HOLD_SECONDS
        hashes = await trio.to_thread.run_sync(hash_ranges, layer.read_live,
                                               live_in_use(layer), ranges)
        if recv.last_played != at:  # (a lapsed hold: played on meanwhile)
            raise VerifyError(f"this site played delta set {recv.last_played} while it "
                              f"hashed its volume at {at}; verify again")
        return {"hashes": hashes}


# ----------------------------------------------------------------------------- owners


def _area(sb, b: int) -> str | None:
    if b == 0:
        return "superblock"
    if sb.bbitmap_start <= b < sb.bbitmap_start + sb.bbitmap_blocks:
        return "block bitmap"
    if sb.ibitmap_start <= b < sb.ibitmap_start + sb.ibitmap_blocks:
        return "inode bitmap"
    if sb.itable_start <= b < sb.itable_start + sb.itable_blocks:
        return "inode table"
    return None


def owners(fs, blocks: np.ndarray, inos: set | None = None) -> dict[int, list[str]]:
    """For each of the sorted `blocks`, what owns it in file system `fs` (read-only): the
    paths of the files and directories whose data, indirect or xattr blocks it is, "inode
    of PATH" for an inode-table block, or a fixed area's name; [] for none (not in use in
    `fs`). Walks the whole tree (each inode once): run only when blocks differ. The inode
    numbers of the owners are added to `inos` if given."""
    inos = set() if inos is None else inos
    from ..snap.diff import _Side
    side = _Side(fs)
    sb = fs.sb
    blocks = np.asarray(blocks, dtype=np.int64)
    out: dict[int, list[str]] = {int(b): [] for b in blocks}
    for b in out:
        area = _area(sb, b)
        if area:
            out[b].append(area)
    itable = {int(b) for b in blocks if sb.itable_start <= b < sb.data_start}
    hits: dict[int, list[int]] = {}  # ino -> the differing blocks its content is in
    done: set[int] = set()  # directories whose entries were walked
    stack: list[tuple[str, int]] = [("/", ROOT_INO)]
    while stack:
        path, ino = stack.pop()
        r = side.rec(ino)
        if r is None:
            continue
        iblk = sb.itable_start + ino // INODES_PER_BLOCK
        if iblk in itable:
            out[iblk].append(f"inode of {path}")
            inos.add(ino)
        if ino not in hits:
            try:
                mine = side.blocks(r)
            except Exception as e:  # noqa: BLE001 - a damaged map names what it can
                log.info("verify: the blocks of %s cannot be listed: %s", path, e)
                mine = np.zeros(0, dtype=np.int64)
            hits[ino] = np.intersect1d(mine, blocks).tolist()
        for b in hits[ino]:
            out[b].append(path)  # (each of a file's names)
            inos.add(ino)
        if stat.S_ISDIR(r.mode) and ino not in done:
            done.add(ino)
            for name, (child, _) in sorted(side.entries(ino).items(), reverse=True):
                name = name.decode(errors="surrogateescape")
                stack.append((path.rstrip("/") + "/" + name, child))
    return out


def describe_runs(blocks: np.ndarray, own: dict[int, list[str]]) -> list[dict]:
    """Differing blocks as runs of consecutive blocks with the same owners."""
    out: list[dict] = []
    for b in blocks.tolist():
        who = sorted(set(own.get(b, [])))
        last = out[-1] if out else None
        if last and last["start"] + last["count"] == b and last["owners"] == who:
            last["count"] += 1
        else:
            out.append({"start": b, "count": 1, "owners": who})
    return out


# ----------------------------------------------------------------------------- the primary


class PrimaryVerify:
    """The primary's side: `run(to, repair, wait)` for the control port's POST /v1/verify."""

    def __init__(self, svc):
        self.svc = svc
        self.lock = trio.Lock()  # one verify at a time on a site

    def _dest(self, to: str) -> dict:
        p = self.svc.primary
        d = p.dest(to)
        if d is None:
            found = [x for x in p.dests() if x.get("site") == to]
            d = found[0] if len(found) == 1 else None
        if d is None:
            names = ", ".join(x["name"] for x in p.dests()) or "none"
            raise VerifyError(f"no destination {to!r} (this site replicates to: {names})",
                              "not_found")
        if d["state"] != "replicating":
            raise VerifyError(f"destination {d['name']} is {d['state']}, not replicating: "
                              "nothing to verify")
        return d

    async def run(self, to: str, *, repair: bool = False, wait: float = WAIT) -> dict:
        from .sender import make_client
        svc = self.svc
        if svc.primary is None:
            raise VerifyError("this site is a secondary; run verify on its primary")
        svc.check_writable()
        d = self._dest(to)
        if self.lock.locked():
            raise VerifyError("a verify is running on this site; wait for it", "busy")
        async with self.lock:
            await self._drop_leftovers()
            client = make_client(svc, d)
            try:
                out = await self._once(client, d, wait)
                if repair and not out["in_sync"]:
                    n = await self._repair(client, d, out, wait)
                    again = await self._once(client, d, wait)
                    again["repaired"] = {"blocks": out["differing_blocks"], "delta_set": n,
                                         "before": out}
                    out = again
            finally:
                client.close()
        return out

    async def _drop_leftovers(self) -> None:
        """Delete verify snapshots a daemon that stopped mid-verify left behind."""
        svc = self.svc
        for snap in [s for s in list(svc.store.queue) if s.attrs.get("purpose") == PURPOSE]:
            log.info("deleting %s, left by a verify that did not finish", snap.name)
            await trio.to_thread.run_sync(svc.layer.delete, snap)

    async def _call(self, client, body: dict) -> dict:
        from .transport import TransportError
        try:
            return await trio.to_thread.run_sync(client.request, "POST", "/repl/verify", body)
        except TransportError as e:
            raise VerifyError(f"destination {client.site_path}: {e}") from None

    async def _info(self, client) -> dict:
        from .transport import TransportError
        try:
            return await trio.to_thread.run_sync(client.info)
        except TransportError as e:
            raise VerifyError(f"cannot reach destination {client.site_path}: {e}") from None

    async def _wait_played(self, client, d: dict, n: int, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            info = await self._info(client)
            if info["last_played"] >= n:
                return
            if info.get("state") != "replicating":
                raise VerifyError(f"destination {d['name']} is {info.get('state')}, not "
                                  "replicating")
            now = self.svc.primary.dest(d["name"])
            if now is None or now["state"] != "replicating":
                raise VerifyError(f"destination {d['name']} stopped replicating "
                                  f"({(now or {}).get('error') or (now or {}).get('state')})")
            if time.monotonic() > deadline:
                raise VerifyError(
                    f"destination {d['name']} has not played delta set {n} within {wait:g} s "
                    f"(it has played {info['last_played']}; a slow link or a playback "
                    "policy that waits? --wait SECONDS waits longer)", "busy")
            await trio.sleep(0.2)

    async def _cut_boundary(self, client, gen: int):
        """Cut delta set N and snapshot the volume at its boundary, the destination's
        playback held after N first. Returns (N, snapshot)."""
        svc, p = self.svc, self.svc.primary
        why = p.sets.flow_control()
        if why:
            raise VerifyError(f"flow control: {why}; verify when the destinations have "
                              "caught up", "busy")
        cut = []

        async def release_hold():
            with trio.CancelScope(shield=True):  # (else playback waits for the lapse)
                await self._release(client, gen, "its destination")

        # the hold is asked before the cut lock is taken (a slow or wedged destination
        # must not hold every destination's cuts for its answer's timeout: review of issue
        # 9); a cut that came in between moves N on, and the hold with it
        try:
            for _ in range(5):
                n = p.sets.last_cut + 1
                await self._call(client, {"step": "hold", "at": n, "generation": gen})
                await p.cut_lock.acquire()
                if p.sets.last_cut + 1 == n:
                    break
                p.cut_lock.release()
            else:
                raise VerifyError("delta sets are being cut too often to hold one boundary; "
                                  "try again", "busy")
        except BaseException:
            await release_hold()
            raise
        try:
            await p.ready_unready()  # (makes a delta set ready; last_cut stays n - 1)

            def cut_and_snapshot():
                m = p.sets.cut()  # (the volume is durable: quiesce checkpointed it)
                cut.append(m)
                if m != n:  # (cannot be: no other cut runs under the cut lock)
                    raise VerifyError(f"delta set {m} was cut, not {n}", "failed")
                return svc.store.create(f"{VERIFY_PREFIX}{m}",
                                        {"purpose": PURPOSE, "delta_set": m})
            async with svc.ops.quiesce():
                snap = await trio.to_thread.run_sync(cut_and_snapshot)
        except BaseException:
            await release_hold()
            raise
        finally:
            try:
                if cut:
                    with trio.CancelScope(shield=True):  # (its room, even when cancelled)
                        await trio.to_thread.run_sync(p.sets.reserve, cut[0])
                    p.work.set()
                    p.work = trio.Event()
            finally:
                p.cut_lock.release()
        return n, snap

    async def _release(self, client, gen: int, name: str) -> None:
        """End the destination's hold of playback (if that fails, it lapses by itself)."""
        try:
            with trio.move_on_after(10):
                await self._call(client, {"step": "release", "generation": gen})
        except VerifyError as e:
            log.info("verify: releasing the hold of %s: %s (it lapses by itself)", name, e)

    async def _once(self, client, d: dict, wait: float) -> dict:
        svc, p = self.svc, self.svc.primary
        info = await self._info(client)
        if info.get("state") != "replicating":
            raise VerifyError(f"destination {d['name']} is {info.get('state')}, not "
                              "replicating")
        gen = p.sets.generation
        t0 = time.monotonic()
        n, snap = await self._cut_boundary(client, gen)
        try:
            await self._wait_played(client, d, n, wait)
            result = await self._compare(client, n, gen, snap)
        finally:
            with trio.CancelScope(shield=True):
                await self._release(client, gen, d["name"])
                with trio.move_on_after(60):
                    await trio.to_thread.run_sync(svc.layer.delete, snap)
        result.update(destination=d["name"], delta_set=n,
                      seconds=round(time.monotonic() - t0, 3))
        if result["in_sync"]:
            log.info("verify: %s is in sync at delta set %d (%d ranges hashed)", d["name"],
                     n, result["ranges_hashed"])
        else:
            log.warning("verify: %s differs at delta set %d: %d blocks%s", d["name"], n,
                        result["differing_blocks"],
                        " (at least: too many to list)" if result["truncated"] else "")
        return result

    async def _compare(self, client, n: int, gen: int, snap) -> dict:
        layer = self.svc.layer
        nblocks = layer.nblocks

        def read(s, c):
            return layer.read_snapshot(snap, s, c)

        def in_use(s, c):
            return layer.meta_bits(snap, s, c)

        level = top_ranges(nblocks)
        leaves: list[tuple[int, int]] = []
        hashed = 0
        truncated = False
        while level:
            differ = []
            for batch in batches(level):
                box = {}

                async def hash_mine(batch=batch, box=box):
                    box["mine"] = await trio.to_thread.run_sync(hash_ranges, read, in_use,
                                                                batch)
                async with trio.open_nursery() as nursery:  # (both sides at once)
                    nursery.start_soon(hash_mine)
                    ans = await self._call(client, {"step": "hashes", "at": n,
                                                    "generation": gen,
                                                    "ranges": [list(r) for r in batch]})
                mine = box["mine"]
                theirs = ans.get("hashes")
                if not isinstance(theirs, list) or len(theirs) != len(batch):
                    raise VerifyError(f"destination {client.site_path}: a malformed answer "
                                      "to a hash request")
                hashed += len(batch)
                differ.extend(r for r, a, b in zip(batch, mine, theirs) if a != b)
            if len(differ) > MAX_DIFF_RANGES:
                leaves.extend(differ)
                truncated = True
                break
            level = []
            for s, c in differ:
                if c == 1:
                    leaves.append((s, c))
                else:
                    level.extend(split(s, c))
        total = sum(c for _, c in leaves)
        out = {"in_sync": not leaves, "ranges_hashed": hashed, "differing_blocks": total,
               "truncated": truncated, "differences": [], "files": [],
               "_ranges": sorted(leaves)}  # (for --repair; dropped before the answer)
        if truncated:  # (too many to look up their owners: the ranges, whole)
            out["differences"] = [{"start": s, "count": c, "owners": []}
                                  for s, c in sorted(leaves)[:MAX_LISTED]]
            out["listed_all"] = len(leaves) <= MAX_LISTED
        elif leaves:
            blocks = np.array(sorted(s for s, _ in leaves), dtype=np.int64)
            inos: set[int] = set()
            own = await trio.to_thread.run_sync(self._owners, snap, blocks, inos)
            out["_inodes"] = sorted(inos)[:MAX_INVALIDATE]
            rs = describe_runs(blocks, own)
            out["differences"] = rs[:MAX_LISTED]
            out["listed_all"] = len(rs) <= MAX_LISTED
            out["files"] = sorted({o for r in rs for o in r["owners"] if o.startswith("/")})
        return out

    def _owners(self, snap, blocks, inos):
        from ..fs.core import FileSystem
        from ..snap.layer import SnapshotDevice
        fs = FileSystem(SnapshotDevice(self.svc.layer, snap), None, readonly=True)
        return owners(fs, blocks, inos)

    async def _repair(self, client, d: dict, found: dict, wait: float) -> int:
        """Mark the differing blocks in the change log, cut a delta set that ships them and
        wait until the destination has played it; returns its number."""
        p = self.svc.primary
        ranges = found.pop("_ranges")
        self.svc.clog.mark(ranges)
        n = await p.cut()
        log.info("verify: %d differing blocks re-sent to %s in delta set %d",
                 found["differing_blocks"], d["name"], n)
        await self._wait_played(client, d, n, wait)
        # the inode records of files whose data alone was repaired did not change: the
        # secondary's playback would keep its kernel's cache of their damaged pages
        inos = found.pop("_inodes", [])
        if inos:
            await self._call(client, {"step": "invalidate", "inodes": inos,
                                      "generation": self.svc.primary.sets.generation})
        return n


def answer(out: dict) -> dict:
    """The verify's answer without its internal parts."""
    for doc in (out, (out.get("repaired") or {}).get("before") or {}):
        doc.pop("_ranges", None)
        doc.pop("_inodes", None)
    return out
