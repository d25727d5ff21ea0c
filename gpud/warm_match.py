"""Which queued jobs run in an idle warm worker: part of the pure scheduling decision.

This was ``Daemon._match_warm``, a second scheduler in the shell that sorted the whole
queue again every round. Here it walks the same lazily merged order as the round
(:func:`gpud.scheduler.plan`) and stops as soon as no idle worker can change hands.

The rules: idle workers go to queued jobs of their key (same code, image, request, owner,
environment), in scheduling order. A ready GPU job that cannot use one claims the idle
workers on GPUs of its type, so a stream of warm calls cannot starve it: those workers
become evictable (a start on their GPUs ends them). The other idle workers keep their GPUs
this round, as pseudo running jobs owned by their user, so they count against that user's
GPU quota. A job over its owner's max_timeout quota is left to the round, which says so.
A ready CPU job that no idle worker takes shuts warm matching for the CPU jobs after it
(given CPU slots): handing a job to an idle worker is not checked against the slots, so a
sweep's workers, refilled first every round, kept the slots full (often over), and another
user's cold job ahead of them in fair-share order waited for the whole sweep (#12). Now the
sweep's running calls end, and the slot they free is its. And a CPU job goes to an idle
worker only while a CPU slot is free (``cpu_running`` and those matched before it count):
without that check a `.map` on 2 slots ran 50 calls at once in as many workers, each
round handing a job to every idle one, and the box's CPUs, the daemon's included, went to
that, while other users' requests waited (#12, docs/performance.md).

Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Protocol

from gpud.domain import Gpu, IdleWorker, Job, JobState, Quota, served
from gpud.pending import Group

__all__ = ["match_warm"]


class Order(Protocol):
    """Queued jobs in scheduling order, by group (see gpud.scheduler._Merge)."""

    groups: Sequence[Group]

    def pop(self) -> tuple[Job, int, object] | None: ...

    def drop(self, gi: int) -> None: ...


def match_warm(
    order: Order,
    idle: Sequence[IdleWorker],
    gpus: Sequence[Gpu],
    *,
    now: float,
    quotas: Mapping[str, Quota],
    cpu_slots: int = 0,
    cpu_running: int = 0,
) -> tuple[dict[int, int], list[Job], list[int]]:
    """(job id -> worker id, in matching order; the idle workers keeping their GPUs, as
    pseudo running jobs; the ids of the idle workers a start may evict). ``cpu_running``:
    the CPU slots in use now."""
    if not idle:
        return {}, [], []
    index = {g.uuid: g for g in gpus}
    free_by_key: dict[Hashable, list[IdleWorker]] = {}
    for w in idle:
        free_by_key.setdefault(w.key, []).append(w)
    assigned: dict[int, int] = {}
    taken: set[int] = set()  # workers assigned to a job
    claimed: set[int] = set()  # workers a job ahead may evict
    unsettled = len(idle)  # neither taken nor claimed: either can still happen to them
    cpu_shut = False  # a cold CPU job waits ahead: later CPU jobs get no idle worker
    cpu_free = cpu_slots - cpu_running  # CPU slots left for CPU jobs given a worker
    while unsettled and (item := order.pop()) is not None:
        job, gi, _ = item
        if job.not_before > now:
            continue
        group = order.groups[gi]
        quota = quotas.get(job.owner)
        over = (
            quota is not None and quota.max_timeout is not None and job.timeout > quota.max_timeout
        )
        no_slot = job.gpu is None and cpu_slots > 0 and (cpu_shut or cpu_free <= 0)
        if served(job) and not over and not no_slot:
            mine = next(
                (
                    w
                    for w in free_by_key.get(group.wkey, ())
                    if w.id not in claimed and w.id not in taken
                ),
                None,
            )
            if mine is not None:
                assigned[job.id] = mine.id
                taken.add(mine.id)
                unsettled -= 1
                if job.gpu is None:
                    cpu_free -= 1
                continue
        if job.gpu is None and not over and cpu_slots > 0 and not cpu_shut:
            cpu_shut = True
            unsettled -= sum(1 for w in idle if not w.gpus and w.id not in taken)
        if job.gpu is not None:
            options = job.gpu.options
            for w in idle:
                if (
                    w.gpus
                    and w.id not in taken
                    and w.id not in claimed
                    and any(index[u].matches(t) for u in w.gpus if u in index for t, _ in options)
                ):
                    claimed.add(w.id)
                    unsettled -= 1
        if not over or group.wkey is None:
            # Every later job of the group would claim the same workers again, and (its
            # key's workers all being taken or claimed now) could not be given one.
            order.drop(gi)
    held: list[Job] = []
    evictable: list[int] = []
    for w in idle:
        if w.id in taken or not w.gpus:
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
    return assigned, held, evictable
