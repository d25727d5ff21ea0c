"""Accounting in the ledger: what each attempt held, for how long, at 100 ms granularity.

An attempt's GPUs are recorded (one ``gpu_usage`` row per GPU, with its type) in the
transaction that hands them out, and closed in the transaction that frees them, so the
accounting can never disagree with the job's state. Durations are stored as whole tenths
of a second ("ds"): exact integers that add up without rounding drift, as hosted services
bill by 100 ms.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "AttemptUsage",
    "GpuInterval",
    "UsageBucket",
    "attempts_between",
    "buckets_between",
    "close_attempt",
    "finished_gpu_intervals",
    "open_attempt",
    "to_ds",
]


class Ledger(Protocol):
    """What the reports below need of a :class:`gpud.ledger.store.Ledger`: its connection.
    (A Protocol, not the class: the store imports this module to write the accounting in
    its own transactions, #12.)"""

    @property
    def conn(self) -> sqlite3.Connection: ...


def to_ds(seconds: float) -> int:
    """Seconds to whole tenths of a second, rounded half up, never negative."""
    return max(0, math.floor(seconds * 10 + 0.5))


def open_attempt(
    c: sqlite3.Connection,
    job_id: int,
    attempt: int,
    owner: str,
    uuids: Sequence[str],
    types: Sequence[str],
    now: float,
) -> None:
    """Record the GPUs handed to an attempt (inside the caller's transaction)."""
    kinds = [*types, *["unknown"] * (len(uuids) - len(types))]
    c.executemany(
        "INSERT INTO gpu_usage (job_id, attempt, owner, gpu_uuid, gpu_type, started_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(job_id, attempt, owner, u, t, now) for u, t in zip(uuids, kinds, strict=False)],
    )


def close_attempt(c: sqlite3.Connection, job_id: int, attempt: int, ended_at: float) -> None:
    """Account for an attempt that ended (inside the caller's transaction): its wall time,
    each GPU's time, and the job's totals. Idempotent: a closed attempt stays as it is."""
    row = c.execute(
        "SELECT started_at, wall_ds FROM attempts WHERE job_id = ? AND attempt = ?",
        (job_id, attempt),
    ).fetchone()
    if row is None or row[1] is not None:
        return
    wall = to_ds(ended_at - row[0])
    gpu = 0
    for uuid, started, suspended in c.execute(
        "SELECT gpu_uuid, started_at, suspended_ds FROM gpu_usage "
        "WHERE job_id = ? AND attempt = ? AND ended_at IS NULL",
        (job_id, attempt),
    ).fetchall():
        # Suspended time (#13) held no GPU: it is not charged.
        d = max(0, to_ds(ended_at - started) - int(suspended or 0))
        gpu += d
        c.execute(
            "UPDATE gpu_usage SET ended_at = ?, ds = ? "
            "WHERE job_id = ? AND attempt = ? AND gpu_uuid = ?",
            (ended_at, d, job_id, attempt, uuid),
        )
    c.execute(
        "UPDATE attempts SET wall_ds = ?, gpu_ds = ? WHERE job_id = ? AND attempt = ?",
        (wall, gpu, job_id, attempt),
    )
    c.execute(
        "UPDATE jobs SET wall_ds = wall_ds + ?, gpu_ds = gpu_ds + ? WHERE id = ?",
        (wall, gpu, job_id),
    )


@dataclass(frozen=True, slots=True)
class AttemptUsage:
    """One attempt as the accounting sees it; ``ended_at`` None while it still runs."""

    job_id: int
    attempt: int
    owner: str
    started_at: float
    ended_at: float | None
    gpu_types: tuple[str, ...]  # one entry per GPU held; () for a CPU-only attempt
    wall_ds: int | None
    gpu_ds: int | None


def attempts_between(
    ledger: Ledger, since: float, until: float, owner: str | None = None
) -> list[AttemptUsage]:
    """Attempts that overlap [since, until), oldest first, optionally of one owner."""
    sql = (
        "SELECT a.job_id, a.attempt, j.owner, a.started_at, a.ended_at, a.wall_ds, "
        "a.gpu_ds, (SELECT group_concat(u.gpu_type, ',') FROM gpu_usage u "
        "WHERE u.job_id = a.job_id AND u.attempt = a.attempt) "
        "FROM attempts a JOIN jobs j ON j.id = a.job_id "
        "WHERE (a.ended_at IS NULL OR a.ended_at > ?) AND a.started_at < ?"
    )
    params: list[object] = [since, until]
    if owner is not None:
        sql += " AND j.owner = ?"
        params.append(owner)
    sql += " ORDER BY a.started_at, a.job_id, a.attempt"
    return [
        AttemptUsage(
            r[0], r[1], r[2], r[3], r[4], tuple(r[7].split(",")) if r[7] else (), r[5], r[6]
        )
        for r in ledger.conn.execute(sql, params)
    ]


@dataclass(frozen=True, slots=True)
class GpuInterval:
    owner: str
    started_at: float
    ended_at: float


def finished_gpu_intervals(ledger: Ledger, since: float) -> list[GpuInterval]:
    """Every finished GPU holding that ended after ``since`` (one row per GPU), for the
    fair-share totals the daemon loads at start-up."""
    # A holding's suspended time (#13) is not usage: its interval starts that much later.
    rows = ledger.conn.execute(
        "SELECT owner, min(ended_at, started_at + suspended_ds / 10.0), ended_at "
        "FROM gpu_usage "
        "WHERE ended_at IS NOT NULL AND ended_at > ? ORDER BY ended_at",
        (since,),
    )
    out = [GpuInterval(r[0], r[1], r[2]) for r in rows]
    # Jobs removed by retention (#12) left their GPU time per owner and hour in
    # usage_rollup: as intervals of the same length, at the hour's end (how it spread
    # inside the hour is not kept; at a 7-day half-life an hour moves a figure by < 0.5%).
    for owner, hour, ds in ledger.conn.execute(
        "SELECT owner, hour, gpu_ds FROM usage_rollup WHERE kind = '*' AND gpu_ds > 0 "
        "AND hour + 3600 > ? ORDER BY hour",
        (since,),
    ):
        seconds, end = ds / 10, float(hour + 3600)
        while seconds > 0:
            part = min(seconds, 3600.0)
            out.append(GpuInterval(owner, end - part, end))
            seconds -= part
    return out


@dataclass(frozen=True, slots=True)
class UsageBucket:
    """The rolled-up usage of jobs removed by retention (#12), for one owner, one UTC
    hour and one kind ('*': all attempts, a GPU type, or 'cpu'); see
    gpud.ledger.retention."""

    owner: str
    hour: int
    kind: str
    jobs: int
    attempts: int
    wall_ds: int
    gpu_ds: int


def buckets_between(
    ledger: Ledger, since: float, until: float, owner: str | None = None
) -> list[UsageBucket]:
    """Rolled-up hours that overlap [since, until), oldest first, optionally of one owner."""
    sql = (
        "SELECT owner, hour, kind, jobs, attempts, wall_ds, gpu_ds FROM usage_rollup "
        "WHERE hour + 3600 > ? AND hour < ?"
    )
    params: list[object] = [since, until]
    if owner is not None:
        sql += " AND owner = ?"
        params.append(owner)
    sql += " ORDER BY hour, owner, kind"
    return [UsageBucket(*r) for r in ledger.conn.execute(sql, params)]
