"""Usage reports (`gpud usage`, ``GET /v1/usage``): pure functions of accounted attempts.

The ledger records, per attempt, when its GPUs were handed out and freed (see
:mod:`gpud.ledger.usage`); this module turns attempts into a small ``sreport``: GPU
seconds and wall seconds per user, per day or per GPU type, over a window. An attempt
that straddles the window's edges (or midnight, for days) counts only for the part
inside; an attempt still running counts up to the end of the window. Attempts wholly
inside count at their stored 100 ms granularity, exactly.

Jobs removed by retention (#12) count through their rolled-up hours (``buckets``): the
same totals for a window that holds them whole; an hour cut by the window's edge counts
pro rata, and its jobs and attempts count in the window that holds the hour's start.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

from gpud.ledger.usage import AttemptUsage, UsageBucket

__all__ = ["BY", "Line", "Report", "report"]

#: The ways a report can be grouped.
BY = ("user", "day", "gpu-type")


@dataclass(slots=True)
class Line:
    key: str
    jobs: set[int] = field(default_factory=set)
    attempts: int = 0
    gpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    #: jobs counted from rolled-up hours (removed by retention: no ids left to tell apart)
    rolled_jobs: int = 0

    @property
    def job_count(self) -> int:
        return len(self.jobs) + self.rolled_jobs


@dataclass(frozen=True, slots=True)
class Report:
    since: float
    until: float
    by: str
    lines: list[Line]
    total: Line


def _days(start: float, end: float, tz: dt.tzinfo | None) -> list[tuple[str, float, float]]:
    """[start, end) cut at local midnights: (YYYY-MM-DD, piece start, piece end)."""
    out = []
    t = start
    while True:
        day = dt.datetime.fromtimestamp(t, tz).date()
        # A naive midnight (tz None) is taken as local time by timestamp(), as wanted.
        cut = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tz).timestamp()
        out.append((day.isoformat(), t, min(end, cut)))
        if cut >= end:
            return out
        t = cut


def _pieces(
    a: AttemptUsage, since: float, until: float, by: str, tz: dt.tzinfo | None, now: float | None
) -> list[tuple[str, float, float]]:
    """(key, wall seconds, GPU seconds) of the part of an attempt inside the window."""
    # An attempt still running has run until now, not until a window's end in the future:
    # `until=1e11` by day would otherwise cut it into a million days (#10).
    end = (
        a.ended_at
        if a.ended_at is not None
        else (until if now is None else min(until, max(now, a.started_at)))
    )
    start, stop = max(a.started_at, since), min(end, until)
    if stop < start:
        return []
    whole = start == a.started_at and stop == end and a.wall_ds is not None
    wall = a.wall_ds / 10 if whole and a.wall_ds is not None else stop - start
    # GPU time charged per second of wall time: 1, or less for an attempt that was
    # suspended for part of its run (#13: suspended time is not charged). Where the
    # suspensions fell inside the attempt is not kept: they are spread over it evenly.
    charged = 1.0
    if a.gpu_ds is not None and a.wall_ds and a.gpu_types:
        charged = min(1.0, a.gpu_ds / (a.wall_ds * len(a.gpu_types)))
    per_gpu = wall * charged
    if by == "user":
        gpu = a.gpu_ds / 10 if whole and a.gpu_ds is not None else per_gpu * len(a.gpu_types)
        return [(a.owner, wall, gpu)]
    if by == "gpu-type":
        if not a.gpu_types:
            return [("cpu", wall, 0.0)]
        counts: dict[str, int] = {}
        for t in a.gpu_types:
            counts[t] = counts.get(t, 0) + 1
        return [(t, wall, per_gpu * n) for t, n in sorted(counts.items())]
    days = (
        _days(start, stop, tz)
        if stop > start
        else [(dt.datetime.fromtimestamp(start, tz).date().isoformat(), start, stop)]
    )
    if len(days) == 1:
        return [(days[0][0], wall, per_gpu * len(a.gpu_types))]
    return [(d, e - s, (e - s) * charged * len(a.gpu_types)) for d, s, e in days]


def _add_buckets(
    buckets: Iterable[UsageBucket],
    lines: dict[str, Line],
    total: Line,
    *,
    since: float,
    until: float,
    by: str,
    tz: dt.tzinfo | None,
) -> None:
    for b in buckets:
        lo, hi = max(float(b.hour), since), min(float(b.hour + 3600), until)
        if hi <= lo:
            continue
        share = (hi - lo) / 3600
        counted = since <= b.hour < until
        if by == "gpu-type":
            key = None if b.kind == "*" else b.kind
        elif b.kind != "*":
            continue
        else:
            key = (
                b.owner
                if by == "user"
                else dt.datetime.fromtimestamp(b.hour, tz).date().isoformat()
            )
        targets = [total] if key is None else [lines.setdefault(key, Line(key))]
        if by != "gpu-type":
            targets.append(total)
        for line in targets:
            line.wall_seconds += b.wall_ds / 10 * share
            line.gpu_seconds += b.gpu_ds / 10 * share
            if counted:
                line.rolled_jobs += b.jobs
                line.attempts += b.attempts


def report(
    attempts: Iterable[AttemptUsage],
    *,
    since: float,
    until: float,
    by: str = "user",
    tz: dt.tzinfo | None = None,
    now: float | None = None,
    buckets: Iterable[UsageBucket] = (),
) -> Report:
    """Group accounted attempts, and the rolled-up hours of jobs removed by retention,
    into report lines (see the module docstring).

    Lines by user and GPU type come most GPU-seconds first; by day, in date order.
    ``tz`` is the zone days are cut in (None: the daemon's local time). ``now`` ends the
    attempts still running (None: they run to ``until``).
    """
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}")
    lines: dict[str, Line] = {}
    total = Line("total")
    for a in attempts:
        pieces = _pieces(a, since, until, by, tz, now)
        if pieces:
            total.jobs.add(a.job_id)
            total.attempts += 1
        for key, wall, gpu in pieces:
            line = lines.setdefault(key, Line(key))
            line.jobs.add(a.job_id)
            line.attempts += 1
            line.wall_seconds += wall
            line.gpu_seconds += gpu
            total.gpu_seconds += gpu
            if by != "gpu-type" or key == "cpu" or key == pieces[0][0]:
                total.wall_seconds += wall
    _add_buckets(buckets, lines, total, since=since, until=until, by=by, tz=tz)
    for line in (*lines.values(), total):
        line.gpu_seconds = round(line.gpu_seconds, 1)
        line.wall_seconds = round(line.wall_seconds, 1)
    if by == "day":
        ordered = sorted(lines.values(), key=lambda x: x.key)
    else:
        ordered = sorted(lines.values(), key=lambda x: (-x.gpu_seconds, x.key))
    return Report(since=since, until=until, by=by, lines=ordered, total=total)
