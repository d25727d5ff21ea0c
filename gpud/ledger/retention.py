"""Retention in the ledger: remove the rows of jobs that ended long ago, keeping their usage.

A job's rows (the job, its attempts, its GPU accounting, its events, an idempotency key
that names it, and the payload and batch no other job refers to) are removed together,
in one transaction per chunk of jobs, after their accounting was added to
``usage_rollup`` in that same transaction. So a crash leaves either the job and its
usage, or the rollup with the usage, never both and never neither.

The rollup keeps, per owner, UTC hour and kind ('*' for every attempt, a GPU type, or
'cpu' for attempts without GPUs): the wall and GPU time the attempts ran in that hour
(an attempt across hours is spread over them, to the 100 ms, so the parts add up to
exactly what it had), and how many attempts and jobs ended in that hour. Reports over
windows that hold the removed jobs whole give the same totals as before; a window that
starts or ends inside a rolled-up hour counts that hour's share pro rata.

The event log stays append-only at the database level (triggers): an event may be
deleted only while its job sits in ``retention_pruning``, which only a final job may
enter, and which is emptied before the transaction commits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from gpud.ledger.store import Ledger
from gpud.ledger.usage import to_ds

__all__ = ["HOUR", "Pruned", "job_ends", "prunable", "prune", "pruned_state", "spread"]

HOUR = 3600
FINAL_SQL = "state IN ('succeeded', 'failed', 'cancelled', 'timed_out', 'lost')"
#: The end of a final job, as retention sees it (the expression jobs_final_end indexes).
END_SQL = "coalesce(ended_at, submitted_at)"
#: Job ids per ``IN (...)``: well under SQLite's variable limit.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one call of :func:`prune` removed."""

    jobs: int = 0
    attempts: int = 0
    events: int = 0
    blobs: int = 0
    max_id: int = 0


def _marks(n: int) -> str:
    return ",".join("?" * n)


def job_ends(ledger: Ledger, ids: Sequence[int]) -> dict[int, tuple[bool, float]]:
    """For the ids that are jobs in the ledger: (final?, when it ended or was submitted)."""
    out: dict[int, tuple[bool, float]] = {}
    for i in range(0, len(ids), _CHUNK):
        part = list(ids[i : i + _CHUNK])
        for r in ledger.conn.execute(
            f"SELECT id, {FINAL_SQL}, {END_SQL} FROM jobs WHERE id IN ({_marks(len(part))})", part
        ):
            out[int(r[0])] = (bool(r[1]), float(r[2]))
    return out


def pruned_state(ledger: Ledger) -> tuple[int, int]:
    """(the highest job id removed by retention, how many jobs were removed)."""
    r = ledger.conn.execute(
        "SELECT pruned_through, pruned_jobs FROM retention_state WHERE id = 1"
    ).fetchone()
    return (int(r[0]), int(r[1])) if r else (0, 0)


def prunable(ledger: Ledger, before: float) -> tuple[int, int, int, int]:
    """(jobs, attempts, events, payloads) that :func:`prune` would remove now: final jobs
    that ended before ``before``, and the payloads only they refer to. For --dry-run."""
    where = f"{FINAL_SQL} AND {END_SQL} < ?"
    c = ledger.conn
    jobs = c.execute(f"SELECT count(*) FROM jobs WHERE {where}", (before,)).fetchone()[0]
    attempts = c.execute(
        f"SELECT count(*) FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE {where})",
        (before,),
    ).fetchone()[0]
    events = c.execute(
        f"SELECT count(*) FROM events WHERE job_id IN (SELECT id FROM jobs WHERE {where})",
        (before,),
    ).fetchone()[0]
    payloads = c.execute(
        f"SELECT count(*) FROM (SELECT DISTINCT function_hash AS h FROM jobs WHERE {where}) "
        f"WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE function_hash = h AND NOT ({where}))",
        (before, before),
    ).fetchone()[0]
    return int(jobs), int(attempts), int(events), int(payloads)


def spread(start: float, end: float, ds: int) -> list[tuple[int, int]]:
    """``ds`` tenths of a second used evenly from start to end, cut at UTC hours:
    [(hour start, tenths in that hour)]. The parts add up to ``ds`` exactly."""
    hour = int(start // HOUR) * HOUR
    if end <= start:
        return [(hour, ds)] if ds else []
    out: list[tuple[int, int]] = []
    done = 0
    while True:
        cut = min(end, hour + HOUR)
        upto = ds if cut >= end else round(ds * (cut - start) / (end - start))
        if upto > done:
            out.append((hour, upto - done))
            done = upto
        if cut >= end:
            return out
        hour += HOUR


class _Rollup:
    """Usage buckets being built: (hour, owner, kind) -> [jobs, attempts, wall, gpu]."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, str, str], list[int]] = {}

    def add(self, hour: int, owner: str, kind: str, col: int, n: int) -> None:
        self.rows.setdefault((hour, owner, kind), [0, 0, 0, 0])[col] += n


def _roll_up(c: sqlite3.Connection, ids: Sequence[int]) -> None:
    """Add the usage of these jobs' attempts to usage_rollup (in the caller's transaction)."""
    marks = _marks(len(ids))
    gpus: dict[tuple[int, int], list[tuple[str, float, float, int]]] = {}
    for job_id, attempt, kind, start, end, ds in c.execute(
        "SELECT u.job_id, u.attempt, u.gpu_type, u.started_at, "
        "coalesce(u.ended_at, a.ended_at, j.ended_at, u.started_at), u.ds "
        "FROM gpu_usage u JOIN attempts a ON a.job_id = u.job_id AND a.attempt = u.attempt "
        f"JOIN jobs j ON j.id = u.job_id WHERE u.job_id IN ({marks})",
        list(ids),
    ):
        gpus.setdefault((job_id, attempt), []).append(
            (kind, start, end, to_ds(end - start) if ds is None else int(ds))
        )
    acc = _Rollup()
    last: dict[int, tuple[int, str, set[str]]] = {}  # job -> (end hour, owner, kinds)
    for job_id, attempt, owner, start, end, wall in c.execute(
        "SELECT a.job_id, a.attempt, j.owner, a.started_at, "
        "coalesce(a.ended_at, j.ended_at, a.started_at), a.wall_ds "
        f"FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.job_id IN ({marks}) "
        "ORDER BY a.job_id, a.attempt",
        list(ids),
    ):
        held = gpus.get((job_id, attempt), [])
        kinds = {k for k, *_ in held} or {"cpu"}
        pieces = spread(start, end, to_ds(end - start) if wall is None else int(wall))
        end_hour = int(end // HOUR) * HOUR
        for kind in ("*", *sorted(kinds)):
            for hour, d in pieces:
                acc.add(hour, owner, kind, 2, d)
            acc.add(end_hour, owner, kind, 1, 1)
        for kind, g_start, g_end, g_ds in held:
            for hour, d in spread(g_start, g_end, g_ds):
                acc.add(hour, owner, "*", 3, d)
                acc.add(hour, owner, kind, 3, d)
        seen = last.get(job_id)
        last[job_id] = (
            max(end_hour, seen[0]) if seen else end_hour,
            owner,
            kinds | (seen[2] if seen else set()),
        )
    for hour, owner, kinds in last.values():
        for kind in ("*", *kinds):
            acc.add(hour, owner, kind, 0, 1)
    c.executemany(
        "INSERT INTO usage_rollup (hour, owner, kind, jobs, attempts, wall_ds, gpu_ds) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hour, owner, kind) DO UPDATE SET "
        "jobs = jobs + excluded.jobs, attempts = attempts + excluded.attempts, "
        "wall_ds = wall_ds + excluded.wall_ds, gpu_ds = gpu_ds + excluded.gpu_ds",
        [(*k, *v) for k, v in acc.rows.items()],
    )


def prune(ledger: Ledger, before: float, limit: int = 2000) -> Pruned:
    """Remove up to ``limit`` final jobs that ended before ``before`` (those that ended
    first go first), with their usage rolled up, in one transaction. Call again until it
    returns 0 jobs; other ledger work runs between the calls."""
    with ledger._tx() as c:
        ids = [
            r[0]
            for r in c.execute(
                f"SELECT id FROM jobs WHERE {FINAL_SQL} AND {END_SQL} < ? ORDER BY {END_SQL} "
                "LIMIT ?",
                (before, limit),
            )
        ]
        if not ids:
            return Pruned()
        _roll_up(c, ids)
        c.executemany("INSERT INTO retention_pruning (job_id) VALUES (?)", [(i,) for i in ids])
        marks = _marks(len(ids))
        hashes = [
            r[0]
            for r in c.execute(
                f"SELECT DISTINCT function_hash FROM jobs WHERE id IN ({marks})", ids
            )
        ]
        batches = [
            r[0]
            for r in c.execute(
                f"SELECT DISTINCT batch_id FROM jobs WHERE id IN ({marks}) "
                "AND batch_id IS NOT NULL",
                ids,
            )
        ]
        pruning = "SELECT job_id FROM retention_pruning"
        events = c.execute(f"DELETE FROM events WHERE job_id IN ({pruning})").rowcount
        c.execute(f"DELETE FROM gpu_usage WHERE job_id IN ({pruning})")
        attempts = c.execute(f"DELETE FROM attempts WHERE job_id IN ({pruning})").rowcount
        c.execute(f"DELETE FROM idempotency WHERE job_id IN ({pruning})")
        c.execute(f"DELETE FROM results WHERE job_id IN ({pruning})")  # #12
        c.execute(f"DELETE FROM jobs WHERE id IN ({pruning})")
        blobs = 0
        for h in hashes:
            blobs += c.execute(
                "DELETE FROM blobs WHERE hash = ? AND NOT EXISTS "
                "(SELECT 1 FROM jobs WHERE function_hash = ?)",
                (h, h),
            ).rowcount
        for b in batches:
            if c.execute(
                "DELETE FROM batches WHERE id = ? AND NOT EXISTS "
                "(SELECT 1 FROM jobs WHERE batch_id = ?)",
                (b, b),
            ).rowcount:
                c.execute("DELETE FROM idempotency WHERE batch_id = ?", (b,))
        top = max(ids)
        c.execute(
            "UPDATE retention_state SET pruned_through = max(pruned_through, ?), "
            "pruned_jobs = pruned_jobs + ? WHERE id = 1",
            (top, len(ids)),
        )
        c.execute("DELETE FROM retention_pruning")
    return Pruned(jobs=len(ids), attempts=attempts, events=events, blobs=blobs, max_id=top)
