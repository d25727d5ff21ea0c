"""Tests for gpud.scheduler: example tests per rule (reason texts included), then properties.

The examples pin down the exact words a user sees, because honest, specific queueing
reasons are part of what the product promises. The hypothesis properties check the
invariants that must hold for every box and queue: no GPU given twice, no foreign GPU
handed out, CPU slots respected, one decision per job, priority and FIFO order kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.domain import Decision, Gpu, GpuRequest, Job, JobState, Start, Wait
from gpud.scheduler import decide, infeasible, order_key

NOW = 1000.0


def gpu(
    index: int,
    type: str = "h100",
    *,
    foreign: tuple[int, ...] = (),
    aliases: tuple[str, ...] = (),
) -> Gpu:
    return Gpu(
        index=index,
        uuid=f"GPU-{index}",
        name=f"NVIDIA {type.upper()}",
        type=type,
        aliases=aliases,
        foreign_pids=foreign,
    )


def job(
    id: int,
    request: str | list[str] | None = None,
    *,
    state: JobState = JobState.QUEUED,
    priority: int = 0,
    submitted_at: float | None = None,
    owner: str = "",
    gpus: tuple[str, ...] = (),
    not_before: float = 0.0,
    attempt: int = 0,
    retries: int = 0,
) -> Job:
    return Job(
        id=id,
        function="mod:fn",
        state=state,
        submitted_at=float(id) if submitted_at is None else submitted_at,
        owner=owner,
        priority=priority,
        gpu=GpuRequest.parse(request),
        gpus=gpus,
        not_before=not_before,
        attempt=attempt,
        retries=retries,
    )


def running(id: int, *indices: int, owner: str = "", request: str | None = None) -> Job:
    """A RUNNING job holding the given GPUs (CPU-only when none are given)."""
    if request is None and indices:
        request = f"any:{len(indices)}"
    return job(
        id,
        request,
        state=JobState.RUNNING,
        owner=owner,
        gpus=tuple(f"GPU-{i}" for i in indices),
    )


def by_id(decisions: Sequence[Decision]) -> dict[int, Decision]:
    return {d.job_id: d for d in decisions}


def reason(decisions: Sequence[Decision], job_id: int) -> str:
    d = by_id(decisions)[job_id]
    assert isinstance(d, Wait), d
    return d.reason


def started(decisions: Sequence[Decision]) -> dict[int, tuple[str, ...]]:
    return {d.job_id: d.gpus for d in decisions if isinstance(d, Start)}


# ---------------------------------------------------------------------------------------
# Order and positions


def test_order_key_is_priority_then_fifo_then_id() -> None:
    a = job(1, priority=0, submitted_at=5.0)
    b = job(2, priority=1, submitted_at=9.0)
    c = job(3, priority=0, submitted_at=1.0)
    d = job(4, priority=0, submitted_at=5.0)
    assert sorted([a, b, c, d], key=order_key) == [b, c, a, d]
    assert order_key(b) == (-1, 9.0, 2)


def test_one_decision_per_job_in_scheduling_order_with_positions_over_all() -> None:
    pending = [
        job(5, "h100", priority=0, submitted_at=3.0),
        job(6, "h100", priority=2, submitted_at=9.0),
        job(7, "h100", priority=0, submitted_at=1.0),
        job(8, "h100", priority=0, submitted_at=2.0),
    ]
    ds = decide(pending, [], [gpu(0), gpu(1)], cpu_slots=1, now=NOW)
    assert [d.job_id for d in ds] == [6, 7, 8, 5]
    assert ds[0] == Start(6, ("GPU-0",))
    assert ds[1] == Start(7, ("GPU-1",))
    # Positions count the jobs that start now too: the first waiting job is third.
    assert isinstance(ds[2], Wait) and ds[2].position == 3
    assert isinstance(ds[3], Wait) and ds[3].position == 4


def test_empty_queue_decides_nothing() -> None:
    assert decide([], [running(1, 0)], [gpu(0)], cpu_slots=2, now=NOW) == []


# ---------------------------------------------------------------------------------------
# CPU-only jobs


def test_cpu_jobs_start_up_to_the_slot_limit_then_wait_fifo() -> None:
    pending = [job(i) for i in (9, 10, 11)]
    ds = decide(pending, [running(4), running(5)], [], cpu_slots=3, now=NOW)
    assert started(ds) == {9: ()}
    assert reason(ds, 10) == "waiting for a CPU slot: 3 of 3 in use (jobs 4, 5, 9)"
    assert reason(ds, 11) == "waiting behind job 10 for a CPU slot"


def test_cpu_wait_reasons() -> None:
    pending = [job(i) for i in (9, 10, 11)]
    ds = decide(pending, [running(4), running(5)], [], cpu_slots=2, now=NOW)
    assert reason(ds, 9) == "waiting for a CPU slot: 2 of 2 in use (jobs 4, 5)"
    assert reason(ds, 10) == "waiting behind job 9 for a CPU slot"
    assert reason(ds, 11) == "waiting behind job 9 and 1 other CPU job for a CPU slot"


def test_cpu_wait_reason_one_slot_and_long_lists() -> None:
    ds = decide([job(9)], [running(4)], [], cpu_slots=1, now=NOW)
    assert reason(ds, 9) == "waiting for a CPU slot: 1 of 1 in use (job 4)"
    many = [running(i) for i in range(1, 9)]
    ds = decide([job(20)], many, [], cpu_slots=8, now=NOW)
    assert reason(ds, 20) == (
        "waiting for a CPU slot: 8 of 8 in use (jobs 1, 2, 3, 4, 5 and 3 more)"
    )


def test_cpu_slots_zero_says_so() -> None:
    ds = decide([job(1)], [], [], cpu_slots=0, now=NOW)
    assert reason(ds, 1) == (
        "waiting for a CPU slot: this daemon runs no CPU-only jobs (cpu_slots = 0)"
    )


def test_gpu_jobs_do_not_use_cpu_slots() -> None:
    # A running GPU job holds no CPU slot, and a GPU job needs none to start.
    ds = decide([job(2), job(3, "h100")], [running(1, 0)], [gpu(0), gpu(1)], cpu_slots=1, now=NOW)
    assert started(ds) == {2: (), 3: ("GPU-1",)}
    ds = decide([job(3, "h100")], [running(1)], [gpu(0)], cpu_slots=1, now=NOW)
    assert started(ds) == {3: ("GPU-0",)}


def test_cpu_priority_beats_age() -> None:
    ds = decide([job(1), job(2, priority=5)], [], [], cpu_slots=1, now=NOW)
    assert started(ds) == {2: ()}
    assert reason(ds, 1) == "waiting for a CPU slot: 1 of 1 in use (job 2)"


# ---------------------------------------------------------------------------------------
# GPU placement


def test_lowest_free_indices_in_index_order_whatever_the_input_order() -> None:
    box = [gpu(3), gpu(1), gpu(0), gpu(2)]
    ds = decide([job(5, "h100:2")], [running(1, 0)], box, cpu_slots=0, now=NOW)
    assert started(ds) == {5: ("GPU-1", "GPU-2")}


def test_any_matches_every_type_and_aliases_match() -> None:
    box = [gpu(0, "l4"), gpu(1, "a100-80gb", aliases=("a100",)), gpu(2, "h100")]
    ds = decide([job(1, "any:2"), job(2, "a100")], [], box, cpu_slots=0, now=NOW)
    # job 1 takes the two lowest GPUs of any type; job 2's a100 (by alias) is GPU 1.
    assert started(ds) == {1: ("GPU-0", "GPU-1")}
    assert reason(ds, 2) == "waiting for 1 x a100: GPU 1 held by job 1"
    ds = decide([job(1, "any:2"), job(2, "a100", priority=1)], [], box, cpu_slots=0, now=NOW)
    assert started(ds) == {1: ("GPU-0", "GPU-2"), 2: ("GPU-1",)}


def test_first_fitting_option_wins() -> None:
    box = [gpu(0, "h100"), gpu(1, "h100"), gpu(2, "a100"), gpu(3, "a100")]
    ds = decide([job(1, ["h100:2", "a100:2"])], [], box, cpu_slots=0, now=NOW)
    assert started(ds) == {1: ("GPU-0", "GPU-1")}
    ds = decide([job(1, ["h100:2", "a100:2"])], [running(9, 1)], box, cpu_slots=0, now=NOW)
    assert started(ds) == {1: ("GPU-2", "GPU-3")}


def test_never_two_jobs_on_one_gpu() -> None:
    box = [gpu(0), gpu(1)]
    ds = decide([job(i, "h100") for i in range(1, 5)], [running(9, 0)], box, cpu_slots=0, now=NOW)
    assert started(ds) == {1: ("GPU-1",)}
    assert reason(ds, 2) == "waiting for 1 x h100: GPU 0 held by job 9, GPU 1 held by job 1"


def test_gpus_listed_by_a_running_job_are_held_whatever_its_request() -> None:
    # A CPU-only job that somehow lists a GPU (say, an older record) still keeps it.
    odd = job(9, None, state=JobState.RUNNING, gpus=("GPU-0",))
    ds = decide([job(1, "h100")], [odd], [gpu(0)], cpu_slots=1, now=NOW)
    assert reason(ds, 1) == "waiting for 1 x h100: GPU 0 held by job 9"


# ---------------------------------------------------------------------------------------
# GPU wait reasons


def test_held_reason_groups_gpus_and_names_the_owner() -> None:
    ds = decide(
        [job(50, "h100:2")],
        [running(41, 0, 1, owner="alice")],
        [gpu(0), gpu(1)],
        cpu_slots=0,
        now=NOW,
    )
    assert reason(ds, 50) == "waiting for 2 x h100: GPUs 0,1 held by job 41 (alice)"


def test_owner_from_the_owners_map_and_job_owner_preferred() -> None:
    box = [gpu(0), gpu(1)]
    run = [running(41, 0), running(42, 1, owner="bob")]
    ds = decide([job(50, "h100")], run, box, cpu_slots=0, now=NOW, owners={41: "alice", 42: "eve"})
    assert reason(ds, 50) == (
        "waiting for 1 x h100: GPU 0 held by job 41 (alice), GPU 1 held by job 42 (bob)"
    )


def test_foreign_processes_block_a_gpu() -> None:
    ds = decide([job(5, "h100")], [], [gpu(1, foreign=(4242,))], cpu_slots=0, now=NOW)
    assert reason(ds, 5) == (
        "waiting for 1 x h100: GPU 1 busy with processes gpud did not start (pid 4242)"
    )
    box = [gpu(0, foreign=(77, 4242)), gpu(1, foreign=(4242,)), gpu(2)]
    ds = decide([job(5, "h100:3")], [running(9, 2)], box, cpu_slots=0, now=NOW)
    assert reason(ds, 5) == (
        "waiting for 3 x h100: GPUs 0,1 busy with processes gpud did not start "
        "(pids 77, 4242), GPU 2 held by job 9"
    )


def test_foreign_gpu_is_skipped_not_waited_for() -> None:
    box = [gpu(0, foreign=(4242,)), gpu(1)]
    ds = decide([job(5, "h100")], [], box, cpu_slots=0, now=NOW)
    assert started(ds) == {5: ("GPU-1",)}


def test_reservation_keeps_free_gpus_for_the_job_ahead() -> None:
    box = [gpu(0), gpu(1)]
    ds = decide(
        [job(7, "h100:2"), job(8, "h100")],
        [running(3, 1, owner="carol")],
        box,
        cpu_slots=0,
        now=NOW,
    )
    assert started(ds) == {}
    assert reason(ds, 7) == (
        "waiting for 2 x h100: GPU 0 free and kept for this job, GPU 1 held by job 3 (carol)"
    )
    assert reason(ds, 8) == (
        "waiting for 1 x h100: GPU 0 reserved for job 7 (ahead in the queue), "
        "GPU 1 held by job 3 (carol)"
    )


def test_reservation_names_the_owner_when_known() -> None:
    ds = decide(
        [job(7, "h100:2", owner="dan"), job(8, "h100")],
        [running(3, 1)],
        [gpu(0), gpu(1)],
        cpu_slots=0,
        now=NOW,
    )
    assert reason(ds, 8) == (
        "waiting for 1 x h100: GPU 0 reserved for job 7 (dan, ahead in the queue), "
        "GPU 1 held by job 3"
    )


def test_reservation_beats_lower_priority_even_if_younger_or_older() -> None:
    box = [gpu(0), gpu(1)]
    pending = [job(1, "h100", submitted_at=0.0), job(2, "h100:2", priority=1, submitted_at=5.0)]
    ds = decide(pending, [running(3, 1)], box, cpu_slots=0, now=NOW)
    assert started(ds) == {}
    assert reason(ds, 1).startswith("waiting for 1 x h100: GPU 0 reserved for job 2")


def test_later_jobs_may_use_gpus_the_waiting_job_cannot_use() -> None:
    box = [gpu(0), gpu(1), gpu(2, "l4")]
    ds = decide(
        [job(7, "h100:2"), job(8, "l4"), job(9, "any")],
        [running(3, 1)],
        box,
        cpu_slots=0,
        now=NOW,
    )
    assert started(ds) == {8: ("GPU-2",)}
    assert reason(ds, 9) == (
        "waiting for 1 x any: GPU 0 reserved for job 7 (ahead in the queue), "
        "GPU 1 held by job 3, GPU 2 held by job 8"
    )


def test_a_big_job_is_not_starved_by_small_ones() -> None:
    box = [gpu(i) for i in range(4)]
    small = [job(8, "h100"), job(9, "h100")]
    ds = decide([job(7, "h100:3"), *small], [running(3, 0, 1)], box, cpu_slots=0, now=NOW)
    # job 7 needs 3 of the 4 and only 2 are free: it keeps both, the small jobs wait.
    assert started(ds) == {}
    assert reason(ds, 9) == (
        "waiting for 1 x h100: GPUs 0,1 held by job 3, "
        "GPUs 2,3 reserved for job 7 (ahead in the queue)"
    )
    # When job 3 ends, job 7 goes first, and the one GPU left goes to the next in line.
    ds = decide([job(7, "h100:3"), *small], [], box, cpu_slots=0, now=NOW)
    assert started(ds) == {7: ("GPU-0", "GPU-1", "GPU-2"), 8: ("GPU-3",)}


def test_reservation_is_for_the_first_option_the_box_can_hold() -> None:
    # 4 x h100 never fits on this box, so job 7 keeps the a100 it could use instead.
    box = [gpu(0), gpu(1), gpu(2, "a100"), gpu(3, "a100")]
    ds = decide(
        [job(7, ["h100:4", "a100:2"]), job(8, "a100"), job(9, "h100")],
        [running(3, 3)],
        box,
        cpu_slots=0,
        now=NOW,
    )
    assert started(ds) == {9: ("GPU-0",)}
    assert reason(ds, 7) == (
        "waiting for 4 x h100 or 2 x a100: GPUs 0,1 free, GPU 2 free and kept for this job, "
        "GPU 3 held by job 3; this box can never fit 4 x h100"
    )
    assert reason(ds, 8) == (
        "waiting for 1 x a100: GPU 2 reserved for job 7 (ahead in the queue), GPU 3 held by job 3"
    )


def test_fallback_reason_mentions_every_option() -> None:
    box = [gpu(0), gpu(1), gpu(2, "a100"), gpu(3, "a100"), gpu(4, "a100"), gpu(5, "a100")]
    run = [running(41, 0, owner="alice"), running(42, 2, 3, owner="bob")]
    ds = decide([job(50, ["h100:2", "a100:4"])], run, box, cpu_slots=0, now=NOW)
    assert reason(ds, 50) == (
        "waiting for 2 x h100 or 4 x a100: GPU 0 held by job 41 (alice), "
        "GPU 1 free and kept for this job, GPUs 2,3 held by job 42 (bob), GPUs 4,5 free"
    )


def test_reasons_never_mention_the_position() -> None:
    box = [gpu(0)]
    pending = [job(1, "h100"), job(2, "h100"), job(3), job(4), job(5, "h200")]
    ds = decide(pending, [running(9)], box, cpu_slots=1, now=NOW)
    for d in ds:
        if isinstance(d, Wait):
            assert "position" not in d.reason


# ---------------------------------------------------------------------------------------
# Backoff


def test_backoff_waits_with_its_own_reason_and_blocks_nobody() -> None:
    box = [gpu(0)]
    pending = [
        job(1, "h100", not_before=NOW + 3.0, attempt=1, retries=2),
        job(2, "h100"),
        job(3, not_before=NOW + 0.25, attempt=2, retries=2),
        job(4),
    ]
    ds = decide(pending, [], box, cpu_slots=1, now=NOW)
    assert started(ds) == {2: ("GPU-0",), 4: ()}
    assert reason(ds, 1) == ("retrying after a failure: backoff for another 3.0 s (attempt 2 of 3)")
    assert reason(ds, 3) == ("retrying after a failure: backoff for another 0.2 s (attempt 3 of 3)")
    assert [d.position for d in ds if isinstance(d, Wait)] == [1, 3]


def test_backoff_over_starts_normally() -> None:
    pending = [job(1, "h100", not_before=NOW, attempt=1, retries=1)]
    assert started(decide(pending, [], [gpu(0)], cpu_slots=0, now=NOW)) == {1: ("GPU-0",)}


# ---------------------------------------------------------------------------------------
# Infeasible requests


def test_infeasible_none_for_cpu_only_or_a_fitting_option() -> None:
    box = [gpu(0), gpu(1), gpu(2, "l4")]
    assert infeasible(None, box) is None
    assert infeasible(None, []) is None
    assert infeasible(GpuRequest.parse("h100:2"), box) is None
    assert infeasible(GpuRequest.parse("any:3"), box) is None
    assert infeasible(GpuRequest.parse(["h100:3", "l4"]), box) is None
    # Busy GPUs count: the question is whether it could ever fit.
    busy = [gpu(0, foreign=(1,)), gpu(1, foreign=(2,))]
    assert infeasible(GpuRequest.parse("h100:2"), busy) is None


def test_infeasible_messages() -> None:
    box = [gpu(0), gpu(1), gpu(2, "l4")]
    assert infeasible(GpuRequest.parse("h100:3"), box) == (
        "this box cannot run 3 x h100: it has 2 x h100 (GPUs 0,1) and 1 x l4 (GPU 2)"
    )
    assert infeasible(GpuRequest.parse("h100"), []) == (
        "this box has no GPUs: run CPU-only (no gpu=) or submit to a machine with GPUs"
    )
    assert infeasible(GpuRequest.parse("h200"), [gpu(0), gpu(1)]) == (
        "this box has no h200: it has 2 x h100 (GPUs 0,1); ask for one of: h100, any"
    )
    assert infeasible(GpuRequest.parse(["h200", "h100:3"]), box) == (
        "this box cannot run 1 x h200 or 3 x h100: it has 2 x h100 (GPUs 0,1) and 1 x l4 (GPU 2)"
    )
    mixed = [gpu(0, "a100-80gb", aliases=("a100",)), gpu(1, "l4"), gpu(2, "h100")]
    assert infeasible(GpuRequest.parse("h200,b200"), mixed) == (
        "this box has no h200 or b200: it has 1 x a100-80gb (GPU 0), 1 x l4 (GPU 1) and "
        "1 x h100 (GPU 2); ask for one of: a100-80gb, a100, l4, h100, any"
    )
    assert infeasible(GpuRequest.parse("any:4"), box) == (
        "this box cannot run 4 x any: it has 2 x h100 (GPUs 0,1) and 1 x l4 (GPU 2)"
    )


def test_an_infeasible_job_waits_with_the_message_and_reserves_nothing() -> None:
    box = [gpu(0), gpu(1)]
    ds = decide([job(1, "h100:3"), job(2, "h100")], [], box, cpu_slots=0, now=NOW)
    assert reason(ds, 1) == "this box cannot run 3 x h100: it has 2 x h100 (GPUs 0,1)"
    assert started(ds) == {2: ("GPU-0",)}


def test_an_empty_request_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="at least one option"):
        GpuRequest(())


# ---------------------------------------------------------------------------------------
# Properties

TYPES = ("h100", "a100", "l4")
# Requests may name types the box lacks ("h200") and counts it cannot hold.
REQUEST_TYPES = (*TYPES, "any", "h200")


@st.composite
def boxes(draw: st.DrawFn) -> list[Gpu]:
    kinds = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True))
    n = draw(st.integers(0, 8))
    box = []
    for i in range(n):
        foreign = draw(st.sampled_from([(), (), (), (), (4000 + i,), (4000 + i, 5000)]))
        box.append(gpu(i, draw(st.sampled_from(kinds)), foreign=foreign))
    return draw(st.permutations(box))


requests = st.one_of(
    st.none(),
    st.lists(
        st.tuples(st.sampled_from(REQUEST_TYPES), st.integers(1, 3)), min_size=1, max_size=2
    ).map(lambda opts: GpuRequest(tuple(opts))),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Job], list[Job], list[Gpu], int]:
    box = draw(boxes())
    # Partition a random subset of the GPUs among up to 3 running jobs (-1: not held).
    holders = [draw(st.integers(-1, 2)) for _ in box]
    run: list[Job] = []
    for h in range(3):
        held = tuple(g.uuid for g, who in zip(box, holders, strict=True) if who == h)
        if held:
            run.append(
                job(
                    900 + h,
                    f"any:{len(held)}",
                    state=JobState.RUNNING,
                    gpus=held,
                    owner=draw(st.sampled_from(["", "alice", "bob"])),
                )
            )
    cpu_slots = draw(st.integers(0, 3))
    for k in range(draw(st.integers(0, cpu_slots + 1))):
        run.append(job(950 + k, None, state=JobState.RUNNING))
    pending: list[Job] = []
    for i in range(draw(st.integers(0, 12))):
        j = job(
            100 + i,
            None,
            priority=draw(st.integers(0, 2)),
            submitted_at=float(draw(st.integers(0, 5))),
            not_before=draw(st.sampled_from([0.0, 0.0, 0.0, NOW, NOW + 0.5, NOW + 5.0])),
            attempt=1,
            retries=2,
        )
        j.gpu = draw(requests)
        pending.append(j)
    return draw(st.permutations(pending)), run, box, cpu_slots


PROPS = settings(max_examples=150, deadline=None)


@PROPS
@given(scenarios())
def test_property_decisions_are_safe_and_complete(
    s: tuple[list[Job], list[Job], list[Gpu], int],
) -> None:
    pending, run, box, cpu_slots = s
    ds = decide(pending, run, box, cpu_slots=cpu_slots, now=NOW)
    by_uuid = {g.uuid: g for g in box}
    jobs = {j.id: j for j in pending}

    # Exactly one decision per pending job, in order_key order, positions 1..n.
    ordered = sorted(pending, key=order_key)
    assert [d.job_id for d in ds] == [j.id for j in ordered]
    # ... which is higher priority first, then older first.
    keys = [(-jobs[d.job_id].priority, jobs[d.job_id].submitted_at) for d in ds]
    assert keys == sorted(keys)
    for pos, d in enumerate(ds, start=1):
        if isinstance(d, Wait):
            assert d.position == pos
            assert d.reason and "position" not in d.reason

    # No GPU held twice (running + started now), no foreign GPU handed out.
    held = [u for j in run for u in j.gpus]
    given_now = [u for d in ds if isinstance(d, Start) for u in d.gpus]
    assert len(held + given_now) == len(set(held + given_now))
    for u in given_now:
        assert not by_uuid[u].foreign_pids

    # Every started GPU job gets exactly one of its options, matching, in index order.
    for d in ds:
        if not isinstance(d, Start):
            continue
        j = jobs[d.job_id]
        assert j.not_before <= NOW
        if j.gpu is None:
            assert d.gpus == ()
            continue
        got = [by_uuid[u] for u in d.gpus]
        assert [g.index for g in got] == sorted(g.index for g in got)
        assert any(len(got) == n and all(g.matches(t) for g in got) for t, n in j.gpu.options), (
            j.gpu,
            got,
        )
        assert infeasible(j.gpu, box) is None

    # CPU slots are never exceeded by what starts now.
    cpu_running = sum(1 for j in run if j.gpu is None)
    cpu_started = sum(1 for d in ds if isinstance(d, Start) and jobs[d.job_id].gpu is None)
    if cpu_started:
        assert cpu_running + cpu_started <= cpu_slots


@PROPS
@given(scenarios())
def test_property_priority_and_fifo_for_the_same_request(
    s: tuple[list[Job], list[Job], list[Gpu], int],
) -> None:
    pending, run, box, cpu_slots = s
    ds = by_id(decide(pending, run, box, cpu_slots=cpu_slots, now=NOW))
    ready = sorted((j for j in pending if j.not_before <= NOW), key=order_key)
    for i, ahead in enumerate(ready):
        for behind in ready[i + 1 :]:
            if ahead.gpu != behind.gpu:
                continue
            # Ahead: higher priority, or equal priority and older. Same request shape, so
            # the one behind must not start while the one ahead waits.
            assert not (isinstance(ds[behind.id], Start) and isinstance(ds[ahead.id], Wait)), (
                ahead,
                behind,
            )


@PROPS
@given(scenarios())
def test_property_the_head_of_the_queue_starts_when_it_can(
    s: tuple[list[Job], list[Job], list[Gpu], int],
) -> None:
    pending, run, box, cpu_slots = s
    ready = sorted((j for j in pending if j.not_before <= NOW), key=order_key)
    if not ready:
        return
    head = ready[0]
    ds = by_id(decide(pending, run, box, cpu_slots=cpu_slots, now=NOW))
    held = {u for j in run for u in j.gpus}
    free = sorted(
        (g for g in box if g.uuid not in held and not g.foreign_pids), key=lambda g: g.index
    )
    if head.gpu is None:
        can = sum(1 for j in run if j.gpu is None) < cpu_slots
        assert isinstance(ds[head.id], Start) == can
        return
    # It gets the lowest-index free GPUs of its first option that fits, if any fits.
    expected: tuple[str, ...] | None = None
    for t, n in head.gpu.options:
        matching = [g.uuid for g in free if g.matches(t)]
        if len(matching) >= n:
            expected = tuple(matching[:n])
            break
    if expected is None:
        assert isinstance(ds[head.id], Wait)
    else:
        assert ds[head.id] == Start(head.id, expected)


@PROPS
@given(scenarios())
def test_property_a_waiting_job_is_not_starved_by_jobs_behind_it(
    s: tuple[list[Job], list[Job], list[Gpu], int],
) -> None:
    # A ready GPU job that waits keeps the free GPUs of the first option the box can
    # hold: no job behind it may be given a GPU of that type, whatever its request.
    pending, run, box, cpu_slots = s
    ds = decide(pending, run, box, cpu_slots=cpu_slots, now=NOW)
    jobs = {j.id: j for j in pending}
    by_uuid = {g.uuid: g for g in box}
    for i, d in enumerate(ds):
        j = jobs[d.job_id]
        if not isinstance(d, Wait) or j.gpu is None or j.not_before > NOW:
            continue
        fitting = [t for t, n in j.gpu.options if sum(g.matches(t) for g in box) >= n]
        if not fitting:
            continue  # infeasible: it keeps nothing
        for later in ds[i + 1 :]:
            if isinstance(later, Start):
                for u in later.gpus:
                    assert not by_uuid[u].matches(fitting[0]), (j, later)


@PROPS
@given(boxes(), requests)
def test_property_infeasible_agrees_with_an_idle_box(
    box: list[Gpu], request: GpuRequest | None
) -> None:
    idle = [gpu(g.index, g.type) for g in box]  # same GPUs, no foreign processes
    j = job(1)
    j.gpu = request
    [d] = decide([j], [], idle, cpu_slots=1, now=NOW)
    problem = infeasible(request, box)
    assert (problem is None) == isinstance(d, Start)
    if problem is not None:
        assert isinstance(d, Wait) and d.reason == problem
        assert str(request) in problem or "has no" in problem
