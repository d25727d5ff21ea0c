"""`gpud shell`, `gpud attach JOB` and `gpud exec JOB -- CMD...` (#14).

`gpud shell` queues :func:`gpud_client.shellhost.session` as an ordinary job (named
"shell"), waits for it to start, and attaches this terminal to it. The terminal is put in
raw mode; window size changes are passed on. Ctrl-] then d detaches (the shell goes on;
`gpud attach JOB` comes back); Ctrl-] twice sends one Ctrl-]. When the shell exits, the
job ends (0: succeeded, else failed) and this command exits with the shell's code.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from typing import Any

import click

from gpud.cli_common import EXIT, fail, handle_errors

__all__ = ["attach", "exec_command", "shell"]

DETACH_KEY = b"\x1d"  # Ctrl-]


def _token() -> str | None:
    from gpud_client.tokens import load_token

    return load_token()


def _size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        return size.lines, size.columns
    except OSError:
        return 24, 80


def _connect(url: str | None, path: str) -> Any:
    from gpud.ttyclient import Refused, WebSocket

    try:
        return WebSocket(path, url, _token())
    except Refused as e:
        fail(e.detail, EXIT["usage"] if e.status == 400 else EXIT["error"])
    except OSError as e:
        fail(f"cannot reach the daemon: {e}", EXIT["unavailable"])


def relay(job_id: int, url: str | None) -> tuple[str, int | None]:
    """Attach this terminal to job ``job_id``'s shell: ("exit", code) or ("detached", None)."""
    from gpud.ttyclient import Refused

    ws = _connect(url, f"/v1/jobs/{job_id}/tty")
    try:  # refused, or attached: the daemon says which before anything else
        while not any(k == "json" and "attached" in v for k, v in ws.pending):
            if any(k == "closed" for k, _ in ws.pending):
                fail(f"the daemon closed the connection to job {job_id}")
            ws.pending = ws.pending + list(ws._events())
    except Refused as e:
        fail(e.detail)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    is_tty = os.isatty(stdin)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    old_attrs = None
    old_winch = None
    if is_tty:
        import termios
        import tty

        old_attrs = termios.tcgetattr(stdin)
        tty.setraw(stdin, termios.TCSANOW)  # keep what was typed while it queued
        old_winch = signal.signal(signal.SIGWINCH, lambda *_: os.write(wake_w, b"w"))
    pending_escape = False
    try:
        ws.send_json({"resize": list(_size())})
        while True:
            ready = [ws] if ws.pending else select.select([stdin, ws, wake_r], [], [])[0]
            if wake_r in ready:
                os.read(wake_r, 64)
                ws.send_json({"resize": list(_size())})
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    ws.close()
                    return "detached", None
                out = bytearray()
                for b in data:
                    byte = bytes([b])
                    if pending_escape:
                        pending_escape = False
                        if byte in (b"d", b"D"):
                            ws.close()
                            return "detached", None
                        out += DETACH_KEY if byte == DETACH_KEY else DETACH_KEY + byte
                    elif byte == DETACH_KEY:
                        pending_escape = True
                    else:
                        out += byte
                if out:
                    ws.send_bytes(bytes(out))
            if ws in ready:
                try:
                    events = ws.read()
                except Refused as e:
                    raise click.ClickException(e.detail) from None
                for kind, value in events:
                    if kind == "bytes":
                        os.write(stdout, value)
                    elif kind == "json" and "exit" in value:
                        return "exit", int(value["exit"])
                    elif kind == "json" and "detached" in value:
                        return "replaced", None
                    elif kind == "closed":
                        return "closed", None
    finally:
        if old_attrs is not None:
            import termios

            termios.tcsetattr(stdin, termios.TCSADRAIN, old_attrs)
            signal.signal(signal.SIGWINCH, old_winch)
        os.close(wake_r)
        os.close(wake_w)
        ws.sock.close()


def _finish(job_id: int, url: str | None, how: str, code: int | None) -> None:
    if how == "exit":
        click.echo(f"\r\n[gpud] shell of job {job_id} exited ({code})", err=True)
        sys.exit(code or 0)
    if how == "replaced":
        click.echo(f"\r\n[gpud] job {job_id} was attached elsewhere; detached here", err=True)
    elif how == "closed":
        click.echo(f"\r\n[gpud] the connection to job {job_id} closed", err=True)
    else:
        click.echo(
            f"\r\n[gpud] detached from job {job_id}; `gpud attach {job_id}` comes back", err=True
        )


@click.command()
@click.option("--gpu", default=None, help="GPUs to hold, e.g. h100, h100:2, any:1.")
@click.option("--timeout", default=None, help="Ends the session after this long (e.g. 4h).")
@click.option("--cpu", type=float, default=None, help="CPUs (a container limit with Podman).")
@click.option("--image", default=None, help="Container image (Podman executor).")
@click.option("--detach", "-d", is_flag=True, help="Queue it, print the job id, do not attach.")
@click.option("--url", envvar="GPUD_URL", default=None, metavar="URL")
def shell(
    gpu: str | None,
    timeout: str | None,
    cpu: float | None,
    image: str | None,
    detach: bool,
    url: str | None,
) -> None:
    """Queue an interactive shell on GPUs and attach this terminal to it.

    It waits in the queue like any job. Ctrl-] then d detaches; `gpud attach JOB`
    re-attaches. `exit` ends the job.
    """

    @handle_errors
    def go() -> None:
        import gpud_client
        from gpud_client.shellhost import session

        client = gpud_client.Client(url)
        idle = client.health().shell_idle_timeout
        opts: dict[str, Any] = {"name": "shell", "gpu": gpu, "timeout": timeout, "cpu": cpu}
        if image is not None:
            opts["image"] = image
        fn = gpud_client.function(**{k: v for k, v in opts.items() if v is not None})(session)
        if url is not None:
            fn = fn.with_options(url=url)
        rows, cols = _size()
        term = os.environ.get("TERM", "xterm-256color")
        kwargs: dict[str, Any] = {"term": term, "rows": rows, "cols": cols}
        if idle is not None:
            kwargs["idle_timeout"] = idle
        handle = fn.spawn(**kwargs)
        if detach:
            click.echo(handle.id)
            return
        click.echo(f"[gpud] job {handle.id} queued; waiting for it to start", err=True)
        try:
            while True:
                job = client.get_job(handle.id)
                if job.state == "running":
                    break
                if job.state in ("succeeded", "failed", "cancelled", "timed_out"):
                    fail(f"job {handle.id} {job.state}: {job.error or ''}", EXIT["job_failed"])
                time.sleep(0.3)
        except KeyboardInterrupt:
            client.cancel(handle.id)
            click.echo(f"cancelled job {handle.id}", err=True)
            sys.exit(EXIT["interrupted"])
        _finish(handle.id, url, *relay(handle.id, url))

    go()


@click.command()
@click.argument("job_id", type=int)
@click.option("--url", envvar="GPUD_URL", default=None, metavar="URL")
def attach(job_id: int, url: str | None) -> None:
    """Re-attach this terminal to a running `gpud shell` job (yours only)."""
    _finish(job_id, url, *relay(job_id, url))


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("job_id", type=int)
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--url", envvar="GPUD_URL", default=None, metavar="URL")
def exec_command(job_id: int, argv: tuple[str, ...], url: str | None) -> None:
    """Run a command beside a running job of yours, in its environment (GPUs, GPUD_*
    variables, its directory or container), e.g. `gpud exec 42 -- nvidia-smi`. Its output
    is printed; its exit code is this command's."""
    from gpud.ttyclient import Refused

    ws = _connect(url, f"/v1/jobs/{job_id}/exec")
    ws.send_json({"argv": list(argv)})
    out = sys.stdout.fileno()
    try:
        while True:
            if not ws.pending:
                select.select([ws], [], [])
            try:
                events = ws.read()
            except Refused as e:
                fail(e.detail)
            for kind, value in events:
                if kind == "bytes":
                    os.write(out, value)
                elif kind == "json" and "exit" in value:
                    sys.exit(int(value["exit"]))
                elif kind == "closed":
                    fail(f"the connection closed before {argv[0]!r} ended")
    except KeyboardInterrupt:
        sys.exit(EXIT["interrupted"])
    finally:
        with contextlib.suppress(OSError):
            ws.sock.close()
