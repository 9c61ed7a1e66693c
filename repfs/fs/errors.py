"""The one exception type that carries a POSIX error out of the file-system core."""

import errno
import os


class FSError(OSError):
    """A domain error: the operation fails with this errno (the FUSE adapter turns it into
    FUSEError in one place)."""

    def __init__(self, err: int, detail: str | None = None):
        super().__init__(err, detail or os.strerror(err))


def enospc(detail: str | None = None) -> FSError:
    return FSError(errno.ENOSPC, detail)
