"""The hot-path endpoints of #12: a call in one request, and a batch's results in one.

* ``POST /v1/jobs/run`` - submit one job and follow it on the same connection: an NDJSON
  stream of :class:`~gpud_client.models.JobEvent` (the job, its log, its end with the
  result inline). ``.remote()`` is this one request (it was four: submit, wait, log,
  result);
* ``GET /v1/jobs/{id}/stream`` - the same stream for an existing job (a client whose
  connection dropped picks up here, from a log offset);
* ``GET /v1/batches/{id}`` - a batch's size, limit and counts of its jobs by state;
* ``GET /v1/batches/{id}/results?order=input|completion`` - the results of a batch as its
  jobs end, NDJSON :class:`~gpud_client.models.BatchResult` lines;
* ``POST /v1/batches/{id}/cancel`` - cancel every job of a batch that is not over.

Results are the worker's pickle, passed through as bytes: the daemon never unpickles
them. One of more than :data:`~gpud_client.models.INLINE_RESULT_MAX` bytes is not inlined
(its size is given; the client fetches ``/v1/jobs/{id}/result``). Another user's batch is
404, as if it did not exist.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gpud.api_params import Param, parse_id
from gpud.api_submit import idempotency as _idempotency
from gpud.api_submit import new_jobs as _new_jobs
from gpud.auth import Auth, check_job_access
from gpud.daemon.port import JobService
from gpud.daemon.results import read_file
from gpud.domain import FINAL, Job, JobState
from gpud.http_common import ApiError, job_info
from gpud.http_common import decode_body as _decode
from gpud.http_common import json_response as _json
from gpud.http_common import path_job_id as _job_id
from gpud.http_common import principal as _principal
from gpud.http_common import query_param as _param
from gpud.http_common import read_body as _body
from gpud.ledger.batches import BatchRow
from gpud.storage import require_room
from gpud_client.models import (
    INLINE_RESULT_MAX,
    MAX_BATCH,
    MAX_ID,
    BatchCounts,
    BatchInfo,
    BatchResult,
    JobEvent,
    SubmitRequest,
)

__all__ = ["BATCH_DOC", "batch_routes"]

NDJSON = "application/x-ndjson"

RUN_LOGS = Param("logs", "boolean", "stream the job's output as well (default true)", default=True)
STREAM_OFFSET = Param("offset", "integer", "the log byte offset to start from", 0, 2**62, 0)
ORDER = Param(
    "order",
    "string",
    "input (default): in input order; completion: as the jobs end",
    default="input",
    choices=("input", "completion"),
)
AFTER_INDEX = Param(
    "after",
    "integer",
    "leave out the inputs before this index (a reconnecting reader in input order)",
    0,
    MAX_BATCH,
    0,
)
FOLLOW_FOR = Param(
    "timeout",
    "number",
    "follow for at most this many seconds, then end the "
    "stream early (a reader resumes with /stream or after=; default: until "
    "done)",
    0.0,
    86400.0,
)
WITH_JOBS = Param("jobs", "boolean", "include the jobs' ids in input order", default=False)

#: (method, path, summary, request model, response model, query parameters), as in
#: gpud.api's table, which appends these.
BATCH_DOC: list[tuple[str, str, str, type | None, type | None, tuple[Param, ...]]] = [
    (
        "post",
        "/jobs/run",
        "Submit one job and stream its log and outcome (NDJSON JobEvent "
        "lines: job, log..., end with the result inline)",
        SubmitRequest,
        JobEvent,
        (RUN_LOGS, FOLLOW_FOR),
    ),
    (
        "get",
        "/jobs/{job_id}/stream",
        "Stream a job's log and outcome (NDJSON JobEvent lines)",
        None,
        JobEvent,
        (RUN_LOGS, STREAM_OFFSET, FOLLOW_FOR),
    ),
    (
        "get",
        "/batches/{batch_id}",
        "A batch: size, limit, its jobs' counts by state",
        None,
        BatchInfo,
        (WITH_JOBS,),
    ),
    (
        "get",
        "/batches/{batch_id}/results",
        "A batch's results as its jobs end (NDJSON BatchResult lines)",
        None,
        BatchResult,
        (ORDER, AFTER_INDEX, FOLLOW_FOR),
    ),
    (
        "post",
        "/batches/{batch_id}/cancel",
        "Cancel the batch's jobs that are not over; returns once they are final",
        None,
        BatchInfo,
        (),
    ),
]

#: Jobs whose results are read (one ledger trip, one file-reading thread trip) at a time.
_CHUNK = 128
#: How long a completion-order reader waits on one job before looking at all again.
_RESCAN = 0.05
#: How often a log stream looks for new output while the job runs.
_LOG_POLL = 0.1

_encoder = msgspec.json.Encoder()


def _line(obj: Any) -> bytes:
    return _encoder.encode(obj) + b"\n"


def _until(timeout: float | None) -> float:
    """The trio time a stream with this ``timeout`` parameter ends at (inf: none)."""
    return float("inf") if timeout is None else trio.current_time() + timeout


def _bounded(wait: float, until: float) -> float:
    return max(0.0, min(wait, until - trio.current_time()))


def _read_result(path: Path) -> tuple[bytes | None, int]:
    """(the result file's bytes if small enough to inline, its size); (None, 0) when there
    is none or it is not a regular file (a job may plant anything in its directory)."""
    return read_file(path, INLINE_RESULT_MAX)


def _log_size(path: Path) -> int:
    """The log's size now (a stat, no thread trip): there is nothing to read in a thread
    while it has not grown (#12)."""
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except OSError:
        return 0


def _read_log(path: Path, offset: int, limit: int | None) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        os.lseek(fd, offset, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read() if limit is None else fh.read(limit)
    finally:
        os.close(fd)


def batch_routes(daemon: JobService, auth: Auth) -> list[tuple[str, str, Callable[[Request], Any]]]:
    limit = daemon.config.max_body_bytes

    async def job_stream(job: Job, logs: bool, offset: int, until: float) -> AsyncIterator[bytes]:
        yield _line(JobEvent(kind="job", job=job_info(daemon, job)))
        path, pos = daemon.log_path(job.id), offset
        while True:
            job = await daemon.get(job.id)
            if job.state in FINAL:
                break
            if trio.current_time() >= until:
                return  # the caller's timeout: no `end`, it follows again with /stream
            if logs and _log_size(path) > pos:
                data = await trio.to_thread.run_sync(_read_log, path, pos, 1 << 20)
                if data:
                    pos += len(data)
                    yield _line(JobEvent(kind="log", data=data))
                    continue
            # Returns at once when the job ends; with a log to follow, looks again soon.
            await daemon.wait_final(job.id, _bounded(_LOG_POLL if logs else 30.0, until))
        tail = (
            await trio.to_thread.run_sync(_read_log, path, pos, None)
            if logs and _log_size(path) > pos
            else b""
        )
        [(result, size)] = await daemon.read_results([job], INLINE_RESULT_MAX)
        for i in range(0, len(tail), 1 << 20):
            yield _line(JobEvent(kind="log", data=tail[i : i + (1 << 20)]))
        yield _line(
            JobEvent(kind="end", job=job_info(daemon, job), result=result, result_size=size)
        )

    async def run(request: Request) -> Response:
        logs = _param(request, RUN_LOGS)
        until = _until(_param(request, FOLLOW_FOR))
        body = await _body(request, limit)
        req = _decode(body, SubmitRequest)
        key = await _idempotency(request, req)
        # No read of the key before the submit (#12: a trip to the ledger's read thread on
        # every call): the submit checks it under the write lock and, for a retry, returns
        # the job the first try made. Only a submit refused here (a quota its own first
        # try now fills, a full disk) looks for a first try, and follows it if found.
        try:
            jobs = await _new_jobs(daemon, auth, request, req, [req.args])
            require_room(daemon.config.data_dir, len(body))
        except Exception:
            if key is None or (seen := await daemon.replay(key)) is None:
                raise
            job = seen[1][0]  # a retry: follow the job the first try made
        else:
            _, made = await daemon.submit(jobs, req.function, idempotency=key)
            job = made[0]
        return StreamingResponse(
            job_stream(job, logs, 0, until), status_code=201, media_type=NDJSON
        )

    async def stream(request: Request) -> Response:
        logs = _param(request, RUN_LOGS)
        offset = _param(request, STREAM_OFFSET)
        until = _until(_param(request, FOLLOW_FOR))
        job = await daemon.get(_job_id(request))
        check_job_access(_principal(request), job, "follow")
        return StreamingResponse(job_stream(job, logs, offset, until), media_type=NDJSON)

    async def own_batch(request: Request) -> BatchRow:
        raw = request.path_params["batch_id"]
        batch_id = parse_id(raw)
        row = None if batch_id is None else await daemon.batch_row(batch_id)
        who = _principal(request)
        # Another user's batch is as good as missing: its existence is theirs to know.
        if row is None or not (who.admin or row.owner == who.name):
            raise ApiError(
                404,
                "not_found",
                f"no batch {raw[:40]!r} of yours: batch ids are "
                f"whole numbers from 1 to {MAX_ID}, as .map/.spawn_map returned",
            )
        return row

    async def info(row: BatchRow, with_jobs: bool) -> BatchInfo:
        states = await daemon.batch_states(row.id)
        ids = await daemon.batch_job_ids(row.id) if with_jobs else None
        counts = BatchCounts(**{s.value: states.get(s.value, 0) for s in JobState})
        return BatchInfo(
            id=row.id,
            owner=row.owner,
            name=row.name,
            size=row.size,
            submitted_at=row.submitted_at,
            max_concurrency=row.max_concurrency,
            counts=counts,
            done=sum(n for s, n in states.items() if JobState(s) in FINAL),
            job_ids=ids,
        )

    async def get_batch(request: Request) -> Response:
        with_jobs = _param(request, WITH_JOBS)
        return _json(await info(await own_batch(request), with_jobs))

    def over(job_id: int) -> bool:
        # The daemon holds every job that is not final (the ledger's queued, starting and
        # running jobs) in memory, so one that it does not hold is over.
        return daemon.active_job(job_id) is None

    async def results_of(
        ids: list[int], order: str, after: int, until: float
    ) -> AsyncIterator[bytes]:
        index = {jid: i for i, jid in enumerate(ids)}
        pos = after  # input order: the next index to send
        waiting = [] if order == "input" else list(ids)  # completion order: not sent yet
        while (pos < len(ids)) if order == "input" else waiting:
            if trio.current_time() >= until:
                return  # the caller's timeout: it reads on with after= (or skips by index)
            ready: list[int] = []
            if order == "input":
                while pos < len(ids) and len(ready) < _CHUNK and over(ids[pos]):
                    ready.append(ids[pos])
                    pos += 1
                if not ready:
                    await daemon.wait_final(ids[pos], _bounded(30.0, until))
                    continue
            else:
                rest: list[int] = []
                for jid in waiting:
                    (ready if over(jid) and len(ready) < _CHUNK else rest).append(jid)
                waiting = rest
                if not ready:
                    await daemon.wait_final(waiting[0], _bounded(_RESCAN, until))
                    continue
            jobs = await daemon.batch_jobs(ready)
            found = await daemon.read_results(jobs, INLINE_RESULT_MAX)
            yield b"".join(
                _line(
                    BatchResult(
                        index=index[j.id], job=job_info(daemon, j), result=r, result_size=size
                    )
                )
                for j, (r, size) in zip(jobs, found, strict=True)
            )

    async def results(request: Request) -> Response:
        order = _param(request, ORDER)
        after = _param(request, AFTER_INDEX)
        until = _until(_param(request, FOLLOW_FOR))
        row = await own_batch(request)
        ids = await daemon.batch_job_ids(row.id)
        return StreamingResponse(results_of(ids, order, after, until), media_type=NDJSON)

    async def cancel_batch(request: Request) -> Response:
        row = await own_batch(request)
        ids = await daemon.batch_job_ids(row.id)
        live = [j for i in ids if (j := daemon.active_job(i)) is not None]
        async with trio.open_nursery() as nursery:
            # Running jobs stop in parallel (each may take its grace period); queued ones
            # are cancelled one by one meanwhile, newest first, so that the scheduler is
            # not handed the rest of the batch while this goes on.
            for j in live:
                if j.state is not JobState.QUEUED:
                    nursery.start_soon(daemon.cancel, j.id)
            for j in reversed(live):
                if j.state is JobState.QUEUED:
                    await daemon.cancel(j.id)
        return _json(await info(row, False))

    return [
        ("POST", "/jobs/run", run),
        ("GET", "/jobs/{job_id}/stream", stream),
        ("GET", "/batches/{batch_id}", get_batch),
        ("GET", "/batches/{batch_id}/results", results),
        ("POST", "/batches/{batch_id}/cancel", cancel_batch),
    ]
