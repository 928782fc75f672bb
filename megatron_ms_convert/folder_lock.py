"""One writer per output folder: an exclusive lock on a file inside the folder, held for a whole run.

Two conversions writing into the same folder would use the same temporary names and overwrite each
other's manifests, so the second one must stop before it touches anything. The lock is a POSIX
record lock (`fcntl.lockf`) rather than `flock`: the kernel releases it when the holding process
exits, however it dies, and forked workers do not inherit it, so an orphaned worker can never keep a
dead run's folder locked. The lock file records who holds it (host, pid, start time) for the message
the second run prints, and is removed again when the holder finishes.

The file name is a parameter so that other runs can lock other things in the same folder (the other
conversion direction, or one lock per shard when several processes share a folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from .errors import ConvertInputError

RUN_LOCK_NAME = ".convert.lock"


class FolderLocked(ConvertInputError):
    """Another live process holds the lock: the message names it (host, pid) and the lock file."""


def holder_description() -> str:
    """What this process writes into a lock it holds: enough for a user to find it."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n"


@contextlib.contextmanager
def folder_lock(folder: Path, name: str = RUN_LOCK_NAME, flag: str = "--ms-path") -> Iterator[Path]:
    """Hold an exclusive lock on `folder/name` for the duration of the `with` block, or raise
    FolderLocked at once if another process holds it. `folder` (and its missing parents) is created
    if missing, and removed again on exit if this lock created it and nothing else was put into it
    (a run refused for bad input leaves no trace). `flag` is the option that named the folder, for
    the message."""
    folder = Path(folder)
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    try:
        fd = _acquire(path, flag)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_description().encode(), 0)
            yield path
        finally:
            # Unlink before closing (which releases the lock): a process that opened the old file in
            # the meantime notices it locked a file no longer in the folder and starts over (_acquire).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
    finally:
        for path in created:  # innermost first; stops at the first one that is not empty
            try:
                path.rmdir()
            except OSError:
                break


def _acquire(path: Path, flag: str) -> int:
    """Open and lock `path`; returns the locked descriptor."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise FolderLocked(
                f"{flag} {path.parent}: another conversion is writing into it "
                f"({holder or 'its holder has not recorded itself yet'}; lock file {path})",
                fix="wait for it to finish or stop it, or choose another " + flag) from None
        if _is_still_at(fd, path):
            return fd
        os.close(fd)  # the previous holder removed the file as it finished: lock the current one


def _is_still_at(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)
