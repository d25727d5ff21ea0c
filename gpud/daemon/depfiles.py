"""The results a job's arguments may refer to with ``gpud.result_of`` (#14), put in its
directory before it starts: jobs/<id>/deps/<dependency id>.pkl.

The daemon never unpickles them: it links (or copies) the dependency's result.pkl, as
bytes, and the worker runtime loads it in the job's own process, as the job's user.
Dependencies are the same owner's jobs (checked at submit)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpud.safefs import read_file
from gpud_client.jobdir import RESULT_FILE

__all__ = ["DEPS_DIR", "link_results"]

DEPS_DIR = "deps"  # gpud_client.worker.DEPS_DIR
#: a result copied (where it cannot be linked) is read into memory: up to this size
_COPY_MAX = 1 << 30

log = logging.getLogger("gpud")


def link_results(
    jobs_dir: Path,
    job_dir: Path,
    deps: Sequence[int],
    owner: tuple[int, int],
    stored: Mapping[int, bytes] | None = None,
) -> None:
    """Give ``job_dir`` the results its dependencies left (those that left one).
    ``stored``: results kept in the ledger instead of a result.pkl (a warm job's small
    result, #12), written out as the file would have been linked.

    The job directory is writable by the job's user, who may have left anything there
    (a symlink named deps, say): everything below it is reached through a directory
    descriptor opened without following links."""
    if not deps:
        return
    fd = _open_deps_dir(job_dir / DEPS_DIR, owner)
    try:
        for dep in deps:
            data = (stored or {}).get(dep)
            if data is not None:
                _write(data, f"{dep}.pkl", fd, owner)
            else:
                _pass_on(jobs_dir / str(dep) / RESULT_FILE, f"{dep}.pkl", fd, owner, dep)
    finally:
        os.close(fd)


def _open_deps_dir(path: Path, owner: tuple[int, int]) -> int:
    for _ in range(2):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            path.unlink(missing_ok=True)  # not a directory (a link): made again
            continue
        if os.geteuid() == 0:
            os.fchown(fd, *owner)
        return fd
    raise OSError(f"{path} could not be made a directory")


def _pass_on(src: Path, name: str, dir_fd: int, owner: tuple[int, int], dep: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    try:
        st = os.lstat(src)
    except OSError:
        return  # no result (it failed, or retention removed it): the worker says so
    if not stat.S_ISREG(st.st_mode):
        log.warning("job %s's result is not a regular file: not passed on", dep)
        return
    try:
        # A hard link: no copy of a large result, and the file stays the user's own.
        os.link(src, name, dst_dir_fd=dir_fd, follow_symlinks=False)
        return
    except OSError:
        pass
    # Another filesystem, or links refused: copy it, if the job's user owns it (a root
    # daemon must not copy out a file the user could not read).
    if st.st_uid != owner[0] and os.geteuid() == 0:
        log.warning("job %s's result is not its owner's: not passed on", dep)
        return
    data = read_file(src, _COPY_MAX)
    if data is None or len(data) > _COPY_MAX:
        log.warning("job %s's result could not be copied (over %d bytes?)", dep, _COPY_MAX)
        return
    _write(data, name, dir_fd, owner)


def _write(data: bytes, name: str, dir_fd: int, owner: tuple[int, int]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        if os.geteuid() == 0:
            os.fchown(fd, *owner)
        f.write(data)
