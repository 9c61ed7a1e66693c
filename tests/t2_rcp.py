"""Tier 2: replication to a remote destination over RCP, through real daemons on 127.0.0.1.

Each site is mounted with `--listen 127.0.0.1:PORT` (its one port serves HTTP and RCP), both
hold the same replication group (written with GroupStore, as `repfs-admin group add` does),
and the primary replicates with `replicate start --to 127.0.0.1:PORT --group NAME`: the
secondary is reached only through its port, authenticated by the group's secret. The
network-namespace topologies are tests/t3_rcp_netns.py's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from repfs.rcp import wire
from repfs.rcp.client import RcpConnection, RcpReceiverClient
from repfs.repl.chunk import encode_chunk
from repfs.repl.transport import PermanentError, RejectedError
from repfs.rcp.groups import GroupStore
from tests.conftest import run_repfs
from tests.t2_repl import (Workload, admin, api, assert_same_tree, cut, log_tail, start_replication,
                          status, wait_converged)
from tests.t4_repl_crash import kill9

SECRET = b"the-group-secret-of-t2-rcp-0123456789"
GROUP = "g1"


def port_of(site: Path) -> int:
    return json.loads((Path(site) / "control.json").read_text())["port"]


def address(m) -> str:
    return f"127.0.0.1:{port_of(m.site)}"


def remote_pair(mount_site):
    """Two sites listening on 127.0.0.1 that hold group GROUP."""
    m1 = mount_site("256M", "--listen", "127.0.0.1:0", name="s1")
    m2 = mount_site("256M", "--listen", "127.0.0.1:0", name="s2")
    for m in (m1, m2):
        GroupStore(m.site).add(GROUP, SECRET)
    admin(m1.path, "replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    return m1, m2


def receiver(m) -> dict:
    return api(m.site, "GET", "/repl/receiver")


def refusals(m1, m2) -> None:
    """A wrong secret, a group the secondary does not hold, no group, a group the primary
    does not hold: each refused with its reason in the CLI's one-line error (and the
    secondary's log), and nothing changes on either side."""
    GroupStore(m2.site).add("g2", b"not-the-secret-the-primary-has")
    GroupStore(m1.site).add("g2", SECRET)
    GroupStore(m1.site).add("g3", SECRET)  # (the secondary does not hold g3)
    m2.expect_log("refused")
    before = receiver(m2)
    to = address(m2)
    cases = [
        (["--group", "g2"], "does not hold the secret of group 'g2'",
         "group g2) refused: the peer refused: authentication failed"),
        # (a group the secondary lacks looks to the primary as a wrong secret does: the
        # secondary does not tell an unauthenticated peer which groups it holds; its log
        # says which it was)
        (["--group", "g3"], "does not hold the secret of group 'g3'",
         "group g3) refused: unknown replication group 'g3'"),
        ([], "needs --group NAME", None),
        (["--group", "nosuch"], "this site holds no replication group 'nosuch'", None),
    ]
    for args, cli_reason, log_reason in cases:
        r = admin(m1.path, "replicate", "start", "--to", to, *args, check=False)
        assert r.returncode != 0 and cli_reason in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        if log_reason:
            assert log_reason in (m2.site / "repfs.log").read_text(), log_tail(m2.site)
    assert receiver(m2) == before
    st = status(m1.path)
    assert st["destinations"] == [] and not st["replicating"]
    assert not any(s["name"].startswith("repl-init-") for s in st["snapshots"])


def test_remote_replication_refusals_convergence_and_the_shared_port(mount_site):
    m1, m2 = remote_pair(mount_site)
    Workload(m1.path, "rcp-base").run(20)
    refusals(m1, m2)
    assert not any(m2.path.iterdir())  # (nothing reached the secondary)
    d = start_replication(m1, m2, "--group", GROUP, to=address(m2))
    assert (d["name"], d["site"], d["kind"], d["group"]) == (address(m2),) * 2 + ("rcp", GROUP)
    assert receiver(m2)["role"] == "secondary"
    # who connected is in the secondary's log
    log2 = (m2.site / "repfs.log").read_text()
    assert f"site {os.uname().nodename}:{m1.site}, group {GROUP}" in log2
    wl = Workload(m1.path, "rcp")
    for _ in range(2):
        wl.run(30)
        n = cut(m1)
        wait_converged(m1, m2, n)
        assert_same_tree(m1.path, m2.path)

    errors_over_rcp(m1, m2, n)

    # HTTP and RCP on the one port at once: a session open (authenticated, a request
    # answered), HTTP requests answered meanwhile, and the session goes on after them
    s2 = m2.site
    conn = RcpConnection("127.0.0.1", port_of(s2), group=GROUP, secret=SECRET,
                         site="t2_rcp", uuid="0" * 32, timeout=30)
    try:
        conn.send_request("GET", "/v1/repl/receiver", b"", "application/json")
        st, raw = conn.read_answer()
        assert st == 200 and json.loads(raw)["site"] == str(s2)
        done = []

        def http():
            for _ in range(5):
                done.append(api(s2, "GET", "/status")["site"])
        t = threading.Thread(target=http)
        t.start()
        conn.send_request("GET", "/v1/repl/receiver", b"", "application/json")
        t.join(30)
        assert done == [str(s2)] * 5
        st, raw = conn.read_answer()
        assert st == 200 and json.loads(raw)["last_played"] == n
    finally:
        conn.close()
    assert status(m2.path)["security_warning"] is None  # (loopback)
    abuse(m1, m2)
    wait_converged(m1, m2, n)  # (nothing of it applied; the replication goes on)
    assert_same_tree(m1.path, m2.path)


def errors_over_rcp(m1, m2, n: int) -> None:
    """The receiver's refusals reach the primary's client as over HTTP: a damaged chunk is
    rejected (send it again) and the valid one pipelined behind it is refused unapplied; a
    copy record the secondary does not expect is a permanent refusal."""
    gen = receiver(m2)["generation"]
    c = RcpReceiverClient(address(m2), group=GROUP, local=m1.site, uuid="0" * 32,
                          name="t2_rcp")
    try:
        valid = encode_chunk(gen, n + 1, 0, [(1000, 1)], bytes(4096))
        with pytest.raises(RejectedError) as e:
            c.send_chunks([b"garbage" * 100, valid], window=2)
        assert e.value.index == 0 and "rejected chunk" in str(e.value)
        assert receiver(m2)["partial"] is None  # (the valid one behind it: not applied)
        with pytest.raises(PermanentError) as e:
            c.send_copies([(gen, 0, bytes(4096))])
        assert "not expecting an initial copy" in str(e.value)
    finally:
        c.close()
    assert receiver(m2)["last_received"] == n


def abuse(m1, m2) -> None:
    """What breaks the protocol closes the connection with an ERROR and a logged reason and
    applies nothing: a large frame before authentication, a damaged frame in a session."""
    m2.expect_log("refused: HELLO of 1048576 bytes")
    m2.expect_log("checksum mismatch")
    before = receiver(m2)
    with socket.create_connection(("127.0.0.1", port_of(m2.site)), timeout=30) as s:
        s.sendall(wire.PREFACE + wire.encode_frame(1, b"", session=0, seq=1)[:4]
                  + (1 << 20).to_bytes(4, "big") + bytes(20))  # (a HELLO of 1 MiB)
        answer = _read_all(s)
    assert answer[:1] == bytes([wire.BY_NAME["ERROR"].code]) and b"1048576" in answer
    conn = RcpConnection("127.0.0.1", port_of(m2.site), group=GROUP, secret=SECRET,
                         site="t2_rcp", uuid="0" * 32, timeout=30)
    try:
        # a chunk, then one with a bit flipped in its body, in one write: the receiver
        # gathers both for one hand-off and stops at the damaged one (review of 75d024f:
        # answering the first on the closed session raised, and a traceback was logged)
        first = conn.conn.send("CHUNK", b"y" * 5000)
        frame = bytearray(conn.conn.send("CHUNK", b"x" * 5000))
        frame[-1] ^= 1
        conn.sock.sendall(first + frame)
        assert b"checksum mismatch" in _read_all(conn.sock)
    finally:
        conn.sock.close()
    assert receiver(m2) == before


def _read_all(s) -> bytes:
    out = b""
    while data := s.recv(65536):
        out += data
    return out


class SiteProxy:
    """A TCP proxy to a site's port (looked up at each connection: it follows a remount).
    Each connection gets `connected(client, upstream)`: by default a `_pump` thread each way
    (up: what the client sends). Subclasses set their state, then call this __init__."""

    def __init__(self, site: Path):
        self.site = site
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", port_of(self.site)), timeout=5)
                u.settimeout(None)
            except (OSError, ValueError):  # (the site is down or being remounted)
                c.close()
                continue
            self.connected(c, u)

    def connected(self, c, u) -> None:
        for a, b, up in ((c, u, True), (u, c, False)):
            threading.Thread(target=self._pump, args=(a, b, up), daemon=True).start()

    def _pump(self, a, b, up: bool) -> None:
        raise NotImplementedError

    @staticmethod
    def shut(*socks) -> None:
        for x in socks:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            x.close()

    def close(self) -> None:
        self.lsock.close()


class HoldingProxy(SiteProxy):
    """A proxy that stops forwarding what the primary sends once `limit` bytes have passed,
    until `release()`: a transfer held in the middle, for as long as the test needs."""

    def __init__(self, site: Path):
        self.limit: int | None = None
        self.passed = 0
        self.cond = threading.Condition()
        super().__init__(site)

    def _pump(self, a, b, up: bool) -> None:
        try:
            while data := a.recv(1 << 16):
                if up:
                    with self.cond:
                        self.cond.wait_for(lambda: self.limit is None
                                           or self.passed < self.limit)
                        self.passed += len(data)
                b.sendall(data)
        except OSError:
            pass
        finally:
            self.shut(a, b)

    def hold_after(self, nbytes: int) -> None:
        with self.cond:
            self.limit = self.passed + nbytes

    def release(self) -> None:
        with self.cond:
            self.limit = None
            self.cond.notify_all()

    def close(self) -> None:
        self.release()
        super().close()


def test_kill9_of_the_secondary_mid_transfer_resumes(mount_site):
    m1, m2 = remote_pair(mount_site)
    proxy = HoldingProxy(m2.site)
    try:
        start_replication(m1, m2, "--group", GROUP, to=proxy.address)
        big = os.urandom(1 << 20)
        with open(m1.path / "big", "wb") as f:
            for i in range(16):
                f.write(big[i:] + big[:i])
        proxy.hold_after(5 << 20)  # a few of the delta set's chunks pass, then it stalls
        n = cut(m1)
        deadline = time.monotonic() + 30
        while not ((receiver(m2).get("partial") or {}).get("chunks", 0) >= 2):
            assert time.monotonic() < deadline, receiver(m2)
            time.sleep(0.05)
        assert receiver(m2)["last_received"] < n  # (held mid-transfer)
        kill9(m2.site)
        subprocess.run(["fusermount3", "-u", "-z", str(m2.path)], check=False,
                       capture_output=True)
        while os.path.ismount(m2.path):
            time.sleep(0.05)
        proxy.release()
        run_repfs("mount", m2.site, m2.path, "--listen", "127.0.0.1:0")
        wait_converged(m1, m2, n, timeout=60)
        assert_same_tree(m1.path, m2.path)
        (m1.path / "after").write_bytes(b"y" * 5000)
        wait_converged(m1, m2, cut(m1))
        assert_same_tree(m1.path, m2.path)
        d = status(m1.path)["destinations"][0]
        assert d["state"] == "replicating" and d.get("error") is None
    finally:
        proxy.close()
