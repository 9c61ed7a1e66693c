"""Command-line tools: `repfs` (mkfs, mount, umount, fsck) and `repfs-admin`."""

import decimal
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
    """'10G', '512M', '1T', '4096', '1.5G' -> bytes (binary units, a fraction of a byte is
    dropped). Anything that is not a positive finite size of at least one byte (nan, inf,
    1e400K, -1, 0, 0.5, '') is refused with a one-line error (exit 2)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = t, ""
    if t and t[-1] in units:
        num, unit = t[:-1], t[-1]
    try:
        value = decimal.Decimal(num.strip())  # exact: no float rounding, no float overflow
    except decimal.InvalidOperation:
        raise QuietError(f"bad size {text!r} (examples: 10G, 512M, 1T)", 2) from None
    if not value.is_finite():
        raise QuietError(f"bad size {text!r}: must be a finite number", 2)
    if value <= 0:
        raise QuietError(f"bad size {text!r}: must be positive", 2)
    if value.adjusted() > 30:  # far beyond any size (1e30 bytes); keeps int() cheap
        raise QuietError(f"bad size {text!r}: too large", 2)
    size = int(value * units[unit])
    if size < 1:
        raise QuietError(f"bad size {text!r}: less than one byte", 2)
    return size
