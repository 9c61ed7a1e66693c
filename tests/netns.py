"""Sites on separate hosts, on one machine: network namespaces for the network tests (issue 9).

The ``netlab`` fixture gives a test a `NetLab`: one bridge in the root network namespace and,
per site (`NetLab.add_site`), a network namespace joined to that bridge by a veth pair::

        test process (root namespace)  10.231.N.1/24 on bridge rfsbN
                 |-- veth rfsNv0 ==== rfsNp0  10.231.N.10/24  namespace rfsN-NAME0 (+ lo)
                 `-- veth rfsNv1 ==== rfsNp1  10.231.N.11/24  namespace rfsN-NAME1 (+ lo)

Why a bridge, not veth pairs between the namespaces: all sites and the root namespace share one
subnet, so the test process reaches every site's daemon directly (`repfs-admin --site
ADDR:PORT`, its control socket, its `SITE/control.json`) and each site reaches every other, with
no routes, no forwarding and no firewall to set up. A veth pair per site pair would give the
root namespace no way in. Each site still has a link of its own (its veth), which is what a test
cuts (`cut_link`: the bridge's end is set down, so the site's end loses carrier and packets to
and from it vanish, as when a cable is pulled; sockets get no error) and slows (`limit_rate`,
a tc tbf on both ends).

Names and subnets are unique per lab: N (0..249) comes from the pytest-xdist worker id and a
counter (worker gwK starts at 100*(K+1)), and a lab takes N by creating bridge ``rfsbN``, which
fails if another lab (another worker, another pytest run) holds it; it then tries the next.
Every site's daemon listens on the same port (`PORT`) of its own address, since each namespace
has its own ports.

Daemons: `NetLab.mount_in` runs ``nsenter --net=/var/run/netns/NS repfs mount SITE MNT
--listen ADDR:PORT`` (not ``ip netns exec``, whose private mount namespace would hide the FUSE
mount from the test). The mount is a `tests.conftest.Mount`; the teardown is conftest's
`teardown_mount` (clean umount, a log without warnings, fsck). A daemon listening on a
non-loopback address without TLS warns about it (issue 9 item 2): the teardown requires that
WARNING and accepts it.

Teardown (also when the test failed): the mounts, then whatever still runs in a lab's namespace
(daemons the test started; each killed by its pid), then the veths, the namespaces and the
bridge; then it checks nothing of the lab is left (`ip netns list`, `ip link`). Without root or
without `ip netns` / `nsenter`, the fixture skips the test and says why.
"""

from __future__ import annotations

import inspect
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Mount, run_repfs, teardown_mount

PORT = 7070  # every site's daemon listens on this port of its own namespace's address
NETNS_DIR = Path("/var/run/netns")
NO_TLS_WARNING = "without TLS"  # a daemon listening beyond loopback without TLS says so
_labs = itertools.count()
_unavailable: list[str | None] = []  # cached reason (or None) from the first probe


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}: "
                             f"{r.stderr.strip()}")
    return r


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None if they can (probed once)."""
    if _unavailable:
        return _unavailable[0]
    reason = None
    if os.geteuid() != 0:
        reason = "network namespaces need root"
    elif not (shutil.which("ip") and shutil.which("nsenter") and shutil.which("tc")):
        reason = "`ip`, `nsenter` or `tc` is not installed"
    else:
        probe = f"rfsprobe{os.getpid()}"
        r = _run("ip", "netns", "add", probe, check=False)
        if r.returncode != 0:
            reason = f"`ip netns add` fails: {r.stderr.strip()}"
        else:
            _run("ip", "netns", "del", probe, check=False)
    _unavailable.append(reason)
    return reason


def _worker_index() -> int:
    """0 without xdist, K+1 on worker gwK."""
    w = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(w[2:]) + 1 if w.startswith("gw") and w[2:].isdigit() else 0


@dataclass
class NetSite:
    """One site's host: a namespace with an address on the lab's subnet."""
    name: str
    ns: str        # the namespace's name (/var/run/netns/NS)
    addr: str      # its address on the lab's subnet
    veth: str      # the veth's end in the root namespace, on the bridge
    peer: str      # the veth's end in the site's namespace

    @property
    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR / self.ns}"]

    @property
    def listen(self) -> str:
        """ADDR:PORT for `repfs mount --listen` and `repfs-admin --site`."""
        return f"{self.addr}:{PORT}"


def _connect_until(addr: str, port: int, timeout: float) -> bool:
    """Try to open a TCP connection every 0.2 s until one opens (True) or `timeout` passed.
    (Runs in a site's namespace too, as `python -c` of its source: standard library only.)"""
    import socket
    import time
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((addr, port), timeout=0.2).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def tcp_reachable(addr: str, port: int, from_ns: NetSite | None = None,
                  timeout: float = 2.0) -> bool:
    """Whether a TCP connection to addr:port opens within `timeout` seconds, from the test
    process or from inside a site's namespace (ping is not installed here). Attempts repeat
    until then: just after `restore_link` a first SYN (or its answer) may wait for ARP, whose
    cache still says the peer was not there."""
    if from_ns is None:
        return _connect_until(addr, port, timeout)
    code = (inspect.getsource(_connect_until)
            + f"raise SystemExit(0 if _connect_until({addr!r}, {port}, {timeout}) else 1)\n")
    r = subprocess.run([*from_ns.nsenter, sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=timeout + 30)
    assert r.returncode in (0, 1), f"the probe in {from_ns.ns} failed: {r.stderr.strip()}"
    return r.returncode == 0


class NetLab:
    """A bridge, the sites' namespaces on it, the daemons mounted in them (see the module's
    docstring). Use through the ``netlab`` fixture, which tears it all down."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.sites: list[NetSite] = []
        self.mounts: list[Mount] = []
        self.n = self.bridge = None
        start = 100 * _worker_index()
        for _ in range(250):
            n = (start + next(_labs)) % 250
            r = _run("ip", "link", "add", f"rfsb{n}", "type", "bridge", check=False)
            if r.returncode == 0:
                self.n, self.bridge = n, f"rfsb{n}"
                break
            if "exists" not in r.stderr:
                raise AssertionError(f"ip link add rfsb{n} type bridge: {r.stderr.strip()}")
        else:
            raise AssertionError("no free lab number: 250 bridges rfsb* exist")
        self.prefix = f"10.231.{self.n}"
        try:
            _run("ip", "addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
        except BaseException:
            _run("ip", "link", "del", self.bridge, check=False)
            raise

    def add_site(self, name: str) -> NetSite:
        """A namespace for site `name`, its veth on the bridge, address and links up."""
        i = len(self.sites)
        s = NetSite(name=name, ns=f"rfs{self.n}-{name}", addr=f"{self.prefix}.{10 + i}",
                    veth=f"rfs{self.n}v{i}", peer=f"rfs{self.n}p{i}")
        _run("ip", "netns", "add", s.ns)
        self.sites.append(s)  # (from here on the teardown removes it)
        _run("ip", "link", "add", s.veth, "type", "veth", "peer", "name", s.peer, "netns", s.ns)
        _run("ip", "link", "set", s.veth, "master", self.bridge, "up")
        _run("ip", "-n", s.ns, "link", "set", "lo", "up")
        _run("ip", "-n", s.ns, "addr", "add", f"{s.addr}/24", "dev", s.peer)
        _run("ip", "-n", s.ns, "link", "set", s.peer, "up")
        return s

    # ------------------------------------------------------------------------ daemons

    def mount_in(self, ns: NetSite, site: Path, mnt: Path, listen: str | None = None, *args,
                 size: str = "1G", mkfs_args=()) -> Mount:
        """`nsenter --net=... repfs mount SITE MNT --listen ADDR:PORT [ARGS]` (mkfs first if
        SITE has no volume); torn down with conftest's teardown_mount."""
        site, mnt = Path(site), Path(mnt)
        if not (site / "volume.img").exists():
            run_repfs("mkfs", site, "--size", size, *mkfs_args)
        mnt.mkdir(parents=True, exist_ok=True)
        run_repfs("mount", site, mnt, "--listen", listen or ns.listen, *args, prefix=ns.nsenter)
        assert os.path.ismount(mnt)
        m = Mount(site, mnt)
        if not ipaddress.ip_address((listen or ns.listen).rpartition(":")[0]).is_loopback:
            m.expect_log(NO_TLS_WARNING)  # (and the teardown checks it was said)
        self.mounts.append(m)
        return m

    # ------------------------------------------------------------------------ the links

    def cut_link(self, ns: NetSite) -> None:
        """Pull the site's cable: the bridge's end of its veth goes down."""
        _run("ip", "link", "set", ns.veth, "down")

    def restore_link(self, ns: NetSite) -> None:
        _run("ip", "link", "set", ns.veth, "up")

    def limit_rate(self, ns: NetSite, mbit: float | None) -> None:
        """A token bucket (tc tbf) of `mbit` Mbit/s on both ends of the site's veth (so each
        direction is limited); removed with the veth, or now by `mbit` None."""
        if mbit is None:
            _run("tc", "qdisc", "del", "dev", ns.veth, "root")
            _run("tc", "-n", ns.ns, "qdisc", "del", "dev", ns.peer, "root")
            return
        burst = max(16 * 1024, int(mbit * 1e6 / 8 / 250))  # (bytes: at least 4 ms at the rate)
        tbf = ["qdisc", "replace", "dev", "{}", "root", "tbf", "rate", f"{mbit}mbit",
               "burst", str(burst), "latency", "100ms"]
        _run("tc", *[a.format(ns.veth) for a in tbf])
        _run("tc", "-n", ns.ns, *[a.format(ns.peer) for a in tbf])

    def tcp_reachable(self, addr: str, port: int = PORT, from_ns: NetSite | None = None,
                      timeout: float = 2.0) -> bool:
        return tcp_reachable(addr, port, from_ns, timeout)

    # ------------------------------------------------------------------------ teardown

    def close(self) -> list[str]:
        """Remove everything; returns the problems found (the fixture fails the test on them)."""
        errors: list[str] = []
        for s in self.sites:  # (a test that failed with a link cut: let the daemons finish)
            _run("ip", "link", "set", s.veth, "up", check=False)
        for m in self.mounts:
            try:
                teardown_mount(m.path, m.site, m.expected_log, errors)
            except Exception as e:  # (go on: the namespaces must go whatever happened)
                errors.append(f"teardown of {m.path}: {e!r}")
        for s in self.sites:
            self._kill_inside(s, errors)
        for s in self.sites:
            _run("ip", "link", "del", s.veth, check=False)  # (both ends go)
            _run("ip", "netns", "del", s.ns, check=False)
        if self.bridge:
            _run("ip", "link", "del", self.bridge, check=False)
        left = [s.ns for s in self.sites if (NETNS_DIR / s.ns).exists()]
        links = _run("ip", "-o", "link", "show", check=False).stdout
        left += [x for x in [self.bridge] + [s.veth for s in self.sites]
                 if x and (f" {x}:" in links or f" {x}@" in links)]
        if left:
            errors.append(f"left behind: {left}")
        return errors

    def _kill_inside(self, s: NetSite, errors: list[str]) -> None:
        """Processes still in the site's namespace after its unmount are ours (a daemon that
        did not exit, a hung probe): each is killed by its pid, and the test fails."""
        if not (NETNS_DIR / s.ns).exists():
            return
        pids = [int(p) for p in _run("ip", "netns", "pids", s.ns, check=False).stdout.split()]
        if not pids:
            return
        errors.append(f"processes still running in namespace {s.ns}: {pids} (killed)")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _run("ip", "netns", "pids", s.ns, check=False).stdout.split():
            if time.monotonic() > deadline:
                errors.append(f"processes in namespace {s.ns} survive SIGKILL")
                return
            time.sleep(0.05)


@pytest.fixture
def netlab(tmp_path):
    """A `NetLab` (see the module's docstring); skips the test where namespaces are unavailable."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"no network namespaces: {reason}")
    lab = NetLab(tmp_path)
    try:
        yield lab
    finally:
        errors = lab.close()
    assert not errors, "\n".join(errors)
