"""Tests for gpud.preempt (#13): examples per rule (the reason's exact words included),
then properties over random event sequences run through the same round the daemon runs
(resume, plan, preempt): no job preempted for a lower- or equal-priority job, never a
non-preemptible one, no preemption twice for one job (no cycles), no GPU given twice, and
a suspended job due to resume gets its GPUs before newer work."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.domain import TRANSITIONS, Job, JobState, Quota
from gpud.preempt import Preemption, choose, resumes
from gpud.scheduler import plan

from .test_scheduler import gpu, job

NOW = 1000.0
R, S, Q = JobState.RUNNING, JobState.SUSPENDED, JobState.QUEUED


def run(
    id: int,
    *indices: int,
    priority: int = 0,
    preemptible: bool = True,
    started: float = 0.0,
    owner: str = "",
) -> Job:
    j = job(
        id,
        f"h100:{len(indices)}" if indices else None,
        state=R,
        priority=priority,
        owner=owner,
        gpus=tuple(f"GPU-{i}" for i in indices),
    )
    return dataclasses.replace(j, preemptible=preemptible, started_at=started)


def waiting(
    id: int,
    request: str | None = "h100",
    *,
    priority: int = 10,
    since: float = NOW - 60,
    owner: str = "",
) -> Job:
    return job(id, request, priority=priority, submitted_at=since, owner=owner)


def pick(queued: list[Job], running: list[Job], gpus: int = 2, **kw: object) -> list[Preemption]:
    opts: dict[str, object] = {"now": NOW, "preempt_after": 30.0, "cpu_slots": 4}
    opts.update(kw)
    return choose(queued, running, [gpu(i) for i in range(gpus)], **opts)  # type: ignore[arg-type]


# -- the state machine ---------------------------------------------------------------------


def test_suspended_moves_back_to_running_or_ends() -> None:
    assert S in TRANSITIONS[R]
    assert TRANSITIONS[S] >= {R, JobState.CANCELLED, JobState.LOST}
    assert Q not in TRANSITIONS[S] and JobState.STARTING not in TRANSITIONS[S]
    assert S not in TRANSITIONS[Q] and S not in TRANSITIONS[JobState.STARTING]


# -- examples ------------------------------------------------------------------------------


def test_a_long_waiting_higher_priority_job_suspends_a_lower_one_saying_why() -> None:
    got = pick([waiting(9, "h100:2")], [run(1, 0, 1)])
    assert got == [Preemption(1, 9, "suspended for job 9 (priority 10 > 0)")]


def test_off_by_default_and_not_before_preempt_after() -> None:
    assert pick([waiting(9)], [run(1, 0, 1)], preempt_after=None) == []
    assert pick([waiting(9, since=NOW - 29)], [run(1, 0, 1)]) == []


def test_never_for_an_equal_or_lower_priority_job() -> None:
    assert pick([waiting(9, priority=0)], [run(1, 0, 1)]) == []
    assert pick([waiting(9, priority=3)], [run(1, 0, 1, priority=3)]) == []


def test_never_a_job_marked_not_preemptible() -> None:
    assert pick([waiting(9)], [run(1, 0, 1, preemptible=False)]) == []


def test_not_again_for_the_same_job_nor_while_its_victims_wait() -> None:
    assert pick([waiting(9)], [run(1, 0, 1)], history={(1, 9)}) == []
    assert pick([waiting(9)], [run(1, 0, 1)], waiting_for={9}) == []


def test_only_when_it_helps() -> None:
    # A GPU is free: it waits for something else (e.g. it was just queued behind it).
    assert pick([waiting(9)], [run(1, 0)]) == []
    # Its owner is at their GPU quota: suspending others would not let it start.
    quotas = {"alice": Quota(max_gpus=1)}
    assert (
        pick(
            [waiting(9, owner="alice")],
            [run(1, 0, 1), run(2, 2, owner="alice")],
            quotas=quotas,
            gpus=3,
        )
        == []
    )
    # It asks for a type the victims do not hold.
    assert pick([waiting(9, "l4")], [run(1, 0, 1)]) == []


def test_the_fewest_lowest_priority_most_recent_victims() -> None:
    low_old = run(1, 0, priority=0, started=10.0)
    low_new = run(2, 1, priority=0, started=20.0)
    mid = run(3, 2, priority=5, started=30.0)
    got = pick([waiting(9, "h100:1")], [low_old, low_new, mid], gpus=3)
    assert [p.victim for p in got] == [2]
    got = pick([waiting(9, "h100:3")], [low_old, low_new, mid], gpus=3)
    assert sorted(p.victim for p in got) == [1, 2, 3]
    assert {p.reason for p in got} >= {"suspended for job 9 (priority 10 > 5)"}


def test_one_victim_serves_one_preemptor() -> None:
    got = pick([waiting(8), waiting(9)], [run(1, 0), run(2, 1)])
    assert sorted((p.victim, p.for_job) for p in got) == [(1, 8), (2, 9)] or sorted(
        (p.victim, p.for_job) for p in got
    ) == [(1, 9), (2, 8)]
    got = pick([waiting(8), waiting(9)], [run(1, 0, 1)])
    assert len(got) == 1


def test_a_cpu_job_preempts_a_cpu_job_only_when_the_slots_are_full() -> None:
    cpu = [run(i, started=float(i)) for i in range(1, 5)]
    assert [p.victim for p in pick([waiting(9, None)], cpu)] == [4]
    assert pick([waiting(9, None)], cpu[:3]) == []


def test_resume_when_all_its_gpus_are_free_and_keep_the_free_ones_otherwise() -> None:
    gpus = [gpu(0), gpu(1), gpu(2)]
    s = dataclasses.replace(run(1, 0, 1), state=S)
    r = resumes([s], {1}, [], gpus, cpu_slots=4)
    assert r.resume == [1] and r.reserved == []
    r = resumes([s], {1}, [run(5, 1)], gpus, cpu_slots=4)
    assert r.resume == [] and [j.gpus for j in r.reserved] == [("GPU-0",)]
    assert r.reserved[0].state is JobState.STARTING  # held, never running or a victim
    assert resumes([s], set(), [], gpus, cpu_slots=4).resume == []  # not wanted yet


def test_older_and_higher_priority_suspended_jobs_resume_first() -> None:
    gpus = [gpu(0)]
    a = dataclasses.replace(run(1, 0, priority=0), state=S, submitted_at=5.0)
    b = dataclasses.replace(run(2, 0, priority=0), state=S, submitted_at=1.0)
    c = dataclasses.replace(run(3, 0, priority=1), state=S, submitted_at=9.0)
    assert resumes([a, b], {1, 2}, [], gpus, cpu_slots=1).resume == [2]
    assert resumes([a, b, c], {1, 2, 3}, [], gpus, cpu_slots=1).resume == [3]


# -- properties over random event sequences -------------------------------------------------

GPUS = [gpu(0), gpu(1), gpu(2, "l4")]
REQUESTS = [None, "h100", "h100:2", "l4", "any", "any:2"]

submit = st.tuples(st.just("submit"), st.integers(0, 3), st.sampled_from(REQUESTS), st.booleans())
finish = st.tuples(st.just("finish"), st.integers(0, 50))
tick = st.tuples(st.just("tick"), st.floats(0.0, 40.0))
events = st.lists(st.one_of(submit, finish, tick), min_size=1, max_size=40)


class Box:
    """The daemon's round, run on plain data: resume, plan, preempt."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.now = NOW
        self.wanted: dict[int, int | None] = {}  # suspended -> preemptor to wait for
        self.history: list[tuple[int, int]] = []
        self.next_id = 1

    def of(self, *states: JobState) -> list[Job]:
        return [j for j in self.jobs.values() if j.state in states]

    def round(self) -> None:
        for v, h in list(self.wanted.items()):
            if h is not None and self.jobs[h].state is not Q:
                self.wanted[v] = None
        running = self.of(R)
        r = resumes(
            self.of(S), {i for i, h in self.wanted.items() if h is None}, running, GPUS, cpu_slots=2
        )
        due = {i for i in self.wanted if self.wanted[i] is None}
        free_at_start = {g.uuid for g in GPUS} - {u for j in running for u in j.gpus}
        for i in r.resume:
            self.jobs[i] = dataclasses.replace(self.jobs[i], state=R)
            del self.wanted[i]
        holding = [*self.of(R), *r.reserved]
        p = plan(self.of(Q), holding, GPUS, cpu_slots=2, now=self.now)
        started = set()
        for s in p.starts:
            self.jobs[s.job_id] = dataclasses.replace(
                self.jobs[s.job_id], state=R, gpus=s.gpus, started_at=self.now
            )
            started.add(s.job_id)
        # Ahead of newer work: a suspended job due to resume whose GPUs were all free got
        # them; none of its GPUs went to a job started this round.
        for i in due:
            j = self.jobs[i]
            if j.gpus and set(j.gpus) <= free_at_start:
                assert j.state is R, f"job {i}'s GPUs were free, yet it did not resume"
            if j.state is S:
                for k in started:
                    assert not set(self.jobs[k].gpus) & set(j.gpus), (
                        f"job {k} took a GPU that suspended job {i} waits for"
                    )
        queued = sorted(self.of(Q), key=lambda j: (-j.priority, j.submitted_at, j.id))
        held = [u for j in r.reserved for u in j.gpus]
        for c in choose(
            queued,
            self.of(R),
            GPUS,
            now=self.now,
            preempt_after=30.0,
            cpu_slots=2,
            history=set(self.history),
            waiting_for={h for h in self.wanted.values() if h is not None},
            held=held,
        ):
            v, h = self.jobs[c.victim], self.jobs[c.for_job]
            assert v.priority < h.priority, "preempted for a job of no higher priority"
            assert v.preemptible and v.state is R
            assert (v.id, h.id) not in self.history, "preempted twice for the same job"
            self.history.append((v.id, h.id))
            self.jobs[v.id] = dataclasses.replace(v, state=S)
            self.wanted[v.id] = h.id
        # No GPU given twice.
        held_now = [u for j in self.of(R) for u in j.gpus]
        assert len(held_now) == len(set(held_now)), "a GPU is held by two running jobs"
        assert sum(1 for j in self.of(R) if not j.gpus) <= 2

    def apply(self, ev: tuple) -> None:  # type: ignore[type-arg]
        if ev[0] == "submit":
            _, prio, request, preemptible = ev
            j = job(self.next_id, request, priority=prio, submitted_at=self.now)
            self.jobs[j.id] = dataclasses.replace(j, preemptible=preemptible)
            self.next_id += 1
        elif ev[0] == "finish":
            active = self.of(R, S)
            if active:
                j = active[ev[1] % len(active)]
                self.jobs[j.id] = dataclasses.replace(j, state=JobState.SUCCEEDED)
                self.wanted.pop(j.id, None)
        else:
            self.now += ev[1]
        self.round()


@settings(max_examples=200, deadline=None)
@given(events)
def test_random_sequences_keep_every_preemption_rule(evs: list[tuple]) -> None:  # type: ignore[type-arg]
    box = Box()
    for ev in evs:
        box.apply(ev)
    # Every pair at most once (no cycles), and a job is never its own victim.
    assert len(box.history) == len(set(box.history))
    assert all(v != h for v, h in box.history)


@settings(max_examples=100, deadline=None)
@given(events)
def test_suspended_jobs_all_resume_once_the_work_ends(evs: list[tuple]) -> None:  # type: ignore[type-arg]
    """Nothing stays suspended for ever: when the other jobs end, every preempted job
    resumes (and then ends too)."""
    box = Box()
    for ev in evs:
        box.apply(ev)
    for _ in range(200):
        others = box.of(R, Q)
        if not others and not box.of(S):
            break
        running = box.of(R)
        if running:
            box.apply(("finish", 0))
        else:
            box.apply(("tick", 1.0))
    assert not box.of(S), "a suspended job never resumed"


def test_every_state_has_a_count_in_a_batch() -> None:
    from gpud_client.models import BatchCounts

    counts = BatchCounts(**{s.value: 1 for s in JobState})
    assert counts.suspended == 1
