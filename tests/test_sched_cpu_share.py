"""Another user's CPU job during a sweep (#12): fair share counts GPU-seconds only, so
without these two rules one user's 100,000 CPU jobs kept every other user's CPU job behind
all of them, and idle warm workers (handed jobs without a check against the CPU slots)
kept the slots full.

* a CPU job whose owner holds no CPU slot goes ahead of those whose owner holds one
  (``Policy.cpu_share_weight``);
* a ready CPU job that no idle warm worker takes leaves the later CPU jobs without one, so
  the slots drain to it instead of being refilled by the sweep first.

The Hypothesis property that the incremental plan equals the reference, with both rules,
is tests/test_scheduler_plan.py's.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.domain import IdleWorker, Job, JobState, Quota, Start, Wait, warm_key
from gpud.fairshare import Policy
from gpud.pending import PendingIndex
from gpud.scheduler import decide, hand_off, plan
from gpud.testing import sched_reference as ref

NOW = 1000.0


def job(id: int, owner: str, **kw: object) -> Job:
    j = Job(id=id, function="m:f", state=JobState.QUEUED, submitted_at=float(id), owner=owner)
    for k, v in kw.items():
        setattr(j, k, v)
    return j


def running(id: int, owner: str, **kw: object) -> Job:
    return job(id, owner, state=JobState.RUNNING, started_at=float(id), **kw)


def sweep(n: int, start: int = 100) -> list[Job]:
    return [job(i, "root", keep_warm=300.0) for i in range(start, start + n)]


def test_a_user_holding_no_cpu_slot_goes_before_a_sweep_holding_them() -> None:
    other = job(5000, "nobody")  # submitted after the whole sweep
    pending = [*sweep(1000), other]
    ds = decide(pending, [running(1, "root")], [], cpu_slots=2, now=NOW, policy=Policy())
    assert isinstance(ds[0], Start) and ds[0].job_id == other.id
    # Without a policy (plain priority, then FIFO) nothing changes.
    ds = decide(pending, [running(1, "root")], [], cpu_slots=2, now=NOW)
    assert ds[0].job_id == 100


def test_two_users_both_holding_a_slot_are_in_fifo_order() -> None:
    pending = [job(10, "ann"), job(11, "bob")]
    run = [running(1, "ann"), running(2, "bob")]
    ds = decide(pending, run, [], cpu_slots=4, now=NOW, policy=Policy())
    assert [d.job_id for d in ds] == [10, 11]


def test_gpu_usage_still_decides_before_the_cpu_bonus() -> None:
    # bob used GPUs; ann holds a CPU slot: ann's fair share (1000 points) outweighs the
    # 10-point bonus bob's CPU job gets for holding no slot.
    pending = [job(10, "bob"), job(11, "ann")]
    ds = decide(
        pending,
        [running(1, "ann")],
        [],
        cpu_slots=2,
        now=NOW,
        usage={"bob": 3600.0},
        policy=Policy(),
    )
    assert [d.job_id for d in ds] == [11, 10]


def test_idle_sweep_workers_do_not_take_the_slot_another_users_job_waits_for() -> None:
    jobs = sweep(50)
    key = warm_key(jobs[0])
    # Five of the sweep's calls run in warm workers on 2 slots; two more workers are idle.
    run = [running(i, "root", keep_warm=300.0) for i in range(1, 6)]
    idle = [IdleWorker(1, key, (), 1, "root"), IdleWorker(2, key, (), 2, "root")]
    other = job(5000, "nobody")
    p = plan([*jobs, other], run, [], idle, cpu_slots=2, now=NOW, policy=Policy())
    # The other user's job is first; the slots are full, so it waits, and no idle worker
    # gets a sweep job meanwhile: the slots drain to it.
    assert p.assigned == {} and p.starts == []
    w = p.waits.of(other)
    assert w is not None and w.position == 1 and "CPU slot" in w.reason
    # Once all but one of the running calls ended, it starts; the idle workers wait.
    p = plan([*jobs, other], run[:1], [], idle, cpu_slots=2, now=NOW, policy=Policy())
    assert [s.job_id for s in p.starts] == [other.id] and p.assigned == {}
    # With the other user's job running, the sweep gets an idle worker back: one, for the
    # one slot left.
    p = plan(jobs, [running(5000, "nobody")], [], idle, cpu_slots=2, now=NOW, policy=Policy())
    assert sorted(p.assigned) == [100]


def test_idle_workers_get_cpu_jobs_only_while_a_slot_is_free() -> None:
    """A `.map` on 2 slots ran 50 calls at once: every round handed a job to every idle
    worker, slots or not (#12). Now a CPU job goes to an idle worker only into a free
    slot, counting the ones matched before it in the same round."""
    jobs = sweep(50)
    key = warm_key(jobs[0])
    idle = [IdleWorker(i, key, (), i, "root") for i in range(1, 11)]
    p = plan(jobs, [], [], idle, cpu_slots=2, now=NOW, policy=Policy())
    assert sorted(p.assigned) == [100, 101] and p.starts == []
    w = p.waits.of(jobs[2])
    assert w is not None and "CPU slot" in w.reason
    # Both slots in use by the sweep's running calls: no idle worker gets one.
    run = [running(i, "root", keep_warm=300.0) for i in (1, 2)]
    p = plan(jobs, run, [], idle, cpu_slots=2, now=NOW, policy=Policy())
    assert p.assigned == {} and p.starts == []
    # The reference (the daemon's old matching, with the same rule) agrees.
    k = ref.scheduling_key(jobs, [], now=NOW, usage={}, policy=Policy())
    assert sorted(ref.match_warm(jobs, idle, [], now=NOW, key=k, cpu_slots=2)[0]) == [100, 101]
    assert ref.match_warm(jobs, idle, [], now=NOW, key=k, cpu_slots=2, cpu_running=2)[0] == {}
    # Without CPU slots (cpu_slots = 0) warm matching is not limited by them, as before.
    p = plan(jobs, run, [], idle, cpu_slots=0, now=NOW, policy=Policy())
    assert len(p.assigned) == 10


def test_the_rule_is_the_references_too() -> None:
    jobs = sweep(5)
    idle = [IdleWorker(1, warm_key(jobs[0]), (), 1, "root")]
    pending = [*jobs, job(5000, "nobody")]
    run = [running(1, "root", keep_warm=300.0)]
    key = ref.scheduling_key(pending, run, now=NOW, usage={}, policy=Policy())
    assert ref.match_warm(pending, idle, [], now=NOW, key=key, cpu_slots=2)[0] == {}
    # Without CPU slots the cold job can never start: it must not shut warm matching.
    assert ref.match_warm(pending, idle, [], now=NOW, key=key, cpu_slots=0)[0] == {100: 1}
    p = plan(pending, run, [], idle, cpu_slots=0, now=NOW, policy=Policy())
    assert p.assigned == {100: 1}


def test_a_job_over_its_timeout_quota_does_not_shut_warm_matching() -> None:
    jobs = sweep(3)
    idle = [IdleWorker(1, warm_key(jobs[0]), (), 1, "root")]
    stuck = job(5000, "nobody", timeout=600.0)
    p = plan(
        [*jobs, stuck],
        [],
        [],
        idle,
        cpu_slots=2,
        now=NOW,
        policy=Policy(),
        quotas={"nobody": Quota(max_timeout=60.0)},
    )
    assert p.assigned == {100: 1}
    assert isinstance(p.waits.of(stuck), Wait)


# -- hand-offs (#12): a warm worker's next call without a round ----------------------------


def _hand_off(pending: list[Job], run: list[Job], w: IdleWorker, **kw: object) -> int | None:
    return hand_off(
        PendingIndex.of(pending), run, [], w, cpu_slots=2, now=NOW, policy=Policy(), **kw
    )  # type: ignore[arg-type]


def test_a_worker_whose_call_ended_is_handed_the_next_call_of_its_sweep() -> None:
    jobs = sweep(5)
    w = IdleWorker(1, warm_key(jobs[0]), (), 1, "root")
    # Its own call ended (not in ``running``); the sweep's other call runs in the other slot.
    run = [running(2, "root", keep_warm=300.0)]
    assert _hand_off(jobs, run, w) == 100
    # A call being started by another hand-off holds the other slot, and is not queued.
    assert _hand_off(jobs, [running(100, "root")], w, taken=[100]) == 101
    # A retry backing off is passed over, as a round passes it.
    jobs[0].not_before = NOW + 5.0
    assert _hand_off(jobs, run, w) == 101


def test_no_hand_off_past_another_users_job_or_a_full_box() -> None:
    jobs = sweep(5)
    w = IdleWorker(1, warm_key(jobs[0]), (), 1, "root")
    run = [running(2, "root", keep_warm=300.0)]
    # Another user's cold call, queued after the sweep: the CPU share puts it first, and
    # the slot that ended is its (a round would start it there).
    other = job(5000, "nobody")
    assert _hand_off([*jobs, other], run, w) is None
    p = plan([*jobs, other], run, [], [w], cpu_slots=2, now=NOW, policy=Policy())
    assert [s.job_id for s in p.starts] == [other.id]
    # The same user's own higher-priority call of another function comes first too.
    urgent = job(6000, "root", priority=5)
    assert _hand_off([*jobs, urgent], run, w) is None
    # Both slots taken by others: no slot to hand on.
    assert _hand_off(jobs, [*run, running(3, "nobody")], w) is None
    # Nothing of its key queued.
    assert _hand_off([other], run, w) is None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_property_a_hand_off_is_what_a_round_would_do(data: st.DataObject) -> None:
    """Whatever the queue: the call handed to the worker is the one a round with this
    worker alone idle gives it; and a round with every idle worker gives that call to a
    worker of the same key (the hand-off never jumps a job a round would serve first)."""
    draw = data.draw
    owners = ["root", "nobody", "ann"]
    slots = draw(st.integers(1, 3))
    pending: list[Job] = []
    for i in range(draw(st.integers(0, 12))):
        pending.append(
            job(
                100 + i,
                draw(st.sampled_from(owners)),
                priority=draw(st.integers(-1, 1)),
                keep_warm=draw(st.sampled_from([0.0, 300.0, 300.0])),
                code_hash=draw(st.sampled_from(["c1", "c2"])),
                not_before=draw(st.sampled_from([0.0, 0.0, NOW + 2.0])),
            )
        )
    run = [
        running(i, draw(st.sampled_from(owners)), keep_warm=300.0)
        for i in range(1, draw(st.integers(0, slots)) + 1)
    ]
    proto = job(1, draw(st.sampled_from(owners)), keep_warm=300.0, code_hash="c1")
    w = IdleWorker(50, warm_key(proto), (), 1, proto.owner)
    others = [
        IdleWorker(60 + k, warm_key(job(1, o, keep_warm=300.0, code_hash=c)), (), 1, o)
        for k, (o, c) in enumerate(
            draw(st.lists(st.tuples(st.sampled_from(owners), st.sampled_from(["c1", "c2"]))))
        )
    ]
    policy = draw(st.sampled_from([None, Policy()]))
    got = hand_off(PendingIndex.of(pending), run, [], w, cpu_slots=slots, now=NOW, policy=policy)
    alone = plan(pending, run, [], [w], cpu_slots=slots, now=NOW, policy=policy)
    assert got == next(iter(alone.assigned), None)
    if got is not None:
        every = plan(pending, run, [], [w, *others], cpu_slots=slots, now=NOW, policy=policy)
        given = every.assigned.get(got)
        assert given is not None
        assert next(x for x in [w, *others] if x.id == given).key == w.key
