"""Tier 4: groups and routes survive a power cut in the middle of `group add` and `route add`
(issue 9): after the cut, every change that returned is there, the one in flight is there
whole or not at all, and nothing is torn — `routes.json` parses, each secret file holds its
whole secret (rcp/groups.py, rcp/routes.py: written with statefile.write_durably under the
site lock).

A child process adds groups and routes one after the other on a site that lives on powerfs
(tests/powerfs.py: what is not fsync'd is lost at a cut, in part or whole), printing each
change as it returns; the power is cut at a random moment, keeping a random part of what was
not durable.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

from repfs.rcp.groups import GroupStore
from repfs.rcp.routes import Routes
from repfs.site import Site
from tests.powerfs import PowerFS

ROOT_DIR = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys
sys.path.insert(0, {root!r})
from repfs.rcp.groups import GroupStore
from repfs.rcp.routes import Routes
site = {site!r}
groups, routes = GroupStore(site), Routes(site)
print("ready", flush=True)
i = 0
while True:  # (until the power is cut and it is killed)
    groups.add(f"g{{i}}", b"secret-of-group-%04d-0123456789" % i)
    print("group", i, flush=True)
    routes.add(f"g{{i}}", f"10.0.{{i % 250}}.{{i // 250 % 250 + 1}}:7000")
    print("route", i, flush=True)
    i += 1
"""


def hop(i: int) -> str:
    return f"10.0.{i % 250}.{i // 250 % 250 + 1}:7000"


def secret(i: int) -> bytes:
    return b"secret-of-group-%04d-0123456789" % i


def test_groups_and_routes_are_whole_after_a_power_cut_mid_change(tmp_path):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    pf = PowerFS(tmp_path / "disk", tmp_path / "pf")
    site = pf.mnt / "site"
    try:
        pf.start()
        Site.create(site, 16 << 20)
        pf.sync()
        cuts = []  # changes returned before each cut
        for rnd in range(3):
            for g in list(GroupStore(site).names()):  # (a clean start for each round)
                Routes(site).delete(g) if Routes(site).next_hops(g) else None
                GroupStore(site).delete(g)
            pf.sync()
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD.format(root=str(ROOT_DIR), site=str(site))],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR)
            done = []
            try:
                assert child.stdout.readline().strip() == "ready", child.communicate()[1]
                time.sleep(rng.uniform(0.02, 0.4))
                pf.freeze("random", seed=seed + rnd)  # the power is gone
            finally:
                child.kill()
                out, err = child.communicate()
            done = [line.split() for line in out.splitlines() if line.strip()
                    and line.split()[0] in ("group", "route")]
            cuts.append(len(done))
            print("cut after", len(done), "changes")
            pf.stop()
            pf.start()
            groups = GroupStore(site)
            names = set(groups.names())
            table = Routes(site).table()  # parses: never torn
            returned_groups = {int(i) for kind, i in done if kind == "group"}
            returned_routes = {int(i) for kind, i in done if kind == "route"}
            ops = max([int(i) for _, i in done] + [0]) + 2  # (and the one in flight)
            for i in range(ops):
                name = f"g{i}"
                got = groups.secret(name)
                if i in returned_groups:
                    assert got == secret(i), (rnd, seed, name, got, err[-2000:])
                else:  # in flight or never begun: whole or absent
                    assert got in (None, secret(i)), (rnd, seed, name, got)
                hops = table.get(name, [])
                if i in returned_routes:
                    assert hops == [hop(i)], (rnd, seed, name, table)
                else:
                    assert hops in ([], [hop(i)]), (rnd, seed, name, table)
                    if hops:
                        assert got is not None, (rnd, seed, "a route without its group")
            # at most one change of each kind was in flight at the cut
            assert len({n for n in names if int(n[1:]) not in returned_groups}) <= 1, names
        assert any(c > 0 for c in cuts), cuts  # (the child changes until the cut)
    finally:
        pf.stop()
