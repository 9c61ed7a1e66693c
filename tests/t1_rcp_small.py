"""Tier 1: small behaviours of RCP (issue 9's review list), through real daemons on 127.0.0.1
where the behaviour is theirs, through the wire's state machine where it is the protocol's.

* A damaged frame that breaks a session is explained at both ends: the secondary logs why it
  refused, and the primary's send task logs the secondary's reason (its ERROR frame, which
  the secondary drains the primary's window to deliver) with "(retrying)".
* A secondary with site.toml [rcp] accept_compression = false declines zstd in the
  handshake: the primary offers it, the session agrees to nothing, every CHUNK goes raw
  (seen on the wire by a FrameProxy), and replication converges; a bad value is one line.
"""

from __future__ import annotations

import os

import pytest

from repfs.rcp import wire
from repfs.site import Site, SiteError
from tests.t2_rcp import GROUP, remote_pair
from tests.t2_rcp_compress import FrameProxy, text
from tests.t2_settings import set_setting
from tests.t2_repl import assert_same_tree, cut, log_tail, start_replication, wait_converged
from tests.t3_rcp_faults import TamperProxy, write_big


def log_of(m) -> str:
    return (m.site / "repfs.log").read_text()


def test_a_damaged_frame_is_explained_at_the_primary_too(mount_site):
    m1, m2 = remote_pair(mount_site)
    proxy = TamperProxy(m2.site)
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
        lines = [ln for ln in log_of(m1).splitlines()
                 if f"destination {proxy.address}: " in ln and "(retrying)" in ln]
        assert len(lines) == 1, log_tail(m1.site)
        assert "the receiver ended the session: CHUNK frame" in lines[0], lines
        assert "checksum mismatch (damaged on the wire)" in lines[0], lines
    finally:
        proxy.close()


def test_a_secondary_can_decline_compression(mount_site):
    m1, m2 = remote_pair(mount_site)
    set_setting(m2.site, "rcp", "accept_compression", "false")  # (read at each session)
    assert Site(m2.site).settings().accept_compression is False
    proxy = FrameProxy(m2.site)
    try:
        start_replication(m1, m2, "--group", GROUP, to=proxy.address)
        mark = proxy.mark()
        (m1.path / "text").write_bytes(text(2 << 20, "declined"))
        wait_converged(m1, m2, cut(m1))
        got = [f for f in proxy.frames[mark:] if f[0] == "CHUNK"]
        assert len(got) >= 2 and not any(fl & wire.FLAG_ZSTD for _, fl, _ in got), got
        assert sum(n for *_, n in got) >= 2 << 20
        assert_same_tree(m1.path, m2.path)
        sessions = [ln for ln in log_of(m2).splitlines() if "repfs.rcp.server: RCP session "
                    in ln and "(protocol version" in ln]
        assert sessions and all(ln.endswith("(protocol version 1)") for ln in sessions), \
            sessions
        assert "zstd" not in log_of(m2)
    finally:
        proxy.close()
    set_setting(m2.site, "rcp", "accept_compression", '"no"')
    with pytest.raises(SiteError) as e:
        Site(m2.site).settings()
    assert "bad [rcp] accept_compression 'no': must be true or false" in str(e.value)
    set_setting(m2.site, "rcp", "accept_compression", "true")
