"""Tier 1: small behaviours of RCP (issue 9's review list), through real daemons on 127.0.0.1
where the behaviour is theirs, through the wire's state machine where it is the protocol's.

* A damaged frame that breaks a session is explained at both ends: the secondary logs why it
  refused, and the primary's send task logs the secondary's reason (its ERROR frame, which
  the secondary drains the primary's window to deliver) with "(retrying)".
"""

from __future__ import annotations

import os

from tests.t2_rcp import GROUP, remote_pair
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
