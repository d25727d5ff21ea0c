"""Thin HTTP clients for the gpud daemon's API, one method per endpoint.

:class:`Client` is synchronous (the decorator API and the CLI use it), over the standard
library (:mod:`gpud_client.wire`: importing httpx would cost every `gpud ps` ~0.3 s, #12);
:class:`AsyncClient` has the same methods as coroutines (the TUI uses it, under trio:
httpx reaches trio through anyio), and imports httpx when it is first made. Both share
one error mapping and one retry policy. Both speak to a Unix socket
(``unix:///run/gpud/gpud.sock``) or TCP (``http://host:port``). Bodies are the msgspec
models of :mod:`gpud_client.models`.

Failures become :class:`~gpud_client.errors.GpudError` subclasses: an error status is an
:class:`ApiError` built from the daemon's JSON error body; a socket that is missing or
refuses connections is :class:`DaemonUnavailable`, whose message says how to start one.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar
from urllib.parse import quote

import msgspec

from gpud_client import wire
from gpud_client.errors import ApiError, DaemonUnavailable, GpudError
from gpud_client.models import (
    API_PREFIX,
    BatchInfo,
    BatchResult,
    BatchSubmitRequest,
    BatchSubmitResponse,
    ErrorBody,
    EventList,
    GcReport,
    GcRequest,
    GpuHistory,
    GpuList,
    Health,
    ImageBuildEvent,
    ImageBuildRequest,
    ImageList,
    JobEvent,
    JobInfo,
    JobList,
    JobOutcome,
    QueuePage,
    SnapshotInfo,
    SnapshotList,
    StateList,
    SubmitRequest,
    UsageReport,
    WhoAmI,
)
from gpud_client.paths import normalise_url, resolve_url
from gpud_client.tokens import load_token

if TYPE_CHECKING:
    import httpx

__all__ = ["DEFAULT_TIMEOUT", "MAX_WAIT", "SUBMIT_RETRY", "AsyncClient", "Client"]

T = TypeVar("T")

#: Seconds to connect and to get an answer from an ordinary (non-waiting) request.
DEFAULT_TIMEOUT = 30.0
#: The longest a ``/wait`` request is held open by the daemon; longer waits loop.
MAX_WAIT = 60.0
#: How long ``cancel`` may take by default: the daemon answers once the job is final,
#: which includes the grace period it gives a process to exit after SIGTERM.
CANCEL_TIMEOUT = 120.0
#: How long a submit keeps trying, with one idempotency key, once it may have reached the
#: daemon (the connection dropped, or no answer came): long enough for a daemon restart.
SUBMIT_RETRY = 60.0
#: ... and when it never connected (no daemon, or one restarting): fail fast-ish.
SUBMIT_CONNECT_RETRY = 5.0
_JSON_HEADERS = {"content-type": "application/json"}
_USER_AGENT = "gpud-client"


# ---------------------------------------------------------------------------------------
# What each endpoint is, shared by the sync and the async client.


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    method: str
    path: str
    model: type[T]
    params: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    #: the read timeout in seconds when it differs from the client's; None = no limit
    read_timeout: float | None | bool = False


def _states(state: str | Iterable[str] | None) -> str | None:
    if state is None:
        return None
    if isinstance(state, str):
        return state
    return ",".join(state)


def _list_call(
    state: str | Iterable[str] | None, limit: int, cursor: int | None, owner: str | None = None
) -> _Call[JobList]:
    params = {"limit": str(limit)}
    if (states := _states(state)) is not None:
        params["state"] = states
    if cursor is not None:
        params["cursor"] = str(cursor)
    if owner:
        params["owner"] = owner
    return _Call("GET", "/jobs", JobList, params)


def _queue_call(offset: int, limit: int) -> _Call[QueuePage]:
    return _Call("GET", "/queue", QueuePage, {"offset": str(offset), "limit": str(limit)})


def _events_call(after: int, limit: int, job_id: int | None) -> _Call[EventList]:
    params = {"after": str(after), "limit": str(limit)}
    if job_id is not None:
        params["job_id"] = str(job_id)
    return _Call("GET", "/events", EventList, params)


def _history_call(since: float | None) -> _Call[GpuHistory]:
    # repr keeps every digit of the float, so no reading is fetched twice.
    return _Call(
        "GET", "/gpus/history", GpuHistory, {} if since is None else {"since": repr(float(since))}
    )


def _wait_call(job_id: int, timeout: float, client_timeout: float) -> _Call[JobInfo]:
    wait = max(0.0, min(float(timeout), MAX_WAIT))
    # The daemon holds the request for up to `wait` seconds; allow for that plus the
    # ordinary latency so that a long poll is not mistaken for a hung daemon.
    return _Call(
        "GET",
        f"/jobs/{job_id}/wait",
        JobInfo,
        {"timeout": f"{wait:g}"},
        read_timeout=wait + client_timeout,
    )


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


def _gc_call(dry_run: bool) -> _Call[GcReport]:
    # A first collection on a box with a long history can take minutes: no read timeout.
    return _Call(
        "POST",
        "/admin/gc",
        GcReport,
        body=msgspec.json.encode(GcRequest(dry_run=dry_run)),
        read_timeout=None,
    )


def _logs_params(follow: bool, offset: int) -> dict[str, str]:
    return {"follow": "true" if follow else "false", "offset": str(offset)}


def _usage_params(
    since: float | None, until: float | None, user: str | None, by: str
) -> dict[str, str]:
    params = {"by": by}
    if since is not None:
        params["since"] = repr(float(since))
    if until is not None:
        params["until"] = repr(float(until))
    if user:
        params["user"] = user
    return params


# ---------------------------------------------------------------------------------------
# Connection setup and error mapping


def _headers(token: str | None) -> dict[str, str]:
    """The headers of every request: the API token, when there is one (#5)."""
    headers = {"user-agent": _USER_AGENT}
    token = token or load_token()
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


class _Answer(Protocol):
    """What the shared error mapping reads of an answer: a wire.Response or an
    httpx.Response."""

    @property
    def status_code(self) -> int: ...

    @property
    def reason_phrase(self) -> str: ...

    @property
    def headers(self) -> Any: ...

    @property
    def content(self) -> bytes: ...

    @property
    def text(self) -> str: ...

    @property
    def is_success(self) -> bool: ...


def _timeouts(call: _Call[Any], client_timeout: float) -> tuple[float, float | None]:
    """(connect, read) seconds for this call; a read of None has no limit."""
    if call.read_timeout is False:
        return client_timeout, client_timeout
    return client_timeout, None if call.read_timeout is None else float(call.read_timeout)


def _from_httpx(e: httpx.TransportError) -> wire.TransportError:
    """The async client's httpx error as the transport's own kind, so that one mapping
    (below) and one retry policy serve both clients; the cause chain (the OSError) stays."""
    import httpx

    kind: type[wire.TransportError]
    if isinstance(e, httpx.ConnectTimeout):
        kind = wire.ConnectTimeout
    elif isinstance(e, httpx.ConnectError):
        kind = wire.ConnectError
    elif isinstance(e, httpx.TimeoutException):
        kind = wire.ReadTimeout
    else:
        kind = wire.RemoteProtocolError
    out = kind(str(e))
    out.__cause__ = e
    return out


def _transport_error(url: str, e: wire.TransportError) -> GpudError:
    if isinstance(e, wire.TimeoutException) and not isinstance(e, wire.ConnectTimeout):
        return GpudError(f"the gpud daemon at {url} did not answer in time ({type(e).__name__})")
    if url.startswith("unix://") and not os.path.exists(url.removeprefix("unix://")):
        reason = "the socket does not exist"
    elif isinstance(e, wire.ConnectError):
        reason = str(e) or "connection failed"
    else:
        # The connection was made and then dropped: the daemon died or restarted.
        reason = f"connection lost: {e or type(e).__name__}"
    return DaemonUnavailable(url, reason)


#: A daemon over its budget for request bodies answers 503 with Retry-After (#10): wait
#: and send again, at most this many times and this long in all.
BUSY_RETRIES = 16
BUSY_WAIT_MAX = 120.0
#: A Unix socket whose listen backlog is full refuses connect() with EAGAIN: a burst, not
#: a missing daemon. Try again for this long before saying nobody answers.
CONNECT_RETRY_FOR = 5.0


def _busy_delay(resp: _Answer, attempt: int, waited: float) -> float | None:
    """Seconds to wait before sending again, or None to take this answer as it is."""
    if resp.status_code != 503 or attempt >= BUSY_RETRIES:
        return None
    raw = resp.headers.get("retry-after", "")
    try:
        after = float(raw)
    except ValueError:
        return None  # no Retry-After (the executor is down): say so at once
    # Back off further on every refusal, with jitter so that refused clients spread out.
    import random  # here: only a refused request needs it (#12: start-up of `gpud ps`)

    delay = min(max(after, 0.1) * (1.5**attempt), 10.0) * random.uniform(0.8, 1.2)
    return delay if waited + delay <= BUSY_WAIT_MAX else None


def _connect_busy(e: wire.TransportError) -> bool:
    """True for a connect() refused with EAGAIN (the daemon's backlog is full)."""
    if not isinstance(e, wire.ConnectError):
        return False
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno == errno.EAGAIN:
            return True
        seen = seen.__cause__ or seen.__context__
    return "Resource temporarily unavailable" in str(e)


def _api_error(resp: _Answer) -> ApiError:
    try:
        body = msgspec.json.decode(resp.content, type=ErrorBody)
    except msgspec.DecodeError:
        # Not the daemon's error format (a proxy in between, a crash page): keep the text.
        text = resp.text.strip()[:500] or resp.reason_phrase
        return ApiError(resp.status_code, f"http_{resp.status_code}", text)
    return ApiError(resp.status_code, body.error, body.detail)


def _decode(url: str, call: _Call[Any], resp: _Answer, model: type[T]) -> T:
    if not resp.is_success:
        raise _api_error(resp)
    try:
        return msgspec.json.decode(resp.content, type=model)
    except msgspec.DecodeError as e:
        raise GpudError(
            f"unexpected answer from the gpud daemon at {url} to "
            f"{call.method} {API_PREFIX}{call.path}: {e} "
            "(are the client and the daemon the same version?)"
        ) from e


_Req = TypeVar("_Req", SubmitRequest, BatchSubmitRequest)


def _keyed(request: _Req) -> _Req:
    """The request with an idempotency key (a new random one unless the caller chose
    one): every retry of this submit sends the same key, so the daemon makes its jobs
    once (docs/api.md, "Idempotent submits")."""
    if request.idempotency_key is not None:
        return request
    import uuid  # here: only a submit needs it

    return msgspec.structs.replace(request, idempotency_key=uuid.uuid4().hex)


class _Retry:
    """When to send a request again, one policy for every request.

    Any request: a connect() refused with EAGAIN (a full backlog) within
    CONNECT_RETRY_FOR, and a 503 with Retry-After (a daemon over its body budget, a
    locked ledger), backing off as :func:`_busy_delay` says. An idempotent submit (it
    carries its key) also on any other connection error or 503, within SUBMIT_RETRY
    seconds (SUBMIT_CONNECT_RETRY while no connection was ever made), backing off from
    0.1 s to 2 s."""

    def __init__(self, *, idempotent: bool) -> None:
        self.idempotent = idempotent
        self.start = time.monotonic()
        self.reached = False
        self.delay = 0.1
        self.attempt = 0
        self.waited = 0.0

    def after_error(self, e: wire.TransportError) -> float | None:
        if _connect_busy(e) and time.monotonic() - self.start < CONNECT_RETRY_FOR:
            import random

            return random.uniform(0.02, 0.1)
        if not self.idempotent:
            return None
        if not isinstance(e, wire.ConnectError | wire.ConnectTimeout):
            self.reached = True  # it may have gone in: only the key can tell now
        return self._next()

    def after_response(self, resp: _Answer) -> float | None:
        if resp.status_code != 503:
            return None
        busy = _busy_delay(resp, self.attempt, self.waited)
        if busy is not None:
            self.attempt += 1
            self.waited += busy
            return busy
        if not self.idempotent:
            return None
        self.reached = True
        return self._next()

    def _next(self) -> float | None:
        budget = SUBMIT_RETRY if self.reached else SUBMIT_CONNECT_RETRY
        delay = self.delay
        if time.monotonic() + delay - self.start > budget:
            return None
        self.delay = min(self.delay * 2, 2.0)
        return delay


def _request_kwargs(call: _Call[Any], client_timeout: float) -> dict[str, Any]:
    """The async client's httpx arguments for this call."""
    import httpx

    connect, read = _timeouts(call, client_timeout)
    kwargs: dict[str, Any] = {"params": call.params, "timeout": httpx.Timeout(connect, read=read)}
    if call.body is not None:
        kwargs["content"] = call.body
        kwargs["headers"] = _JSON_HEADERS
    return kwargs


class _Base:
    url: str
    timeout: float

    def __init__(self, url: str | None, timeout: float) -> None:
        self.url = normalise_url(url) if url else resolve_url()
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# ---------------------------------------------------------------------------------------


class Client(_Base):
    """A synchronous connection to one gpud daemon.

    ``url`` defaults to :func:`gpud_client.paths.resolve_url` (``$GPUD_URL``, the client
    config, then the default sockets); ``token`` to :func:`gpud_client.tokens.load_token`
    (``$GPUD_TOKEN``, then the token file). Use it as a context manager, or call
    :meth:`close`.
    """

    def __init__(
        self, url: str | None = None, timeout: float = DEFAULT_TIMEOUT, token: str | None = None
    ) -> None:
        super().__init__(url, timeout)
        self._http = wire.Transport(self.url, _headers(token))
        # A Client dropped without close() (a Function copy made by with_options, say)
        # still returns its connections when it is garbage-collected.
        self._finalizer = weakref.finalize(self, self._http.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()

    def _send(
        self, call: _Call[Any], *, idempotent: bool = False, stream: bool = False
    ) -> wire.Response:
        """Send ``call`` (again while the retry policy says so) and return its answer,
        whole or (``stream``) with its body unread."""
        retry = _Retry(idempotent=idempotent)
        connect, read = _timeouts(call, self.timeout)
        while True:
            try:
                resp = self._http.request(
                    call.method,
                    API_PREFIX + call.path,
                    params=call.params,
                    body=call.body,
                    headers=_JSON_HEADERS if call.body is not None else None,
                    connect_timeout=connect,
                    read_timeout=read,
                    stream=stream,
                )
            except wire.TransportError as e:
                if (delay := retry.after_error(e)) is None:
                    raise _transport_error(self.url, e) from e
            else:
                if (delay := retry.after_response(resp)) is None:
                    return resp
                resp.close()
            time.sleep(delay)

    def _do(self, call: _Call[T]) -> T:
        return _decode(self.url, call, self._send(call), call.model)

    @contextlib.contextmanager
    def _stream(self, call: _Call[Any], *, idempotent: bool = False) -> Iterator[wire.Response]:
        """A streamed answer, sent again as :meth:`_send` does until its status came;
        a dropped connection after that raises DaemonUnavailable (the caller resumes)."""
        resp = self._send(call, idempotent=idempotent, stream=True)
        try:
            if not resp.is_success:
                resp.read()
                raise _api_error(resp)
            yield resp
        except wire.TransportError as e:
            raise _transport_error(self.url, e) from e
        finally:
            resp.close()

    def _ndjson(self, call: _Call[T], *, idempotent: bool = False) -> Iterator[T]:
        decoder = msgspec.json.Decoder(call.model)
        with self._stream(call, idempotent=idempotent) as resp:
            for line in resp.iter_lines():
                if line.strip():
                    try:
                        yield decoder.decode(line)
                    except msgspec.DecodeError as e:
                        raise GpudError(
                            f"unexpected line from the gpud daemon at {self.url} "
                            f"on {call.path}: {e}"
                        ) from e

    def _submit(self, call: _Call[T]) -> T:
        """Send an idempotent submit, again while the daemon cannot be reached."""
        return _decode(self.url, call, self._send(call, idempotent=True), call.model)

    # -- endpoints ------------------------------------------------------------------

    def health(self) -> Health:
        """``GET /v1/health``."""
        return self._do(_Call("GET", "/health", Health))

    def submit(self, request: SubmitRequest) -> JobInfo:
        """``POST /v1/jobs``: queue one job, exactly once (an idempotency key is added,
        and the submit retried with it while the daemon cannot be reached)."""
        body = msgspec.json.encode(_keyed(request))
        return self._submit(_Call("POST", "/jobs", JobInfo, body=body))

    def submit_batch(self, request: BatchSubmitRequest) -> BatchSubmitResponse:
        """``POST /v1/jobs/batch``: queue one job per input; ids come in input order.
        Exactly once, as :meth:`submit`."""
        body = msgspec.json.encode(_keyed(request))
        return self._submit(_Call("POST", "/jobs/batch", BatchSubmitResponse, body=body))

    def run(self, request: SubmitRequest, *, logs: bool = True) -> Iterator[JobEvent]:
        """``POST /v1/jobs/run``: submit one job (exactly once, as :meth:`submit`) and
        follow it on the same connection: a ``job`` event, its ``log`` chunks (with
        ``logs``), then ``end`` with the result inline. If the stream breaks after the
        ``job`` event, follow the job with :meth:`job_stream`."""
        body = msgspec.json.encode(_keyed(request))
        call = _Call(
            "POST", "/jobs/run", JobEvent, {"logs": _bool(logs)}, body=body, read_timeout=None
        )
        return self._ndjson(call, idempotent=True)

    def job_stream(self, job_id: int, *, logs: bool = True, offset: int = 0) -> Iterator[JobEvent]:
        """``GET /v1/jobs/{id}/stream``: as :meth:`run`, for an existing job, its log from
        byte ``offset``."""
        return self._ndjson(
            _Call(
                "GET",
                f"/jobs/{job_id}/stream",
                JobEvent,
                {"logs": _bool(logs), "offset": str(offset)},
                read_timeout=None,
            )
        )

    def batch(self, batch_id: int, *, jobs: bool = False) -> BatchInfo:
        """``GET /v1/batches/{id}``: the batch's size, limit and progress (with ``jobs``,
        its jobs' ids in input order)."""
        return self._do(_Call("GET", f"/batches/{batch_id}", BatchInfo, {"jobs": _bool(jobs)}))

    def batch_results(
        self, batch_id: int, *, order: str = "input", after: int = 0
    ) -> Iterator[BatchResult]:
        """``GET /v1/batches/{id}/results``: one line per finished job as they end, in
        ``order`` "input" (from index ``after``) or "completion"."""
        return self._ndjson(
            _Call(
                "GET",
                f"/batches/{batch_id}/results",
                BatchResult,
                {"order": order, "after": str(after)},
                read_timeout=None,
            )
        )

    def cancel_batch(self, batch_id: int) -> BatchInfo:
        """``POST /v1/batches/{id}/cancel``: cancel the jobs not over; returns once they
        are final."""
        return self._do(_Call("POST", f"/batches/{batch_id}/cancel", BatchInfo, read_timeout=None))

    def list_jobs(
        self,
        state: str | Iterable[str] | None = None,
        *,
        limit: int = 50,
        cursor: int | None = None,
        owner: str | None = None,
    ) -> JobList:
        """``GET /v1/jobs``: newest first; pass ``next_cursor`` back for older pages."""
        return self._do(_list_call(state, limit, cursor, owner))

    def get_job(self, job_id: int) -> JobInfo:
        """``GET /v1/jobs/{id}``."""
        return self._do(_Call("GET", f"/jobs/{job_id}", JobInfo))

    def wait(self, job_id: int, timeout: float = 30.0) -> JobInfo:
        """``GET /v1/jobs/{id}/wait``: the job once final, or as it is after ``timeout``
        seconds (at most :data:`MAX_WAIT`; loop for longer)."""
        return self._do(_wait_call(job_id, timeout, self.timeout))

    def log_bytes(self, job_id: int, *, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        """``GET /v1/jobs/{id}/logs``: raw chunks of combined stdout+stderr from byte
        ``offset``. With ``follow`` it ends once the job is final and all output was sent.
        """
        read_timeout: float | None | bool = None if follow else False
        call = _Call(
            "GET",
            f"/jobs/{job_id}/logs",
            bytes,
            _logs_params(follow, offset),
            read_timeout=read_timeout,
        )
        with self._stream(call) as resp:
            yield from resp.iter_bytes()

    def logs(self, job_id: int, *, follow: bool = False, offset: int = 0) -> Iterator[str]:
        """Like :meth:`log_bytes`, decoded as UTF-8 (invalid bytes replaced). Yields
        chunks as they arrive, not lines, so that progress bars drawn with ``\\r`` work."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for chunk in self.log_bytes(job_id, follow=follow, offset=offset):
            if text := decoder.decode(chunk):
                yield text
        if tail := decoder.decode(b"", final=True):
            yield tail

    def result(self, job_id: int) -> bytes:
        """``GET /v1/jobs/{id}/result``: the worker's ``result.pkl``; load it with
        :func:`gpud_client.payload.load_result`. ApiError ``not_finished`` (409) or
        ``no_result`` (404) otherwise."""
        resp = self._send(_Call("GET", f"/jobs/{job_id}/result", bytes))
        if not resp.is_success:
            raise _api_error(resp)
        return resp.content

    def cancel(self, job_id: int, *, timeout: float | None = CANCEL_TIMEOUT) -> JobInfo:
        """``POST /v1/jobs/{id}/cancel``: returns once the job is final."""
        return self._do(_Call("POST", f"/jobs/{job_id}/cancel", JobInfo, read_timeout=timeout))

    def suspend(self, job_id: int) -> JobInfo:
        """``POST /v1/jobs/{id}/suspend``: stop a running job where it is (#13)."""
        return self._do(_Call("POST", f"/jobs/{job_id}/suspend", JobInfo))

    def resume(self, job_id: int) -> JobInfo:
        """``POST /v1/jobs/{id}/resume``: continue a suspended job once its GPUs are free;
        answers when it runs, or after 10 s with the reason it still waits."""
        return self._do(_Call("POST", f"/jobs/{job_id}/resume", JobInfo, read_timeout=30.0))

    def state_files(self, job_id: int) -> StateList:
        """``GET /v1/jobs/{id}/state``: the files in the job's state directory (#14)."""
        return self._do(_Call("GET", f"/jobs/{job_id}/state", StateList))

    def state_file(self, job_id: int, path: str) -> Iterator[bytes]:
        """``GET /v1/jobs/{id}/state/{path}``: one file of the job's state directory,
        in chunks as they arrive."""
        # Each part encoded, dot-segments too: an HTTP client would resolve "../x"
        # before sending it, and the daemon is the one to refuse it, saying why.
        parts = [
            quote(p, safe="").replace(".", "%2E") if p in (".", "..") else quote(p, safe="")
            for p in path.split("/")
        ]
        call = _Call("GET", f"/jobs/{job_id}/state/{'/'.join(parts)}", bytes, read_timeout=None)
        with self._stream(call) as resp:
            yield from resp.iter_bytes()

    def gpus(self) -> GpuList:
        """``GET /v1/gpus``."""
        return self._do(_Call("GET", "/gpus", GpuList))

    def whoami(self) -> WhoAmI:
        """``GET /v1/whoami``: who the daemon takes this client to be."""
        return self._do(_Call("GET", "/whoami", WhoAmI))

    def usage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        user: str | None = None,
        by: str = "user",
    ) -> UsageReport:
        """``GET /v1/usage``: GPU-seconds and wall time between two Unix times."""
        return self._do(_Call("GET", "/usage", UsageReport, _usage_params(since, until, user, by)))

    def images(self) -> ImageList:
        """``GET /v1/images``."""
        return self._do(_Call("GET", "/images", ImageList))

    def snapshots(self) -> SnapshotList:
        """``GET /v1/snapshots``: yours (an admin's: everyone's)."""
        return self._do(_Call("GET", "/snapshots", SnapshotList))

    def build_image(self, request: ImageBuildRequest) -> Iterator[ImageBuildEvent]:
        """``POST /v1/images/build``: the build's events as they come (log lines, then
        ``done`` or ``error``). Without ``files`` a build that is needed answers ApiError
        ``missing_files`` (409): send them then (see :mod:`gpud_client.imagebuild`)."""
        call = _Call(
            "POST",
            "/images/build",
            ImageBuildEvent,
            body=msgspec.json.encode(request),
            read_timeout=None,
        )
        decoder = msgspec.json.Decoder(ImageBuildEvent)
        with self._stream(call) as resp:
            for line in resp.iter_lines():
                if line.strip():
                    yield decoder.decode(line)

    def remove_snapshot(self, snapshot_id: int) -> SnapshotInfo:
        """``DELETE /v1/snapshots/{id}``: the next call of its function takes a new one."""
        return self._do(_Call("DELETE", f"/snapshots/{snapshot_id}", SnapshotInfo))

    def gpu_history(self, since: float | None = None) -> GpuHistory:
        """``GET /v1/gpus/history``: readings taken after ``since`` (all kept if None)."""
        return self._do(_history_call(since))

    def queue(self, *, offset: int = 0, limit: int = 50) -> QueuePage:
        """``GET /v1/queue``: queued jobs in scheduling order."""
        return self._do(_queue_call(offset, limit))

    def events(self, after: int = 0, *, limit: int = 100, job_id: int | None = None) -> EventList:
        """``GET /v1/events``: the event log after the cursor ``after``, oldest first."""
        return self._do(_events_call(after, limit, job_id))

    def outcome(self, job_id: int) -> JobOutcome:
        """``GET /v1/jobs/{id}/outcome``: how a finished job's function ended."""
        return self._do(_Call("GET", f"/jobs/{job_id}/outcome", JobOutcome))

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """``POST /v1/admin/gc`` (admins): apply the retention settings now, or with
        ``dry_run`` say what that would remove."""
        return self._do(_gc_call(dry_run))


class AsyncClient(_Base):
    """:class:`Client`'s methods as coroutines, for trio or asyncio programs."""

    def __init__(
        self, url: str | None = None, timeout: float = DEFAULT_TIMEOUT, token: str | None = None
    ) -> None:
        super().__init__(url, timeout)
        import httpx  # here, not at the top: only the async client needs it (#12)

        connection: dict[str, Any] = {"base_url": self.url.rstrip("/")}
        if self.url.startswith("unix://"):
            # The host part is never used for routing over a Unix socket; "gpud" makes
            # the Host header recognisable. verify=False: no TLS over a Unix socket.
            connection = {
                "base_url": "http://gpud",
                "transport": httpx.AsyncHTTPTransport(
                    uds=self.url.removeprefix("unix://"), verify=False
                ),
            }
        self._http = httpx.AsyncClient(timeout=timeout, headers=_headers(token), **connection)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[Any], *, idempotent: bool = False) -> httpx.Response:
        import anyio  # httpx's own dependency: sleeps under trio and asyncio alike
        import httpx

        retry = _Retry(idempotent=idempotent)
        while True:
            try:
                resp = await self._http.request(
                    call.method, API_PREFIX + call.path, **_request_kwargs(call, self.timeout)
                )
            except httpx.TransportError as e:
                err = _from_httpx(e)
                if (delay := retry.after_error(err)) is None:
                    raise _transport_error(self.url, err) from e
            else:
                if (delay := retry.after_response(resp)) is None:
                    return resp
                await resp.aclose()
            await anyio.sleep(delay)

    async def _do(self, call: _Call[T]) -> T:
        return _decode(self.url, call, await self._send(call), call.model)

    async def _submit(self, call: _Call[T]) -> T:
        return _decode(self.url, call, await self._send(call, idempotent=True), call.model)

    async def health(self) -> Health:
        return await self._do(_Call("GET", "/health", Health))

    async def submit(self, request: SubmitRequest) -> JobInfo:
        body = msgspec.json.encode(_keyed(request))
        return await self._submit(_Call("POST", "/jobs", JobInfo, body=body))

    async def submit_batch(self, request: BatchSubmitRequest) -> BatchSubmitResponse:
        body = msgspec.json.encode(_keyed(request))
        return await self._submit(_Call("POST", "/jobs/batch", BatchSubmitResponse, body=body))

    async def list_jobs(
        self,
        state: str | Iterable[str] | None = None,
        *,
        limit: int = 50,
        cursor: int | None = None,
        owner: str | None = None,
    ) -> JobList:
        return await self._do(_list_call(state, limit, cursor, owner))

    async def get_job(self, job_id: int) -> JobInfo:
        return await self._do(_Call("GET", f"/jobs/{job_id}", JobInfo))

    # The timeout is the daemon's long-poll duration, not a local cancel scope.
    async def wait(self, job_id: int, timeout: float = 30.0) -> JobInfo:  # noqa: ASYNC109 - see above
        return await self._do(_wait_call(job_id, timeout, self.timeout))

    async def log_bytes(
        self, job_id: int, *, follow: bool = False, offset: int = 0
    ) -> AsyncGenerator[bytes, None]:
        """See :meth:`Client.log_bytes`. Close it with ``contextlib.aclosing`` when you
        stop early: trio does not finalise abandoned async generators for you."""
        import httpx

        read_timeout: float | None | bool = None if follow else False
        call = _Call(
            "GET",
            f"/jobs/{job_id}/logs",
            bytes,
            _logs_params(follow, offset),
            read_timeout=read_timeout,
        )
        try:
            async with self._http.stream(
                "GET", API_PREFIX + call.path, **_request_kwargs(call, self.timeout)
            ) as resp:
                if not resp.is_success:
                    await resp.aread()
                    raise _api_error(resp)
                async for chunk in resp.aiter_bytes():
                    yield chunk
        except httpx.TransportError as e:
            raise _transport_error(self.url, _from_httpx(e)) from e

    async def logs(
        self, job_id: int, *, follow: bool = False, offset: int = 0
    ) -> AsyncIterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        chunks = self.log_bytes(job_id, follow=follow, offset=offset)
        try:
            async for chunk in chunks:
                if text := decoder.decode(chunk):
                    yield text
        finally:
            await chunks.aclose()
        if tail := decoder.decode(b"", final=True):
            yield tail

    async def result(self, job_id: int) -> bytes:
        resp = await self._send(_Call("GET", f"/jobs/{job_id}/result", bytes))
        if not resp.is_success:
            raise _api_error(resp)
        return resp.content

    async def cancel(
        self,
        job_id: int,
        *,
        timeout: float | None = CANCEL_TIMEOUT,  # noqa: ASYNC109 - the daemon's wait, sent to it
    ) -> JobInfo:
        return await self._do(
            _Call("POST", f"/jobs/{job_id}/cancel", JobInfo, read_timeout=timeout)
        )

    async def suspend(self, job_id: int) -> JobInfo:
        return await self._do(_Call("POST", f"/jobs/{job_id}/suspend", JobInfo))

    async def resume(self, job_id: int) -> JobInfo:
        return await self._do(_Call("POST", f"/jobs/{job_id}/resume", JobInfo, read_timeout=30.0))

    async def gpus(self) -> GpuList:
        return await self._do(_Call("GET", "/gpus", GpuList))

    async def whoami(self) -> WhoAmI:
        return await self._do(_Call("GET", "/whoami", WhoAmI))

    async def usage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        user: str | None = None,
        by: str = "user",
    ) -> UsageReport:
        return await self._do(
            _Call("GET", "/usage", UsageReport, _usage_params(since, until, user, by))
        )

    async def images(self) -> ImageList:
        return await self._do(_Call("GET", "/images", ImageList))

    async def snapshots(self) -> SnapshotList:
        return await self._do(_Call("GET", "/snapshots", SnapshotList))

    async def remove_snapshot(self, snapshot_id: int) -> SnapshotInfo:
        return await self._do(_Call("DELETE", f"/snapshots/{snapshot_id}", SnapshotInfo))

    async def gpu_history(self, since: float | None = None) -> GpuHistory:
        return await self._do(_history_call(since))

    async def queue(self, *, offset: int = 0, limit: int = 50) -> QueuePage:
        return await self._do(_queue_call(offset, limit))

    async def events(
        self, after: int = 0, *, limit: int = 100, job_id: int | None = None
    ) -> EventList:
        return await self._do(_events_call(after, limit, job_id))

    async def outcome(self, job_id: int) -> JobOutcome:
        return await self._do(_Call("GET", f"/jobs/{job_id}/outcome", JobOutcome))

    async def batch(self, batch_id: int, *, jobs: bool = False) -> BatchInfo:
        return await self._do(
            _Call("GET", f"/batches/{batch_id}", BatchInfo, {"jobs": _bool(jobs)})
        )

    async def cancel_batch(self, batch_id: int) -> BatchInfo:
        return await self._do(
            _Call("POST", f"/batches/{batch_id}/cancel", BatchInfo, read_timeout=None)
        )

    async def gc(self, *, dry_run: bool = False) -> GcReport:
        return await self._do(_gc_call(dry_run))
