"""Pure preemption and resume rules (#13): which running jobs to suspend for which queued
ones, and which suspended jobs resume on the GPUs that are free. No I/O, no clock: the
daemon's scheduling loop calls these beside :func:`gpud.scheduler.plan`, with ``now``.

The rules, in one paragraph: a queued job that has waited longer than ``preempt_after``
may have running jobs of a strictly lower priority suspended for it, when suspending them
frees enough GPUs of a type it asks for (with those already free) and its owner's GPU
quota leaves room for it. Never a job marked ``preemptible=False``, never a job that was
suspended for the same job before (no cycles: once resumed, it is not preempted again by
it), never more victims for a job that still has one waiting. Victims are the lowest
priority first, then the most recently started (the least running time to stall).
A suspended job that wants to resume (its preemptor started or ended, its owner asked,
or the daemon restarted) resumes on its own GPUs as soon as they are all free, before the
round hands GPUs to queued jobs: ahead of newer work of its priority; while some are
still held, the free ones are kept for it.

Priorities are the jobs' own (``priority=``, set by admins), not the multifactor order:
fair share moves the queue's order, but suspending someone's running job takes a person's
decision, which a priority is.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from gpud.domain import Gpu, Job, JobState, Quota

__all__ = ["Preemption", "Resumes", "choose", "order", "resumes", "waited_since"]


@dataclass(frozen=True, slots=True)
class Preemption:
    victim: int
    for_job: int
    reason: str  # "suspended for job 812 (priority 10 > 0)"


@dataclass(frozen=True, slots=True)
class Resumes:
    resume: list[int]  # suspended jobs to resume now, on their own GPUs, in this order
    #: the free GPUs kept for suspended jobs still waiting for the rest of theirs, as
    #: pseudo-running jobs (the scheduler hands them to nobody else)
    reserved: list[Job]


def waited_since(job: Job) -> float:
    """When a queued job began waiting: its submit, or the end of its retry backoff."""
    return max(job.submitted_at, job.not_before)


def order(job: Job) -> tuple[int, float, int]:
    """The order in which suspended jobs get their GPUs back: higher priority first, then
    older."""
    return (-job.priority, job.submitted_at, job.id)


def resumes(
    suspended: Iterable[Job],
    wanted: Collection[int],
    running: Iterable[Job],
    gpus: Sequence[Gpu],
    *,
    cpu_slots: int,
    held: Iterable[str] = (),
) -> Resumes:
    """Which suspended jobs resume now. ``wanted``: the suspended jobs that want to (the
    rest stay suspended); ``running``: the jobs holding GPUs (and CPU slots) now;
    ``held``: GPUs held otherwise (idle warm workers)."""
    busy: set[str] = {*held}
    cpu_busy = 0
    for j in running:
        busy.update(j.gpus)
        if not j.gpus:
            cpu_busy += 1
    known = {g.uuid for g in gpus if not g.foreign_pids}
    out: list[int] = []
    reserved: list[Job] = []
    for j in sorted((j for j in suspended if j.id in wanted), key=order):
        if not j.gpus:
            if cpu_busy < cpu_slots:
                out.append(j.id)
                cpu_busy += 1
            continue
        free = [u for u in j.gpus if u not in busy and u in known]
        busy.update(free)  # its own, now or later: nobody behind it gets them
        if len(free) == len(j.gpus):
            out.append(j.id)
        elif free:
            # STARTING: held for the plan, never running (no usage, never a victim)
            reserved.append(replace(j, state=JobState.STARTING, gpus=tuple(free)))
    return Resumes(out, reserved)


def choose(
    queued: Iterable[Job],
    running: Iterable[Job],
    gpus: Sequence[Gpu],
    *,
    now: float,
    preempt_after: float | None,
    cpu_slots: int,
    history: Collection[tuple[int, int]] = (),
    waiting_for: Collection[int] = (),
    held: Iterable[str] = (),
    quotas: Mapping[str, Quota] | None = None,
    suspendable: Callable[[Job], bool] = lambda j: True,
) -> list[Preemption]:
    """The running jobs to suspend now, each for one queued job.

    ``queued``: queued jobs that still wait after this round's starts, in the order they
    should be served (any order is safe; the highest priority first is fair);
    ``running``: the jobs holding GPUs or CPU slots (STARTING ones are held, never
    victims); ``history``: (victim, preemptor) pairs seen before; ``waiting_for``:
    preemptors whose victims are still suspended for them; ``held``: GPUs held otherwise
    (idle warm workers, reservations); ``suspendable``: whether the daemon can suspend a
    job (its executor, its GPU state)."""
    if preempt_after is None:
        return []
    quotas = quotas or {}
    running = list(running)
    busy: set[str] = {*held}
    cpu_busy = 0
    by_owner: dict[str, int] = {}
    for j in running:
        busy.update(j.gpus)
        by_owner[j.owner] = by_owner.get(j.owner, 0) + len(j.gpus)
        if not j.gpus:
            cpu_busy += 1
    free = [g for g in gpus if g.uuid not in busy and not g.foreign_pids]
    inventory = {g.uuid: g for g in gpus}
    taken: set[int] = set()  # victims chosen this round
    out: list[Preemption] = []
    for h in queued:
        if h.state is not JobState.QUEUED or h.id in waiting_for or h.not_before > now:
            continue
        if now - waited_since(h) < preempt_after:
            continue
        pool = sorted(
            (
                j
                for j in running
                if j.state is JobState.RUNNING
                and j.preemptible
                and j.priority < h.priority
                and j.id not in taken
                and (j.id, h.id) not in history
                and suspendable(j)
            ),
            key=lambda j: (j.priority, -(j.started_at or 0.0), -j.id),
        )
        victims = _victims(h, pool, free, cpu_slots - cpu_busy, quotas, by_owner, inventory)
        if not victims:
            continue
        for v in victims:
            taken.add(v.id)
            out.append(
                Preemption(
                    v.id, h.id, f"suspended for job {h.id} (priority {h.priority} > {v.priority})"
                )
            )
        # What they free is the preemptor's: a later one in this round does not count it.
        freed = {u for v in victims for u in v.gpus}
        free = [g for g in free if g.uuid not in freed and not _wanted(h, g)]
    return out


def _wanted(h: Job, g: Gpu) -> bool:
    return h.gpu is not None and any(g.matches(t) for t, _ in h.gpu.options)


def _victims(
    h: Job,
    pool: list[Job],
    free: list[Gpu],
    cpu_free: int,
    quotas: Mapping[str, Quota],
    by_owner: Mapping[str, int],
    inventory: Mapping[str, Gpu],
) -> list[Job]:
    """The fewest victims, in the pool's order, that let ``h`` start; [] if none do (or it
    waits for something preemption cannot give it)."""
    if h.gpu is None:
        if cpu_free > 0:
            return []  # it waits for something else
        return [j for j in pool if not j.gpus][:1]
    limit = quotas.get(h.owner, Quota()).max_gpus
    for gtype, count in h.gpu.options:
        if limit is not None and by_owner.get(h.owner, 0) + count > limit:
            continue  # over its quota either way: suspending others would not help
        have = sum(1 for g in free if g.matches(gtype))
        if have >= count:
            return []  # the GPUs are there: it waits for something else
        chosen: list[Job] = []
        for j in pool:
            gain = sum(
                1
                for u in j.gpus
                if (g := inventory.get(u)) is not None and not g.foreign_pids and g.matches(gtype)
            )
            if gain == 0:
                continue
            chosen.append(j)
            have += gain
            if have >= count:
                return chosen
    return []
