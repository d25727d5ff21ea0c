"""One scheduling round's bookkeeping: who holds or reserves what, job by job.

:func:`gpud.scheduler.plan` feeds a :class:`Round` the queued jobs in scheduling order.
Each :meth:`Round.step` starts the job or says why it waits, as a structured reason
(:mod:`gpud.reasons`), and tells whether the job's request shape is blocked for the rest
of the round: free GPUs only get fewer within a round and a quota's use only grows, so
once a shape waits, every later job of that shape waits too, and the caller can skip them.

What makes a step cheap, whatever the length of the queue:

* GPUs are indexed by the types asked for once per round (:meth:`Round._matching`);
* a blocked shape's reason is memoized by the round's *version*, which counts the changes
  to who holds or reserves which GPU (at most two per GPU in a round), so however many
  jobs of a shape wait, its reason is built at most once per version;
* reasons are data; the words are made when someone reads them.

Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gpud.domain import Gpu, GpuRequest, Job, Quota, Reason, Start
from gpud.reasons import (
    Backoff,
    CpuBehind,
    GpuPart,
    GpuWait,
    Text,
    gpus_word,
    id_list,
    inventory,
    seconds,
)

__all__ = ["Round", "cpu_only", "fits", "infeasible"]

_Shape = tuple[GpuRequest, str | None]
_Claim = tuple[str, int, str]  # ("held" or "reserved", job id, its owner)


def cpu_only(request: GpuRequest | None) -> bool:
    # GpuRequest.parse never builds one without options, but a hand-built one would
    # otherwise crash max_count and friends; it asks for no GPU, so it is CPU-only.
    return request is None or not request.options


def fits(gpu_type: str, count: int, box: Sequence[Gpu]) -> bool:
    """Whether the box has enough GPUs of this type, busy or not."""
    return sum(1 for g in box if g.matches(gpu_type)) >= count


def infeasible(request: GpuRequest | None, gpus: Sequence[Gpu]) -> str | None:
    """Why this box could never run ``request``, even with every GPU free; None if it could.

    Every GPU counts, busy or not: this answers "will it ever fit here", which is what the
    service checks at submit time so that nobody's job queues forever.
    """
    if cpu_only(request):
        return None
    assert request is not None
    box = sorted(gpus, key=lambda g: (g.index, g.uuid))
    if not box:
        return "this box has no GPUs: run CPU-only (no gpu=) or submit to a machine with GPUs"
    if any(fits(gpu_type, count, box) for gpu_type, count in request.options):
        return None
    have = inventory(box)
    known = [t for t, _ in request.options if any(g.matches(t) for g in box)]
    if not known:
        # Nothing asked for exists here at all: most likely a typo or the wrong machine, so
        # list the names this box does answer to.
        wanted = " or ".join(dict.fromkeys(t for t, _ in request.options))
        names = ", ".join([*dict.fromkeys(n for g in box for n in (g.type, *g.aliases)), "any"])
        return f"this box has no {wanted}: it has {have}; ask for one of: {names}"
    return f"this box cannot run {request}: it has {have}"


class Round:
    """The mutable bookkeeping of one round. After each :meth:`step`, ``last_start`` is
    the job's Start, or ``last_reason`` why it waits."""

    def __init__(
        self,
        running: Sequence[Job],
        gpus: Sequence[Gpu],
        *,
        cpu_slots: int,
        now: float,
        owners: Mapping[int, str],
        quotas: Mapping[str, Quota],
    ) -> None:
        self.box = sorted(gpus, key=lambda g: (g.index, g.uuid))
        self.cpu_slots = cpu_slots
        self.now = now
        self.quotas = quotas
        # uuid -> claim. "held": by a running job or one started this round; "reserved":
        # kept free for a waiting job that is ahead in the queue.
        self.claims: dict[str, _Claim] = {}
        # owner -> ids of the jobs holding their GPUs (one entry per GPU), for quotas.
        self.gpus_held: dict[str, list[int]] = {}
        self.cpu_users: list[int] = []  # running CPU-only jobs and those started now
        self.cpu_head: int | None = None  # the first CPU-only job told to wait
        self.cpu_line = 0  # CPU-only jobs waiting in line, the head included
        self.version = 0  # changes to claims and gpus_held so far
        self.blocked: dict[_Shape, Text | None] = {}  # None: waiting for GPUs
        self.starts: list[Start] = []
        self.last_start: Start | None = None
        self.last_reason: Reason | None = None
        self._matching: dict[str, list[Gpu]] = {}
        self._any_of: dict[GpuRequest, list[Gpu]] = {}
        self._infeasible: dict[GpuRequest, str | None] = {}
        self._memo: dict[tuple[object, ...], Reason] = {}
        for job in running:
            owner = job.owner or owners.get(job.id, "")
            # Anything a running job lists is held, whatever its request says: handing a
            # GPU to two jobs is the one mistake the scheduler must never make.
            for uuid in job.gpus:
                self.claims[uuid] = ("held", job.id, owner)
            self.gpus_held.setdefault(owner, []).extend([job.id] * len(job.gpus))
            if cpu_only(job.gpu):
                self.cpu_users.append(job.id)

    def copy(self) -> Round:
        """A round in the same state, to step on apart (the GPU indexes and the reasons
        memoized by version are shared: a version means the same state in both)."""
        r = Round.__new__(Round)
        r.__dict__.update(self.__dict__)
        r.claims = dict(self.claims)
        r.gpus_held = {o: list(ids) for o, ids in self.gpus_held.items()}
        r.cpu_users = list(self.cpu_users)
        r.blocked = dict(self.blocked)
        r.starts = list(self.starts)
        return r

    def step(self, job: Job, owner: str) -> bool:
        """Start ``job`` or make it wait; True when every later job of its group (same
        owner, priority and request) will wait too."""
        self.last_start = None
        if job.not_before > self.now:
            # A job in backoff neither starts nor reserves nor blocks the CPU line: it
            # failed recently, and holding resources for it would idle them for nothing.
            self.last_reason = Backoff(job.not_before - self.now, job.attempt + 1, job.retries + 1)
            return False
        allowed: tuple[tuple[str, int], ...] | None = None
        quota = self.quotas.get(owner)
        if quota is not None:
            if quota.max_timeout is not None and job.timeout > quota.max_timeout:
                self.last_reason = Text(
                    f"its timeout ({seconds(job.timeout)}) is longer than {owner}'s "
                    f"max_timeout quota ({seconds(quota.max_timeout)}): cancel it and "
                    "submit it again with a shorter timeout"
                )
                return False
            if quota.max_gpus is not None and not cpu_only(job.gpu):
                assert job.gpu is not None
                held = self.gpus_held.get(owner, [])
                allowed = tuple(
                    (t, n) for t, n in job.gpu.options if len(held) + n <= quota.max_gpus
                )
                if not allowed:
                    # Over quota: it waits, and reserves nothing, or one user's backlog
                    # would keep GPUs idle that others could use.
                    self.last_reason = self._over_quota(job.gpu, owner, quota.max_gpus)
                    return True
                if allowed == job.gpu.options:
                    allowed = None
        if cpu_only(job.gpu):
            return self._cpu(job)
        assert job.gpu is not None
        return self._gpu(job, job.gpu, owner, allowed)

    # -- CPU-only jobs --------------------------------------------------------------

    def _cpu(self, job: Job) -> bool:
        if self.cpu_head is not None:
            # Strict FIFO: a younger CPU job must not slip into a slot that frees up
            # while an older one is waiting for exactly that.
            self.last_reason = CpuBehind(self.cpu_head, self.cpu_line - 1)
        elif len(self.cpu_users) < self.cpu_slots:
            self.cpu_users.append(job.id)
            self._start(Start(job.id, ()))
            return False
        elif self.cpu_slots <= 0:
            self.last_reason = Text(
                "waiting for a CPU slot: this daemon runs no CPU-only jobs (cpu_slots = 0)"
            )
            self.cpu_head = job.id
        else:
            users = id_list(sorted(self.cpu_users))
            jobs = "job" if len(self.cpu_users) == 1 else "jobs"
            self.last_reason = Text(
                f"waiting for a CPU slot: {len(self.cpu_users)} of "
                f"{self.cpu_slots} in use ({jobs} {users})"
            )
            self.cpu_head = job.id
        self.cpu_line += 1
        return True

    # -- GPU jobs -------------------------------------------------------------------

    def _gpu(
        self, job: Job, request: GpuRequest, owner: str, allowed: tuple[tuple[str, int], ...] | None
    ) -> bool:
        shape: _Shape = (request, owner if owner in self.quotas else None)
        if shape in self.blocked:
            blocked = self.blocked[shape]
            self.last_reason = blocked or self._gpu_reason(request, owner, allowed)
            return True
        problem = self._infeasible_here(request)
        if problem is not None:
            # It can never fit, so it reserves nothing: holding GPUs for a job that can
            # never use them would only idle them.
            self.blocked[shape] = self.last_reason = Text(problem)
            return True
        options = request.options if allowed is None else allowed
        for gpu_type, count in options:
            candidates = [g for g in self._matches(gpu_type) if self._free(g)]
            if len(candidates) >= count:
                chosen = candidates[:count]  # lowest indices: deterministic, easy to read
                for g in chosen:
                    self.claims[g.uuid] = ("held", job.id, owner)
                self.gpus_held.setdefault(owner, []).extend([job.id] * count)
                self.version += 1
                self._start(Start(job.id, tuple(g.uuid for g in chosen)))
                return False
        # It must wait. Keep the free GPUs of its first option that can ever fit, so that
        # jobs behind it cannot take them one by one and starve it; GPUs it cannot use stay
        # open to them. Only the first such option: reserving for every fallback would
        # lock up far more of the box than the job will ever use.
        for gpu_type, count in options:
            if len(self._matches(gpu_type)) >= count:
                keep = [g for g in self._matches(gpu_type) if self._free(g)][:count]
                for g in keep:
                    self.claims[g.uuid] = ("reserved", job.id, owner)
                self.version += bool(keep)
                break
        self.blocked[shape] = None
        self.last_reason = self._gpu_reason(request, owner, allowed)
        return True

    def _start(self, start: Start) -> None:
        self.starts.append(start)
        self.last_start = start
        self.last_reason = None

    def _gpu_reason(
        self, request: GpuRequest, owner: str, allowed: tuple[tuple[str, int], ...] | None
    ) -> Reason:
        """For every GPU the job could use, why it cannot have it now, in groups of GPUs
        in the same situation, listed in the order of their lowest index."""
        memo = (request, owner if allowed is not None else None, allowed, self.version)
        hit = self._memo.get(memo)
        if hit is not None:
            return hit
        groups: dict[tuple[str, int], list[Gpu]] = {}
        owner_of: dict[int, str] = {}
        for g in self._any_of_request(request):
            claim = self.claims.get(g.uuid)
            key: tuple[str, int]
            if claim is not None and claim[0] == "held":
                key = ("held", claim[1])
                owner_of[claim[1]] = claim[2]
            elif g.foreign_pids:
                key = ("foreign", 0)
            elif claim is not None:
                # Reserved; for the job it is reserved for, "free and kept for this job".
                key = ("reserved", claim[1])
                owner_of[claim[1]] = claim[2]
            else:
                key = ("free", 0)
            groups.setdefault(key, []).append(g)
        parts = tuple(
            GpuPart(
                kind,
                other,
                owner_of.get(other, ""),
                tuple(g.index for g in members),
                tuple(sorted({p for g in members for p in g.foreign_pids})),
            )
            for (kind, other), members in groups.items()
        )
        never = tuple(f"{n} x {t}" for t, n in request.options if len(self._matches(t)) < n)
        over = (
            ()
            if allowed is None
            else tuple(f"{n} x {t}" for t, n in request.options if (t, n) not in allowed)
        )
        reason = self._memo[memo] = GpuWait(request, parts, never, over, owner)
        return reason

    def _over_quota(self, request: GpuRequest, owner: str, max_gpus: int) -> Reason:
        memo = ("quota", request, owner, self.version)
        hit = self._memo.get(memo)
        if hit is not None:
            return hit
        if min(n for _, n in request.options) > max_gpus:
            reason = Text(
                f"it asks for {request}, more than {owner}'s GPU quota of "
                f"{gpus_word(max_gpus)}: ask an admin to raise it, or cancel it"
            )
        else:
            held = self.gpus_held.get(owner, [])
            holders = sorted(set(held))
            jobs = "job" if len(holders) == 1 else "jobs"
            reason = Text(
                f"{owner}'s GPU quota is in use: {len(held)} of "
                f"{gpus_word(max_gpus)} held by {jobs} {id_list(holders)}"
            )
        self._memo[memo] = reason
        return reason

    # -- the GPUs, indexed once per round ------------------------------------------------

    def _free(self, gpu: Gpu) -> bool:
        # A GPU with processes gpud did not start is somebody else's: never hand it out,
        # even though no job of ours holds it.
        return gpu.uuid not in self.claims and not gpu.foreign_pids

    def _matches(self, gpu_type: str) -> list[Gpu]:
        m = self._matching.get(gpu_type)
        if m is None:
            m = self._matching[gpu_type] = [g for g in self.box if g.matches(gpu_type)]
        return m

    def _any_of_request(self, request: GpuRequest) -> list[Gpu]:
        m = self._any_of.get(request)
        if m is None:
            m = self._any_of[request] = [
                g for g in self.box if any(g.matches(t) for t, _ in request.options)
            ]
        return m

    def _infeasible_here(self, request: GpuRequest) -> str | None:
        if request not in self._infeasible:
            self._infeasible[request] = infeasible(request, self.box)
        return self._infeasible[request]
