"""Webhooks told when a job ends (#14): ``notify=URL`` with ``notify_on=`` final states.

The daemon POSTs a small JSON document (the job's id, name, owner, state, times and how
it ended; never a payload or a result) from a task of its own: a job's end only puts the
notification in a bounded queue, so a slow or dead receiver never holds up the
scheduling loop. A receiver that is down or answers other than 2xx is tried again, the
waits doubling from ``webhook_backoff`` up to 5 min, for ``webhook_retry_for`` after the
job ended; then the notification is dropped, with a line in the daemon's log.

Notifications are kept in memory only: one still being retried when the daemon stops
is not sent by the next one (its log says so). A job that ended while no daemon ran is
collected at the restart, and notified then.

Who may be notified is the admin's: ``webhooks = "off"`` (the default), ``"any"``, or a
list of hosts. A daemon often runs as root on a shared box, where anyone who can submit
could otherwise make it POST to services listening only on its loopback or the internal
network (server-side request forgery); the admin opts in, host by host where it matters.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import trio

from gpud.config import Config
from gpud.domain import FINAL, Job

__all__ = ["NOTIFY_STATES", "Notifier", "body", "check_url", "parse_webhooks"]

log = logging.getLogger("gpud.notify")

#: The states a notification may be asked for: every final one.
NOTIFY_STATES: tuple[str, ...] = tuple(s.value for s in sorted(FINAL, key=lambda s: s.value))
#: How many notifications may wait to be sent; more are dropped (and logged).
QUEUE_MAX = 10_000
#: How many are being sent (or waiting to be retried) at once.
SENDING_MAX = 64
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$|^\[[0-9a-f:.]+\]$|^[0-9a-f:.]+$")
_MAX_WAIT = 300.0


def parse_webhooks(value: object) -> str | list[str]:
    """The ``webhooks`` setting: "off", "any", or hosts (a list, or comma-separated)."""
    if isinstance(value, str) and value.strip().lower() in ("off", "any", "none", ""):
        v = value.strip().lower()
        return "any" if v == "any" else "off"
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(h, str) for h in items):
        raise ValueError('"off", "any", or a list of host names, e.g. ["hooks.slack.com"]')
    hosts = [h.strip().lower() for h in items if h.strip()]
    for h in hosts:
        if not _HOST_RE.match(h):
            raise ValueError(f"{h!r} is not a host name (write the host only, no scheme, "
                             "port or path)")
    return hosts or "off"


def check_url(url: str, setting: str | Sequence[str]) -> str | None:
    """Why a job may not have this webhook here (None: it may)."""
    if setting == "off":
        return ("webhooks are off on this daemon: ask its admin to allow your webhook's "
                'host (webhooks = ["HOST"] in its config), or use --notify bell with '
                "gpud run in the foreground")
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        parts, host = None, ""
    if parts is None or parts.scheme not in ("http", "https") or not host:
        return f"notify={url!r} is not a webhook URL: write http(s)://HOST/PATH"
    if setting != "any" and host not in setting:
        return (f"this daemon sends webhooks only to {', '.join(setting)}, not to {host}: "
                "ask its admin to add that host to its webhooks setting")
    return None


def body(job: Job) -> bytes:
    """What the receiver gets: the job's identity and outcome, no payload."""
    doc: dict[str, Any] = {
        "job_id": job.id, "name": job.function, "owner": job.owner, "state": job.state.value,
        "submitted_at": job.submitted_at, "started_at": job.started_at,
        "ended_at": job.ended_at, "attempt": job.attempt, "exit_code": job.exit_code,
        "error": job.error, "wall_seconds": job.wall_seconds, "gpu_seconds": job.gpu_seconds,
        "gpus": list(job.gpus),
        "text": f"gpud job {job.id} ({job.function}) {job.state.value.replace('_', ' ')}"
                + (f": {job.error}" if job.error else ""),
    }
    return json.dumps(doc).encode()


class Notifier:
    """The daemon's webhook sender: :meth:`job_ended` from the loop, :meth:`run` as its
    own task."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._send, self._receive = trio.open_memory_channel[tuple[Job, float]](QUEUE_MAX)
        self.delivered = 0  # counters for the log and tests
        self.dropped = 0

    def job_ended(self, job: Job) -> None:
        """Queue the job's notification if it asked for one for this state (never
        blocks: a full queue drops it, saying so)."""
        if job.notify is None or job.state.value not in job.notify_on:
            return
        try:
            self._send.send_nowait((job, trio.current_time()))
        except trio.WouldBlock:
            self.dropped += 1
            log.warning("webhook for job %s dropped: %d notifications are waiting already",
                        job.id, QUEUE_MAX)

    async def run(self) -> None:
        limiter = trio.CapacityLimiter(SENDING_MAX)
        import httpx  # only a daemon that sends webhooks pays for importing it

        async with httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client, \
                trio.open_nursery() as nursery:
            try:
                async for job, ended in self._receive:
                    await limiter.acquire_on_behalf_of(job.id)
                    nursery.start_soon(self._deliver, client, job, ended, limiter)
            finally:
                waiting = self._receive.statistics().current_buffer_used
                if waiting:
                    log.warning("%d webhook notifications were not sent before the "
                                "daemon stopped", waiting)

    async def _deliver(self, client: Any, job: Job, ended: float,
                       limiter: trio.CapacityLimiter) -> None:
        try:
            await self._post(client, job, ended)
        finally:
            limiter.release_on_behalf_of(job.id)

    async def _post(self, client: Any, job: Job, ended: float) -> None:
        import httpx

        assert job.notify is not None
        data = body(job)
        deadline = ended + self.config.webhook_retry_for
        wait = max(0.01, self.config.webhook_backoff)
        tries = 0
        while True:
            tries += 1
            try:
                resp = await client.post(job.notify, content=data, headers={
                    "content-type": "application/json", "user-agent": "gpud-webhook"})
                if 200 <= resp.status_code < 300:
                    self.delivered += 1
                    log.info("webhook for job %s (%s) delivered (try %d)", job.id,
                             job.state.value, tries)
                    return
                why = f"HTTP {resp.status_code}"
            except httpx.HTTPError as e:
                why = f"{type(e).__name__}: {e}"
            now = trio.current_time()
            if now + wait > deadline or math.isinf(wait):
                self.dropped += 1
                log.warning("webhook for job %s dropped after %d tries (%s)", job.id, tries,
                            why)
                return
            log.info("webhook for job %s not delivered (%s): trying again in %g s", job.id,
                     why, wait)
            await trio.sleep(wait)
            wait = min(wait * 2, _MAX_WAIT)
