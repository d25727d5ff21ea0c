#!/usr/bin/env python3
"""API latency while a sweep runs (#12): `GET /v1/jobs` and `GET /v1/queue` (what
`gpud ps` and the TUI's queue ask) on a daemon with 2 fake GPUs, first idle (the
baseline, same run), then with a sweep of 20,000 and of 100,000 queued GPU jobs.

    .venv/bin/python bench/hot_api.py [--quick] [--seconds S]

The sweep is one `.map` batch of a GPU no-op; the daemon runs it (2 GPUs) while the
probe asks, one request after the other, for the first page of each listing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gpud_client as gpud  # noqa: E402 - sys.path is set first
from bench.hotrows import Progress, Row, render  # noqa: E402 - sys.path is set first
from bench.run import Bench, pct  # noqa: E402 - sys.path is set first
from gpud_client.client import Client  # noqa: E402 - sys.path is set first

TARGET_P99_MS = 50.0

if __name__ != "__main__":
    import cloudpickle  # type: ignore[import-untyped]  # ships no hints

    # Imported by bench/hotpath.py: ship noop by value, as a user's own script would.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def noop(x: Any = None) -> Any:
    return x


def probe(url: str, seconds: float) -> list[float]:
    """Latencies (ms) of alternating first-page listings for ``seconds``."""
    out: list[float] = []
    with Client(url) as c:
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            t = time.perf_counter()
            if n % 2:
                c.queue(limit=50)
            else:
                c.list_jobs(limit=50)
            out.append((time.perf_counter() - t) * 1000.0)
            n += 1
    return out


def _sweep(url: str, n: int) -> None:
    f = gpud.function(name="bench.sweep", url=url, gpu="h100")(noop)
    done = 0
    chunk = 10_000  # the batch endpoint's size limit
    while done < n:
        f.map(range(min(chunk, n - done)))  # acknowledged when it returns
        done += chunk
    f.client.close()


def _row(label: str, lat: list[float], base: list[float]) -> Row:
    p99 = pct(lat, 99)
    return Row(
        measure=f"API latency, {label}",
        figure=f"p50 {pct(lat, 50):.1f} / p99 {p99:.1f} / max {max(lat):.1f} ms ({len(lat)} req)",
        baseline=f"idle p99 {pct(base, 99):.1f} ms",
        target=f"p99 < {TARGET_P99_MS:g} ms",
        ok=p99 < TARGET_P99_MS,
        numbers={
            "p50_ms": pct(lat, 50),
            "p95_ms": pct(lat, 95),
            "p99_ms": p99,
            "max_ms": max(lat),
            "requests": float(len(lat)),
            "idle_p99_ms": pct(base, 99),
        },
    )


def rows(quick: bool, progress: Progress, seconds: float | None = None) -> list[Row]:
    # The jobs run as `nobody` under a root daemon: the admin's interpreter, not this venv.
    os.environ.setdefault("GPUD_JOB_PYTHON", "daemon")
    sizes = [2_000] if quick else [20_000, 100_000]
    secs = seconds if seconds is not None else (3.0 if quick else 15.0)
    base_dir = Path(tempfile.mkdtemp(prefix="gpud-hotapi-", dir="/tmp"))
    os.chmod(base_dir, 0o755)
    bench = Bench(base_dir)
    out: list[Row] = []
    try:
        for n in sizes:
            with bench.daemon(f"api{n}", 2) as d:
                progress(f"idle probe, {secs:g} s")
                idle = probe(d.url, secs)
                progress(f"submitting a sweep of {n:,} GPU jobs")
                _sweep(d.url, n)
                progress(f"probe while the sweep runs, {secs:g} s")
                busy = probe(d.url, secs)
                out.append(_row(f"{n:,}-job sweep on 2 GPUs", busy, idle))
    finally:
        bench.stop_all()
        shutil.rmtree(base_dir, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seconds", type=float, default=None, help="probe length per phase")
    a = p.parse_args(argv)
    result: list[Any] = rows(a.quick, lambda s: print(s, file=sys.stderr), a.seconds)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
