"""What the TUI knows about the daemon, and how it keeps that fresh cheaply.

:class:`Poller` asks the daemon, through :class:`gpud_client.AsyncClient` only, for:

* the GPUs, every tick (they change without any job changing);
* only the GPU readings newer than the last one it has (``gpu_history(since=...)``),
  kept here in a ring per GPU for the sparklines;
* the event log after its cursor: one small answer that says whether any job changed.
  The jobs table (one page of the ledger, never all of it) and the running jobs are
  re-read only when it does;
* the first page of the queue, every tick (reasons and positions change with the GPUs).

So an idle box costs four small requests a tick, whatever the size of the ledger.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gpud_client.models import (
    EventList,
    GpuHistory,
    GpuList,
    Health,
    JobInfo,
    JobList,
    JobOutcome,
    QueuePage,
)

__all__ = ["DaemonClient", "JobsQuery", "Poller", "Series", "Snapshot"]

#: The most readings kept per GPU: five minutes at the default two-second poll.
MAX_SAMPLES = 150


class DaemonClient(Protocol):
    """The part of :class:`gpud_client.AsyncClient` the TUI uses (tests may stand in)."""

    url: str

    async def health(self) -> Health: ...
    async def gpus(self) -> GpuList: ...
    async def gpu_history(self, since: float | None = None) -> GpuHistory: ...
    async def events(
        self, after: int = 0, *, limit: int = 100, job_id: int | None = None
    ) -> EventList: ...
    async def queue(self, *, offset: int = 0, limit: int = 50) -> QueuePage: ...
    async def list_jobs(
        self,
        state: Any = None,
        *,
        limit: int = 50,
        cursor: int | None = None,
        owner: str | None = None,
    ) -> JobList: ...
    async def get_job(self, job_id: int) -> JobInfo: ...
    async def outcome(self, job_id: int) -> JobOutcome: ...
    async def result(self, job_id: int) -> bytes: ...
    async def cancel(self, job_id: int, *, timeout: float | None = ...) -> JobInfo: ...  # noqa: ASYNC109 - the client's signature
    def log_bytes(self, job_id: int, *, follow: bool = False, offset: int = 0) -> Any: ...
    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class JobsQuery:
    """Which page of which jobs the jobs table shows."""

    #: None: every state
    states: tuple[str, ...] | None = None
    owner: str | None = None
    page_size: int = 100
    #: None: the newest page; else the ``next_cursor`` that led to this page
    cursor: int | None = None
    #: cursors of the newer pages, to page back
    previous: tuple[int | None, ...] = ()

    def older(self, next_cursor: int) -> JobsQuery:
        return replace(self, cursor=next_cursor, previous=(*self.previous, self.cursor))

    def newer(self) -> JobsQuery:
        if not self.previous:
            return self
        return replace(self, cursor=self.previous[-1], previous=self.previous[:-1])

    @property
    def page(self) -> int:
        return len(self.previous) + 1

    def filtered(self, **changes: Any) -> JobsQuery:
        """Another filter: back to the newest page."""
        return replace(self, cursor=None, previous=(), **changes)


@dataclass
class Series:
    """One GPU's recent readings, oldest first."""

    memory_total: int = 0
    utilization: deque[int | None] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    memory: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))


@dataclass
class Snapshot:
    """Everything one tick learnt. ``jobs`` and ``running`` are None when unchanged."""

    at: float
    gpus: GpuList
    history: dict[str, Series]
    queue: QueuePage
    jobs: JobList | None
    running: list[JobInfo] | None
    query: JobsQuery
    health: Health | None = None


class Poller:
    """Polls one daemon; :meth:`poll` raises whatever the client raises (the app shows it)."""

    def __init__(
        self, client: DaemonClient, *, queue_size: int = 100, clock: Callable[[], float] = time.time
    ) -> None:
        self.client = client
        self.queue_size = queue_size
        self.clock = clock
        self.query = JobsQuery()
        self.history: dict[str, Series] = {}
        self.health: Health | None = None
        self._since: float | None = None
        self._cursor: int | None = None  # the event log, up to here, is reflected
        self._dirty = True

    def set_query(self, query: JobsQuery) -> None:
        self.query = query
        self._dirty = True

    def invalidate_jobs(self) -> None:
        """Re-read the jobs next time, events or not."""
        self._dirty = True

    def invalidate(self) -> None:
        """Re-read everything next time (after a reconnect, or on request)."""
        self._dirty = True
        self._cursor = None
        self.health = None

    async def poll(self) -> Snapshot:
        c = self.client
        fresh_health = None
        if self.health is None:
            self.health = fresh_health = await c.health()
        gpus = await c.gpus()
        self._merge_history(await c.gpu_history(since=self._since))
        await self._check_events()
        queue = await c.queue(limit=self.queue_size)
        jobs = running = None
        query = self.query
        if self._dirty:
            # Clear first: an event that lands while these are read is seen next tick.
            self._dirty = False
            try:
                jobs = await c.list_jobs(
                    query.states, limit=query.page_size, cursor=query.cursor, owner=query.owner
                )
                running = (
                    await c.list_jobs(("starting", "running"), limit=1000, owner=query.owner)
                ).jobs
            except BaseException:
                self._dirty = True
                raise
        return Snapshot(
            at=self.clock(),
            gpus=gpus,
            history=self.history,
            queue=queue,
            jobs=jobs,
            running=running,
            query=query,
            health=fresh_health,
        )

    async def _check_events(self) -> None:
        if self._cursor is None:
            ev = await self.client.events(0, limit=1)
            self._cursor = ev.latest
            self._dirty = True
            return
        ev = await self.client.events(self._cursor, limit=1)
        if ev.latest < self._cursor:
            # Another ledger behind the same socket: everything we hold is stale.
            self.history.clear()
            self._since = None
            self._dirty = True
        elif ev.events:
            self._dirty = True
        self._cursor = ev.latest

    def _merge_history(self, hist: GpuHistory) -> None:
        live = set()
        for g in hist.gpus:
            live.add(g.uuid)
            s = self.history.get(g.uuid)
            if s is None:
                s = self.history[g.uuid] = Series()
            s.memory_total = g.memory_total
            s.utilization.extend(g.utilization)
            total = g.memory_total or 1
            s.memory.extend(100.0 * m / total for m in g.memory_used)
            if g.at:
                self._since = max(self._since or 0.0, g.at[-1])
        for uuid in set(self.history) - live:
            del self.history[uuid]
