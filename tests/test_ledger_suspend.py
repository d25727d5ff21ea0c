"""Suspensions in the ledger (#13), on a real SQLite file: every suspend and resume is an
event with its reason, the suspended time moves the deadline (``suspended_s``) and is not
charged as GPU time (accounting, usage reports, fair share's intervals)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpud.accounting import report
from gpud.daemon.suspend import deadline
from gpud.domain import GpuRequest, IllegalTransition, JobState
from gpud.ledger import Ledger, Step
from gpud.ledger.usage import attempts_between, finished_gpu_intervals

from .test_ledger import new_job

Q, ST, R, S = JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.SUSPENDED


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


def _running(ledger: Ledger, gpus: tuple[str, ...] = ("G0", "G1")) -> int:
    _, (jid,) = ledger.submit([new_job(gpu=GpuRequest.parse("h100:2"), retries=1)], b"f", now=100.0)
    ledger.advance(
        jid, [Step(ST, fields={"gpus": gpus, "gpu_types": ("h100",) * len(gpus)})], now=100.0
    )
    ledger.advance(jid, [Step(R, fields={"pid": 5, "started_at": 100.0})], now=100.0)
    return jid


def test_suspended_time_is_recorded_and_not_charged(ledger: Ledger) -> None:
    jid = _running(ledger)
    j = ledger.advance(
        jid,
        [
            Step(
                S,
                "suspended for job 7 (priority 10 > 0)",
                fields={
                    "suspend_reason": "suspended for job 7 (priority 10 > 0)",
                    "suspended_for": 7,
                },
            )
        ],
        now=110.0,
    )
    assert (j.state, j.suspended_at, j.suspended_for) == (S, 110.0, 7)
    j = ledger.advance(jid, [Step(R, "resumed")], now=140.0)
    assert (j.suspended_at, j.suspended_s) == (None, 30.0)
    ledger.advance(
        jid,
        [Step(S, "suspended by alice", fields={"suspend_reason": "suspended by alice"})],
        now=150.0,
    )
    # Cancelled while suspended: that suspension is not charged either.
    j = ledger.advance(jid, [Step(JobState.CANCELLED, "cancelled")], now=155.0)
    assert j.suspended_s == 35.0
    (a,) = ledger.attempts(jid)
    assert a["wall_ds"] == 550  # wall time is wall time
    assert a["gpu_ds"] == 2 * 200  # 55 s less 35 s suspended, on each of two GPUs
    assert j.gpu_seconds == pytest.approx(40.0)
    spans = finished_gpu_intervals(ledger, since=0.0)
    assert sorted((s.started_at, s.ended_at) for s in spans) == [(135.0, 155.0)] * 2
    moves = [(e.from_state, e.to_state, e.reason) for e in ledger.events(jid)][3:]
    assert moves == [
        (R, S, "suspended for job 7 (priority 10 > 0)"),
        (S, R, "resumed"),
        (R, S, "suspended by alice"),
        (S, JobState.CANCELLED, "cancelled"),
    ]
    # Reports: whole, by user (exact), and by GPU type (spread evenly over the attempt).
    atts = attempts_between(ledger, 0.0, 1000.0)
    assert report(atts, since=0.0, until=1000.0, by="user").total.gpu_seconds == pytest.approx(40.0)
    assert report(atts, since=0.0, until=1000.0, by="gpu-type").total.gpu_seconds == pytest.approx(
        40.0
    )


def test_a_new_attempt_forgets_the_last_ones_suspensions(ledger: Ledger) -> None:
    jid = _running(ledger)
    ledger.advance(jid, [Step(S, "suspended by alice")], now=110.0)
    j = ledger.advance(
        jid,
        [Step(JobState.FAILED, "killed while suspended"), Step(Q, "retry", fields={"gpus": ()})],
        now=120.0,
    )
    assert j.state is Q and j.suspended_s == 10.0
    j = ledger.advance(jid, [Step(ST, fields={"gpus": ("G0",)})], now=130.0)
    assert (j.suspended_s, j.suspend_reason, j.suspended_for, j.suspended_at) == (
        0.0,
        None,
        None,
        None,
    )


def test_only_a_running_job_is_suspended(ledger: Ledger) -> None:
    _, (jid,) = ledger.submit([new_job()], b"f", now=1.0)
    with pytest.raises(IllegalTransition):
        ledger.advance(jid, [Step(S)], now=2.0)
    assert ledger.get(jid).preemptible  # the default


def test_the_deadline_moves_by_the_suspended_time_and_stops_while_suspended(ledger: Ledger) -> None:
    jid = _running(ledger)
    j = ledger.get(jid)
    assert deadline(j, now=100.0, trio_now=0.0) == pytest.approx(j.timeout)
    ledger.advance(jid, [Step(S)], now=110.0)
    assert deadline(ledger.get(jid), now=120.0, trio_now=0.0) == float("inf")
    j = ledger.advance(jid, [Step(R, "resumed")], now=150.0)
    # started 100 + timeout + 40 s suspended, seen at 150
    assert deadline(j, now=150.0, trio_now=0.0) == pytest.approx(j.timeout - 10.0)


def test_the_active_jobs_include_suspended_ones(ledger: Ledger) -> None:
    jid = _running(ledger)
    ledger.advance(jid, [Step(S)], now=110.0)
    assert [j.id for j in ledger.active()] == [jid]
