"""Crash-safe file writes: temp file in the same folder, fsync, rename; readers never see half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _named(err: OSError, path: Path) -> OSError:
    """The same error, naming the file we were writing (a full disk's ENOSPC from write() names none)."""
    if err.filename is None:
        return type(err)(err.errno, err.strerror or str(err), str(path))
    return err


def atomic_write_bytes(path: Path, data: bytes) -> None:
    try:
        _atomic_write(path, data)
    except OSError as err:
        raise _named(err, path) from None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; outputs should be readable as any other file the user writes.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory entry is on disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def append_line(path: Path, line: str) -> None:
    """Append one newline-terminated record and fsync it; O_APPEND keeps concurrent writers' lines whole."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise _named(err, path) from None
