"""Tier 3: faults on the RCP wire between real daemons on 127.0.0.1 (issue 9, item 6).

The primary replicates to a TamperProxy, a threaded TCP proxy in the test that forwards to
the secondary's shared port frame by frame: it can flip one bit of a chosen frame once (a bit
flipped on the wire), hold what the primary sends mid-transfer, and records what each
connection sent first (its handshake, to replay it). What each case shows:

* a bit flipped in a CHUNK's body and in a COMMIT's header: the secondary refuses the frame
  (its check), logs why and closes the session; nothing damaged is applied; the primary
  reconnects (one new session per flip: no retry storm) and resends; the trees converge;
* a recorded handshake (preface, HELLO, AUTH) replayed on a new connection is refused (the
  server's nonce is new), logged, and changes nothing; the daemon goes on serving;
* HTTP and RCP on one port at once: status requests answered while a delta set's session is
  held mid-transfer and while it streams on;
* a stale generation: a secondary that knows a newer generation than its primary refuses its
  delta chunks and a new attach, logs why, and changes nothing;
* kill -9 of the primary mid-transfer: after its remount the transfer resumes from what the
  secondary reports; the secondary's last_received/last_played step one at a time.

t2_rcp.py covers refusals of the handshake (wrong secret, unknown group), a damaged frame
crafted by the test, and kill -9 of the secondary; t0_rcp_wire.py the protocol itself.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from repfs.rcp import wire
from repfs.rcp.client import RcpConnection
from repfs.repl import keys as RK
from repfs.repl.chunk import encode_chunk
from tests.conftest import run_repfs
from tests.t2_rcp import GROUP, SECRET, HoldingProxy, port_of, receiver, remote_pair
from tests.t2_repl import (ADMIN, api, assert_same_tree, cut, log_tail, start_replication,
                          status, tree, wait_converged)
from tests.t4_repl_crash import kill9

CODE = {t.name: t.code for t in wire.TYPES_LIST}
NAME = {t.code: t.name for t in wire.TYPES_LIST}


class TamperProxy(HoldingProxy):
    """A proxy (tests/t2_rcp.py) that parses what the client sends into RCP frames and
    forwards a whole frame at a time, so the test can flip a bit of one frame (`flip_once`)
    and hold the stream (`hold_after`); the first frames of each connection are kept
    (`conns`: a list, per connection, of the preface and frames as sent). Answers are
    forwarded as they come."""

    def __init__(self, site: Path):
        self.conns: list[list[bytes]] = []
        self.flip: tuple[str, int, int] | None = None  # (frame type, byte offset, bit)
        self.flipped: list[tuple[str, int]] = []  # (frame type, offset) flipped so far
        super().__init__(site)  # (limit, passed, cond: HoldingProxy's)

    @property
    def sessions(self) -> int:
        with self.cond:
            return len(self.conns)

    def flip_once(self, frame_type: str, offset: int, bit: int = 0) -> None:
        """Flip bit `bit` of byte `offset` (from the frame's first header byte) of the next
        frame of `frame_type` the client sends."""
        with self.cond:
            self.flip = (frame_type, offset, bit)

    def connected(self, c, u) -> None:
        with self.cond:
            kept: list[bytes] = []
            self.conns.append(kept)
        threading.Thread(target=self._up, args=(c, u, kept), daemon=True).start()
        threading.Thread(target=self._down, args=(u, c), daemon=True).start()

    def _frames(self, a):
        """The client's preface, then its frames, each whole (a short tail at EOF last)."""
        buf = bytearray()

        def fill(n: int) -> bool:
            while len(buf) < n:
                data = a.recv(1 << 16)
                if not data:
                    return False
                buf.extend(data)
            return True
        need = len(wire.PREFACE)
        while fill(need):
            yield bytes(buf[:need])
            del buf[:need]
            if not fill(wire.HEADER.size):
                break
            need = wire.HEADER.size + wire.HEADER.unpack_from(buf)[3]
        if buf:
            yield bytes(buf)

    def _up(self, a, b, kept: list[bytes]) -> None:
        try:
            for frame in self._frames(a):
                with self.cond:
                    self.cond.wait_for(lambda: self.limit is None or self.passed < self.limit)
                    if len(kept) < 8:
                        kept.append(frame)
                    f = self.flip
                    if (f and len(frame) > f[1] and len(frame) >= wire.HEADER.size
                            and frame[0] == CODE[f[0]] and not frame.startswith(wire.PREFACE)):
                        frame = bytearray(frame)
                        frame[f[1]] ^= 1 << f[2]
                        self.flip = None
                        self.flipped.append((f[0], f[1]))
                    self.passed += len(frame)
                b.sendall(frame)
        except OSError:
            pass
        finally:
            self.shut(a, b)

    def _down(self, a, b) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            self.shut(a, b)


def _read_all(s) -> bytes:
    out = b""
    while data := s.recv(65536):
        out += data
    return out


def write_big(root: Path, name: str, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(root / name, "wb") as f:
        for i in range(mib):
            f.write(block[i:] + block[:i])


def proxied_pair(mount_site):
    """A primary replicating to a secondary through a TamperProxy (initial copy done)."""
    m1, m2 = remote_pair(mount_site)
    proxy = TamperProxy(m2.site)
    (m1.path / "base").write_bytes(os.urandom(300_000))
    start_replication(m1, m2, "--group", GROUP, to=proxy.address)
    return m1, m2, proxy


def count(site: Path, needle: str) -> int:
    return (site / "repfs.log").read_text().count(needle)


def opened(site: Path) -> int:
    """RCP sessions the site's log says it opened."""
    return sum(1 for ln in (site / "repfs.log").read_text().splitlines()
               if "repfs.rcp.server: RCP session " in ln and ": site " in ln)


def wait_for(what, pred, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return got


def test_flipped_bits_replayed_handshake_and_http_beside_rcp(mount_site):
    m1, m2, proxy = proxied_pair(mount_site)
    m2.expect_log("checksum mismatch (damaged on the wire)")
    m2.expect_log("authentication failed for group")
    try:
        # 1. one bit flipped in a CHUNK's body (past its header and the chunk's own header),
        # then one in a COMMIT's header (its sequence number): each refused by the frame's
        # check, the session closed, the primary opens one new session and resends
        for kind, offset in (("CHUNK", wire.HEADER.size + 5000), ("COMMIT", 19)):
            before, logged = proxy.sessions, opened(m2.site)
            write_big(m1.path, f"flip-{kind}", 1)
            proxy.flip_once(kind, offset, bit=3)
            n = cut(m1)
            wait_converged(m1, m2, n)
            assert proxy.flipped[-1] == (kind, offset)
            assert_same_tree(m1.path, m2.path)
            log2 = (m2.site / "repfs.log").read_text()
            assert f"refused: {kind} frame" in log2 and "checksum mismatch" in log2, \
                log_tail(m2.site)
            # no retry storm: the one broken session is replaced by one new one (the primary
            # logs the secondary's reason once, "(retrying)": counted at the proxy and in
            # the secondary's log)
            assert proxy.sessions - before == 1, (proxy.sessions, before)
            assert opened(m2.site) - logged == 1, log_tail(m2.site)
        assert count(m2.site, "checksum mismatch (damaged on the wire)") == 2
        d = status(m1.path)["destinations"][0]
        assert d["state"] == "replicating" and d.get("error") is None, d

        # 2. a real handshake (preface, HELLO, AUTH as the primary sent them) replayed on a new
        # connection: the server's nonce is new, so the old proof fails
        hs = proxy.conns[-1]
        assert hs[0] == wire.PREFACE and [NAME[f[0]] for f in hs[1:3]] == ["HELLO", "AUTH"]
        before = receiver(m2)
        with socket.create_connection(("127.0.0.1", port_of(m2.site)), timeout=30) as s:
            s.sendall(b"".join(hs[:3]))
            answer = _read_all(s)
        assert b"authentication failed" in answer
        assert NAME[answer[wire.HEADER.size + wire.HEADER.unpack_from(answer)[3]]] == "ERROR"
        assert count(m2.site, "authentication failed for group") == 1
        assert receiver(m2) == before

        # 3. HTTP and RCP on one port at once: status requests on the secondary's port while
        # a delta set's session is held mid-transfer, and while it streams on after
        write_big(m1.path, "shared-port", 4)
        proxy.hold_after(3 << 19)
        n = cut(m1)
        wait_for("a transfer held mid-way",
                 lambda: (receiver(m2).get("partial") or {}).get("chunks", 0) >= 1)
        assert receiver(m2)["last_received"] < n
        held = [api(m2.site, "GET", "/status")["last_received_delta_set"] for _ in range(5)]
        assert held == [n - 1] * 5  # (answered while the session is open, mid-transfer)
        answers, errors, stop = [], [], threading.Event()

        def poll():
            while not stop.is_set():
                try:
                    answers.append(api(m2.site, "GET", "/status")["last_played_delta_set"])
                except Exception as e:  # noqa: BLE001 - reported by the test
                    errors.append(repr(e))
        t = threading.Thread(target=poll)
        t.start()
        try:
            proxy.release()
            wait_converged(m1, m2, n)
            wait_for("HTTP answers beside the session", lambda: len(answers) >= 3 or errors)
        finally:
            stop.set()
            t.join(30)
        assert not errors and answers, errors
        assert answers == sorted(answers) and answers[-1] in (n - 1, n)
        assert_same_tree(m1.path, m2.path)
        d = status(m1.path)["destinations"][0]
        assert d["state"] == "replicating" and d.get("error") is None, d
    finally:
        proxy.close()


def set_generation(site: Path, generation: int) -> None:
    """Write a stopped site's replication generation (replctx "generation") directly."""
    import lmdb
    env = lmdb.open(str(site / "meta.lmdb"), map_size=1 << 40, max_dbs=32, subdir=True)
    try:
        db = env.open_db(RK.CTX)
        with env.begin(write=True, db=db) as txn:
            txn.put(b"generation", RK.u64(generation))
    finally:
        env.close()


def test_kill9_of_the_primary_mid_transfer_then_a_stale_generation(mount_site):
    """kill -9 of the primary while a delta set is held mid-transfer: it resumes from what
    the secondary reports and nothing is received or played twice. Then the secondary learns
    of a newer generation than its primary's (as after a failover elsewhere, written into the
    stopped site's LMDB): the primary learns it at its next look and fences itself (EROFS,
    its status says why); delta chunks and an ATTACH claiming the old generation are refused
    with the reason, and the secondary's state and tree stay as they were."""
    m1, m2, proxy = proxied_pair(mount_site)
    try:
        resume_after_kill9(m1, m2, proxy)
        stale_generation(m1, m2)
    finally:
        proxy.close()


def resume_after_kill9(m1, m2, proxy) -> None:
    history: list[tuple[int, int]] = []
    errors, stop = [], threading.Event()

    def sample():  # the secondary's (last_received, last_played), each change
        while not stop.is_set():
            try:
                r = receiver(m2)
            except Exception as e:  # noqa: BLE001 - reported by the test
                errors.append(repr(e))
                return
            x = (r["last_received"], r["last_played"])
            if not history or history[-1] != x:
                history.append(x)
            time.sleep(0.01)
    t = threading.Thread(target=sample)
    t.start()
    try:
        write_big(m1.path, "big", 6)
        proxy.hold_after(3 << 20)
        n = cut(m1)
        wait_for("a transfer held mid-way",
                 lambda: (receiver(m2).get("partial") or {}).get("chunks", 0) >= 2)
        assert receiver(m2)["last_received"] == n - 1
        kill9(m1.site)
        proxy.release()
        subprocess.run(["fusermount3", "-u", "-z", str(m1.path)], check=False,
                       capture_output=True)
        wait_for("the dead mount gone", lambda: not os.path.ismount(m1.path))
        partial = receiver(m2)["partial"]
        assert partial and partial["delta_set"] == n and partial["chunks"] >= 2, partial
        before = proxy.sessions
        run_repfs("mount", m1.site, m1.path, "--listen", "127.0.0.1:0")
        wait_converged(m1, m2, n)
        assert proxy.sessions - before == 1  # (resumed in one new session: no retry storm)
        assert_same_tree(m1.path, m2.path)
    finally:
        stop.set()
        t.join(30)
        proxy.release()
    assert not errors, errors
    # nothing received or played twice, nothing skipped: each step moves one of the two
    # numbers on by one, and the secondary never plays what it has not received
    for (r0, p0), (r1, p1) in zip(history, history[1:]):
        assert (r1 - r0, p1 - p0) in ((1, 0), (0, 1), (1, 1)), history
        assert p1 <= r1, history
    assert history[-1] == (n, n), history


def stale_generation(m1, m2) -> None:
    gen = receiver(m2)["generation"]
    assert api(m1.site, "GET", "/repl/receiver")["generation"] == gen
    run_repfs("umount", m2.path)
    set_generation(m2.site, gen + 1)
    run_repfs("mount", m2.site, m2.path, "--listen", "127.0.0.1:0")
    before, shown = receiver(m2), tree(m2.path)
    assert before["generation"] == gen + 1
    # the primary's send task reads the newer generation in the secondary's state before it
    # sends anything: a stale primary, it fences itself (invariant 5, recovery/failover.py):
    # it sends nothing, its writers get EROFS, its log and status say why
    newer = f"holds generation {gen + 1}, newer than this site's {gen}"
    m1.expect_log(newer)
    m1.expect_log("fenced:")
    d = wait_for("the destination in error", lambda: next(
        (x for x in api(m1.site, "GET", "/status")["destinations"]
         if x["state"] == "error"), None))
    assert newer in d["error"], d
    st = api(m1.site, "GET", "/status")
    assert st["fenced"] and f"holds generation {gen + 1}" in st["fenced"] and st["readonly"]
    try:
        write_big(m1.path, "stale", 1)
    except OSError as e:
        assert e.errno == errno.EROFS, e
    else:
        raise AssertionError("the fenced primary took a write")
    # delta chunks and an ATTACH from the primary it follows, claiming the older generation,
    # are refused by the secondary with the reason (each on a session of its own)
    why = f"of generation {gen}: this site is at generation {gen + 1}"
    chunk = encode_chunk(gen, before["last_received"] + 1, 0, [(100, 1)], bytes(4096))
    body = {"primary": before["primary"], "generation": gen,
            "nblocks": before["volume_blocks"], "force": False}
    answers = []
    for path, data, ctype in (("/v1/repl/chunk", chunk, "application/octet-stream"),
                              ("/v1/repl/attach", json.dumps(body).encode(),
                               "application/json")):
        conn = RcpConnection("127.0.0.1", port_of(m2.site), group=GROUP, secret=SECRET,
                             site="t3_rcp_faults", uuid="0" * 32, timeout=30)
        try:
            conn.send_request("POST", path, data, ctype)
            answers.append(conn.read_answer())
        finally:
            conn.close()
    (st, raw), (st2, raw2) = answers
    assert st == 409 and f"rejected chunk {why}" in json.loads(raw)["error"], (st, raw)
    assert f"CHUNK refused: rejected chunk {why}" in (m2.site / "repfs.log").read_text(), \
        log_tail(m2.site)
    older = f"the primary's generation {gen} is older than this site's {gen + 1}"
    assert st2 == 409 and older in json.loads(raw2)["error"], (st2, raw2)
    assert f"ATTACH refused: {older}" in (m2.site / "repfs.log").read_text(), log_tail(m2.site)
    assert receiver(m2) == before and tree(m2.path) == shown
    assert not (m2.path / "stale").exists()
    # nor can `replicate start --force` make the stale primary take it (invariant 5)
    r = subprocess.run([ADMIN, "--site", str(m1.path), "replicate", "start", "--to",
                        f"127.0.0.1:{port_of(m2.site)}", "--group", GROUP, "--force"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "stale primary" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert receiver(m2) == before and tree(m2.path) == shown
