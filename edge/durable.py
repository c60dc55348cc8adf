"""The one durable file write: every file that must survive a power cut goes through here.

`write_atomic` and `atomic_file` write a temporary file in the target's folder, fsync it,
rename it over the target and fsync the folder: after a crash or a power cut a reader finds
the old file or the new one, whole, never a mix or an empty file. The temporary name is
unique, so two writers of one file cannot interleave.

A folder written in place and then renamed whole (a snapshot, a candidate model set) cannot
go through them: `sync_tree` makes every file and folder in it durable before the rename.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (and `folder` itself), deepest first:
    call it before renaming a folder written in place into its final name, so that after a
    power cut the renamed folder holds what was written, not empty files."""
    for dirpath, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_file(path: Path, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` when the block ends without an exception.

    For writers that stream (numpy's savez, tarfile): what they wrote is fsynced, renamed over
    `path` and the folder fsynced. On an exception the temporary file is removed and `path`
    stays as it was. `mode` sets the permission bits (default: the process's umask for 0o666,
    as `open` would give).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Replace `path` with `data` (str is written as UTF-8), durably and atomically."""
    with atomic_file(path, mode=mode) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)


@functools.cache
def _umask_mode() -> int:
    """0o666 less the process's umask, read without setting it (`os.umask` sets it for a
    moment, which would race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    return 0o644
