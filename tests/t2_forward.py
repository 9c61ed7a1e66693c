"""Tier 2: forwarders (FIG. 3, 16-18) through real daemons on 127.0.0.1: a primary replicates
to a forwarder, whose routes send each delta set it plays on to two next hops; the forwarder
is killed (kill -9) and its upstream sends straight to its next hops until it is back. The
network-namespace topology is tests/t3_rcp_netns.py's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from repfs.rcp.groups import GroupStore
from tests.conftest import run_repfs
from tests.t2_rcp import GROUP, SECRET, address, port_of
from tests.t2_repl import admin, api, assert_same_tree, cut, log_tail, start_replication, status
from tests.t4_repl_crash import kill9


def played(m) -> int:
    return api(m.site, "GET", "/status")["last_played_delta_set"] or 0


def wait_played(n: int, *sites, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = [played(m) for m in sites]
        if all(x >= n for x in got):
            return
        assert time.monotonic() < deadline, (
            f"not every site played delta set {n}: {got}\n"
            + "\n".join(log_tail(m.site) for m in sites))
        time.sleep(0.2)


def tree_rows(rows):
    """site -> row, over a route tree of status rows (their `hops`, recursively)."""
    out = {}
    for r in rows or []:
        out[r["site"]] = r
        out.update(tree_rows(r.get("hops")))
    return out


def test_forwarder_stores_plays_and_forwards_and_is_bypassed_while_down(mount_site):
    sites = [mount_site("128M", "--listen", "127.0.0.1:0", name=n)
             for n in ("prim", "fwd", "hop1", "hop2")]
    p, f, h1, h2 = sites
    for m in sites:
        GroupStore(m.site).add(GROUP, SECRET)
    # the primary bypasses a silent forwarder after 1 s (site.toml [repl] bypass_after)
    toml = p.site / "site.toml"
    toml.write_text(toml.read_text().replace("bypass_after = 30", "bypass_after = 1"))
    p.umount()
    run_repfs("mount", p.site, p.path, "--listen", "127.0.0.1:0")
    admin(p.path, "replicate", "policy", "--timeout", "3600", "--hwm", "100G")

    (p.path / "a").write_bytes(os.urandom(300_000))
    start_replication(p, f, "--group", GROUP, to=address(f))
    for h in (h1, h2):
        admin(f.path, "route", "add", GROUP, address(h))
    (p.path / "b").write_bytes(os.urandom(500_000))
    n = cut(p)
    wait_played(n, f, h1, h2)
    for m in (f, h1, h2):
        assert_same_tree(p.path, m.path)
    # the route tree: the primary sees the forwarder's next hops and their progress
    deadline = time.monotonic() + 20
    while True:
        rows = tree_rows(status(p.path)["destinations"])
        if all(address(h) in rows and rows[address(h)]["played_delta_set"] >= n
               for h in (h1, h2)):
            break
        assert time.monotonic() < deadline, rows
        (p.path / "poke").write_bytes(os.urandom(5000))
        n = cut(p)
        time.sleep(0.5)
    fs = status(f.path)["forwarding"]
    assert {r["site"] for r in fs["next_hops"]} == {address(h) for h in (h1, h2)}, fs
    # each hop follows the forwarder, not the primary
    for h in (h1, h2):
        assert status(h.path)["primary"]["site"].endswith(str(f.site)), status(h.path)

    # the forwarder hangs (SIGSTOP: its connections stay open, nothing answers, no error
    # comes before the 60 s answer timeout): bypassed after bypass_after all the same
    fpid = int((f.site / "repfs.pid").read_text().split()[0])
    p.expect_log("sending straight to its next hops")
    os.kill(fpid, signal.SIGSTOP)
    try:
        (p.path / "hung").write_bytes(os.urandom(100_000))
        n1 = cut(p)
        wait_played(n1, h1, h2, timeout=20)
    finally:
        os.kill(fpid, signal.SIGCONT)
    wait_played(n1, f, timeout=60)  # (it catches up; the bypass ends)
    deadline = time.monotonic() + 90
    while any(d.get("bypass_of") for d in status(p.path)["destinations"]):
        assert time.monotonic() < deadline, status(p.path)["destinations"]
        time.sleep(0.2)

    # the forwarder dies: the primary sends straight to its next hops meanwhile
    fport = port_of(f.site)
    p.expect_log("sending straight to its next hops")
    f.expect_log("")  # (killed: its log may end anyhow)
    kill9(f.site)
    subprocess.run(["fusermount3", "-u", "-z", str(f.path)], check=False, capture_output=True)
    (p.path / "c").write_bytes(os.urandom(400_000))
    n2 = cut(p)
    wait_played(n2, h1, h2, timeout=60)
    for h in (h1, h2):
        assert_same_tree(p.path, h.path)
    names = [d["name"] for d in status(p.path)["destinations"] if d.get("bypass_of")]
    assert len(names) == 2, status(p.path)["destinations"]

    # it comes back (same address): it catches up, the bypass ends, it forwards again
    while os.path.ismount(f.path):
        time.sleep(0.05)
    run_repfs("mount", f.site, f.path, "--listen", f"127.0.0.1:{fport}")
    (p.path / "d").write_bytes(os.urandom(200_000))
    n3 = cut(p)
    wait_played(n3, f, h1, h2, timeout=60)
    deadline = time.monotonic() + 30
    while any(d.get("bypass_of") for d in status(p.path)["destinations"]):
        assert time.monotonic() < deadline, status(p.path)["destinations"]
        time.sleep(0.2)
    (p.path / "e").write_bytes(os.urandom(100_000))
    n4 = cut(p)
    wait_played(n4, f, h1, h2, timeout=60)
    for m in (f, h1, h2):
        assert_same_tree(p.path, m.path)
    # what the forwarder kept for its hops is released once they played it
    deadline = time.monotonic() + 20
    while status(f.path)["forwarding"]["held_delta_sets"]:
        assert time.monotonic() < deadline, status(f.path)["forwarding"]
        time.sleep(0.2)
