"""Retention (#12): removing the records of 100,000 finished jobs, usage rolled up.

Builds a real ledger (one file, WAL, synchronous=FULL as the daemon runs it) holding N
finished jobs of four owners (one GPU attempt and four events each, like a `.map` of
no-ops), then times `gpud.ledger.retention.prune` over all of them in its chunks of
2,000 jobs per transaction, as `gpud gc` does. Baseline, same run: a copy of the same
ledger, the same rows deleted with plain DELETEs in one transaction (no rollup, no
triggers). Also printed: the ledger's size (file, and pages in use) before and after,
and whether `gpud usage`'s totals are the same before and after (the row's "ok").

    .venv/bin/python bench/hot_retention.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.hotrows import Progress, Row, render  # noqa: E402 - sys.path is set first
from gpud.accounting import report  # noqa: E402 - sys.path is set first
from gpud.ledger import Ledger  # noqa: E402 - sys.path is set first
from gpud.ledger.retention import prune  # noqa: E402 - sys.path is set first
from gpud.ledger.usage import attempts_between, buckets_between  # noqa: E402 - sys.path is set first

BASE = 1_700_000_000.0
OWNERS = ("alice", "bob", "carol", "dave")


def build(path: Path, n: int) -> None:
    led = Ledger(path)
    c = led.conn
    c.execute("PRAGMA synchronous=OFF")  # building the fixture only
    c.execute("BEGIN")
    c.execute("INSERT INTO blobs VALUES ('h', zeroblob(2000), 0)")
    c.execute("INSERT INTO batches (submitted_at, size) VALUES (?, ?)", (BASE, n))
    jobs, attempts, gpus, events = [], [], [], []
    for i in range(1, n + 1):
        t = BASE + i * 0.8
        owner = OWNERS[i % 4]
        end = t + 0.5 + (i % 7) * 0.3
        ds = round((end - t) * 10)
        jobs.append(
            (
                i,
                "m.f",
                owner,
                "succeeded",
                '["h100:1"]',
                60.0,
                1,
                "GPU-0",
                1,
                "3.11",
                "h",
                b"a" * 40,
                t - 1,
                t,
                end,
                ds,
                ds,
            )
        )
        attempts.append((i, 1, t, end, "succeeded", "GPU-0", ds, ds, t))
        gpus.append((i, 1, owner, "GPU-0", "h100", t, end, ds))
        for k, (a, b) in enumerate(
            [
                (None, "queued"),
                ("queued", "starting"),
                ("starting", "running"),
                ("running", "succeeded"),
            ]
        ):
            events.append((i, t + k * 0.1, a, b, "x"))
    c.executemany(
        "INSERT INTO jobs (id, name, owner, state, gpu, timeout, attempt, gpus, batch_id, "
        "python, function_hash, args, submitted_at, started_at, ended_at, wall_ds, gpu_ds) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        jobs,
    )
    c.executemany(
        "INSERT INTO attempts (job_id, attempt, started_at, ended_at, state, gpus, wall_ds, "
        "gpu_ds, launched_at) VALUES (?,?,?,?,?,?,?,?,?)",
        attempts,
    )
    c.executemany(
        "INSERT INTO gpu_usage (job_id, attempt, owner, gpu_uuid, gpu_type, started_at, "
        "ended_at, ds) VALUES (?,?,?,?,?,?,?,?)",
        gpus,
    )
    c.executemany(
        "INSERT INTO events (job_id, at, from_state, to_state, reason) VALUES (?,?,?,?,?)", events
    )
    c.execute("COMMIT")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    led.close()


def sizes(led: Ledger) -> tuple[int, int]:
    c = led.conn
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = c.execute("PRAGMA page_size").fetchone()[0]
    used = (
        c.execute("PRAGMA page_count").fetchone()[0]
        - c.execute("PRAGMA freelist_count").fetchone()[0]
    ) * page
    return led.path.stat().st_size, used


def totals(led: Ledger) -> list[tuple[str, int, int, float, float]]:
    since, until = 0.0, BASE * 2
    r = report(
        attempts_between(led, since, until),
        since=since,
        until=until,
        by="user",
        buckets=buckets_between(led, since, until),
    )
    return [
        (x.key, x.job_count, x.attempts, x.gpu_seconds, x.wall_seconds) for x in [*r.lines, r.total]
    ]


def rows(quick: bool, progress: Progress) -> list[Row]:
    n = 10_000 if quick else 100_000
    tmp = Path(tempfile.mkdtemp(prefix="gpud-bench-retention-"))
    try:
        path = tmp / "ledger.db"
        progress(f"building a ledger of {n:,} finished jobs")
        build(path, n)
        shutil.copy(path, tmp / "copy.db")
        led = Ledger(path)
        before_usage = totals(led)
        file_before, used_before = sizes(led)
        progress("pruning them as gpud gc does")
        t0 = time.perf_counter()
        chunks = removed = 0
        while (p := prune(led, BASE * 2)).jobs:
            removed += p.jobs
            chunks += 1
        took = time.perf_counter() - t0
        after_usage = totals(led)
        file_after, used_after = sizes(led)
        led.close()

        progress("baseline: plain DELETEs of the same rows, one transaction")
        c = sqlite3.connect(tmp / "copy.db", isolation_level=None)
        c.execute("PRAGMA synchronous=FULL")
        c.execute("DROP TRIGGER events_no_delete")
        c.execute("DROP TRIGGER jobs_no_delete")
        t0 = time.perf_counter()
        c.execute("BEGIN IMMEDIATE")
        for table in ("events", "gpu_usage", "attempts"):
            c.execute(f"DELETE FROM {table}")
        c.execute("DELETE FROM jobs")
        c.execute("COMMIT")
        base = time.perf_counter() - t0
        c.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = before_usage == after_usage and removed == n
    mb = 1e6
    return [
        Row(
            measure=f"gc of {n:,} finished jobs' records ({chunks} transactions), usage rolled up",
            figure=f"{took:.2f} s ({n / took:,.0f} jobs/s); ledger in use {used_before / mb:.1f} "
            f"-> {used_after / mb:.1f} MB (file {file_before / mb:.1f} -> "
            f"{file_after / mb:.1f} MB)",
            baseline=f"plain DELETE, 1 tx: {base:.2f} s ({took / base:.1f}x)",
            target="usage totals unchanged",
            ok=same,
            numbers={
                "jobs": n,
                "seconds": took,
                "baseline_seconds": base,
                "used_before": used_before,
                "used_after": used_after,
                "file_before": file_before,
                "file_after": file_after,
            },
        )
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 jobs instead of 100,000")
    args = ap.parse_args()
    print(render(rows(args.quick, lambda m: print(m, file=sys.stderr))))


if __name__ == "__main__":
    main()
