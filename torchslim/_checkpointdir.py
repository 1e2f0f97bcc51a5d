"""The directory side of checkpoints: commit by one rename, removal out of view, the logdir's lock.

A checkpoint is a directory of files. It is written into a hidden temporary
directory beside its final name (:func:`temporary`), every file in it is
fsynced by its writer, then :func:`commit` fsyncs the directory and renames it
into place: the rename is the commit, and a crash at any instant leaves either
the previous state or the new one. This works for any set of files (one tensor
file, or one per rank of a sharded checkpoint: each rank writes its files into
the same temporary directory, and one process commits after they all have).

:class:`LogdirLock` keeps a second trainer out of a logdir that one is using.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile

__all__ = ["STATE_FILE", "LogdirLock", "LogdirLockedError", "commit", "fsync_dir", "no_space_error", "remove",
           "remove_leftovers", "temporary", "write_durably"]

LOCK_FILE = ".torchslim.lock"
STATE_FILE = "state.json"  # a checkpoint's metadata; written last, its presence marks a committed checkpoint


def fsync_dir(path: str) -> None:
    """Make a directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes) -> None:
    """Write ``data`` as the file ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def temporary(path: str) -> str:
    """A new hidden directory beside ``path`` (``.<name>.tmp-XXXX``) to write the checkpoint into."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)


def commit(tmp: str, path: str) -> None:
    """Fsync ``tmp`` and rename it to ``path``; an existing ``path`` is moved out of view first, then removed."""
    fsync_dir(tmp)
    parent = os.path.dirname(path)
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rename(path, os.path.join(old, "ckpt"))
    os.rename(tmp, path)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove(path: str) -> None:
    """Delete a checkpoint so that it is never seen half-deleted: rename it out of view first."""
    parent, name = os.path.split(path)
    trash = tempfile.mkdtemp(prefix=f".{name}.del-", dir=parent)
    try:
        os.rename(path, os.path.join(trash, name))
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(logdir: str, prefix: str) -> None:
    """Delete the hidden directories (``.<prefix>-...``) a crash left behind in ``logdir``."""
    for name in os.listdir(logdir) if os.path.isdir(logdir) else []:
        if name.startswith(f".{prefix}-"):
            shutil.rmtree(os.path.join(logdir, name), ignore_errors=True)


def no_space_error(error: OSError, path: str, needed: int) -> OSError:
    """``error`` (ENOSPC) re-made to name the checkpoint, the bytes it needs and those free."""
    parent = os.path.dirname(path)
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        free = -1
    return OSError(errno.ENOSPC, f"No space left on device for checkpoint {path}: it needs {_size(needed)}, "
                   f"{_size(free) if free >= 0 else 'an unknown amount'} is free on the disk of {parent}; the previous "
                   "checkpoint is still the latest. Free space or point logdir elsewhere")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)" if n >= 2**30 else f"{n / 2**20:.1f} MiB ({n} bytes)"


class LogdirLockedError(RuntimeError):
    """Another trainer (alive) holds the logdir."""


class LogdirLock:
    """Holds ``<logdir>/.torchslim.lock`` for one trainer: a second one refuses to start, naming the holder.

    The lock is a POSIX ``flock`` on the file, which the kernel releases when the
    holder's process ends in any way, ``kill -9`` included: a dead holder never
    blocks a restart, and there is no lease to renew. The file says who holds it
    (pid and host) for the message. It is never deleted (deleting a lock file
    lets two processes each lock a different file of the same name).
    """

    def __init__(self, logdir: str) -> None:
        self.path = os.path.join(logdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise LogdirLockedError(
                f"logdir {os.path.dirname(self.path)} is in use by another trainer ({holder}): two trainers on one "
                "logdir would interleave their checkpoints. Stop it, or give this run another logdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None
