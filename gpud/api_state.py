"""A job's state directory over the API (#14), wired into :mod:`gpud.api`'s table.

* ``GET /v1/jobs/{id}/state`` - the files the job saved there (path, size, time);
* ``GET /v1/jobs/{id}/state/{path}`` - one of them, streamed.

Only its owner (and admins) may read it: anyone else gets the 403 every other job
endpoint gives them. Paths are checked (no "..", no absolute path: 400) and opened
without following links (gpud.statedir).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gpud import statedir
from gpud.api_params import Param
from gpud.auth import check_job_access
from gpud.daemon.port import JobService
from gpud.http_common import ApiError
from gpud.http_common import json_response as _json
from gpud.http_common import path_job_id as _job_id
from gpud.http_common import principal as _principal
from gpud.retention import files_gone
from gpud_client.models import StateFileInfo, StateList

__all__ = ["STATE_DOC", "state_routes"]

STATE_DOC: list[tuple[str, str, str, type | None, type | None, tuple[Param, ...]]] = [
    ("get", "/jobs/{job_id}/state", "The files in the job's state directory", None, StateList, ()),
    (
        "get",
        "/jobs/{job_id}/state/{path}",
        "One file of the job's state directory (application/octet-stream, streamed)",
        None,
        None,
        (),
    ),
]

_CHUNK = 1 << 20


def state_routes(daemon: JobService) -> list[tuple[str, str, Callable[[Request], Any]]]:
    async def job_dir(request: Request) -> tuple[int, Any]:
        job = await daemon.get(_job_id(request))  # 404 for an unknown job
        check_job_access(_principal(request), job, "read the state directory of")
        if (gone := files_gone(daemon.config, job)) is not None:
            raise ApiError(404, "files_removed", gone)
        return job.id, daemon.config.jobs_dir / str(job.id)

    async def list_state(request: Request) -> Response:
        job_id, d = await job_dir(request)
        files, truncated = await trio.to_thread.run_sync(statedir.listing, d)
        return _json(
            StateList(
                job_id=job_id,
                truncated=truncated,
                total_bytes=sum(f.size for f in files),
                files=[StateFileInfo(path=f.path, size=f.size, mtime=f.mtime) for f in files],
            )
        )

    async def get_state_file(request: Request) -> Response:
        job_id, d = await job_dir(request)
        path = request.path_params["path"]
        try:
            fd = await trio.to_thread.run_sync(statedir.open_file, d, path)
        except statedir.BadPath as e:
            raise ApiError(400, "invalid_path", str(e)) from None
        if fd is None:
            raise ApiError(
                404,
                "no_such_file",
                f"job {job_id}'s state directory has no file {path!r}: "
                f"`gpud state {job_id}` lists what it has",
            )
        size = os.fstat(fd).st_size
        return StreamingResponse(
            _stream(fd),
            media_type="application/octet-stream",
            headers={"content-length": str(size)},
        )

    return [
        ("GET", "/jobs/{job_id}/state", list_state),
        ("GET", "/jobs/{job_id}/state/{path:path}", get_state_file),
    ]


async def _stream(fd: int) -> AsyncIterator[bytes]:
    try:
        while True:
            data = await trio.to_thread.run_sync(os.read, fd, _CHUNK)
            if not data:
                return
            yield data
    finally:
        os.close(fd)
