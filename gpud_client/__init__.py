"""gpud's client: run Python functions on a machine's GPUs through the gpud daemon.

::

    import gpud_client as gpud

    app = gpud.App("hello")

    @app.function(gpu="any")
    def square(x: int) -> int:
        return x * x

    print(square.remote(4))

This package never imports the daemon (``gpud``): it is all a job's caller needs.

Its names are imported when first used (PEP 562), not here: `gpud ps` needs the client
and its errors, not the decorator API, cloudpickle or the worker (#12: a short command's
start-up is its imports). ``from gpud_client import X`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


#: Each public name and the module it lives in.
_WHERE = {
    "App": "app",
    "Function": "app",
    "FunctionOptions": "app",
    "function": "app",
    "BatchHandle": "batch",
    "AsyncClient": "client",
    "Client": "client",
    "enter": "cls",
    "exit": "cls",
    "method": "cls",
    "result_of": "deps",
    "format_duration": "duration",
    "parse_duration": "duration",
    "parse_size": "duration",
    "ApiError": "errors",
    "DaemonUnavailable": "errors",
    "GpudError": "errors",
    "JobCancelled": "errors",
    "JobError": "errors",
    "JobFailed": "errors",
    "JobLost": "errors",
    "JobTimedOut": "errors",
    "RemoteError": "errors",
    "VersionMismatch": "errors",
    "JobHandle": "handle",
    "Image": "image",
    "ImageBuildFailed": "imagebuild",
    "state_dir": "state",
}

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


def _version() -> str:
    # The installed distribution's version (setuptools-scm, #16), looked up on first use:
    # gpud_client may not import gpud (tests/test_imports.py), and importlib.metadata
    # costs a few ms that `import gpud_client` should not pay.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpud")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = v = _version()
        return v
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'gpud_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gpud_client.{module}"), name)
    globals()[name] = value  # once: later reads are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
