"""Writes of a run directory: atomic, locked, with a clear error on a full disk, and testable.

- `atomic_write`: a file appears complete or not at all (temporary name + rename), so a
  killed run leaves no half file; `remove` deletes a file a run replaced.
- `no_space_guard`: a full disk (ENOSPC, or a library's error saying so) becomes one
  `DiskFullError` naming the file ("no space left on device writing FILE; free space and rerun
  to resume"); the CLI prints that line.
- `RunLock`: an exclusive `fcntl.flock` on RUN_DIR/.lock for the whole run. The kernel drops
  it when the process dies (kill -9 included), so no lock is ever stale; a second process is
  refused at once, with the holder's PID.
- `fault_point`: every write point passes here. For the fault suite (tests/test_faults.py,
  the way SQLite tests itself) the environment can make the N-th point SIGKILL the process
  (`KERAS_AEVB_FAULT_KILL_AT_WRITE=N`), raise ENOSPC (`KERAS_AEVB_FAULT_ENOSPC_AT_WRITE=N`)
  or stop it with SIGSTOP (`KERAS_AEVB_FAULT_STOP_AT_WRITE=N`, to hold a run mid-way), and
  `KERAS_AEVB_FAULT_TRACE=FILE` appends one line per point ("N KIND PATH"). Unset, a point
  costs a few dictionary look-ups.

Only the standard library here: the CLI imports this module before TensorFlow.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import tempfile
from pathlib import Path

__all__ = [
    "DataError",
    "DiskFullError",
    "RunLock",
    "RunLockedError",
    "RunWriteError",
    "atomic_write",
    "fault_point",
    "is_scratch_file",
    "no_space_guard",
    "remove",
]

LOCK_NAME = ".lock"

# Temporary files: `.NAME.<random>.tmp` (atomic_write), plus the Keras-suffixed forms and the
# `tmp-PID-` weights names of earlier versions. Any of them in a locked run directory belongs
# to a process that died mid-write.
_SCRATCH = re.compile(r"^\..+\.tmp(\..+)?$|^tmp-\d+-.+\.weights\.h5$")

_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


class RunWriteError(OSError):
    """A file of the run directory could not be written (the CLI: one line, exit status 1)."""


class DiskFullError(RunWriteError):
    """No space left on the device while writing `filename`; the run resumes once there is."""

    def __init__(self, filename):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    def __str__(self):
        return f"no space left on device writing {self.filename}; free space and rerun to resume"


class RunLockedError(ValueError):
    """Another live process holds the run directory (the CLI: one line, exit status 2)."""


# ------------------------------------------------------------------------------ fault points

_points = 0


def fault_point(path, kind="write"):
    """Counts one write point of a run and injects the fault the environment asks for.

    Args:
        path: the file being written or deleted.
        kind: "write" (a file's temporary copy is complete, its rename is next), "delete"
            (an old file is about to go) or "events" (TensorBoard's events are about to be
            flushed). ENOSPC is injected at "write" and "events" points only.
    """
    global _points
    env = os.environ
    if not any(k.startswith("KERAS_AEVB_FAULT_") for k in env):
        return
    _points += 1
    trace = env.get("KERAS_AEVB_FAULT_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(f"{_points} {kind} {path}\n")
    if env.get("KERAS_AEVB_FAULT_STOP_AT_WRITE") == str(_points):
        os.kill(os.getpid(), signal.SIGSTOP)
    if env.get("KERAS_AEVB_FAULT_KILL_AT_WRITE") == str(_points):
        os.kill(os.getpid(), signal.SIGKILL)
    if env.get("KERAS_AEVB_FAULT_ENOSPC_AT_WRITE") == str(_points) and kind != "delete":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


# ------------------------------------------------------------------------------ full disks


def is_no_space(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, says the disk is full.

    Python's own writes set errno; h5py and TensorFlow report it in their message.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
            return True
        if any(text in str(error) for text in _NO_SPACE_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def no_space_guard(path):
    """Turns a full-disk error raised inside the block into `DiskFullError(path)`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_no_space(e):
            raise DiskFullError(path) from e
        raise


# ------------------------------------------------------------------------------ atomic writes


def atomic_write(path, write, fsync=False):
    """Calls `write(file object)` on a temporary file next to `path`, then renames it to `path`.

    Args:
        path: the file to (re)place.
        write: a callable writing bytes to the binary file object it is given.
        fsync: flush to disk before the rename, and the directory after it (checkpoints that
            must survive a power cut).

    The file gets the permissions a plain open() would give it (0666 less the umask), not
    mkstemp's 0600. On a full disk: `DiskFullError(path)`, and the temporary file is gone.
    """
    path = Path(path)
    tmp = None
    with no_space_guard(path):
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                fault_point(path)
                if fsync:
                    os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
            if fsync:
                _fsync_directory(path.parent)
        except BaseException:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            raise


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename itself is atomic
    finally:
        os.close(fd)


def remove(path):
    """Deletes a file the run has replaced (a write point of kind "delete")."""
    fault_point(path, "delete")
    Path(path).unlink(missing_ok=True)


def is_scratch_file(name: str) -> bool:
    """A temporary file of an interrupted write, or the lock file: not part of a run."""
    return name == LOCK_NAME or bool(_SCRATCH.match(name))


def remove_scratch_files(directory):
    """Deletes the temporary files of dead processes under `directory` (hold its lock)."""
    directory = Path(directory)
    for sub in (directory, directory / "checkpoints"):
        if not sub.is_dir():
            continue
        for path in sub.iterdir():
            if path.name != LOCK_NAME and is_scratch_file(path.name) and path.is_file():
                path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ the lock


class RunLock:
    """An exclusive lock on a run directory: `fcntl.flock` on RUN_DIR/.lock.

    `acquire()` creates the directory if needed and takes the lock without waiting; it raises
    `RunLockedError` naming the holder's PID when another process has it. A run that fails
    before writing anything calls `release(undo=True)`: what acquire created (the directory,
    the lock file) is removed again, so a failed run leaves no trace. `begin_writing()` marks
    the point from which the run writes: the holder's PID goes into the lock file and the
    temporary files of dead processes are removed.

    The lock file is never replaced or deleted while runs may use it, except by undo, and
    acquire checks that the file it locked is still the one at the path (a process that locked
    a file that was then deleted would otherwise hold a lock nobody else sees).
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd = None
        self._created_dirs = []
        self._created_file = False
        self._writing = False

    def acquire(self):
        missing = []
        parent = self.directory
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        with no_space_guard(self.path):
            for directory in reversed(missing):
                try:
                    directory.mkdir()
                    self._created_dirs.append(directory)
                except FileExistsError:
                    pass
            while True:
                existed = self.path.exists()
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _lock_holder(fd)
                    os.close(fd)
                    self.release(undo=True)
                    raise RunLockedError(
                        f"{self.directory} is in use by another keras-aevb process "
                        f"(PID {holder}); wait for it to end, or stop it, then rerun"
                    ) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
        self.fd = fd
        self._created_file = not existed
        return self

    def begin_writing(self):
        """From here the run writes: record the PID, remove dead processes' temporary files."""
        self._writing = True
        with no_space_guard(self.path):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
            remove_scratch_files(self.directory)

    def release(self, undo=False):
        """Drops the lock; with `undo`, and if the run wrote nothing, removes what acquire made."""
        if undo and not self._writing:
            if self._created_file:
                self.path.unlink(missing_ok=True)
            for directory in reversed(self._created_dirs):
                try:
                    directory.rmdir()
                except OSError:
                    break  # not empty: someone else uses it now
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, kind, value, tb):
        self.release(undo=kind is not None)


def _lock_holder(fd):
    """The PID holding the flock on the file open as `fd` (from /proc/locks, else the file)."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (a "->" marks waiters)
                if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                    continue
                if fields[5].rsplit(":", 1)[-1] == str(inode):
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return "unknown"


class DataError(ValueError):
    """Bad or missing input data; the message is one line naming the problem and the fix.

    The CLI catches it and exits with status 2, printing the message alone, so every message
    must make sense without a traceback.
    """
