"""The daemon's side of `gpud shell`, `gpud attach` and `gpud exec` (#14).

A shell job's PTY lives in the job itself (:mod:`gpud_client.shellhost`), behind
``tty.sock`` in its job directory; the daemon only relays a client to it. `gpud exec`
runs a command beside a running job: as the job's owner (never root), in its
environment. With the process executor that is the job leader's own environment (read
from /proc) and its job directory; with Podman, ``podman exec`` into its container,
which already has both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import trio

from gpud.domain import Job
from gpud.executors.base import Handle
from gpud.executors.process import find_setpriv, switch_user_command
from gpud.identity import JobIdentity
from gpud_client.shellhost import SOCKET_NAME

__all__ = ["exec_command", "open_tty", "tty_socket"]


def tty_socket(jobs_dir: Path, job_id: int) -> Path:
    return jobs_dir / str(job_id) / SOCKET_NAME


async def open_tty(jobs_dir: Path, job_id: int) -> trio.SocketStream:
    """Connect to a shell job's PTY socket. Through /proc/self/fd: a job directory's
    path may be longer than a Unix socket address may be (108 bytes)."""
    fd = os.open(jobs_dir / str(job_id), os.O_PATH | os.O_DIRECTORY)
    try:
        return await trio.open_unix_socket(f"/proc/self/fd/{fd}/{SOCKET_NAME}")
    finally:
        os.close(fd)


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        raw = fh.read()
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
    return env


def exec_command(
    job: Job, handle: Handle, ident: JobIdentity, jobs_dir: Path, argv: list[str]
) -> tuple[list[str], dict[str, Any]]:
    """(command line, extra open_process arguments) that run ``argv`` beside ``job``."""
    if handle.container is not None:
        podman = shutil.which("podman") or "/usr/bin/podman"
        user = f"{ident.uid}:{ident.gid}" if ident.switch else f"{os.getuid()}:{os.getgid()}"
        # The container's own environment and working directory (the job's); its user.
        return [podman, "exec", "--user", user, handle.container, *argv], {}
    env = _environ(handle.pid)  # the job's whole environment: GPUs, GPUD_*, its python
    env["GPUD_EXEC"] = "1"
    kwargs: dict[str, Any] = {"env": env, "cwd": str(jobs_dir / str(job.id))}
    cmd = list(argv)
    # Looked up on the job's PATH (its venv's bin first), not the daemon's.
    if not os.path.isabs(cmd[0]) and (found := shutil.which(cmd[0], path=env.get("PATH"))):
        cmd[0] = found
    if ident.switch:
        setpriv = find_setpriv()
        if setpriv is not None:
            cmd = switch_user_command(setpriv, ident, cmd)
        else:
            kwargs.update(ident.popen_kwargs())
    return cmd, kwargs


async def stream_exec(cmd: list[str], kwargs: dict[str, Any]) -> trio.Process:
    """Start it with stdout and stderr on one pipe, in a session of its own."""
    return await trio.lowlevel.open_process(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
        **kwargs,
    )
