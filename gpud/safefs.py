"""File access inside job directories, which belong to (and are writable by) job users.

A root daemon must never follow a link a job planted: a job that replaced its
``output.log`` with a symlink to /etc/shadow must get neither its contents through the
API nor root appending to it. So every open here uses O_NOFOLLOW, reads accept only
regular files, and new files are created with O_EXCL after unlinking whatever was there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["open_append", "read_file", "read_regular", "write_new"]

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _chown(fd: int, owner: tuple[int, int] | None) -> None:
    if owner is not None and os.geteuid() == 0:
        os.fchown(fd, *owner)


def write_new(
    path: Path, data: bytes, owner: tuple[int, int] | None = None, mode: int = 0o600
) -> None:
    """Replace ``path`` with a new regular file holding ``data``."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    try:
        _chown(fd, owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def open_append(path: Path, owner: tuple[int, int] | None = None, mode: int = 0o600) -> int:
    """An fd appending to ``path`` (created if missing); refuses links and non-files."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        _chown(fd, owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, offset: int = 0, limit: int | None = None) -> bytes:
    """Bytes of a regular file from ``offset``; b"" if it does not exist.

    Raises OSError for a symlink or anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except FileNotFoundError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.lseek(fd, offset, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read() if limit is None else fh.read(limit)
    finally:
        os.close(fd)


def read_file(path: Path, limit: int) -> bytes | None:
    """Up to ``limit`` + 1 bytes of a regular file, or None if it is missing or not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(limit + 1)
    finally:
        os.close(fd)
