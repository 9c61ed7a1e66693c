"""Tier 2: Prometheus metrics on the site's port (`GET /metrics`, repfs/metrics.py) and the
initial copy's progress line on a terminal (`replicate start`, repfs/cli/admin.py), through
real daemons.

* /metrics wants the control token unless site.toml says `[metrics] open = true` (then the
  rest of the port still wants it); the exposition parses (prometheus_client's parser) and
  its values are the ones `status` shows: the destination's state, acked and played delta
  sets, bytes sent (which grow by at least what a write and a cut shipped), lag, save-volume
  and chunk-area use, commits and cut latencies; a secondary's /metrics shows its role and
  what it played. A bad `[metrics] open` refuses the mount with one line.
* `replicate start` on a terminal draws one updating line with bytes, total, rate and ETA on
  stderr; without a terminal it draws none. The secondary's daemon is throttled (SIGSTOP and
  SIGCONT in turns) while the command watches, so the copy is in progress long enough for
  the command to see it whatever the machine's speed; the throttle stops as soon as the
  command has shown a progress report.
"""

from __future__ import annotations

import http.client
import json
import os
import pty
import re
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from repfs.site import Site
from tests.conftest import run_repfs
from tests.t2_repl import ADMIN, NO_AUTO_CUT, admin, api, cut


def scrape(site: Path, token: bool = True, path: str = "/metrics", accept: str | None = None):
    """GET `path` from the site's port: (status, content type, body text)."""
    c = json.loads((site / "control.json").read_text())
    headers = {"Accept": accept} if accept else {}
    if token:
        headers["Authorization"] = "Bearer " + (site / "control.token").read_text().strip()
    conn = http.client.HTTPConnection(c["host"], c["port"], timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type"), resp.read().decode()
    finally:
        conn.close()


def metrics(site: Path, token: bool = True) -> dict:
    """The site's metrics parsed: {(sample name, frozenset(labels)): value}."""
    status, ctype, text = scrape(site, token)
    assert status == 200, (status, text)
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in m, f"no {name}{labels} in {sorted(k for k in m if k[0] == name)}"
    return m[key]


def write(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())


class Throttle(threading.Thread):
    """SIGSTOP and SIGCONT a daemon in turns (stopped most of the time) until `release`,
    so its peer's initial copy to it runs slowly; it is always left running."""

    def __init__(self, site: Path):
        super().__init__(daemon=True)
        self.pid = Site(site).owner()[0]
        self.released = threading.Event()

    def run(self) -> None:
        try:
            while not self.released.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                self.released.wait(0.2)
                os.kill(self.pid, signal.SIGCONT)
                time.sleep(0.01)
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def release(self) -> None:
        self.released.set()
        self.join(10)


def _start(m1, dest, *, tty: bool, seen, timeout: float = 60.0):
    """`replicate start --to DEST` with stderr on a pty (tty) or a pipe, the destination's
    daemon throttled until `seen(stdout, stderr)` is true; returns (rc, stdout, stderr)."""
    throttle = None
    if tty:
        master, slave = pty.openpty()
        err_fd = slave
    else:
        master, err_fd = os.pipe()
    out_r, out_w = os.pipe()
    proc = subprocess.Popen([ADMIN, "--site", str(m1.path), "replicate", "start", "--to",
                             str(dest.site)], stdout=out_w, stderr=err_fd,
                            stdin=subprocess.DEVNULL)
    os.close(out_w)
    os.close(err_fd)
    out, err = b"", b""
    deadline = time.monotonic() + timeout
    try:
        throttle = Throttle(dest.site)
        throttle.start()
        open_fds = {out_r, master}
        while open_fds:
            assert time.monotonic() < deadline, (out, err)
            ready, _, _ = select.select(list(open_fds), [], [], 0.2)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # (a pty's master reads EIO once the child side is closed)
                    data = b""
                if not data:
                    open_fds.discard(fd)
                elif fd == out_r:
                    out += data
                else:
                    err += data
            if throttle.is_alive() and seen(out.decode(errors="replace"),
                                            err.decode(errors="replace")):
                throttle.release()
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if throttle is not None:
            throttle.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(out_r)
        os.close(master)
    return rc, out.decode(errors="replace"), err.decode(errors="replace")


RATE_LINE = re.compile(r"\rinitial copy to \S+: [\d.]+ \w*B of [\d.]+ \w*B \(\d+%\), "
                       r"[\d.]+ \w*B/s(, ETA \d+:\d\d:\d\d)?")


def set_toml(site: Path, pattern: str, line: str) -> None:
    """Replace the one line of SITE/site.toml matching `pattern` by `line`."""
    toml = site / "site.toml"
    text, n = re.subn(pattern, line, toml.read_text(), flags=re.M)
    assert n == 1, pattern
    toml.write_text(text)


def test_progress_and_metrics(mount_site, tmp_path):
    """One primary s1 and two secondaries: s2 started on a terminal, s3 without one; then
    the metrics of both ends (one set of sites: mounts are the slow part)."""
    # s1: one copy piece (1 MiB) in flight, so each moment the throttled secondary runs
    # takes one or two and the copy lasts a few seconds of throttling on any machine
    run_repfs("mkfs", tmp_path / "s1", "--size", "128M")
    set_toml(tmp_path / "s1", r"^send_window = 8$", "send_window = 1")
    # s2: its metrics are open (its site.toml says so before its mount)
    run_repfs("mkfs", tmp_path / "s2", "--size", "128M")
    set_toml(tmp_path / "s2", r"^# open = false$", "open = true")
    # s3: a bad [metrics] open refuses its mount with one line, and nothing is mounted
    run_repfs("mkfs", tmp_path / "s3", "--size", "128M")
    set_toml(tmp_path / "s3", r"^# open = false$", 'open = "yes"')
    (tmp_path / "s3-mnt").mkdir()
    r = run_repfs("mount", tmp_path / "s3", tmp_path / "s3-mnt", check=False)
    assert r.returncode != 0 and not os.path.ismount(tmp_path / "s3-mnt")
    err = r.stderr.strip()
    assert "[metrics] open 'yes'" in err and "true or false" in err and "\n" not in err, err
    set_toml(tmp_path / "s3", r"^open = \"yes\"$", "# open = false")  # (the default again)
    m1 = mount_site("128M", name="s1")
    m2 = mount_site("128M", name="s2")
    m3 = mount_site("128M", name="s3")
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    write(m1.path / "big", 32 << 20)

    # --- the progress line
    # on a terminal: one line redrawn with \r, with a rate (and an ETA while bytes remain)
    rc, out, err = _start(m1, m2, tty=True, seen=lambda o, e: RATE_LINE.search(e))
    assert rc == 0, (out, err)
    assert RATE_LINE.search(err), repr(err)
    assert err.endswith("\n"), repr(err[-200:])  # (moved past it at the end)
    assert "initial copy done" in out and "initial copy:" not in out, out

    # without one: no line on stderr (stdout has the plain report lines, as before)
    def reported(o, e):
        return re.search(r"initial copy: +[\d.]+% \((?!0 B)", o)
    rc, out, err = _start(m1, m3, tty=False, seen=reported)
    assert rc == 0, (out, err)
    assert reported(out, err), out  # (the copy was watched in progress)
    assert err == "", repr(err)
    assert "initial copy done" in out, out

    # --- the metrics
    # the primary wants the token for /metrics (the default); s2 does not, but still wants
    # it for everything else
    status, _, text = scrape(m1.site, token=False)
    assert status == 401 and "token" in text, (status, text)
    status, _, text = scrape(m2.site, token=False, path="/v1/status")
    assert status == 401, (status, text)

    n = cut(m1)
    wait_played(m1, n)
    before = metrics(m1.site)
    st = api(m1.site, "GET", "/status")
    assert value(before, "repfs_info", role="primary", state="mounted",
                 uuid=st["uuid"]) == 1
    assert [d["name"] for d in st["destinations"]] == ["s2", "s3"]
    for name in ("s2", "s3"):
        for s in ("initial-copy", "replicating", "error", "stopped"):
            assert value(before, "repfs_destination_state", destination=name,
                         state=s) == (s == "replicating")
        assert value(before, "repfs_destination_acked_delta_set", destination=name) == n
        assert value(before, "repfs_destination_played_delta_set", destination=name) == n
        assert value(before, "repfs_destination_outstanding_delta_sets",
                     destination=name) == 0
        assert value(before, "repfs_destination_retries_total", destination=name) == 0
        assert value(before, "repfs_destination_failing", destination=name) == 0
        # the initial copy sent at least the file's 32 MiB
        assert value(before, "repfs_destination_sent_bytes_total",
                     destination=name) >= 32 << 20
    assert value(before, "repfs_last_cut_delta_set") == st["last_cut_delta_set"] == n
    assert value(before, "repfs_save_volume_used_bytes") == st["save_used_bytes"]
    assert value(before, "repfs_chunk_area_capacity_bytes") == \
        st["chunk_area_capacity_bytes"]
    assert value(before, "repfs_volume_bytes") == st["volume_bytes"]
    assert value(before, "repfs_commits_total") >= 1
    assert value(before, "repfs_commit_duration_seconds_count") >= 1
    assert value(before, "repfs_cut_stall_seconds_count") >= 1
    assert value(before, "repfs_cut_duration_seconds_count") >= 1
    assert value(before, "repfs_cut_duration_seconds", quantile="0.5") >= 0

    # a write and a cut: the bytes sent to each grow by at least what was written
    write(m1.path / "b", 2 << 20)
    n2 = cut(m1)
    wait_played(m1, n2)
    after = metrics(m1.site)
    for name in ("s2", "s3"):
        assert value(after, "repfs_destination_sent_bytes_total", destination=name) >= \
            value(before, "repfs_destination_sent_bytes_total", destination=name) + (2 << 20)
        assert value(after, "repfs_destination_played_delta_set", destination=name) == n2
    assert value(after, "repfs_cut_stall_seconds_count") == \
        value(before, "repfs_cut_stall_seconds_count") + 1
    assert value(after, "repfs_save_volume_used_bytes") == \
        api(m1.site, "GET", "/status")["save_used_bytes"]

    # a write not yet cut: a lag, no more than status shows a moment later
    write(m1.path / "c", 4096)
    lagging = metrics(m1.site)
    st = api(m1.site, "GET", "/status")
    lag = value(lagging, "repfs_destination_lag_seconds", destination="s2")
    assert 0 < lag <= st["destinations"][0]["lag_seconds"] + 0.001
    assert 0 < value(lagging, "repfs_lag_seconds") <= st["lag_seconds"] + 0.001
    assert value(lagging, "repfs_changed_bytes") == st["current_delta_set_blocks"] * 4096 > 0

    # a secondary: open, its role and what it played
    sec = metrics(m2.site, token=False)
    s2 = api(m2.site, "GET", "/status")
    assert value(sec, "repfs_info", role="secondary", state="mounted", uuid=s2["uuid"]) == 1
    assert value(sec, "repfs_readonly") == 1
    assert value(sec, "repfs_last_played_delta_set") == s2["last_played_delta_set"] == n2
    assert value(sec, "repfs_secondary_state", state="replicating") == 1
    assert value(sec, "repfs_save_volume_used_bytes") == s2["save_used_bytes"]
    assert metrics(m2.site, token=True)  # (the token does no harm)
    # a scraper that asks for OpenMetrics gets it (prometheus_client's negotiation)
    status, ctype, text = scrape(m2.site, token=False,
                                 accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and ctype.startswith("application/openmetrics-text"), ctype
    assert text.endswith("# EOF\n") and "repfs_last_played_delta_set" in text
    # s3 keeps the default: the token
    assert scrape(m3.site, token=False)[0] == 401
    assert value(metrics(m3.site), "repfs_last_played_delta_set") == n2


def wait_played(m1, n: int, timeout: float = 60.0) -> None:
    """Until every destination of m1 has acked and played delta set n."""
    deadline = time.monotonic() + timeout
    while True:
        ds = api(m1.site, "GET", "/status")["destinations"]
        if all(d["acked_delta_set"] >= n and d["played_delta_set"] >= n for d in ds):
            return
        assert time.monotonic() < deadline, ds
        time.sleep(0.1)
