"""What the `gpud` commands share: the exit codes, failing with one clear line, the client,
error handling, and printing. Below gpud.cli and every gpud.cli_* module, which all import
it and none of which imports gpud.cli (#12: these lived in gpud.cli, which its sibling
modules then imported back).
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

__all__ = [
    "EXIT",
    "ago",
    "client",
    "fail",
    "handle_errors",
    "load_job_value",
    "print_json",
    "print_table",
    "print_value",
]

EXIT = {"ok": 0, "error": 1, "usage": 2, "unavailable": 3, "job_failed": 4, "interrupted": 130}


def fail(message: str, code: int = EXIT["error"]) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def client(url: str | None) -> Any:
    from gpud_client import Client

    return Client(url)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the client's exceptions into one clear line and the documented exit code."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from gpud_client import ApiError, DaemonUnavailable, GpudError

        try:
            return fn(*args, **kwargs)
        except DaemonUnavailable as e:
            fail(str(e), EXIT["unavailable"])
        except ApiError as e:
            fail(e.detail)
        except GpudError as e:
            fail(str(e))
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(EXIT["interrupted"])

    return wrapper


def ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart, the header bold on a
    terminal. Plain text rather than rich's Table (#12): importing rich cost `gpud ps`
    ~30 ms. Rows are never wrapped or cut, on a terminal or in a pipe (grep, awk)."""
    import os

    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    header = line(columns)
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        header = f"\x1b[1m{header}\x1b[0m"
    click.echo("\n".join([header, *(line(r) for r in rows)]))


def print_json(obj: Any) -> None:
    import msgspec

    click.echo(msgspec.json.encode(obj).decode())


def load_job_value(loader: Callable[..., Any], data: bytes, job: Any) -> Any:
    try:
        return loader(data, job)
    except Exception as e:  # noqa: BLE001 - the job's own exception, re-raised here
        import traceback

        notes = "\n".join(getattr(e, "__notes__", []))
        click.echo(notes or "".join(traceback.format_exception_only(e)), err=True)
        fail(f"job {job.id} failed: {type(e).__name__}: {e}", EXIT["job_failed"])


def print_value(value: Any, as_json: bool) -> None:
    if as_json:
        try:
            click.echo(json.dumps(value))
        except (TypeError, ValueError) as e:
            fail(f"the result cannot be printed as JSON ({e}); drop --json to print its repr")
    else:
        click.echo(repr(value))
