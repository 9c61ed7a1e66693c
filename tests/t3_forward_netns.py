"""Tier 3: a forwarder across network namespaces (issue 9 item 6; FIG. 3, 16-18): primary P ->
forwarder F -> next hops H1 and H2, each site's daemon in its own namespace on the bridge of
tests/netns.py, with a write workload running on P's mount the whole time (while the
topology is built and while the faults happen). t2_forward.py is the same topology on
127.0.0.1; t3_rcp_netns.py is fan-out without a forwarder.

At each checked delta-set boundary (`checkpoint`: the workload pauses, a delta set is cut,
F, H1 and H2 have played it) every site's tree equals P's, byte for byte; once, with the
workload running, `repfs-admin verify --to F` compares P and F block by block. The faults,
each landing while a delta set is partly received (the victim's link slowed by tc tbf so
that the fault lands inside the transfer):

* P's link is cut mid-transfer to F (in this topology P talks to F only), F restarts
  meanwhile, the link is restored: replication resumes in a new session from the chunks F
  holds;
* H1's link is cut mid-transfer from F: H2 plays that delta set and the next meanwhile (not
  held back), then H1's link is restored and H1 catches up;
* kill -9 of F while H1 holds part of a delta set from F and F part of the next from P: P
  sends straight to H1 and H2 after site.toml [repl] bypass_after (1 s here), H1 the rest
  of its delta set (the chunks are F's, byte for byte), and they go on playing; F is mounted
  again on the same address, catches up, and the bypass ends. (The bypass is driven by a
  kill, whose reset P sees at once: a link cut silently is a failure P sees only at its
  answer timeout, 60 s, and so bypassed only that much later);
* kill -9 of H2 mid-transfer: mounted again, it resumes;
* F stopped while the bypass takes its hops more delta sets ahead than F's mailbox may hold
  (site.toml [repl] max_outstanding): back, F catches up all the same.

Throughout, a sampler reads each downstream site's (last received, last played): they never
go back (nothing received or applied twice, also across the bypass, where H1 and H2 are sent
the same delta sets by P and by F), and P's `status --json` shows the route tree (F's
destination row has `hops` H1 and H2 with their progress). At the end: no retry storm (the
retry lines in P's and F's logs, and the RCP sessions each receiver opened, per second).
"""

from __future__ import annotations

import collections
import http.client
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from repfs.rcp.groups import GroupStore
from tests.conftest import run_repfs
from tests.netns import netlab  # noqa: F401 (the fixture)
from tests.t2_forward import tree_rows
from tests.t2_repl import (Workload, admin, admin_json, api, cut, log_tail, status, tree,
                           tree_diff)
from tests.t3_rcp_netns import GROUP, SECRET, admin_at, big_write, cut_no_wait, partly_received
from tests.t4_repl_crash import kill9

BYPASS_AFTER = 1  # s: P's site.toml [repl] bypass_after (the default is 30)


class Background(threading.Thread):
    """t2_repl's Workload on a directory of the primary's mount, a step every few tenths of a
    second, in a thread; `pause` returns once no step runs (the tree then holds still)."""

    def __init__(self, root: Path, seed):
        super().__init__(daemon=True)
        root.mkdir()
        self.wl = Workload(root, seed)
        self.go = threading.Event()
        self.go.set()
        self.idle = threading.Event()
        self.stop = threading.Event()
        self.steps = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.go.is_set():
                    self.idle.set()
                    self.go.wait(0.1)
                    continue
                self.idle.clear()
                self.wl.step()
                self.steps += 1
                time.sleep(0.15)
        except BaseException as e:  # noqa: BLE001 - raised by the test (check)
            self.error = e
        finally:
            self.idle.set()

    def pause(self) -> None:
        if not self.is_alive():
            return self.check()
        self.idle.clear()
        self.go.clear()
        assert self.idle.wait(60), "the workload did not pause"
        self.check()

    def resume(self) -> None:
        self.check()
        self.go.set()

    def check(self) -> None:
        assert self.error is None, f"the workload failed: {self.error!r}"

    def finish(self) -> None:
        self.stop.set()
        self.go.set()
        self.join(60)
        self.check()


class Sampler(threading.Thread):
    """Each site's (last_received, last_played), every change, read from its control port
    (a site that does not answer, dead or cut off, is skipped until it does)."""

    def __init__(self, mounts: dict):
        super().__init__(daemon=True)
        self.mounts = mounts
        self.history: dict[str, list[tuple[int, int]]] = {k: [] for k in mounts}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, m in self.mounts.items():
                try:
                    r = api(m.site, "GET", "/repl/receiver", timeout=0.5)
                except (OSError, AssertionError, ValueError, http.client.HTTPException):
                    continue
                x = (r["last_received"], r["last_played"])
                h = self.history[name]
                if not h or h[-1] != x:
                    h.append(x)
            time.sleep(0.05)

    def check(self) -> None:
        """Nothing received or played twice: neither number ever goes back, and nothing is
        played before it was received."""
        for name, h in self.history.items():
            for (r0, p0), (r1, p1) in zip(h, h[1:]):
                assert r1 >= r0 and p1 >= p0, f"{name} went back: {h}"
            assert all(p <= r for r, p in h), f"{name} played what it lacked: {h}"


def played(m) -> int:
    return api(m.site, "GET", "/status")["last_played_delta_set"] or 0


def wait_for(what: str, pred, timeout: float = 60.0, logs=()):
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s" + "".join(
                f"\n--- {m.site.name} log:\n{log_tail(m.site)}" for m in logs))
        time.sleep(0.1)
    return got


def wait_played(n: int, *mounts, timeout: float = 60.0) -> None:
    wait_for(f"delta set {n} played at {[m.site.name for m in mounts]}",
             lambda: all(played(m) >= n for m in mounts), timeout, mounts)


def same_trees(primary, *mounts, grace: float = 2.5) -> None:
    """Every one of `mounts` shows the primary's tree (read once; a played delta set may
    show a moment late: t2_repl.assert_same_tree)."""
    want = tree(primary.path)
    for m in mounts:
        deadline = time.monotonic() + grace
        while (got := tree(m.path)) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"{m.site.name} differs from the primary: "
                                     + "; ".join(tree_diff(want, got)))
            time.sleep(0.25)


def remount_in(ns, m) -> None:
    """The dead daemon's mount lazily unmounted, the site mounted again on its address."""
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False, capture_output=True)
    wait_for(f"{m.path} unmounted", lambda: not os.path.ismount(m.path), 30)
    run_repfs("mount", m.site, m.path, "--listen", ns.listen, prefix=ns.nsenter)


def per_second(site: Path, pattern: str) -> collections.Counter:
    """The log lines of `site` matching `pattern`, counted per second of their timestamp."""
    rx = re.compile(pattern)
    return collections.Counter(ln[:19] for ln in (site / "repfs.log").read_text().splitlines()
                               if rx.search(ln))


def test_forwarder_across_namespaces_with_faults(netlab, tmp_path):
    ns = {name: netlab.add_site(name) for name in ("p", "f", "h1", "h2")}
    for name in ns:
        run_repfs("mkfs", tmp_path / name, "--size", "256M")
    toml = tmp_path / "p" / "site.toml"
    assert "bypass_after = 30" in toml.read_text()
    toml.write_text(toml.read_text().replace("bypass_after = 30",
                                             f"bypass_after = {BYPASS_AFTER}"))
    m = {name: netlab.mount_in(s, tmp_path / name, tmp_path / f"{name}-mnt")
         for name, s in ns.items()}
    p, f, h1, h2 = m["p"], m["f"], m["h1"], m["h2"]
    for x in m.values():
        GroupStore(x.site).add(GROUP, SECRET)
    # delta sets cut by the policy every second while the workload writes
    admin(p.path, "replicate", "policy", "--timeout", "1", "--hwm", "100G")
    p.expect_log("sending straight to its next hops")  # (the bypass: F killed)
    f.expect_log("forwarding flow control")  # (phase 5: F's mailbox holds 2 delta sets)
    wl = Background(p.path / "wl", "fwd-netns")
    wl.wl.run(40)  # (something for the initial copies: then the workload runs on)
    sampler = Sampler({"f": f, "h1": h1, "h2": h2})
    wl.start()
    sampler.start()
    try:
        # the topology, built while the workload writes: P -> F (initial copy), F -> H1, H2
        admin(p.path, "replicate", "start", "--to", ns["f"].listen, "--group", GROUP)
        for h in ("h1", "h2"):
            admin_at(ns["f"].listen, f.site, "route", "add", GROUP, ns[h].listen)

        def hops_replicating():
            fw = api(f.site, "GET", "/status").get("forwarding") or {}
            return {r["name"]: r["state"] for r in fw.get("next_hops") or []} == {
                ns["h1"].listen: "replicating", ns["h2"].listen: "replicating"}
        wait_for("F forwarding to H1 and H2", hops_replicating, 60, (f,))

        def checkpoint() -> int:
            """Pause the workload, cut, wait until every site played it: all trees equal."""
            wl.pause()
            n = cut(p)
            wait_played(n, f, h1, h2)
            same_trees(p, f, h1, h2)
            wl.resume()
            return n

        n = checkpoint()
        # the route tree in P's status: F's row has its next hops, with their progress
        def route_tree():
            rows = tree_rows(api(p.site, "GET", "/status")["destinations"])
            return rows if all(ns[h].listen in rows and rows[ns[h].listen][
                "played_delta_set"] >= n for h in ("h1", "h2")) else None
        wait_for("the route tree in P's status", route_tree, 30)
        [fwd] = status(p.path)["destinations"]  # (repfs-admin --json status)
        assert fwd["name"] == ns["f"].listen and fwd["played_delta_set"] >= n, fwd
        assert {r["site"]: r["state"] for r in fwd["hops"]} == {
            ns["h1"].listen: "replicating", ns["h2"].listen: "replicating"}, fwd
        assert all(r["played_delta_set"] >= n and "hops" not in r for r in fwd["hops"]), fwd
        text = admin(p.path, "status").stdout  # (people's table: the hops under F)
        assert ns["h1"].listen in text and ns["h2"].listen in text, text
        # a block-by-block compare of P and F at a delta-set boundary, the workload running
        out = admin_json(p.path, "verify", "--to", ns["f"].listen)
        assert out["in_sync"] is True, out

        # 1. P's link cut while F holds part of a delta set; the workload goes on. While it
        # is down F restarts (a clean umount and mount), so P's session is dead (its next
        # packet meets a reset) and the transfer resumes in a new one, from F's chunks
        again = f"destination {ns['f'].listen}: reachable again"
        before = (p.site / "repfs.log").read_text().count(again)
        netlab.limit_rate(ns["f"], 30)  # (8 MiB take 2 s to reach F)
        big_write(p, "big1")
        n = cut_no_wait(p)
        assert partly_received(f, n), "the delta set arrived whole before the cut: too fast"
        netlab.cut_link(ns["p"])
        netlab.limit_rate(ns["f"], None)
        f.umount()
        run_repfs("mount", f.site, f.path, "--listen", ns["f"].listen, prefix=ns["f"].nsenter)
        r = api(f.site, "GET", "/repl/receiver")
        assert r["last_received"] == n - 1 and r["partial"]["delta_set"] == n, r
        netlab.restore_link(ns["p"])
        wait_played(n, f, h1, h2)
        assert (p.site / "repfs.log").read_text().count(again) > before, log_tail(p.site)
        checkpoint()

        # 2. H1's link cut while H1 holds part of a delta set: H2 goes on; restored
        netlab.limit_rate(ns["h1"], 30)
        big_write(p, "big2")
        n = cut_no_wait(p)
        assert partly_received(h1, n), "the delta set arrived whole before the cut: too fast"
        netlab.cut_link(ns["h1"])
        netlab.limit_rate(ns["h1"], None)
        wait_played(n, f, h2)
        later = cut(p)
        wait_played(later, f, h2)  # (H2 is not held back by H1)
        hop = {r["name"]: r for r in api(f.site, "GET", "/status")["forwarding"]["next_hops"]}
        assert hop[ns["h1"].listen]["acked_delta_set"] < n, hop
        netlab.restore_link(ns["h1"])
        wait_played(later, h1)
        checkpoint()

        # 3. kill -9 of F mid-transfer, twice over: H1 holds part of delta set n from F (H1's
        # link slowed more), F part of n2 from P. P bypasses F: it sends H1 the rest of n
        # (the chunks are F's, byte for byte) and both hops what follows; F comes back on its
        # address, catches up from P, finds its hops ahead, and the bypass ends
        netlab.limit_rate(ns["h1"], 8)  # (8 MiB take 8 s to reach H1)
        big_write(p, "big3")
        n = cut_no_wait(p)
        assert partly_received(h1, n), "the delta set arrived whole before the kill: too fast"
        netlab.limit_rate(ns["f"], 30)
        big_write(p, "big4")
        n2 = cut_no_wait(p)
        assert partly_received(f, n2), "the delta set arrived whole before the kill: too fast"
        held = api(h1.site, "GET", "/repl/receiver", timeout=10)
        kill9(f.site)
        assert held["last_received"] == n - 1 and held["partial"]["delta_set"] == n, held
        for x in ("f", "h1"):
            netlab.limit_rate(ns[x], None)
        bypass = {f"{ns[h].listen} (bypassing {ns['f'].listen})" for h in ("h1", "h2")}
        wait_for("P sending straight to H1 and H2", lambda: {
            d["name"] for d in api(p.site, "GET", "/status")["destinations"]
            if d.get("bypass_of")} == bypass, 30, (p,))
        later = cut(p)
        wait_played(later, h1, h2)  # (fed by P while F is down)
        remount_in(ns["f"], f)
        wait_for("the bypass ended", lambda: not any(
            d.get("bypass_of") for d in api(p.site, "GET", "/status")["destinations"]), 60,
            (p, f))
        checkpoint()

        # 4. kill -9 of H2 mid-transfer: mounted again, it resumes
        netlab.limit_rate(ns["h2"], 30)
        big_write(p, "big5")
        n = cut_no_wait(p)
        assert partly_received(h2, n), "the delta set arrived whole before the kill: too fast"
        kill9(h2.site)
        netlab.limit_rate(ns["h2"], None)
        wait_played(n, f, h1)
        remount_in(ns["h2"], h2)
        checkpoint()

        # 5. F comes back further behind its hops (fed by the bypass meanwhile) than its
        # mailbox may hold ([repl] max_outstanding 2): each delta set it plays then is one
        # its hops already have, released without any progress of theirs, so F never stops
        # playing for good (its flow control waits for hops that wait for it)
        fconf = f.site / "site.toml"
        fconf.write_text(fconf.read_text().replace("max_outstanding = 64",
                                                   "max_outstanding = 2"))
        behind = played(f)
        f.umount()
        wait_for("P sending straight to H1 and H2", lambda: {
            d["name"] for d in api(p.site, "GET", "/status")["destinations"]
            if d.get("bypass_of")} == bypass, 30, (p,))
        for i in range(4):
            (p.path / f"behind{i}").write_bytes(os.urandom(20_000))
            later = cut(p)
        wait_played(later, h1, h2)
        assert later - behind > 2, (behind, later)  # (more than F's mailbox holds)
        run_repfs("mount", f.site, f.path, "--listen", ns["f"].listen, prefix=ns["f"].nsenter)
        wait_played(later, f)
        checkpoint()
        wl.finish()
        checkpoint()  # (and once more with the workload stopped)
    finally:
        wl.finish()
        sampler.stop.set()
        sampler.join(30)
    sampler.check()
    assert all(len(h) >= 5 for h in sampler.history.values()), sampler.history
    assert wl.steps >= 50, wl.steps  # (the workload ran through it all)
    # what F kept for its next hops is released once they played it
    wait_for("F's held delta sets released", lambda: not api(
        f.site, "GET", "/status")["forwarding"]["held_delta_sets"], 30)
    # no retry storm: retries are logged once per new error, sessions open once per retry
    for x in (p, f):
        retries = per_second(x.site, r"\(retrying\)|retrying every")
        assert max(retries.values(), default=0) <= 3 and sum(retries.values()) <= 30, retries
    for x in (f, h1, h2):
        sessions = per_second(x.site, r"repfs\.rcp\.server: RCP session \d+ .*: site ")
        assert max(sessions.values(), default=0) <= 6, sessions
        # and no receiver refused a frame: the hops took the rest of a delta set from P
        # where F's chunks stopped, and the two senders' chunks never disagreed
        assert not per_second(x.site, r"RCP session \d+ from .*: \w+ refused: "), \
            log_tail(x.site)


def test_a_silently_cut_forwarder_is_bypassed_after_bypass_after(netlab, tmp_path):
    """F's link goes down without a reset (packets dropped): no error reaches P before its
    60 s answer timeout, yet P sends straight to F's next hop once F has shown no progress
    for [repl] bypass_after with a delta set to send (Primary._watch_forwarders); when the
    link is back, F catches up and the bypass ends."""
    ns = {name: netlab.add_site(name) for name in ("p", "f", "h1")}
    for name in ns:
        run_repfs("mkfs", tmp_path / name, "--size", "64M")
    toml = tmp_path / "p" / "site.toml"
    toml.write_text(toml.read_text().replace("bypass_after = 30", "bypass_after = 2"))
    m = {name: netlab.mount_in(s, tmp_path / name, tmp_path / f"{name}-mnt")
         for name, s in ns.items()}
    p, f, h1 = m["p"], m["f"], m["h1"]
    for x in m.values():
        GroupStore(x.site).add(GROUP, SECRET)
    admin(p.path, "replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    p.expect_log("sending straight to its next hops")
    (p.path / "a").write_bytes(os.urandom(200_000))
    admin(p.path, "replicate", "start", "--to", ns["f"].listen, "--group", GROUP)
    admin_at(ns["f"].listen, f.site, "route", "add", GROUP, ns["h1"].listen)
    n = cut(p)
    wait_played(n, f, h1)
    wait_for("P to see F's next hop", lambda: tree_rows(
        status(p.path)["destinations"]).get(ns["h1"].listen), 30)
    # cut while F is partly through receiving a delta set: P waits on an answer that never
    # comes (its link slowed so that the cut lands inside the transfer)
    netlab.limit_rate(ns["f"], 8)
    big_write(p, "b", 8)
    n = cut_no_wait(p)
    assert partly_received(f, n), "the delta set arrived whole before the cut"
    netlab.cut_link(ns["f"])
    try:
        t0 = time.monotonic()
        wait_played(n, h1, timeout=45)
        took = time.monotonic() - t0
    finally:
        netlab.limit_rate(ns["f"], None)
        netlab.restore_link(ns["f"])
    assert took < 45, took
    wait_played(n, f, timeout=120)
    wait_for("the bypass to end", lambda: not any(
        d.get("bypass_of") for d in status(p.path)["destinations"]), 120)
    same_trees(p, f, h1)
