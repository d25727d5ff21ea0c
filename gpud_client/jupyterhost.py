"""The inside of a `gpud shell --jupyter` job (#14): a Jupyter server on a local port.

Like :mod:`gpud_client.shellhost` this runs as an ordinary job (queued, on its GPUs, as
its owner, in its environment) and is pickled by value with its function, so it imports
nothing but the standard library. It runs ``python -m jupyterlab`` (else ``notebook``)
with the job's own interpreter, bound to 127.0.0.1 only, with a random token, and once
the server answers it prints one line to the job's log::

    GPUD_JUPYTER_URL http://127.0.0.1:PORT/?token=TOKEN

which `gpud shell --jupyter` reads through the log API (only the job's owner and admins
may read it, so the token is no more exposed than the job itself).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from importlib.util import find_spec  # by reference: the worker imports importlib.util

GPUD_PICKLE_BY_VALUE = True  # gpud_client.payload: ship this module with the function

URL_MARKER = "GPUD_JUPYTER_URL"
#: tried in this order; the first importable one runs
MODULES = ("jupyterlab", "notebook")


class JupyterMissing(Exception):
    """Neither jupyterlab nor notebook is importable by the job's interpreter."""


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def jupyter(port: int | None = None, *, start_timeout: float = 120.0) -> None:
    """Serve Jupyter on 127.0.0.1:``port`` (else a free one) until it exits or the job is
    cancelled; its exit code becomes the job's outcome."""
    module = next((m for m in MODULES if find_spec(m) is not None), None)
    if module is None:
        raise JupyterMissing(
            f"jupyter is not installed in {sys.executable}: pip install jupyterlab"
        )
    port = port or free_port()
    token = secrets.token_urlsafe(24)
    home = os.environ.get("HOME", "")
    cwd = home if home and os.path.isdir(home) and os.access(home, os.X_OK) else os.getcwd()
    # The token travels in the environment, not argv: others can read argv in ps.
    env = dict(os.environ, JUPYTER_TOKEN=token)
    cmd = [sys.executable, "-m", module, "--no-browser", "--ip", "127.0.0.1"]
    cmd += ["--port", str(port), "--port-retries", "0"]  # that port or none: the URL says it
    # In the job's own process group: cancel and timeout signal the group, server included.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    try:
        deadline = time.monotonic() + start_timeout
        while not _answers(port):
            if proc.poll() is not None:
                raise SystemExit(proc.returncode or 1)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{module} did not answer on port {port} in {start_timeout:g} s")
            time.sleep(0.2)
        print(f"{URL_MARKER} http://127.0.0.1:{port}/?token={token}", flush=True)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # failed above: stop the server too
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if code != 0:
        raise SystemExit(128 - code if code < 0 else code)
