"""Reads of batches (one ``.map`` each, #12): who owns one, its limit, its jobs in input
order, and counts of its jobs by state. Functions over a :class:`Ledger`, run on the ledger
thread (``ledger.call(fn, ...)``), like :mod:`gpud.ledger.users`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gpud.domain import Job
from gpud.ledger.store import _JOB_COLUMNS, Ledger, _row_to_job

__all__ = ["BatchRow", "batch_jobs", "batch_limits", "batch_row", "batch_states"]


@dataclass(frozen=True, slots=True)
class BatchRow:
    id: int
    owner: str  # of its jobs (a batch is one submit, by one user)
    name: str  # its function's display name
    size: int
    submitted_at: float
    max_concurrency: int | None


def batch_row(ledger: Ledger, batch_id: int) -> BatchRow | None:
    """The batch, or None when there is none (or it has no jobs left)."""
    r = ledger.conn.execute(
        "SELECT b.id, b.size, b.submitted_at, b.max_concurrency, j.owner, j.name "
        "FROM batches b JOIN jobs j ON j.batch_id = b.id WHERE b.id = ? "
        "ORDER BY j.id LIMIT 1",
        (batch_id,),
    ).fetchone()
    if r is None:
        return None
    return BatchRow(
        id=r[0], size=r[1], submitted_at=r[2], max_concurrency=r[3], owner=r[4], name=r[5]
    )


def batch_job_ids(ledger: Ledger, batch_id: int) -> list[int]:
    """Its jobs' ids in input order (a batch's jobs are inserted in that order)."""
    return [
        r[0]
        for r in ledger.conn.execute(
            "SELECT id FROM jobs WHERE batch_id = ? ORDER BY id", (batch_id,)
        )
    ]


def batch_states(ledger: Ledger, batch_id: int) -> dict[str, int]:
    """How many of its jobs are in each state (as committed)."""
    return {
        r[0]: r[1]
        for r in ledger.conn.execute(
            "SELECT state, count(*) FROM jobs WHERE batch_id = ? GROUP BY state", (batch_id,)
        )
    }


def batch_jobs(ledger: Ledger, ids: Iterable[int]) -> list[Job]:
    """The jobs with these ids, in the order given (missing ones left out); one query per
    500 ids rather than one per job."""
    wanted = list(ids)
    found: dict[int, Job] = {}
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        rows = ledger.conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id IN ({','.join('?' * len(chunk))})", chunk
        )
        found.update((j.id, j) for j in map(_row_to_job, rows))
    return [found[i] for i in wanted if i in found]


def batch_limits(ledger: Ledger, batch_ids: Iterable[int]) -> dict[int, int | None]:
    """Each batch's max_concurrency (None: no limit), for every id given."""
    ids = list(batch_ids)
    out: dict[int, int | None] = dict.fromkeys(ids)
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        marks = ",".join("?" * len(chunk))
        out.update(
            ledger.conn.execute(
                f"SELECT id, max_concurrency FROM batches WHERE id IN ({marks})",
                chunk,
            ).fetchall()
        )
    return out
