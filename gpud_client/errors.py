"""The exceptions the gpud client raises.

Everything derives from :class:`GpudError`, so ``except gpud.GpudError`` catches every
failure that is gpud's rather than the user's. An exception raised *by the user's
function* on the remote side is re-raised as itself (a ``ValueError`` stays a
``ValueError``), never wrapped; only when it cannot be rebuilt here does it arrive as a
:class:`RemoteError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpud_client.models import JobInfo

__all__ = [
    "ApiError",
    "DaemonUnavailable",
    "GpudError",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobLost",
    "JobTimedOut",
    "RemoteError",
    "VersionMismatch",
]


class GpudError(Exception):
    """Base class of every error raised by gpud itself."""


class DaemonUnavailable(GpudError):
    """Nothing answers at the daemon's address (socket missing, connection refused)."""

    def __init__(self, url: str, reason: str | None = None) -> None:
        self.url = url
        self.reason = reason
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"no gpud daemon answers at {url}{why}: start one with `gpud serve`, "
            "or set GPUD_URL to the address of a running one"
        )


class ApiError(GpudError):
    """The daemon answered with an error status (400, 404, 409, 413, 422, 503, ...).

    ``code`` is the machine-readable ``error`` field of the body (e.g. ``"not_found"``),
    ``detail`` the human-readable one; ``str()`` is the detail alone because the daemon
    already words it for people.
    """

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(detail)

    def __repr__(self) -> str:
        return f"ApiError(status={self.status}, code={self.code!r}, detail={self.detail!r})"


class JobError(GpudError):
    """A job ended without a value or an exception of its own to re-raise."""

    def __init__(self, message: str, job: JobInfo) -> None:
        self.job = job
        super().__init__(message)


class JobFailed(JobError):
    """The job failed without leaving a result (the worker crashed, was OOM-killed, ...)."""


class JobCancelled(JobError):
    """The job was cancelled (by ``.cancel()``, ``gpud cancel`` or the daemon)."""


class JobTimedOut(JobError):
    """The job ran past its ``timeout`` and was killed."""


class JobLost(JobError):
    """The daemon lost track of the job (e.g. it restarted and the process was gone)."""


class RemoteError(GpudError):
    """A remote exception that cannot be re-raised here as itself.

    Either its class cannot be unpickled in this process (a module the job had that this
    Python lacks, a constructor pickle cannot call), or it is a ``BaseException`` that is
    not an ``Exception`` (``SystemExit``, ``KeyboardInterrupt``), which would otherwise
    end the *caller's* program.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str | None) -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        # The remote traceback is attached as a note by whoever raises this (it knows
        # the job id), exactly as for an exception that could be rebuilt.
        super().__init__(f"{type_name}: {message}" if message else type_name)


class VersionMismatch(GpudError):
    """The job's Python (major.minor) differs from the worker's: pickles would not load."""
