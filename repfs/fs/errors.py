"""The one exception type that carries a POSIX error out of the file-system core.

It is declared with the block-device interface (`repfs.volume.ErrnoError`), because the layers
under the file system refuse I/O with it too (ENOSPC from a full snapshot save volume, EROFS
from a read-only device); the core handles both alike."""

import errno

from ..volume import ErrnoError as FSError


def enospc(detail: str | None = None) -> FSError:
    return FSError(errno.ENOSPC, detail)
