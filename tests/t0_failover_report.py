"""Tier 0: the primary's answer to a failover request is trusted no more than a request is
(repfs/recovery/failover.py `check_report`), and the loss computed from it (`_lost`)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from repfs.recovery.failover import PeerRefused, _lost, check_report

GOOD = {"generation": 1, "last_cut": 9, "uncut_blocks": 3, "fenced": True,
        "delta_sets": [{"delta_set": 7, "blocks": 2, "bytes": 8192},
                       {"delta_set": 8, "blocks": 0}, {"delta_set": 9, "blocks": 5}]}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 1 << 65) | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=20)


def test_a_good_report_and_its_loss():
    assert check_report(dict(GOOD), "p") == GOOD
    lost = _lost(GOOD, 7)  # the restart point: delta set 7
    assert lost["known"] and [x["delta_set"] for x in lost["delta_sets"]] == [8, 9]
    assert (lost["uncut_blocks"], lost["blocks"], lost["bytes"]) == (3, 8, 8 * 4096)
    assert _lost(GOOD, 9)["delta_sets"] == [] and _lost(GOOD, 9)["blocks"] == 3
    assert _lost(None, 7) == {"known": False}


def test_malformed_reports_are_refused_in_one_line():
    bad = [None, [], "x", {}, {**GOOD, "generation": -1}, {**GOOD, "last_cut": "9"},
           {**GOOD, "generation": True}, {**GOOD, "delta_sets": {}},
           {**GOOD, "delta_sets": [{"delta_set": 1}]},
           {**GOOD, "delta_sets": [{"delta_set": 1.5, "blocks": 1}]},
           {**GOOD, "uncut_blocks": -3}, {**GOOD, "delta_sets": [7]}]
    for doc in bad:
        try:
            check_report(doc, "PRIMARY")
        except PeerRefused as e:
            assert "PRIMARY" in str(e) and "\n" not in str(e)
        else:
            raise AssertionError(f"accepted {doc!r}")


@given(json_values, st.integers(0, 1 << 20))
def test_any_answer_is_checked_or_refused(doc, after):
    try:
        rep = check_report(doc, "p")
    except PeerRefused:
        return
    lost = _lost(rep, after)  # (never fails on a checked report)
    assert lost["known"] and lost["bytes"] == 4096 * lost["blocks"] >= 0
    assert all(x["delta_set"] > after for x in lost["delta_sets"])


def test_a_site_failing_over_cannot_be_attached_not_even_with_force():
    from repfs.repl.receiver import attach_refusal
    me = {"site": "/s2", "volume_blocks": 100, "role": "secondary", "state": "failover",
          "generation": 1, "primary": {"uuid": "a" * 32, "site": "/s1"}, "root_entries": 3,
          "destinations": []}
    prim = {"uuid": "a" * 32, "site": "/s1"}
    for force in (False, True):
        assert "failing over" in attach_refusal(me, prim, 1, 100, force)
    assert attach_refusal({**me, "state": "stopped"}, prim, 1, 100, True) is None
