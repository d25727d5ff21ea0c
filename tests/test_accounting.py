"""Accounting (issue #5): usage reports, and GPU-seconds end to end against real jobs."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest

import gpud_client as gpud
from gpud.accounting import report
from gpud.ledger import Ledger
from gpud.ledger.usage import AttemptUsage

from .conftest import DaemonProc

UTC = dt.UTC
MIDNIGHT = dt.datetime(2026, 11, 28, tzinfo=UTC).timestamp()


def att(
    job: int,
    owner: str,
    start: float,
    end: float | None,
    types: tuple[str, ...] = (),
    attempt: int = 1,
) -> AttemptUsage:
    wall = None if end is None else round((end - start) * 10)
    return AttemptUsage(
        job, attempt, owner, start, end, types, wall, None if wall is None else wall * len(types)
    )


# ---------------------------------------------------------------------------------------
# Reports (pure)


def test_report_by_user_counts_jobs_attempts_and_gpu_time() -> None:
    rows = [
        att(1, "alice", 0, 10, ("h100", "h100")),
        att(1, "alice", 20, 25, ("h100",), 2),
        att(2, "bob", 0, 100, ()),
        att(3, "bob", 50, 60, ("l4",)),
    ]
    r = report(rows, since=0, until=1000, by="user")
    got = [(x.key, len(x.jobs), x.attempts, x.gpu_seconds, x.wall_seconds) for x in r.lines]
    assert got == [("alice", 1, 2, 25.0, 15.0), ("bob", 2, 2, 10.0, 110.0)]
    assert (len(r.total.jobs), r.total.gpu_seconds, r.total.wall_seconds) == (3, 35.0, 125.0)


def test_report_clips_to_the_window_and_counts_running_attempts_up_to_its_end() -> None:
    rows = [att(1, "alice", 0, 100, ("h100",)), att(2, "alice", 90, None, ("h100", "l4"))]
    r = report(rows, since=50, until=110, by="user")
    (line,) = r.lines
    assert line.gpu_seconds == 50 + 2 * 20 and line.wall_seconds == 50 + 20


def test_report_by_gpu_type_and_cpu() -> None:
    rows = [att(1, "a", 0, 10, ("h100", "l4", "l4")), att(2, "a", 0, 4, ())]
    r = report(rows, since=0, until=100, by="gpu-type")
    got = {x.key: (x.gpu_seconds, x.wall_seconds, len(x.jobs)) for x in r.lines}
    assert got == {"l4": (20.0, 10.0, 1), "h100": (10.0, 10.0, 1), "cpu": (0.0, 4.0, 1)}
    assert r.total.gpu_seconds == 30.0 and r.total.wall_seconds == 14.0
    assert [x.key for x in r.lines] == ["l4", "h100", "cpu"]  # most GPU time first


def test_report_by_day_splits_at_midnight() -> None:
    rows = [
        att(1, "a", MIDNIGHT - 3600, MIDNIGHT + 1800, ("h100", "h100")),
        att(2, "a", MIDNIGHT + 7200, MIDNIGHT + 7260, ("h100",)),
    ]
    r = report(rows, since=0, until=MIDNIGHT + 86400, by="day", tz=UTC)
    got = [(x.key, x.gpu_seconds, x.wall_seconds, len(x.jobs)) for x in r.lines]
    assert got == [("2026-11-27", 7200.0, 3600.0, 1), ("2026-11-28", 3660.0, 1860.0, 2)]


def test_report_rejects_an_unknown_grouping() -> None:
    with pytest.raises(ValueError, match="by must be one of"):
        report([], since=0, until=1, by="week")


# ---------------------------------------------------------------------------------------
# End to end: the sum of per-job GPU-seconds equals the GPUs' busy time


def _hold(seconds: float) -> dict[str, Any]:
    import os
    import time

    # When this process started, in Unix time: /proc/self/stat's start time is in clock
    # ticks since boot (CLOCK_BOOTTIME), 10 ms resolution.
    with open("/proc/self/stat") as fh:
        ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    started = time.time() - since_start
    time.sleep(seconds)
    return {
        "started": started,
        "ended": time.time(),
        "gpus": os.environ["CUDA_VISIBLE_DEVICES"].split(","),
    }


@pytest.mark.slow
def test_gpu_seconds_equal_each_gpus_busy_time(fresh_daemon: DaemonProc) -> None:
    """Each job measures its own process's lifetime on its GPUs; the ledger's accounting
    of every job, and of every GPU, must agree with it within 0.1 s per job."""
    rng = random.Random(5)
    hold = gpud.App("accounting", url=fresh_daemon.url).function()(_hold)
    # Three fake GPUs (h100, h100, l4): jobs of one and two GPUs queue for each other.
    handles = [
        hold.with_options(gpu=rng.choice(["any", "any", "any:2", "h100"])).spawn(
            round(rng.uniform(0.3, 1.2), 2)
        )
        for _ in range(10)
    ]
    measured = {h.id: h.get(timeout=120) for h in handles}

    led = Ledger(fresh_daemon.data_dir / "ledger.db")
    try:
        jobs = {h.id: led.get(h.id) for h in handles}
        marks = ",".join("?" * len(jobs))
        rows = led.conn.execute(
            "SELECT job_id, gpu_uuid, started_at, ended_at, ds FROM gpu_usage "
            f"WHERE job_id IN ({marks})",
            list(jobs),
        ).fetchall()
    finally:
        led.close()

    # Per job: GPU-seconds = GPUs x the time they were held. The ledger counts from the
    # hand-out of the GPUs to their release, a few ms either side of the process's life
    # (launch, exit, the worker's fsyncs), and rounds to 100 ms (up to 0.05 s): so 0.15 s
    # per GPU for one job, while over many jobs the rounding averages out.
    # With the Podman executor the GPUs are also held, and accounted, while the job's
    # container is created, started and removed, time its process cannot see: there the
    # process's lifetime is a lower bound, and the container's overhead (under `slack`
    # seconds a job) bounds it from above.
    # On a loaded machine the launch itself (hand-out to the first line of user code) can
    # take longer than that: the ledger records it per job (`startup`), and it is allowed
    # on top, above only.
    slack = 2.0 if fresh_daemon.executor == "podman" else 0.0
    busy: dict[str, float] = {}
    gap: dict[str, float] = {}  # per GPU: the launches of its jobs
    for jid, m in measured.items():
        lifetime = m["ended"] - m["started"]
        n = len(m["gpus"])
        launch = jobs[jid].startup or 0.0
        for u in m["gpus"]:
            busy[u] = busy.get(u, 0.0) + lifetime
            gap[u] = gap.get(u, 0.0) + launch
        assert (
            n * lifetime - 0.15 * n
            <= jobs[jid].gpu_seconds
            <= n * (lifetime + slack + launch) + 0.15 * n
        ), (jid, jobs[jid].gpu_seconds, lifetime)
        assert lifetime - 0.15 <= jobs[jid].wall_seconds <= lifetime + slack + launch + 0.15
    # The acceptance criterion: the sum of per-job GPU-seconds equals the sum of each
    # GPU's busy time within 0.1 s per job (for a container, plus its overhead).
    total = sum(j.gpu_seconds for j in jobs.values())
    gpus_held = sum(len(m["gpus"]) for m in measured.values())
    assert (
        sum(busy.values()) - 0.1 * len(jobs)
        <= total
        <= sum(busy.values()) + slack * gpus_held + sum(gap.values()) + 0.1 * len(jobs)
    )

    # Per GPU: the ledger's rows add up to each GPU's busy time and to the jobs' totals,
    # and never overlap.
    per_gpu: dict[str, list[tuple[float, float, int]]] = {}
    for _, uuid, s, e, ds in rows:
        per_gpu.setdefault(uuid, []).append((s, e, ds))
    assert set(per_gpu) == set(busy)
    assert sum(ds for *_, ds in rows) / 10 == pytest.approx(total)
    for uuid, spans in per_gpu.items():
        n_jobs = len(spans)
        held = sum(ds for *_, ds in spans) / 10
        assert busy[uuid] - 0.1 * n_jobs <= held <= busy[uuid] + (slack + 0.1) * n_jobs + gap[uuid]
        spans.sort()
        for (_, e1, _), (s2, _, _) in zip(spans, spans[1:], strict=False):
            assert e1 <= s2, f"GPU {uuid} was handed to two jobs at once"
