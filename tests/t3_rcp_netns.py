"""Tier 3: sites on separate hosts, each site's daemon in its own network namespace (issue 9
item 6), joined by veth pairs to a bridge (tests/netns.py).

* `test_sites_in_namespaces`: the fixture itself. Two daemons, each listening on its
  namespace's address only; the test process reaches both with `repfs-admin --site ADDR:PORT`,
  each namespace reaches the other's port, and a cut link makes the site unreachable until it
  is restored (and its daemon answers again).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.netns import PORT, netlab  # noqa: F401 (the fixture)

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
