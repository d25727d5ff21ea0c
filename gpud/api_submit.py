"""What every submit endpoint shares (POST /v1/jobs, /v1/jobs/batch, /v1/jobs/run,
/v1/batches): idempotency keys, turning a request into ledger jobs with this daemon's and
this user's limits checked, and the answers for a replay and for storage errors."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from typing import Any

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response

from gpud import longrun
from gpud.auth import Auth, effective_timeout
from gpud.daemon.port import JobService
from gpud.daemon.record import ExecutorDown, SubmitError
from gpud.domain import GpuRequest
from gpud.http_common import ApiError
from gpud.http_common import error_response as _error
from gpud.http_common import json_response as _json
from gpud.http_common import principal as _principal
from gpud.ledger import IdempotencyKey, NewJob
from gpud.notify import NOTIFY_STATES
from gpud.storage import full_message, is_busy, is_full
from gpud.webhooks import check_url
from gpud_client.models import BatchSubmitRequest, SubmitRequest

__all__ = ["idempotency", "new_jobs", "replayed", "storage_error"]

log = logging.getLogger("gpud.api")

#: Requests up to this many payload bytes have their idempotency fingerprint computed on
#: the event loop (sha256 runs at about 1 GB/s: well under 100 us).
_HASH_INLINE = 64 * 1024


async def idempotency(
    request: Request, req: SubmitRequest | BatchSubmitRequest
) -> IdempotencyKey | None:
    """The submit's idempotency key, per owner, with a fingerprint of the whole request (a
    retry sends the same one; another submit reusing the key does not)."""
    if req.idempotency_key is None:
        return None
    kind = type(req).__name__.encode()

    def digest_of() -> str:
        return hashlib.sha256(kind + b"\0" + msgspec.json.encode(req)).hexdigest()

    # A small request is hashed in place (microseconds); a thread trip would cost more
    # than it saves on the warm call's path (#12). A big batch still goes to a thread.
    small = isinstance(req, SubmitRequest) and len(req.function) + len(req.args) < _HASH_INLINE
    digest = digest_of() if small else await trio.to_thread.run_sync(digest_of)
    return IdempotencyKey(
        owner=_principal(request).name, key=req.idempotency_key, fingerprint=digest
    )


def replayed(obj: Any) -> Response:
    """The answer to a repeated idempotency key: the first submit's, marked as such."""
    resp = _json(obj, 201)
    resp.headers["idempotent-replayed"] = "true"
    return resp


def storage_error(daemon: JobService, e: sqlite3.Error | OSError) -> Response:
    """The ledger or the data directory could not be written: 507 for a full disk, 503
    for a write lock another process holds; anything else stays a bug (500)."""
    if is_full(e):
        log.warning("refused a request: %s", e)
        return _error(507, "disk_full", full_message(daemon.config.data_dir))
    if is_busy(e):
        log.warning("refused a request: the ledger is locked (%s)", e)
        resp = _error(
            503,
            "ledger_busy",
            f"the ledger {daemon.config.ledger_path} is locked by another process "
            "(a backup, or sqlite3 left open?): try again shortly, or end that "
            "process",
        )
        resp.headers["retry-after"] = "5"
        return resp
    raise e


#: New jobs built between two checkpoints of the event loop.
_CHUNK = 2000


async def new_jobs(
    daemon: JobService,
    auth: Auth,
    request: Request,
    req: SubmitRequest | BatchSubmitRequest,
    args: list[bytes],
) -> list[NewJob]:
    who = _principal(request)
    try:
        gpu = GpuRequest.parse(req.gpu)
    except ValueError as e:
        raise ApiError(422, "invalid_gpu", str(e)) from None
    timeout = effective_timeout(who, req.timeout, daemon.config.effective_default_timeout)
    # The ranges of retries, priority, env, name, memory and the batch size were checked
    # as the body was decoded (gpud_client.models); what depends on this daemon's config
    # and box is checked here.
    memory = req.memory
    cfg = daemon.config
    keep_warm = cfg.keep_warm_default if req.keep_warm is None else req.keep_warm
    if not 0 <= keep_warm <= cfg.keep_warm_max:
        raise ApiError(
            422,
            "invalid_keep_warm",
            f"keep_warm must be between 0 and this daemon's keep_warm_max "
            f"({cfg.keep_warm_max:g} s)",
        )
    if req.cpu is not None and not 0.01 <= req.cpu <= (os.cpu_count() or 1):
        raise ApiError(
            422, "invalid_cpu", f"cpu must be between 0.01 and this box's {os.cpu_count()} CPUs"
        )
    try:
        signal, grace = longrun.check_options(
            cfg, timeout, req.signal_before, req.signal, req.grace
        )
    except longrun.LongRunError as e:
        raise ApiError(422, e.code, str(e)) from None
    try:
        image = await daemon.check_submittable(
            gpu, req.python, timeout, req.image, python_path=req.python_path
        )
    except SubmitError as e:
        raise ApiError(422, "refused", str(e)) from None
    except ExecutorDown as e:
        raise ApiError(503, "executor_unavailable", str(e)) from None
    queued = daemon.queued_count(who.name)
    # Who may submit at all (a Unix account to run as, quotas: 403) before which
    # interpreter their job runs with (422).
    auth.check_submit(who, priority=req.priority, jobs=len(args), queued=queued)
    try:
        python_env = await daemon.resolve_python(
            who.name, req.python, req.python_path, req.python_prefix
        )
    except SubmitError as e:
        raise ApiError(422, "refused", str(e)) from None
    deps = tuple(dict.fromkeys(req.after))
    if deps:
        why = await daemon.check_after(who.name, deps)
        if why is not None:
            raise ApiError(400, "unknown_dependency", why)
    notify_on: tuple[str, ...] = ()
    if req.notify is not None:
        why = check_url(req.notify, cfg.webhooks)
        if why is not None:
            raise ApiError(400, "webhook_refused", why)
        notify_on = tuple(dict.fromkeys(req.notify_on)) if req.notify_on else NOTIFY_STATES
    if image is not None and daemon.images is not None:
        await daemon.images.touch(image)  # a use, for garbage collection (#11)
    code_hash = hashlib.sha256(req.function).hexdigest()
    owner = who.name
    # One env dict for all the jobs of a batch (a NewJob is frozen, the ledger only reads
    # it): 100,000 copies were as many more objects for the cyclic GC to walk (#12).
    env = dict(req.env)

    def one(a: bytes) -> NewJob:
        return NewJob(
            name=req.name,
            owner=owner,
            function_hash=code_hash,
            args=a,
            python=req.python,
            timeout=timeout,
            gpu=gpu,
            retries=req.retries,
            priority=req.priority,
            image=image,
            env=env,
            memory=memory,
            cpus=req.cpu,
            keep_warm=keep_warm,
            snapshot=req.snapshot,
            python_env=python_env,
            deps=deps,
            deps_any=req.after_any,
            notify=req.notify,
            notify_on=notify_on,
            preemptible=req.preemptible,
            signal_before=req.signal_before,
            signal=signal,
            grace=grace,
        )

    made: list[NewJob] = []
    for i, a in enumerate(args):
        if i and i % _CHUNK == 0:
            # A batch of 100,000 took about a second of one loop step here: other
            # requests and the running jobs go between chunks (nothing is committed yet,
            # so a cancelled request leaves nothing behind) (#12).
            await trio.lowlevel.checkpoint()
        made.append(one(a))
    return made
