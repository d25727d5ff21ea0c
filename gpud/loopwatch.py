"""Seeing where API latency goes (#12): loop stalls and each request's time in the daemon.

Two tools, both cheap:

* :class:`StallWatch`, a trio instrument. Trio runs one task step at a time; a step that
  takes long (synchronous work between two awaits: storing a big batch, encoding a big
  answer, a scheduling round) holds up every other request. With ``loop_stall_log`` set,
  each step longer than that is logged with its task's name and duration, and counted
  (``gpud_loop_stalls_total`` and the longest in ``/metrics``-style counters below).
* :class:`ServerTiming`, an ASGI middleware that adds ``Server-Timing: app;dur=MS`` to
  every HTTP answer: the time from the daemon taking the request to the answer's first
  byte. A client compares it with its own time for the request: what is left (the
  connection, the kernel, the client's own process waiting for a CPU) is not the daemon's
  handling. ``bench/hot_sweep.py`` reports both.

The header says how long the daemon took, not what it did: no user data, no names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

__all__ = ["SERVER_TIMING", "ServerTiming", "StallWatch"]

log = logging.getLogger("gpud")

SERVER_TIMING = b"server-timing"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class StallWatch(trio.abc.Instrument):
    """Log every trio task step longer than ``threshold`` seconds: while it ran, the
    loop served nothing else (no request was read, none answered)."""

    def __init__(
        self,
        threshold: float,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.threshold = threshold
        self._clock = clock
        self._cpu_clock = cpu_clock
        #: when the running step began, by the wall clock and the loop thread's CPU clock;
        #: None until a step begins (an instrument added mid-step misses that step's start)
        self._started: tuple[float, float] | None = None
        self._gc_started = 0.0
        #: stalls seen, the longest (seconds), and the sum of their lengths
        self.count = 0
        self.worst = 0.0
        self.total = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = (self._clock(), self._cpu_clock())

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return
        took = self._clock() - self._started[0]
        if took > self.threshold:
            self.stalled(task.name, took, self._cpu_clock() - self._started[1])
        self._started = None

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        """For :data:`gc.callbacks`: log each cyclic collection longer than the threshold.
        It runs inside whatever step allocated last, which the stall log then names; with
        100,000 jobs in memory a full collection walks millions of objects (#12)."""
        if phase == "start":
            self._gc_started = self._clock()
            return
        took = self._clock() - self._gc_started
        if took > self.threshold:
            log.warning(
                "gc pause: %.1f ms (generation %d, %d objects freed)",
                took * 1000.0,
                info.get("generation", -1),
                info.get("collected", 0),
            )

    def stalled(self, name: str, took: float, cpu: float) -> None:
        """``took`` seconds of wall time in one step, ``cpu`` of them on the loop thread's
        CPU: the rest it waited for a core, or for the GIL (another thread of the daemon
        held it), not for its own work."""
        self.count += 1
        self.total += took
        self.worst = max(self.worst, took)
        log.warning(
            "loop stall: %.1f ms (cpu %.1f ms) in one step of task %s",
            took * 1000.0,
            cpu * 1000.0,
            name,
        )


class ServerTiming:
    """ASGI middleware: ``Server-Timing: app;dur=MS`` on every HTTP answer (see above).
    WebSockets and lifespan messages pass through untouched."""

    def __init__(self, app: ASGIApp, clock: Callable[[], float] = time.perf_counter) -> None:
        self.app = app
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        t0 = self._clock()

        async def timed(message: Message) -> None:
            if message.get("type") == "http.response.start":
                ms = (self._clock() - t0) * 1000.0
                headers = list(message.get("headers") or [])
                headers.append((SERVER_TIMING, f"app;dur={ms:.2f}".encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, timed)
