"""Test-only fault injection: make the daemon die at one exact point of a job's life.

``GPUD_TEST_CRASH_AT=after_launch`` (a comma-separated list of points) makes the daemon
SIGKILL itself the first time it reaches that point, as a power cut or an OOM kill
would, so that tests can hit windows a few microseconds wide deterministically (issue
#10). Never set it in production; unset, :func:`crash_point` is a set lookup.

Points: ``before_launch`` (a job's attempt is STARTING, its launch not yet recorded),
``after_mark_launched`` (the launch recorded, the process not yet started),
``after_launch`` (the process runs, RUNNING not yet recorded), ``warm_worker_ready`` (a
warm job's worker is up, the job not yet sent to it nor RUNNING), ``before_finish`` (the
process ended, its outcome not yet recorded), ``after_submit`` (a submit committed,
its answer not yet sent), ``suspend_recorded`` (SUSPENDED committed, the job's GPU state
not yet parked nor its processes stopped), ``resume_continued`` (a suspended job's
processes continued, RUNNING not yet recorded), ``before_warm_ack`` (a warm job's result
committed with its end, the worker not yet told it may forget it), ``deps_ended`` (a
dependency's end committed, the jobs waiting on it not yet freed or cancelled),
``warm_hand_off`` (a warm worker answered a call and is handed the next queued call
without a round, neither the end nor the start recorded yet, #12), ``mid_filing`` (a big
submit committed, its jobs filed into memory in part).

``GPUD_TEST_PAUSE_AT=point=PATH`` makes the daemon's task wait at an awaitable point
(:func:`pause_point`) until the file PATH exists, while the rest of the daemon goes on:
a test makes its requests inside that window, then creates the file. Points:
``mid_filing``.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "PAUSE_ENV", "crash_point", "pause_point"]

ENV = "GPUD_TEST_CRASH_AT"
PAUSE_ENV = "GPUD_TEST_PAUSE_AT"

_POINTS = frozenset(p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip())
_PAUSES = dict(
    p.strip().split("=", 1) for p in os.environ.get(PAUSE_ENV, "").split(",") if "=" in p
)


def crash_point(name: str) -> None:
    """Die here, at once and without cleanup, if the test asked for it."""
    if name in _POINTS:
        os.kill(os.getpid(), signal.SIGKILL)


async def pause_point(name: str) -> None:
    """Wait here (other tasks run on) until the test's file exists, if it asked for it;
    unset, a dict lookup."""
    path = _PAUSES.get(name)
    if path is None:
        return
    import trio

    # Polled: the file is the test's, made by another process (no event to wait on).
    while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - another process's file
        await trio.sleep(0.01)
