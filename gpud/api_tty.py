"""WebSocket endpoints of #14: a shell job's terminal, and `gpud exec` beside a job.

``GET /v1/jobs/{id}/tty`` (WebSocket): binary messages are terminal bytes, both ways;
text messages are JSON: from the client ``{"resize": [rows, cols]}``, from the daemon
``{"attached": id}`` first, once connected to the shell, ``{"exit": code}`` (the shell
ended; the socket then closes), ``{"detached": "..."}``
(another client attached in its place) or ``{"error": {"status", "code", "detail"}}``
(the request was refused, with the status and code a plain request would get). Closing
the WebSocket detaches; the shell goes on.

``GET /v1/jobs/{id}/exec`` (WebSocket): the client sends ``{"argv": [...]}``; the daemon
sends the command's output (stdout and stderr together) as binary messages, then
``{"exit": code}``. Closing the WebSocket kills the command.

Only a job's owner may attach or exec, admins included: a terminal or a command runs as
the job's owner, and an admin who could attach would act as that user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from typing import Any, cast

import trio
from starlette.requests import Request
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gpud.api_params import parse_id
from gpud.auth import Auth, Forbidden, Unauthenticated
from gpud.daemon.port import JobService
from gpud.daemon.shell import exec_command, open_tty, stream_exec
from gpud.domain import JobState
from gpud.ledger import UnknownJob
from gpud.users import run_as
from gpud_client.shellhost import DATA, EXIT, REPLACED, RESIZE, FrameReader, frame

__all__ = ["TTY_DOC", "tty_routes"]

log = logging.getLogger("gpud.api")

TTY_DOC = __doc__

#: how long a job that just started has to open its PTY socket
SOCKET_WAIT = 15.0


class _Refused(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


async def _refuse(ws: WebSocket, e: _Refused) -> None:
    err = {"status": e.status, "code": e.code, "detail": e.detail}
    await ws.send_text(json.dumps({"error": err}))
    await ws.close(code=4000 + e.status)


def tty_routes(daemon: JobService, auth: Auth) -> list[Any]:  # Starlette routes
    async def owned_running(ws: WebSocket, action: str) -> tuple[Any, Any]:
        try:
            who = await auth.authenticate(cast(Request, ws))
        except Unauthenticated as e:
            raise _Refused(401, "unauthenticated", str(e)) from None
        job_id = parse_id(ws.path_params.get("job_id", ""))
        if job_id is None:
            raise _Refused(404, "not_found", "no such job")
        try:
            job = await daemon.get(job_id)
        except UnknownJob as e:
            raise _Refused(404, "not_found", str(e)) from None
        if job.owner != who.name:
            log.warning("refused %s of job %d to %s", action, job_id, who.name)
            raise _Refused(
                403,
                "forbidden",
                str(
                    Forbidden(
                        f"job {job_id} belongs to {job.owner}: only its owner may {action} it "
                        "(admins too are refused: it would run as that user)"
                    )
                ),
            )
        if job.state is not JobState.RUNNING:
            raise _Refused(
                409,
                "not_running",
                f"job {job_id} is {job.state.value}: only a running job can be {action}ed "
                f"(gpud ps shows it; gpud wait {job_id} waits for it)",
            )
        handle = next((h for h in daemon.handles() if h.job_id == job_id), None)
        return job, handle

    async def tty(ws: WebSocket) -> None:
        await ws.accept()
        try:
            job, _ = await owned_running(ws, "attach")
            stream = None
            with trio.move_on_after(SOCKET_WAIT):
                while stream is None:
                    try:
                        stream = await open_tty(daemon.config.jobs_dir, job.id)
                    except OSError:
                        if daemon.active_job(job.id) is None:
                            break
                        await trio.sleep(0.1)
            if stream is None:
                raise _Refused(
                    409,
                    "no_terminal",
                    f"job {job.id} has no terminal: it is not a `gpud shell` job, or its "
                    "shell has ended",
                )
        except _Refused as e:
            await _refuse(ws, e)
            return
        await ws.send_text(json.dumps({"attached": job.id}))  # the client may go raw now
        async with stream, trio.open_nursery() as nursery:

            async def upstream() -> None:
                try:
                    while True:
                        msg = await ws.receive()
                        if msg["type"] == "websocket.disconnect":
                            break
                        if msg.get("bytes"):
                            await stream.send_all(frame(DATA, msg["bytes"]))
                        elif msg.get("text"):
                            with contextlib.suppress(ValueError, TypeError, KeyError):
                                rows, cols = json.loads(msg["text"])["resize"]
                                size = f"{int(rows)} {int(cols)}".encode()
                                await stream.send_all(frame(RESIZE, size))
                except (WebSocketDisconnect, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()  # the client left: detach

            nursery.start_soon(upstream)
            reader = FrameReader()
            try:
                while data := await stream.receive_some(65536):
                    for kind, payload in reader.feed(data):
                        if kind == DATA:
                            await ws.send_bytes(payload)
                        elif kind == EXIT:
                            await ws.send_text(json.dumps({"exit": int(payload)}))
                        elif kind == REPLACED:
                            await ws.send_text(json.dumps({"detached": "attached elsewhere"}))
                await ws.close()
            except (WebSocketDisconnect, trio.BrokenResourceError, RuntimeError, ValueError):
                pass
            nursery.cancel_scope.cancel()

    async def exec_(ws: WebSocket) -> None:
        await ws.accept()
        try:
            job, handle = await owned_running(ws, "exec in")
            if handle is None or (handle.container is None and handle.pid <= 0):
                raise _Refused(409, "not_running", f"job {job.id} has no process yet")
            if daemon.executor.name == "slurm":
                # The handle's pid is a Slurm job id, not a process here (#15).
                raise _Refused(
                    409,
                    "not_supported",
                    f"gpud exec is not available with the Slurm executor: job {job.id} is "
                    f"Slurm job {handle.pid}; use `srun --jobid={handle.pid} --overlap --pty "
                    "CMD` on the cluster",
                )
            try:
                argv = json.loads(await ws.receive_text())["argv"]
                if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
                    raise ValueError
            except (ValueError, TypeError, KeyError):
                raise _Refused(
                    400, "bad_request", 'send {"argv": ["CMD", "ARG", ...]} first'
                ) from None
            ident = run_as(job.owner, daemon.identity)
            try:
                cmd, kwargs = exec_command(job, handle, ident, daemon.config.jobs_dir, argv)
                proc = await stream_exec(cmd, kwargs)
            except OSError as e:
                raise _Refused(422, "exec_failed", f"cannot run {argv[0]!r}: {e}") from None
        except _Refused as e:
            await _refuse(ws, e)
            return
        assert proc.stdout is not None
        try:
            async with trio.open_nursery() as nursery:

                async def watch_client() -> None:
                    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                        while (await ws.receive())["type"] != "websocket.disconnect":
                            pass
                    with contextlib.suppress(OSError):
                        proc.send_signal(signal.SIGKILL)

                nursery.start_soon(watch_client)
                while data := await proc.stdout.receive_some(65536):
                    await ws.send_bytes(bytes(data))
                code = await proc.wait()
                code = 128 - code if code < 0 else code
                await ws.send_text(json.dumps({"exit": code}))
                await ws.close()
                nursery.cancel_scope.cancel()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            with contextlib.suppress(OSError):
                proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()

    return [
        WebSocketRoute("/v1/jobs/{job_id}/tty", tty),
        WebSocketRoute("/v1/jobs/{job_id}/exec", exec_),
    ]
