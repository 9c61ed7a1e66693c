"""Tier 2: the site.toml settings that bound a daemon's memory and replication's flow control
(issue 8 item 4: "daemon memory bounded by a setting"), through real mounts.

* A bad `[memory] held_limit`, `[repl] max_outstanding` or `[repl] send_window` refuses the
  mount with one line naming the setting and a non-zero exit; nothing is mounted and the site
  still mounts once the value is fixed.
* `[repl] max_outstanding` is honoured: with the secondary down, cutting pauses (flow control)
  at exactly the configured number of unreleased delta sets.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from repfs.site import Settings, Site, SiteError
from tests.conftest import REPFS, run_repfs
from tests.t2_repl import NO_AUTO_CUT, admin, api, start_replication


def set_setting(site, section: str, key: str, value: str) -> None:
    """Put `key = value` (TOML text) into [section] of SITE/site.toml, replacing a line of it."""
    toml = site / "site.toml"
    text = toml.read_text()
    m = re.search(rf"^\[{section}\][ \t]*$", text, re.M)
    if m is None:
        text += f"\n[{section}]\n{key} = {value}\n"
    else:
        end = re.search(r"^\[", text[m.end():], re.M)
        body_end = m.end() + (end.start() if end else len(text) - m.end())
        body = text[m.end():body_end]
        pat = rf"^[ \t]*#?[ \t]*{key}[ \t]*=.*$"
        if re.search(pat, body, re.M):
            body = re.sub(pat, f"{key} = {value}", body, count=1, flags=re.M)
        else:
            body = f"\n{key} = {value}" + body
        text = text[:m.end()] + body + text[body_end:]
    toml.write_text(text)


BAD = [
    ("memory", "held_limit", '"64Q"'),
    ("memory", "held_limit", '"1K"'),  # below the 1 MiB minimum
    ("memory", "held_limit", "true"),
    ("repl", "max_outstanding", "0"),
    ("repl", "max_outstanding", '"8"'),
    ("repl", "max_outstanding", "2.5"),
    ("repl", "send_window", "65"),  # beyond transport.MAX_WINDOW
    ("repl", "send_window", "-1"),
]


def test_bad_memory_settings_refuse_the_mount_with_one_line(tmp_path):
    site, mnt = tmp_path / "s", tmp_path / "mnt"
    run_repfs("mkfs", site, "--size", "64M")
    mnt.mkdir()
    # the defaults are written into a new site's site.toml, and read back as such
    text = (site / "site.toml").read_text()
    for key in ("held_limit", "max_outstanding", "send_window"):
        assert re.search(rf"^{key} = ", text, re.M), text
    assert Site(site).settings() == Settings(held_limit=64 << 20, max_outstanding=64,
                                             send_window=8)
    for section, key, value in BAD:  # each refused by the check a mount makes, in one line
        (site / "site.toml").write_text(text)
        set_setting(site, section, key, value)
        with pytest.raises(SiteError) as e:
            Site(site).settings()
        msg = str(e.value)
        assert "\n" not in msg and f"[{section}] {key}" in msg and "site.toml" in msg, msg
    # through the command: one line on stderr, a non-zero exit, nothing mounted or damaged
    r = subprocess.run([*REPFS, "mount", site, mnt], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0, r.stdout
    assert not os.path.ismount(mnt)
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "[repl] send_window -1" in err, err
    run_repfs("fsck", site)
    # values in range are taken
    (site / "site.toml").write_text(text)
    set_setting(site, "memory", "held_limit", '"16M"')
    set_setting(site, "repl", "send_window", "64")
    set_setting(site, "repl", "max_outstanding", "1")
    assert Site(site).settings() == Settings(held_limit=16 << 20, max_outstanding=1,
                                             send_window=64)


def test_max_outstanding_pauses_cutting_at_the_configured_count(mount_site, tmp_path):
    """With `[repl] max_outstanding = 2` and the secondary down, two delta sets are cut; the
    third on-demand cut is refused (flow control, the changes stay in the change log) and
    status shows flow control."""
    run_repfs("mkfs", tmp_path / "s1", "--size", "256M")
    set_setting(tmp_path / "s1", "repl", "max_outstanding", "2")
    set_setting(tmp_path / "s1", "repl", "send_window", "2")
    m1 = mount_site("256M", name="s1")
    m2 = mount_site("256M", name="s2")
    admin(m1.path, "replicate", "policy", *NO_AUTO_CUT)
    start_replication(m1, m2)
    run_repfs("umount", m2.path)  # the secondary is down: nothing is played, pins stay
    refused = []
    for i in range(4):
        (m1.path / f"f{i}").write_bytes(os.urandom(64 << 10))
        r = admin(m1.path, "replicate", "deltaset", "--no-wait", check=False, timeout=30)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
        if r.returncode:
            assert "flow control" in r.stderr and "2 delta sets" in r.stderr, r.stderr
            refused.append(i)
    # the initial copy's delta set was played before the secondary went down: the first
    # two cuts are taken, every later one is refused
    assert refused == [2, 3], refused
    st = api(m1.site, "GET", "/status")
    assert st["current_delta_set_blocks"] > 0  # the refused changes wait in the change log
    deadline = time.monotonic() + 10  # the cut loop shows it in status (it polls each 0.1 s)
    while not st["flow_control"]:
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
        st = api(m1.site, "GET", "/status")
    m1.expect_log("flow control:")  # its WARNING is by design
    # (that nothing is lost once the destination is back: t2_repl.py's
    # test_flow_control_loses_nothing, whose flow control is the same code)
