"""The queue as readers see it: one job's wait, or a page in scheduling order (#12).

The daemon keeps the last round's :class:`gpud.scheduler.Waits` and the live
:class:`gpud.pending.PendingIndex`. A page of ``/v1/queue`` walks the round's order
lazily, only as far as the page goes, leaving out jobs that left the queue since; after
it come the queued jobs that round gave no wait (queued since it, or started by it but
still queued because the start failed), by priority then id, as they always did. Its
``total`` is the index's count. One job's wait costs O(groups · log queued)
(:mod:`gpud.sched_read`).

A deep page does not walk to its offset (that was ~0.27 s at offset 50,000): it jumps.
The rank of a key in the walk (the jobs shown before it) is counted per group: the
round's snapshot of the group is bisected, the live index counts how many of the group's
jobs are still queued before that point (:meth:`PendingIndex.count_before`), less the
jobs queued since and those the round started. A selection over the groups (a weighted
median of their middles as the pivot, each step dropping a quarter of what is left)
then finds a key at most ``NARROW`` jobs before the page: O(groups · log² queued) and
a short walk, whatever the offset. The property test checks it against the walk.

Before the first round, or while the disk is full, the waits are a plain mapping made
over the whole queue anyway; then a page is the whole queue's smallest, as before.

Pure: no clock, no I/O.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections.abc import Mapping

from gpud.domain import Job, Wait
from gpud.pending import PendingIndex
from gpud.sched_read import Key
from gpud.scheduler import Waits

__all__ = ["NARROW", "WALK_UNDER", "page", "wait_of"]

Shown = Mapping[int, Wait] | Waits
#: A page at an offset under this is walked from the head of the queue; a deeper one
#: jumps to at most NARROW jobs before its offset, and walks from there.
WALK_UNDER = 256
NARROW = 256


def wait_of(waits: Shown, pending: PendingIndex, job_id: int) -> Wait | None:
    """Why a queued job waits and its position, as of the last round; None if it is not
    queued, or has not been through a round yet."""
    job = pending.get(job_id)
    if job is None:
        return None
    if isinstance(waits, Waits):
        return waits.of(job)
    return waits.get(job_id)


def page(
    waits: Shown,
    pending: PendingIndex,
    offset: int,
    limit: int,
    *,
    walk_under: int = WALK_UNDER,
    narrow: int = NARROW,
) -> tuple[list[tuple[Job, Wait | None]], int]:
    """Queued jobs ``offset`` to ``offset + limit`` in scheduling order, each with its
    wait, and how many are queued. (``walk_under`` and ``narrow``: for the tests.)"""
    total = len(pending)
    if not isinstance(waits, Waits):

        def order(job: Job) -> tuple[bool, int, int, int]:
            w = waits.get(job.id)
            return (w is None, w.position if w else 0, -job.priority, job.id)

        jobs = heapq.nsmallest(offset + limit, pending, key=order)[offset:]
        return [(j, waits.get(j.id)) for j in jobs], total
    # Queued jobs this round gave no wait: few (those queued since it, or whose start
    # failed); they go last, in the order the next round will most likely see them.
    maybe = {*pending.added_since(waits.seq), *(i for i in waits.no_wait if i in pending)}
    tail = sorted(
        (j for i in maybe if (j := pending.get(i)) is not None and waits.of(j) is None),
        key=lambda j: (-j.priority, j.id),
    )
    walked = total - len(tail)
    out: list[tuple[Job, Wait | None]] = []
    if offset < walked:
        begin, n = _jump(waits, pending, offset, narrow) if offset >= walk_under else (None, 0)
        for item in waits.order() if begin is None else waits.reader.order_from(begin):
            job_id = item[0].id
            if job_id in waits.no_wait:
                continue
            live = pending.get(job_id)
            if live is None:
                continue  # it left the queue since the round
            if n >= offset:
                out.append((live, waits.wait_at(item)))
                if len(out) == limit:
                    break
            n += 1
    start = max(0, offset - walked)
    out += [(j, None) for j in tail[start : start + limit - len(out)]]
    return out, total


def _jump(waits: Waits, pending: PendingIndex, offset: int, narrow: int) -> tuple[Key | None, int]:
    """A key at most about ``narrow`` plan jobs before the ``offset``-th job the walk
    shows, and how many it shows before that key; (None, 0): walk from the head."""
    reader = waits.reader
    groups = reader.groups
    keys = [reader.key_in(gi) for gi in range(len(groups))]
    # Still queued but not shown: the round's started and warm-assigned jobs.
    hidden: list[Key] = []
    for job_id in waits.no_wait:
        if (j := pending.get(job_id)) is not None and (where := reader.locate(j)) is not None:
            hidden.append(keys[where[0]](groups[where[0]].jobs[where[1]]))
    hidden.sort()
    # Queued since the round, so not in its snapshot: the live counts include them.
    kinds = {(g.owner, g.priority, g.gpu, g.wkey): gi for gi, g in enumerate(groups)}
    newer: dict[int, list[tuple[float, int]]] = {}
    for job_id in pending.added_since(waits.seq):
        j = pending.get(job_id)
        if j is None or reader.locate(j) is not None:
            continue  # gone again, or queued anew in the place the round saw it in
        key = pending.kind(job_id)
        gi = None if key is None else kinds.get(key)
        if gi is not None:
            newer.setdefault(gi, []).append((j.submitted_at, j.id))
    for fifos in newer.values():
        fifos.sort()
    end = (math.inf, 0)
    lo = [0] * len(groups)
    hi = [len(g.jobs) for g in groups]

    def rank(k: Key) -> tuple[int, list[int]]:
        """How many jobs the walk shows before key ``k``, and where ``k`` falls in each
        group (found within the groups' candidate ranges, where it must fall)."""
        n = -bisect_left(hidden, k)
        at = []
        for gi, g in enumerate(groups):
            b = bisect_left(g.jobs, k, lo[gi], hi[gi], key=keys[gi])
            at.append(b)
            if b:
                f = (g.jobs[b].submitted_at, g.jobs[b].id) if b < len(g.jobs) else end
                n += pending.count_before(g, f) - bisect_left(newer.get(gi, ()), f)
        return n, at

    start: Key | None = None
    shown = 0
    # The job at the offset is in the candidates, [lo, hi) of each group: at or after
    # `start` (the walk shows `shown` jobs before it) and before the last pivot too far.
    for _ in range(64 * max(1, len(groups))):  # a bound; each step drops >= 1 candidate
        left = sum(hi) - sum(lo)
        if left <= max(narrow, 2):
            break
        mids = sorted(
            (keys[gi](groups[gi].jobs[(lo[gi] + hi[gi]) // 2]), hi[gi] - lo[gi])
            for gi in range(len(groups))
            if hi[gi] > lo[gi]
        )
        acc, pivot = 0, mids[-1][0]
        for k, weight in mids:  # the weighted median of the groups' middles
            acc += weight
            if 2 * acc >= left:
                pivot = k
                break
        r, at = rank(pivot)
        if r <= offset:  # the job at the offset is at or after the pivot
            start, shown, lo = pivot, r, at
        else:
            hi = at
    return start, shown
