"""The admin endpoints (#12), wired into :mod:`gpud.api`'s table.

* ``POST /v1/admin/gc`` - apply the retention settings now (`gpud gc`), or with
  ``{"dry_run": true}`` say what that would remove. Admins only: the daemon owns the
  ledger, so gc runs in it rather than in a second process beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gpud.api_params import Param
from gpud.auth import Forbidden
from gpud.daemon.port import JobService
from gpud.http_common import decode_body as _decode
from gpud.http_common import json_response as _json
from gpud.http_common import principal as _principal
from gpud.http_common import read_body as _body
from gpud_client.models import GcReport, GcRequest

__all__ = ["ADMIN_DOC", "admin_routes"]

ADMIN_DOC: list[tuple[str, str, str, type | None, type | None, tuple[Param, ...]]] = [
    (
        "post",
        "/admin/gc",
        "Remove finished jobs' directories and records past the retention settings (admins)",
        GcRequest,
        GcReport,
        (),
    ),
]


def admin_routes(daemon: JobService) -> list[tuple[str, str, Callable[[Request], Any]]]:
    async def gc(request: Request) -> Response:
        who = _principal(request)
        if not who.admin:
            raise Forbidden(
                f"{who.name} is not an admin: only admins run gc (the daemon "
                "also collects by itself every retention_interval); ask one, "
                "or run `sudo gpud gc` on the box"
            )
        body = await _body(request, 4096)
        req = _decode(body, GcRequest) if body.strip() else GcRequest()
        return _json(await daemon.collect_garbage(dry_run=req.dry_run))

    return [("POST", "/admin/gc", gc)]
