"""Suspensions in the ledger (#13): what a move into or out of SUSPENDED writes besides
the state, inside the same transaction as the move (:meth:`gpud.ledger.store.Ledger.advance`
calls :func:`on_step` for every step).

- Into SUSPENDED: ``suspended_at`` (now), with the reason and the job it was suspended for
  as the caller's step gives them.
- Out of SUSPENDED (resumed, or ended while suspended): the suspension's length is added
  to the job's ``suspended_s`` (its deadline moves by it) and to each open GPU holding's
  ``suspended_ds`` (no GPU time is charged for it: :func:`gpud.ledger.usage.close_attempt`
  leaves it out).
- Into STARTING (a new attempt): the previous attempt's suspensions are forgotten.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from gpud.domain import JobState
from gpud.ledger.usage import to_ds

__all__ = ["SUSPENSION_COLUMNS", "on_step"]

#: The job columns a step may set for a suspension.
SUSPENSION_COLUMNS = frozenset({"suspended_at", "suspend_reason", "suspended_for", "suspended_s"})


def on_step(
    c: sqlite3.Connection,
    job_id: int,
    attempt: int,
    old: JobState,
    new: JobState,
    now: float,
    cols: dict[str, Any],
) -> None:
    """Add to ``cols`` (the columns the step sets) what the move means for suspensions,
    and account the suspended time of the attempt's GPUs."""
    if new is JobState.SUSPENDED:
        cols.setdefault("suspended_at", now)
        return
    if new is JobState.STARTING:
        cols.update(suspended_at=None, suspend_reason=None, suspended_for=None, suspended_s=0.0)
        return
    if old is not JobState.SUSPENDED:
        return
    row = c.execute("SELECT suspended_at, suspended_s FROM jobs WHERE id = ?", (job_id,)).fetchone()
    began = row[0] if row[0] is not None else now
    length = max(0.0, now - began)
    cols["suspended_at"] = None
    cols["suspended_s"] = float(row[1] or 0.0) + length
    c.execute(
        "UPDATE gpu_usage SET suspended_ds = suspended_ds + ? "
        "WHERE job_id = ? AND attempt = ? AND ended_at IS NULL",
        (to_ds(length), job_id, attempt),
    )
