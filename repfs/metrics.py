"""Prometheus metrics of a running site: `GET /metrics` on the site's one port (control.py).

The metrics are made per scrape from the state `status` reads (status.site_status, the
primary's destination records, the supervisor's task table, the latencies the commit and cut
paths keep: common.Latencies): nothing is counted a second time on the data path, there is
no per-write work. prometheus_client formats them (the text exposition format 0.0.4, or
OpenMetrics when the scraper's Accept header asks for it); the names follow Prometheus's
conventions: `repfs_` prefix, the unit in the name (`_seconds`, `_bytes`), `_total` for
counters. Counters that restart at a daemon
restart (commits, retries) are counters all the same: Prometheus's rate() handles resets.
The table of metrics is in docs/replication.md ("Metrics").

Who may scrape: by default `/metrics` wants the control token like every other route (a
scraper sends it with `authorization: {credentials_file: SITE/control.token}`); the
metrics say how far each secondary lags and where it is, which is not a secret, but the token
also keeps an anonymous peer from making the daemon do the work of a scrape. With
`[metrics] open = true` in site.toml it is served without the token: read-only, no secret
(no token, group secret, or file name of the file system is in it), for scrapers that cannot
read a credentials file. Everything else on the port still wants the token.
"""

from __future__ import annotations

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    SummaryMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

BS = 4096
# a destination's states (repfs/repl/verbs.py, sender.py); one series each, 1 for the current
DEST_STATES = ("initial-copy", "replicating", "error", "stopped")
QUANTILES = (0.5, 0.9, 0.99)


def render(svc, accept: str = "") -> tuple[bytes, str]:
    """The site's metrics and their content type: the format the request's Accept header
    asks for (prometheus_client's choice, as its own HTTP server makes it: OpenMetrics for
    a scraper that asks for it, else the text format 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(svc))
    encoder, ctype = choose_encoder(accept)
    return encoder(registry), ctype


def _gauge(name: str, doc: str, value, labels: dict | None = None):
    g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    if value is not None:
        g.add_metric(list(labels.values()) if labels else [], value)
    return g


def _summary(name: str, doc: str, lat) -> SummaryMetricFamily:
    """A summary from a common.Latencies: _count and _sum since the daemon started, and
    quantiles of the recent durations."""
    s = SummaryMetricFamily(name, doc, count_value=lat.count, sum_value=lat.sum)
    for q in QUANTILES:
        v = lat.quantile(q)
        if v is not None:
            s.add_sample(name, {"quantile": str(q)}, v)
    return s


class SiteCollector:
    """A prometheus_client collector that reads a SiteService at each scrape."""

    def __init__(self, svc):
        self.svc = svc

    def collect(self):
        from .status import site_status
        svc = self.svc
        st = site_status(svc)
        role = st.get("role", "unknown")
        yield _gauge("repfs_info", "The site: its role (primary, secondary) and state",
                     1, {"role": role, "state": st["state"], "uuid": st["uuid"]})
        yield _gauge("repfs_generation", "The site's generation (raised at each role change)",
                     st.get("generation"))
        yield _gauge("repfs_readonly", "1 if the file system is read-only (a secondary, "
                     "or after an error)", int(bool(st["readonly"])))
        yield _gauge("repfs_volume_bytes", "Size of the volume", st["volume_bytes"])
        yield _gauge("repfs_used_bytes", "Bytes in use in the file system", st["used_bytes"])
        yield _gauge("repfs_snapshots", "Snapshots in the queue", len(st["snapshots"]))
        yield _gauge("repfs_save_volume_used_bytes", "Bytes held by the snapshot save "
                     "volumes (SITE/save/)", st["save_used_bytes"])
        yield _gauge("repfs_save_volume_capacity_bytes", "Bytes the save volumes may hold",
                     st["save_capacity_bytes"])
        yield CounterMetricFamily("repfs_commits", "Group commits since the daemon started",
                                  value=st["commits"])
        lat = getattr(svc.ops, "commit_latency", None)
        if lat is not None:
            yield _summary("repfs_commit_duration_seconds", "Duration of the group commits "
                           "(volume flushed, redo record durable)", lat)
        tasks = st["tasks"]
        errors = CounterMetricFamily("repfs_task_errors", "Errors of each background task "
                                     "since the daemon started", labels=["task"])
        restarts = CounterMetricFamily("repfs_task_restarts", "Restarts of each background "
                                       "task after a failure", labels=["task"])
        for name, t in tasks.items():
            errors.add_metric([name], t["errors"])
            restarts.add_metric([name], t["restarts"])
        yield errors
        yield restarts
        yield _gauge("repfs_lag_seconds", "Age of the oldest write not yet played back at "
                     "the slowest destination (a secondary: at this site)",
                     st.get("lag_seconds"))
        yield _gauge("repfs_outstanding_delta_sets", "Delta sets held: not yet released by "
                     "every destination (a secondary: received, not yet played)",
                     len(st.get("outstanding_delta_sets") or []))
        # recovery (repfs/recovery/): "is my data safe", as status's PEER table says it
        yield _gauge("repfs_fenced", "1 while this site is fenced: a peer holds a newer "
                     "generation, and it accepts no writes", int(bool(st.get("fenced"))))
        rp = st.get("restart_point") or {}
        yield _gauge("repfs_restart_point_delta_set", "The delta set of the last failover's "
                     "restart point", rp.get("delta_set"))
        lost = ((st.get("last_failover") or {}).get("lost")) or {}
        yield _gauge("repfs_failover_lost_delta_sets", "Delta sets the last failover lost "
                     "(cut on the old primary, never received); absent when it cannot be told",
                     len(lost.get("delta_sets") or []) if lost.get("known") else None)
        peers = GaugeMetricFamily("repfs_peer_generation", "Each peer's generation as this "
                                  "site last heard it", labels=["peer", "role", "state"])
        for row in st.get("peers") or []:
            if isinstance(row.get("generation"), int):
                # (the state's first word: replicating, resyncing, full, stale, error, ...;
                # no percentage or message in a label, each would make a new series)
                word = str(row.get("state") or "").split(" ", 1)[0].strip(":") or "unknown"
                peers.add_metric([str(row.get("peer")), str(row.get("role")), word],
                                 row["generation"])
        yield peers
        if role == "primary" and "destinations" in st:
            yield from self._primary(svc, st)
        elif role == "secondary" and "replication_state" in st:
            yield from self._secondary(svc, st)

    def _primary(self, svc, st):
        from .rcp.client import wire_bytes
        p = svc.primary
        yield _gauge("repfs_last_cut_delta_set", "Number of the last delta set cut",
                     st["last_cut_delta_set"])
        yield _gauge("repfs_changed_bytes", "Bytes changed since the last cut (the "
                     "accumulating delta set)", st["current_delta_set_blocks"] * BS)
        yield _gauge("repfs_chunk_area_used_bytes", "Bytes the unshipped delta sets hold",
                     st["chunk_area_bytes"])
        yield _gauge("repfs_chunk_area_capacity_bytes", "Bytes the unshipped delta sets may "
                     "hold before cutting pauses", st["chunk_area_capacity_bytes"])
        yield _gauge("repfs_flow_control", "1 while cutting is paused until destinations "
                     "catch up", int(bool(st["flow_control"])))
        yield _gauge("repfs_send_rate_bytes_per_second", "Delta chunks sent to all "
                     "destinations, over the last 10 s", st["send_rate_bytes_per_s"])
        yield _summary("repfs_cut_stall_seconds", "How long each delta-set cut held writers "
                       "back", p.cut_stall)
        yield _summary("repfs_cut_duration_seconds", "Duration of each delta-set cut, until "
                       "its boundary is durable", p.cut_latency)

        rows = {d["name"]: d for d in p.dests()}  # (the records: bytes sent, copy counts)
        L = ["destination"]
        state = GaugeMetricFamily("repfs_destination_state", "1 for the destination's "
                                  "current state", labels=["destination", "state"])
        lag = GaugeMetricFamily("repfs_destination_lag_seconds", "Age of the oldest write "
                                "not yet played back at the destination", labels=L)
        unacked = GaugeMetricFamily("repfs_destination_outstanding_delta_sets", "Delta sets "
                                    "cut and not yet acknowledged by the destination",
                                    labels=L)
        acked = GaugeMetricFamily("repfs_destination_acked_delta_set", "Last delta set the "
                                  "destination acknowledged (durable there)", labels=L)
        played = GaugeMetricFamily("repfs_destination_played_delta_set", "Last delta set the "
                                   "destination played back", labels=L)
        sent = CounterMetricFamily("repfs_destination_sent_bytes", "Bytes sent to the "
                                   "destination as they are before compression: delta "
                                   "chunks and initial-copy blocks", labels=L)
        wire = CounterMetricFamily("repfs_destination_wire_bytes", "Bytes written to the "
                                   "destination's RCP sessions since the daemon started: "
                                   "frames as sent, bodies after compression (RCP "
                                   "destinations only)", labels=L)
        rate = GaugeMetricFamily("repfs_destination_send_rate_bytes_per_second", "Delta "
                                 "chunks sent to the destination, over the last 10 s",
                                 labels=L)
        retries = CounterMetricFamily("repfs_destination_retries", "Failed attempts to send "
                                      "to the destination since the daemon started, each "
                                      "retried", labels=L)
        failing = GaugeMetricFamily("repfs_destination_failing", "1 while the last attempt "
                                    "to reach the destination failed (status: last_error)",
                                    labels=L)
        copied = GaugeMetricFamily("repfs_destination_copy_sent_bytes", "Initial copy: "
                                   "bytes sent so far", labels=L)
        total = GaugeMetricFamily("repfs_destination_copy_total_bytes", "Initial copy: bytes "
                                  "it sends in all (the snapshot's valid blocks)", labels=L)
        for row in st["destinations"]:
            name = row["name"]
            rec = rows.get(name, {})
            for s in sorted(set(DEST_STATES) | {row["state"]}):
                state.add_metric([name, s], int(s == row["state"]))
            if row["lag_seconds"] is not None:
                lag.add_metric([name], row["lag_seconds"])
            unacked.add_metric([name], max(0, st["last_cut_delta_set"]
                                           - row["acked_delta_set"]))
            acked.add_metric([name], row["acked_delta_set"])
            played.add_metric([name], row["played_delta_set"])
            sent.add_metric([name], rec.get("sent_bytes", 0) + rec.get("copied", 0) * BS)
            if rec.get("kind") == "rcp":
                wire.add_metric([name], wire_bytes(rec["site"]))
            rate.add_metric([name], p.rate(name))
            task = st["tasks"].get(f"send {name}")
            retries.add_metric([name], task["errors"] if task else 0)
            failing.add_metric([name], int(bool(row.get("last_error") or row.get("error"))))
            cp = row.get("copy_progress")
            if cp:
                copied.add_metric([name], cp["copied_blocks"] * BS)
                if cp.get("total_blocks") is not None:
                    total.add_metric([name], cp["total_blocks"] * BS)
        yield from (state, lag, unacked, acked, played, sent, wire, rate, retries, failing,
                    copied, total)

    def _secondary(self, svc, st):
        yield _gauge("repfs_secondary_state", "1 for the receiver's current state",
                     1, {"state": str(st["replication_state"])})
        yield _gauge("repfs_last_received_delta_set", "Last delta set received whole",
                     st["last_received_delta_set"])
        yield _gauge("repfs_last_played_delta_set", "Last delta set played back",
                     st["last_played_delta_set"])
        yield CounterMetricFamily("repfs_played_bytes", "Bytes played back into the volume "
                                  "since the daemon started", value=st["played_blocks"] * BS)
        yield _gauge("repfs_quarantined_delta_sets", "Delta sets found damaged at playback, "
                     "kept aside", len(st["quarantined_delta_sets"]))
        ms = sorted(svc.secondary.playback_ms)
        g = GaugeMetricFamily("repfs_playback_duration_seconds", "Duration of the recent "
                              "playbacks (the last 1000), by quantile", labels=["quantile"])
        for q in QUANTILES:
            if ms:
                g.add_metric([str(q)], ms[min(len(ms) - 1, int(len(ms) * q))] / 1000)
        yield g
