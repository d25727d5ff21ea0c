"""The image-build endpoint (#11), wired into :mod:`gpud.api`'s table.

``POST /v1/images/build`` takes an :class:`ImageBuildRequest` (a ``gpud.Image``'s
canonical definition, with the contents of the files it names) and answers with a stream
of :class:`ImageBuildEvent` lines (``application/x-ndjson``): the build's log as ``log``
lines, then one ``done`` (the image's name, to submit with) or one ``error`` (what went
wrong and the log's last lines). An image built before answers ``done`` with
``cached: true`` at once. Everyone asking for the same definition while it builds
follows the one build.

Refusals come before the stream, as usual JSON errors: 422 ``needs_podman`` (the process
executor runs no images), 422 ``invalid_image`` (the definition does not validate), 409
``missing_files`` (the image must be built and the request came without the files'
contents: send them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gpud.api_params import Param
from gpud.daemon.port import JobService
from gpud.executors.base import ExecutorRefusal
from gpud.http_common import ApiError
from gpud.http_common import decode_body as _decode
from gpud.http_common import principal as _principal
from gpud.http_common import read_body as _body
from gpud.images import Build, BuildRefused, MissingFiles, event, tail
from gpud_client.models import ImageBuildEvent, ImageBuildRequest

__all__ = ["IMAGE_DOC", "image_routes"]

IMAGE_DOC: list[tuple[str, str, str, type | None, type | None, tuple[Param, ...]]] = [
    (
        "post",
        "/images/build",
        "Build (or find) the image of a gpud.Image definition; the "
        "answer streams ImageBuildEvent lines (NDJSON)",
        ImageBuildRequest,
        ImageBuildEvent,
        (),
    ),
]


def image_routes(daemon: JobService) -> list[tuple[str, str, Callable[[Request], Any]]]:
    async def build(request: Request) -> Response:
        who = _principal(request)
        if daemon.images is None:
            raise ApiError(
                422,
                "needs_podman",
                f"image definitions (gpud.Image) are built and run with the Podman executor, "
                f"but this daemon runs the {daemon.executor.name} executor: ask the admin for "
                'executor = "podman", or drop image= (jobs here run in the daemon\'s Python '
                f"{daemon.worker_python})",
            )
        req = _decode(await _body(request, daemon.config.max_body_bytes), ImageBuildRequest)
        try:
            b, cached = await daemon.ensure_image(req.spec, req.files, who.name)
        except BuildRefused as e:
            raise ApiError(422, "invalid_image", str(e)) from None
        except MissingFiles as e:
            raise ApiError(
                409,
                "missing_files",
                f"the image must be built and {len(e.missing)} of the files its "
                "definition names were not sent: send their contents in files",
            ) from None
        except Exception as e:  # noqa: BLE001 - the Podman service is down: say so
            raise ApiError(
                503,
                "executor_unavailable",
                f"the Podman service cannot be asked about images right now: {e}",
            ) from None
        return StreamingResponse(
            _stream(daemon, b, cached, req.python), media_type="application/x-ndjson"
        )

    return [("POST", "/images/build", build)]


async def _stream(
    daemon: JobService, b: Build, cached: bool, python: str | None
) -> AsyncIterator[bytes]:
    assert daemon.images is not None
    async for line in daemon.images.follow(b):
        yield event("log", line=line)
    if b.error is not None:
        yield event(
            "error",
            detail=f"building image {b.name} failed ({b.error}); the end of "
            "its log is below: fix the definition and call again",
            tail=tail(b),
        )
        return
    try:
        _, theirs = await daemon.executor.python_for(b.name)
    except ExecutorRefusal as e:
        yield event("error", detail=str(e), tail=[])
        return
    mine = python.rsplit(".", 1)[0] if python and python.count(".") >= 2 else python
    if mine and theirs.rsplit(".", 1)[0] != mine:
        yield event(
            "error",
            detail=(
                f"image {b.name} has Python {theirs} but this client runs Python {python}: "
                f"base the image on one with Python {mine}, or submit from Python "
                f"{theirs.rsplit('.', 1)[0]}"
            ),
            tail=[],
        )
        return
    yield event("done", name=b.name, key=b.key, cached=cached, python=theirs)
