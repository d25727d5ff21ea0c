"""GET /metrics (#16): one scrape's collect + render with 1,000 and with 100,000 jobs queued.

The scrape must stay O(states x users + GPU shapes): it reads the queue index's per-owner
counts and groups, never the jobs. The figure is the fastest of many scrapes with 100,000 queued
(16 GPU shapes, 4 users, on the scheduler benchmark's snapshot); the baseline is the same
scrape with 1,000 queued (enough to fill every group of the queue index: the scrape's cost
follows the groups, users x priorities x shapes, not the jobs), measured in the same run.
Target: within 2x of it (a walk over the jobs would be ~100x) and under 10 ms.

Run: ``.venv/bin/python bench/hot_metrics.py [--quick]``.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import hotrows  # noqa: E402 - sys.path is set first
from bench.hot_sched import NOW, snapshot  # noqa: E402 - sys.path is set first
from gpud.daemon.stats import JobStats, collect  # noqa: E402 - sys.path is set first
from gpud.deps import DepIndex  # noqa: E402 - sys.path is set first
from gpud.ledger import LedgerThread  # noqa: E402 - sys.path is set first
from gpud.promtext import render  # noqa: E402 - sys.path is set first


def _scrape_times(queued: int, repeat: int, ledger: LedgerThread) -> tuple[float, int]:
    active, running, gpus = snapshot(queued)
    stats = JobStats()
    holders = {u: j for j in running for u in j.gpus}
    times: list[float] = []
    size = 0

    async def main() -> None:
        nonlocal size
        for n in range(repeat + 3):  # 3 untimed: the ledger's read thread opens on first use
            t = time.perf_counter()
            fams = await collect(
                stats,
                jobs=active,
                deps=DepIndex(),
                gpus=gpus,
                holders=holders,
                usage={"ann": 1.0, "bob": 2.0},
                ledger=ledger,
                now=NOW,
                started_at=NOW - 60,
                version="bench",
                executor="process",
            )
            size = len(render(fams))
            if n >= 3:
                times.append(time.perf_counter() - t)

    # A collection that 100,000 jobs' garbage sets off is not the scrape's cost.
    gc.collect()
    gc.disable()
    try:
        trio.run(main)
    finally:
        gc.enable()
    return min(times), size  # the least disturbed run: the machine is shared and noisy


def rows(quick: bool, progress: hotrows.Progress) -> list[hotrows.Row]:
    repeat = 50 if quick else 200
    with tempfile.TemporaryDirectory() as d:
        ledger = LedgerThread(Path(d) / "ledger.db")
        try:
            progress("metrics: a scrape with 1,000 queued")
            base, base_size = _scrape_times(1_000, repeat, ledger)
            progress("metrics: a scrape with 100,000 queued")
            big, big_size = _scrape_times(100_000, repeat, ledger)
        finally:
            ledger.close()
    ratio = big / base
    return [
        hotrows.Row(
            measure="GET /metrics collect+render, 100,000 queued (16 shapes, 4 users)",
            figure=f"{big * 1000:.2f} ms ({big_size:,} bytes)",
            baseline=f"1,000 queued {base * 1000:.2f} ms ({base_size:,} bytes); x{ratio:.2f}",
            target="< 2x the 1,000-queued scrape, < 10 ms",
            ok=ratio < 2.0 and big < 0.010,
            numbers={"scrape_100k_s": big, "scrape_100_s": base, "ratio": ratio},
        )
    ]


if __name__ == "__main__":
    print(hotrows.render(rows("--quick" in sys.argv, lambda m: print(m, file=sys.stderr))))
