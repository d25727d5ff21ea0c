#!/usr/bin/env python3
"""The hot-path rows of calls and sweeps (#12, item 3), each beside a baseline from this run.

    .venv/bin/python bench/hot_calls.py [--quick]

* `.map` of 1,000 no-ops (quick: 100), cold processes, 2 CPU slots: jobs/s against
  0.8 x slots / the subprocess+cloudpickle p50 measured here;
* `.map` of 10,000 no-ops (quick: 200) with ``keep_warm`` (warm workers): jobs/s, >= 1,000;
* warm ``.remote()`` p50 (<= 5 ms), beside the four-request path it replaced (spawn, wait,
  log stream, result) measured on the same daemon;
* cold ``.remote()`` p50 over the subprocess+cloudpickle p50 (<= 1.3x), with the old path,
  the three called by turns (so a load that comes and goes on a shared box falls on
  each alike);
* the daemon's RSS idle (< 80 MB) and with 100,000 queued jobs (quick: 5,000; < 300 MB).

Daemons are started as bench/run.py does (fake GPUs, a temporary data directory), and
stopped, with their jobs, at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gpud_client as gpud  # noqa: E402 - sys.path is set first
from bench.hotrows import Progress, Row, render  # noqa: E402 - sys.path is set first
from bench.run import (  # noqa: E402 - sys.path is set first
    Bench,
    Daemon,
    blocker,
    cloudpickle_child,
    latency,
    noop,
    timed,
    worker_python,
)
from gpud_client.handle import JobHandle  # noqa: E402 - sys.path is set first

MB = 1024 * 1024


def _rss(d: Daemon) -> int:
    """The daemon process's resident set, in bytes (from /proc)."""
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS for the daemon")


def _old_remote(f: gpud.Function[..., Any]) -> Any:
    """``.remote()`` as it was before #12: submit, then wait, the log stream (its own
    connection) and the result: four requests."""
    return f.spawn(1).get(log_to=io.StringIO())


def _interleaved(*calls: Callable[[], Any], n: int) -> list[float]:
    """p50 ms of each of ``calls``, called by turns (each turn in a rotated order), so
    that a load that comes and goes on a shared box falls on all alike."""
    samples: list[list[float]] = [[] for _ in calls]
    for i in range(n):
        for k in range(len(calls)):
            j = (i + k) % len(calls)
            samples[j] += timed(calls[j], 1)
    return [latency(s)["p50_ms"] for s in samples]


def _map_rate(f: gpud.Function[..., Any], n: int) -> float:
    t0 = time.perf_counter()
    out = list(f.map(range(n), progress=False))
    wall = time.perf_counter() - t0
    if out != list(range(n)):
        raise RuntimeError(".map returned wrong results")
    return n / wall


def _old_map_rate(f: gpud.Function[..., Any], n: int) -> float:
    """The way .map fetched results before #12: one wait and one result per job."""
    t0 = time.perf_counter()
    batch = f.spawn_map(range(n))
    out: list[Any] = [JobHandle(i, f.client).get() for i in batch.job_ids()]
    wall = time.perf_counter() - t0
    if out != list(range(n)):
        raise RuntimeError("the per-job fetch returned wrong results")
    return n / wall


def rows(quick: bool, progress: Progress) -> list[Row]:
    n_cold_map = 100 if quick else 1000
    n_warm_map = 200 if quick else 10_000
    n_remote = 10 if quick else 50
    n_queued = 5_000 if quick else 100_000
    base = Path(tempfile.mkdtemp(prefix="gpud-hotcalls-", dir="/tmp"))
    os.chmod(base, 0o755)  # the job user (nobody) reads the worker runtime under it
    # As bench/run.py: jobs run with the daemon's interpreter (this venv may sit where the
    # job user cannot reach it).
    os.environ.setdefault("GPUD_JOB_PYTHON", "daemon")
    bench = Bench(base)
    out: list[Row] = []
    try:
        with bench.daemon("calls", cpu_slots=2) as d:
            py = worker_python(d)
            baseline = cloudpickle_child(py, base)
            timed(baseline, 2)  # the page cache, and the copy's .pyc files
            idle = _rss(d)

            cold = gpud.function(name="bench.noop", url=d.url, keep_warm=0)(noop)
            progress(f"cold .remote() x{n_remote}, by turns with subprocess + cloudpickle")
            cold.remote(1)
            cold_new, cold_old, base_ms = _interleaved(
                lambda: cold.remote(1), lambda: _old_remote(cold), baseline, n=n_remote
            )
            ratio = cold_new / base_ms
            out.append(
                Row(
                    "cold .remote() p50 / subprocess+cloudpickle p50",
                    f"{ratio:.2f}x ({cold_new:.1f} ms)",
                    f"{base_ms:.1f} ms; 4-request path {cold_old:.1f} ms",
                    "<= 1.3x",
                    ratio <= 1.3,
                    {"p50_ms": cold_new, "old_p50_ms": cold_old, "baseline_ms": base_ms},
                )
            )

            progress(f"cold .map of {n_cold_map}, between baseline calls")
            # Its baseline: calls just before and just after it, so that it and the sweep
            # see the same minutes of a shared box.
            around = timed(baseline, n_remote // 2)
            rate = _map_rate(cold, n_cold_map)
            around += timed(baseline, n_remote // 2)
            map_base_ms = latency(around)["p50_ms"]
            target = 0.8 * d.cpu_slots / (map_base_ms / 1000.0)
            out.append(
                Row(
                    f".map of {n_cold_map:,} no-ops, cold, {d.cpu_slots} slots",
                    f"{rate:.1f} jobs/s",
                    f"0.8 x {d.cpu_slots} / {map_base_ms:.1f} ms = {target:.1f} jobs/s",
                    f">= {target:.1f} jobs/s",
                    rate >= target,
                    {"jobs_per_s": rate, "target": target, "baseline_ms": map_base_ms},
                )
            )

            warm = gpud.function(name="bench.noop_warm", url=d.url, keep_warm=300)(noop)
            progress(f"warm .remote() x{n_remote}")
            for _ in range(3):
                warm.remote(1)
            warm_new, warm_old = _interleaved(
                lambda: warm.remote(1), lambda: _old_remote(warm), n=n_remote
            )
            out.append(
                Row(
                    "warm .remote() p50",
                    f"{warm_new:.1f} ms",
                    f"4-request path {warm_old:.1f} ms",
                    "<= 5 ms",
                    warm_new <= 5.0,
                    {"p50_ms": warm_new, "old_p50_ms": warm_old},
                )
            )

            progress(f"warm .map of {n_warm_map}")
            list(warm.map(range(20), progress=False))  # a warm worker per slot
            old_n = min(n_warm_map, 200)
            old_rate = _old_map_rate(warm, old_n)
            rate = _map_rate(warm, n_warm_map)
            out.append(
                Row(
                    f".map of {n_warm_map:,} no-ops, warm workers",
                    f"{rate:.0f} jobs/s",
                    f"per-job fetch {old_rate:.0f} jobs/s (of {old_n})",
                    ">= 1,000 jobs/s",
                    rate >= 1000,
                    {"jobs_per_s": rate, "old_jobs_per_s": old_rate},
                )
            )

        with bench.daemon("queued", cpu_slots=1) as d:
            idle_q = _rss(d)
            progress(f"RSS with {n_queued:,} queued")
            hold = gpud.function(name="bench.blocker", url=d.url)(blocker).spawn()
            while hold.status().state != "running":
                time.sleep(0.05)
            f = gpud.function(name="bench.noop", url=d.url)(noop)
            chunk = 10_000
            for start in range(0, n_queued, chunk):
                f.spawn_map(range(start, min(n_queued, start + chunk)))
            time.sleep(2.0)  # let the scheduling rounds the submits started settle
            queued = _rss(d)
            idle = min(idle, idle_q)
            out.append(
                Row(
                    "daemon RSS idle / queued",
                    f"{idle / MB:.0f} MB / {queued / MB:.0f} MB",
                    f"{n_queued:,} queued jobs",
                    "< 80 MB / < 300 MB",
                    idle < 80 * MB and queued < 300 * MB,
                    {"idle_mb": idle / MB, "queued_mb": queued / MB, "queued_jobs": n_queued},
                )
            )
    finally:
        bench.stop_all()
        shutil.rmtree(base, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args(argv)
    print(render(rows(args.quick, lambda m: print(f"... {m}", file=sys.stderr, flush=True))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
