"""Tests for the job state machine and GPU request parsing in gpud.domain.

The ledger changes a job's state only through ``transition``, so these tests are what
stands between a typo in TRANSITIONS and a job stuck forever or run twice.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.domain import (
    ACTIVE,
    FINAL,
    RETRYABLE,
    TRANSITIONS,
    GpuRequest,
    IllegalTransition,
    JobState,
    transition,
)

Q, ST, R = JobState.QUEUED, JobState.STARTING, JobState.RUNNING
OK, F, C, T, L = (
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
    JobState.TIMED_OUT,
    JobState.LOST,
)

states = st.sampled_from(list(JobState))

# ---------------------------------------------------------------------------------------
# transition


def test_transitions_cover_every_state() -> None:
    assert set(TRANSITIONS) == set(JobState)
    for targets in TRANSITIONS.values():
        assert targets <= set(JobState)


@pytest.mark.parametrize(
    ("current", "new"), list(itertools.product(JobState, JobState)), ids=lambda s: str(s)
)
def test_transition_accepts_exactly_the_table(current: JobState, new: JobState) -> None:
    if new in TRANSITIONS[current]:
        assert transition(current, new) is new
    else:
        with pytest.raises(IllegalTransition):
            transition(current, new)


@settings(max_examples=200, deadline=None)
@given(states, states, st.one_of(st.none(), st.integers(1, 10**9)))
def test_transition_property(current: JobState, new: JobState, job_id: int | None) -> None:
    if new in TRANSITIONS[current]:
        assert transition(current, new, job_id) is new
        return
    with pytest.raises(IllegalTransition) as info:
        transition(current, new, job_id)
    err = info.value
    assert isinstance(err, ValueError)  # callers that catch ValueError still see it
    assert (err.job_id, err.current, err.new) == (job_id, current, new)
    assert f"cannot go from {current} to {new}" in str(err)
    if job_id is not None:
        assert str(err).startswith(f"job {job_id} ")


def test_illegal_transition_examples() -> None:
    with pytest.raises(IllegalTransition, match="job 7 cannot go from queued to running"):
        transition(Q, R, 7)
    with pytest.raises(IllegalTransition, match="^job cannot go from succeeded to queued$"):
        transition(OK, Q)
    for s in JobState:  # no self-loops: a "change" to the same state is a bug upstream
        with pytest.raises(IllegalTransition):
            transition(s, s)


def test_active_and_final_partition_the_states() -> None:
    assert set(JobState) == ACTIVE | FINAL
    assert not ACTIVE & FINAL
    assert RETRYABLE <= FINAL


def test_final_states_other_than_failed_and_lost_are_dead_ends() -> None:
    for s in FINAL - RETRYABLE:
        assert TRANSITIONS[s] == frozenset(), s
    # FAILED and LOST lead only back to the queue (the retry edge).
    for s in RETRYABLE:
        assert TRANSITIONS[s] == frozenset({Q}), s
    # Every active state can move on, and can be cancelled.
    for s in ACTIVE:
        assert TRANSITIONS[s], s
        assert C in TRANSITIONS[s], s


def test_every_state_is_reachable_from_queued() -> None:
    seen = {Q}
    frontier = [Q]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(JobState)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 100), max_size=40))
def test_random_walks_along_legal_edges(choices: list[int]) -> None:
    state = Q
    for c in choices:
        assert state in ACTIVE or state in FINAL
        edges = sorted(TRANSITIONS[state])
        if not edges:
            break
        state = transition(state, edges[c % len(edges)])
    assert state in ACTIVE or state in FINAL
    if not TRANSITIONS[state]:
        # A walk only ever stops for good in a final state that is not a retry point.
        assert state in FINAL - RETRYABLE


# ---------------------------------------------------------------------------------------
# GpuRequest.parse


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        ("h100", (("h100", 1),)),
        ("H100:2", (("h100", 2),)),
        ("any", (("any", 1),)),
        ("any:2", (("any", 2),)),
        (["h100:2", "a100"], (("h100", 2), ("a100", 1))),
        ("h100,a100", (("h100", 1), ("a100", 1))),
        (" h100 : 2 ", (("h100", 2),)),
        ("a100-80gb:4", (("a100-80gb", 4),)),
    ],
)
def test_parse_valid(spec: str | list[str], options: tuple[tuple[str, int], ...]) -> None:
    req = GpuRequest.parse(spec)
    assert req is not None
    assert req.options == options


@pytest.mark.parametrize("spec", [None, "none", "None", "cpu", "false", "", "  ", []])
def test_parse_cpu_only(spec: str | list[str] | None) -> None:
    # "" and "  " are documented as CPU-only, like None: an empty gpu= asks for no GPU.
    assert GpuRequest.parse(spec) is None


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("h100:0", "the count must be >= 1"),
        ("h100:-1", "the count must be >= 1"),
        ("h100:65", "at most 64"),
        ("h100:x", "write TYPE:COUNT, e.g. 'h100:2'"),
        ("h100:", "write TYPE:COUNT, e.g. 'h100:2'"),
        (":2", "use a GPU type such as 'h100', 'h100:2', 'any' or 'any:2'"),
        ("h 100", "use a GPU type such as 'h100', 'h100:2', 'any' or 'any:2'"),
        ("h100;a100", "use a GPU type such as"),
        ([""], "use a GPU type such as"),
        (["h100", "h100,a100"], "use a GPU type such as"),
    ],
)
def test_parse_invalid_says_what_valid_looks_like(spec: str | list[str], hint: str) -> None:
    with pytest.raises(ValueError) as info:
        GpuRequest.parse(spec)
    message = str(info.value)
    assert hint in message
    assert message.startswith("invalid GPU")


def test_request_str_and_max_count() -> None:
    req = GpuRequest.parse(["h100:2", "a100:4"])
    assert req is not None
    assert str(req) == "2 x h100 or 4 x a100"
    assert req.max_count == 4
    assert req.to_spec() == ["h100:2", "a100:4"]


gpu_types = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,11}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(gpu_types, st.integers(1, 64)), min_size=1, max_size=4))
def test_parse_round_trips_through_to_spec(options: list[tuple[str, int]]) -> None:
    req = GpuRequest(tuple(options))
    assert GpuRequest.parse(req.to_spec()) == req
    # The comma form reads the same, and case does not matter.
    assert GpuRequest.parse(",".join(req.to_spec()).upper()) == req
