"""The scheduler as it was before #12, kept verbatim as the reference implementation
(its ordering keys, unchanged by #12, are imported from :mod:`gpud.scheduler`).

`gpud.scheduler.plan` memoizes by request shape, indexes GPUs once per round, stops at
saturation and formats reasons lazily; the property tests (tests/test_scheduler_plan.py)
check that it decides exactly what this straightforward full recomputation decides, and
bench/hot_sched.py measures both in the same run. :func:`match_warm` is the old
``Daemon._match_warm`` as a pure function over plain worker data. Do not optimise this
module: its worth is being obviously right.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

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
    served,
    warm_key,
)
from gpud.fairshare import Policy

# The ordering is the same policy in both; what the reference checks is the decision.
from gpud.scheduler import order_key, scheduling_key

__all__ = ["decide", "match_warm"]

# How many job ids or pids a reason lists before it says "and N more": a reason is one
# line in a table, and a queue of 500 CPU jobs must not produce a 5 kB string.
_MAX_LISTED = 5


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
    key: Callable[[Job], tuple[float, float, int]] = order_key
    if policy is not None:
        key = scheduling_key(
            pending, running, now=now, usage=usage or {}, policy=policy, owners=owners
        )
    round_ = _Round(running, gpus, cpu_slots=cpu_slots, owners=owners or {}, quotas=quotas or {})
    decisions: list[Decision] = []
    for position, job in enumerate(sorted(pending, key=key), start=1):
        round_.note_job(job)
        if job.not_before > now:
            # A job in backoff neither starts nor reserves nor blocks the CPU line: it
            # failed recently, and holding resources for it would idle them for nothing.
            decisions.append(Wait(job.id, _backoff_reason(job, now), position))
            continue
        over, allowed = round_.quota_check(job)
        if over is not None:
            # Over quota: it waits, and reserves nothing, or one user's backlog would
            # keep GPUs idle that others could use.
            decisions.append(Wait(job.id, over, position))
        elif _cpu_only(job.gpu):
            decisions.append(round_.place_cpu_job(job, position))
        else:
            assert job.gpu is not None  # _cpu_only said so; this is for mypy
            decisions.append(round_.place_gpu_job(job, job.gpu, position, allowed))
    return decisions


def infeasible(request: GpuRequest | None, gpus: Sequence[Gpu]) -> str | None:
    """Why this box could never run ``request``, even with every GPU free; None if it could.

    Every GPU counts, busy or not: this answers "will it ever fit here", which is what the
    service checks at submit time so that nobody's job queues forever.
    """
    if _cpu_only(request):
        return None
    assert request is not None
    box = _by_index(gpus)
    if not box:
        return "this box has no GPUs: run CPU-only (no gpu=) or submit to a machine with GPUs"
    if any(_fits(gpu_type, count, box) for gpu_type, count in request.options):
        return None
    have = _inventory(box)
    known = [t for t, _ in request.options if any(g.matches(t) for g in box)]
    if not known:
        # Nothing asked for exists here at all: most likely a typo or the wrong machine, so
        # list the names this box does answer to.
        wanted = " or ".join(_dedupe(t for t, _ in request.options))
        names = ", ".join([*_dedupe(n for g in box for n in (g.type, *g.aliases)), "any"])
        return f"this box has no {wanted}: it has {have}; ask for one of: {names}"
    return f"this box cannot run {request}: it has {have}"


# ---------------------------------------------------------------------------------------
# One scheduling round

_ClaimKind = Literal["held", "reserved"]


class _Round:
    """The mutable bookkeeping of one :func:`decide` call: who holds or reserves what."""

    def __init__(
        self,
        running: Sequence[Job],
        gpus: Sequence[Gpu],
        *,
        cpu_slots: int,
        owners: Mapping[int, str],
        quotas: Mapping[str, Quota],
    ) -> None:
        self.box = _by_index(gpus)
        self.cpu_slots = cpu_slots
        self.owners = owners
        self.quotas = quotas
        self.owner_of: dict[int, str] = {}
        # owner -> ids of the jobs holding their GPUs (one entry per GPU), for quotas.
        self.gpus_held: dict[str, list[int]] = {}
        # uuid -> (kind, job id). "held": by a running job or one started this round;
        # "reserved": kept free for a waiting job that is ahead in the queue.
        self.claims: dict[str, tuple[_ClaimKind, int]] = {}
        # Jobs using a CPU slot: running CPU-only jobs and those started this round.
        self.cpu_users: list[int] = []
        # CPU-only jobs already told to wait; everyone after them waits too (FIFO).
        self.cpu_line: list[int] = []
        for job in running:
            self.note_job(job)
            # Anything a running job lists is held, whatever its request says: handing a
            # GPU to two jobs is the one mistake this module must never make.
            for uuid in job.gpus:
                self.claims[uuid] = ("held", job.id)
            self.gpus_held.setdefault(self.owner(job), []).extend([job.id] * len(job.gpus))
            if _cpu_only(job.gpu):
                self.cpu_users.append(job.id)

    def note_job(self, job: Job) -> None:
        owner = job.owner or self.owners.get(job.id, "")
        if owner:
            self.owner_of[job.id] = owner

    def owner(self, job: Job) -> str:
        return job.owner or self.owners.get(job.id, "")

    def label(self, job_id: int) -> str:
        owner = self.owner_of.get(job_id) or self.owners.get(job_id, "")
        return f"job {job_id} ({owner})" if owner else f"job {job_id}"

    def free(self, gpu: Gpu) -> bool:
        # A GPU with processes gpud did not start is somebody else's: never hand it out,
        # even though no job of ours holds it.
        return gpu.uuid not in self.claims and not gpu.foreign_pids

    # -- quotas ---------------------------------------------------------------------

    def quota_check(self, job: Job) -> tuple[str | None, tuple[tuple[str, int], ...] | None]:
        """(why the job is over its owner's quota, or None; the GPU options it may use).

        The options are None when the quota restricts nothing; otherwise those fallbacks
        that fit in what is left of the owner's GPU quota.
        """
        owner = self.owner(job)
        quota = self.quotas.get(owner)
        if quota is None:
            return None, None
        if quota.max_timeout is not None and job.timeout > quota.max_timeout:
            return (
                f"its timeout ({_seconds(job.timeout)}) is longer than {owner}'s "
                f"max_timeout quota ({_seconds(quota.max_timeout)}): cancel it and "
                "submit it again with a shorter timeout"
            ), None
        if quota.max_gpus is None or _cpu_only(job.gpu):
            return None, None
        assert job.gpu is not None
        held = self.gpus_held.get(owner, [])
        allowed = tuple((t, n) for t, n in job.gpu.options if len(held) + n <= quota.max_gpus)
        if allowed:
            return None, None if allowed == job.gpu.options else allowed
        if min(n for _, n in job.gpu.options) > quota.max_gpus:
            return (
                f"it asks for {job.gpu}, more than {owner}'s GPU quota of "
                f"{_gpus(quota.max_gpus)}: ask an admin to raise it, or cancel it"
            ), None
        holders = sorted(set(held))
        jobs = "job" if len(holders) == 1 else "jobs"
        return (
            f"{owner}'s GPU quota is in use: {len(held)} of {_gpus(quota.max_gpus)} held "
            f"by {jobs} {_id_list(holders)}"
        ), None

    # -- CPU-only jobs --------------------------------------------------------------

    def place_cpu_job(self, job: Job, position: int) -> Decision:
        if self.cpu_line:
            # Strict FIFO: a younger CPU job must not slip into a slot that frees up
            # while an older one is waiting for exactly that.
            reason = f"waiting behind {_jobs_ahead(self.cpu_line)} for a CPU slot"
        elif len(self.cpu_users) < self.cpu_slots:
            self.cpu_users.append(job.id)
            return Start(job.id, ())
        elif self.cpu_slots <= 0:
            reason = "waiting for a CPU slot: this daemon runs no CPU-only jobs (cpu_slots = 0)"
        else:
            users = _id_list(sorted(self.cpu_users))
            jobs = "job" if len(self.cpu_users) == 1 else "jobs"
            reason = (
                f"waiting for a CPU slot: {len(self.cpu_users)} of {self.cpu_slots} in use "
                f"({jobs} {users})"
            )
        self.cpu_line.append(job.id)
        return Wait(job.id, reason, position)

    # -- GPU jobs -------------------------------------------------------------------

    def place_gpu_job(
        self,
        job: Job,
        request: GpuRequest,
        position: int,
        allowed: tuple[tuple[str, int], ...] | None = None,
    ) -> Decision:
        """Start the job on its first option that fits, or make it wait (and reserve).

        ``allowed``: the options its owner's quota leaves (None: all of them)."""
        problem = infeasible(request, self.box)
        if problem is not None:
            # It can never fit, so it reserves nothing: holding GPUs for a job that can
            # never use them would only idle them.
            return Wait(job.id, problem, position)
        options = request.options if allowed is None else allowed
        for gpu_type, count in options:
            candidates = [g for g in self.box if g.matches(gpu_type) and self.free(g)]
            if len(candidates) >= count:
                chosen = candidates[:count]  # lowest indices: deterministic, easy to read
                for g in chosen:
                    self.claims[g.uuid] = ("held", job.id)
                self.gpus_held.setdefault(self.owner(job), []).extend([job.id] * count)
                return Start(job.id, tuple(g.uuid for g in chosen))
        # It must wait. Keep the free GPUs of its first option that can ever fit, so that
        # jobs behind it cannot take them one by one and starve it; GPUs it cannot use stay
        # open to them. Only the first such option: reserving for every fallback would
        # lock up far more of the box than the job will ever use.
        for gpu_type, count in options:
            if _fits(gpu_type, count, self.box):
                keep = [g for g in self.box if g.matches(gpu_type) and self.free(g)][:count]
                for g in keep:
                    self.claims[g.uuid] = ("reserved", job.id)
                break
        reason = self.gpu_wait_reason(job.id, request)
        if allowed is not None:
            over = [f"{n} x {t}" for t, n in request.options if (t, n) not in allowed]
            reason += f"; {' or '.join(over)} would take {self.owner(job)} over their GPU quota"
        return Wait(job.id, reason, position)

    def gpu_wait_reason(self, job_id: int, request: GpuRequest) -> str:
        """Say, for every GPU the job could use, why it cannot have it now.

        GPUs in the same situation are grouped ("GPUs 0,1 held by job 41 (alice)"), and
        the groups are listed in the order of their lowest GPU index.
        """
        groups: dict[tuple[str, int], list[Gpu]] = {}
        for g in self.box:
            if not any(g.matches(t) for t, _ in request.options):
                continue
            claim = self.claims.get(g.uuid)
            key: tuple[str, int]
            if claim is not None and claim[0] == "held":
                key = ("held", claim[1])
            elif g.foreign_pids:
                key = ("foreign", 0)
            elif claim is not None and claim[1] != job_id:
                key = ("reserved", claim[1])
            elif claim is not None:
                key = ("mine", 0)
            else:
                key = ("free", 0)
            groups.setdefault(key, []).append(g)
        parts: list[str] = []
        for (kind, other), members in groups.items():
            where = _gpu_list(g.index for g in members)
            if kind == "held":
                parts.append(f"{where} held by {self.label(other)}")
            elif kind == "foreign":
                pids = sorted({p for g in members for p in g.foreign_pids})
                noun = "pid" if len(pids) == 1 else "pids"
                parts.append(
                    f"{where} busy with processes gpud did not start ({noun} {_id_list(pids)})"
                )
            elif kind == "reserved":
                owner = self.owner_of.get(other) or self.owners.get(other, "")
                ahead = f"{owner}, ahead in the queue" if owner else "ahead in the queue"
                parts.append(f"{where} reserved for job {other} ({ahead})")
            elif kind == "mine":
                parts.append(f"{where} free and kept for this job")
            else:
                parts.append(f"{where} free")
        # Fallback options the box can never hold are worth saying, or a user will wonder
        # why "4 x h100" never happens on a box with two of them.
        never = [f"{n} x {t}" for t, n in request.options if not _fits(t, n, self.box)]
        reason = f"waiting for {request}: " + ", ".join(parts)
        if never:
            reason += f"; this box can never fit {' or '.join(never)}"
        return reason


# ---------------------------------------------------------------------------------------
# Helpers


def _cpu_only(request: GpuRequest | None) -> bool:
    # GpuRequest.parse never builds one without options, but a hand-built one would
    # otherwise crash max_count and friends; it asks for no GPU, so it is CPU-only.
    return request is None or not request.options


def _by_index(gpus: Iterable[Gpu]) -> list[Gpu]:
    return sorted(gpus, key=lambda g: (g.index, g.uuid))


def _fits(gpu_type: str, count: int, box: Sequence[Gpu]) -> bool:
    """Whether the box has enough GPUs of this type, busy or not."""
    return sum(1 for g in box if g.matches(gpu_type)) >= count


def _gpu_list(indices: Iterable[int]) -> str:
    ids = list(indices)
    return ("GPU " if len(ids) == 1 else "GPUs ") + ",".join(str(i) for i in ids)


def _id_list(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:_MAX_LISTED])
    if len(ids) > _MAX_LISTED:
        shown += f" and {len(ids) - _MAX_LISTED} more"
    return shown


def _jobs_ahead(line: Sequence[int]) -> str:
    # Name the head of the line: it is the job that will take the next slot.
    if len(line) == 1:
        return f"job {line[0]}"
    others = len(line) - 1
    return f"job {line[0]} and {others} other CPU job{'s' if others > 1 else ''}"


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _inventory(box: Sequence[Gpu]) -> str:
    """'2 x h100 (GPUs 0,1) and 1 x l4 (GPU 2)': what a box has, by type, in index order."""
    by_type: dict[str, list[int]] = {}
    for g in box:
        by_type.setdefault(g.type, []).append(g.index)
    parts = [f"{len(ix)} x {t} ({_gpu_list(ix)})" for t, ix in by_type.items()]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _backoff_reason(job: Job, now: float) -> str:
    # job.attempt counts attempts started so far, so the one being waited for is the next;
    # a job may run 1 + retries times in all.
    return (
        f"retrying after a failure: backoff for another {job.not_before - now:.1f} s "
        f"(attempt {job.attempt + 1} of {job.retries + 1})"
    )


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _seconds(s: float) -> str:
    if s >= 3600 and s % 3600 == 0:
        return f"{int(s // 3600)} h"
    if s >= 60 and s % 60 == 0:
        return f"{int(s // 60)} min"
    return f"{s:g} s"


# ---------------------------------------------------------------------------------------
# Warm matching, as Daemon._match_warm did it (one more sort of the whole queue)


def match_warm(
    pending: Sequence[Job],
    idle: Sequence[IdleWorker],
    gpus: Sequence[Gpu],
    *,
    now: float,
    key: Callable[[Job], tuple[float, float, int]] = order_key,
    quotas: Mapping[str, Quota] | None = None,
    cpu_slots: int = 0,
    cpu_running: int = 0,
) -> tuple[dict[int, int], list[Job], list[int]]:
    """(job id -> worker id; idle workers keeping their GPUs, as pseudo running jobs;
    ids of the idle workers a job ahead in the queue may evict). With CPU slots, a ready
    CPU job no idle worker takes leaves the later CPU jobs without one, and CPU jobs get
    idle workers only while a slot is free (``cpu_running`` in use now) (#12)."""
    if not idle:
        return {}, [], []
    assigned: dict[int, IdleWorker] = {}
    claimed: set[int] = set()
    cpu_shut = False
    cpu_free = cpu_slots - cpu_running
    for job in sorted(pending, key=key):
        if job.not_before > now:
            continue
        quota = (quotas or {}).get(job.owner)
        over_quota = (
            quota is not None and quota.max_timeout is not None and job.timeout > quota.max_timeout
        )
        no_slot = job.gpu is None and cpu_slots > 0 and (cpu_shut or cpu_free <= 0)
        if served(job) and not over_quota and not no_slot:
            wanted = warm_key(job)
            w = next(
                (
                    w
                    for w in idle
                    if w.key == wanted and w.id not in claimed and w not in assigned.values()
                ),
                None,
            )
            if w is not None:
                assigned[job.id] = w
                cpu_free -= 1 if job.gpu is None else 0
                continue
        if job.gpu is None and not over_quota and cpu_slots > 0:
            cpu_shut = True
        if job.gpu is not None:
            index = {g.uuid: g for g in gpus}
            for w in idle:
                if (
                    w.gpus
                    and w not in assigned.values()
                    and any(
                        index[u].matches(t)
                        for u in w.gpus
                        if u in index
                        for t, _ in job.gpu.options
                    )
                ):
                    claimed.add(w.id)
    held: list[Job] = []
    evictable: list[int] = []
    for w in idle:
        if w in assigned.values() or not w.gpus:
            continue
        if w.id in claimed:
            evictable.append(w.id)
        else:
            held.append(
                Job(
                    id=w.last_job,
                    function="(warm worker)",
                    state=JobState.RUNNING,
                    submitted_at=0.0,
                    owner=w.owner,
                    gpus=w.gpus,
                )
            )
    return {j: w.id for j, w in assigned.items()}, held, evictable
