"""The HTTP API (ASGI, Starlette on trio via anyio). Bodies are msgspec Structs.

Every error is JSON ``{"error": code, "detail": people-talk}`` with a 4xx that fits:
400 malformed JSON, 401 not authenticated, 403 not allowed, 404 no such job/route, 409 not
finished, 413 body too large, 422 a well-formed request the daemon cannot accept. A 500
would be a bug; it is still JSON and the traceback goes to the daemon's log, never to the
client.

Every request but ``/v1/health`` and ``/openapi.json`` is authenticated first
(:mod:`gpud.auth`), and every 401 and 403 is logged.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import msgspec
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gpud import __version__
from gpud.accounting import BY, Line, report
from gpud.api_admin import ADMIN_DOC, admin_routes
from gpud.api_batch import BATCH_DOC, batch_routes
from gpud.api_images import IMAGE_DOC, image_routes
from gpud.api_metrics import metrics_endpoint
from gpud.api_params import Param
from gpud.api_snapshots import SNAPSHOT_DOC, snapshot_routes
from gpud.api_state import STATE_DOC, state_routes
from gpud.api_submit import idempotency as _idempotency
from gpud.api_submit import new_jobs as _new_jobs
from gpud.api_submit import replayed as _replayed
from gpud.api_submit import storage_error as _storage_error
from gpud.api_tty import tty_routes
from gpud.api_watch import WATCH_DOC, watch_routes
from gpud.auth import (
    Auth,
    Forbidden,
    QuotaExceeded,
    Unauthenticated,
    check_job_access,
)
from gpud.daemon.hotcache import gc_quiet
from gpud.daemon.port import JobService
from gpud.daemon.suspend import NotSuspendable
from gpud.domain import FINAL, Job, JobState
from gpud.executors.base import ImageBuildCapable
from gpud.http_common import ApiError, job_info
from gpud.http_common import decode_body as _decode
from gpud.http_common import error_response as _error
from gpud.http_common import json_response as _json
from gpud.http_common import path_job_id as _job_id
from gpud.http_common import principal as _principal
from gpud.http_common import query_param as _param
from gpud.http_common import read_body as _body
from gpud.ledger import KeyReused, UnknownJob
from gpud.retention import files_gone
from gpud.safefs import read_regular
from gpud.storage import DiskFull, require_room
from gpud.users import NoUnixAccount, Principal, run_as
from gpud_client.models import (
    API_PREFIX,
    MAX_ID,
    MAX_SECONDS,
    BatchSubmitRequest,
    BatchSubmitResponse,
    CheckpointInfo,
    ErrorBody,
    GpuInfo,
    GpuList,
    GpuProcessInfo,
    Health,
    ImageList,
    JobInfo,
    JobList,
    ParkedWorkerInfo,
    QuotaInfo,
    SubmitRequest,
    UsageLine,
    UsageReport,
    WhoAmI,
)
from gpud_client.models import ImageInfo as ImageInfoModel

__all__ = ["ApiError", "ROUTES", "create_app", "job_info", "openapi"]

log = logging.getLogger("gpud.api")

# The query parameters of the routes below, each with the range the daemon enforces (and
# /openapi.json documents). Those of the live-view routes are in gpud.api_watch.
STATE = Param("state", "string", "comma-separated states: " + ", ".join(s.value for s in JobState))
OWNER = Param("owner", "string", "only jobs of this owner (admins; others see their own)")
LIMIT = Param("limit", "integer", "page size", 1, 1000, 50)
CURSOR = Param("cursor", "integer", "next_cursor of the previous page", 1, MAX_ID)
WAIT_TIMEOUT = Param("timeout", "number", "seconds to wait", 0.0, 60.0, 30.0)
FOLLOW = Param("follow", "boolean", "keep streaming until the job is final", default=False)
LOG_OFFSET = Param("offset", "integer", "the byte offset to start from", 0, 2**62, 0)
SINCE = Param(
    "since", "number", "Unix time the report starts at (default: 7 days before until)", 0.0, 1e11
)
UNTIL = Param("until", "number", "Unix time the report ends at (default: now)", 0.0, 1e11)
USER = Param("user", "string", "only this user's jobs")
BY_PARAM = Param(
    "by", "string", "group by user (default), day or gpu-type", default="user", choices=tuple(BY)
)


# -- request helpers -----------------------------------------------------------------------


# -- routes ----------------------------------------------------------------------------


def create_app(daemon: JobService) -> Starlette:
    limit = daemon.config.max_body_bytes
    auth = Auth(daemon.users)

    async def own_job(request: Request, action: str) -> Job:
        """The job in the path, if the caller may ``action`` it (403 otherwise)."""
        job = await daemon.get(_job_id(request))
        check_job_access(_principal(request), job, action)
        return job

    async def health(request: Request) -> Response:
        return _json(
            Health(
                status="ok",
                version=__version__,
                executor=daemon.executor.name,
                worker_python=daemon.worker_python,
                gpu_source=daemon.inventory.source,
                pid=os.getpid(),
                started_at=daemon.started_at,
                shell_idle_timeout=daemon.config.shell_idle_timeout,
            )
        )

    async def submit(request: Request) -> Response:
        body = await _body(request, limit)
        req = _decode(body, SubmitRequest)
        key = await _idempotency(request, req)
        if key is not None and (seen := await daemon.replay(key)) is not None:
            return _replayed(job_info(daemon, seen[1][0]))
        jobs = await _new_jobs(daemon, auth, request, req, [req.args])
        require_room(daemon.config.data_dir, len(body))
        _, made = await daemon.submit(jobs, req.function, idempotency=key)
        return _json(job_info(daemon, made[0]), 201)

    async def submit_batch(request: Request) -> Response:
        body = await _body(request, limit)
        req = _decode(body, BatchSubmitRequest)
        key = await _idempotency(request, req)
        if key is not None and (seen := await daemon.replay(key)) is not None:
            assert seen[0] is not None
            return _replayed(BatchSubmitResponse(batch_id=seen[0], job_ids=[j.id for j in seen[1]]))
        with gc_quiet(len(req.inputs)):  # a big batch's objects, never cyclic (#12)
            jobs = await _new_jobs(daemon, auth, request, req, req.inputs)
            require_room(daemon.config.data_dir, len(body))
            batch_id, made = await daemon.submit(
                jobs,
                req.function,
                batch=True,
                idempotency=key,
                max_concurrency=req.max_concurrency,
            )
        assert batch_id is not None
        return _json(BatchSubmitResponse(batch_id=batch_id, job_ids=[j.id for j in made]), 201)

    async def list_jobs(request: Request) -> Response:
        states = None
        raw = _param(request, STATE)
        if raw:
            try:
                states = [JobState(s.strip()) for s in raw.split(",") if s.strip()]
            except ValueError:
                valid = ", ".join(s.value for s in JobState)
                raise ApiError(
                    422, "invalid_parameter", f"state must be a comma-separated list of: {valid}"
                ) from None
        limit_n = _param(request, LIMIT)
        before = _param(request, CURSOR)
        # Users see their own jobs; admins see everyone's (and may filter by owner).
        who = _principal(request)
        owner = _param(request, OWNER) if who.admin else who.name
        # Each in its freshest version (the daemon's memory beats a read racing a commit).
        jobs = await daemon.list_jobs(states, limit=limit_n, before=before, owner=owner)
        nxt = jobs[-1].id if len(jobs) == limit_n and jobs[-1].id > 1 else None
        return _json(
            JobList(
                jobs=[job_info(daemon, j) for j in jobs],
                next_cursor=nxt,
                parked=parked_info(daemon, owner),
            )
        )

    async def get_job(request: Request) -> Response:
        return _json(job_info(daemon, await own_job(request, "see")))

    async def wait_job(request: Request) -> Response:
        timeout = _param(request, WAIT_TIMEOUT)
        job = await own_job(request, "wait for")
        return _json(job_info(daemon, await daemon.wait_final(job.id, timeout)))

    async def cancel_job(request: Request) -> Response:
        job = await own_job(request, "cancel")
        return _json(job_info(daemon, await daemon.cancel(job.id)))

    async def suspend_job(request: Request) -> Response:
        job = await own_job(request, "suspend")
        try:
            done = await daemon.suspend(job.id, f"suspended by {_principal(request).name}")
        except NotSuspendable as e:
            raise ApiError(409, "not_suspendable", str(e)) from None
        return _json(job_info(daemon, done))

    async def resume_job(request: Request) -> Response:
        job = await own_job(request, "resume")
        try:
            done = await daemon.resume(job.id)
        except NotSuspendable as e:
            raise ApiError(409, "not_suspended", str(e)) from None
        return _json(job_info(daemon, done))

    async def result(request: Request) -> Response:
        job = await own_job(request, "get results of")
        if job.state not in FINAL:
            raise ApiError(
                409,
                "not_finished",
                f"job {job.id} is {job.state.value}; wait for it to finish "
                f"(GET {API_PREFIX}/jobs/{job.id}/wait)",
            )
        data = b""
        if job.has_result:
            # From the ledger (a warm job's small result, #12) or the job's result.pkl.
            [(found, _)] = await daemon.read_results([job], None)
            data = found or b""
        if not data:
            why = job.error or job.state.value
            raise ApiError(
                404,
                "no_result",
                (job.has_result and files_gone(daemon.config, job))
                or f"job {job.id} ended {job.state.value} without a result: {why}",
            )
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"x-gpud-job-state": job.state.value},
        )

    async def logs(request: Request) -> Response:
        follow = _param(request, FOLLOW)
        offset = _param(request, LOG_OFFSET)
        job = await own_job(request, "read logs of")  # 404 for an unknown job
        if (gone := files_gone(daemon.config, job)) is not None:
            raise ApiError(404, "files_removed", gone)
        job_id = job.id
        path = daemon.log_path(job_id)
        if not follow:
            data = await trio.to_thread.run_sync(_read_from, path, offset, None)
            return Response(data, media_type="text/plain; charset=utf-8")
        return StreamingResponse(
            _follow(daemon, job_id, path, offset), media_type="text/plain; charset=utf-8"
        )

    async def gpus(request: Request) -> Response:
        return _json(gpu_list(daemon))

    async def images(request: Request) -> Response:
        try:
            found = await daemon.executor.images()
        except Exception as e:  # noqa: BLE001 - the container service is down, say so
            raise ApiError(
                503,
                "executor_unavailable",
                f"the {daemon.executor.name} executor cannot list images right now: {e}",
            ) from None
        # Declared by image-building and checkpointing executors (capabilities, #12).
        default = (
            cast(ImageBuildCapable, daemon.executor).default_image
            if daemon.caps.image_builds or daemon.caps.snapshots
            else None
        )
        note = (
            None
            if daemon.executor.name == "podman"
            else (
                f"the {daemon.executor.name} executor runs jobs without images (Python "
                f'{daemon.worker_python}); images need executor = "podman"'
            )
        )
        built = await daemon.images.records() if daemon.images is not None else {}

        def model(i: Any) -> ImageInfoModel:
            r = built.get(i.name)
            return ImageInfoModel(
                name=i.name,
                id=i.id,
                size=i.size,
                created=i.created,
                python=i.python,
                definition=r.key if r else None,
                creator=r.creator if r else None,
                last_used=r.last_used if r else None,
            )

        return _json(
            ImageList(
                images=[model(i) for i in found],
                executor=daemon.executor.name,
                default=default,
                note=note,
                max_bytes=daemon.config.image_max_bytes if daemon.images is not None else 0,
            )
        )

    async def openapi_doc(request: Request) -> Response:
        return _json(openapi(daemon))

    async def whoami(request: Request) -> Response:
        who = _principal(request)
        try:
            runs_as: str | None = run_as(who.name, daemon.identity).user
        except NoUnixAccount:
            runs_as = None
        q = who.quota
        return _json(
            WhoAmI(
                name=who.name,
                admin=who.admin,
                via=who.via,
                uid=who.uid,
                quota=QuotaInfo(
                    max_gpus=q.max_gpus, max_queued=q.max_queued, max_timeout=q.max_timeout
                ),
                runs_as=runs_as,
            )
        )

    async def usage(request: Request) -> Response:
        now = time.time()
        until = _param(request, UNTIL)
        until = now if until is None else until
        since = _param(request, SINCE)
        since = until - 7 * 86400 if since is None else since
        by = _param(request, BY_PARAM)
        user = _param(request, USER)
        attempts = await daemon.attempts_between(since, until, user)
        buckets = await daemon.buckets_between(since, until, user)
        r = report(attempts, since=since, until=until, by=by, now=now, buckets=buckets)

        def line(x: Line) -> UsageLine:
            return UsageLine(
                key=x.key,
                jobs=x.job_count,
                attempts=x.attempts,
                gpu_seconds=x.gpu_seconds,
                wall_seconds=x.wall_seconds,
            )

        return _json(
            UsageReport(
                since=since,
                until=until,
                by=by,
                user=user,
                lines=[line(x) for x in r.lines],
                total=line(r.total),
            )
        )

    def refused(
        request: Request, status: int, code: str, detail: str, who: Principal | None
    ) -> Response:
        peer = request.scope.get("client")
        whom = (
            f"{who.name} ({who.via})"
            if who
            else (f"{peer[0]}:{peer[1]}" if peer else "the Unix socket")
        )
        log.warning("refused %s %s from %s: %s", request.method, request.url.path, whom, detail)
        resp = _error(status, code, detail)
        if status == 401:
            resp.headers["www-authenticate"] = 'Bearer realm="gpud"'
        return resp

    def wrap(fn: Callable[[Request], Any], public: bool = False) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            who: Principal | None = None
            try:
                if not public:
                    who = await auth.authenticate(request)
                    request.state.principal = who
                resp: Response = await fn(request)
                return resp
            except ApiError as e:
                return _error(e.status, e.code, e.detail)
            except UnknownJob as e:
                return _error(404, "not_found", str(e))
            except Unauthenticated as e:
                return refused(request, 401, "unauthenticated", str(e), who)
            except Forbidden as e:
                return refused(request, 403, "forbidden", str(e), who)
            except QuotaExceeded as e:
                return _error(422, "quota_exceeded", str(e))
            except KeyReused as e:
                return _error(422, "idempotency_key_reused", str(e))
            except DiskFull as e:
                return _error(507, "disk_full", str(e))
            except (sqlite3.Error, OSError) as e:
                return _storage_error(daemon, e)

        return handler

    batch = batch_routes(daemon, auth)  # the hot path's endpoints (#12)
    table: list[tuple[str, str, Callable[[Request], Any]]] = [
        ("GET", "/health", health),
        ("POST", "/jobs", submit),
        ("POST", "/jobs/batch", submit_batch),
        *batch[:1],  # POST /jobs/run, before /jobs/{job_id}
        ("GET", "/jobs", list_jobs),
        ("GET", "/jobs/{job_id}", get_job),
        ("GET", "/jobs/{job_id}/wait", wait_job),
        ("GET", "/jobs/{job_id}/logs", logs),
        ("GET", "/jobs/{job_id}/result", result),
        ("POST", "/jobs/{job_id}/cancel", cancel_job),
        ("POST", "/jobs/{job_id}/suspend", suspend_job),
        ("POST", "/jobs/{job_id}/resume", resume_job),
        ("GET", "/gpus", gpus),
        ("GET", "/whoami", whoami),
        ("GET", "/usage", usage),
        ("GET", "/images", images),
        *watch_routes(daemon),
        *snapshot_routes(daemon),
        *state_routes(daemon),
        *image_routes(daemon),
        *batch[1:],
        *admin_routes(daemon),
    ]
    routes = [
        Route(API_PREFIX + p, wrap(fn, public=p == "/health"), methods=[m]) for m, p, fn in table
    ]
    routes.append(Route("/openapi.json", openapi_doc, methods=["GET"]))
    routes.append(Route("/metrics", metrics_endpoint(daemon, auth), methods=["GET"]))  # #16
    routes.extend(tty_routes(daemon, auth))  # WebSockets of `gpud shell` and `gpud exec` (#14)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = {
            404: f"no such endpoint {request.url.path}; see /openapi.json",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, code, detail)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal_error", "the daemon hit a bug; details are in its log")

    return Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: http_error,
            Exception: server_error,
        },
    )


def _read_from(path: Path, offset: int, limit: int | None) -> bytes:
    try:
        return read_regular(path, offset, limit)
    except OSError:
        return b""  # not a regular file: a job planted something there; show nothing


async def _follow(daemon: JobService, job_id: int, path: Path, offset: int) -> AsyncIterator[bytes]:
    """Stream a job's log until it is final and everything was sent.

    New output is polled (every 100 ms at most); the job's end wakes us at once."""
    pos = offset
    while True:
        data = await trio.to_thread.run_sync(_read_from, path, pos, 1 << 20)
        if data:
            pos += len(data)
            yield data
            continue
        job = await daemon.get(job_id)
        if job.state in FINAL:
            tail = await trio.to_thread.run_sync(_read_from, path, pos, None)
            if tail:
                yield tail
            return
        ev = daemon.changed(job_id)
        with trio.move_on_after(0.1):
            await ev.wait()


def gpu_list(daemon: JobService) -> GpuList:
    holders = daemon.gpu_holders()
    handles = daemon.handles()
    gpus = daemon.gpus
    cluster = daemon.inventory.source == "slurm"
    if cluster:
        # Slurm (#15) picks the devices, so Slurm says who holds which: a gpud job shows
        # on the GPU Slurm gave it, whichever gpud had counted it on.
        by_key = {(h.pid, h.pid_start): h.job_id for h in handles}
        jobs = {j.id: j for j in holders.values()}
    out = []
    for g in gpus:
        holder = holders.get(g.uuid)
        if cluster:
            ch = g.cluster_holder
            holder = jobs.get(by_key.get(ch.key, -1)) if ch is not None else None
        procs = [
            GpuProcessInfo(
                pid=p.pid,
                used_memory=p.used_memory,
                job_id=daemon.executor.job_for_pid(p.pid, handles),
            )
            for p in g.processes
        ]
        out.append(
            GpuInfo(
                index=g.index,
                uuid=g.uuid,
                name=g.name,
                type=g.type,
                aliases=list(g.aliases),
                memory_total=g.memory_total,
                memory_used=g.memory_used,
                utilization=g.utilization,
                memory_utilization=g.memory_utilization,
                temperature=g.temperature,
                power_w=g.power_w,
                power_limit_w=g.power_limit_w,
                processes=procs,
                fake=g.fake,
                busy_foreign=bool(g.foreign_pids),
                job_id=holder.id if holder else None,
                owner=holder.owner if holder else None,
                cluster_job=g.cluster_holder.job if g.cluster_holder else None,
                cluster_user=g.cluster_holder.user if g.cluster_holder else None,
            )
        )
    note = daemon.inventory.note
    if (
        daemon.executor.name == "podman"
        and daemon.inventory.source == "nvml"
        and not getattr(daemon.executor, "cdi", True)
    ):
        fallback = (
            "no CDI spec for NVIDIA GPUs: job containers get the GPU device nodes "
            "only, without the driver's libraries; run `nvidia-ctk cdi generate "
            "--output=/etc/cdi/nvidia.yaml`"
        )
        note = f"{note}; {fallback}" if note else fallback
    return GpuList(
        gpus=out,
        source=daemon.inventory.source,
        note=note,
        checkpoint=_checkpoint_info(daemon),
        parked=parked_info(daemon, None),
        park_max_bytes=daemon.parking.max_bytes if daemon.parking.enabled else 0,
    )


def parked_info(daemon: JobService, owner: str | None) -> list[ParkedWorkerInfo]:
    """The parked warm workers (#13), of ``owner`` or of everyone."""
    index = {g.uuid: g.index for g in daemon.gpus}
    return [
        ParkedWorkerInfo(
            worker_id=p.worker.id,
            job_id=p.worker.last_job,
            function=p.function,
            owner=who,
            gpus=[index[u] for u in p.home if u in index],
            bytes=p.bytes,
            parked_at=p.parked_at,
        )
        for p, who in daemon.parking.rows()
        if owner is None or who == owner
    ]


def _checkpoint_info(daemon: JobService) -> CheckpointInfo | None:
    s = daemon.checkpoint_support  # None: a daemon built without serve() (unit tests)
    if s is None:
        return None
    return CheckpointInfo(
        available=s.ok,
        kind=s.kind,
        reason=s.reason,
        driver_version=s.driver_version,
        cuda_version=s.cuda_version,
        remap=s.remap,
    )


# -- OpenAPI -------------------------------------------------------------------------------

_DOC: list[tuple[str, str, str, type | None, type | None, tuple[Param, ...]]] = [
    ("get", "/health", "Daemon health and version", None, Health, ()),
    ("post", "/jobs", "Submit one job", SubmitRequest, JobInfo, ()),
    (
        "post",
        "/jobs/batch",
        "Submit many jobs of one function (.map)",
        BatchSubmitRequest,
        BatchSubmitResponse,
        (),
    ),
    ("get", "/jobs", "List jobs, newest first", None, JobList, (STATE, OWNER, LIMIT, CURSOR)),
    ("get", "/jobs/{job_id}", "One job", None, JobInfo, ()),
    (
        "get",
        "/jobs/{job_id}/wait",
        "Wait until the job is final (long poll)",
        None,
        JobInfo,
        (WAIT_TIMEOUT,),
    ),
    (
        "get",
        "/jobs/{job_id}/logs",
        "The job's combined stdout+stderr (text/plain, streamed with follow=true)",
        None,
        None,
        (FOLLOW, LOG_OFFSET),
    ),
    (
        "get",
        "/jobs/{job_id}/result",
        "The worker's result.pkl (application/octet-stream)",
        None,
        None,
        (),
    ),
    ("post", "/jobs/{job_id}/cancel", "Cancel a job; returns once it is final", None, JobInfo, ()),
    (
        "post",
        "/jobs/{job_id}/suspend",
        "Suspend a running job: its processes stop, its GPUs "
        "are freed, its timeout clock stops (409 if it is not running)",
        None,
        JobInfo,
        (),
    ),
    (
        "post",
        "/jobs/{job_id}/resume",
        "Resume a suspended job when its GPUs are free; "
        "answers once it runs, or after 10 s with the reason it still waits",
        None,
        JobInfo,
        (),
    ),
    ("get", "/gpus", "The box's GPUs with holders and foreign processes", None, GpuList, ()),
    ("get", "/whoami", "Who the daemon takes the caller to be", None, WhoAmI, ()),
    (
        "get",
        "/usage",
        "GPU-seconds and wall time by user, day or GPU type",
        None,
        UsageReport,
        (SINCE, UNTIL, USER, BY_PARAM),
    ),
    ("get", "/images", "Local images usable for jobs (Podman executor)", None, ImageList, ()),
    *WATCH_DOC,
    *SNAPSHOT_DOC,
    *STATE_DOC,
    *IMAGE_DOC,
    *BATCH_DOC,
    *ADMIN_DOC,
]

#: Path ids are SQLite INTEGERs; any other value is 404 (gpud.api_params.parse_id).
_PATH_ID = {"type": "integer", "minimum": 1, "maximum": MAX_ID}


def _narrow(components: dict[str, Any], field: str, maximum: float) -> None:
    """Lower a submit field's documented maximum to this daemon's configured one."""
    for model in (SubmitRequest, BatchSubmitRequest):
        prop = components[model.__name__]["properties"][field]
        for alt in prop.get("anyOf", [prop]):
            if alt.get("type") in ("number", "integer"):
                alt["maximum"] = min(alt.get("maximum", maximum), maximum)


#: Standard base64 with padding, as msgspec decodes ``bytes`` fields: "contentEncoding"
#: alone is an annotation that validators and generators ignore.
_BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def _base64_patterns(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("contentEncoding") == "base64":
            node["pattern"] = _BASE64
        for v in node.values():
            _base64_patterns(v)
    elif isinstance(node, list):
        for v in node:
            _base64_patterns(v)


def openapi(daemon: JobService | None = None) -> dict[str, Any]:
    """The API as OpenAPI 3.1. Every range in it comes from the constraints the daemon
    enforces: body fields from the msgspec models, query parameters from their
    :class:`Param`. Given the daemon, the ranges its configuration narrows (max_timeout,
    keep_warm_max, the box's CPUs) are its own."""
    models = [m for row in _DOC for m in (row[3], row[4]) if m is not None] + [ErrorBody]
    _, components = msgspec.json.schema_components(
        models, ref_template="#/components/schemas/{name}"
    )
    _base64_patterns(components)
    if daemon is not None:
        cfg = daemon.config
        _narrow(components, "timeout", min(cfg.max_timeout, MAX_SECONDS))
        _narrow(components, "keep_warm", cfg.keep_warm_max)
        _narrow(components, "cpu", float(os.cpu_count() or 1))
    paths: dict[str, Any] = {}
    for method, path, summary, body, resp, params in _DOC:
        op: dict[str, Any] = {"summary": summary, "responses": {}}
        parameters = []
        for name in ("job_id", "snapshot_id", "batch_id"):
            if "{" + name + "}" in path:
                parameters.append(
                    {"name": name, "in": "path", "required": True, "schema": dict(_PATH_ID)}
                )
        if "{path}" in path:  # a state directory's file (#14), "/"-separated
            parameters.append(
                {
                    "name": "path",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1},
                }
            )
        parameters += [p.schema() for p in params]
        if parameters:
            op["parameters"] = parameters
        if body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{body.__name__}"}
                    }
                },
            }
        ok = "201" if method == "post" and path.startswith("/jobs") and body else "200"
        if resp is not None:
            op["responses"][ok] = {
                "description": "OK",
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{resp.__name__}"}
                    }
                },
            }
        else:
            op["responses"][ok] = {"description": "OK"}
        op["responses"]["4XX"] = {
            "description": "Error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        if path == "/health":
            op["security"] = []  # the one endpoint open to anyone who reaches the daemon
        paths.setdefault(API_PREFIX + path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpud", "version": __version__},
        "paths": paths,
        # Over TCP every request needs the token; on the Unix socket the kernel's peer
        # credentials identify the caller instead (docs/api.md).
        "security": [{"bearer": []}],
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


ROUTES = [(m.upper(), API_PREFIX + p) for m, p, *_ in _DOC]
