"""A submitted batch (one ``.map``), seen from the caller, and a call in one request.

:class:`BatchHandle` reads a batch's results over one streaming request (``GET
/v1/batches/{id}/results``), in input order or as the jobs end; reattaches to a batch by
its id (``BatchHandle.from_id``), says how far it is, and cancels what is left.
:func:`run_call` is ``.remote()``: one ``POST /v1/jobs/run`` that carries the job's log
and its outcome (#12).

A dropped connection is picked up again (from where the stream was) for
:data:`~gpud_client.handle.RECONNECT_GRACE` seconds, as :class:`JobHandle` does.
"""

from __future__ import annotations

import codecs
import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, Generic, TextIO, TypeVar

from gpud_client.client import Client
from gpud_client.errors import ApiError, DaemonUnavailable, GpudError
from gpud_client.handle import JobHandle, _Outage
from gpud_client.models import BatchCounts, BatchInfo, BatchResult, JobEvent, JobInfo
from gpud_client.payload import load_result

__all__ = ["PROGRESS_MIN", "BatchHandle", "run_call"]

R = TypeVar("R")

#: A ``.map`` of at least this many inputs shows a progress bar (on a terminal only).
PROGRESS_MIN = 10


# -- one call -----------------------------------------------------------------------------


def _value(client: Client, info: JobInfo, inline: bytes | None) -> Any:
    """The job's value (or its exception raised), from the inline result when there is
    one, else from ``/v1/jobs/{id}/result`` (a large result) or the job's end."""
    if inline is not None:
        return load_result(inline, info)
    return JobHandle(info.id, client, info=info)._outcome(info)


class _Echo:
    """A job's log, as bytes come, written to a text stream (UTF-8, invalid bytes
    replaced, a character split between chunks kept whole)."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes, final: bool = False) -> None:
        self.offset += len(data)
        text = self._decoder.decode(data, final=final)
        if text and self.out is not None:
            self.out.write(text)
            self.out.flush()


def run_call(client: Client, request: Any, *, log_to: TextIO | None = sys.stderr) -> Any:
    """Submit one call and return its value (or raise its exception), copying its log to
    ``log_to`` meanwhile: one request when nothing goes wrong. Ctrl-C cancels the job."""
    echo = _Echo(log_to)
    job_id: int | None = None
    try:
        try:
            for ev in client.run(request, logs=log_to is not None):
                if ev.kind == "job" and ev.job is not None:
                    job_id = ev.job.id
                elif (end := _event(echo, ev)) is not None:
                    return _value(client, *end)
        except DaemonUnavailable:
            if job_id is None:
                raise  # the submit was retried with its key already; nothing to follow
        assert job_id is not None, "the daemon's stream did not name the job"
        # The stream broke (the daemon restarted, say): follow the job from where it was.
        outage = _Outage()
        while True:
            try:
                for ev in client.job_stream(job_id, logs=log_to is not None, offset=echo.offset):
                    if (end := _event(echo, ev)) is not None:
                        return _value(client, *end)
            except DaemonUnavailable as e:
                outage.failed(e)
    except KeyboardInterrupt:
        if job_id is not None:
            JobHandle(job_id, client).cancel_quietly()
            print(f"gpud: cancelled job {job_id}", file=sys.stderr, flush=True)
        raise


def _event(echo: _Echo, ev: JobEvent) -> tuple[JobInfo, bytes | None] | None:
    if ev.kind == "log":
        echo.write(ev.data)
    elif ev.kind == "end" and ev.job is not None:
        echo.write(b"", final=True)
        return ev.job, ev.result
    return None


# -- batches ------------------------------------------------------------------------------


class _Bar:
    """A one-line progress bar on a terminal: ``name [####....] 12/100 3.4/s``, redrawn
    at most ten times a second; nothing at all when the stream is not a TTY."""

    def __init__(self, total: int, label: str, out: TextIO | None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.out = out
        self.start = self.drawn = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.out is not None and (now - self.drawn >= 0.1 or self.done == self.total):
            self.drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        assert self.out is not None
        width = 30
        filled = width * self.done // max(self.total, 1)
        rate = self.done / max(now - self.start, 1e-6)
        self.out.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} {rate:.1f}/s"
        )
        self.out.flush()

    def close(self) -> None:
        if self.out is not None and self.done:
            self._draw(time.monotonic())
            self.out.write("\n")
            self.out.flush()


def _terminal(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


class BatchHandle(Generic[R]):
    """A handle on one batch (``.spawn_map``, or ``.map``'s jobs): ``.results()``,
    ``.progress()``, ``.cancel()``. Reattach with ``BatchHandle.from_id(batch_id)``."""

    def __init__(
        self,
        batch_id: int,
        client: Client,
        *,
        size: int | None = None,
        name: str | None = None,
        owns_client: bool = False,
    ) -> None:
        self._id = batch_id
        self._client = client
        self._size = size
        self._name = name
        self._owns_client = owns_client

    @classmethod
    def from_id(cls, batch_id: int, url: str | None = None) -> BatchHandle[Any]:
        """The batch with this id (one of yours), on the daemon at ``url`` (default: the
        usual one). Raises ApiError ``not_found`` when there is no such batch of yours."""
        client = Client(url)
        try:
            info = client.batch(batch_id)
        except BaseException:
            client.close()
            raise
        return cls(batch_id, client, size=info.size, name=info.name, owns_client=True)

    def __repr__(self) -> str:
        return f"<BatchHandle {self._id}>"

    def __del__(self) -> None:
        if getattr(self, "_owns_client", False):
            with contextlib.suppress(Exception):
                self._client.close()

    @property
    def id(self) -> int:
        return self._id

    @property
    def client(self) -> Client:
        return self._client

    def status(self) -> BatchInfo:
        """The batch as the daemon sees it now."""
        info = self._client.batch(self._id)
        self._size, self._name = info.size, info.name
        return info

    def progress(self) -> BatchCounts:
        """How many of its jobs are in each state."""
        return self.status().counts

    def job_ids(self) -> list[int]:
        """Its jobs' ids, in input order."""
        ids = self._client.batch(self._id, jobs=True).job_ids
        return list(ids or [])

    def handles(self) -> list[JobHandle[R]]:
        """A :class:`JobHandle` per input, in input order."""
        return [JobHandle(i, self._client) for i in self.job_ids()]

    def cancel(self) -> BatchInfo:
        """Cancel its jobs that are not over (queued ones at once, running ones are
        stopped); returns once they are final. The results of those that ended stay."""
        return self._client.cancel_batch(self._id)

    def cancel_quietly(self) -> None:
        """Best-effort cancel for cleanup paths (Ctrl-C): never raises a GpudError."""
        with contextlib.suppress(GpudError):
            self._client.cancel_batch(self._id)

    def __iter__(self) -> Iterator[R]:
        return self.results()

    def results(
        self,
        *,
        order_outputs: bool = True,
        return_exceptions: bool = False,
        progress: bool | None = None,
    ) -> Iterator[Any]:
        """Each input's value as its job ends: in input order, or with ``order_outputs=
        False`` as they come. A job's exception is raised (with ``return_exceptions``:
        yielded instead; trouble talking to the daemon is always raised). ``progress``:
        a bar on stderr (None: when stderr is a terminal and there are at least
        :data:`PROGRESS_MIN` inputs). Ctrl-C cancels the jobs not done."""
        if progress is None:
            progress = _terminal(sys.stderr)
            if progress and self._size is None:
                self.status()
            progress = progress and (self._size or 0) >= PROGRESS_MIN
        elif progress and self._size is None:
            self.status()
        bar = _Bar(
            self._size or 0, self._name or f"batch {self._id}", sys.stderr if progress else None
        )
        return self._results(order_outputs, return_exceptions, bar)

    def _results(self, ordered: bool, return_exceptions: bool, bar: _Bar) -> Iterator[Any]:
        seen: set[int] = set()
        after = 0
        outage = _Outage()
        try:
            while True:
                try:
                    lines = self._client.batch_results(
                        self._id, order="input" if ordered else "completion", after=after
                    )
                    for line in lines:
                        outage.ok()
                        if line.index in seen:
                            continue  # sent again after a reconnect (completion order)
                        seen.add(line.index)
                        after = line.index + 1 if ordered else 0
                        bar.step()
                        yield self._one(line, return_exceptions)
                    break
                except DaemonUnavailable as e:
                    outage.failed(e)
        except KeyboardInterrupt:
            self.cancel_quietly()
            print(f"gpud: cancelled the rest of batch {self._id}", file=sys.stderr, flush=True)
            raise
        finally:
            bar.close()

    def _one(self, line: BatchResult, return_exceptions: bool) -> Any:
        try:
            return _value(self._client, line.job, line.result)
        except Exception as e:
            # Trouble talking to the daemon is not the job's outcome: always raise it.
            daemon_trouble = isinstance(e, DaemonUnavailable | ApiError) or type(e) is GpudError
            if daemon_trouble or not return_exceptions:
                raise
            return e
