"""Helpers the benchmarks share: mounts and the daemons they start."""

from __future__ import annotations

import os
import signal
import subprocess
import shutil
import sys
import time
from pathlib import Path


def mounted(path: Path) -> bool:
    p = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ").replace("\\011", "\t") \
                .replace("\\012", "\n").replace("\\134", "\\")
            if mp == p:
                return True
    return False


def lazy_unmount(path: Path) -> None:
    if mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL: only a daemon this run started (its pid from SITE/repfs.pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, 10.0):
            return


def log(msg: str = "") -> None:
    print(msg, flush=True)


def tool(name: str) -> str:
    sib = Path(sys.executable).parent / name
    if sib.exists():
        return str(sib)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} is not on PATH (run with the venv's python)")
    return found
