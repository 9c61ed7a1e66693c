"""Tier 4: power cuts between a delta set's cut and its "ready" (Primary.cut,
Operations.cut_point).

Writers wait at a cut only while it is recorded (state "cut", one LMDB commit); the closing
commit, the volume's syncs and the emptied redo log come after they go on, and only then is
the delta set "ready" and sent. A power cut in between must leave a delta set that was never
cut: undone at the next mount (deltaset.undo_unready: its blocks back in the change log, its
pin gone, last_cut back), never sent, and replication then converges with every fsync'd file
on both sites.

The primary's site lives on powerfs (tests/powerfs.py): the volume image's syncs are made
slow (each returns 1.5 s late, after it is durable), which holds the cut in that window;
the power goes off during the first or the second of them (the closing commit's flush, or
the one that empties the redo log), keeping none or a random part of what was not synced.
"""

from __future__ import annotations

import random
import time

from tests.t2_repl import admin, api
from tests.t4_power import (ROUNDS, SEED, Request, _converge, _dest, _wait, power_pair,  # noqa: F401
                             power_site)
from tests.t4_repl_crash import Writer, check_durable

SLOW = 1.5  # seconds each sync of the primary's volume image returns late


def test_power_cut_between_a_cut_and_its_ready_undoes_the_delta_set(power_site):
    rng = random.Random(8063 + SEED)
    m1, m2 = power_pair(power_site, "cutpoint-base", 8)
    admin(m1.path, "replicate", "start", "--to", m2.site)
    _wait(lambda: _dest(m1)["state"] == "replicating", "the initial copy", sites=(m1, m2))
    _converge(m1, m2)
    writers: list[Writer] = []
    for rnd in range(2 * ROUNDS):
        w = Writer(m1.path / "w", 100 * rnd + SEED % 100, limit=rng.randrange(1, 4) << 20)
        writers.append(w)
        w.proc.wait(120)
        w.stop()
        # unsynced changes too: they may be lost, never half-shipped
        (m1.path / f"loose{rnd}").write_bytes(rng.randbytes(rng.randrange(1, 300) << 10))
        before = api(m1.site, "GET", "/status")["last_cut_delta_set"]
        n = before + 1
        slow = m1.pf.add_fault("site/volume.img", "fsync", count=None, delay=SLOW)
        which = 1 + rnd % 2  # the closing commit's flush, or the redo log's emptying
        req = Request(m1.site, "POST", "/replicate/deltaset", {"wait": True})
        deadline = time.monotonic() + 60
        while m1.pf.stats()["seen"].get(str(slow), 0) < which:
            assert time.monotonic() < deadline, "the cut never synced the volume"
            assert req.is_alive() or m1.pf.stats()["seen"].get(str(slow), 0) >= which, (
                f"the cut ended before its {which}. volume sync: {req.status} {req.reply}")
            time.sleep(0.005)
        recs = {r["delta_set"]: r for r in api(m1.site, "GET", "/status")[
            "outstanding_delta_sets"]}
        assert n in recs, (which, recs)  # cut (recorded), its syncs under way
        got = m1.power_cut(rng.choice(["none", "random"]), rng.randrange(1 << 30))
        req.join(30)
        m1.mount()
        st = api(m1.site, "GET", "/status")
        assert st["last_cut_delta_set"] == before, (
            f"delta set {n}, cut but not ready at the power cut ({got}), was not undone: "
            f"{st['outstanding_delta_sets']}")
        assert api(m2.site, "GET", "/status")["last_received_delta_set"] < n, \
            "a delta set that was not ready was sent"
        # resumes: the next cut (number n again) carries the undone one's blocks
        assert _converge(m1, m2) == n
        check_durable(m1.path / "w", writers)
        check_durable(m2.path / "w", writers)
        print(f"round {rnd}: cut at volume sync {which} ({got}); undone and converged",
              flush=True)
    for m in (m1, m2):
        m.finish()
