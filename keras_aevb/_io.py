"""Atomic file writes: a file appears complete or not at all (a killed run leaves no half file)."""

import os
import tempfile
from pathlib import Path


def atomic_write(path, write, fsync=False):
    """Calls `write(file object)` on a temporary file next to `path`, then renames it to `path`.

    Args:
        path: the file to (re)place.
        write: a callable writing bytes to the binary file object it is given.
        fsync: flush to disk before the rename (checkpoints that must survive a power cut).

    The file gets the permissions a plain open() would give it (0666 less the umask), not
    mkstemp's 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
