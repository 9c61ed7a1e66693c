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
import trio

from repfs.control import ControlServer
from repfs.rcp import wire
from repfs.rcp.client import RcpReceiverClient
from repfs.rcp.groups import GroupStore, new_secret
from repfs.repl.transport import PermanentError, ReceiverClient, TransientError
from tests.t1_control import TOKEN, FakeSite, exchange, run

GROUP = "g1"


def fake_site(path: Path) -> FakeSite:
    site = FakeSite()
    site.site = SimpleNamespace(path=path)
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
    # an unknown group: refused "auth" (permanent at the primary), as before
    e = handshake_refusal(site, secret)
    assert e.kind == "auth" and "unknown replication group" in str(e)
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
