"""Fair share, the multifactor priority and quotas (issue #5), in zero real time.

The scheduler and gpud.fairshare read no clock: every test passes ``now`` and the usage
in, so days of decay and hours of jobs are simulated in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.domain import Gpu, GpuRequest, Job, JobState, Quota, Start, Wait
from gpud.fairshare import (
    DecayedTotals,
    Policy,
    fairshare_factors,
    interval_usage,
    job_priority,
)
from gpud.scheduler import decide

from .test_scheduler import by_id, gpu, job, reason, running, started

HOUR = 3600.0
DAY = 24 * HOUR
WEEK = 7 * DAY
T0 = 1_700_000_000.0


# ---------------------------------------------------------------------------------------
# Decay


def test_usage_without_decay_is_gpus_times_seconds() -> None:
    # With an enormous half-life nothing decays: 2 GPUs for 10 s are 20 GPU-seconds.
    assert interval_usage(0.0, 10.0, 2, now=10.0, half_life=1e15) == pytest.approx(20.0)


def test_usage_one_half_life_ago_counts_half() -> None:
    h = WEEK
    # One GPU-second, one half-life ago: half a GPU-second now (to first order).
    got = interval_usage(T0 - h - 1, T0 - h, 1, now=T0, half_life=h)
    assert got == pytest.approx(0.5, rel=1e-5)


def test_usage_matches_a_numeric_integral() -> None:
    h, start, end, now = 2 * DAY, T0 - 3 * DAY, T0 - DAY, T0
    steps = 20000
    dt = (end - start) / steps
    numeric = sum(3 * 2 ** (-(now - (start + (i + 0.5) * dt)) / h) * dt for i in range(steps))
    assert interval_usage(start, end, 3, now=now, half_life=h) == pytest.approx(numeric)


def test_usage_not_counted_before_it_happens_or_when_empty() -> None:
    assert interval_usage(T0, T0 + 100, 1, now=T0 + 40, half_life=WEEK) == pytest.approx(
        40.0, rel=1e-4
    )
    assert interval_usage(T0, T0, 4, now=T0 + 1, half_life=WEEK) == 0.0
    assert interval_usage(T0, T0 + 5, 0, now=T0 + 9, half_life=WEEK) == 0.0


def test_decayed_totals_equal_the_sum_of_their_intervals_across_rebases() -> None:
    h = DAY
    totals = DecayedTotals(h, now=T0)
    intervals = [
        ("alice", T0 + i * 5 * HOUR, T0 + i * 5 * HOUR + HOUR, 1 + i % 2) for i in range(30)
    ]  # spread over ~6 half-lives: several rebases
    for user, s, e, g in intervals:
        totals.add(user, s, e, g, now=e)
    now = T0 + 160 * HOUR
    want = sum(interval_usage(s, e, g, now=now, half_life=h) for _, s, e, g in intervals)
    assert totals.at(now)["alice"] == pytest.approx(want, rel=1e-9)


def test_policy_needs_a_positive_half_life() -> None:
    with pytest.raises(ValueError, match="half-life"):
        Policy(half_life=0)


# ---------------------------------------------------------------------------------------
# Factors and priority


def test_factors_nobody_used_anything_is_one_for_all() -> None:
    assert fairshare_factors({}, ["alice", "bob"]) == {"alice": 1.0, "bob": 1.0}
    assert fairshare_factors({}, []) == {}


def test_factors_used_exactly_the_share_is_one_half() -> None:
    f = fairshare_factors({"alice": 50.0, "bob": 50.0}, ["alice", "bob"])
    assert f == {"alice": pytest.approx(0.5), "bob": pytest.approx(0.5)}


def test_factors_heavier_user_gets_less_and_idle_users_count() -> None:
    f = fairshare_factors({"alice": 100.0, "bob": 10.0, "carol": 0.0}, ["alice", "bob"])
    assert f["bob"] > f["alice"] and "carol" not in f  # carol neither used nor queued
    with_idle = fairshare_factors({"alice": 100.0, "bob": 10.0, "dave": 5.0}, ["alice"])
    assert set(with_idle) == {"alice", "bob", "dave"}


def test_priority_adds_fair_share_and_age() -> None:
    p = Policy(fairshare_weight=1000, age_weight=100, max_age=WEEK)
    j = job(1, "h100", priority=5, submitted_at=T0)
    assert job_priority(j, now=T0, factor=0.5, policy=p) == pytest.approx(505.0)
    half_week = job_priority(j, now=T0 + WEEK / 2, factor=0.5, policy=p)
    assert half_week == pytest.approx(555.0)
    capped = job_priority(j, now=T0 + 10 * WEEK, factor=0.5, policy=p)
    assert capped == pytest.approx(605.0)


# ---------------------------------------------------------------------------------------
# The order decide() uses


def owned(id: int, owner: str, request: str | None = "h100", **kw: object) -> Job:
    j = job(id, request, **kw)  # type: ignore[arg-type]
    j.owner = owner
    return j


def test_without_a_policy_the_order_is_priority_then_fifo() -> None:
    box = [gpu(0)]
    pending = [owned(1, "alice", submitted_at=T0), owned(2, "bob", submitted_at=T0 + 1)]
    ds = decide(pending, [], box, cpu_slots=0, now=T0 + 2, usage={"alice": 1e9})
    assert started(ds) == {1: ("GPU-0",)}


def test_the_lighter_user_goes_first_whatever_the_submit_order() -> None:
    box = [gpu(0)]
    pending = [owned(1, "alice", submitted_at=T0), owned(2, "bob", submitted_at=T0 + 1)]
    ds = decide(
        pending,
        [],
        box,
        cpu_slots=0,
        now=T0 + 2,
        usage={"alice": 1000.0, "bob": 100.0},
        policy=Policy(),
    )
    assert started(ds) == {2: ("GPU-0",)}
    assert [d.job_id for d in ds] == [2, 1]
    assert by_id(ds)[1].position == 2  # type: ignore[union-attr]


def test_running_jobs_owners_are_in_play() -> None:
    # bob has a job running and no usage yet: alice, who used a little, is not "everyone".
    box = [gpu(0), gpu(1)]
    ds = decide(
        [owned(1, "alice")],
        [running(9, 1, owner="bob")],
        box,
        cpu_slots=0,
        now=T0,
        usage={"alice": 10.0},
        policy=Policy(),
    )
    assert started(ds) == {1: ("GPU-0",)}


def test_age_lets_an_old_low_priority_job_overtake() -> None:
    box = [gpu(0)]
    old = owned(1, "alice", priority=0, submitted_at=T0)
    new = owned(2, "alice", priority=50, submitted_at=T0 + WEEK)
    policy = Policy(age_weight=100, max_age=WEEK)
    # A day after the new one: it is 50 ahead in priority, the old one 100 ahead in age.
    ds = decide([old, new], [], box, cpu_slots=0, now=T0 + WEEK + DAY, policy=policy)
    assert started(ds) == {1: ("GPU-0",)}
    # With age weighing little, priority wins.
    ds = decide(
        [old, new],
        [],
        box,
        cpu_slots=0,
        now=T0 + WEEK + DAY,
        policy=Policy(age_weight=10, max_age=WEEK),
    )
    assert started(ds) == {2: ("GPU-0",)}


# ---------------------------------------------------------------------------------------
# The acceptance scenario: two users, 20 one-GPU jobs each, on a 2-GPU box


@dataclass
class Sim:
    """An event-driven run of decide(): every job holds its GPUs for ``length`` seconds."""

    box: list[Gpu]
    pending: list[Job]
    totals: DecayedTotals
    policy: Policy
    quotas: dict[str, Quota]
    length: float = HOUR
    now: float = T0

    def __post_init__(self) -> None:
        self.running: dict[int, tuple[Job, float]] = {}  # id -> (job, started)
        self.rounds: list[tuple[float, dict[str, float], list[Start], list[Wait]]] = []

    def usage(self) -> dict[str, float]:
        u = self.totals.at(self.now)
        for j, s in self.running.values():
            u[j.owner] = u.get(j.owner, 0.0) + interval_usage(
                s, self.now, len(j.gpus), now=self.now, half_life=self.policy.half_life
            )
        return u

    def held(self, owner: str) -> int:
        return sum(len(j.gpus) for j, _ in self.running.values() if j.owner == owner)

    def step(self) -> None:
        usage = self.usage()
        ds = decide(
            self.pending,
            [j for j, _ in self.running.values()],
            self.box,
            cpu_slots=0,
            now=self.now,
            usage=usage,
            policy=self.policy,
            quotas=self.quotas,
        )
        starts = [d for d in ds if isinstance(d, Start)]
        waits = [d for d in ds if isinstance(d, Wait)]
        self.rounds.append((self.now, usage, starts, waits))
        ids = {d.job_id: d for d in starts}
        for j in list(self.pending):
            if j.id in ids:
                self.pending.remove(j)
                j.state, j.gpus = JobState.RUNNING, ids[j.id].gpus
                self.running[j.id] = (j, self.now)
        for owner, q in self.quotas.items():
            if q.max_gpus is not None:
                assert self.held(owner) <= q.max_gpus, f"{owner} over quota at {self.now}"
        # Jump to the next job end (zero real time), and account for what ended.
        if self.running:
            self.now = min(s + self.length for _, s in self.running.values())
            for jid, (j, s) in list(self.running.items()):
                if s + self.length <= self.now:
                    self.totals.add(j.owner, s, self.now, len(j.gpus), now=self.now)
                    del self.running[jid]

    def run(self) -> None:
        for _ in range(500):
            if not self.pending and not self.running:
                return
            self.step()
        raise AssertionError("the simulation did not finish")


def two_users(quotas: dict[str, Quota] | None = None) -> Sim:
    policy = Policy()
    totals = DecayedTotals(policy.half_life, now=T0 - DAY)
    # In the last day alice used 10 GPU-hours, bob 1: ten times as much.
    totals.add("alice", T0 - 17 * HOUR, T0 - 12 * HOUR, 2, now=T0 - 12 * HOUR)
    totals.add("bob", T0 - 13 * HOUR, T0 - 12 * HOUR, 1, now=T0 - 12 * HOUR)
    # alice queued first: plain FIFO would run her jobs first.
    pending = [owned(i, "alice", "any", submitted_at=T0 - 60 + i * 0.01) for i in range(1, 21)]
    pending += [owned(i, "bob", "any", submitted_at=T0 - 30 + i * 0.01) for i in range(21, 41)]
    return Sim([gpu(0), gpu(1)], pending, totals, policy, quotas or {})


def test_two_users_bob_first_until_the_shares_even_out() -> None:
    sim = two_users()
    start_usage = sim.usage()
    # 10 x the raw GPU-seconds; alice's are a few hours older, so decayed a little more.
    assert start_usage["alice"] == pytest.approx(10 * start_usage["bob"], rel=0.02)
    sim.run()
    owner = {j.id: j.owner for j in (*(x for x, _ in sim.running.values()),)}
    owner.update({i: "alice" for i in range(1, 21)})
    owner.update({i: "bob" for i in range(21, 41)})

    # Every round, a GPU goes to the user with less decayed usage when both have jobs
    # waiting: nobody with more usage starts while a lighter user's job waits.
    for _, usage, starts, waits in sim.rounds:
        waiting = {owner[w.job_id] for w in waits}
        for s in starts:
            for other in waiting - {owner[s.job_id]}:
                assert usage[owner[s.job_id]] <= usage[other] + 1e-6

    # bob's jobs start first, and only while he has used less than alice.
    order = [(now, usage, owner[s.job_id]) for now, usage, starts, _ in sim.rounds for s in starts]
    first_alice = next(i for i, (_, _, who) in enumerate(order) if who == "alice")
    assert first_alice >= 8 and all(who == "bob" for _, _, who in order[:first_alice])
    _, at_switch, _ = order[first_alice]
    assert at_switch["bob"] >= at_switch["alice"] - 1e-6  # bob caught up ...
    assert at_switch["bob"] - at_switch["alice"] <= 2 * HOUR  # ... by at most one round

    # Once even, the shares stay even (within one round of two GPU-hours) while both wait.
    for _, usage, starts, waits in sim.rounds:
        if not starts or usage["bob"] < usage["alice"]:
            continue
        if {owner[w.job_id] for w in waits} >= {"alice", "bob"}:
            assert abs(usage["alice"] - usage["bob"]) <= 2 * HOUR + 1

    assert len(order) == 40  # and everybody's jobs ran


def test_two_users_with_quotas_never_exceed_them() -> None:
    sim = two_users({"bob": Quota(max_gpus=1), "alice": Quota(max_gpus=1)})
    sim.run()  # Sim.step asserts the quotas after every round
    reasons = [w.reason for _, _, _, waits in sim.rounds for w in waits]
    assert any(r.startswith("bob's GPU quota is in use: 1 of 1 GPU held by job") for r in reasons)
    # Because bob may hold only one GPU, alice gets the other one from the start.
    _, _, first_starts, _ = sim.rounds[0]
    assert len(first_starts) == 2


# ---------------------------------------------------------------------------------------
# Quotas in decide()


def test_over_quota_job_waits_with_the_reason_and_reserves_nothing() -> None:
    box = [gpu(0), gpu(1), gpu(2)]
    run = [running(9, 0, owner="alice")]
    pending = [owned(1, "alice", "h100:2"), owned(2, "bob", "h100:2")]
    ds = decide(pending, run, box, cpu_slots=0, now=T0, quotas={"alice": Quota(max_gpus=2)})
    assert reason(ds, 1) == "alice's GPU quota is in use: 1 of 2 GPUs held by job 9"
    # Job 1 reserved nothing, so bob's job behind it starts on the two free GPUs.
    assert started(ds) == {2: ("GPU-1", "GPU-2")}


def test_a_request_bigger_than_the_quota_says_so() -> None:
    ds = decide(
        [owned(1, "alice", "h100:3")],
        [],
        [gpu(0), gpu(1), gpu(2)],
        cpu_slots=0,
        now=T0,
        quotas={"alice": Quota(max_gpus=2)},
    )
    assert reason(ds, 1) == (
        "it asks for 3 x h100, more than alice's GPU quota of 2 GPUs: "
        "ask an admin to raise it, or cancel it"
    )


def test_quota_picks_a_fallback_that_fits() -> None:
    box = [gpu(0), gpu(1), gpu(2, "l4")]
    ds = decide(
        [owned(1, "alice", "h100:2,l4:1")],
        [],
        box,
        cpu_slots=0,
        now=T0,
        quotas={"alice": Quota(max_gpus=1)},
    )
    assert started(ds) == {1: ("GPU-2",)}
    # When the fallback that fits is busy too, the reason says why the other is not tried.
    ds = decide(
        [owned(1, "alice", "h100:2,l4:1")],
        [running(9, 2, owner="bob")],
        box,
        cpu_slots=0,
        now=T0,
        quotas={"alice": Quota(max_gpus=1)},
    )
    assert reason(ds, 1).endswith("; 2 x h100 would take alice over their GPU quota")
    assert "GPU 2 held by job 9 (bob)" in reason(ds, 1)


def test_timeout_over_the_quota_waits() -> None:
    j = owned(1, "alice", None)
    j.timeout = 4 * HOUR
    ds = decide([j], [], [], cpu_slots=1, now=T0, quotas={"alice": Quota(max_timeout=2 * HOUR)})
    assert reason(ds, 1) == (
        "its timeout (4 h) is longer than alice's max_timeout quota "
        "(2 h): cancel it and submit it again with a shorter timeout"
    )


def test_cpu_jobs_do_not_count_against_the_gpu_quota() -> None:
    ds = decide(
        [owned(1, "alice", None)],
        [running(9, 0, owner="alice")],
        [gpu(0)],
        cpu_slots=1,
        now=T0,
        quotas={"alice": Quota(max_gpus=1)},
    )
    assert started(ds) == {1: ()}


@st.composite
def quota_scenarios(draw: st.DrawFn) -> tuple[list[Job], list[Job], list[Gpu], dict[str, Quota]]:
    box = [gpu(i, draw(st.sampled_from(["h100", "l4"]))) for i in range(draw(st.integers(1, 6)))]
    users = ["alice", "bob", "carol"]
    run: list[Job] = []
    free = list(range(len(box)))
    for k in range(draw(st.integers(0, 3))):
        n = draw(st.integers(0, min(2, len(free))))
        held, free = free[:n], free[n:]
        if held:
            run.append(running(900 + k, *held, owner=draw(st.sampled_from(users))))
    pending = []
    for i in range(draw(st.integers(0, 12))):
        n = draw(st.integers(1, 3))
        t = draw(st.sampled_from(["h100", "l4", "any"]))
        pending.append(
            owned(
                100 + i, draw(st.sampled_from(users)), f"{t}:{n}", priority=draw(st.integers(-2, 2))
            )
        )
    quotas = {u: Quota(max_gpus=draw(st.integers(0, 3))) for u in users if draw(st.booleans())}
    return pending, run, box, quotas


@settings(max_examples=200, deadline=None)
@given(
    quota_scenarios(),
    st.dictionaries(st.sampled_from(["alice", "bob", "carol"]), st.floats(0, 1e6)),
)
def test_property_quotas_are_never_exceeded_by_what_starts(
    s: tuple[list[Job], list[Job], list[Gpu], dict[str, Quota]],
    usage: dict[str, float],
) -> None:
    pending, run, box, quotas = s
    ds = decide(pending, run, box, cpu_slots=0, now=T0, usage=usage, policy=Policy(), quotas=quotas)
    owner = {j.id: j.owner for j in (*pending, *run)}
    held: dict[str, int] = {}
    for j in run:
        held[j.owner] = held.get(j.owner, 0) + len(j.gpus)
    before = dict(held)
    for d in ds:
        if isinstance(d, Start):
            held[owner[d.job_id]] = held.get(owner[d.job_id], 0) + len(d.gpus)
    for user, q in quotas.items():
        assert q.max_gpus is not None
        # What starts never takes a user over (a user already over, say after the admin
        # lowered the quota, gets nothing more).
        assert held.get(user, 0) <= max(q.max_gpus, before.get(user, 0))
        if before.get(user, 0) >= q.max_gpus:
            assert held.get(user, 0) == before.get(user, 0)
    # GPUs are still never handed out twice.
    given_out = [u for d in ds if isinstance(d, Start) for u in d.gpus]
    held_uuids = {u for j in run for u in j.gpus}
    assert len(given_out) == len(set(given_out)) and not set(given_out) & held_uuids
    assert all(math.isfinite(x) for x in usage.values())


def test_request_types_are_unchanged_by_quota_filtering() -> None:
    # The reason still names the whole request, not only what the quota allows.
    r = GpuRequest.parse("h100:2,l4")
    assert r is not None and str(r) == "2 x h100 or 1 x l4"
