"""What every HTTP route module shares: the error type, JSON responses, reading and
decoding a body, query and path parameters, the caller, and the job as the API shows it.

It sits below ``gpud.api`` and its route modules (``api_watch``, ``api_snapshots``,
``api_images``), which all import it; none of them imports another (#12: these lived in
``gpud.api``, which the route modules then imported back at call time).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gpud.api_params import Param, ParamError, parse_id
from gpud.domain import Job, JobState, Wait
from gpud.http_edge import OverBudget
from gpud.users import Principal
from gpud_client.models import MAX_ID, ErrorBody, JobInfo

if TYPE_CHECKING:
    from gpud.daemon.port import JobService

__all__ = [
    "ApiError",
    "decode_body",
    "error_response",
    "job_info",
    "json_response",
    "path_job_id",
    "principal",
    "query_param",
    "read_body",
]

log = logging.getLogger("gpud.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def error_response(status: int, code: str, detail: str) -> Response:
    return json_response(ErrorBody(error=code, detail=detail), status)


def job_info(daemon: JobService, job: Job, wait: Wait | None | bool = True) -> JobInfo:
    """``wait``: the job's wait when the caller has it already (a page of the queue);
    True (the default) to ask the daemon."""
    index = {g.uuid: g.index for g in daemon.gpus}
    if wait is True:
        reason, position = daemon.reason(job.id) if job.state is JobState.QUEUED else (None, None)
    else:
        reason, position = (wait.reason, wait.position) if wait else (None, None)
    if job.state is JobState.SUSPENDED:
        reason = daemon.suspended_note(job)  # "suspended for job 812 (priority 10 > 0)"
    elif job.state is JobState.RUNNING and reason is None:
        held = getattr(daemon.executor, "held_note", None)  # the Slurm executor's (#15)
        reason = held(job) if held is not None else None
    suspended = job.suspended_s + (
        daemon.clock.time() - job.suspended_at if job.suspended_at is not None else 0.0
    )
    return JobInfo(
        id=job.id,
        name=job.function,
        state=job.state.value,
        owner=job.owner,
        priority=job.priority,
        gpu=job.gpu.to_spec() if job.gpu else None,
        gpus=list(job.gpus),
        gpu_indices=[index[u] for u in job.gpus if u in index],
        submitted_at=job.submitted_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        timeout=job.timeout,
        retries=job.retries,
        attempt=job.attempt,
        batch_id=job.batch_id,
        exit_code=job.exit_code,
        error=job.error,
        has_result=job.has_result,
        reason=reason,
        position=position,
        python=job.python,
        image=job.image,
        wall_seconds=job.wall_seconds,
        gpu_seconds=job.gpu_seconds,
        memory=job.memory,
        cpu=job.cpus,
        keep_warm=job.keep_warm,
        snapshot=job.snapshot,
        start_kind=job.start_kind,
        startup=job.startup,
        python_path=job.python_env.path if job.python_env else None,
        python_prefix=job.python_env.prefix if job.python_env else None,
        after=list(job.deps),
        after_any=job.deps_any,
        preemptible=job.preemptible,
        suspended_seconds=round(suspended, 3),
        signal_before=job.signal_before,
        signal=job.signal,
        grace=job.grace,
    )


async def read_body(request: Request, limit: int) -> bytes | bytearray:
    declared = request.headers.get("content-length")
    too_big = ApiError(
        413,
        "body_too_large",
        f"the request body is larger than this daemon accepts ({limit} bytes): send a smaller "
        "payload (pass large data by path or URL instead of by value), or raise max_body_bytes",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    # One buffer, grown as chunks come: a list of chunks joined at the end held every
    # body twice at its peak (#10). msgspec decodes a bytearray without copying it.
    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise too_big
            body += chunk
    except ClientDisconnect:
        # The client went away mid-body: nobody is left to answer, and it is no bug.
        log.debug(
            "%s %s: the client closed the connection before the whole body came",
            request.method,
            request.url.path,
        )
        raise ApiError(
            400,
            "incomplete_body",
            "the connection closed before the whole request body arrived; send it again",
        ) from None
    except OverBudget as e:
        raise ApiError(503, "busy", str(e)) from None
    return body


def decode_body(data: bytes | bytearray, model: type[Any]) -> Any:
    try:
        return msgspec.json.decode(data, type=model)
    except msgspec.ValidationError as e:
        raise _invalid(model, e) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {e}") from None


# Body fields whose violations keep the error code they had before the ranges moved into
# the wire models (clients and docs/api.md name them).
_FIELD_CODES = {
    "name": "invalid_name",
    "retries": "invalid_retries",
    "env": "invalid_env",
    "priority": "invalid_priority",
    "memory": "invalid_memory",
    "cpu": "invalid_cpu",
    "keep_warm": "invalid_keep_warm",
    "inputs": "invalid_batch",
    "timeout": "invalid_timeout",
    "signal_before": "invalid_signal_before",
    "signal": "invalid_signal",
    "grace": "invalid_grace",
}


def _invalid(model: type[Any], e: msgspec.ValidationError) -> ApiError:
    """A 422 naming the field, what was wrong and, from the model's own constraints, the
    whole valid range ("retries: from 0 to 20"), not only the bound that was crossed."""
    text = str(e)
    field = text.rsplit("`$.", 1)[1].split("`")[0].split("[")[0] if "`$." in text else ""
    valid = _field_range(model, field)
    detail = f"{model.__name__}: {text}" + (f" ({field}: {valid})" if valid else "")
    return ApiError(422, _FIELD_CODES.get(field, "invalid_request"), detail)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else f"{v:g}"


def _field_range(model: type[Any], field: str) -> str | None:
    import msgspec.inspect as mi

    info = mi.type_info(model)
    if not isinstance(info, mi.StructType | mi.DataclassType | mi.TypedDictType):
        return None  # no named fields to describe
    for f in info.fields:
        if f.name != field:
            continue
        parts = []
        for t in getattr(f.type, "types", (f.type,)):
            t = t.type if isinstance(t, mi.Metadata) else t
            if isinstance(t, mi.IntType | mi.FloatType) and (t.le is not None):
                low = t.ge if t.ge is not None else (t.gt or 0)
                word = "above" if t.gt is not None else "from"
                parts.append(f"{word} {_num(low)} to {_num(t.le)}")
            elif isinstance(t, mi.StrType | mi.ListType) and t.max_length is not None:
                unit = "characters" if isinstance(t, mi.StrType) else "items"
                parts.append(f"{t.min_length or 0} to {t.max_length} {unit}")
            elif isinstance(t, mi.NoneType) and parts:
                parts.append("or null")
        return " ".join(parts) or None
    return None


def query_param(request: Request, param: Param) -> Any:
    try:
        return param.get(request)
    except ParamError as e:
        raise ApiError(422, "invalid_parameter", str(e)) from None


def path_job_id(request: Request) -> int:
    raw = request.path_params["job_id"]
    job_id = parse_id(raw)
    if job_id is None:
        raise ApiError(
            404, "not_found", f"no job {raw[:40]!r}: job ids are whole numbers from 1 to {MAX_ID}"
        )
    return job_id


def principal(request: Request) -> Principal:
    who = request.state.principal
    assert isinstance(who, Principal)
    return who
