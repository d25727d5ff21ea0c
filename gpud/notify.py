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

Who may be notified is the admin's (gpud.webhooks): ``webhooks = "off"`` (the default),
``"any"``, or a list of hosts: see there why.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import trio

from gpud.config import Config
from gpud.domain import FINAL, Job

__all__ = ["NOTIFY_STATES", "Notifier", "body"]

log = logging.getLogger("gpud.notify")

#: The states a notification may be asked for: every final one.
NOTIFY_STATES: tuple[str, ...] = tuple(s.value for s in sorted(FINAL, key=lambda s: s.value))
#: How many notifications may wait to be sent; more are dropped (and logged).
QUEUE_MAX = 10_000
#: How many are being sent (or waiting to be retried) at once.
SENDING_MAX = 64
_MAX_WAIT = 300.0


def body(job: Job) -> bytes:
    """What the receiver gets: the job's identity and outcome, no payload."""
    doc: dict[str, Any] = {
        "job_id": job.id,
        "name": job.function,
        "owner": job.owner,
        "state": job.state.value,
        "submitted_at": job.submitted_at,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
        "attempt": job.attempt,
        "exit_code": job.exit_code,
        "error": job.error,
        "wall_seconds": job.wall_seconds,
        "gpu_seconds": job.gpu_seconds,
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
            log.warning(
                "webhook for job %s dropped: %d notifications are waiting already",
                job.id,
                QUEUE_MAX,
            )

    async def run(self) -> None:
        limiter = trio.CapacityLimiter(SENDING_MAX)
        import httpx  # only a daemon that sends webhooks pays for importing it

        async with (
            httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client,
            trio.open_nursery() as nursery,
        ):
            try:
                async for job, ended in self._receive:
                    await limiter.acquire_on_behalf_of(job.id)
                    nursery.start_soon(self._deliver, client, job, ended, limiter)
            finally:
                waiting = self._receive.statistics().current_buffer_used
                if waiting:
                    log.warning(
                        "%d webhook notifications were not sent before the daemon stopped", waiting
                    )

    async def _deliver(
        self, client: Any, job: Job, ended: float, limiter: trio.CapacityLimiter
    ) -> None:
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
                resp = await client.post(
                    job.notify,
                    content=data,
                    headers={"content-type": "application/json", "user-agent": "gpud-webhook"},
                )
                if 200 <= resp.status_code < 300:
                    self.delivered += 1
                    log.info(
                        "webhook for job %s (%s) delivered (try %d)", job.id, job.state.value, tries
                    )
                    return
                why = f"HTTP {resp.status_code}"
            except httpx.HTTPError as e:
                why = f"{type(e).__name__}: {e}"
            now = trio.current_time()
            if now + wait > deadline or math.isinf(wait):
                self.dropped += 1
                log.warning("webhook for job %s dropped after %d tries (%s)", job.id, tries, why)
                return
            log.info(
                "webhook for job %s not delivered (%s): trying again in %g s", job.id, why, wait
            )
            await trio.sleep(wait)
            wait = min(wait * 2, _MAX_WAIT)
