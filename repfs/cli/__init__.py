"""Command-line tools: `repfs` (mkfs, mount, umount, fsck) and `repfs-admin`."""

import os
import sys

from .. import common


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
    """`repfs.common.parse_size` for a command line: a bad size exits 2 with one line."""
    try:
        return common.parse_size(text)
    except common.SizeError as e:
        raise QuietError(str(e), 2) from None
