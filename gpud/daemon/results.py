"""Where a finished job's result is read from (#12).

A warm job's small result (up to :data:`gpud.warm.RESULT_INLINE_MAX`) comes back over the
hub and is stored in the ledger's ``results`` table in the same commit as the job's end:
the worker writes no file and syncs nothing, and the result and the end are kept or lost
together (a power cut between two synced commits takes both back; see
docs/reliability.md). Every other result is the worker's ``result.pkl``.

Readers (``/v1/jobs/run``, ``/stream``, a batch's results, ``/result``) look, in order:
in :class:`RecentResults` (what was just stored: the caller waiting on a call is served
from memory), in the ledger (one trip on the read connection for a whole chunk of jobs),
and in the job's directory (one thread trip). The daemon never unpickles any of it.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from gpud.domain import Job
from gpud.ledger.store import Ledger
from gpud_client.jobdir import RESULT_FILE

if TYPE_CHECKING:
    from gpud.ledger.thread import LedgerThread

__all__ = ["RecentResults", "deps_results", "read_file", "read_results", "stored_results"]

#: What RecentResults holds at most: enough for every result a .map's reader has not yet
#: fetched at full speed, small against the daemon's memory target.
RECENT_BYTES = 8 << 20
RECENT_COUNT = 20_000


class RecentResults:
    """The latest results stored with a job's end, by (job id, attempt), oldest dropped
    first beyond a budget. Only a cache: the ledger has each of them."""

    def __init__(self, max_bytes: int = RECENT_BYTES, max_count: int = RECENT_COUNT) -> None:
        self._data: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self._bytes = 0
        self._max_bytes, self._max_count = max_bytes, max_count

    def put(self, job_id: int, attempt: int, data: bytes) -> None:
        old = self._data.pop(job_id, None)
        if old is not None:
            self._bytes -= len(old[1])
        self._data[job_id] = (attempt, data)
        self._bytes += len(data)
        while self._data and (self._bytes > self._max_bytes or len(self._data) > self._max_count):
            _, (_, dropped) = self._data.popitem(last=False)
            self._bytes -= len(dropped)

    def get(self, job_id: int, attempt: int) -> bytes | None:
        hit = self._data.get(job_id)
        return hit[1] if hit is not None and hit[0] == attempt else None


def stored_results(ledger: Ledger, wanted: Sequence[tuple[int, int]]) -> dict[int, bytes]:
    """The results stored in the ledger for these (job id, attempt) pairs."""
    out: dict[int, bytes] = {}
    for i in range(0, len(wanted), 500):  # SQLite's bound on host parameters
        part = dict(wanted[i : i + 500])
        marks = ",".join("?" * len(part))
        for job_id, attempt, data in ledger.conn.execute(
            f"SELECT job_id, attempt, data FROM results WHERE job_id IN ({marks})", list(part)
        ):
            if part.get(job_id) == attempt:
                out[job_id] = bytes(data)
    return out


def deps_results(ledger: Ledger, ids: Sequence[int]) -> dict[int, bytes]:
    """The results stored in the ledger for these jobs' current attempts (gpud.result_of
    of a warm job, #14)."""
    out: dict[int, bytes] = {}
    for i in range(0, len(ids), 500):
        part = list(ids[i : i + 500])
        marks = ",".join("?" * len(part))
        for job_id, data in ledger.conn.execute(
            f"SELECT r.job_id, r.data FROM results r JOIN jobs j ON j.id = r.job_id "
            f"AND j.attempt = r.attempt WHERE r.job_id IN ({marks})",
            part,
        ):
            out[job_id] = bytes(data)
    return out


def read_file(path: Path, limit: int | None) -> tuple[bytes | None, int]:
    """(the file's bytes if at most ``limit``, its size); (None, 0) when there is none or
    it is not a regular file (a job may plant anything in its directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None, 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None, 0
        if limit is not None and st.st_size > limit:
            return None, st.st_size
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read() if limit is None else fh.read(limit + 1)
        if limit is not None and len(data) > limit:
            return None, len(data)
        return data, len(data)
    finally:
        os.close(fd)


async def read_results(
    ledger: LedgerThread,
    recent: RecentResults,
    jobs_dir: Path,
    jobs: Sequence[Job],
    limit: int | None,
) -> list[tuple[bytes | None, int]]:
    """Each job's (result if at most ``limit`` bytes, else None; its size); (None, 0) for
    a job without one. At most one ledger trip and one thread trip for the lot."""
    out: list[tuple[bytes | None, int] | None] = [None] * len(jobs)
    missing: list[int] = []
    for i, j in enumerate(jobs):
        if not j.has_result:
            out[i] = (None, 0)
        elif (data := recent.get(j.id, j.attempt)) is not None:
            out[i] = _bounded(data, limit)
        else:
            missing.append(i)
    if missing:
        stored = await ledger.read(stored_results, [(jobs[i].id, jobs[i].attempt) for i in missing])
        rest = []
        for i in missing:
            data = stored.get(jobs[i].id)
            if data is not None:
                out[i] = _bounded(data, limit)
            else:
                rest.append(i)
        if rest:
            found = await trio.to_thread.run_sync(
                lambda: [read_file(jobs_dir / str(jobs[i].id) / RESULT_FILE, limit) for i in rest]
            )
            for i, got in zip(rest, found, strict=True):
                out[i] = got
    return [o if o is not None else (None, 0) for o in out]


def _bounded(data: bytes, limit: int | None) -> tuple[bytes | None, int]:
    return (data if limit is None or len(data) <= limit else None), len(data)
