"""The scheduling policy: which queued jobs start now, on which GPUs, and why the rest wait.

This module is pure: it reads no clock, does no I/O and keeps no state between calls. The
service hands it a snapshot (queued jobs, running jobs, the GPU inventory, idle warm
workers, the time) and applies the plan it returns, so the whole policy can be tested,
and property-tested, without a daemon.

The policy, in one paragraph: jobs are considered in scheduling order (priority, then
FIFO). A job in retry backoff waits without getting in anyone's way. A GPU job takes the
first of its fallback options for which enough free matching GPUs exist, lowest indices
first. A GPU job that cannot start reserves the free GPUs it could use, so younger or
lower-priority jobs cannot keep nibbling them away (the classic way a big job starves);
they may still start on GPUs it cannot use. CPU-only jobs are strictly FIFO against the
CPU-slot limit. Every job that waits gets a reason that names what it waits for and who
holds it, because honest queueing is what the product promises.

On a shared box (issue #5) the order is the multifactor priority of
:mod:`gpud.fairshare` (the job's priority, its owner's fair share of decayed GPU-seconds,
its age) instead of plain priority-then-FIFO, and per-user quotas apply: a job that would
take its owner over their GPU quota, or whose timeout is over their limit, waits with
that reason and reserves nothing.

What a round costs (issue #12): the queue comes indexed in groups of one owner, priority
and request (:mod:`gpud.pending`), which the round merges lazily in scheduling order. Once
a request shape waits, every later job of that shape waits too (free GPUs only get fewer
in a round), so its group leaves the merge; the round ends when every group has, after
looking at roughly one job per group plus one per start. The waits' reasons and positions
are worked out only when read, one job's or one page's at a time (:mod:`gpud.sched_read`).
``depth`` bounds how many jobs an event-triggered round looks at (Slurm's
default_queue_depth); jobs past it keep the reason of the last complete plan until the
next full pass. The straightforward algorithm
this replaced is kept in :mod:`gpud.testing.sched_reference`; the property tests check
that both decide the same.
"""

from __future__ import annotations

import gc
import heapq
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

from gpud.domain import Decision, Gpu, IdleWorker, Job, Quota, Reason, Start, Wait
from gpud.fairshare import Policy, fairshare_factors, job_priority
from gpud.pending import Group, PendingIndex
from gpud.reasons import Text
from gpud.sched_read import KEEP_EVERY, Looked, Reader, Walked
from gpud.sched_round import Round, cpu_only, infeasible
from gpud.warm_match import match_warm

__all__ = [
    "Plan",
    "Waits",
    "decide",
    "hand_off",
    "infeasible",
    "order_key",
    "plan",
    "scheduling_key",
]

Key = tuple[float, float, int]


def order_key(job: Job) -> tuple[int, float, int]:
    """Scheduling order: higher priority first, then older first, then lower id.

    The id breaks ties between jobs submitted in the same instant (a batch), so the order
    is total and the same snapshot always yields the same decisions.
    """
    return (-job.priority, job.submitted_at, job.id)


def scheduling_key(
    pending: Sequence[Job],
    running: Sequence[Job],
    *,
    now: float,
    usage: Mapping[str, float],
    policy: Policy,
    owners: Mapping[int, str] | None = None,
) -> Callable[[Job], tuple[float, float, int]]:
    """The multifactor order: higher effective priority first, then older, then lower id.

    ``usage`` is each owner's decayed GPU-seconds (running jobs included); the owners of
    all pending and running jobs are the users in play for the fair-share factor.
    """
    owners = owners or {}

    def owner(job: Job) -> str:
        return job.owner or owners.get(job.id, "")

    factors = fairshare_factors(usage, {owner(j) for j in (*pending, *running)})
    holders = cpu_holders(running, owner)

    def key(job: Job) -> tuple[float, float, int]:
        p = job_priority(job, now=now, factor=factors.get(owner(job), 1.0), policy=policy)
        if job.gpu is None and owner(job) not in holders:
            p += policy.cpu_share_weight
        return (-p, job.submitted_at, job.id)

    return key


def cpu_holders(running: Sequence[Job], owner: Callable[[Job], str]) -> frozenset[str]:
    """Owners holding a CPU slot now (a running job with no GPUs): their CPU jobs get no
    CPU share bonus (gpud.fairshare, #12)."""
    return frozenset(owner(j) for j in running if not j.gpus and j.gpu is None)


def decide(
    pending: Sequence[Job],
    running: Sequence[Job],
    gpus: Sequence[Gpu],
    *,
    cpu_slots: int,
    now: float,
    owners: Mapping[int, str] | None = None,
    usage: Mapping[str, float] | None = None,
    policy: Policy | None = None,
    quotas: Mapping[str, Quota] | None = None,
) -> list[Decision]:
    """Decide, for every pending job, whether it starts now (and on which GPUs) or waits.

    ``pending`` are QUEUED jobs in any order; ``running`` are STARTING/RUNNING jobs, each
    holding the GPUs named in ``job.gpus`` (a CPU-only one holds one CPU slot). Returns one
    decision per pending job, in scheduling order; a :class:`Wait`'s position is the job's
    1-based place among *all* pending jobs in that order, started ones included.

    With a ``policy``, the order is the multifactor priority over ``usage`` (decayed
    GPU-seconds by owner); without one, priority then FIFO. ``quotas`` are per owner.
    """
    return plan(
        PendingIndex.of(pending, owners),
        running,
        gpus,
        cpu_slots=cpu_slots,
        now=now,
        owners=owners,
        usage=usage,
        policy=policy,
        quotas=quotas,
    ).decisions()


def plan(
    pending: PendingIndex | Sequence[Job],
    running: Sequence[Job],
    gpus: Sequence[Gpu],
    idle_workers: Sequence[IdleWorker] = (),
    *,
    cpu_slots: int,
    now: float,
    usage: Mapping[str, float] | None = None,
    policy: Policy | None = None,
    quotas: Mapping[str, Quota] | None = None,
    owners: Mapping[int, str] | None = None,
    depth: int | None = None,
    previous: Plan | None = None,
) -> Plan:
    """One scheduling round: warm matching, then :func:`decide`'s decisions, as a Plan.

    ``pending`` is best the daemon's :class:`PendingIndex` (kept up to date as jobs come
    and go); a plain list is indexed first, in O(n). Idle warm workers go first to queued
    jobs of their key, in scheduling order; a GPU job that cannot use one claims the idle
    workers on GPUs of its type (they become evictable), and the others keep their GPUs
    (as running pseudo-jobs owned by their user). With ``depth``, at most that many jobs
    are looked at; jobs past them keep their reason from ``previous`` (a complete plan).
    """
    index = pending if isinstance(pending, PendingIndex) else PendingIndex.of(pending, owners)
    quotas = quotas or {}
    owners = owners or {}
    groups = [g.snapshot() for g in index.groups()]

    def owner(job: Job) -> str:
        return job.owner or owners.get(job.id, "")

    running_owners = {owner(j) for j in running}
    holders = cpu_holders(running, owner)
    key = _Keyer(usage or {}, policy, {*index.owners(), *running_owners}, now, holders)
    assigned: dict[int, int] = {}
    held: list[Job] = []
    evictable: list[int] = []
    if idle_workers:
        assigned, held, evictable = match_warm(
            _Merge(groups, key),
            idle_workers,
            gpus,
            now=now,
            quotas=quotas,
            cpu_slots=cpu_slots,
            cpu_running=sum(1 for j in running if cpu_only(j.gpu)),
        )
    # The round's order is that of the jobs left after warm matching, with the idle
    # workers that keep their GPUs among the running (the service always did it so).
    if assigned and policy is not None:
        gone: dict[str, int] = {}
        for job_id in assigned:
            j = index.get(job_id)
            assert j is not None
            gone[index.owner(j)] = gone.get(index.owner(j), 0) + 1
        left = {o for o in index.owners() if index.queued_by(o) > gone.get(o, 0)}
        key = _Keyer(
            usage or {}, policy, {*left, *running_owners, *(owner(j) for j in held)}, now, holders
        )
    elif held and policy is not None:
        key = _Keyer(
            usage or {},
            policy,
            {*index.owners(), *running_owners, *(owner(j) for j in held)},
            now,
            holders,
        )
    # The CPU jobs given to idle workers take their slots now: the round's cold starts
    # must not count those slots free (#12: a .map on 2 slots grew to 50 workers so).
    warm_cpu = [j for i in assigned if (j := index.get(i)) is not None and cpu_only(j.gpu)]
    setup = _Setup(
        running=[*running, *held, *warm_cpu],
        gpus=gpus,
        cpu_slots=cpu_slots,
        now=now,
        owners=owners,
        quotas=quotas,
    )
    rnd = setup.round()
    merge = _Merge(groups, key, skip=set(assigned))
    seen = 0
    cut: Key | None = None
    # What the round did, kept so that one job's wait can be read without the others.
    looked: list[Looked] = []
    dropped: dict[int, Key] = {}
    kept: dict[int, Round] = {}
    while (item := merge.pop()) is not None:
        job, gi, k = item
        if depth is not None and seen >= depth:
            cut = k  # this job and every later one keep their previous reason
            break
        if seen and seen % KEEP_EVERY == 0:
            kept[seen] = rnd.copy()  # where a read replays the round from
        seen += 1
        done = rnd.step(job, groups[gi].owner)
        # step() leaves either a Start or the Reason it waits (sched_round.Round).
        outcome = rnd.last_start if rnd.last_start is not None else rnd.last_reason
        assert outcome is not None
        looked.append((k, gi, job, outcome))
        if done:
            # Its request shape waits: so will every later job of the group.
            merge.drop(gi)
            dropped[gi] = k
    # Jobs past a cut keep their reason from the last complete plan (never a chain).
    base = previous if previous is None or previous.complete else previous.base
    skipped = [index.get(i) for i in assigned]
    reader = Reader(
        groups=groups,
        key=key.of,
        new_round=setup.round,
        new_merge=lambda: iter(_Merge(groups, key, skip=set(assigned))),
        now=now,
        quotas=quotas,
        skip_keys=[key(j, index.owner(j)) for j in skipped if j is not None],
        looked=looked,
        kept=kept,
        dropped=dropped,
        cut=cut,
        before_cut=base.waits.of if base is not None and cut is not None else None,
        not_yet=_NOT_YET,
    )
    return Plan(
        starts=rnd.starts,
        assigned=assigned,
        held=held,
        evictable=evictable,
        next_backoff=index.next_backoff(now),
        looked_at=seen,
        lazy=_Lazy(
            setup,
            groups,
            key,
            set(assigned),
            cut,
            base.waits if base is not None and cut is not None else None,
        ),
        base=base if cut is not None else None,
        reader=reader,
        seq=index.seq,
    )


def hand_off(
    pending: PendingIndex,
    running: Sequence[Job],
    gpus: Sequence[Gpu],
    worker: IdleWorker,
    *,
    cpu_slots: int,
    now: float,
    usage: Mapping[str, float] | None = None,
    policy: Policy | None = None,
    quotas: Mapping[str, Quota] | None = None,
    owners: Mapping[int, str] | None = None,
    taken: Collection[int] = (),
) -> int | None:
    """The queued job a round run now would give ``worker``, were it the only idle worker:
    the next call a warm worker whose call just ended may take at once, without a round
    (#12, pipelining). ``running`` is without the call that ended; ``taken``: queued jobs
    being started already (each one in ``running``), left out of the queue.

    This is :func:`plan`'s warm matching itself, over the live index (nothing is copied:
    the caller reads the answer before the index changes), with this one worker. So every
    rule of a round holds for the job it names: scheduling (fair-share) order, retry
    backoffs, the max_timeout quota, and the CPU slots: a CPU job gets the worker only into
    a free slot, and never while a job ahead of it that no idle worker takes (another
    user's cold job, say) waits for one. Leaving the other idle workers out can only make
    the answer None where a full round would match the job (a job ahead taking one of
    them takes its slot too); it never names a job a full round would not give a worker
    of this key (``tests/test_scheduler_plan.py`` checks both on random queues)."""
    owners = owners or {}

    def owner(job: Job) -> str:
        return job.owner or owners.get(job.id, "")

    key = _Keyer(
        usage or {},
        policy,
        {*pending.owners(), *(owner(j) for j in running)},
        now,
        cpu_holders(running, owner),
    )
    assigned, _, _ = match_warm(
        _Merge(pending.groups(), key, skip=set(taken)),
        [worker],
        gpus,
        now=now,
        quotas=quotas or {},
        cpu_slots=cpu_slots,
        cpu_running=sum(1 for j in running if cpu_only(j.gpu)),
    )
    return next(iter(assigned), None)


class Plan:
    """A round's outcome. ``starts`` are in scheduling order; ``waits`` (job id -> Wait,
    position and reason) is worked out when first read, once."""

    def __init__(
        self,
        *,
        starts: list[Start],
        assigned: dict[int, int],
        held: list[Job],
        evictable: list[int],
        next_backoff: float | None,
        looked_at: int,
        lazy: _Lazy,
        base: Plan | None,
        reader: Reader,
        seq: int,
    ) -> None:
        self.starts = starts
        self.assigned = assigned  # job id -> id of the idle warm worker it runs in
        self.held = held  # idle warm workers keeping their GPUs, as running pseudo-jobs
        self.evictable = evictable  # ids of idle warm workers a start may end
        self.next_backoff = next_backoff  # when the first running backoff ends, if any
        self.looked_at = looked_at  # jobs the round looked at
        self.complete = lazy.cut is None  # False: depth stopped it before the end
        self.base = base  # the complete plan a cut one takes its later reasons from
        self.waits = Waits(lazy, reader, seq, {s.job_id for s in starts} | set(assigned))

    def decisions(self) -> list[Decision]:
        """Every job's decision, in scheduling order (as :func:`decide` returns them)."""
        return self.waits.decisions()

    def decided(self) -> int:
        """How many of :meth:`decisions` this round made; the rest (past its depth) are
        the previous plan's waits."""
        self.waits.decisions()
        return self.waits.decided


# ---------------------------------------------------------------------------------------
# The order, merged lazily


class _Keyer:
    """The scheduling order's key of a job (of a group's owner), one or a group at once."""

    def __init__(
        self,
        usage: Mapping[str, float],
        policy: Policy | None,
        users: set[str],
        now: float,
        cpu_holders: frozenset[str] = frozenset(),
    ) -> None:
        self.policy = policy
        self.now = now
        self.factors = fairshare_factors(usage, users) if policy is not None else {}
        self.cpu_holders = cpu_holders

    def __call__(self, job: Job, owner: str) -> Key:
        if self.policy is None:
            return (-job.priority, job.submitted_at, job.id)
        p = job_priority(job, now=self.now, factor=self.factors.get(owner, 1.0), policy=self.policy)
        if job.gpu is None and owner not in self.cpu_holders:
            p += self.policy.cpu_share_weight
        return (-p, job.submitted_at, job.id)

    def group(self, g: Group) -> list[Key]:
        """Every key of a group (the one place a round touches every queued job, when all
        its waits are read)."""
        return list(map(self.of(g.owner), g.jobs))

    def of(self, owner: str) -> Callable[[Job], Key]:
        """The key of a job of ``owner``: the same numbers as job_priority, computed
        inline, for the many keys a read bisects or a full read sorts."""
        pol, now = self.policy, self.now
        if pol is None:
            return lambda j: (-j.priority, j.submitted_at, j.id)
        base = pol.fairshare_weight * self.factors.get(owner, 1.0)
        # A group's jobs share a request, so all or none of them get the CPU share bonus.
        cpu = 0.0 if owner in self.cpu_holders else pol.cpu_share_weight
        aw, ma = pol.age_weight, pol.max_age
        # Summed in job_priority's order, then the bonus, as __call__ and the reference do:
        # the same floats, so the same order.
        if ma <= 0:
            return lambda j: (
                -(j.priority + base + aw * 1.0 + (cpu if j.gpu is None else 0.0)),
                j.submitted_at,
                j.id,
            )
        return lambda j: (
            -(
                j.priority
                + base
                + aw * min(1.0, max(0.0, now - j.submitted_at) / ma)
                + (cpu if j.gpu is None else 0.0)
            ),
            j.submitted_at,
            j.id,
        )


class _Merge:
    """The groups' jobs in scheduling order, one at a time; a dropped group's jobs are
    never looked at. Within a group the order is (submit time, id), which the scheduling
    order agrees with, so only the groups' heads are compared."""

    def __init__(
        self, groups: Sequence[Group], key: Callable[[Job, str], Key], skip: set[int] | None = None
    ) -> None:
        self.groups = groups
        self.key = key
        self.skip = skip or set()
        self.dropped: set[int] = set()
        self.heap = [(key(g.jobs[0], g.owner), gi, 0) for gi, g in enumerate(groups) if g.jobs]
        heapq.heapify(self.heap)

    def pop(self) -> tuple[Job, int, Key] | None:
        while self.heap:
            k, gi, i = heapq.heappop(self.heap)
            if gi in self.dropped:
                continue
            g = self.groups[gi]
            if i + 1 < len(g.jobs):
                heapq.heappush(self.heap, (self.key(g.jobs[i + 1], g.owner), gi, i + 1))
            job = g.jobs[i]
            if job.id in self.skip:
                continue
            return job, gi, k
        return None

    def drop(self, gi: int) -> None:
        self.dropped.add(gi)

    def __iter__(self) -> Iterator[tuple[Job, int, Key]]:
        while (item := self.pop()) is not None:
            yield item


# ---------------------------------------------------------------------------------------
# The waits, worked out on reading


class _Setup:
    """What a round starts from, kept so that the round can be replayed on reading."""

    def __init__(
        self,
        *,
        running: Sequence[Job],
        gpus: Sequence[Gpu],
        cpu_slots: int,
        now: float,
        owners: Mapping[int, str],
        quotas: Mapping[str, Quota],
    ) -> None:
        self.running = running
        self.gpus = gpus
        self.cpu_slots = cpu_slots
        self.now = now
        self.owners = owners
        self.quotas = quotas

    def round(self) -> Round:
        return Round(
            self.running,
            self.gpus,
            cpu_slots=self.cpu_slots,
            now=self.now,
            owners=self.owners,
            quotas=self.quotas,
        )


class _Lazy:
    def __init__(
        self,
        setup: _Setup,
        groups: list[Group],
        key: _Keyer,
        skip: set[int],
        cut: Key | None,
        previous: Waits | None,
    ) -> None:
        self.setup = setup
        self.groups = groups
        self.key = key
        self.skip = skip
        self.cut = cut
        self.previous = previous
        self.decided = 0

    def decisions(self) -> list[Decision]:
        """Replay the round over every job, in order: the same starts (the round is a
        function of the order), and each wait's reason at its place in the queue."""
        rnd = self.setup.round()
        out: list[Decision] = []
        position = 0
        self.decided = 0
        # Every job is looked at here, so one sort of all keys (the groups are sorted
        # runs, which the sort merges) beats a merge that steps job by job.
        order = [
            (k, gi, i) for gi, g in enumerate(self.groups) for i, k in enumerate(self.key.group(g))
        ]
        order.sort()
        groups, skip, cut, now = self.groups, self.skip, self.cut, self.setup.now
        quotas = self.setup.quotas
        # A GPU group whose shape waits: its reason at the round's version. Later jobs of
        # the group share it while the version stays (a quota'd owner's jobs are checked
        # one by one, for their max_timeout).
        waiting: dict[int, tuple[int, Reason]] = {}
        decided = 0
        for k, gi, i in order:
            g = groups[gi]
            job = g.jobs[i]
            if job.id in skip:
                continue
            position += 1
            if cut is not None and k >= cut:
                why = self.previous.why(job.id) if self.previous is not None else None
                out.append(Wait(job.id, why or _NOT_YET, position))
                continue
            decided = position
            hit = waiting.get(gi)
            if hit is not None and hit[0] == rnd.version and job.not_before <= now:
                out.append(Wait(job.id, hit[1], position))
                continue
            blocked = rnd.step(job, g.owner)
            if rnd.last_start is not None:
                out.append(rnd.last_start)
                continue
            assert rnd.last_reason is not None
            out.append(Wait(job.id, rnd.last_reason, position))
            if blocked and g.gpu is not None and g.owner not in quotas:
                waiting[gi] = (rnd.version, rnd.last_reason)
        self.decided = decided
        return out


#: The reason of a job past the depth of event-triggered rounds, submitted since the
#: last complete one: it is looked at in the next full pass.
_NOT_YET = Text("queued: the scheduler looks this far down the queue at its next full pass")


class Waits(Mapping[int, Wait]):
    """Job id -> Wait, all worked out on first reading as a mapping (O(queued)); jobs
    popped since are gone. :meth:`of` reads one job's without the others
    (:mod:`gpud.sched_read`), :meth:`order` walks them in order."""

    def __init__(self, lazy: _Lazy, reader: Reader, seq: int, no_wait: set[int]) -> None:
        self._lazy: _Lazy | None = lazy
        self.reader = reader
        self.seq = seq  # the queue index's add count when the plan was made
        self.no_wait = no_wait  # the jobs it started or gave to warm workers
        self._decisions: list[Decision] | None = None
        self._waits: dict[int, Wait] | None = None
        self._gone: set[int] = set()
        self.decided = 0

    def decisions(self) -> list[Decision]:
        if self._decisions is None:
            assert self._lazy is not None
            # Hundreds of thousands of small objects that all survive: left on, the cyclic
            # GC would walk the whole heap several times over (~45% of the time at
            # 100,000 queued). Nothing made here forms a cycle.
            was = gc.isenabled()
            gc.disable()
            try:
                self._decisions = self._lazy.decisions()
            finally:
                if was:
                    gc.enable()
            self.decided = self._lazy.decided
        return self._decisions

    def _all(self) -> dict[int, Wait]:
        if self._waits is None:
            self._waits = {d.job_id: d for d in self.decisions() if isinstance(d, Wait)}
        return self._waits

    def of(self, job: Job) -> Wait | None:
        """``job``'s wait, found on its own: O(groups · log queued)."""
        if job.id in self._gone:
            return None
        if self._waits is not None:
            return self._waits.get(job.id)
        return self.reader.wait(job)

    def order(self) -> Iterator[Walked]:
        """The plan's queued jobs in scheduling order with their positions, lazily
        (jobs that went to warm workers left out; started ones still in); a walked job's
        wait is :meth:`wait_at`."""
        return self.reader.order()

    def wait_at(self, item: Walked) -> Wait | None:
        if item[0].id in self._gone:
            return None
        return self.reader.wait_at(item)

    def why(self, job_id: int) -> str | Reason | None:
        w = self._all().get(job_id)
        return None if w is None else w.why

    def __getitem__(self, job_id: int) -> Wait:
        if job_id in self._gone:
            raise KeyError(job_id)
        return self._all()[job_id]

    def __iter__(self) -> Iterator[int]:
        return (i for i in self._all() if i not in self._gone)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def pop(self, job_id: int, default: Wait | None = None) -> Wait | None:
        """Forget a job (it ended): no need to work the waits out for that."""
        self._gone.add(job_id)
        return default
