"""Tests for plan(): the round that costs what changed (#12).

The main property: on random sequences of events (submits, starts, finishes, cancels,
GPUs changing, warm workers going idle, time passing), the plan made over the daemon's
incrementally kept index decides exactly what the old straightforward algorithm
(gpud.testing.sched_reference: a full sort, warm matching, then every job) decides, reason
words and positions included; and a depth-bounded round agrees with it up to its depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.config import ConfigError, load_config
from gpud.domain import (
    Decision,
    Gpu,
    GpuRequest,
    IdleWorker,
    Job,
    JobState,
    Quota,
    Start,
    Wait,
    warm_key,
)
from gpud.fairshare import Policy
from gpud.pending import ActiveJobs, PendingIndex
from gpud.sched_round import cpu_only
from gpud.scheduler import Plan, decide, plan
from gpud.testing import sched_reference as ref

NOW = 1000.0


def gpu(index: int, type: str = "h100", foreign: tuple[int, ...] = ()) -> Gpu:
    return Gpu(index=index, uuid=f"GPU-{index}", name=type, type=type, foreign_pids=foreign)


def job(id: int, request: str | None = None, **kw: object) -> Job:
    j = Job(id=id, function="m:f", state=JobState.QUEUED, submitted_at=float(id))
    j.gpu = GpuRequest.parse(request)
    for k, v in kw.items():
        setattr(j, k, v)
    return j


def flat(ds: Sequence[Decision]) -> list[tuple[object, ...]]:
    """Decisions as comparable tuples, with the reasons' words."""
    return [
        ("start", d.job_id, d.gpus)
        if isinstance(d, Start)
        else ("wait", d.job_id, d.reason, d.position)
        for d in ds
    ]


# ---------------------------------------------------------------------------------------
# Examples


def test_a_long_queue_of_few_shapes_is_decided_by_looking_at_few_jobs() -> None:
    box = [gpu(0), gpu(1), gpu(2, "l4")]
    pending = [job(i, ["h100", "l4", "h100:2", None][i % 4]) for i in range(1, 10_001)]
    p = plan(pending, [], box, cpu_slots=2, now=NOW)
    assert [s.job_id for s in p.starts] == [1, 2, 3, 7]
    # Four groups, five starts: the round stops once every shape waits.
    assert p.looked_at <= 4 + 5 + 4
    assert flat(p.decisions()) == flat(ref.decide(pending, [], box, cpu_slots=2, now=NOW))


def test_jobs_of_one_shape_share_one_reason_object() -> None:
    box = [gpu(0)]
    ds = decide([job(i, "h100") for i in range(1, 6)], [], box, cpu_slots=0, now=NOW)
    waits = [d for d in ds if isinstance(d, Wait)]
    assert len(waits) == 4 and len({id(w.why) for w in waits}) == 1
    assert waits[0].reason == "waiting for 1 x h100: GPU 0 held by job 1"


def test_the_job_a_reservation_is_for_reads_kept_for_this_job() -> None:
    box = [gpu(0), gpu(1)]
    ds = decide(
        [job(1, "h100:2"), job(2, "h100:2")],
        [job(9, "h100", state=JobState.RUNNING, gpus=("GPU-0",))],
        box,
        cpu_slots=0,
        now=NOW,
    )
    assert [d.reason for d in ds if isinstance(d, Wait)] == [
        "waiting for 2 x h100: GPU 0 held by job 9, GPU 1 free and kept for this job",
        "waiting for 2 x h100: GPU 0 held by job 9, GPU 1 reserved for job 1 (ahead in the queue)",
    ]


def test_a_shape_that_waits_again_later_says_what_changed_meanwhile() -> None:
    # Job 1 waits (keeping GPU 1), job 2 then takes GPU 2, and job 3, of job 1's shape,
    # must say so: the memoized reason is per state of the GPUs, not per shape alone.
    box = [gpu(0), gpu(1), gpu(2, "a100"), gpu(3, "a100")]
    run = [job(9, "any:2", state=JobState.RUNNING, gpus=("GPU-0", "GPU-3"))]
    pending = [job(1, "h100:2,a100:2"), job(2, "a100", owner="bob"), job(3, "h100:2,a100:2")]
    ds = decide(pending, run, box, cpu_slots=0, now=NOW)
    assert flat(ds) == flat(ref.decide(pending, run, box, cpu_slots=0, now=NOW))
    assert (
        isinstance(ds[2], Wait)
        and ds[2].position == 3
        and ds[2].reason
        == (
            "waiting for 2 x h100 or 2 x a100: GPUs 0,3 held by job 9, GPU 1 reserved for job 1 "
            "(ahead in the queue), GPU 2 held by job 2 (bob)"
        )
    )


def test_a_warm_job_over_its_timeout_quota_does_not_stop_the_next_one_getting_a_worker() -> None:
    quotas = {"ann": Quota(max_timeout=100.0)}
    first = job(1, owner="ann", keep_warm=60.0, timeout=600.0)
    second = job(2, owner="ann", keep_warm=60.0, timeout=60.0)
    w = IdleWorker(7, warm_key(second), (), 5, "ann")
    p = plan([first, second], [], [], [w], cpu_slots=1, now=NOW, quotas=quotas)
    assert p.assigned == {2: 7}
    assert p.waits[1].reason.startswith("its timeout (10 min) is longer than ann's max_timeout")


def test_depth_bounds_the_round_and_later_jobs_keep_their_previous_reason() -> None:
    # One group per job (each its own priority), so that no shortcut ends the round.
    pending = [job(i, priority=-i) for i in range(1, 8)]
    full = plan(pending, [], [], cpu_slots=3, now=NOW)
    assert [s.job_id for s in full.starts] == [1, 2, 3] and full.complete
    # Job 1 ended and job 8 came: an event round looks at the first two only.
    index = PendingIndex.of([*pending[3:], job(8, priority=-8)])
    running = [job(2, state=JobState.RUNNING), job(3, state=JobState.RUNNING)]
    cut = plan(index, running, [], cpu_slots=3, now=NOW, depth=2, previous=full)
    assert not cut.complete and cut.looked_at == 2
    assert [s.job_id for s in cut.starts] == [4]
    w = cut.waits
    assert (w[5].reason, w[5].position) == (
        "waiting for a CPU slot: 3 of 3 in use (jobs 2, 3, 4)",
        2,
    )
    assert (w[6].reason, w[6].position) == (
        "waiting behind job 4 and 1 other CPU job for a CPU slot",
        3,
    )
    assert w[6].reason == full.waits[6].reason
    assert w[8].reason.startswith("queued: the scheduler looks this far down")
    # A cut plan passes on the complete one it took those from, never itself.
    again = plan(index, running, [], cpu_slots=3, now=NOW, depth=2, previous=cut)
    assert again.base is full


def test_popped_waits_are_gone_without_working_the_rest_out() -> None:
    p = plan([job(1), job(2)], [], [], cpu_slots=0, now=NOW)
    p.waits.pop(1, None)
    assert 1 not in p.waits and p.waits[2].position == 2


def test_the_index_counts_queued_jobs_per_owner_and_finds_the_next_backoff() -> None:
    active: ActiveJobs[Job] = ActiveJobs(lambda j: j)
    for i in range(1, 6):
        active[i] = job(i, owner="ann" if i % 2 else "bob", not_before=NOW + i)
    assert active.pending.queued_by("ann") == 3 and active.pending.queued_by("bob") == 2
    active[1] = job(1, owner="ann", state=JobState.RUNNING)
    active.pop(2)
    assert active.pending.queued_by("ann") == 2 and active.pending.queued_by("bob") == 1
    assert list(active.running) == [1] and len(active.pending) == 3
    assert active.pending.next_backoff(NOW) == NOW + 3
    assert active.pending.next_backoff(NOW + 5) is None
    active[1] = job(1, owner="ann", state=JobState.QUEUED, not_before=NOW + 9)  # a retry
    assert active.pending.queued_by("ann") == 3 and not active.running
    assert active.pending.get(1) is active[1]


def test_records_are_refiled_when_their_job_changes() -> None:
    # The daemon keeps records whose job it replaces on each commit (gpud.daemon.core).
    @dataclasses.dataclass
    class Rec:
        job: Job

    active: ActiveJobs[Rec] = ActiveJobs(lambda r: r.job)
    active[1] = Rec(job(1, owner="ann"))
    active.setdefault(2, Rec(job(2, owner="ann")))
    assert active.pending.queued_by("ann") == 2
    active[1].job = job(1, owner="ann", state=JobState.STARTING)
    active.refile(1)
    assert active.pending.queued_by("ann") == 1 and list(active.running) == [1]
    del active[1]
    assert not active.running and 1 not in active.pending


def test_arrived_jobs_are_filed_in_chunks_or_when_looked_up() -> None:
    """A big submit's jobs arrive at once and are filed in chunks (#12): until then a
    lookup by id files the job there and then, the owner's queued count includes them
    (not the held ones), and iteration and the queue index see only the filed."""

    @dataclasses.dataclass
    class Rec:
        job: Job

    active: ActiveJobs[Rec] = ActiveJobs(lambda r: r.job, Rec)
    active.held = {3}  # waiting for a dependency (#14)
    jobs = [job(i, owner="ann", deps=(99,) if i == 3 else ()) for i in range(1, 7)]
    active.arrive(jobs)
    assert active.queued_by("ann") == 5 and active.queued_owners() == {"ann"}
    assert len(active) == 0 and len(active.pending) == 0 and active.arriving(5)
    assert [j.id for j in active.unfiled()] == [1, 2, 3, 4, 5, 6]
    rec = active.get(5)  # looked up: filed now
    assert rec is not None and rec.job.id == 5 and not active.arriving(5)
    assert 5 in active.pending and active.queued_by("ann") == 5
    rec.job = job(5, owner="ann", state=JobState.CANCELLED)
    del active[5]  # it ended: the chunk that files 5 later passes it over
    assert 4 in active and 4 in active.pending
    active.file([1, 2, 3, 5])
    assert 5 not in active and active.get(5) is None
    assert sorted(active) == [1, 2, 3, 4] and 3 not in active.pending  # held stays out
    assert active.queued_by("ann") == 4  # 1, 2, 4 filed and 6 arriving; 3 held
    active.file([6])
    assert not active.unfiled() and active.queued_by("ann") == active.pending.queued_by("ann")


# ---------------------------------------------------------------------------------------
# The property: incremental == full recomputation, on random event sequences

REQUESTS = [None, "h100", "h100:2", "a100", "any", "h100,a100:2", "h200", "any:3"]
OWNERS = ["", "ann", "bob", "cy"]


def reference_plan(
    pending: list[Job],
    running: list[Job],
    gpus: list[Gpu],
    idle: list[IdleWorker],
    *,
    cpu_slots: int,
    now: float,
    usage: dict[str, float],
    policy: Policy | None,
    quotas: dict[str, Quota],
) -> tuple[object, ...]:
    """What the daemon did before #12: sort for warm matching, then decide the rest."""
    key = (
        ref.scheduling_key(pending, running, now=now, usage=usage, policy=policy)
        if policy is not None
        else ref.order_key
    )
    assigned, held, evictable = ref.match_warm(
        pending,
        idle,
        gpus,
        now=now,
        key=key,
        quotas=quotas,
        cpu_slots=cpu_slots,
        cpu_running=sum(1 for j in running if cpu_only(j.gpu)),
    )
    cold = [j for j in pending if j.id not in assigned]
    warm_cpu = [j for j in pending if j.id in assigned and cpu_only(j.gpu)]
    ds = ref.decide(
        cold,
        running + held + warm_cpu,
        gpus,
        cpu_slots=cpu_slots,
        now=now,
        usage=usage,
        policy=policy,
        quotas=quotas,
    )
    return assigned, [(j.id, j.owner, j.gpus) for j in held], evictable, flat(ds)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_property_incremental_plan_equals_full_recomputation(data: st.DataObject) -> None:
    draw = data.draw
    box = [gpu(i, draw(st.sampled_from(["h100", "a100"]))) for i in range(draw(st.integers(0, 5)))]
    cpu_slots = draw(st.integers(0, 2))
    policy = draw(st.sampled_from([None, Policy(), Policy(age_weight=5000.0, max_age=10.0)]))
    quotas = draw(
        st.dictionaries(
            st.sampled_from(OWNERS[1:]),
            st.builds(
                Quota,
                max_gpus=st.sampled_from([None, 0, 1, 2]),
                max_timeout=st.sampled_from([None, 100.0]),
            ),
            max_size=2,
        )
    )
    usage: dict[str, float] = {}
    active: ActiveJobs[Job] = ActiveJobs(lambda j: j)
    idle: list[IdleWorker] = []
    warm_of: dict[int, IdleWorker] = {}  # running job -> the worker it runs in
    now, next_id, next_worker = NOW, 1, 1
    previous = None
    for _ in range(draw(st.integers(1, 16))):
        event = draw(
            st.sampled_from(
                ["submit", "submit", "submit", "finish", "cancel", "gpus", "time", "usage"]
            )
        )
        if event == "submit":
            for _ in range(draw(st.integers(1, 6))):
                warm = draw(st.booleans())
                j = job(
                    next_id,
                    draw(st.sampled_from(REQUESTS)),
                    owner=draw(st.sampled_from(OWNERS)),
                    priority=draw(st.integers(-1, 1)),
                    submitted_at=now - draw(st.sampled_from([0.0, 0.0, 3.0, 50.0])),
                    timeout=draw(st.sampled_from([60.0, 600.0])),
                    not_before=draw(st.sampled_from([0.0, 0.0, 0.0, now + 2.0])),
                    keep_warm=60.0 if warm else 0.0,
                    code_hash=draw(st.sampled_from(["c1", "c2"])),
                )
                active[j.id] = j
                next_id += 1
        elif event == "finish" and active.running:
            jid = draw(st.sampled_from(sorted(active.running)))
            done = active.pop(jid)
            w = warm_of.pop(jid, None)
            if done.keep_warm > 0 or w is not None:
                w = w or IdleWorker(next_worker, warm_key(done), done.gpus, jid, done.owner)
                next_worker += 1
                idle.append(IdleWorker(w.id, w.key, w.gpus, jid, w.owner))
        elif event == "cancel" and len(active.pending):
            active.pop(draw(st.sampled_from(sorted(j.id for j in active.pending))))
        elif event == "gpus" and box:
            i = draw(st.integers(0, len(box) - 1))
            g = box[i]
            box[i] = gpu(g.index, g.type, () if g.foreign_pids else (4000 + i,))
        elif event == "time":
            now += draw(st.sampled_from([1.0, 5.0]))
        elif event == "usage":
            usage[draw(st.sampled_from(OWNERS))] = draw(st.sampled_from([0.0, 10.0, 1e4]))
        running = list(active.running.values())
        pending = sorted(active.pending, key=lambda j: j.id)
        kw = dict(cpu_slots=cpu_slots, now=now, usage=usage, policy=policy, quotas=quotas)
        want = reference_plan(pending, running, box, idle, **kw)  # type: ignore[arg-type]

        depth = draw(st.integers(0, 6))
        cut = plan(active.pending, running, box, idle, depth=depth, previous=previous, **kw)  # type: ignore[arg-type]
        full = plan(active.pending, running, box, idle, previous=cut, **kw)  # type: ignore[arg-type]
        got = (
            full.assigned,
            [(j.id, j.owner, j.gpus) for j in full.held],
            full.evictable,
            flat(full.decisions()),
        )
        assert got == want
        assert full.complete and full.base is None
        # The bounded round agrees up to where it stopped; past it, the previous reasons.
        assert (cut.assigned, cut.evictable) == (full.assigned, full.evictable)
        n = cut.decided()
        assert n >= min(depth, len(want[3]))
        assert flat(cut.decisions())[:n] == want[3][:n]
        assert [s.job_id for s in cut.starts] == [d[1] for d in want[3][:n] if d[0] == "start"]
        for d in flat(cut.decisions())[n:]:
            assert d[0] == "wait"
            before = previous.waits.get(d[1]) if previous is not None else None
            if before is not None:
                assert d[2] == before.reason
        check_read_on_demand(
            plan(active.pending, running, box, idle, previous=cut, **kw), list(active.pending), draw
        )  # type: ignore[arg-type]
        check_read_on_demand(
            plan(active.pending, running, box, idle, depth=depth, previous=previous, **kw),  # type: ignore[arg-type]
            list(active.pending),
            draw,
        )
        previous = full
        # Apply it, as the daemon does: warm jobs go to their workers, others start cold,
        # starts on an evictable worker's GPUs end that worker.
        workers = {w.id: w for w in idle}
        for jid, wid in full.assigned.items():
            w = workers.pop(wid)
            warm_of[jid] = w
            active[jid] = _running(active[jid], w.gpus)
        for s in full.starts:
            for wid in [
                w for w in full.evictable if w in workers and set(workers[w].gpus) & set(s.gpus)
            ]:
                del workers[wid]
            active[s.job_id] = _running(active[s.job_id], s.gpus)
        idle = list(workers.values())


def check_read_on_demand(p: Plan, pending: list[Job], draw: Callable[..., Any]) -> None:
    """One job's wait read on its own (in any order), and the plan's order walked
    lazily, equal the materialised waits (#12)."""
    ids = draw(st.permutations([j.id for j in pending]))
    by_id = {j.id: j for j in pending}
    alone = {i: p.waits.of(by_id[i]) for i in ids}
    walk = [(job.id, position) for job, _, _, position in p.waits.order()]
    every = p.decisions()
    want: dict[int, tuple[str, int] | None] = dict.fromkeys(ids)  # warm: no wait
    want.update({d.job_id: (d.reason, d.position) for d in every if isinstance(d, Wait)})
    assert {i: (w.reason, w.position) if w else None for i, w in alone.items()} == want
    assert [i for i, _ in walk] == [d.job_id for d in every]
    assert [(d.job_id, d.position) for d in every if isinstance(d, Wait)] == [
        x for x in walk if x[0] not in p.waits.no_wait
    ]


def _running(j: Job, gpus: tuple[str, ...]) -> Job:
    r = Job(**{f: getattr(j, f) for f in Job.__slots__})
    r.state, r.gpus = JobState.RUNNING, gpus
    return r


def test_the_depth_and_interval_settings() -> None:
    cfg = load_config(env={"GPUD_SCHED_QUEUE_DEPTH": "20", "GPUD_SCHED_INTERVAL": "2s"})
    assert (cfg.sched_queue_depth, cfg.sched_interval) == (20, 2.0)
    assert (load_config(env={}).sched_queue_depth, load_config(env={}).sched_interval) == (100, 5.0)
    with pytest.raises(ConfigError, match="sched_queue_depth = '0' is not valid"):
        load_config(env={"GPUD_SCHED_QUEUE_DEPTH": "0"})
    with pytest.raises(ConfigError, match="sched_interval must be positive"):
        load_config(env={"GPUD_SCHED_INTERVAL": "0s"})
