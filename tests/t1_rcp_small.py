"""Tier 1: small behaviours of RCP (issue 9's review list), through real daemons on 127.0.0.1
where the behaviour is theirs, through the wire's state machine where it is the protocol's.

* A damaged frame that breaks a session is explained at both ends: the secondary logs why it
  refused, and the primary's send task logs the secondary's reason (its ERROR frame, which
  the secondary drains the primary's window to deliver) with "(retrying)"; an answer
  damaged on its way to the primary is logged there and reported to the secondary.
* A secondary whose replication was stopped there (`replicate stop` at the secondary) says
  so in status, text and JSON.
* /metrics counts, per destination, the bytes sent as they are (repfs_destination_sent_bytes)
  and, apart, the bytes that crossed the wire (repfs_destination_wire_bytes): far fewer for
  compressible data, at least as many when the session is not compressed.
* A secondary with site.toml [rcp] accept_compression = false declines zstd in the
  handshake: the primary offers it, the session agrees to nothing, every CHUNK goes raw
  (seen on the wire by a FrameProxy), and replication converges; a bad value is one line.
* `repfs-admin --site HOST:PORT group add` does not send a secret over plain HTTP beyond
  loopback: one line, exit 1, no secret file made (the CLI itself, no daemon needed).
* The RCP server's batch of gathered chunks is bounded by bytes (MAX_BATCH_BYTES) as well as
  by count: a window of 1 MiB chunks already received is stored in batches of at most 8 MiB,
  in order, none lost (rcp/server.py _gather on a session's state machine and a real socket).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import trio

from repfs.rcp import wire
from repfs.rcp.server import MAX_BATCH_BYTES, _gather
from repfs.site import Site, SiteError
from tests.t2_metrics import metrics, value
from tests.t2_rcp import GROUP, remote_pair
from tests.t2_rcp_compress import FrameProxy, text
from tests.t2_repl import (ADMIN, admin, admin_json, api, assert_same_tree, cut, log_tail,
                           start_replication, wait_converged)
from tests.t2_settings import set_setting
from tests.t3_rcp_faults import TamperProxy, opened, wait_for, write_big


def log_of(m) -> str:
    return (m.site / "repfs.log").read_text()


class AnswerTamperProxy(TamperProxy):
    """A TamperProxy (tests/t3_rcp_faults.py) that can also flip a bit of the next ACK the
    server sends (`flip_answer_once`: the byte at that offset from the frame's start)."""

    def __init__(self, site):
        self.flip_answer: int | None = None
        self.answers_flipped = 0
        super().__init__(site)

    def flip_answer_once(self, offset: int) -> None:
        with self.cond:
            self.flip_answer = offset

    def _down(self, a, b) -> None:
        buf = bytearray()  # (a server sends frames only: no preface)
        try:
            while data := a.recv(1 << 16):
                buf += data
                while (len(buf) >= wire.HEADER.size and len(buf) >= (
                        n := wire.HEADER.size + wire.HEADER.unpack_from(buf)[3])):
                    frame, buf = bytearray(buf[:n]), buf[n:]
                    with self.cond:
                        if self.flip_answer is not None and frame[0] == wire.BY_NAME[
                                "ACK"].code:
                            frame[self.flip_answer] ^= 0x08
                            self.flip_answer = None
                            self.answers_flipped += 1
                    b.sendall(frame)
            if buf:
                b.sendall(buf)
        except OSError:
            pass
        finally:
            self.shut(a, b)


def retrying(m, name: str) -> list[str]:
    """The lines of the primary's log where the send task to `name` says why it retries."""
    return [ln for ln in log_of(m).splitlines()
            if f"destination {name}: " in ln and "(retrying)" in ln]


def test_a_damaged_frame_is_explained_at_the_primary_too(mount_site):
    m1, m2 = remote_pair(mount_site)
    proxy = AnswerTamperProxy(m2.site)
    m2.expect_log("checksum mismatch (damaged on the wire)")
    try:
        (m1.path / "base").write_bytes(os.urandom(3000))
        start_replication(m1, m2, "--group", GROUP, to=proxy.address)
        write_big(m1.path, "big", 3)
        proxy.flip_once("CHUNK", 28 + 5000, bit=3)  # (in the first chunk's body)
        n = cut(m1)
        wait_converged(m1, m2, n)
        assert proxy.flipped == [("CHUNK", 28 + 5000)]
        assert_same_tree(m1.path, m2.path)
        assert "refused: CHUNK frame" in log_of(m2), log_tail(m2.site)
        lines = retrying(m1, proxy.address)
        assert len(lines) == 1, log_tail(m1.site)
        assert "the receiver ended the session: CHUNK frame" in lines[0], lines
        assert "checksum mismatch (damaged on the wire)" in lines[0], lines

        # the other way: an answer damaged on its way to the primary is refused there, said
        # in its log as it retries, and told to the secondary, which logs it
        write_big(m1.path, "big2", 2)
        proxy.flip_answer_once(wire.HEADER.size + 2)  # (in the ACK's body)
        n = cut(m1)
        wait_converged(m1, m2, n)
        assert proxy.answers_flipped == 1
        assert_same_tree(m1.path, m2.path)
        lines = retrying(m1, proxy.address)
        assert len(lines) == 2, log_tail(m1.site)
        assert "RCP protocol error: ACK frame" in lines[1], lines
        assert "checksum mismatch (damaged on the wire)" in lines[1], lines
        assert "the peer reports ACK frame" in log_of(m2), log_tail(m2.site)

        # `replicate stop` at the secondary: its status says it is stopped, not replicating
        # (and the primary finds it no longer a replicating secondary)
        m1.expect_log("is no longer a replicating secondary")
        admin(m2.path, "replicate", "stop")
        st = admin_json(m2.path, "status")
        assert (st["role"], st["replication_state"]) == ("secondary", "stopped"), st
        out = admin(m2.path, "status").stdout
        line = [ln for ln in out.splitlines() if ln.startswith("replication ")]
        assert line == [f"replication   stopped (it was replicating from "
                        f"{st['primary']['site']})"], out
        wait_for("the primary sees it stopped", lambda: api(m1.site, "GET", "/status")[
            "destinations"][0]["state"] == "error")
    finally:
        proxy.close()


def sent_and_wire(m, name: str) -> tuple[float, float]:
    """The primary's /metrics for destination `name`: (bytes sent as they are, bytes that
    crossed the wire)."""
    got = metrics(m.site)
    return (value(got, "repfs_destination_sent_bytes_total", destination=name),
            value(got, "repfs_destination_wire_bytes_total", destination=name))


def test_wire_bytes_and_a_secondary_that_declines_compression(mount_site):
    m1, m2 = remote_pair(mount_site)
    proxy = FrameProxy(m2.site)
    try:
        name = start_replication(m1, m2, "--group", GROUP, to=proxy.address)["name"]

        # compressed (the default): /metrics counts the bytes as they are and, apart, the
        # far fewer that crossed the wire
        sent0, wire0 = sent_and_wire(m1, name)
        assert 0 < wire0  # (the handshake and the initial copy's session)
        mark = proxy.mark()
        (m1.path / "text1").write_bytes(text(2 << 20, "compressed"))
        wait_converged(m1, m2, cut(m1))
        sent1, wire1 = sent_and_wire(m1, name)
        flagged = [f for f in proxy.frames[mark:] if f[0] == "CHUNK"]
        assert flagged and all(fl & wire.FLAG_ZSTD for _, fl, _ in flagged), flagged
        assert sent1 - sent0 >= 2 << 20, (sent0, sent1)
        assert 0 < wire1 - wire0 < (sent1 - sent0) / 4, (sent0, sent1, wire0, wire1)

        # the secondary declines compression (read at each new session: the policy off,
        # then on again, makes two new ones; the last offers zstd and agrees to nothing)
        set_setting(m2.site, "rcp", "accept_compression", "false")
        assert Site(m2.site).settings().accept_compression is False
        for compress in ("off", "on"):
            n = opened(m2.site)
            admin(m1.path, "replicate", "policy", "--to", name, "--compress", compress)
            wait_for("a new session", lambda: opened(m2.site) > n)
        last = [ln for ln in log_of(m2).splitlines()
                if "repfs.rcp.server: RCP session " in ln and ": site " in ln][-1]
        assert last.endswith("(protocol version 1)"), last
        mark = proxy.mark()
        (m1.path / "text2").write_bytes(text(2 << 20, "declined"))
        wait_converged(m1, m2, cut(m1))
        sent2, wire2 = sent_and_wire(m1, name)
        got = [f for f in proxy.frames[mark:] if f[0] == "CHUNK"]
        assert len(got) >= 2 and not any(fl & wire.FLAG_ZSTD for _, fl, _ in got), got
        assert sum(n for *_, n in got) >= 2 << 20
        assert sent2 - sent1 >= 2 << 20 and wire2 - wire1 >= sent2 - sent1, \
            (sent1, sent2, wire1, wire2)
        assert_same_tree(m1.path, m2.path)
    finally:
        proxy.close()
    set_setting(m2.site, "rcp", "accept_compression", '"no"')
    with pytest.raises(SiteError) as e:
        Site(m2.site).settings()
    assert "bad [rcp] accept_compression 'no': must be true or false" in str(e.value)
    set_setting(m2.site, "rcp", "accept_compression", "true")


def test_group_add_sends_no_secret_in_clear_beyond_loopback(tmp_path):
    env = {**os.environ, "REPFS_TOKEN": "t" * 43}
    secret = tmp_path / "g1.secret"

    def add(target: str) -> subprocess.CompletedProcess:
        return subprocess.run([ADMIN, "--site", target, "group", "add", "g1", "--secret-file",
                               str(secret)], capture_output=True, text=True, env=env,
                              timeout=60)
    for target, shown in (("192.0.2.1:7000", "192.0.2.1:7000"),
                          ("[2001:db8::1]:7000", "[2001:db8::1]:7000")):
        r = add(target)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert (f"not sending the secret of group g1 to {shown} over plain HTTP (no TLS)"
                in r.stderr), r.stderr
        assert "copy the secret file to that host and run 'repfs-admin --site SITE group " \
               "add g1 --secret-file FILE' there" in r.stderr, r.stderr
        assert not secret.exists()  # (no new secret made for a request never sent)
    # loopback passes the check: here a name (nothing listens there: that error); an
    # address, 127.0.0.1, in t1_groups.py's group add through HOST:PORT
    r = add("localhost:1")
    assert r.returncode == 3 and "plain HTTP" not in r.stderr, r.stderr


def open_session() -> tuple[wire.Connection, wire.Connection]:
    """A client and a server state machine through the handshake (no compression)."""
    secret = b"a secret of the test, long enough"
    c = wire.Connection(wire.CLIENT, group=GROUP, secret=secret, site="c", uuid="u",
                        features=())
    s = wire.Connection(wire.SERVER, secrets={GROUP: secret}.get, site="s", uuid="v",
                        session=5)
    s.receive_data(c.hello())
    while s.next_event() is not wire.NEED_DATA:
        pass
    c.receive_data(s.take_outgoing())
    while c.next_event() is not wire.NEED_DATA:
        pass
    s.receive_data(c.take_outgoing())
    while s.next_event() is not wire.NEED_DATA:
        pass
    c.receive_data(s.take_outgoing())
    assert c.next_event().type == "READY" and s.state == c.state == wire.OPEN
    return c, s


async def test_a_batch_of_gathered_chunks_is_bounded_by_bytes():
    c, s = open_session()
    bodies = [bytes([i]) * (1 << 20) for i in range(12)]  # (a window of 1 MiB chunks)
    s.receive_data(b"".join(c.send("CHUNK", b) for b in bodies) + c.send("COMMIT", {
        "header": b"h", "cut_ns": 1, "first_change_ns": 1}))
    a, b = trio.socket.socketpair()  # (the session's socket: nothing more arrives on it)
    with a, b:
        async def read(limit: float):
            with trio.move_on_after(limit):
                data = await b.recv(1 << 20)
                s.receive_data(data)
                return data
            return None
        batches, event = [], s.next_event()
        while event.type == "CHUNK":
            batch, event = await _gather(s, b, read, event, 5.0)
            batches.append([bytes(m.body) for m in batch])
    assert event.type == "COMMIT"  # (the frame after the chunks, handed back)
    assert [len(x) for x in batches] == [8, 4], [len(x) for x in batches]
    assert all(sum(map(len, x)) <= MAX_BATCH_BYTES for x in batches)
    assert [body for x in batches for body in x] == bodies  # in order, none lost
