"""Batch concurrency limits (#12, like Slurm's ``%N`` on an array job).

A ``.map`` may say ``max_concurrency=N``: at most N of its jobs are starting or running at
once. The scheduling round hands :func:`admit` its queued and its running jobs, and only
the queued jobs it returns are considered for a start; the others wait for one of their
batch to end (which starts the next round).

:func:`limit_concurrency` is the pure rule; :class:`BatchLimits` keeps each live batch's
limit in memory, reading the ledger only for a batch it has not seen (after a restart, or
the first round after its submit), and forgetting batches that have no active job left.
The jobs it held back in the last round wait with a reason of their own (:meth:`wait_of`):
the round never sees them, so it gives them none.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from gpud.domain import Job, Wait
from gpud.ledger.batches import batch_limits
from gpud.ledger.thread import LedgerThread
from gpud.reasons import BatchLimit

__all__ = ["BatchLimits", "limit_concurrency"]


def limit_concurrency(
    pending: Sequence[Job], running: Iterable[Job], limits: Mapping[int, int | None]
) -> list[Job]:
    """The queued jobs that may be considered for a start: all of them, except that of a
    batch with a limit N and R jobs starting or running, only its N - R oldest.

    Within a batch every job has the same owner, priority and request, so the oldest
    (lowest id) are the ones the scheduler would pick first anyway: FIFO is kept. The
    order of ``pending`` is kept too."""
    limited: dict[int, list[Job]] = defaultdict(list)
    for j in pending:
        if j.batch_id is not None and limits.get(j.batch_id) is not None:
            limited[j.batch_id].append(j)
    if not limited:
        return list(pending)
    busy = Counter(j.batch_id for j in running if j.batch_id in limited)
    allowed: set[int] = set()
    for batch_id, jobs in limited.items():
        room = (limits[batch_id] or 0) - busy[batch_id]
        if room > 0:
            allowed.update(j.id for j in heapq.nsmallest(room, jobs, key=lambda j: j.id))
    return [j for j in pending if j.batch_id not in limited or j.id in allowed]


class BatchLimits:
    """The limits of the batches with active jobs, cached from the ledger."""

    def __init__(self, ledger: LedgerThread) -> None:
        self._ledger = ledger
        self._limits: dict[int, int | None] = {}
        #: the batches with a limit that had queued jobs at the last admit, or were
        #: submitted since; until the first admit (after a restart) unknown: look.
        self._limited: set[int] = set()
        self._seeded = False
        #: the jobs the last admit held back: job id -> (its reason, its place among them)
        self._held: dict[int, tuple[BatchLimit, int]] = {}

    def any_limited(self) -> bool:
        """Must the round filter its queue? Not while no limited batch has queued jobs,
        which keeps a round's cost independent of the queue's length (#12)."""
        return not self._seeded or bool(self._limited)

    def note(self, batch_id: int, limit: int) -> None:
        """A batch with a limit was just submitted."""
        self._limits[batch_id] = limit
        self._limited.add(batch_id)

    async def admit(self, pending: Sequence[Job], running: Sequence[Job]) -> list[Job]:
        """:func:`limit_concurrency` with the limits of every batch in the round."""
        live = {j.batch_id for j in pending if j.batch_id is not None}
        unknown = [b for b in live if b not in self._limits]
        if unknown:
            self._limits.update(await self._ledger.call(batch_limits, sorted(unknown)))
        if len(self._limits) > 2 * len(live) + 64:
            # Batches whose jobs all ended: forget them (a retried job brings its batch
            # back, read again then).
            self._limits = {b: n for b, n in self._limits.items() if b in live}
        self._seeded = True
        self._limited = {b for b in live if self._limits.get(b) is not None}
        if not self._limited:
            self._held = {}
            return list(pending)
        admitted = limit_concurrency(pending, running, self._limits)
        self._held = held_back(pending, admitted, self._limits)
        return admitted

    async def limits_of(self, batch_ids: Iterable[int]) -> dict[int, int | None]:
        """Each batch's limit (cached; the ledger read only for batches not seen yet), for
        an executor that enforces them itself (a Slurm array's ``%N``, #15)."""
        ids = set(batch_ids)
        unknown = sorted(b for b in ids if b not in self._limits)
        if unknown:
            self._limits.update(await self._ledger.call(batch_limits, unknown))
        return {b: self._limits.get(b) for b in ids}

    def wait_of(self, job_id: int, queued: int) -> Wait | None:
        """The wait of a queued job the last round's admit held back (else None); it
        comes after the ``queued`` jobs the round placed (oldest batch job first)."""
        held = self._held.get(job_id)
        if held is None:
            return None
        why, place = held
        return Wait(job_id, why, queued - len(self._held) + place)


def held_back(
    pending: Sequence[Job], admitted: Sequence[Job], limits: Mapping[int, int | None]
) -> dict[int, tuple[BatchLimit, int]]:
    """The jobs of ``pending`` not ``admitted``, each with its reason (one object per
    batch) and its 1-based place among them, oldest first."""
    kept = {j.id for j in admitted}
    reasons: dict[int, BatchLimit] = {}
    out: dict[int, tuple[BatchLimit, int]] = {}
    for j in sorted((j for j in pending if j.id not in kept), key=lambda j: j.id):
        assert j.batch_id is not None
        why = reasons.get(j.batch_id)
        if why is None:
            why = reasons[j.batch_id] = BatchLimit(j.batch_id, limits[j.batch_id] or 0)
        out[j.id] = (why, len(out) + 1)
    return out
