"""What the daemon keeps per active job, and the small pieces its modules share."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from gpud.domain import (
    Job,
    JobState,
)
from gpud.executors.base import Handle
from gpud.ledger import Step
from gpud.ledger.store import Ledger
from gpud.retry import Finished
from gpud.warm import WarmWorker

__all__ = ["AlreadyRunning", "ExecutorDown", "Finished", "JobRecord", "SubmitError"]

log = logging.getLogger("gpud")


class SubmitError(ValueError):
    """A submit the daemon refuses; the message says why and what to do."""


class ExecutorDown(RuntimeError):
    """The executor cannot be reached now (503): not the request's fault."""


class AlreadyRunning(RuntimeError):
    pass


@dataclass(slots=True, eq=False)
class JobRecord:
    """All the daemon keeps in memory about one active (queued, starting or running) job:
    made when the job is submitted or recovered, dropped when it is final. The ledger is
    the truth; ``job`` is its latest committed row."""

    job: Job
    #: the running process (cold) or warm worker it runs in
    handle: Handle | None = None
    #: cancelling it stops the job; it carries the job's deadline
    scope: trio.CancelScope | None = None
    #: set by cancel: the job is stopped as this, not as timed out
    stop_reason: JobState | None = None
    #: set (and replaced) on each change of the job; made only when someone waits
    changed: trio.Event | None = None
    #: the commit order of the latest advance applied to ``job``
    seq: int = -1
    #: the idle warm worker the scheduler reserved for it, until it runs there
    assigned: WarmWorker | None = None
    #: when it was handed to be started (for the startup figure)
    dispatched_at: float | None = None
    #: a job started in a matched warm worker: its directory and payload, got ready while
    #: its start was committed (gpud.daemon.supervise._start_warm), or why they could not
    #: be; taken by its supervisor
    staged: object | None = None


def _fmt_seconds(s: float) -> str:
    if s >= 3600 and s % 3600 == 0:
        return f"{int(s // 3600)} h"
    if s >= 60 and s % 60 == 0:
        return f"{int(s // 60)} min"
    return f"{s:g} s"


def _served(job: Job) -> bool:
    """Does the job run in a warm worker (fed through the hub)?"""
    return job.keep_warm > 0 or job.snapshot


def _task_env(job: Job) -> dict[str, str]:
    """What differs per job in a warm worker's environment: the job, and its GPUs (a
    restored worker's environment is the snapshot taker's)."""
    visible = ",".join(job.gpus)
    return {
        "GPUD_JOB_ID": str(job.id),
        "GPUD_ATTEMPT": str(job.attempt),
        "CUDA_VISIBLE_DEVICES": visible,
        "NVIDIA_VISIBLE_DEVICES": visible or "void",
    }


_commits = itertools.count()


def _advance_in_order(
    ledger: Ledger,
    job_id: int,
    steps: Sequence[Step],
    now: float,
    expect: JobState | None,
    result: bytes | None = None,
) -> tuple[Job, int]:
    """Ledger.advance plus a sequence number taken on the ledger thread, i.e. in commit
    order."""
    return ledger.advance(job_id, steps, now, expect=expect, result=result), next(_commits)


def _get_many(ledger: Ledger, ids: list[int]) -> list[Job]:
    return ledger.get_many(ids)
