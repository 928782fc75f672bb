"""The one way a file is put in place: write it under a temporary name, flush it to disk, rename it
over the target, flush the folder. Readers (and a re-run after a crash) see either no file or the
complete file, never a half-written one; a failure leaves nothing behind but what was there before.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> write_text_atomically(target, "hello")
    5
    >>> target.read_text(), partial_path(target).exists()
    ('hello', False)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

PARTIAL_SUFFIX = ".partial"


def partial_path(path, owner: int | None = None) -> Path:
    """The temporary name used while writing `path`: same folder, name + '.partial'; with `owner` (a
    process id) a name no other process uses, for files several processes may write at once.

    >>> partial_path("/x/rank_0/net.ckpt"), partial_path("/x/pt_meta/map.json", owner=42)
    (PosixPath('/x/rank_0/net.ckpt.partial'), PosixPath('/x/pt_meta/map.json.42.partial'))
    """
    path = Path(path)
    middle = "" if owner is None else f".{owner}"
    return path.with_name(path.name + middle + PARTIAL_SUFFIX)


@contextlib.contextmanager
def atomic_target(path, *, mode: int | None = None, durable: bool = True, shared: bool = False) -> Iterator[Path]:
    """Yield the partial path to write `path` through; on a clean exit flush it, rename it into place,
    set `mode` and flush the folder. On any exception (Ctrl-C included) the partial file is removed and
    an existing file at `path` stays as it was. `shared`: other processes may write the same file at
    the same time (shards of one conversion writing a file common to all), so the partial name is
    this process's own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path, owner=os.getpid() if shared else None)
    _unlink_quietly(partial)  # a stale partial of a killed run may be read-only; unlinking still works
    try:
        yield partial
        if durable:
            fsync_path(partial)
        # os.replace swaps the directory entry, so even a read-only file at `path` is no obstacle.
        os.replace(partial, path)
    except BaseException:
        _unlink_quietly(partial)
        raise
    if mode is not None:
        os.chmod(path, mode)
    if durable:
        fsync_dir(path.parent)


def write_text_atomically(path, text: str, *, mode: int | None = None) -> int:
    """Put `text` at `path` atomically; returns the bytes written."""
    data = text.encode("utf-8")
    with atomic_target(path, mode=mode) as partial:
        partial.write_bytes(data)
    return len(data)


def write_common_file(path, data: bytes, *, mode: int | None = None) -> bool:
    """Put `data` at `path` when it is not there already, for a file every shard of a conversion
    writes with the same content: the first writes it, the others find it equal and leave it; two
    writing at once each rename a complete file of the same bytes into place, so no reader ever sees
    a mixture. Returns True when this call wrote the file."""
    path = Path(path)
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    with atomic_target(path, mode=mode, shared=True) as partial:
        partial.write_bytes(data)
    return True


def copy_file_atomically(source, target, *, mode: int | None = 0o400) -> int:
    """Copy `source` to `target` atomically (outputs end read-only, like MindSpore's own files)."""
    with atomic_target(target, mode=mode) as partial:
        shutil.copyfile(source, partial)
    return Path(target).stat().st_size


def fsync_path(path) -> None:
    """Flush a finished file to disk: a rename that survives a crash must not point at lost data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder) -> None:
    """Make a rename itself durable; some filesystems refuse fsync on folders, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
