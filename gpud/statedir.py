"""A job's state directory (#14): ``jobs/<id>/state``, kept across its attempts.

A job saves checkpoints there (``$GPUD_STATE_DIR``, ``gpud.state_dir()``) and finds them
on its next attempt; its owner lists and fetches them after it ends (``gpud state``,
``GET /v1/jobs/{id}/state``). It lives inside the job's directory, so retention removes
(and ``retention_max_bytes`` counts) it with the rest.

The directory belongs to the job's user, who can put anything there: symlinks to
/etc/shadow or to another user's files included. So nothing here follows a link: the
listing skips them, and a fetch opens each path component with O_NOFOLLOW relative to
its parent, refusing anything but directories on the way and a regular file at the end.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_LISTED", "NAME", "BadPath", "StateFile", "ensure", "listing", "open_file"]

NAME = "state"
#: A listing stops after this many files (it says so); a job may write millions.
MAX_LISTED = 10_000
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class BadPath(ValueError):
    """A file path that is not a plain relative path inside the state directory."""


@dataclass(frozen=True, slots=True)
class StateFile:
    path: str  # relative to the state directory, "/"-separated
    size: int
    mtime: float


def ensure(job_dir: Path, owner: tuple[int, int]) -> Path:
    """Make ``job_dir/state`` (0700, the job user's) unless it is there from an earlier
    attempt; something else planted under that name (a link, a file) is replaced."""
    d = job_dir / NAME
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        d.unlink()
        st = None
    if st is None:
        d.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(d, *owner, follow_symlinks=False)
    os.chmod(d, 0o700, follow_symlinks=False)
    return d


def check_path(path: str) -> list[str]:
    """The components of a requested file path; BadPath (saying why) for an absolute
    path, "..", ".", empty components or control characters."""
    if not path or len(path) > 4096:
        raise BadPath("give a file path inside the state directory, as `gpud state JOB` lists it")
    if path.startswith("/"):
        raise BadPath(
            f"{path!r} is absolute: give the path relative to the state "
            "directory, as `gpud state JOB` lists it"
        )
    parts = path.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise BadPath(
                f"{path!r} leaves the state directory or is not a plain path "
                "(no '..', '.' or empty parts): give a path as `gpud state JOB` "
                "lists it"
            )
        if any(ord(c) < 32 for c in p):
            raise BadPath(
                f"{path!r} has control characters: give a path as `gpud state JOB` lists it"
            )
    return parts


def open_file(job_dir: Path, path: str) -> int | None:
    """An fd on the regular file ``path`` in the job's state directory, opened without
    following any link; None if there is no such file. Raises BadPath."""
    parts = check_path(path)
    try:
        fd = os.open(job_dir / NAME, _DIR)
    except OSError:
        return None
    try:
        for p in parts[:-1]:
            nxt = os.open(p, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open(
            parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd
        )
    except OSError:
        return None  # missing, a link, or not a directory on the way: no such file
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(out).st_mode):
        os.close(out)
        return None
    return out


def listing(job_dir: Path) -> tuple[list[StateFile], bool]:
    """The regular files under the state directory (links and others skipped), sorted by
    path, and whether the listing stopped at MAX_LISTED."""
    out: list[StateFile] = []
    try:
        top = os.open(job_dir / NAME, _DIR)
    except OSError:
        return out, False
    stack: list[tuple[int, str]] = [(top, "")]
    try:
        while stack:
            fd, prefix = stack.pop()
            try:
                with os.scandir(fd) as it:
                    entries = sorted(it, key=lambda e: e.name)
                for e in entries:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    rel = prefix + e.name
                    if stat.S_ISREG(st.st_mode):
                        if len(out) >= MAX_LISTED:
                            return sorted(out, key=lambda f: f.path), True
                        out.append(StateFile(rel, st.st_size, st.st_mtime))
                    elif stat.S_ISDIR(st.st_mode):
                        with contextlib.suppress(OSError):
                            stack.append((os.open(e.name, _DIR, dir_fd=fd), rel + "/"))
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    return sorted(out, key=lambda f: f.path), False
