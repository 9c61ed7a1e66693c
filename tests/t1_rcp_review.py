"""Tier 1: RCP fixes from the issue 9 review.

* A group's secret that cannot be read (an error other than "no such file") is not an
  unknown group: the secondary refuses the session with kind "transient" (the primary
  retries) and logs why; the primary's own read error is a TransientError, not a
  PermanentError that would stop replication for good.
* A send that is connecting or in the handshake can be aborted from another thread: the
  socket is registered with the client from the moment it exists.

A real `ControlServer` (and its RcpServer) on a fake site (tests/t1_control.py), spoken to
with the real wire.Connection; real RcpConnection / HTTPConnection clients against a loopback
listener that accepts and never answers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from repfs.control import ControlServer
from repfs.rcp import wire
from repfs.rcp.client import RcpReceiverClient
from repfs.rcp.groups import GroupStore, new_secret
from repfs.repl.transport import PermanentError, ReceiverClient, TransientError
from repfs.site import Site
from tests.t1_control import TOKEN, FakeSite, exchange, run

GROUP = "g1"


def fake_site(path: Path) -> FakeSite:
    site = FakeSite()
    site.site = SimpleNamespace(path=path, settings=Site(path).settings)
    site.core = SimpleNamespace(sb=SimpleNamespace(uuid=b"\x01" * 16))
    return site


def handshake_refusal(site_path: Path, secret: bytes) -> wire.ProtocolError:
    """Open an RCP session to a ControlServer on the site at `site_path`: the refusal."""
    client = wire.Connection(wire.CLIENT, group=GROUP, secret=secret, site="/p", uuid="u")
    out = run(exchange, ControlServer(fake_site(site_path), TOKEN), client.hello())
    client.receive_data(out)
    with pytest.raises(wire.ProtocolError) as e:
        while client.next_event() is not wire.NEED_DATA:
            pass
    return e.value


def test_an_unreadable_group_secret_is_transient_not_unknown(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    site = tmp_path / "site"
    site.mkdir()
    secret = new_secret()
    # an unknown group: refused "auth" (permanent at the primary), as a wrong secret is
    # (the server does not say which groups it holds; its log does: tests/t2_rcp.py)
    e = handshake_refusal(site, secret)
    assert e.kind == "auth" and "does not hold the secret of group 'g1'" in str(e)
    # the group's secret file cannot be read (a directory in its place: EISDIR, as EIO or
    # EMFILE would be): "transient", naming the error, and logged
    store = GroupStore(site)
    store.add(GROUP, secret)
    path = site / "groups" / f"{GROUP}.secret"
    os.unlink(path)
    path.mkdir()
    with pytest.raises(IsADirectoryError):
        store.secret(GROUP)
    e = handshake_refusal(site, secret)
    assert e.kind == "transient", e
    assert "cannot read the secret of group 'g1'" in str(e) and "unknown" not in str(e)
    assert any("cannot read the secret" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    caplog.clear()  # (the refusals' WARNING lines were expected: conftest refuses others)
    # the primary's side: its own secret file unreadable is a TransientError (retried)
    client = RcpReceiverClient("127.0.0.1:1", group=GROUP, local=site, uuid="u")
    with pytest.raises(TransientError) as te:
        client._connect()
    assert "cannot read the secret of group 'g1'" in str(te.value)
    # and a missing one is still permanent, saying how to add it
    os.rmdir(path)
    with pytest.raises(PermanentError, match="holds no replication group"):
        client._connect()
    # a good secret: the server proves it holds it (its CHALLENGE passes: the refusals
    # above were not the test's doing)
    store.add(GROUP, secret)
    c = wire.Connection(wire.CLIENT, group=GROUP, secret=secret, site="/p", uuid="u")
    out = run(exchange, ControlServer(fake_site(site), TOKEN), c.hello())
    c.receive_data(out)
    while c.next_event() is not wire.NEED_DATA:
        pass
    assert c.state == wire.READY_WAIT


# ------------------------------------------------------- abort while connecting or handshaking

class Silent:
    """A loopback listener that accepts every connection and never sends a byte (a wedged
    daemon, or a stranger's port); with `accept=False`, one whose backlog is full, so that a
    connection's SYN goes unanswered and connect() itself blocks."""

    def __init__(self, accept: bool = True):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0 if not accept else 16)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        if accept:
            self.sock.settimeout(0.1)
            self.thread = threading.Thread(target=self._accept, daemon=True)
            self.thread.start()
        else:  # fill the backlog: the connect after those that succeed hangs
            for _ in range(8):
                s = socket.socket()
                s.settimeout(0.5)
                try:
                    s.connect(("127.0.0.1", self.port))
                except OSError:
                    s.close()
                    break
                self.held.append(s)
            else:
                pytest.fail("the listener's backlog never filled")

    def _accept(self):
        while not self.stop.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                pass

    def close(self):
        self.stop.set()
        if hasattr(self, "thread"):
            self.thread.join()
        for s in self.held:
            s.close()
        self.sock.close()


def aborted_call(client, call, after: float = 0.5) -> tuple[BaseException, float]:
    """Run `call` (blocking) in this thread and `client.abort()` from another one after
    `after` seconds: what the call raised, and how long it took."""
    timer = threading.Timer(after, client.abort)
    t0 = time.monotonic()
    timer.start()
    try:
        call()
    except Exception as e:  # noqa: BLE001 - returned to the test
        return e, time.monotonic() - t0
    finally:
        timer.cancel()
        timer.join()
    pytest.fail("the call returned although its peer never answered")


TIMEOUT = 30.0  # the clients' answer timeout here
PROMPT = 10.0  # a liveness bound, not a benchmark: far below TIMEOUT (and the connect
# timeout, 15 s), so that the call only ends in time because the abort ended it; a loaded
# machine takes well under a second


def rcp_client(tmp_path: Path, address: str) -> RcpReceiverClient:
    local = tmp_path / "primary"
    local.mkdir(exist_ok=True)
    GroupStore(local).add(GROUP, new_secret())
    return RcpReceiverClient(address, group=GROUP, local=local, uuid="u", timeout=TIMEOUT)


class FakePeer:
    """What ReceiverClient (the HTTP transport) needs of a site on this host."""

    def __init__(self, path: Path, port: int):
        self.path = path
        path.mkdir(exist_ok=True)
        (path / "control.token").write_text(TOKEN)
        self.port = port

    def control_address(self):
        return ("127.0.0.1", self.port)


@pytest.mark.parametrize("transport", ["rcp", "http"])
@pytest.mark.parametrize("accept", [True, False], ids=["silent", "backlog-full"])
def test_abort_stops_a_send_that_is_connecting_or_shaking_hands(tmp_path, transport, accept):
    """`replicate stop` while the send task connects (a full backlog: connect() blocks) or
    waits for the peer's handshake (it accepted and says nothing): the call fails at once
    with "the send was stopped", and so does every later one."""
    peer = Silent(accept=accept)
    try:
        if transport == "rcp":
            client = rcp_client(tmp_path, peer.address)
        else:
            client = ReceiverClient(FakePeer(tmp_path / "s", peer.port), timeout=TIMEOUT)
        e, took = aborted_call(client, client.info)
        assert isinstance(e, TransientError) and "stopped" in str(e), repr(e)
        assert took < PROMPT, f"the aborted call took {took:.1f} s"
        assert client.conn is None and client._connecting is None
        with pytest.raises(TransientError, match="stopped"):
            client.info()
    finally:
        peer.close()


def test_abort_stops_a_tls_handshake(tmp_path):
    """Inside TLS: a peer that accepts and never answers the ClientHello (the TLS handshake
    in the socket's wrap, before the connection is the client's): the abort ends it."""
    from repfs.rcp.tls import init
    _, files = init(tmp_path / "pki", "p", ["127.0.0.1"])
    peer = Silent()
    try:
        client = rcp_client(tmp_path, peer.address)
        (client.local / "site.toml").write_text(
            f'[tls]\ncert = "{files.cert}"\nkey = "{files.key}"\nca = "{files.ca}"\n')
        e, took = aborted_call(client, client.info)
        assert isinstance(e, TransientError) and "stopped" in str(e), repr(e)
        assert took < PROMPT, f"the aborted call took {took:.1f} s"
        # the HTTP transport's TLS (a local site's [tls]: its certificate pinned)
        site = FakePeer(tmp_path / "s", peer.port)
        (site.path / "site.toml").write_text((client.local / "site.toml").read_text())
        client = ReceiverClient(site, timeout=TIMEOUT)
        e, took = aborted_call(client, client.info)
        assert isinstance(e, TransientError) and "stopped" in str(e), repr(e)
        assert took < PROMPT, f"the aborted call took {took:.1f} s"
    finally:
        peer.close()
