"""Tier 3: sites on separate hosts, each site's daemon in its own network namespace (issue 9
item 6), joined by veth pairs to a bridge (tests/netns.py).

* `test_sites_in_namespaces`: the fixture itself. Two daemons, each listening on its
  namespace's address only; the test process reaches both with `repfs-admin --site ADDR:PORT`,
  each namespace reaches the other's port, and a cut link makes the site unreachable until it
  is restored (and its daemon answers again).
* `test_fan_out_and_link_cuts` (one topology, to keep within the suite's time): primary -> 2
  secondaries over RCP (`replicate start --to A:PORT,B:PORT --group G`), a write workload on
  the primary's mount; after each cut both secondaries play the delta set and show the
  primary's tree. Then a secondary's link is cut while a delta set is partly received (its
  link slowed by tc tbf so that the cut lands inside the transfer); the other secondary plays
  that delta set and the next meanwhile; after the link is restored the first converges too
  and both trees equal the primary's. A second cut keeps the link down while the cut-off
  secondary's daemon restarts, so the primary's session dies (its next packet meets a reset)
  and the transfer resumes in a new session; again nothing is lost.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from repfs.rcp.groups import GroupStore
from tests.conftest import run_repfs
from tests.netns import PORT, netlab  # noqa: F401 (the fixture)
from tests.t2_repl import Workload, admin, api, cut, daemon_alive, log_tail, tree, tree_diff

ADMIN = str(Path(sys.executable).parent / "repfs-admin")


def admin_at(addr: str, site: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    """`repfs-admin --site ADDR:PORT --token-file SITE/control.token ARGS` from the test
    process (the root namespace)."""
    cmd = [ADMIN, "--site", addr, "--token-file", str(site / "control.token"), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def test_sites_in_namespaces(netlab, tmp_path):
    a, b = netlab.add_site("a"), netlab.add_site("b")
    ma = netlab.mount_in(a, tmp_path / "a", tmp_path / "a-mnt", a.listen)
    mb = netlab.mount_in(b, tmp_path / "b", tmp_path / "b-mnt", b.listen)
    # the FUSE mounts made inside the namespaces are this process's (one mount namespace)
    (ma.path / "hello").write_bytes(b"from the root namespace")
    assert (ma.path / "hello").read_bytes() == b"from the root namespace"
    for s, m in ((a, ma), (b, mb)):
        doc = json.loads(admin_at(s.listen, m.site, "--json", "status").stdout)
        assert doc["site"] == str(m.site)
        assert "without TLS" in doc["security_warning"]  # (it listens beyond loopback)
        assert json.loads((m.site / "control.json").read_text())["host"] == s.addr
    # each listens in its namespace only: nothing at that port on the root's side
    assert not netlab.tcp_reachable(f"{netlab.prefix}.1", PORT, timeout=0.3)
    assert netlab.tcp_reachable(b.addr, PORT, from_ns=a)
    assert netlab.tcp_reachable(a.addr, PORT, from_ns=b)

    netlab.cut_link(b)
    assert not netlab.tcp_reachable(b.addr, PORT, from_ns=a, timeout=0.5)
    assert not netlab.tcp_reachable(a.addr, PORT, from_ns=b, timeout=0.5)
    assert not netlab.tcp_reachable(b.addr, PORT, timeout=0.5)
    r = admin_at(b.listen, mb.site, "--timeout", "1", "status", check=False)
    assert r.returncode in (3, 4), (r.returncode, r.stderr)  # no daemon / no answer
    assert netlab.tcp_reachable(a.addr, PORT)  # (a's link is not b's)

    netlab.restore_link(b)
    assert netlab.tcp_reachable(b.addr, PORT, from_ns=a)
    assert netlab.tcp_reachable(a.addr, PORT, from_ns=b)
    assert json.loads(admin_at(b.listen, mb.site, "--json", "status").stdout)["site"] == \
        str(mb.site)


# ----------------------------------------------------------------------------- replication

SECRET = b"the-group-secret-of-t3-rcp-netns-0123456789"
GROUP = "net"


def fan_out(netlab, tmp_path, n: int = 2):
    """A primary and `n` secondaries, each site in its own namespace, all holding GROUP; the
    primary cuts delta sets only when asked. Returns (primary mount, [(site, mount)...])."""
    p = netlab.add_site("p")
    mp = netlab.mount_in(p, tmp_path / "p", tmp_path / "p-mnt", size="256M")
    secs = []
    for i in range(n):
        s = netlab.add_site(f"s{i}")
        secs.append((s, netlab.mount_in(s, tmp_path / f"s{i}", tmp_path / f"s{i}-mnt",
                                        size="256M")))
    for m in [mp] + [m for _, m in secs]:
        GroupStore(m.site).add(GROUP, SECRET)
    admin(mp.path, "replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    return mp, secs


def start_remote(mp, secs, timeout: float = 120.0) -> dict:
    """`replicate start --to A:PORT,B:PORT --group GROUP` (waits for the initial copies)."""
    to = ",".join(s.listen for s, _ in secs)
    cmd = [str(Path(sys.executable).parent / "repfs-admin"), "--site", str(mp.path), "--json",
           "replicate", "start", "--to", to, "--group", GROUP]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"replicate start exited {r.returncode}: {r.stderr.strip()}\n" \
        + log_tail(mp.site)
    st = api(mp.site, "GET", "/status")
    assert sorted(d["name"] for d in st["destinations"]) == sorted(s.listen for s, _ in secs)
    return st


def wait_played(mp, secs, n: int, timeout: float = 60.0) -> None:
    """Until each of `secs` has acknowledged and played delta set `n` (the primary's view and
    the secondary's own)."""
    deadline = time.monotonic() + timeout
    want = {s.listen: m for s, m in secs}
    while True:
        st = api(mp.site, "GET", "/status")
        rows = {d["name"]: d for d in st["destinations"] if d["name"] in want}
        done = [name for name, d in rows.items()
                if d["state"] == "replicating" and d["acked_delta_set"] >= n
                and d["played_delta_set"] >= n
                and api(want[name].site, "GET", "/status")["last_played_delta_set"] >= n]
        if len(done) == len(want):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"delta set {n} not played everywhere in {timeout} s: {rows}\n--- primary "
                f"log:\n{log_tail(mp.site)}" + "".join(
                    f"\n--- {name} log:\n{log_tail(m.site)}" for name, m in want.items()))
        for m in [mp, *want.values()]:
            assert daemon_alive(m.site), f"the daemon of {m.site} died:\n{log_tail(m.site)}"
        time.sleep(0.1)


def same_trees(mp, secs, grace: float = 2.5) -> None:
    """Each secondary's mount shows the primary's tree (t2_repl.assert_same_tree, the
    primary's tree read once)."""
    want = tree(mp.path)
    for _, m in secs:
        deadline = time.monotonic() + grace
        while (got := tree(m.path)) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"{m.path} differs from {mp.path}: "
                                     + "; ".join(tree_diff(want, got)))
            time.sleep(0.25)


def partly_received(m, n: int, timeout: float = 30.0) -> bool:
    """Poll the secondary until delta set `n` is partly received (True) or whole (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = api(m.site, "GET", "/repl/receiver")
        if r["last_received"] >= n:
            return False
        if r.get("partial") and r["partial"]["delta_set"] == n and r["partial"]["chunks"] >= 1:
            return True
        time.sleep(0.01)
    raise AssertionError(f"delta set {n} did not arrive in {timeout} s:\n{log_tail(m.site)}")


def big_write(mp, name: str, mib: int = 8) -> None:
    """`mib` MiB that do not compress, in one new file."""
    block = os.urandom(1 << 20)
    with open(mp.path / name, "wb") as f:
        for i in range(mib):
            f.write(block[i:] + block[:i])


def cut_no_wait(mp) -> int:
    """A delta set cut now, not waiting until it is ready (the control port's deltaset)."""
    c = json.loads((mp.site / "control.json").read_text())
    conn = http.client.HTTPConnection(c["host"], c["port"], timeout=30)
    try:
        conn.request("POST", "/v1/replicate/deltaset", body=json.dumps({"wait": False}),
                     headers={"Authorization": "Bearer "
                              + (mp.site / "control.token").read_text().strip(),
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200, doc
    return doc["delta_set"]


def test_fan_out_and_link_cuts(netlab, tmp_path):
    mp, secs = fan_out(netlab, tmp_path)
    (s0, m0), (s1, m1) = secs
    Workload(mp.path, "netns-b3").run(15)
    start_remote(mp, secs)
    wl = Workload(mp.path, "netns")

    # primary -> 2 secondaries: after a cut both play it and show the primary's tree
    wl.run(20)
    n = cut(mp)
    wait_played(mp, secs, n)
    same_trees(mp, secs)

    # s0's link is cut while s0 holds part of a delta set (its link slowed so that the cut
    # lands inside the transfer); s1 plays it and the next meanwhile; then s0's link is back
    netlab.limit_rate(s0, 30)  # (8 MiB take 2 s to reach s0)
    wl.run(10)
    big_write(mp, "big1")
    n = cut_no_wait(mp)
    assert partly_received(m0, n), "the delta set arrived whole before the cut: too fast"
    netlab.cut_link(s0)
    netlab.limit_rate(s0, None)  # (the rest goes at full speed once the link is back)
    wait_played(mp, [(s1, m1)], n)  # the other secondary is not held back
    wl.run(10)  # the primary goes on writing
    n = cut(mp)
    wait_played(mp, [(s1, m1)], n)
    same_trees(mp, [(s1, m1)])
    netlab.restore_link(s0)
    wait_played(mp, secs, n)
    same_trees(mp, secs)

    # cut again mid-transfer, and while the link is down s0's daemon restarts: the primary's
    # session is dead (its next packet meets a reset) and the transfer resumes in a new one
    again = f"destination {s0.listen}: reachable again"
    before = (mp.site / "repfs.log").read_text().count(again)
    netlab.limit_rate(s0, 30)
    big_write(mp, "big2")
    n = cut_no_wait(mp)
    assert partly_received(m0, n), "the delta set arrived whole before the cut: too fast"
    netlab.cut_link(s0)
    netlab.limit_rate(s0, None)
    m0.umount()
    run_repfs("mount", m0.site, m0.path, "--listen", s0.listen, prefix=s0.nsenter)
    netlab.restore_link(s0)
    wait_played(mp, secs, n)
    same_trees(mp, secs)
    # (the session did break: the sender logged an error for s0 and then its recovery)
    assert (mp.site / "repfs.log").read_text().count(again) > before, log_tail(mp.site)
