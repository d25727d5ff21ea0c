"""When the ledger cannot be written: a full disk, or another process holding SQLite's
write lock (issue #10).

The policy (docs/operations.md, "When the disk is full"):

* Submits are refused before anything is written, with 507 and what to free, once the
  data directory's filesystem has less than :data:`RESERVE_BYTES` free (plus the body):
  what is left is kept for the state changes of jobs already running.
* A job's state change is never dropped: :func:`persist` retries it, holding it in the
  daemon's memory (its supervisor task waits), until it can be written. A daemon that is
  killed meanwhile loses nothing either: the job's outcome is in its directory, and the
  next daemon collects it (docs/architecture.md, "Restart").
* SQLite's transactions keep the ledger consistent whatever fails (``PRAGMA
  integrity_check`` stays "ok"); a failed COMMIT is rolled back, never left open.
* A write lock held by another process makes a request wait for the busy timeout (10 s),
  then answer 503 with Retry-After; the daemon carries on when the lock is released.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

__all__ = [
    "RESERVE_BYTES",
    "DiskFull",
    "free_bytes",
    "is_busy",
    "is_full",
    "persist",
    "require_room",
]

log = logging.getLogger("gpud")

T = TypeVar("T")

#: Free space kept for running jobs' state changes: submits stop short of it.
RESERVE_BYTES = 1024 * 1024


class DiskFull(RuntimeError):
    """No room left in the data directory: the message says where, and what to free."""


def is_full(e: BaseException) -> bool:
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(
            e
        )
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def is_busy(e: BaseException) -> bool:
    if not isinstance(e, sqlite3.OperationalError):
        return False
    code = getattr(e, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(e)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def full_message(data_dir: Path) -> str:
    return (
        f"the disk holding gpud's data directory {data_dir} is full: free space there "
        "(old jobs' directories under jobs/, unused snapshots with `gpud snapshots rm`, "
        "anything else on that filesystem), then try again"
    )


def require_room(data_dir: Path, need: int) -> None:
    """Raise DiskFull unless ``need`` bytes fit beside the reserve."""
    try:
        free = free_bytes(data_dir)
    except OSError:
        return  # cannot tell: let the write itself say
    if free < need + RESERVE_BYTES:
        raise DiskFull(full_message(data_dir))


async def persist(write: Callable[[], Awaitable[T]], what: str) -> T:
    """Run a ledger write until it succeeds: a full disk or a held lock is waited out
    (1 s, doubling to 30 s between tries), any other error is raised. The caller's state
    change stays in memory meanwhile; cancelling the caller gives up (a restart recovers
    the job from its directory)."""
    delay, warned = 1.0, False
    while True:
        try:
            result = await write()
        except sqlite3.Error as e:
            if not (is_full(e) or is_busy(e)):
                raise
            if not warned:
                log.warning("cannot record %s yet (%s): retrying until it can be written", what, e)
                warned = True
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)
            continue
        if warned:
            log.info("recorded %s", what)
        return result
