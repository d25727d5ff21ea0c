"""A submitted job, seen from the caller: wait for it, stream its log, get its value.

A :class:`JobHandle` survives a daemon restart while waiting: the daemon's ledger keeps
the job, so transient connection failures are retried for :data:`RECONNECT_GRACE`
seconds before :class:`~gpud_client.errors.DaemonUnavailable` is raised.
"""

from __future__ import annotations

import codecs
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, Generic, TextIO, TypeVar

from gpud_client.client import MAX_WAIT, Client
from gpud_client.duration import format_duration
from gpud_client.errors import (
    ApiError,
    DaemonUnavailable,
    GpudError,
    JobCancelled,
    JobError,
    JobFailed,
    JobLost,
    JobTimedOut,
)
from gpud_client.models import JobInfo
from gpud_client.payload import load_result

__all__ = ["FINAL_STATES", "RECONNECT_GRACE", "JobHandle", "job_error"]

R = TypeVar("R")

#: The states a job rests in once it is over (mirrors gpud.domain.FINAL, which the
#: client cannot import).
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "timed_out", "lost"})
#: How long a waiting caller keeps retrying while the daemon is unreachable.
RECONNECT_GRACE = 60.0
_RETRY_DELAY = 1.0
#: How long to let the log stream drain once the job is final.
_LOG_DRAIN = 10.0


def job_error(info: JobInfo) -> JobError:
    """The exception for a job that ended without a result of its own to raise."""
    who = f"gpud job {info.id} ({info.name})"
    cls: type[JobError]
    if info.state == "cancelled":
        cls, stem, short, long = JobCancelled, "cancel", "was cancelled", "was cancelled"
    elif info.state == "timed_out":
        cls, stem, short = JobTimedOut, "timed out", "timed out"
        long = f"timed out after {format_duration(info.timeout)}"
    elif info.state == "lost":
        cls, stem, short = JobLost, "lost", "was lost"
        long = "was lost (the daemon lost track of it)"
    else:
        cls, stem, short = JobFailed, "fail", "failed"
        if info.exit_code is not None and info.exit_code < 0:
            long = f"failed: its process was killed by signal {-info.exit_code}"
        elif info.exit_code is not None:
            long = f"failed with exit code {info.exit_code} and no result"
        else:
            long = "failed without a result"
    # The daemon's own words are the most precise when it has them; when they already
    # say what happened ("timed out after 30 s"), do not say it twice.
    error = (info.error or "").strip()
    if not error:
        message = f"{who} {long}"
    elif error.lower().startswith(stem):
        message = f"{who} {error}"
    else:
        message = f"{who} {short}: {error}"
    return cls(message, info)


class _Outage:
    """Tracks one stretch of daemon unavailability, to give up after the grace period."""

    def __init__(self) -> None:
        self.since: float | None = None

    def failed(self, error: DaemonUnavailable) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        elif now - self.since > RECONNECT_GRACE:
            raise error
        time.sleep(_RETRY_DELAY)

    def ok(self) -> None:
        self.since = None


class _LogPump:
    """Copies a job's log to a text stream from a background thread while the caller
    waits in the foreground; the follow stream resumes at its byte offset after a
    dropped connection. It uses its own Client so as not to share a connection pool
    between threads."""

    def __init__(self, url: str, job_id: int, out: TextIO) -> None:
        self._url = url
        self._job_id = job_id
        self._out = out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gpud-logs-{job_id}", daemon=True)
        self._thread.start()

    def finish(self, drain: float) -> None:
        """Let the stream end by itself for up to ``drain`` seconds, then drop the rest."""
        self._thread.join(drain)
        self._stop.set()

    def _write(self, text: str) -> None:
        if text and not self._stop.is_set():
            self._out.write(text)
            self._out.flush()

    def _run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offset = 0
        outage = _Outage()
        try:
            with Client(self._url) as client:
                while not self._stop.is_set():
                    try:
                        for chunk in client.log_bytes(self._job_id, follow=True, offset=offset):
                            offset += len(chunk)
                            self._write(decoder.decode(chunk))
                        outage.ok()
                        if client.get_job(self._job_id).state in FINAL_STATES:
                            break
                        time.sleep(_RETRY_DELAY)  # ended early (e.g. not started yet)
                    except DaemonUnavailable as e:
                        outage.failed(e)
            self._write(decoder.decode(b"", final=True))
        except Exception:
            # The log is a convenience: a failure here (daemon gone for good, a closed
            # stream) must not disturb the caller, who gets the real error from wait().
            pass


class JobHandle(Generic[R]):
    """A handle on one job: ``.get()`` its value, ``.wait()``, ``.logs()``, ``.cancel()``.

    Create one for an existing job with ``JobHandle(job_id, Client(url))``; the handle
    does not own (or close) the client.
    """

    def __init__(self, job_id: int, client: Client, *, info: JobInfo | None = None) -> None:
        self._id = job_id
        self._client = client
        self._info = info

    def __repr__(self) -> str:
        state = f" {self._info.state}" if self._info is not None else ""
        return f"<JobHandle {self._id}{state}>"

    @property
    def id(self) -> int:
        return self._id

    @property
    def client(self) -> Client:
        return self._client

    def status(self) -> JobInfo:
        """The job as the daemon sees it now."""
        self._info = self._client.get_job(self._id)
        return self._info

    def done(self) -> bool:
        return self.status().state in FINAL_STATES

    def wait(self, timeout: float | None = None) -> JobInfo:
        """Block until the job is final and return it; raise TimeoutError if it is not
        final within ``timeout`` seconds (None: wait as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = _Outage()
        while True:
            left = MAX_WAIT if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                info = self._client.wait(self._id, timeout=min(left, MAX_WAIT))
            except DaemonUnavailable as e:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                outage.failed(e)
                continue
            outage.ok()
            self._info = info
            if info.state in FINAL_STATES:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"gpud job {self._id} ({info.name}) is still {info.state} after "
                    f"{format_duration(timeout or 0)}"
                )

    def get(self, timeout: float | None = None, *, log_to: TextIO | None = None) -> R:
        """Wait for the job and return its value, or raise its exception.

        The function's own exception is re-raised as itself with the remote traceback as
        a note; a job that ended without a result raises JobCancelled, JobTimedOut,
        JobLost or JobFailed; TimeoutError if it is not final within ``timeout``.
        With ``log_to`` (e.g. ``sys.stderr``) the job's log is copied there meanwhile.
        """
        pump = _LogPump(self._client.url, self._id, log_to) if log_to is not None else None
        finished = False
        try:
            info = self.wait(timeout)
            finished = True
        finally:
            if pump is not None:
                pump.finish(_LOG_DRAIN if finished else 0.0)
        value: R = self._outcome(info)
        return value

    def _outcome(self, info: JobInfo) -> Any:
        if info.has_result or info.state == "succeeded":
            try:
                data = self._client.result(self._id)
            except ApiError as e:
                if e.code != "no_result":
                    raise
                if info.state == "succeeded":
                    raise JobLost(
                        f"gpud job {info.id} ({info.name}) succeeded but its result is "
                        f"gone: {e.detail}",
                        info,
                    ) from None
            else:
                return load_result(data, info)
        raise job_error(info)

    def cancel(self) -> JobInfo:
        """Cancel the job (queued or running); returns once it is final."""
        self._info = self._client.cancel(self._id)
        return self._info

    def cancel_quietly(self, timeout: float = 30.0) -> None:
        """Best-effort cancel for cleanup paths (Ctrl-C): never raises a GpudError."""
        with contextlib.suppress(GpudError):
            self._info = self._client.cancel(self._id, timeout=timeout)

    def logs(self, follow: bool = False) -> Iterator[str]:
        """The job's combined stdout+stderr, as text chunks (not lines). With ``follow``
        the iterator ends when the job is final and all its output was read."""
        return self._client.logs(self._id, follow=follow)
