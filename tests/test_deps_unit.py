"""Dependencies and notifications, the pure parts (#14): the waiters index, the submit
check, the placeholder and the worker's substitution, the webhook rules."""

from __future__ import annotations

import pickle
from pathlib import Path

import cloudpickle
import pytest

import gpud_client as gpud
from gpud.deps import DepIndex, check_after
from gpud.domain import Job, JobState
from gpud.webhooks import check_url, parse_webhooks
from gpud_client.deps import job_ids, result_refs
from gpud_client.notify import parse_states
from gpud_client.worker import _resolve_results

OK, F, C = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED


def job(i: int, *deps: int, any_: bool = False, owner: str = "ann") -> Job:
    return Job(
        id=i,
        function="f",
        state=JobState.QUEUED,
        submitted_at=0.0,
        owner=owner,
        deps=deps,
        deps_any=any_,
    )


def test_a_job_waits_for_every_dependency_and_is_freed_by_the_last() -> None:
    idx = DepIndex()
    assert idx.hold(job(3, 1, 2), {}) is None
    assert 3 in idx and idx.reason(3) == "waiting for jobs 1, 2"
    assert idx.held_by("ann") == 1
    assert idx.ended(1, OK) == ([], [])
    assert idx.reason(3) == "waiting for job 2"
    assert idx.ended(2, OK) == ([3], [])
    assert 3 not in idx and idx.held_by("ann") == 0 and not idx.waiting


def test_afterok_dooms_on_any_other_end_and_the_cancel_cascades() -> None:
    idx = DepIndex()
    idx.hold(job(2, 1), {})
    idx.hold(job(3, 2), {})
    ready, doomed = idx.ended(1, F)
    assert ready == [] and [(d.job_id, d.reason) for d in doomed] == [
        (2, "dependency job 1 failed")
    ]
    assert 2 in idx  # out of the scheduler's queue until its cancel is recorded
    ready, doomed = idx.ended(2, C, "dependency job 1 failed")
    assert [(d.job_id, d.reason) for d in doomed] == [
        (3, "dependency job 2 was cancelled (dependency job 1 failed)")
    ]
    idx.ended(3, C, doomed[0].reason)
    assert not idx.waiting and not idx.doomed


def test_afterany_goes_on_however_the_dependency_ended() -> None:
    idx = DepIndex()
    idx.hold(job(2, 1, any_=True), {})
    assert idx.ended(1, JobState.TIMED_OUT) == ([2], [])


def test_dependencies_already_over_at_submit() -> None:
    idx = DepIndex()
    assert idx.hold(job(3, 1, 2), {1: OK, 2: OK}) is None and 3 not in idx  # free at once
    d = idx.hold(job(4, 1, 2), {2: JobState.LOST})
    assert d is not None and d.reason == "dependency job 2 was lost" and 4 in idx
    assert idx.hold(job(5, 2, any_=True), {2: JobState.LOST}) is None and 5 not in idx


def test_a_cancelled_waiter_is_forgotten() -> None:
    idx = DepIndex()
    idx.hold(job(2, 1), {})
    idx.ended(2, C)  # its owner cancelled it
    assert not idx.waiting and idx.held_by("ann") == 0
    assert idx.ended(1, OK) == ([], [])


def test_only_your_own_existing_jobs_may_be_named() -> None:
    found = {1: ("ann", OK), 2: ("bob", JobState.RUNNING)}
    assert check_after("ann", [1], found) is None
    why = check_after("ann", [1, 2, 7], found)
    assert why is not None and "no job of yours with id 2, 7" in why
    # a job not submitted yet cannot be named, so no cycle can be made
    assert check_after("ann", [99], found) is not None


def test_result_of_pickles_to_a_builtin_and_the_worker_swaps_it(tmp_path: Path) -> None:
    marker = gpud.result_of(41)
    assert repr(marker) == "gpud.result_of(41)"
    raw = cloudpickle.dumps(((marker, [1, {"m": marker}]), {"k": marker}))
    assert b"gpud_client" not in raw  # loads in a job's Python without gpud installed
    args, kwargs = pickle.loads(raw)
    (tmp_path / "deps").mkdir()
    (tmp_path / "deps" / "41.pkl").write_bytes(cloudpickle.dumps({"ok": True, "value": "v"}))
    args, kwargs = _resolve_results(cloudpickle, tmp_path, args, kwargs)
    assert args == ("v", [1, {"m": "v"}]) and kwargs == {"k": "v"}
    plain = ((1, 2), {"a": [3]})
    assert _resolve_results(cloudpickle, tmp_path, *plain) == plain
    with pytest.raises(LookupError, match="job 7 left no result"):
        _resolve_results(
            cloudpickle, tmp_path, *pickle.loads(cloudpickle.dumps(((gpud.result_of(7),), {})))
        )


def test_client_side_parsing() -> None:
    assert job_ids("41, 42,41") == (41, 42)
    assert job_ids(7) == (7,)
    with pytest.raises(ValueError, match="comma"):
        job_ids("41;42")
    with pytest.raises(TypeError):
        job_ids([True])
    assert result_refs((gpud.result_of(3), [gpud.result_of(4)]), {"x": gpud.result_of(3)}) == (3, 4)
    assert parse_states("failed, timed-out") == ("failed", "timed_out")
    assert parse_states("all") == ("succeeded", "failed", "cancelled", "timed_out", "lost")
    with pytest.raises(ValueError, match="not a final state"):
        parse_states("running")


def test_webhook_rules() -> None:
    assert parse_webhooks("off") == "off" and parse_webhooks("ANY") == "any"
    assert parse_webhooks("hooks.slack.com, 127.0.0.1") == ["hooks.slack.com", "127.0.0.1"]
    with pytest.raises(ValueError, match="host only"):
        parse_webhooks(["https://hooks.slack.com/x"])
    why = check_url("https://hooks.slack.com/x", "off")
    assert why is not None and "webhooks are off" in why
    assert check_url("https://hooks.slack.com/x", ["hooks.slack.com"]) is None
    why = check_url("http://127.0.0.1:8080/x", ["hooks.slack.com"])
    assert why is not None and "only to hooks.slack.com, not to 127.0.0.1" in why
    assert check_url("file:///etc/passwd", "any") is not None
    assert check_url("http://10.0.0.1/", "any") is None
