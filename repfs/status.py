"""The status report of a running site: a serialisable dict whose states are plain strings
(the CLI renders it). Reads the service and its roles; changes nothing."""

from __future__ import annotations

import os
import time

from .tasks import iso


def site_status(svc) -> dict:
    core = svc.core
    st = core.statfs()
    sb = core.sb
    snaps = svc.snapshots.list()
    out = {
        "site": str(svc.site.path),
        "label": sb.label,
        "uuid": sb.uuid.hex(),
        "state": "mounted" if core.error is None else "read-only after an error",
        "mountpoint": svc.mountpoint,
        "readonly": svc.readonly or core.error is not None,
        # errors=remount-ro: why the file system turned read-only, and when (None: it did not)
        "fs_error": core.error,
        "fs_error_at": iso(core.error_ns),
        # every background task: state (running, retrying, recovering, stopped, done), its
        # last error and when, how many errors and restarts (repfs/tasks.py)
        "tasks": svc.supervisor.report(),
        "pid": os.getpid(),
        "volume_bytes": sb.nblocks * 4096,
        "used_bytes": (st["f_blocks"] - st["f_bfree"]) * 4096,
        "free_bytes": st["f_bfree"] * 4096,
        "inodes": st["f_files"],
        "free_inodes": st["f_ffree"],
        "format_version": sb.version,
        "commits": svc.ops.commits,  # completed (group) commits since the mount
        "committing": svc.ops.commit_lock.locked(),  # a commit is being written now
        # writes held until their before-images are durable: bytes held now, and releases
        # past [memory] held_limit since the mount (behind the writer; by a waiting writer)
        "held_bytes": core.dev.pending_bytes(),
        "held_releases": dict(svc.ops.held_releases),
        "snapshots": snaps,
        "save_used_bytes": svc.store.usage(),
        "save_capacity_bytes": svc.store.capacity,
        "snapshot_mounts": svc.mounts.mountpoints(),
        # the port listens beyond loopback without TLS (rcp/server.insecure_listen_warning)
        "security_warning": getattr(svc, "security_warning", None),
        "tls": getattr(svc, "tls", False),  # the port speaks TLS only (site.toml [tls])
        **repl_status(svc),
        # fenced (a peer holds a newer generation), the restart point, the last failover
        # and what it lost (repfs/recovery/failover.py)
        **svc.recovery.status(),
        # a snapshot copy this site is sending now (recovery/copy.py), or None
        "copy": svc.copies.progress,
    }
    try:
        out["peers"] = peers(out)
    except Exception as e:  # noqa: BLE001 - a report must not fail on what it reports
        from .tasks import describe
        out["peers"] = [{"peer": None, "role": None, "generation": None,
                         "state": f"cannot report: {describe(e)}"}]
    return out


def peers(st: dict) -> list[dict]:
    """"Is my data safe": every peer this site knows, with its generation (as last heard)
    and its state in one word or phrase — replicating, initial copy N%, resyncing N%, full
    copy N% (warning: history lost), fenced, stale, error — from a status report `st`."""
    out = []
    if st.get("role") == "secondary":
        prim = st.get("primary") or {}
        out.append({"peer": prim.get("site"), "role": "primary",
                    "generation": st.get("generation"),
                    "state": f"this site {st.get('replication_state')} from it"})
    for d in st.get("destinations") or []:
        state = d.get("state")
        cp = d.get("copy_progress") or {}
        total = cp.get("total_blocks")
        pct = (f" {100.0 * cp.get('copied_blocks', 0) / total:.0f}%" if total else
               "" if not cp else " 0%")
        if state == "initial-copy":
            if d.get("history_lost"):
                state = f"full copy{pct} (warning: history lost: {d['history_lost']})"
            elif d.get("resync"):
                state = f"resyncing{pct}"
            else:
                state = f"initial copy{pct}"
        elif state == "resync-attach":
            state = "resyncing 0%"
        elif state == "error":
            older = (d.get("peer_generation") or 0) < (st.get("generation") or 0)
            state = ("stale (an older generation): " if older and d.get("peer_generation")
                     else "error: ") + str(d.get("error"))
        if d.get("bypass_of"):
            state += f" (bypassing {d['bypass_of']})"
        out.append({"peer": d.get("site"), "role": "secondary",
                    "generation": d.get("peer_generation"), "state": state,
                    "played_delta_set": d.get("played_delta_set"),
                    "lag_seconds": d.get("lag_seconds")})
    if st.get("fenced"):
        out.append({"peer": None, "role": "newer primary", "generation": None,
                    "state": st["fenced"]})
    return out


def repl_status(svc) -> dict:
    """The replication part; a damaged record it cannot read (the tasks that read it show
    the same error) makes it `replication_status_error` instead of failing the whole
    report, so `status` still shows the site, its tasks and their errors."""
    try:
        if svc.primary is not None:
            return _primary_status(svc)
        return _secondary_status(svc)
    except Exception as e:  # noqa: BLE001 - a report must not fail on what it reports
        from .tasks import describe
        return {"role": "primary" if svc.primary is not None else "secondary",
                "replication_status_error": describe(e)}


def _dest_rows(svc, p) -> list[dict]:
    """The destinations of a primary's or a forwarder's send tasks, each with the route tree
    below it when it forwards (what it last said of its next hops)."""
    dests = []
    for d in p.dests():
        row = {k: d.get(k) for k in ("name", "site", "kind", "group", "state", "error",
                                     "last_error")}
        if d.get("bypass_of"):  # standing in for a forwarder that does not answer
            row["bypass_of"] = d["bypass_of"]
        if d.get("resync"):  # an old primary brought up to date (recovery/resync.py)
            row["resync"] = {**d["resync"], "copied_blocks": d.get("copied", 0)}
        if d.get("forward") is not None:
            row["hops"] = _hops(p, d["forward"])
        if d.get("failing_since_ns"):  # (unreachable since then; retried more slowly)
            row["failing_seconds"] = round((time.time_ns() - d["failing_since_ns"]) / 1e9, 1)
        for k in ("peer_generation", "history_lost"):  # (what it last said; a full copy's
            if d.get(k) is not None:                   # reason when history was lost)
                row[k] = d[k]
        row.update(acked_delta_set=d["acked"], played_delta_set=d["played"],
                   lag_seconds=round(p.lag(d), 3) if d["state"] != "stopped" else None,
                   # its own policy (replicate policy --to NAME): bytes/s, 0 for none
                   bwlimit=d.get("bwlimit", 0),  # (compression: on RCP sessions only)
                   compress=d.get("compress", True) if d.get("kind") == "rcp" else None)
        if d["state"] == "initial-copy":
            row["copy_progress"] = {"copied_blocks": d.get("copied", 0),
                                    "position": d.get("copy_pos", 0),
                                    # the snapshot's valid blocks: what the copy sends in
                                    # all (None until the copy has counted them)
                                    "total_blocks": d.get("copy_total"),
                                    "volume_blocks": svc.layer.nblocks}
        dests.append(row)
    return dests


def _hops(p, fwd: dict, depth: int = 0) -> list[dict]:
    """A forwarder's next hops as it reported them, with their lag as seen from this site
    (the delta sets' numbers are the same along the whole tree)."""
    out = []
    hops = (fwd or {}).get("hops") if isinstance(fwd, dict) else None
    for h in hops if isinstance(hops, list) else []:
        if not isinstance(h, dict) or not isinstance(h.get("played"), int):
            continue
        row = {"site": h.get("site"), "group": h.get("group"), "state": h.get("state"),
               "acked_delta_set": h.get("acked"), "played_delta_set": h["played"],
               "lag_seconds": round(p.lag({"played": h["played"]}), 3), "error": h.get("error")}
        if h.get("forward") is not None and depth < 8:
            row["hops"] = _hops(p, h["forward"], depth + 1)
        out.append(row)
    return out


def _primary_status(svc) -> dict:
    p, sets, clog = svc.primary, svc.sets, svc.clog
    dests = _dest_rows(svc, p)
    outstanding = [
        {"delta_set": r["number"], "state": r["state"], "blocks": r["blocks"],
         "created": iso(r["cut_ns"]), "ready": iso(r["ready_ns"]) if r["ready_ns"] else None,
         "broken": (sets.pin(r["number"]).attrs.get("broken")
                    if sets.pin(r["number"]) is not None else None)}
        for r in sets.records() if sets.held(r) and r["blocks"]]
    stalls = sorted(p.stall_ms)
    return {
        "role": "primary", "generation": sets.generation,
        "replicating": clog.enabled,
        "current_delta_set": sets.last_cut + 1,
        "current_delta_set_blocks": clog.changed_blocks,
        "last_cut_delta_set": sets.last_cut,
        "last_played_delta_set": None,
        "lag_seconds": round(max((p.lag(d) for d in p.dests() if d["state"] != "stopped"),
                                 default=0.0), 3),
        "destinations": dests,
        "outstanding_delta_sets": outstanding,
        "chunk_area_bytes": sets.usage(), "chunk_area_capacity_bytes": sets.capacity,
        "flow_control": p.flow_control,
        "send_rate_bytes_per_s": round(p.rate()),
        "cut_stall_ms": {"p50": pct(stalls, 50), "p99": pct(stalls, 99),
                         "count": len(stalls)},
        "policy": p.policy(),
    }


def _secondary_status(svc) -> dict:
    now = time.time_ns()
    r = svc.receiver
    incoming = r.incoming()
    first = min((x["first_change_ns"] for x in incoming if x.get("first_change_ns")),
                default=0)
    return {
        "role": "secondary", "generation": r.generation, "replication_state": r.state,
        "primary": r.primary(), "current_delta_set": None, "last_cut_delta_set": None,
        "last_received_delta_set": r.last_received,
        "last_played_delta_set": r.last_played,
        "last_played_at": iso(r.last_played_ns),
        "playing_delta_set": r.playing,  # being written into the volume now (None: idle)
        "lag_seconds": round((now - first) / 1e9, 3) if first else 0.0,
        "outstanding_delta_sets": [
            {"delta_set": x["number"], "blocks": x["blocks"], "created": iso(x["cut_ns"]),
             "received": iso(x["received_ns"])} for x in incoming],
        "played_blocks": r.played_blocks,
        # of the blocks received since the daemon started, those written once, straight
        # into the volume (free at the boundaries before them: docs/replication.md)
        "direct_blocks": r.direct_blocks,
        # delta sets found damaged at playback: kept aside, never played, asked for again
        "quarantined_delta_sets": [
            {"delta_set": q.get("delta_set"), "reason": q.get("reason"),
             "at": iso(q.get("at_ns", 0)), "file": q.get("file")} for q in r.quarantined()],
        "playback_ms_p50": pct(sorted(svc.secondary.playback_ms), 50),
        "policy": svc.secondary.policy(),
        "forwarding": _forwarding(svc),
    }


def _forwarding(svc) -> dict | None:
    """A forwarder's next hops (repfs/repl/forward.py), None when it forwards nothing."""
    f = svc.forwarder
    if f is None or not f.on:
        return None
    return {"next_hops": _dest_rows(svc, f),
            "held_delta_sets": [r["number"] for r in f.sets.records()
                                if f.sets.held(r) and r["blocks"]],
            "held_bytes": f.sets.usage(), "flow_control": f.paused,
            "subtree_played_delta_set": f.subtree_played(),
            "not_started": {hop: e["error"] for hop, e in f.start_errors.items()},
            "routes_error": getattr(f, "routes_error", None)}


def pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * p / 100))], 2)
