"""The endpoints a live view needs (the TUI): cheap to poll every second.

* ``GET /v1/events?after=ID`` - the ledger's append-only event log as a cursor, so a
  client learns *that* something changed with one small request and re-reads only then;
* ``GET /v1/queue`` - queued jobs in scheduling order, a page at a time, from memory;
* ``GET /v1/gpus/history?since=T`` - the GPUs' recent utilisation and memory readings;
* ``GET /v1/jobs/{id}/outcome`` - how a finished job's function ended, traceback included,
  read from the worker's plain-JSON status (so no client needs to unpickle to show it).

Kept apart from :mod:`gpud.api`, which wires them in with the rest; they reuse its
request helpers and error handling.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import Response

from gpud.domain import FINAL, Job, JobState
from gpud.ledger import Event
from gpud.ledger.store import Ledger
from gpud.service import Daemon
from gpud_client.jobdir import read_status
from gpud_client.models import (
    EventInfo,
    EventList,
    GpuHistory,
    GpuSeries,
    JobOutcome,
    QueuePage,
)

__all__ = ["WATCH_DOC", "WATCH_PARAMS", "watch_routes"]

#: (method, path, summary, request model, response model, query parameters), as in
#: gpud.api's table, which appends these.
WATCH_DOC: list[tuple[str, str, str, type | None, type | None, str]] = [
    ("get", "/queue", "Queued jobs in scheduling order", None, QueuePage, "offset,limit"),
    ("get", "/events", "The ledger's event log after a cursor", None, EventList,
     "after,limit,job_id"),
    ("get", "/gpus/history", "Recent utilisation and memory readings of every GPU", None,
     GpuHistory, "since"),
    ("get", "/jobs/{job_id}/outcome", "How a finished job's function ended, with its "
     "traceback", None, JobOutcome, ""),
]

#: Query parameters not in gpud.api's table (it documents ``offset`` and ``limit``).
WATCH_PARAMS = {
    "after": ("integer", "only events with a higher id: the cursor of the previous answer"),
    "job_id": ("integer", "only this job's events"),
    "since": ("number", "only readings taken after this Unix time (default: all kept)"),
}

MAX_EVENTS = 1000


def _events_page(ledger: Ledger, after: int, limit: int, job_id: int | None,
                 owner: str | None) -> tuple[list[Event], int]:
    # One trip to the ledger thread for both, so `latest` is never below the page.
    return (ledger.events_after(after, limit=limit, job_id=job_id, owner=owner),
            ledger.last_event_id())


def _queue_order(daemon: Daemon) -> Callable[[Job], tuple[bool, int, int, int]]:
    def key(job: Job) -> tuple[bool, int, int, int]:
        w = daemon.waits.get(job.id)
        # Jobs submitted since the last scheduling round have no position yet: they go
        # last, in the order the scheduler will see them.
        return (w is None, w.position if w else 0, -job.priority, job.id)
    return key


def watch_routes(daemon: Daemon) -> list[tuple[str, str, Callable[[Request], Any]]]:
    # Imported here, not at the top: gpud.api imports this module to build its table.
    from gpud.api import (
        ApiError,
        _float_param,
        _int_param,
        _job_id,
        _json,
        _principal,
        job_info,
    )
    from gpud.auth import check_job_access

    async def queue(request: Request) -> Response:
        offset = _int_param(request, "offset", 0, 0, 2**31)
        limit = _int_param(request, "limit", 50, 1, 1000)
        pending = [j for j in daemon.active.values() if j.state is JobState.QUEUED]
        # A page from a queue of 100,000 without sorting all of it.
        page = heapq.nsmallest(offset + limit, pending, key=_queue_order(daemon))[offset:]
        return _json(QueuePage(jobs=[job_info(daemon, j) for j in page], total=len(pending),
                               offset=offset))

    async def events(request: Request) -> Response:
        after = _int_param(request, "after", 0, 0, 2**62)
        limit = _int_param(request, "limit", 100, 1, MAX_EVENTS)
        job_id = (_int_param(request, "job_id", 0, 1, 2**62)
                  if request.query_params.get("job_id") else None)
        # Users follow their own jobs' events; admins everyone's.
        who = _principal(request)
        if job_id is not None:
            check_job_access(who, await daemon.get(job_id), "follow the events of")
        owner = None if who.admin else who.name
        evs, latest = await daemon.ledger.call(_events_page, after, limit, job_id, owner)
        return _json(EventList(
            events=[EventInfo(id=e.id, job_id=e.job_id, at=e.at,
                              from_state=e.from_state.value if e.from_state else None,
                              to_state=e.to_state.value, reason=e.reason) for e in evs],
            cursor=evs[-1].id if evs else after, latest=latest,
        ))

    async def gpu_history(request: Request) -> Response:
        since = (_float_param(request, "since", 0.0, 0.0, 1e12)
                 if request.query_params.get("since") else None)
        hist = daemon.gpu_history
        series = [
            GpuSeries(index=g.index, uuid=g.uuid, memory_total=g.memory_total,
                      at=[s.at for s in g.samples],
                      utilization=[s.utilization for s in g.samples],
                      memory_used=[s.memory_used for s in g.samples])
            for g in hist.since(since, time.time())
        ]
        return _json(GpuHistory(interval=hist.interval, window=hist.window, gpus=series))

    async def outcome(request: Request) -> Response:
        job = await daemon.get(_job_id(request))
        check_job_access(_principal(request), job, "see the outcome of")
        if job.state not in FINAL:
            raise ApiError(409, "not_finished", f"job {job.id} is {job.state.value}; its "
                           "outcome exists once it is final")
        jobdir = daemon.config.jobs_dir / str(job.id)
        try:
            status = await trio.to_thread.run_sync(read_status, jobdir)
        except (OSError, ValueError):
            status = None  # not the worker's: the job planted something there
        if status is None:
            raise ApiError(404, "no_outcome", f"job {job.id} ended {job.state.value} before "
                           f"its function returned or raised: {job.error or job.state.value}")
        return _json(JobOutcome(job_id=job.id, state=job.state.value, ok=status.ok,
                                type=status.type, message=status.message,
                                traceback=status.traceback, python=status.python))

    return [
        ("GET", "/queue", queue),
        ("GET", "/events", events),
        ("GET", "/gpus/history", gpu_history),
        ("GET", "/jobs/{job_id}/outcome", outcome),
    ]
