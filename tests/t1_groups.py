"""Tier 1: the operator's side of replication groups and routes, through the real repfs-admin.

`group add NAME --secret-file FILE` (FILE's secret copied into SITE/groups/NAME.secret, or a new
random one written to FILE, 0600, exclusively), `group list | delete`, `route add GROUP NEXTHOP
| list | delete GROUP [NEXTHOP]` (SITE/routes.json), on a site directory (no daemon), on a
mounted site's mount point, and on HOST:PORT through the daemon's control port. Every refusal is
one line on stderr, exit 1, and changes nothing: not the site's files, not the secret files.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from repfs.cli import run_cli
from repfs.cli.admin import _main
from repfs.rcp.client import RcpConnection, Refused
from repfs.rcp.groups import GroupStore
from repfs.rcp.routes import MAX_HOPS, Routes
from tests.conftest import run_repfs
from tests.t2_cli import fails
from tests.t2_cli import run_admin as admin_process


def run_admin(*args, check=True) -> subprocess.CompletedProcess:
    """repfs-admin's command line run in this process (argument parsing, the verbs, the exit
    status and stderr as `repfs-admin` has them; a process of its own costs ~0.5 s of imports
    each on a loaded machine, and these tests run dozens). `admin_process` runs it as one."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli("repfs-admin", _main, [str(a) for a in args])
    r = subprocess.CompletedProcess(["repfs-admin", *map(str, args)], code, out.getvalue(),
                                    err.getvalue())
    if check and code != 0:
        raise AssertionError(f"repfs-admin {args} exited {code}: {r.stderr.strip()}")
    return r


def tree(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file and directory under `roots` (but a site's log and lock): mode and content."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]):
            if p.name in ("repfs.log", "lock"):
                continue
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_size > 1 << 20:  # (the volume)
                what = f"{st.st_size} {st.st_mtime_ns}"
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(p)
            else:
                what = ""
            out[str(p)] = (st.st_mode, what)
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def refused(r, *words: str) -> str:
    return fails(r, 1, *words, prog="repfs-admin")


def test_group_add_list_delete(tmp_path):
    site = tmp_path / "site"
    run_repfs("mkfs", site, "--size", "64M")
    A = ("--site", site)
    # a new secret file: written 0600, and the same secret in the site, 0600
    new = tmp_path / "new.secret"
    r = admin_process(*A, "group", "add", "g1", "--secret-file", new)
    assert f"wrote a new secret to {new}: copy it to the group's other sites" in r.stdout
    secret = new.read_bytes()
    assert mode(new) == 0o600 and len(secret.strip()) == 64 and secret.endswith(b"\n")
    copy = site / "groups" / "g1.secret"
    assert mode(copy) == 0o600 and mode(site / "groups") == 0o700
    assert copy.read_bytes() == secret
    assert GroupStore(site).secret("g1") == secret.strip()
    assert secret.strip().decode() not in r.stdout + r.stderr
    # the same file again: nothing changed, and it says so
    before = tree(tmp_path)
    r = run_admin(*A, "group", "add", "g1", "--secret-file", new)
    assert "already holds the secret" in r.stdout and "nothing changed" in r.stdout
    assert tree(tmp_path) == before
    # an existing file of the operator's (0644: it stays as it is; the site's copy is 0600)
    own = tmp_path / "own.secret"
    own.write_text("  correct horse battery staple  \n")
    own.chmod(0o644)
    r = run_admin(*A, "group", "add", "g2", "--secret-file", own)
    assert f"group g2 added with the secret of {own}" in r.stdout
    assert mode(own) == 0o644 and own.read_text() == "  correct horse battery staple  \n"
    assert mode(site / "groups" / "g2.secret") == 0o600
    assert GroupStore(site).secret("g2") == b"correct horse battery staple"
    # list: names only, never secrets
    r = run_admin(*A, "group", "list")
    assert r.stdout.split() == ["g1", "g2"]
    assert "correct horse" not in r.stdout and secret.strip().decode() not in r.stdout
    assert json.loads(run_admin(*A, "--json", "group", "list").stdout) == ["g1", "g2"]
    # --force replaces another secret
    r = run_admin(*A, "group", "add", "g2", "--secret-file", new, "--force")
    assert "replaced" in r.stdout and GroupStore(site).secret("g2") == secret.strip()
    # delete
    r = run_admin(*A, "group", "delete", "g2")
    assert "group g2 deleted" in r.stdout
    assert not (site / "groups" / "g2.secret").exists()
    assert run_admin(*A, "group", "list").stdout.split() == ["g1"]
    run_admin(*A, "group", "delete", "g1")
    assert run_admin(*A, "group", "list").stdout.strip() == "no groups"
    assert new.read_bytes() == secret  # (the operator's copy stays)


def test_group_bad_inputs_change_nothing(tmp_path):
    site = tmp_path / "site"
    run_repfs("mkfs", site, "--size", "64M")
    A = ("--site", site)
    files = tmp_path / "files"
    files.mkdir()
    held = files / "held.secret"
    run_admin(*A, "group", "add", "g1", "--secret-file", held)
    other = files / "other.secret"
    other.write_text("another secret of the operator\n")
    (files / "short").write_text("fifteen-chars-x\n")
    (files / "twolines").write_text("first line of sixteen+\nsecond line of sixteen+\n")
    (files / "empty").write_text("")
    (files / "blank").write_text(" \n\n")
    (files / "huge").write_text("x" * 5000 + "\n")
    (files / "dir").mkdir()
    (files / "dangling").symlink_to(files / "nowhere")
    os.mkfifo(files / "fifo")
    before = tree(tmp_path)
    absent = files / "absent.secret"  # would be written by a successful add

    def no_change(r, *words):
        line = refused(r, *words)
        assert tree(tmp_path) == before, line
        return line

    for bad in ("bad/name", "-dash", ".dot", "x" * 65, "", "a b", "ü"):
        no_change(run_admin(*A, "group", "add", "--secret-file", absent, "--", bad,
                            check=False), "bad group name")
        no_change(run_admin(*A, "group", "delete", "--", bad, check=False), "bad group name")
    for name, words in (("short", ("15 characters", "at least 16")),
                        ("twolines", ("one line",)), ("huge", ("one line", "4096")),
                        ("empty", ("empty",)), ("blank", ("empty",)),
                        ("dir", ("is a directory",)),
                        ("dangling", ("cannot read", "no such file")),
                        ("fifo", ("not a regular file",))):
        no_change(run_admin(*A, "group", "add", "g2", "--secret-file", files / name,
                            check=False), str(files / name), *words)
    # the secret file's directory is missing: nothing written anywhere
    no_change(run_admin(*A, "group", "add", "g2", "--secret-file", files / "no" / "x",
                        check=False), "cannot write the secret file", "no such file")
    # a group with another secret: refused without --force, and a new file is not left behind
    no_change(run_admin(*A, "group", "add", "g1", "--secret-file", other, check=False),
              "g1 exists with a different secret", "--force")
    no_change(run_admin(*A, "group", "add", "g1", "--secret-file", absent, check=False),
              "g1 exists with a different secret")
    assert not absent.exists()
    no_change(run_admin(*A, "group", "delete", "nosuch", check=False),
              "does not hold group nosuch")
    # a group with routes is not deleted
    run_admin(*A, "route", "add", "g1", "peer.example:7000")
    before = tree(tmp_path)
    no_change(run_admin(*A, "group", "delete", "g1", check=False), "g1 has routes",
              "peer.example:7000", "route delete g1")
    assert GroupStore(site).names() == ["g1"]
    # a missing --secret-file is a usage error (exit 2)
    fails(run_admin(*A, "group", "add", "g3", check=False), 2, "--secret-file",
          prog="repfs-admin")
    assert tree(tmp_path) == before


def test_routes(tmp_path):
    site = tmp_path / "site"
    run_repfs("mkfs", site, "--size", "64M")
    A = ("--site", site)
    run_admin(*A, "group", "add", "g1", "--secret-file", tmp_path / "g1.secret")
    run_admin(*A, "group", "add", "g2", "--secret-file", tmp_path / "g2.secret")
    assert run_admin(*A, "route", "list").stdout.strip() == "no routes"
    r = run_admin(*A, "route", "add", "g1", "fwd.example:7000")
    assert "route added: group g1 -> fwd.example:7000" in r.stdout
    run_admin(*A, "route", "add", "g1", "[::1]:7001")
    run_admin(*A, "route", "add", "g1", "10.0.0.2:7002")
    run_admin(*A, "route", "add", "g2", "FWD.Example.:7000")  # written one way
    # the same next hop, written another way: nothing changed
    before = tree(site)
    r = run_admin(*A, "route", "add", "g1", "[0:0::1]:07001")
    assert "already routes to [::1]:7001: nothing changed" in r.stdout
    assert tree(site) == before
    assert Routes(site).next_hops("g1") == ["fwd.example:7000", "[::1]:7001", "10.0.0.2:7002"]
    assert Routes(site).next_hops("g2") == ["fwd.example:7000"]
    assert Routes(site).next_hops("nosuch") == []
    assert mode(site / "routes.json") == 0o600
    out = json.loads(run_admin(*A, "--json", "route", "list").stdout)
    assert out == {"g1": ["fwd.example:7000", "[::1]:7001", "10.0.0.2:7002"],
                   "g2": ["fwd.example:7000"]}
    lines = run_admin(*A, "route", "list").stdout.splitlines()
    assert lines[0].split() == ["GROUP", "NEXT", "HOP"]
    assert [x.split() for x in lines[1:]] == [["g1", "fwd.example:7000"], ["g1", "[::1]:7001"],
                                              ["g1", "10.0.0.2:7002"], ["g2", "fwd.example:7000"]]
    # bad inputs: one line, exit 1, nothing changed
    before = tree(tmp_path)
    for hop, words in (("fwd.example", ("HOST:PORT",)), ("fwd.example:", ("port",)),
                       ("fwd.example:0", ("port from 1 to 65535",)),
                       ("fwd.example:65536", ("port",)), ("fwd.example:x1", ("port",)),
                       ("fwd.example:７０００", ("port",)), ("a b:7000", ("host name",)),
                       ("-bad.example:7000", ("host name",)), ("a..b:7000", ("host name",)),
                       ("0.0.0.0:7000", ("not an address to connect to",)),
                       ("[::]:7000", ("not an address to connect to",)),
                       ("224.0.0.1:7000", ("not an address to connect to",)),
                       ("x" * 300 + ":1", ("HOST:PORT",))):
        refused(run_admin(*A, "route", "add", "g1", "--", hop, check=False), "bad next hop",
                *words)
        refused(run_admin(*A, "route", "delete", "g1", "--", hop, check=False), "bad next hop")
    refused(run_admin(*A, "route", "add", "g3", "fwd.example:7000", check=False),
            "does not hold group g3", "group add g3")
    refused(run_admin(*A, "route", "add", "bad/name", "fwd.example:7000", check=False),
            "bad group name")
    refused(run_admin(*A, "route", "delete", "g1", "other.example:7000", check=False),
            "no route for group g1 to other.example:7000")
    refused(run_admin(*A, "route", "delete", "g3", check=False), "no route for group g3")
    assert tree(tmp_path) == before
    # delete one, then the rest of a group
    r = run_admin(*A, "route", "delete", "g1", "[::1]:7001")
    assert "route deleted: group g1 -> [::1]:7001" in r.stdout
    assert Routes(site).next_hops("g1") == ["fwd.example:7000", "10.0.0.2:7002"]
    r = run_admin(*A, "route", "delete", "g1")
    assert "fwd.example:7000, 10.0.0.2:7002" in r.stdout
    assert Routes(site).table() == {"g2": ["fwd.example:7000"]}
    run_admin(*A, "group", "delete", "g1")  # (no routes left)
    # at most MAX_HOPS next hops per group
    for i in range(2, MAX_HOPS + 1):
        assert Routes(site).add("g2", f"10.0.0.{i}:7000")
    before = tree(tmp_path)
    refused(run_admin(*A, "route", "add", "g2", "10.0.1.1:7000", check=False),
            f"g2 has {MAX_HOPS} next hops already")
    assert tree(tmp_path) == before
    assert len(Routes(site).next_hops("g2")) == MAX_HOPS
    run_admin(*A, "route", "delete", "g2")
    # a damaged table is reported, not guessed at
    (site / "routes.json").write_text('{"format": 1, "routes": {"g2": "x:1"}}')
    refused(run_admin(*A, "route", "list", check=False), "routes.json is damaged")
    (site / "routes.json").write_text("{not json")
    before = tree(tmp_path)
    refused(run_admin(*A, "route", "list", check=False), "routes.json is damaged")
    refused(run_admin(*A, "route", "add", "g2", "x.example:1", check=False), "damaged")
    assert tree(tmp_path) == before


def test_groups_and_routes_of_a_mounted_site(mount_site, tmp_path):
    """On a mounted site, at its mount point (repfs-admin changes the files) and at HOST:PORT
    (through the control port, the secret in the request's body): the daemon sees each change
    at once, and neither its log nor any answer carries a secret."""
    m = mount_site("64M")
    ctl = json.loads((m.site / "control.json").read_text())
    token = tmp_path / "token"
    token.write_text((m.site / "control.token").read_text())
    token.chmod(0o600)
    R = ("--site", f"{ctl['host']}:{ctl['port']}", "--token-file", token)
    L = ("--site", m.path)
    s1 = tmp_path / "s1"
    r = run_admin(*L, "group", "add", "g1", "--secret-file", s1)
    assert "wrote a new secret" in r.stdout
    assert run_admin(*R, "group", "list").stdout.split() == ["g1"]  # the daemon sees it
    # ... and its next RCP handshake does: the group's secret opens a session, another not
    secret1 = s1.read_bytes().strip()
    rcp = dict(host=ctl["host"], port=ctl["port"], site="t1_groups", uuid="0" * 32, timeout=30)
    RcpConnection(group="g1", secret=secret1, **rcp).close()
    m.expect_log("the client holds another secret of group 'g1'")
    m.expect_log("unknown replication group 'g1'")
    with pytest.raises(Refused):
        RcpConnection(group="g1", secret=b"another secret of sixteen+", **rcp)
    s2 = tmp_path / "s2"
    r = admin_process(*R, "group", "add", "g2", "--secret-file", s2)
    assert f"wrote a new secret to {s2}" in r.stdout and mode(s2) == 0o600
    assert (m.site / "groups" / "g2.secret").read_bytes() == s2.read_bytes()
    assert mode(m.site / "groups" / "g2.secret") == 0o600
    r = run_admin(*R, "group", "add", "g2", "--secret-file", s2)
    assert "nothing changed" in r.stdout
    before = tree(tmp_path / "site", s1, s2)
    refused(run_admin(*R, "group", "add", "g2", "--secret-file", s1, check=False),
            "g2 exists with a different secret")
    s3 = tmp_path / "s3"
    refused(run_admin(*R, "group", "add", "g1", "--secret-file", s3, check=False),
            "g1 exists with a different secret")
    assert not s3.exists()
    refused(run_admin(*R, "group", "delete", "nosuch", check=False), "does not hold group")
    refused(run_admin(*R, "route", "add", "g3", "fwd.example:7000", check=False),
            "does not hold group g3")
    refused(run_admin(*R, "route", "delete", "g1", check=False), "no route for group g1")
    assert tree(tmp_path / "site", s1, s2) == before
    assert json.loads(run_admin(*R, "--json", "group", "list").stdout) == ["g1", "g2"]
    r = run_admin(*R, "route", "add", "g2", "[::1]:7001")
    assert "route added: group g2 -> [::1]:7001" in r.stdout
    run_admin(*L, "route", "add", "g2", "fwd.example:7000")
    assert json.loads(run_admin(*R, "--json", "route", "list").stdout) == {
        "g2": ["[::1]:7001", "fwd.example:7000"]}
    refused(run_admin(*R, "group", "delete", "g2", check=False), "g2 has routes")
    run_admin(*R, "route", "delete", "g2", "[::1]:7001")
    run_admin(*R, "route", "delete", "g2")
    run_admin(*R, "group", "delete", "g2")
    assert run_admin(*L, "group", "list").stdout.split() == ["g1"]
    run_admin(*L, "group", "delete", "g1")
    with pytest.raises(Refused):  # deleted: the daemon no longer takes it
        RcpConnection(group="g1", secret=secret1, **rcp)
    # the control port checks every argument before it touches the site
    before = tree(tmp_path / "site")
    conn = http.client.HTTPConnection(ctl["host"], ctl["port"], timeout=60)
    good = "ab" * 16
    for method, path, body, words in (
            ("POST", "/v1/groups", {"name": "g3"}, "secret in hex"),
            ("POST", "/v1/groups", {"name": "g3", "secret": "zz" * 16}, "secret in hex"),
            ("POST", "/v1/groups", {"name": "g3", "secret": "abc"}, "secret in hex"),
            ("POST", "/v1/groups", {"name": "g3", "secret": "ab" * 8}, "at least 16"),
            ("POST", "/v1/groups", {"name": "g3", "secret": "ab" * 4097}, "secret in hex"),
            ("POST", "/v1/groups", {"name": 3, "secret": good}, "bad group name"),
            ("POST", "/v1/groups", {"name": "a/b", "secret": good}, "bad group name"),
            ("POST", "/v1/groups", {"name": "g3", "secret": good, "force": 1}, "bad force"),
            ("POST", "/v1/routes", {"group": "g1", "next_hop": 7000}, "bad next hop"),
            ("POST", "/v1/routes", {"group": "g1", "next_hop": "x:99999"}, "bad next hop"),
            ("POST", "/v1/routes", {"group": ["g1"], "next_hop": "x:1"}, "bad group name"),
            ("DELETE", "/v1/routes/g1/x:0", None, "bad next hop"),
            ("DELETE", "/v1/groups/..", None, "bad group name")):
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Authorization": f"Bearer {token.read_text().strip()}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        assert resp.status == 400 and words in doc["error"], (path, body, resp.status, doc)
        assert good not in doc["error"]
    conn.close()
    assert tree(tmp_path / "site") == before
    log = (m.site / "repfs.log").read_text()
    for s in (s1, s2):
        secret = s.read_text().strip()
        assert secret not in log and secret.encode().hex() not in log
