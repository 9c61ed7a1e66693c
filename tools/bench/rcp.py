"""Replication over RCP (issue 9 item 7): throughput against raw TCP, a simulated WAN, lag with
1 and 3 destinations, and the initial copy against rsync, each against a baseline measured in
the same run.

Run from the repository root, as root (network namespaces, tc, drop_caches):

    .venv/bin/python tools/bench/rcp.py --quick [--json FILE]     # ~6-8 minutes
    .venv/bin/python tools/bench/rcp.py [--json FILE]             # ~15-20 minutes
    .venv/bin/python tools/bench/rcp.py --quick --only tput,wan   # some sections only

Sections (`--only`):

  tput  raw TCP throughput of a trio socket pair between two processes (1 MiB sends,
        recv_into), over 127.0.0.1 and across two network namespaces (veth - bridge - veth);
        then a primary writing N MiB (1 MiB writes, fsync) and one delta set cut
        (POST /v1/replicate/deltaset), timed from the cut until the destination acked it and
        until it played it (status polled every 20 ms), for a remote destination over RCP on
        127.0.0.1 and across the namespaces, and the local (HTTP on loopback) transport.
        Ratio: replication MiB/s (cut -> acked) / raw TCP MiB/s on the same path (>= 0.7x).
  wan   the namespaces' path with the secondary's veth limited to 100 Mbit/s (tc tbf, both
        directions) and a delaying TCP proxy (25 ms each way: 50 ms round trip) between the
        primary and the secondary; replication MiB/s against the link's rate (>= 0.7x), for
        each `[repl] send_window` in --windows (a fresh pair each); raw TCP through the same
        path for reference.
  lag   a paced writer (1 MiB writes) on a primary replicating over RCP (127.0.0.1, policy
        --timeout 1) to 1 and to 3 secondaries; every destination's lag_seconds sampled each
        second during the load, and the time to catch up after it.
  copy  a tree of files on the primary; `replicate start --to` (the initial copy) across the
        namespaces against `rsync -a` of the same tree to an rsync daemon in the secondary's
        namespace (into a plain directory), both through the same counting proxy (no delay),
        page caches dropped before each; time ratio (target: faster) and bytes on the wire
        per valid byte copied (target <= 1.05).

In tput, RCP to 127.0.0.1 is measured with compression on (the default; the random data is
sent raw), compression off (`replicate policy --to D --compress off`, then the primary is
remounted so that its next session takes it), TLS (`repfs-admin tls init` certificates in
both sites' site.toml [tls]), and compressible text with compression on and off. The other
sections run with the defaults (compression on, no TLS).

Nothing here asserts on time. Every mount, daemon, child process, namespace, veth, bridge (and
the qdiscs on the veths) this run made is removed at the end, also after a failure, Ctrl-C or
SIGTERM; a section that fails prints its error and the run goes on (exit status 1).
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from common import lazy_unmount, log, mounted, pid_alive, kill_pid, wait_gone, tool  # noqa: E402

MiB = 1 << 20
GROUP = "bench"
SECRET = b"repfs-bench-rcp-group-secret-0123456789"
PORT = 7070  # each namespace's daemon listens on this port of its own address
LINK_MBIT = 100
DELAY_S = 0.025  # each way: 50 ms round trip

# ----------------------------------------------------------------------------- helpers


def run(cmd, timeout=300, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
    return r


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def commit() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "repfs/"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + (" (repfs/ has uncommitted changes)" if dirty else "")


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        log(f"  (cannot drop caches: {e})")


def write_file(path: Path, mib: int, buf: bytes) -> float:
    """1 MiB writes into a new file, fsync, close; seconds."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for _ in range(mib):
            mv = memoryview(buf)
            while mv:
                mv = mv[os.write(fd, mv):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(v, fmt=".1f", unit=""):
    return "-" if v is None else f"{v:{fmt}}{unit}"


# ----------------------------------------------------------------------------- what we start

_procs: list[subprocess.Popen] = []
_sites: list["BenchSite"] = []
_labs: list["Lab"] = []


def cleanup_all() -> None:
    """Whatever happened: no child, mount, daemon, namespace or link of ours stays behind."""
    while _procs:
        p = _procs.pop()
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    while _sites:
        s = _sites.pop()
        try:
            s.down()
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=sys.stdout)
    while _labs:
        lab = _labs.pop()
        try:
            lab.close()
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=sys.stdout)


def spawn(cmd, prefix=()) -> subprocess.Popen:
    p = subprocess.Popen([*prefix, *map(str, cmd)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _procs.append(p)
    return p


def finish(p: subprocess.Popen, timeout=600) -> str:
    out, err = p.communicate(timeout=timeout)
    _procs.remove(p)
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(p.args)} exited {p.returncode}: {err.strip()}")
    return out


def stop(p: subprocess.Popen) -> None:
    if p in _procs:
        _procs.remove(p)
    if p.poll() is None:
        p.terminate()
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


class Lab:
    """A bridge in the root namespace (10.232.N.1/24) and per host a namespace joined to it by
    a veth pair (10.232.N.10+i), as tests/netns.py builds it (its own names and subnet, so a
    test run at the same time does not collide)."""

    def __init__(self):
        self.hosts: list[dict] = []
        for n in range(250):
            r = run(["ip", "link", "add", f"rcpb{n}", "type", "bridge"], check=False)
            if r.returncode == 0:
                self.n, self.bridge = n, f"rcpb{n}"
                break
        else:
            raise RuntimeError("no free bridge name rcpb0..249")
        _labs.append(self)
        self.prefix = f"10.232.{self.n}"
        self.gw = f"{self.prefix}.1"
        run(["ip", "addr", "add", f"{self.gw}/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])

    def add(self, name: str) -> dict:
        i = len(self.hosts)
        h = {"name": name, "ns": f"rcpb{self.n}-{name}", "addr": f"{self.prefix}.{10 + i}",
             "veth": f"rcp{self.n}v{i}", "peer": f"rcp{self.n}p{i}"}
        run(["ip", "netns", "add", h["ns"]])
        self.hosts.append(h)
        run(["ip", "link", "add", h["veth"], "type", "veth", "peer", "name", h["peer"],
             "netns", h["ns"]])
        run(["ip", "link", "set", h["veth"], "master", self.bridge, "up"])
        run(["ip", "-n", h["ns"], "link", "set", "lo", "up"])
        run(["ip", "-n", h["ns"], "addr", "add", f"{h['addr']}/24", "dev", h["peer"]])
        run(["ip", "-n", h["ns"], "link", "set", h["peer"], "up"])
        h["nsenter"] = ["nsenter", f"--net=/var/run/netns/{h['ns']}"]
        return h

    @staticmethod
    def limit_rate(h: dict, mbit: float | None) -> None:
        """tc tbf on both ends of the host's veth (as tests/netns.py limit_rate); None: off."""
        if mbit is None:
            run(["tc", "qdisc", "del", "dev", h["veth"], "root"], check=False)
            run(["tc", "-n", h["ns"], "qdisc", "del", "dev", h["peer"], "root"], check=False)
            return
        burst = max(16 * 1024, int(mbit * 1e6 / 8 / 250))
        tbf = ["root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms"]
        run(["tc", "qdisc", "replace", "dev", h["veth"], *tbf])
        run(["tc", "-n", h["ns"], "qdisc", "replace", "dev", h["peer"], *tbf])

    def close(self) -> None:
        for h in self.hosts:
            pids = run(["ip", "netns", "pids", h["ns"]], check=False).stdout.split()
            for pid in pids:  # (ours: every daemon/child in the lab's namespaces)
                log(f"  (process {pid} still in {h['ns']}: killed)")
                kill_pid(int(pid))
            run(["ip", "link", "del", h["veth"]], check=False)  # (both ends, their qdiscs)
            run(["ip", "netns", "del", h["ns"]], check=False)
        run(["ip", "link", "del", self.bridge], check=False)
        links = run(["ip", "-o", "link", "show"], check=False).stdout
        left = [h["ns"] for h in self.hosts if Path(f"/var/run/netns/{h['ns']}").exists()]
        left += [x for x in [self.bridge] + [h["veth"] for h in self.hosts]
                 if f" {x}:" in links or f" {x}@" in links]
        if left:
            log(f"  WARNING: left behind: {left}")


class BenchSite:
    """A site made, given the group's secret, mounted (in a namespace if `host`)."""

    def __init__(self, root: Path, name: str, size: str, host: dict | None = None,
                 listen: str | None = "127.0.0.1:0", send_window: int | None = None,
                 tls_dir: Path | None = None):
        from repfs.rcp.groups import GroupStore
        self.site, self.mnt, self.host = root / name, root / (name + "-mnt"), host
        self.pid = None
        self.tls = None
        run([tool("repfs"), "mkfs", self.site, "--size", size])
        if tls_dir is not None:  # site.toml [tls] with a certificate of the run's CA
            cname = f"{root.name}-{name}"
            run([tool("repfs-admin"), "tls", "init", tls_dir, "--site-name", cname, "--host",
                 host["addr"] if host else "127.0.0.1"])
            with open(self.site / "site.toml", "a") as fh:
                fh.write(f'\n[tls]\ncert = "{tls_dir / (cname + ".pem")}"\n'
                         f'key = "{tls_dir / (cname + ".key")}"\nca = "{tls_dir / "ca.pem"}"\n')
        if send_window is not None:
            toml = self.site / "site.toml"
            text, k = re.subn(r"(?m)^send_window = \d+$", f"send_window = {send_window}",
                              toml.read_text())
            if k != 1:
                raise RuntimeError(f"no 'send_window = N' line in {toml}")
            toml.write_text(text)
        GroupStore(self.site).add(GROUP, SECRET)
        self.mnt.mkdir()
        if host is not None:
            listen = f"{host['addr']}:{PORT}"
        self.listen = listen
        _sites.append(self)
        self.mount()

    def mount(self) -> None:
        prefix = self.host["nsenter"] if self.host else []
        if self not in _sites:
            _sites.append(self)
        run([*prefix, tool("repfs"), "mount", self.site, self.mnt,
             *(["--listen", self.listen] if self.listen else [])], timeout=120)
        self.pid = int((self.site / "repfs.pid").read_text().split()[0])
        c = json.loads((self.site / "control.json").read_text())
        self.ctl = (c["host"], int(c["port"]))
        self.token = (self.site / "control.token").read_text().strip()
        from repfs.rcp import tls
        self.tls = tls.site_client(self.site)  # (None without [tls])

    @property
    def address(self) -> str:
        return f"{self.ctl[0]}:{self.ctl[1]}"

    def api(self, method: str, path: str, body: dict | None = None, timeout=600) -> dict:
        if self.tls is not None:
            conn = http.client.HTTPSConnection(*self.ctl, timeout=timeout,
                                               context=self.tls[0])
        else:
            conn = http.client.HTTPConnection(*self.ctl, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            hdr = {"Authorization": f"Bearer {self.token}"}
            if data is not None:
                hdr["Content-Type"] = "application/json"
            conn.request(method, "/v1" + path, body=data, headers=hdr)
            r = conn.getresponse()
            raw = r.read()
        finally:
            conn.close()
        if r.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {r.status}: {raw[:300]!r}")
        return json.loads(raw)

    def status(self) -> dict:
        return self.api("GET", "/status")

    def admin(self, *args, timeout=600) -> str:
        return run([tool("repfs-admin"), "--site", self.mnt, *args], timeout=timeout).stdout

    def down(self) -> None:
        if mounted(self.mnt):
            r = subprocess.run([tool("repfs"), "umount", str(self.mnt), "--timeout", "180"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                log(f"  ({self.mnt}: repfs umount failed: {(r.stderr or r.stdout).strip()}; "
                    "lazy unmount)")
        lazy_unmount(self.mnt)
        if self.pid and not wait_gone(self.pid, 60):
            kill_pid(self.pid)
        if self in _sites:
            _sites.remove(self)


def pair(root: Path, tag: str, size: str, *, lab: Lab | None = None, hosts=None,
         secondaries: int = 1, send_window: int | None = None, tls: bool = False):
    """A primary and its secondaries, mounted (in the lab's hosts if given; with TLS: a CA
    and certificates made by `repfs-admin tls init` in the run's directory)."""
    d = root / tag
    d.mkdir()
    tls_dir = root / "tls" if tls else None
    p = BenchSite(d, "P", size, hosts[0] if hosts else None, send_window=send_window,
                  tls_dir=tls_dir)
    ss = [BenchSite(d, f"S{i}", size, hosts[1 + i] if hosts else None, tls_dir=tls_dir)
          for i in range(secondaries)]
    p.admin("replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    return p, ss


def replicate_to(p: BenchSite, to: list[str], rcp: bool = True) -> float:
    t0 = time.monotonic()
    p.admin("replicate", "start", "--to", ",".join(to), *(["--group", GROUP] if rcp else []),
            timeout=1800)
    return time.monotonic() - t0


def down_all(*sites: BenchSite) -> None:
    for s in sites:  # (the primary first: it stops its send tasks)
        s.down()


def wait_dests(p: BenchSite, n: int, limit: float = 600) -> dict:
    """Poll the primary every 20 ms (100 ms over TLS) until every destination acked and
    played delta set n; returns the monotonic times {'acked': t, 'played': t} (the last
    destination's)."""
    deadline = time.monotonic() + limit
    t = {}
    while True:
        st = p.status()
        now = time.monotonic()
        ds = st["destinations"]
        if "acked" not in t and all(d["acked_delta_set"] >= n for d in ds):
            t["acked"] = now
        if all(d["played_delta_set"] >= n for d in ds):
            t["played"] = now
            t.setdefault("acked", now)
            return t
        for d in ds:
            if d["state"] == "error":
                raise RuntimeError(f"destination {d['name']}: {d.get('error')}")
        if now > deadline:
            raise RuntimeError(f"delta set {n} not played within {limit:.0f} s: {ds}")
        # (every request is a new connection: over TLS a handshake, which at 50 a second
        # costs the primary enough CPU to slow what is measured)
        time.sleep(0.1 if p.tls else 0.02)


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ship(p: BenchSite, mib: int, buf: bytes, name: str, ss=()) -> dict:
    """Write a new file of `mib` MiB (fsync), cut one delta set, time it to acked/played;
    with the secondaries `ss`, the CPU seconds per GiB each daemon used from cut to played
    (the status polls every 20 ms included)."""
    wt = write_file(p.mnt / name, mib, buf)
    c0 = [cpu_s(s.pid) for s in (p, *ss)]
    t0 = time.monotonic()
    r = p.api("POST", "/replicate/deltaset", {"wait": True})
    t_ready = time.monotonic()
    n = r["delta_set"]
    t = wait_dests(p, n)
    cpu = [(cpu_s(s.pid) - c) * 1024 / mib for s, c in zip((p, *ss), c0)]
    return {"mib": mib, "cpu_s_per_gib": cpu, "write_s": wt, "delta_set": n,
            "ready_s": t_ready - t0,
            "acked_s": t["acked"] - t0, "played_s": t["played"] - t0,
            "acked_mib_s": mib / (t["acked"] - t0), "played_mib_s": mib / (t["played"] - t0),
            "ship_mib_s": mib / max(1e-9, t["acked"] - t_ready)}


# ----------------------------------------------------------------------------- raw TCP

def tcp_rate(mib: int, listen_host: str, connect_host: str | None = None,
             rx_prefix=(), tx_prefix=(), port: int | None = None) -> float:
    """MiB/s from a trio sender process to a trio receiver process (1 MiB sends, recv_into),
    measured by the receiver from the accept to EOF. connect_host/port: another path to the
    listener (a proxy in between)."""
    import resource
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rx = spawn([sys.executable, __file__, "_tcp-recv", listen_host], prefix=rx_prefix)
    lport = int(rx.stdout.readline())
    tx = spawn([sys.executable, __file__, "_tcp-send", connect_host or listen_host,
                port or lport, mib], prefix=tx_prefix)
    finish(tx)
    res = json.loads(finish(rx))
    if res["bytes"] != mib * MiB:
        raise RuntimeError(f"raw TCP: {res['bytes']} bytes arrived of {mib * MiB}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) * 1024 / mib
    log(f"      (raw TCP: both processes together {cpu:.2f} CPU s per GiB, start-up included)")
    return res["bytes"] / MiB / res["seconds"]


def _tcp_recv(host: str) -> None:
    import trio

    async def main():
        lst = (await trio.open_tcp_listeners(0, host=host))[0]
        print(lst.socket.getsockname()[1], flush=True)
        stream = await lst.accept()
        t0 = time.perf_counter()
        sock = stream.socket
        buf = bytearray(MiB)
        total = 0
        while True:
            k = await sock.recv_into(buf)
            if not k:
                break
            total += k
        print(json.dumps({"bytes": total, "seconds": time.perf_counter() - t0}), flush=True)
        await stream.aclose()
        await lst.aclose()
    trio.run(main)


def _tcp_send(host: str, port: str, mib: str) -> None:
    import trio

    async def main():
        stream = await trio.open_tcp_stream(host, int(port))
        buf = os.urandom(MiB)
        for _ in range(int(mib)):
            await stream.send_all(buf)
        await stream.aclose()
    trio.run(main)


# ----------------------------------------------------------------------------- the proxy

class Proxy:
    """`rcp.py _proxy`: a TCP proxy in its own process (trio) that forwards each direction
    after `delay` seconds and counts the bytes each way (read back from its stats file)."""

    def __init__(self, root: Path, listen_host: str, to: str, delay: float):
        self.stats = root / f"proxy-{time.monotonic_ns()}.json"
        self.p = spawn([sys.executable, __file__, "_proxy", listen_host, to, delay, self.stats])
        self.address = f"{listen_host}:{int(self.p.stdout.readline())}"

    def counts(self) -> dict:
        for _ in range(50):
            try:
                return json.loads(self.stats.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
        return {"up": 0, "down": 0, "conns": 0}

    def close(self) -> None:
        stop(self.p)


def _proxy(host: str, to: str, delay: str, stats: str) -> None:
    import trio
    delay_s = float(delay)
    to_host, _, to_port = to.rpartition(":")
    counts = {"up": 0, "down": 0, "conns": 0}

    async def pump(src, dst, key):
        send, recv = trio.open_memory_channel(64)  # (at most 64 reads of <= 64 KiB queued)

        async def reader():
            async with send:
                while True:
                    data = await src.receive_some(65536)
                    if not data:
                        return
                    await send.send((trio.current_time() + delay_s, data))

        async def writer():
            async with recv:
                async for due, data in recv:
                    wait = due - trio.current_time()
                    if wait > 0:
                        await trio.sleep(wait)
                    await dst.send_all(data)
                    counts[key] += len(data)
            await dst.send_eof()

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(writer)

    async def handle(client):
        counts["conns"] += 1
        try:
            server = await trio.open_tcp_stream(to_host, int(to_port))
        except OSError:
            await client.aclose()
            return
        try:
            async with client, server:
                async with trio.open_nursery() as n:
                    n.start_soon(pump, client, server, "up")
                    n.start_soon(pump, server, client, "down")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except BaseExceptionGroup as eg:  # (both directions broke)
            rest = eg.subgroup(lambda e: not isinstance(
                e, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)))
            if rest is not None:
                raise rest

    async def writestats():
        tmp = stats + ".tmp"
        while True:
            Path(tmp).write_text(json.dumps(counts))
            os.replace(tmp, stats)
            await trio.sleep(0.1)

    async def main():
        lst = (await trio.open_tcp_listeners(0, host=host))[0]
        print(lst.socket.getsockname()[1], flush=True)
        async with trio.open_nursery() as n:
            n.start_soon(writestats)
            n.start_soon(trio.serve_listeners, handle, [lst])

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    trio.run(main)


# ----------------------------------------------------------------------------- sections

def text_mib() -> bytes:
    """1 MiB of compressible text (zstd level 1 makes it several times smaller)."""
    text = b"".join(b"%08d repfs benchmark: a compressible line of text, %08x\n" % (i, i * 7)
                    for i in range(MiB // 64))[:MiB]
    return text + bytes(MiB - len(text))


def sec_tput(root: Path, a, out: dict) -> None:
    log(f"\n== tput: replication vs raw TCP (load {loadavg()}) ==")
    lab = Lab()
    ha, hb = lab.add("a"), lab.add("b")
    buf = os.urandom(MiB)
    size = f"{max(4, (a.rounds * a.mib * 2) // 1024 + 2)}G"
    text = text_mib()
    lo_rcp = pair(root, "lo-rcp", size)
    lo_loc = pair(root, "lo-local", size, )
    ns_rcp = pair(root, "ns-rcp", size, hosts=[ha, hb])
    lo_raw = pair(root, "lo-nocomp", size)
    lo_tls = pair(root, "lo-tls", size, tls=True)
    pairs = [lo_rcp, lo_loc, ns_rcp, lo_raw, lo_tls]
    try:
        log("  initial copies (empty volumes):")
        for label, (p, ss), rcp in (("rcp 127.0.0.1", lo_rcp, True),
                                    ("local (HTTP 127.0.0.1)", lo_loc, False),
                                    ("rcp namespaces", ns_rcp, True),
                                    ("rcp 127.0.0.1, compression off", lo_raw, True),
                                    ("rcp 127.0.0.1, TLS", lo_tls, True)):
            to = [s.address for s in ss] if rcp else [str(s.site) for s in ss]
            log(f"    {label}: {replicate_to(p, to, rcp):.1f} s")
        # compression off: the destination's policy, taken by its next session (a remount)
        p = lo_raw[0]
        p.admin("replicate", "policy", "--to", lo_raw[1][0].address, "--compress", "off")
        p.down()
        p.mount()
        rows = {k: [] for k in ("tcp_lo", "tcp_ns", "rcp_lo", "local_lo", "rcp_ns", "disk",
                                "rcp_lo_nocomp", "rcp_lo_tls", "rcp_lo_text",
                                "rcp_lo_nocomp_text")}
        for r in range(a.rounds):
            log(f"  round {r + 1}/{a.rounds} (load {loadavg()})")
            rows["disk"].append(a.mib / write_file(root / "native", a.mib, buf))
            (root / "native").unlink()
            log(f"    disk: {a.mib} MiB written + fsync: {rows['disk'][-1]:8.0f} MiB/s")
            rows["tcp_lo"].append(tcp_rate(a.tcp_mib, "127.0.0.1"))
            log(f"    raw TCP 127.0.0.1:        {rows['tcp_lo'][-1]:8.0f} MiB/s")
            rows["tcp_ns"].append(tcp_rate(a.tcp_mib, hb["addr"], rx_prefix=hb["nsenter"],
                                           tx_prefix=ha["nsenter"]))
            log(f"    raw TCP namespaces:       {rows['tcp_ns'][-1]:8.0f} MiB/s")
            for key, (p, ss), data in (("rcp_lo", lo_rcp, buf), ("local_lo", lo_loc, buf),
                                       ("rcp_ns", ns_rcp, buf), ("rcp_lo_nocomp", lo_raw, buf),
                                       ("rcp_lo_tls", lo_tls, buf),
                                       ("rcp_lo_text", lo_rcp, text),
                                       ("rcp_lo_nocomp_text", lo_raw, text)):
                res = ship(p, a.mib, data, f"r{r}-{key}", ss)
                rows[key].append(res)
                log(f"    {key:18s} {a.mib} MiB: write {a.mib / res['write_s']:.0f} MiB/s; "
                    f"cut->ready {res['ready_s']:.2f} s, ->acked {res['acked_s']:.2f} s "
                    f"({res['acked_mib_s']:.0f} MiB/s; ready->acked {res['ship_mib_s']:.0f}), "
                    f"->played {res['played_s']:.2f} s ({res['played_mib_s']:.0f} MiB/s); "
                    f"CPU s per "
                    f"GiB: primary {res['cpu_s_per_gib'][0]:.2f}, secondary "
                    f"{res['cpu_s_per_gib'][1]:.2f}")
        out["tput"] = rows
        tlo, tns = med(rows["tcp_lo"]), med(rows["tcp_ns"])
        table = out.setdefault("table", [])
        table.append(("raw TCP trio pair, 127.0.0.1", tlo, None, None, "MiB/s"))
        table.append(("raw TCP trio pair, namespaces", tns, None, None, "MiB/s"))
        table.append(("disk: 1 MiB writes + fsync, native file system", med(rows["disk"]),
                      None, None, "MiB/s"))
        for key, title, base in (
                ("rcp_lo", "RCP 127.0.0.1, cut->acked", tlo),
                ("local_lo", "local HTTP 127.0.0.1, cut->acked", tlo),
                ("rcp_ns", "RCP namespaces, cut->acked", tns),
                ("rcp_lo_nocomp", "RCP 127.0.0.1 compression off, cut->acked", tlo),
                ("rcp_lo_tls", "RCP 127.0.0.1 TLS, cut->acked", tlo),
                ("rcp_lo_text", "RCP 127.0.0.1 text data (zstd), cut->acked", tlo),
                ("rcp_lo_nocomp_text", "RCP 127.0.0.1 text data compression off, cut->acked",
                 tlo)):
            v = med([x["acked_mib_s"] for x in rows[key]])
            table.append((title, v, v / base, 0.7, "MiB/s"))
            v2 = med([x["played_mib_s"] for x in rows[key]])
            table.append((title.replace("acked", "played"), v2, v2 / base, None, "MiB/s"))
    finally:
        for p, ss in pairs:
            down_all(p, *ss)
        _labs.remove(lab)
        lab.close()


def sec_wan(root: Path, a, out: dict) -> None:
    log(f"\n== wan: {LINK_MBIT} Mbit/s (tc tbf on the secondary's veth) + "
        f"{2 * DELAY_S * 1000:.0f} ms round trip (delaying proxy) (load {loadavg()}) ==")
    lab = Lab()
    ha, hb = lab.add("a"), lab.add("b")
    buf = os.urandom(MiB)
    link = LINK_MBIT * 1e6 / 8 / MiB
    res = {"link_mib_s": link, "windows": {}}
    try:
        lab.limit_rate(hb, LINK_MBIT)
        # raw TCP through the same path (sender in a, proxy in the root namespace, receiver in b)
        rx = spawn([sys.executable, __file__, "_tcp-recv", hb["addr"]], prefix=hb["nsenter"])
        lport = int(rx.stdout.readline())
        px = Proxy(root, lab.gw, f"{hb['addr']}:{lport}", DELAY_S)
        try:
            tx = spawn([sys.executable, __file__, "_tcp-send", lab.gw,
                        px.address.rpartition(":")[2], a.wan_mib], prefix=ha["nsenter"])
            finish(tx)
            r = json.loads(finish(rx))
            res["tcp_mib_s"] = r["bytes"] / MiB / r["seconds"]
        finally:
            px.close()
        log(f"  link {link:.2f} MiB/s; raw TCP through the proxy: {res['tcp_mib_s']:.2f} MiB/s")
        for w in a.windows:
            tag = f"wan-w{w}"
            p, ss = pair(root, tag, "2G", hosts=[ha, hb], send_window=w)
            px = Proxy(root, lab.gw, ss[0].address, DELAY_S)
            try:
                replicate_to(p, [px.address])
                xs = [ship(p, a.wan_mib, buf, f"w{r}") for r in range(a.wan_rounds)]
                c = px.counts()
                v = med([x["acked_mib_s"] for x in xs])
                res["windows"][w] = {"runs": xs, "proxy": c}
                log(f"  send_window {w:3d}: {a.wan_mib} MiB cut->acked "
                    + ", ".join(f"{x['acked_s']:.1f} s ({x['acked_mib_s']:.2f} MiB/s)"
                                for x in xs)
                    + f"; x link {v / link:.2f}; ->played "
                    + ", ".join(f"{x['played_mib_s']:.2f}" for x in xs) + " MiB/s")
                out.setdefault("table", []).append(
                    (f"WAN 100 Mbit/s 50 ms, send_window {w}, cut->acked", v, v / link, 0.7,
                     "MiB/s"))
                if w == a.windows[-1]:  # compressible text (zstd on, the default)
                    text = text_mib()
                    c0 = px.counts()
                    x = ship(p, a.wan_mib, text, "text")
                    c1 = px.counts()
                    wire = (c1["up"] - c0["up"]) / MiB
                    res["text"] = {"run": x, "wire_mib": wire, "window": w}
                    log(f"  text data, send_window {w}: {a.wan_mib} MiB cut->acked "
                        f"{x['acked_s']:.1f} s ({x['acked_mib_s']:.2f} MiB/s of data, "
                        f"x link {x['acked_mib_s'] / link:.2f}); {wire:.1f} MiB on the wire")
                    out.setdefault("table", []).append(
                        (f"WAN, text data (zstd), send_window {w}, cut->acked",
                         x["acked_mib_s"], x["acked_mib_s"] / link, 0.7, "MiB/s"))
            finally:
                px.close()
                down_all(p, *ss)
        out.setdefault("table", []).append(
            ("WAN raw TCP trio pair through the proxy", res["tcp_mib_s"],
             res["tcp_mib_s"] / link, None, "MiB/s"))
        out["wan"] = res
    finally:
        _labs.remove(lab)
        lab.close()


def sec_lag(root: Path, a, out: dict) -> None:
    log(f"\n== lag: paced writer {a.lag_rate} MiB/s for {a.lag_s} s, RCP over 127.0.0.1, "
        f"policy --timeout 1 (load {loadavg()}) ==")
    import repl as rpb  # tools/bench/repl.py (paced_writer)
    buf = os.urandom(MiB)
    res = {}
    for k in (1, 3):
        p, ss = pair(root, f"lag{k}", f"{max(2, a.lag_rate * a.lag_s // 1024 + 2)}G",
                     secondaries=k)
        try:
            replicate_to(p, [s.address for s in ss])
            p.admin("replicate", "policy", "--timeout", "1", "--hwm", "64M")
            import threading
            samples, stop_ev = [], threading.Event()

            def sampler():
                t0 = time.monotonic()
                while not stop_ev.is_set():
                    try:
                        st = p.status()
                        samples.append({"t": time.monotonic() - t0,
                                        "lags": [d["lag_seconds"] for d in st["destinations"]],
                                        "cut": st["last_cut_delta_set"],
                                        "played": [d["played_delta_set"]
                                                   for d in st["destinations"]]})
                    except Exception:  # noqa: BLE001
                        pass
                    stop_ev.wait(1.0)
            th = threading.Thread(target=sampler, daemon=True)
            th.start()
            w = rpb.paced_writer(p.mnt, a.lag_rate, a.lag_s, buf)
            during = list(samples)
            t1 = time.monotonic()
            caught = None
            while time.monotonic() - t1 < 120:
                st = p.status()
                if (st["current_delta_set_blocks"] == 0
                        and all(d["lag_seconds"] == 0.0 and d["played_delta_set"]
                                == st["last_cut_delta_set"] for d in st["destinations"])):
                    caught = time.monotonic() - t1
                    break
                time.sleep(0.2)
            stop_ev.set()
            th.join()
            lags = [max(s["lags"]) for s in during if s["lags"]]
            r = {"writer_mib_s": w["achieved_mib_s"], "samples": during,
                 "lag_median_s": med(lags), "lag_max_s": max(lags) if lags else None,
                 "catch_up_s": caught}
            res[k] = r
            log(f"  {k} destination(s): writer {w['achieved_mib_s']:.1f} MiB/s; lag (the "
                f"worst destination) median {f(r['lag_median_s'], '.1f', ' s')}, max "
                f"{f(r['lag_max_s'], '.1f', ' s')}; caught up {f(caught, '.1f', ' s')} after")
            log("    t(s)  cut  played  lag(s) per destination")
            for s in during:
                log(f"    {s['t']:4.0f} {s['cut']:4d}  {s['played']}  "
                    + " ".join(f"{x:.1f}" for x in s["lags"]))
            out.setdefault("table", []).append(
                (f"lag, {k} destination(s), {a.lag_rate} MiB/s load: median / max",
                 r["lag_median_s"], r["lag_max_s"], None, "s"))
        finally:
            down_all(p, *ss)
    out["lag"] = res


def make_tree(d: Path, mib: int, buf: bytes) -> int:
    """Files of 4 MiB (and 256 files of 4 KiB in subdirectories) up to `mib` MiB; bytes."""
    total = 0
    for i in range(mib // 4):
        sub = d / f"dir{i % 8}"
        sub.mkdir(exist_ok=True)
        with open(sub / f"big{i}", "wb") as fh:
            for _ in range(4):
                fh.write(buf)
        total += 4 * MiB
    for i in range(256):
        sub = d / f"small{i % 16}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}").write_bytes(buf[i * 4096:(i + 1) * 4096])
        total += 4096
    os.sync()
    return total


def copy_phase(text: str) -> float | None:
    """Seconds from the primary's 'replication to ... started' line to 'initial copy done'."""
    from datetime import datetime
    ts = {}
    for line in text.splitlines():
        for key, needle in (("start", "INFO repfs.repl.verbs: replication to "),
                            ("done", ": initial copy done (")):
            if needle in line:
                ts[key] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    if "start" in ts and "done" in ts:
        return ts["done"] - ts["start"]
    return None


def sec_copy(root: Path, a, out: dict) -> None:
    log(f"\n== copy: initial copy vs rsync -a of a {a.copy_mib} MiB tree across the namespaces, "
        f"both through a counting proxy (load {loadavg()}) ==")
    rsync = shutil.which("rsync")
    if not rsync:
        raise RuntimeError("rsync is not installed (apt-get install rsync)")
    lab = Lab()
    ha, hb = lab.add("a"), lab.add("b")
    buf = os.urandom(MiB)
    res = {}
    p, ss = pair(root, "copy", f"{a.copy_mib // 1024 + 2}G", hosts=[ha, hb])
    rdir = root / "copy" / "rsync-dst"
    rdir.mkdir()
    conf = root / "copy" / "rsyncd.conf"
    conf.write_text(f"pid file = {root / 'copy' / 'rsyncd.pid'}\nuse chroot = no\n"
                    f"[bench]\npath = {rdir}\nread only = false\nuid = root\ngid = root\n")
    rsd = spawn([rsync, "--daemon", "--no-detach", f"--config={conf}", f"--address={hb['addr']}",
                 "--port=8873"], prefix=hb["nsenter"])
    try:
        res["tree_bytes"] = make_tree(p.mnt, a.copy_mib, buf)
        for _ in range(100):  # (the rsync daemon listening)
            if run([*hb["nsenter"], "ss", "-ltn"], check=False).stdout.find(":8873") >= 0:
                break
            time.sleep(0.1)
        # rsync first
        px = Proxy(root, lab.gw, f"{hb['addr']}:8873", 0.0)
        try:
            drop_caches()
            t0 = time.monotonic()
            r = run([*ha["nsenter"], rsync, "-a", "--stats", f"{p.mnt}/",
                     f"rsync://{px.address}/bench/"], timeout=1800)
            res["rsync_s"] = time.monotonic() - t0
            os.sync()
            res["rsync_wire"] = px.counts()
            m = re.search(r"Total bytes sent: ([\d,.]+)", r.stdout)
            res["rsync_sent_stat"] = int(re.sub(r"[,.]", "", m.group(1))) if m else None
        finally:
            px.close()
        px = Proxy(root, lab.gw, ss[0].address, 0.0)
        try:
            drop_caches()
            res["copy_s"] = replicate_to(p, [px.address])
            time.sleep(0.3)
            res["copy_wire"] = px.counts()
        finally:
            px.close()
        log_text = (p.site / "repfs.log").read_text(errors="replace")
        m = re.findall(r"initial copy done \((\d+) blocks\)", log_text)
        res["valid_bytes"] = int(m[-1]) * 4096 if m else None
        res["copy_phase_s"] = copy_phase(log_text)
        out["copy"] = res
        cw = res["copy_wire"]["up"] + res["copy_wire"]["down"]
        rw = res["rsync_wire"]["up"] + res["rsync_wire"]["down"]
        log(f"  tree {res['tree_bytes'] / MiB:.1f} MiB; rsync -a {res['rsync_s']:.1f} s "
            f"({rw / MiB:.1f} MiB on the wire, both ways); initial copy {res['copy_s']:.1f} s "
            f"(started -> done in the log {f(res['copy_phase_s'], '.1f', ' s')}; "
            f"{cw / MiB:.1f} MiB on the wire, both ways; valid blocks "
            f"{f(res['valid_bytes'] and res['valid_bytes'] / MiB, '.1f', ' MiB')})")
        table = out.setdefault("table", [])
        table.append(("rsync -a of the tree (same path)", res["rsync_s"], None, None, "s"))
        table.append(("initial copy (replicate start, the CLI's time)", res["copy_s"],
                      res["copy_s"] / res["rsync_s"], "< 1.0 (faster)", "s"))
        if res["copy_phase_s"] is not None:
            table.append(("initial copy (the daemon's log: started -> done)",
                          res["copy_phase_s"], res["copy_phase_s"] / res["rsync_s"],
                          "< 1.0 (faster)", "s"))
        if res["valid_bytes"]:
            table.append(("initial copy: wire bytes / valid bytes", cw / res["valid_bytes"],
                          None, "<= 1.05", "x"))
        table.append(("rsync: wire bytes / tree bytes", rw / res["tree_bytes"], None, None, "x"))
    finally:
        stop(rsd)
        down_all(p, *ss)
        _labs.remove(lab)
        lab.close()


SECTIONS = {"tput": sec_tput, "wan": sec_wan, "lag": sec_lag, "copy": sec_copy}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_tcp-recv":
        _tcp_recv(*argv[1:])
        return 0
    if argv and argv[0] == "_tcp-send":
        _tcp_send(*argv[1:])
        return 0
    if argv and argv[0] == "_proxy":
        _proxy(*argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--mib", type=int, help="MiB per delta set (tput)")
    ap.add_argument("--tcp-mib", type=int, help="MiB per raw TCP run")
    ap.add_argument("--wan-mib", type=int)
    ap.add_argument("--windows", default="1,2,8,32", help="[repl] send_window values (wan)")
    ap.add_argument("--lag-s", type=int)
    ap.add_argument("--lag-rate", type=int, default=10, help="MiB/s of the paced writer")
    ap.add_argument("--copy-mib", type=int)
    ap.add_argument("--tmpdir")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.mib = a.mib or (128 if q else 512)
    a.tcp_mib = a.tcp_mib or (1024 if q else 4096)
    a.wan_mib = a.wan_mib or (24 if q else 64)
    a.wan_rounds = 1 if q else 2
    a.windows = [int(w) for w in a.windows.split(",")]
    a.lag_s = a.lag_s or (20 if q else 30)
    a.copy_mib = a.copy_mib or (128 if q else 512)
    only = [s for s in a.only.split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; known: {','.join(SECTIONS)}")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, tc, drop_caches)")
    log(f"command: {shlex.join([sys.executable, *sys.argv])}")
    log(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; nproc {os.cpu_count()}; "
        f"commit {commit()}; load average {loadavg()}")
    root = Path(tempfile.mkdtemp(prefix="repfs-bench-rcp-", dir=a.tmpdir))
    out: dict = {"argv": sys.argv, "date": time.time(), "commit": commit(),
                 "load_start": loadavg()}
    failed = False

    def on_term(*_):
        raise SystemExit(143)
    signal.signal(signal.SIGTERM, on_term)
    atexit.register(cleanup_all)
    try:
        for s in only:
            try:
                SECTIONS[s](root, a, out)
            except Exception as e:  # noqa: BLE001
                failed = True
                traceback.print_exc(file=sys.stdout)
                out.setdefault("table", []).append((f"{s}: ERROR {e}", None, None, None, ""))
            finally:
                cleanup_all()
    finally:
        cleanup_all()
        shutil.rmtree(root, ignore_errors=True)
    out["load_end"] = loadavg()
    log("\n== summary (compression: zstd, on by default; data is random unless 'text') ==")
    log(f"{'row':<58}{'value':>10} {'unit':<6}{'ratio':>8}{'target':>16}")
    for title, v, ratio, target, unit in out.get("table", []):
        if unit == "s" and title.startswith("lag"):
            log(f"{title:<58}{f(v, '.1f'):>10} {unit:<6}{'max ' + f(ratio, '.1f'):>8}")
            continue
        met = ""
        if isinstance(target, float) and ratio is not None:
            met = " met" if ratio >= target else " MISSED"
        elif target == "<= 1.05" and v is not None:
            met = " met" if v <= 1.05 else " MISSED"
        elif target == "< 1.0 (faster)" and ratio is not None:
            met = " met" if ratio < 1.0 else " MISSED"
        log(f"{title:<58}{f(v, '.2f' if unit == 'x' else '.1f'):>10} {unit:<6}"
            f"{(f(ratio, '.2f') + 'x') if ratio is not None else '':>8}"
            f"{(('>= ' + str(target) + 'x') if isinstance(target, float) else (target or '')):>16}"
            f"{met}")
    log(f"load average at the end: {out['load_end']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
