"""The retry policy (gpud.retry.after): examples pinned, then Hypothesis properties."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.domain import FINAL, RETRYABLE, Job, JobState
from gpud.retry import Finished, RetryPolicy, after, backoff

POLICY = RetryPolicy(backoff=1.0, backoff_max=300.0)
PROPS = settings(max_examples=200, deadline=None)


def _job(attempt: int = 1, retries: int = 0) -> Job:
    return Job(
        id=7,
        function="f",
        state=JobState.RUNNING,
        submitted_at=0.0,
        attempt=attempt,
        retries=retries,
    )


def _failed(retryable: bool = True, state: JobState = JobState.FAILED) -> Finished:
    return Finished(state, "ValueError: boom", 1, False, retryable)


def test_a_failure_with_retries_left_is_queued_again_after_its_backoff() -> None:
    steps = after(_job(attempt=2, retries=3), _failed(), 100.0, POLICY, fields={"startup": 0.5})
    assert [s.state for s in steps] == [JobState.FAILED, JobState.QUEUED]
    assert steps[0].fields == {
        "ended_at": 100.0,
        "exit_code": 1,
        "error": "ValueError: boom",
        "has_result": False,
        "startup": 0.5,
    }
    assert steps[1].reason == "retry 3 of 4 in 2 s after: ValueError: boom"
    assert steps[1].fields == {"not_before": 102.0, "gpus": ()}


def test_the_last_attempt_is_not_retried() -> None:
    steps = after(_job(attempt=4, retries=3), _failed(), 100.0, POLICY)
    assert [s.state for s in steps] == [JobState.FAILED]


def test_success_and_cancel_are_never_retried() -> None:
    ok = Finished(JobState.SUCCEEDED, None, 0, True, False)
    assert [s.state for s in after(_job(retries=5), ok, 1.0, POLICY)] == [JobState.SUCCEEDED]
    assert after(_job(retries=5), ok, 1.0, POLICY)[0].reason == "succeeded"
    cancelled = Finished(JobState.CANCELLED, "cancelled", None, False, True)
    assert [s.state for s in after(_job(retries=5), cancelled, 1.0, POLICY)] == [JobState.CANCELLED]


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(a, POLICY) for a in (1, 2, 3, 9, 10, 50)] == [1, 2, 4, 256, 300, 300]
    assert backoff(10**6, POLICY) == 300.0  # no overflow however many retries


policies = st.builds(RetryPolicy, backoff=st.floats(0.0, 1e4), backoff_max=st.floats(0.0, 1e6))
ends = st.builds(
    Finished,
    state=st.sampled_from(sorted(FINAL, key=lambda s: s.value)),
    error=st.none() | st.text(max_size=20),
    exit_code=st.none() | st.integers(-9, 255),
    has_result=st.booleans(),
    retryable=st.booleans(),
)


@PROPS
@given(
    retries=st.integers(0, 30),
    policy=policies,
    now=st.floats(0.0, 1e9),
    outcomes=st.lists(ends, min_size=1, max_size=40),
)
def test_attempts_never_exceed_retries_plus_one(
    retries: int, policy: RetryPolicy, now: float, outcomes: list[Finished]
) -> None:
    """Run a job through a sequence of outcomes: it is started at most retries+1 times,
    each wait is within [0, cap], and what may not be retried never is."""
    job = _job(attempt=1, retries=retries)
    for f in outcomes:
        steps = after(job, f, now, policy)
        assert steps[0].state is f.state
        if len(steps) == 1:
            break  # final
        assert f.state in RETRYABLE and f.retryable  # non-retryable never retried
        assert [s.state for s in steps] == [f.state, JobState.QUEUED]
        wait = steps[1].fields["not_before"] - now  # type: ignore[operator]
        assert 0.0 <= wait <= max(0.0, policy.backoff_max) + 1e-9 * max(1.0, now)
        job = dataclasses.replace(job, attempt=job.attempt + 1)
        assert job.attempt <= retries + 1


@PROPS
@given(attempt=st.integers(-5, 10**4), policy=policies)
def test_backoff_is_never_negative_nor_above_its_cap(attempt: int, policy: RetryPolicy) -> None:
    assert 0.0 <= backoff(attempt, policy) <= max(0.0, policy.backoff_max)


@PROPS
@given(retries=st.integers(0, 30), policy=policies)
def test_always_failing_job_runs_exactly_retries_plus_one_times(
    retries: int, policy: RetryPolicy
) -> None:
    job, runs = _job(attempt=1, retries=retries), 1
    while len(after(job, _failed(), 0.0, policy)) == 2:
        job, runs = dataclasses.replace(job, attempt=job.attempt + 1), runs + 1
    assert runs == retries + 1
