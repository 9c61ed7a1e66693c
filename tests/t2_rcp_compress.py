"""Tier 2: zstd compression on the wire and the per-destination bandwidth limit, through real
daemons on 127.0.0.1 (tests/t2_rcp.py's pair of sites in one replication group).

The primary replicates through a FrameProxy, a TCP proxy of the test that forwards both ways
and reads the frames the primary sends (their type, flags and length; the RCP stream is
plain on loopback): compressible data goes in CHUNK frames flagged FLAG_ZSTD, in far fewer
bytes than its size; random data goes raw, unflagged; with `replicate policy --to DEST
--compress off` the next session offers no compression and nothing is flagged; in every case
the secondary's tree equals the primary's. The bandwidth limit is recorded, shown by status
and `replicate policy`, refused in one line when bad (changing nothing), and replication
converges under it (its timing is tests/t0_rcp_compress.py's, on a fake clock: no wall-clock
assertions here).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from pathlib import Path

from repfs.rcp import wire
from tests.t2_rcp import GROUP, SiteProxy, remote_pair
from tests.t2_repl import (admin, admin_json, api, assert_same_tree, cut, start_replication,
                           wait_converged)

MIB = 1 << 20


class FrameProxy(SiteProxy):
    """A proxy that records each frame the client sends as (type name, flags, body length),
    in `frames` (all connections, in order of arrival)."""

    def __init__(self, site: Path):
        self.frames: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()
        super().__init__(site)

    def _pump(self, a, b, up: bool) -> None:
        buf = bytearray()
        preface = True
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
                if not up:
                    continue
                buf += data
                if preface:
                    if len(buf) < len(wire.PREFACE):
                        continue
                    assert bytes(buf[:len(wire.PREFACE)]) == wire.PREFACE
                    del buf[:len(wire.PREFACE)]
                    preface = False
                while len(buf) >= wire.HEADER.size:
                    code, flags, _, length, *_ = wire.HEADER.unpack_from(buf)
                    if len(buf) < wire.HEADER.size + length:
                        break
                    with self.lock:
                        self.frames.append((wire.TYPES[code].name, flags, length))
                    del buf[:wire.HEADER.size + length]
        except OSError:
            pass
        finally:
            self.shut(a, b)

    def mark(self) -> int:
        with self.lock:
            return len(self.frames)

    def chunks_since(self, mark: int) -> tuple[int, int, int, int]:
        """CHUNK frames since `mark`: (flagged frames, their bytes, raw frames, their
        bytes)."""
        with self.lock:
            got = [f for f in self.frames[mark:] if f[0] == "CHUNK"]
        z = [n for _, fl, n in got if fl & wire.FLAG_ZSTD]
        r = [n for _, fl, n in got if not fl & wire.FLAG_ZSTD]
        return len(z), sum(z), len(r), sum(r)


def text(size: int, tag: str) -> bytes:
    line = f"{tag}: a line of a log file, much like the one before it\n".encode()
    out = b"".join(line.replace(b"line", b"line %08d" % i) for i in range(size // len(line)
                                                                            + 1))
    return out[:size]


def status(m) -> dict:
    return api(m.site, "GET", "/status")  # (the CLI's JSON, without starting a CLI)


def post(site: Path, path: str, body: dict) -> tuple[int, dict]:
    """POST a JSON body to a site's control port: (status, answer)."""
    c = json.loads((site / "control.json").read_text())
    token = (site / "control.token").read_text().strip()
    conn = http.client.HTTPConnection(c["host"], c["port"], timeout=30)
    try:
        conn.request("POST", "/v1" + path, json.dumps(body),
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def write(root: Path, name: str, data: bytes) -> None:
    with open(root / name, "wb") as f:
        f.write(data)


def test_compression_on_off_and_the_bandwidth_limit(mount_site):
    m1, m2 = remote_pair(mount_site)
    proxy = FrameProxy(m2.site)
    try:
        d = start_replication(m1, m2, "--group", GROUP, to=proxy.address)
        name = d["name"]
        dst = status(m1)["destinations"][0]
        assert (dst["bwlimit"], dst["compress"]) == (0, True)  # the defaults
        log2 = m2.site / "repfs.log"
        assert "(protocol version 1, zstd)" in log2.read_text()

        # compressible: every chunk flagged, the wire carries a fraction of the data
        mark = proxy.mark()
        write(m1.path, "text1", text(3 * MIB, "one"))
        wait_converged(m1, m2, cut(m1))
        nz, zbytes, nr, rbytes = proxy.chunks_since(mark)
        assert nz >= 3 and zbytes + rbytes < MIB // 2, (nz, zbytes, nr, rbytes)
        assert_same_tree(m1.path, m2.path)

        # incompressible: sent raw, unflagged, at least its size
        mark = proxy.mark()
        write(m1.path, "noise1", os.urandom(2 * MIB))
        wait_converged(m1, m2, cut(m1))
        nz, zbytes, nr, rbytes = proxy.chunks_since(mark)
        assert nr >= 2 and rbytes >= 2 * MIB and zbytes < MIB // 4, (nz, zbytes, nr, rbytes)
        assert_same_tree(m1.path, m2.path)

        # compression off for this destination: the next session offers none
        out = admin_json(m1.path, "replicate", "policy", "--to", name, "--compress", "off")
        assert out == {"destination": name, "bwlimit": 0, "compress": False}
        mark = proxy.mark()
        write(m1.path, "text2", text(2 * MIB, "two"))
        wait_converged(m1, m2, cut(m1))
        nz, zbytes, nr, rbytes = proxy.chunks_since(mark)
        assert nz == 0 and rbytes >= 2 * MIB, (nz, zbytes, nr, rbytes)
        assert_same_tree(m1.path, m2.path)
        assert "(protocol version 1)" in log2.read_text()  # (the session without zstd)
        assert status(m1)["destinations"][0]["compress"] is False

        # the bandwidth limit: bad values refused in one line, nothing changed
        for args, needle in [
                (["--to", name, "--bwlimit", "10K"], "at least 64K"),
                (["--to", name, "--bwlimit=-5M"], "must be positive"),
                (["--bwlimit", "1M"], "per destination: give --to NAME")]:
            r = admin(m1.path, "replicate", "policy", *args, check=False)
            assert r.returncode != 0 and needle in r.stderr, (args, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        for body, needle in [  # (the daemon's own checks, as another client meets them)
                ({"to": name, "bwlimit": 1000}, "at least 64K"),
                ({"to": name, "bwlimit": "fast"}, "bad bandwidth limit"),
                ({"to": name, "compress": "yes"}, "bad compress"),
                ({"to": "nosuch", "bwlimit": 1 << 20}, "no destination named 'nosuch'"),
                ({"to": name, "bwlimit": 1 << 20, "timeout": 5}, "apply to the whole site")]:
            code, doc = post(m1.site, "/replicate/policy", body)
            assert code in (400, 404) and needle in doc["error"], (body, code, doc)
        dst = status(m1)["destinations"][0]
        assert (dst["bwlimit"], dst["compress"]) == (0, False)
        assert status(m1)["policy"]["timeout"] == 3600  # (remote_pair's, unchanged)

        # set: recorded, shown, and replication converges under it (compression on again)
        out = admin_json(m1.path, "replicate", "policy", "--to", name, "--bwlimit", "4M",
                         "--compress", "on")
        assert out == {"destination": name, "bwlimit": 4 * MIB, "compress": True}
        shown = admin(m1.path, "replicate", "policy", "--to", name).stdout
        assert "4.0 MiB/s" in shown and "on" in shown, shown
        assert status(m1)["destinations"][0]["bwlimit"] == 4 * MIB
        text_status = admin(m1.path, "status").stdout
        assert "BWLIMIT" in text_status and "4.0 MiB/s" in text_status, text_status
        mark = proxy.mark()
        write(m1.path, "noise2", os.urandom(MIB))
        write(m1.path, "text3", text(MIB, "three"))
        wait_converged(m1, m2, cut(m1))
        nz, zbytes, nr, rbytes = proxy.chunks_since(mark)
        assert nz >= 1 and rbytes >= MIB, (nz, zbytes, nr, rbytes)
        assert_same_tree(m1.path, m2.path)
        assert "destination %s: policy bwlimit=%d, compress=True" % (name, 4 * MIB) in \
            (m1.site / "repfs.log").read_text()

        # removed; the policy outlives a restart of the send task (replicate stop/start
        # keep the destination's record)
        out = admin_json(m1.path, "replicate", "policy", "--to", name, "--bwlimit", "none")
        assert out["bwlimit"] == 0
        out = admin_json(m1.path, "replicate", "policy", "--to", name, "--bwlimit", "8M")
        admin(m1.path, "replicate", "stop", "--to", name)
        assert status(m1)["destinations"][0]["bwlimit"] == 8 * MIB
    finally:
        proxy.close()
