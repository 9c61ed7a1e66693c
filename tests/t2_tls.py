"""Tier 2: TLS on the site's port (site.toml [tls], repfs/rcp/tls.py), through real daemons on
127.0.0.1: certificates made by `repfs-admin tls init`, replication over RCP inside TLS,
repfs-admin over TLS (by the site's directory and by HOST:PORT with --tls-*), and what is
refused, with its reason logged and nothing changed: plain text to the TLS port, a server or a
client whose certificate another CA signed, a host name the certificate does not carry, a
site whose [tls] files are missing or do not match (its mount refused in one line).
"""

from __future__ import annotations

import http.client
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from repfs.rcp.client import RcpConnection
from repfs.rcp.groups import GroupStore
from repfs.rcp.tls import TlsFiles, client_context, init, site_client
from repfs.repl.transport import _Broken
from repfs.site import Site, SiteError
from tests.conftest import run_repfs
from tests.t2_rcp import GROUP, SECRET, port_of
from tests.t2_repl import ADMIN, Workload, admin, assert_same_tree, cut, log_tail, status


def tls_init(pki: Path, name: str, hosts: str = "127.0.0.1", check=True):
    r = subprocess.run([ADMIN, "--json", "tls", "init", str(pki), "--site-name", name,
                        "--host", hosts], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    return r


def tls_site(tmp_path: Path, name: str, pki: Path, *, cert=None, key=None) -> Path:
    """A new site (mkfs) whose site.toml has [tls] with pki's CA and NAME's files."""
    site = tmp_path / name
    run_repfs("mkfs", site, "--size", "128M")
    with open(site / "site.toml", "a") as f:
        f.write(f'\n[tls]\ncert = "{cert or pki / (name + ".pem")}"\n'
                f'key = "{key or pki / (name + ".key")}"\nca = "{pki / "ca.pem"}"\n')
    return site


def expired_cert(pki: Path, cert: Path, key: Path) -> None:
    """A certificate pki's CA signed that expired yesterday (and its key)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    k = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
         .issuer_name(ca.subject).public_key(k.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=10))
         .not_valid_after(now - datetime.timedelta(days=1))
         .sign(ca_key, hashes.SHA256()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))


def tls_args(pki: Path, name: str) -> list[str]:
    return ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / f"{name}.pem"),
            "--tls-key", str(pki / f"{name}.key")]


def remote_admin(m, host: str, *args, check=False):
    cmd = [ADMIN, "--site", f"{host}:{port_of(m.site)}", *args]
    env = dict(os.environ, REPFS_TOKEN=(m.site / "control.token").read_text().strip())
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert check is False or r.returncode == 0, r.stderr
    return r


def api(site: Path, path: str) -> dict:
    """GET /v1/PATH from the test process, inside TLS as repfs-admin by the directory does
    (the site's own [tls], its certificate pinned): fast, for polling."""
    ctx, pin = site_client(site)
    c = json.loads((site / "control.json").read_text())
    conn = http.client.HTTPSConnection(c["host"], c["port"], timeout=30, context=ctx)
    try:
        conn.connect()
        assert conn.sock.getpeercert(binary_form=True) == pin
        conn.request("GET", "/v1" + path, headers={
            "Authorization": f"Bearer {(site / 'control.token').read_text().strip()}"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        assert resp.status == 200, doc
        return doc
    finally:
        conn.close()


def wait_converged(m1, m2, n: int, timeout: float = 60.0) -> None:
    """As t2_repl.wait_converged, asking over TLS."""
    deadline = time.monotonic() + timeout
    while True:
        p, s = api(m1.site, "/status"), api(m2.site, "/status")
        d = p["destinations"][0]
        if (d["acked_delta_set"] == n and d["played_delta_set"] == n
                and s["last_played_delta_set"] == n):
            return
        assert time.monotonic() < deadline, (
            f"no convergence on {n}: {d}\n{log_tail(m1.site)}\n---\n{log_tail(m2.site)}")
        time.sleep(0.1)


def test_tls_init_makes_a_ca_and_site_certificates_and_refuses_bad_input(tmp_path):
    pki = tmp_path / "pki"
    first = tls_init(pki, "s1", "127.0.0.1,db1.example.net")
    assert first["ca_made"] and first["hosts"] == ["127.0.0.1", "db1.example.net"]
    second = tls_init(pki, "s2")
    assert not second["ca_made"] and second["ca"] == first["ca"]  # (the same CA signs)
    for f in ("ca.key", "s1.key", "s2.key"):
        assert stat.S_IMODE(os.stat(pki / f).st_mode) == 0o600, f
    before = {p.name: p.read_bytes() for p in pki.iterdir()}
    out = subprocess.run([ADMIN, "tls", "init", str(pki), "--site-name", "s3", "--host",
                          "127.0.0.1"], capture_output=True, text=True, timeout=60).stdout
    assert f'cert = "{pki / "s3.pem"}"' in out and f'ca = "{pki / "ca.pem"}"' in out
    (pki / "s3.pem").unlink()
    (pki / "s3.key").unlink()
    cases = [("s1", "127.0.0.1", "exists (never overwritten)"),
             ("a b", "127.0.0.1", "bad site name"),
             ("ca", "127.0.0.1", "bad site name"),
             ("s4", "no such host!", "bad host"),
             ("s4", ",", "--host needs at least one")]
    for name, hosts, why in cases:
        r = tls_init(pki, name, hosts, check=False)
        assert r.returncode == 1 and why in r.stderr, (name, hosts, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {p.name: p.read_bytes() for p in pki.iterdir()} == before  # (nothing changed)
    (pki / "ca.key").rename(tmp_path / "ca.key")  # a CA without its key cannot sign
    r = tls_init(pki, "s5", check=False)
    assert r.returncode == 1 and "only one of ca.pem and ca.key" in r.stderr, r.stderr


def test_tls_files_are_checked_at_mount(tmp_path):
    """Missing, expired, mismatched, not PEM, not the CA's, partial: the mount is refused in
    one line naming it (through real mounts for a missing or mismatched key and a partial
    [tls]; the others through Site.tls_context, which the mount calls)."""
    pki = tmp_path / "pki"
    init(pki, "s1", ["127.0.0.1"])
    init(pki, "s2", ["127.0.0.1"])
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    other = tmp_path / "other"
    init(other, "x", ["127.0.0.1"])
    expired_cert(pki, tmp_path / "old.pem", tmp_path / "old.key")
    cases = [(dict(key=pki / "nosuch.key"), "does not exist"),
             (dict(cert=tmp_path / "old.pem", key=tmp_path / "old.key"), "expired on"),
             (dict(key=pki / "s2.key"), "does not match cert"),
             (dict(cert=tmp_path / "junk.pem"), "is not a PEM certificate"),
             (dict(cert=other / "x.pem", key=other / "x.key"), "is not signed by ca")]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    site = tmp_path / "s1"
    run_repfs("mkfs", site, "--size", "64M")
    plain = (site / "site.toml").read_text()
    partial = f'\n[tls]\ncert = "{pki / "s1.pem"}"\n'
    cases.append((partial, "key, ca missing"))
    for i, (files, why) in enumerate(cases):
        if isinstance(files, dict):
            files = (f'\n[tls]\ncert = "{files.get("cert", pki / "s1.pem")}"\n'
                     f'key = "{files.get("key", pki / "s1.key")}"\nca = "{pki / "ca.pem"}"\n')
        (site / "site.toml").write_text(plain + files)
        if i not in (0, 2, len(cases) - 1):  # (what the mount calls, in this process)
            with pytest.raises(SiteError) as e:
                Site(site).tls_context()
            assert why in str(e.value) and "\n" not in str(e.value), e.value
            continue
        r = run_repfs("mount", site, mnt, "--listen", "127.0.0.1:0", check=False)
        assert r.returncode != 0 and why in r.stderr, (files, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not os.path.ismount(mnt)


def test_replication_over_rcp_inside_tls_and_what_tls_refuses(tmp_path, mount_site):
    pki, other = tmp_path / "pki", tmp_path / "other"
    for name in ("s1", "s2"):
        init(pki, name, ["127.0.0.1"])
    init(other, "s3", ["127.0.0.1"])  # another CA's site
    init(other, "intruder", ["127.0.0.1"])
    for name, ca in (("s1", pki), ("s2", pki), ("s3", other)):
        tls_site(tmp_path, name, ca)
    m1, m2, m3 = (mount_site("128M", "--listen", "127.0.0.1:0", name=n)
                  for n in ("s1", "s2", "s3"))
    for m in (m1, m2, m3):
        GroupStore(m.site).add(GROUP, SECRET)
    admin(m1.path, "replicate", "policy", "--timeout", "3600", "--hwm", "100G")
    st = status(m1.site)  # (repfs-admin by the directory: inside TLS, pinned to s1's cert)
    assert st["tls"] is True and st["security_warning"] is None

    # an untrusted server (s3's certificate is another CA's): refused by the primary, which
    # says why; s3 logs that its peer did not trust it; nothing changes on either side
    m3.expect_log("TLS handshake with 127.0.0.1:")
    r = admin(m1.path, "replicate", "start", "--to", f"127.0.0.1:{port_of(m3.site)}",
              "--group", GROUP, check=False)
    assert r.returncode != 0 and "certificate verify failed" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "does not trust our certificate" in (m3.site / "repfs.log").read_text()
    assert status(m3.site)["role"] != "secondary" and not status(m1.site)["destinations"]
    # `mount -o remount` asks the daemon over its port too: inside TLS (the site's own files)
    run_repfs("mount", "-o", "remount,ro", m3.site, m3.path)
    assert status(m3.path)["readonly"] is True

    # replication over RCP inside TLS converges
    Workload(m1.path, "tls-base").run(20)
    to = f"127.0.0.1:{port_of(m2.site)}"
    r = admin(m1.path, "--json", "replicate", "start", "--to", to, "--group", GROUP,
              timeout=120)
    wl = Workload(m1.path, "tls")
    wl.run(20)
    n = cut(m1)
    wait_converged(m1, m2, n)
    assert_same_tree(m1.path, m2.path)

    # repfs-admin by HOST:PORT: the daemon's certificate must name the host dialled
    r = remote_admin(m2, "127.0.0.1", "--json", *tls_args(pki, "s1"), "status", check=True)
    assert json.loads(r.stdout)["last_played_delta_set"] == n
    r = remote_admin(m2, "localhost", *tls_args(pki, "s1"), "status")
    assert r.returncode == 1 and "certificate verify failed" in r.stderr, r.stderr
    assert "localhost" in r.stderr
    # plain text to the TLS port: refused, logged, said to the client
    m2.expect_log("plain-text connection from 127.0.0.1:")
    r = remote_admin(m2, "127.0.0.1", "status")
    assert r.returncode == 1 and "this port speaks TLS only" in r.stderr, r.stderr
    # an untrusted client (a certificate another CA signed): over HTTP and over RCP
    m2.expect_log("TLS handshake with 127.0.0.1:")
    r = remote_admin(m2, "127.0.0.1", "--tls-ca", str(pki / "ca.pem"), "--tls-cert",
                     str(other / "intruder.pem"), "--tls-key", str(other / "intruder.key"),
                     "status")
    assert r.returncode == 1 and "does not trust our certificate" in r.stderr, r.stderr
    ctx = client_context(TlsFiles(other / "intruder.pem", other / "intruder.key",
                                  pki / "ca.pem"))
    with pytest.raises(_Broken) as e:
        c = RcpConnection("127.0.0.1", port_of(m2.site), group=GROUP, secret=SECRET,
                          site="intruder", uuid="0" * 32, timeout=30, tls=ctx)
        c.close()
    assert "does not trust our certificate" in str(e.value), e.value
    log2 = (m2.site / "repfs.log").read_text()
    assert log2.count("certificate verify failed") >= 2, log_tail(m2.site)
    # nothing of it changed anything: replication goes on
    wl.run(10)
    n = cut(m1)
    wait_converged(m1, m2, n)
    assert_same_tree(m1.path, m2.path)
