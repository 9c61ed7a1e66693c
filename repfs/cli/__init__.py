"""Command-line tools: `repfs` (mkfs, mount, umount, fsck) and `repfs-admin`."""

import os
import sys


class QuietError(Exception):
    """An expected failure: print one line to stderr and exit with `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def run_cli(prog: str, fn, argv) -> int:
    try:
        return fn(argv) or 0
    except QuietError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): no traceback; exit as a command killed by SIGPIPE
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141


def parse_size(text: str) -> int:
    """'10G', '512M', '1T', '4096', '1.5G' -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = t, ""
    if t and t[-1] in units:
        num, unit = t[:-1], t[-1]
    try:
        value = float(num)
    except ValueError:
        raise QuietError(f"bad size {text!r} (examples: 10G, 512M, 1T)", 2) from None
    if value <= 0:
        raise QuietError(f"bad size {text!r}: must be positive", 2)
    return int(value * units[unit])
