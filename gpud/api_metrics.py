"""``GET /metrics``: the daemon's figures in the Prometheus text format (#16).

Who may read it:

* **on the Unix socket**, whoever can connect (the socket's mode already says who that
  is); no token. What it shows is aggregate: counts and times by user, state, start kind,
  GPU shape and GPU, never a job id, a function or an argument;
* **over TCP**, a scraper with ``metrics_token`` (a setting: a bearer token of its own, so
  Prometheus never holds a user's or an admin's token), or an admin with their token.
  Anyone else gets 401 (no or a wrong token) or 403 (a user's token).

The figures are read through :meth:`JobService.metrics` (gpud.daemon.stats), which
never walks the queued jobs.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gpud.auth import Auth, Unauthenticated
from gpud.daemon.port import JobService
from gpud.http_common import error_response as _error
from gpud.promtext import CONTENT_TYPE, render

__all__ = ["metrics_endpoint"]

log = logging.getLogger("gpud.api")


def _bearer(request: Request) -> str | None:
    kind, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if kind.lower() == "bearer" and value.strip() else None


def metrics_endpoint(daemon: JobService, auth: Auth) -> Callable[[Request], Any]:
    token = daemon.config.metrics_token

    async def refuse(request: Request) -> Response | None:
        """None where the caller may read the metrics; the 401 or 403 otherwise."""
        if request.scope.get("client") is None:
            return None  # the Unix socket
        given = _bearer(request)
        if (
            token is not None
            and given is not None
            and hmac.compare_digest(given.encode(), token.encode())
        ):
            return None
        peer = request.scope["client"]
        try:
            who = await auth.authenticate(request)
        except Unauthenticated as e:
            log.warning("refused GET /metrics from %s:%s: %s", peer[0], peer[1], e)
            how = (
                "the scraper's metrics_token or an admin's token"
                if token is not None
                else "an admin's token (or set metrics_token in the daemon's config for a scraper)"
            )
            resp = _error(
                401,
                "unauthenticated",
                f"GET /metrics over TCP needs a bearer token: {how}; "
                "on the Unix socket it needs none",
            )
            resp.headers["www-authenticate"] = 'Bearer realm="gpud"'
            return resp
        if who.admin:
            return None
        log.warning("refused GET /metrics from %s (token): not an admin", who.name)
        return _error(
            403,
            "forbidden",
            f"{who.name} is not an admin: over TCP /metrics is for admins and the "
            "scraper holding metrics_token; ask an admin for it, or read it on "
            "the Unix socket",
        )

    async def metrics(request: Request) -> Response:
        refused = await refuse(request)
        if refused is not None:
            return refused
        return Response(render(await daemon.metrics()), media_type=CONTENT_TYPE)

    return metrics
