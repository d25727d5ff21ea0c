"""What ``GET /metrics`` reports (#16), from what the daemon keeps anyway.

A scrape must stay cheap with 100,000 jobs queued, so nothing here walks the jobs:

* the queued jobs are counted per owner by the queue index (gpud.pending) and the
  dependency index (gpud.deps), and per GPU shape by the index's groups (each sorted by
  submit time, so the oldest wait is the first key of a group);
* starting, running and suspended jobs are few (bounded by the GPUs and CPU slots) and are
  read from the active jobs' ``running`` map;
* finished jobs are counted, and their startup and run times put into histograms, as
  they end: :meth:`JobStats.job_ended` is called from ``DaemonCore._advance``, the one
  place every job's final state passes. These counters start at zero with the daemon, as
  Prometheus counters may (``rate()`` and ``increase()`` handle the reset);
* the snapshot and image stores are summed by one query each on the ledger's read-only
  connection (their tables hold at most a few hundred rows: both stores are capped).

Labels are bounded: users, states, start kinds, GPU shapes and GPUs. Never a job id.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from gpud.deps import DepIndex
from gpud.domain import FINAL, Gpu, GpuRequest, Job, JobState
from gpud.ledger import LedgerThread
from gpud.ledger.store import Ledger
from gpud.pending import ActiveJobs
from gpud.promtext import Family, Histogram

__all__ = ["JobStats", "collect", "gpu_shape"]

#: startup: from a warm call's milliseconds to a cold container's tens of seconds
STARTUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: run time: from a quick .map element to the 24 h max_timeout
RUN_BUCKETS = (
    0.1,
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    12 * 3600.0,
    24 * 3600.0,
)
#: event-loop lag: a healthy loop stays under a millisecond or two
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: how often the lag is measured
LAG_INTERVAL = 0.5


def _kind(job: Job) -> str:
    return job.start_kind or "none"  # "none": it never started (cancelled while queued)


class JobStats:
    """Counters and histograms the daemon keeps as jobs end, and the event-loop lag."""

    def __init__(self) -> None:
        self.ended: dict[tuple[str, str, str], int] = {}  # (state, user, start kind) -> n
        self.startup = Histogram(
            "gpud_job_startup_seconds",
            "Seconds from a job's dispatch to the first line of its code, by how it started "
            "(cold, warm, restored)",
            ("start_kind",),
            STARTUP_BUCKETS,
        )
        self.run = Histogram(
            "gpud_job_run_seconds",
            "Seconds finished jobs ran (their last attempt), by how they started",
            ("start_kind",),
            RUN_BUCKETS,
        )
        self.lag = Histogram(
            "gpud_event_loop_lag_seconds",
            f"How late the daemon's event loop woke a task sleeping {LAG_INTERVAL} s",
            (),
            LAG_BUCKETS,
        )
        self.last_lag = 0.0
        #: warm calls started by a hand-off from the call before them, no round (#12)
        self.handoffs = 0

    def job_ended(self, job: Job) -> None:
        """Count a job that reached a final state (called once per job, by the daemon)."""
        if job.state not in FINAL:
            return
        kind = _kind(job)
        key = (job.state.value, job.owner, kind)
        self.ended[key] = self.ended.get(key, 0) + 1
        if job.startup is not None:
            self.startup.observe(job.startup, kind)
        if job.started_at is not None and job.ended_at is not None:
            self.run.observe(max(0.0, job.ended_at - job.started_at), kind)

    async def watch_lag(self, interval: float = LAG_INTERVAL) -> None:
        """Sleep, and count how much later than asked the loop woke us: the time other
        tasks held the loop (a blocking call in a handler shows up here first)."""
        while True:
            t0 = trio.current_time()
            await trio.sleep(interval)
            lag = max(0.0, trio.current_time() - t0 - interval)
            self.last_lag = lag
            self.lag.observe(lag)


def gpu_shape(gpu: GpuRequest | None) -> str:
    """A GPU request as a label: "none", "h100:1", "h100:2|a100:4" (its fallbacks)."""
    if gpu is None:
        return "none"
    return "|".join(f"{t}:{n}" for t, n in gpu.options)


def _stores(ledger: Ledger) -> tuple[int, int, int, int]:
    c = ledger.conn
    snaps = c.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM snapshots WHERE state = 'ready'"
    ).fetchone()
    imgs = c.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM images").fetchone()
    return int(snaps[0]), int(snaps[1]), int(imgs[0]), int(imgs[1])


def _gauge(name: str, help: str, labels: tuple[str, ...] = ()) -> Family:
    return Family(name, "gauge", help, labels)


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


async def collect(
    stats: JobStats,
    *,
    jobs: ActiveJobs[Any],
    deps: DepIndex,
    gpus: list[Gpu],
    holders: Mapping[str, Job],
    usage: Mapping[str, float],
    ledger: LedgerThread,
    now: float,
    started_at: float,
    version: str,
    executor: str,
) -> list[Family]:
    """Every family of a scrape. O(users x states + GPU shapes + active non-queued jobs)."""
    fams: list[Family] = []
    info = _gauge(
        "gpud_build_info", "gpud's version and executor (always 1)", ("version", "executor")
    )
    info.add(1, version, executor)
    fams.append(info)
    up = _gauge("gpud_start_time_seconds", "Unix time the daemon started")
    up.add(started_at)
    fams.append(up)

    # -- jobs --------------------------------------------------------------------------
    active = _gauge(
        "gpud_jobs",
        "Active jobs now, by state, user and how they started",
        ("state", "user", "start_kind"),
    )
    queued: dict[str, int] = {o: jobs.queued_by(o) for o in jobs.queued_owners()}
    for owner, n in deps.held_owners().items():
        queued[owner] = queued.get(owner, 0) + n
    for owner, n in sorted(queued.items()):
        if n:
            active.add(n, JobState.QUEUED.value, owner, "none")
    others: dict[tuple[str, str, str], int] = {}
    for j in jobs.running.values():
        key = (j.state.value, j.owner, _kind(j))
        others[key] = others.get(key, 0) + 1
    for key, n in sorted(others.items()):
        active.add(n, *key)
    fams.append(active)
    ended = Family(
        "gpud_jobs_ended_total",
        "counter",
        "Jobs that reached a final state since the daemon started, by state, user "
        "and how they started",
        ("state", "user", "start_kind"),
    )
    for key, n in sorted(stats.ended.items()):
        ended.add(n, *key)
    fams.append(ended)
    fams += [stats.startup.family(), stats.run.family()]

    # -- the queue, by GPU shape -------------------------------------------------------
    length = _gauge(
        "gpud_queue_length",
        "Jobs waiting for the scheduler, by GPU shape "
        "(jobs waiting for dependencies are not in it)",
        ("gpu_shape",),
    )
    oldest = _gauge(
        "gpud_queue_oldest_wait_seconds",
        "How long the longest-waiting queued job of each GPU shape has waited",
        ("gpu_shape",),
    )
    by_shape: dict[str, tuple[int, float]] = {}
    for g in jobs.pending.groups():
        if not g.keys:
            continue
        shape = gpu_shape(g.gpu)
        n, first = by_shape.get(shape, (0, math.inf))
        by_shape[shape] = (n + len(g.keys), min(first, g.keys[0][0]))
    for shape, (n, first) in sorted(by_shape.items()):
        length.add(n, shape)
        oldest.add(max(0.0, now - first), shape)
    fams += [length, oldest]

    # -- GPUs ----------------------------------------------------------------------------
    labels = ("gpu", "type", "user")
    util = _gauge(
        "gpud_gpu_utilization_percent",
        'GPU utilisation (NVML), with the user of the job holding it ("" when free)',
        labels,
    )
    mem = _gauge("gpud_gpu_memory_used_bytes", "GPU memory in use", labels)
    total = _gauge("gpud_gpu_memory_total_bytes", "GPU memory in all", labels)
    temp = _gauge("gpud_gpu_temperature_celsius", "GPU temperature", labels)
    power = _gauge("gpud_gpu_power_watts", "GPU power draw", labels)
    for gpu in gpus:
        holder = holders.get(gpu.uuid)
        lv = (str(gpu.index), gpu.type, holder.owner if holder is not None else "")
        if gpu.utilization is not None:
            util.add(gpu.utilization, *lv)
        mem.add(gpu.memory_used, *lv)
        total.add(gpu.memory_total, *lv)
        if gpu.temperature is not None:
            temp.add(gpu.temperature, *lv)
        if gpu.power_w is not None:
            power.add(gpu.power_w, *lv)
    fams += [util, mem, total, temp, power]

    share = _gauge(
        "gpud_fairshare_usage_gpu_seconds",
        "Each user's decayed GPU-seconds, as fair share weighs them now",
        ("user",),
    )
    for user, v in sorted(usage.items()):
        share.add(v, user)
    fams.append(share)

    # -- stores, the ledger, the process ---------------------------------------------------
    n_snaps, snap_bytes, n_imgs, img_bytes = await ledger.read(_stores)
    for name, help, v in (
        ("gpud_snapshots", "Container snapshots ready to restore", n_snaps),
        ("gpud_snapshot_store_bytes", "Bytes the ready snapshots take", snap_bytes),
        ("gpud_images", "Images built from gpud.Image definitions", n_imgs),
        ("gpud_image_store_bytes", "Bytes the built images take", img_bytes),
    ):
        f = _gauge(name, help)
        f.add(v)
        fams.append(f)
    led = _gauge("gpud_ledger_bytes", "Size of the ledger's SQLite files", ("file",))
    base = ledger.path
    for part, path in (("db", base), ("wal", base.with_name(base.name + "-wal"))):
        led.add(_file_size(path), part)
    fams.append(led)
    rss = _rss()
    if rss is not None:
        f = _gauge("gpud_process_resident_memory_bytes", "The daemon's resident memory (RSS)")
        f.add(rss)
        fams.append(f)
    last = _gauge("gpud_event_loop_lag_last_seconds", "The last event-loop lag measured")
    last.add(stats.last_lag)
    fams += [stats.lag.family(), last]
    handed = Family(
        "gpud_warm_handoffs_total",
        "counter",
        "Warm calls handed to a worker as its previous call ended, without a scheduling round",
    )
    handed.add(stats.handoffs)
    fams.append(handed)
    return fams
