"""The daemon's HTTP edge: what no client, however broken or hostile, gets past (#10).

Three things live here, between the socket and the Starlette app:

* **Containment.** hypercorn runs each connection as a task in the server's nursery, so
  an exception that escapes one connection's task ends the whole server, and with it the
  daemon. That happened (#10): a client that sends ``POST`` headers announcing a body and
  closes at once makes two tasks write to the socket together. The reader task answers
  h11's "peer closed connection without sending complete message body" with a 400 while
  the app's task, having answered, half-closes the socket; trio's ``send_eof`` holds the
  stream's send guard across a checkpoint without hypercorn's ``send_lock``, so the 400's
  ``send_all`` raised ``trio.BusyResourceError``, which nothing caught. :class:`EdgeServer`
  closes under the same lock as every send (the race cannot happen), treats a busy or
  broken stream as a closed connection, and, whatever else goes wrong in one connection,
  logs it (rate-limited) and ends that connection only.
* **Read timeouts.** A request head must arrive within ``header_timeout`` of the
  connection opening (or of its first byte, on a kept-alive connection), and a body may
  not stall for longer than ``body_timeout`` between two reads; nor may a client stop
  reading an answer for longer than that. hypercorn's own
  ``read_timeout`` cannot express this: it also applies while the app works on a
  request, which would cut the ``/wait`` long polls.
* **A budget for request bodies in flight** (:class:`BodyBudget`, the ASGI middleware
  :class:`BodyBudgetMiddleware`): ``max_body_bytes`` caps one request; this caps them all
  together, answering ``503`` with ``Retry-After`` when full, so concurrent large submits
  cannot take the daemon's memory.

Every hook leans on hypercorn internals (``hypercorn.trio.tcp_server.TCPServer``, its
``send_lock``, ``stream``, ``protocol``, ``_read_data`` and ``_close``); :func:`install`
checks that they are there and ``tests/test_http_edge.py`` fails loudly if an upgrade
changes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import h11
import msgspec
import trio

__all__ = [
    "BodyBudget",
    "BodyBudgetMiddleware",
    "EdgeSettings",
    "OverBudget",
    "RateLimitFilter",
    "install",
]

log = logging.getLogger("gpud.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class EdgeSettings:
    """Per-daemon limits, carried on hypercorn's Config (``hc.gpud_edge``) because one
    process may serve several daemons (the tests do) while the server class is global."""

    header_timeout: float
    body_timeout: float


# -- rate-limited logging -------------------------------------------------------------


class RateLimitFilter(logging.Filter):
    """Lets one record per kind through every ``interval`` seconds; the next one that
    passes says how many were dropped. A client that repeats a bad request 10,000 times
    must not grow the log by 10,000 tracebacks."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (str(record.msg), exc)
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        if len(self._last) > 1000:  # bounded: forget old kinds
            self._last.clear()
            self._dropped.clear()
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = (
                f"{record.msg} [{dropped} more like this in the last "
                f"{self.interval:g} s not logged]"
            )
        return True


def _install_filter() -> None:
    if not any(isinstance(f, RateLimitFilter) for f in log.filters):
        log.addFilter(RateLimitFilter())


# -- the connection server ------------------------------------------------------------


def _h11_of(server: Any) -> h11.Connection | None:
    """The connection's h11 state machine; None for HTTP/2 or a WebSocket."""
    wrapper = getattr(server, "protocol", None)
    conn = getattr(getattr(wrapper, "protocol", None), "connection", None)
    return conn if isinstance(conn, h11.Connection) else None


def _peer_name(server: Any) -> str:
    sock = getattr(getattr(server, "stream", None), "socket", None)
    try:
        name = sock.getpeername() if sock is not None else None
    except OSError:
        name = None
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return "the Unix socket"


def install() -> bool:
    """Replace hypercorn's trio connection server with :class:`EdgeServer` (once), on top
    of whatever is installed (gpud.peercred's subclass). False when this hypercorn lacks
    what the hooks need; the daemon then refuses to start (see gpud.server)."""
    try:
        import hypercorn.trio.run as run_module
        from hypercorn.events import Closed, RawData
        from hypercorn.trio.tcp_server import MAX_RECV
    except ImportError:
        return False
    base = getattr(run_module, "TCPServer", None)
    needed = ("run", "protocol_send", "_read_data", "_close")
    if not isinstance(base, type) or not all(hasattr(base, n) for n in needed):
        return False
    if getattr(base, "_gpud_edge", False):
        return True
    _install_filter()

    class EdgeServer(base):  # type: ignore[valid-type,misc]  # hypercorn's class, found at run time
        _gpud_edge = True

        async def run(self) -> None:
            self._gpud_opened = trio.current_time()
            try:
                await super().run()
            except* Exception as group:  # noqa: BLE001 - nothing may escape one connection
                # trio.Cancelled (daemon shutdown) is a BaseException: it passes through.
                exc = group.exceptions[0]
                while isinstance(exc, BaseExceptionGroup):
                    exc = exc.exceptions[0]
                log.warning(
                    "a connection from %s failed and was closed: %s: %s",
                    _peer_name(self),
                    type(exc).__name__,
                    exc,
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
                with contextlib.suppress(Exception):
                    await self.stream.aclose()

        async def protocol_send(self, event: Any) -> None:
            edge: EdgeSettings | None = getattr(self.config, "gpud_edge", None)
            if not isinstance(event, RawData) or edge is None:
                await super().protocol_send(event)
                return
            # hypercorn's send, with a deadline: its send_all is shielded with none, so a
            # client that stops reading held the connection, and the send lock that
            # closing it now takes, for ever.
            async with self.send_lock:
                try:
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = trio.current_time() + edge.body_timeout
                        await self.stream.send_all(event.data)
                    if scope.cancelled_caught:  # half sent: the stream is unusable
                        with contextlib.suppress(Exception):
                            await self.stream.aclose()
                        raise trio.BrokenResourceError("the client stopped reading")
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    # Busy: another task is closing this stream; gone either way.
                    await self.protocol.handle(Closed())

        async def _close(self) -> None:
            # Half-close under the send lock, as every send is: trio's send_eof checkpoints
            # inside the stream's send guard, so without the lock another task's send_all
            # in that window raised BusyResourceError (#10). The lock is not re-entrant;
            # a task that already holds it (a failed send closing up) just goes on. A
            # send holds it for body_timeout at most (protocol_send).
            lock: trio.Lock = self.send_lock
            if lock.statistics().owner is trio.lowlevel.current_task():
                await super()._close()
                return
            with trio.CancelScope(shield=True):
                async with lock:
                    await super()._close()

        def _read_deadline(self, head_since: float | None) -> float:
            edge: EdgeSettings | None = getattr(self.config, "gpud_edge", None)
            if edge is None:
                return (
                    math.inf
                    if self.config.read_timeout is None
                    else trio.current_time() + self.config.read_timeout
                )
            conn = _h11_of(self)
            if conn is None:
                # HTTP/2 or a WebSocket (no gpud client speaks them): a stall is a stall.
                return trio.current_time() + max(edge.body_timeout, edge.header_timeout)
            if conn.their_state is h11.IDLE and head_since is not None:
                return head_since + edge.header_timeout
            if conn.their_state is h11.SEND_BODY:
                return trio.current_time() + edge.body_timeout
            # Waiting for the app's answer (a long poll may take minutes), or between
            # requests (hypercorn's keep-alive timeout closes an idle connection).
            return math.inf

        async def _read_data(self) -> None:
            # hypercorn's loop with gpud's deadlines; `head_since` is when the request
            # head being waited for started: the connection's opening for the first one,
            # its first byte for a later one on a kept-alive connection.
            head_since: float | None = self._gpud_opened
            reason = ""
            while True:
                deadline = self._read_deadline(head_since)
                try:
                    with trio.move_on_at(deadline) as scope:
                        data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                if scope.cancelled_caught:
                    conn = _h11_of(self)
                    reason = (
                        "no complete request head"
                        if conn is not None and conn.their_state is h11.IDLE
                        else "the request body stalled"
                    )
                    break
                conn = _h11_of(self)
                if conn is not None and conn.their_state is h11.IDLE and head_since is None:
                    head_since = trio.current_time()
                await self.protocol.handle(RawData(bytes(data)))
                conn = _h11_of(self)
                if conn is None or conn.their_state is not h11.IDLE:
                    head_since = None
                if data == b"":
                    break
            if reason:
                edge = self.config.gpud_edge
                limit = edge.header_timeout if reason.startswith("no") else edge.body_timeout
                log.info(
                    "closed a connection from %s: %s in %g s (header_timeout/body_timeout)",
                    _peer_name(self),
                    reason,
                    limit,
                )
                # Closed outright: a request half received gets no answer to hang on to.
                with contextlib.suppress(Exception):
                    await self.stream.aclose()
            await self.protocol.handle(Closed())
            # Nothing more will be read. hypercorn leaves the keep-alive timer running
            # here, and it held every connection that closed between requests (or before
            # its first one) open, task and socket, for keep_alive_timeout.
            await self.idle_task.stop()

    run_module.TCPServer = EdgeServer  # type: ignore[attr-defined]  # patching hypercorn
    return True


# -- the body budget ------------------------------------------------------------------


class OverBudget(Exception):
    """The bodies of requests in flight would exceed ``max_body_in_flight``."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        super().__init__(budget.refusal())


class BodyBudget:
    """Bytes of request bodies being received or handled, against a limit."""

    def __init__(self, limit: int, retry_after: int = 1) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.in_flight = 0
        self.refused = 0

    def try_take(self, n: int) -> bool:
        if n <= 0:
            return True
        if self.in_flight + n > self.limit:
            self.refused += 1
            return False
        self.in_flight += n
        return True

    def release(self, n: int) -> None:
        self.in_flight = max(0, self.in_flight - n)

    def refusal(self) -> str:
        mib = 2**20
        return (
            f"the daemon is already receiving {self.in_flight / mib:.0f} MiB of request "
            f"bodies (max_body_in_flight = {self.limit / mib:.0f} MiB): retry in "
            f"{self.retry_after} s (gpud's client does), or send less by value"
        )


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim: hands freed heap pages back to the kernel. Without it a few
    large bodies leave the daemon hundreds of MB bigger for good (#10 measured 780 MB)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()
#: Trim after a request that held at least this much body (small ones cost nothing).
TRIM_AFTER = 8 * 2**20


def _declared_length(scope: Scope) -> tuple[int | None, bool]:
    """(Content-Length, chunked) from the request's headers."""
    length, chunked = None, False
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.strip().isdigit():
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked


class BodyBudgetMiddleware:
    """Reserve each request's body in the :class:`BodyBudget` before the app reads it,
    and release it when the app has answered (the decoded request lives until then).

    A declared ``Content-Length`` is reserved up front, so an over-budget request is
    refused before a byte of its body is read. A chunked body is counted as it arrives;
    going over raises :class:`OverBudget` from ``receive`` (``gpud.http_common.read_body``
    turns it into the same 503). Bodies over ``max_body`` pass untouched: the app refuses them
    with 413 from the header alone. The budget's 503s carry ``Retry-After``.
    """

    def __init__(self, app: App, budget: BodyBudget, max_body: int) -> None:
        self.app = app
        self.budget = budget
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, chunked = _declared_length(scope)
        if not chunked and (not declared or declared > self.max_body):
            await self.app(scope, receive, send)
            return
        budget = self.budget
        held = declared if declared is not None and not chunked else 0
        if not budget.try_take(held):
            log.warning(
                "refused %s %s: %s", scope.get("method"), scope.get("path"), budget.refusal()
            )
            await self._refuse(send)
            return
        over = False

        async def counting_receive() -> Message:
            nonlocal held, over
            message = await receive()
            if chunked and message["type"] == "http.request":
                n = len(message.get("body", b""))
                if n and not budget.try_take(n):
                    over = True
                    raise OverBudget(budget)
                held += n
            return message

        async def send_with_retry_after(message: Message) -> None:
            # Only this refusal says when to come back: another 503 (the executor is
            # down) may last, and a client should not wait on it blindly.
            if over and message["type"] == "http.response.start" and message.get("status") == 503:
                headers = [
                    *message.get("headers", ()),
                    (b"retry-after", str(budget.retry_after).encode()),
                ]
                message = dict(message, headers=headers)
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_retry_after)
        finally:
            budget.release(held)
            if held >= TRIM_AFTER and budget.in_flight == 0 and _TRIM is not None:
                # Off the event loop: trimming a fragmented heap takes a few ms.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_TRIM, 0)

    async def _refuse(self, send: Send) -> None:
        body = msgspec.json.encode({"error": "busy", "detail": self.budget.refusal()})
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(self.budget.retry_after).encode()),
                    # The body is not read: the connection cannot carry another request.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
