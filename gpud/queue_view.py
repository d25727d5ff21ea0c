"""The queue as readers see it: one job's wait, or a page in scheduling order (#12).

The daemon keeps the last round's :class:`gpud.scheduler.Waits` and the live
:class:`gpud.pending.PendingIndex`. A page of ``/v1/queue`` walks the round's order
lazily, only as far as the page goes, leaving out jobs that left the queue since; after
it come the queued jobs that round gave no wait (queued since it, or started by it but
still queued because the start failed), by priority then id, as they always did. Its
``total`` is the index's count. So a page costs O((offset + limit) · log groups), not
O(queued), and one job's wait O(groups · log queued) (:mod:`gpud.sched_read`).

Before the first round, or while the disk is full, the waits are a plain mapping made
over the whole queue anyway; then a page is the whole queue's smallest, as before.

Pure: no clock, no I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from gpud.domain import Job, Wait
from gpud.pending import PendingIndex
from gpud.scheduler import Waits

__all__ = ["page", "wait_of"]

Shown = Mapping[int, Wait] | Waits


def wait_of(waits: Shown, pending: PendingIndex, job_id: int) -> Wait | None:
    """Why a queued job waits and its position, as of the last round; None if it is not
    queued, or has not been through a round yet."""
    job = pending.get(job_id)
    if job is None:
        return None
    if isinstance(waits, Waits):
        return waits.of(job)
    return waits.get(job_id)


def page(waits: Shown, pending: PendingIndex, offset: int,
         limit: int) -> tuple[list[tuple[Job, Wait | None]], int]:
    """Queued jobs ``offset`` to ``offset + limit`` in scheduling order, each with its
    wait, and how many are queued."""
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
    tail = sorted((j for i in maybe if (j := pending.get(i)) is not None
                   and waits.of(j) is None), key=lambda j: (-j.priority, j.id))
    walked = total - len(tail)
    out: list[tuple[Job, Wait | None]] = []
    if offset < walked:
        n = 0
        for item in waits.order():
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
    out += [(j, None) for j in tail[start:start + limit - len(out)]]
    return out, total
