"""gpud's client: run Python functions on a machine's GPUs through the gpud daemon.

::

    import gpud_client as gpud

    app = gpud.App("hello")

    @app.function(gpu="any")
    def square(x: int) -> int:
        return x * x

    print(square.remote(4))

This package never imports the daemon (``gpud``): it is all a job's caller needs.
"""

from gpud_client.app import App, Function, FunctionOptions, function
from gpud_client.batch import BatchHandle
from gpud_client.client import AsyncClient, Client
from gpud_client.cls import enter, exit, method
from gpud_client.deps import result_of
from gpud_client.duration import format_duration, parse_duration, parse_size
from gpud_client.errors import (
    ApiError,
    DaemonUnavailable,
    GpudError,
    JobCancelled,
    JobError,
    JobFailed,
    JobLost,
    JobTimedOut,
    RemoteError,
    VersionMismatch,
)
from gpud_client.handle import JobHandle
from gpud_client.image import Image
from gpud_client.imagebuild import ImageBuildFailed
from gpud_client.state import state_dir

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "App",
    "AsyncClient",
    "BatchHandle",
    "Client",
    "DaemonUnavailable",
    "Function",
    "FunctionOptions",
    "GpudError",
    "Image",
    "ImageBuildFailed",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobHandle",
    "JobLost",
    "JobTimedOut",
    "RemoteError",
    "VersionMismatch",
    "result_of",
    "__version__",
    "enter",
    "exit",
    "format_duration",
    "function",
    "method",
    "parse_duration",
    "parse_size",
    "state_dir",
]
