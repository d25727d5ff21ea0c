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

import time
from collections.abc import Callable
from typing import Any

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response

from gpud.api_params import MAX_ID, Param
from gpud.daemon.port import JobService
from gpud.domain import FINAL
from gpud.http_common import ApiError, job_info
from gpud.http_common import json_response as _json
from gpud.http_common import path_job_id as _job_id
from gpud.http_common import principal as _principal
from gpud.http_common import query_param as _param
from gpud_client.jobdir import read_status
from gpud_client.models import (
    EventInfo,
    EventList,
    GpuHistory,
    GpuSeries,
    JobInfo,
    JobOutcome,
    QueuePage,
)

__all__ = ["OTHERS_JOB", "WATCH_DOC", "others_view", "watch_routes"]

MAX_EVENTS = 1000

# The query parameters of these routes, with the ranges enforced (and documented).
QUEUE_OFFSET = Param("offset", "integer", "queued jobs to skip", 0, 2**31, 0)
QUEUE_LIMIT = Param("limit", "integer", "page size", 1, 1000, 50)
AFTER = Param(
    "after",
    "integer",
    "only events with a higher id: the cursor of the previous answer",
    0,
    MAX_ID,
    0,
)
EVENTS_LIMIT = Param("limit", "integer", "events at most", 1, MAX_EVENTS, 100)
EVENTS_JOB = Param("job_id", "integer", "only this job's events", 1, MAX_ID)
HISTORY_SINCE = Param(
    "since", "number", "only readings taken after this Unix time (default: all kept)", 0.0, 1e12
)

#: (method, path, summary, request model, response model, query parameters), as in
#: gpud.api's table, which appends these.
WATCH_DOC: list[tuple[str, str, str, type | None, type | None, tuple[Param, ...]]] = [
    (
        "get",
        "/queue",
        "Queued jobs in scheduling order (others' without their private fields)",
        None,
        QueuePage,
        (QUEUE_OFFSET, QUEUE_LIMIT),
    ),
    (
        "get",
        "/events",
        "The ledger's event log after a cursor",
        None,
        EventList,
        (AFTER, EVENTS_LIMIT, EVENTS_JOB),
    ),
    (
        "get",
        "/gpus/history",
        "Recent utilisation and memory readings of every GPU",
        None,
        GpuHistory,
        (HISTORY_SINCE,),
    ),
    (
        "get",
        "/jobs/{job_id}/outcome",
        "How a finished job's function ended, with its traceback",
        None,
        JobOutcome,
        (),
    ),
]


#: What another user's queued job is called in ``/v1/queue``.
OTHERS_JOB = "another user's job"


def others_view(info: JobInfo) -> JobInfo:
    """Another user's job as the queue shows it: where it stands and what it asks for
    (owner, GPUs, priority, timeout, times, position and why it waits, whose reason names
    only job ids and owners), without what is private to its owner (docs/architecture.md:
    names, arguments, logs and results; here also its Python and its path, image, limits
    and errors)."""
    return msgspec.structs.replace(
        info,
        name=OTHERS_JOB,
        python="",
        python_path=None,
        python_prefix=None,
        image=None,
        memory=None,
        cpu=None,
        keep_warm=0.0,
        snapshot=False,
        error=None,
        exit_code=None,
        has_result=False,
        batch_id=None,
        start_kind=None,
        startup=None,
        wall_seconds=0.0,
        gpu_seconds=0.0,
        private=True,
    )


def watch_routes(daemon: JobService) -> list[tuple[str, str, Callable[[Request], Any]]]:
    from gpud.auth import check_job_access

    async def queue(request: Request) -> Response:
        offset = _param(request, QUEUE_OFFSET)
        limit = _param(request, QUEUE_LIMIT)
        # A page from a queue of 100,000 without looking at the rest of it (#12).
        page, total = daemon.queue_page(offset, limit)
        # Everyone sees the whole queue, so that positions add up; others' jobs in it
        # without their private fields.
        who = _principal(request)
        infos = [job_info(daemon, j, w) for j, w in page]
        infos = [i if who.admin or i.owner == who.name else others_view(i) for i in infos]
        return _json(QueuePage(jobs=infos, total=total, offset=offset))

    async def events(request: Request) -> Response:
        after = _param(request, AFTER)
        limit = _param(request, EVENTS_LIMIT)
        job_id = _param(request, EVENTS_JOB)
        # Users follow their own jobs' events; admins everyone's.
        who = _principal(request)
        if job_id is not None:
            check_job_access(who, await daemon.get(job_id), "follow the events of")
        owner = None if who.admin else who.name
        evs, latest = await daemon.events_page(after, limit, job_id, owner)
        return _json(
            EventList(
                events=[
                    EventInfo(
                        id=e.id,
                        job_id=e.job_id,
                        at=e.at,
                        from_state=e.from_state.value if e.from_state else None,
                        to_state=e.to_state.value,
                        reason=e.reason,
                    )
                    for e in evs
                ],
                cursor=evs[-1].id if evs else after,
                latest=latest,
            )
        )

    async def gpu_history(request: Request) -> Response:
        since = _param(request, HISTORY_SINCE)
        hist = daemon.gpu_history
        series = [
            GpuSeries(
                index=g.index,
                uuid=g.uuid,
                memory_total=g.memory_total,
                at=[s.at for s in g.samples],
                utilization=[s.utilization for s in g.samples],
                memory_used=[s.memory_used for s in g.samples],
            )
            for g in hist.since(since, time.time())
        ]
        return _json(GpuHistory(interval=hist.interval, window=hist.window, gpus=series))

    async def outcome(request: Request) -> Response:
        job = await daemon.get(_job_id(request))
        check_job_access(_principal(request), job, "see the outcome of")
        if job.state not in FINAL:
            raise ApiError(
                409,
                "not_finished",
                f"job {job.id} is {job.state.value}; its outcome exists once it is final",
            )
        jobdir = daemon.config.jobs_dir / str(job.id)
        try:
            status = await trio.to_thread.run_sync(read_status, jobdir)
        except (OSError, ValueError):
            status = None  # not the worker's: the job planted something there
        if status is None:
            raise ApiError(
                404,
                "no_outcome",
                f"job {job.id} ended {job.state.value} before "
                f"its function returned or raised: {job.error or job.state.value}",
            )
        return _json(
            JobOutcome(
                job_id=job.id,
                state=job.state.value,
                ok=status.ok,
                type=status.type,
                message=status.message,
                traceback=status.traceback,
                python=status.python,
            )
        )

    return [
        ("GET", "/queue", queue),
        ("GET", "/events", events),
        ("GET", "/gpus/history", gpu_history),
        ("GET", "/jobs/{job_id}/outcome", outcome),
    ]
