"""What follows an attempt's end: the retry policy as a pure function.

``after(job, finished, now, policy)`` returns the ledger steps to record: the attempt's
final state, then (for a retryable failure with retries left) QUEUED again with its
backoff. Time is passed in (the daemon reads it from its clock), so the policy is
tested without waiting (tests/test_retry.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gpud.domain import RETRYABLE, Job, JobState
from gpud.ledger import Step

__all__ = ["Finished", "RetryPolicy", "after", "backoff"]


@dataclass(frozen=True, slots=True)
class Finished:
    """How an attempt ended, as the daemon read it (exit, status.json, cancel, timeout)."""

    state: JobState
    error: str | None
    exit_code: int | None
    has_result: bool
    #: may this failure be retried (a job's own setup error, say, may not)
    retryable: bool


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    #: the first retry waits this long, doubling per attempt up to ``backoff_max``
    backoff: float
    backoff_max: float


def backoff(attempt: int, policy: RetryPolicy) -> float:
    """Seconds to wait before the attempt after ``attempt`` (1-based): never negative,
    never above the cap."""
    # The exponent is bounded so that a job with very many retries cannot overflow it.
    doublings = min(max(0, attempt - 1), 1000)
    delay: float = min(policy.backoff * 2.0**doublings, policy.backoff_max)
    return max(0.0, delay)


def after(
    job: Job,
    finished: Finished,
    now: float,
    policy: RetryPolicy,
    *,
    fields: Mapping[str, object] | None = None,
) -> list[Step]:
    """The steps that record the end of ``job``'s current attempt (``job`` as the ledger
    has it now: its attempt and retries). ``fields`` are extra columns of the end step
    (e.g. the startup figure)."""
    end = {
        "ended_at": now,
        "exit_code": finished.exit_code,
        "error": finished.error,
        "has_result": finished.has_result,
        **(fields or {}),
    }
    steps = [Step(finished.state, finished.error or finished.state.value, fields=end)]
    if finished.state in RETRYABLE and finished.retryable and job.attempt <= job.retries:
        delay = backoff(job.attempt, policy)
        steps.append(
            Step(
                JobState.QUEUED,
                f"retry {job.attempt + 1} of {job.retries + 1} in "
                f"{delay:g} s after: {finished.error}",
                fields={"not_before": now + delay, "gpus": ()},
            )
        )
    return steps
