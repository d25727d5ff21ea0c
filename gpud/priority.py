"""Quick requests first (#12): the scheduler lets a quick request's answer go before it
starts more jobs.

Why. During a sweep the daemon's one event loop is busy all the time with the sweep's
jobs: each start, hand-off and end is a few task steps, and a `.map` of no-ops makes
hundreds a second. Trio runs every task that is ready, in turn, so a request from
another user (`gpud ps`, the TUI) waits a whole batch of the sweep's steps at each of
its own awaits (reading the request, the ledger read, sending the answer): measured at
p99 several hundred ms on a 2-core box, against a target of 50 ms (docs/performance.md).

What. While a quick request is being answered, each scheduling round waits (at most
:data:`MAX_YIELD`) for it to be answered before it starts jobs. The jobs already running
go on; no new ones are started, so within a few steps the loop has little else to do
than the request. The wait is bounded, and a round that waited its longest is not made
to wait again before it has run, so a stream of requests slows scheduling down but
never stops it.

Which requests are quick: reads that answer from the daemon's state (GET), except those
that wait for jobs: a long-poll (``/wait``, ``/outcome``, ``/jobs/run``), a stream
(``/logs``, ``/stream``, ``/results``, ``/events``). Holding a round for one of those
would hold up the very job it waits for. Writes (submit, cancel) are not made quick:
a submit is followed by a wait anyway, and a sweep's own submits must not slow itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import trio

__all__ = ["MAX_YIELD", "Interactive", "QuickFirst", "is_quick"]

#: The longest a scheduling round waits for quick requests to be answered.
MAX_YIELD = 0.05

#: Path endings of GET routes that wait for jobs (long-polls, streams): never quick.
_WAITING = ("/wait", "/outcome", "/logs", "/stream", "/results", "/events")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_quick(method: str, path: str) -> bool:
    """Whether a request answers from the daemon's state, without waiting for any job."""
    if method not in ("GET", "HEAD"):
        return False
    return not path.rstrip("/").endswith(_WAITING)


class Interactive:
    """The quick requests being answered now, and the scheduler's wait for them."""

    def __init__(self) -> None:
        self._serving = 0
        self._idle = trio.Event()
        self._idle.set()
        #: rounds that waited, and how long in all (seconds): for the tests and /metrics
        self.yields = 0
        self.yielded = 0.0

    @property
    def serving(self) -> int:
        return self._serving

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Held while a quick request is answered."""
        if self._serving == 0:
            self._idle = trio.Event()
        self._serving += 1
        try:
            yield
        finally:
            self._serving -= 1
            if self._serving == 0:
                self._idle.set()

    async def yield_to_requests(self, max_wait: float = MAX_YIELD) -> float:
        """Wait until no quick request is being answered, or ``max_wait`` seconds; return
        how long it waited. Returns at once when none is."""
        if self._serving == 0:
            return 0.0
        t0 = trio.current_time()
        with trio.move_on_after(max_wait):
            await self._idle.wait()
        waited = trio.current_time() - t0
        self.yields += 1
        self.yielded += waited
        return waited


class QuickFirst:
    """ASGI middleware: holds :meth:`Interactive.answering` from a quick request's start
    until the first part of its answer's body is sent (or the app returns)."""

    def __init__(self, app: ASGIApp, interactive: Interactive) -> None:
        self.app = app
        self.interactive = interactive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or not is_quick(
            str(scope.get("method", "")), str(scope.get("path", ""))
        ):
            await self.app(scope, receive, send)
            return
        with contextlib.ExitStack() as held:
            held.enter_context(self.interactive.answering())

            async def answered(message: Message) -> None:
                await send(message)
                if message.get("type") == "http.response.body":
                    held.close()  # the answer is on its way: the scheduler may go on

            await self.app(scope, receive, answered)
