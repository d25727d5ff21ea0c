"""`gpud usage` (accounting, like a small sreport) and `gpud whoami`, through the API."""

from __future__ import annotations

import datetime as _dt
import json
import time
from typing import Any

import click

from gpud.cli_common import client as _client
from gpud.cli_common import fail, handle_errors
from gpud.cli_common import print_json as _print_json
from gpud.cli_options import url_option

__all__ = ["usage", "whoami"]


def parse_since(text: str, now: float) -> float:
    """'7d', '36h', '90m' (that long ago), or a date/time '2026-11-01[T12:00]' (local)."""
    from gpud_client.duration import parse_duration

    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return _dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give a duration such as 7d or 12h, or a date such as 2026-11-01"
        ) from None


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}"


@click.command()
@click.option("--user", "user", default=None, help="Only this user's jobs.")
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="A duration back from now (7d, 12h) or a date (2026-11-01).",
)
@click.option(
    "--by",
    type=click.Choice(["user", "day", "gpu-type"]),
    default="user",
    show_default=True,
    help="Group the report.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@url_option
@handle_errors
def usage(user: str | None, since: str, by: str, as_json: bool, url: str | None) -> None:
    """Show GPU-seconds and wall time used, by user, day or GPU type (100 ms granularity)."""
    now = time.time()
    start = parse_since(since, now)
    if start >= now:
        fail(f"--since {since} is in the future")
    with _client(url) as c:
        rep = c.usage(since=start, until=now, user=user, by=by)
    if as_json:
        _print_json(rep)
        return
    fmt = "%Y-%m-%d %H:%M"
    click.echo(
        f"usage from {_dt.datetime.fromtimestamp(rep.since).strftime(fmt)} to "
        f"{_dt.datetime.fromtimestamp(rep.until).strftime(fmt)}"
        + (f", jobs of {user}" if user else ""),
        err=True,
    )
    if not rep.lines:
        click.echo("no jobs ran in that time", err=True)
        return
    head = {"user": "USER", "day": "DAY", "gpu-type": "GPU TYPE"}[by]
    width = max(len(head), *(len(x.key) for x in rep.lines), 5)
    click.echo(
        f"{head:<{width}} {'JOBS':>6} {'GPU-SECONDS':>13} {'GPU-HOURS':>10} {'WALL-SECONDS':>13}"
    )
    for x in [*rep.lines, rep.total]:
        key = "TOTAL" if x is rep.total else x.key
        click.echo(
            f"{key:<{width}} {x.jobs:>6} {x.gpu_seconds:>13.1f} "
            f"{_hours(x.gpu_seconds):>10} {x.wall_seconds:>13.1f}"
        )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
@url_option
@handle_errors
def whoami(as_json: bool, url: str | None) -> None:
    """Show who the daemon takes you to be, how it knows, and your quotas."""
    with _client(url) as c:
        me = c.whoami()
    if as_json:
        _print_json(me)
        return
    how = {
        "peer": "the Unix socket's peer credentials",
        "token": "your API token",
        "owner": "the daemon's own user (its socket is private)",
    }.get(me.via, me.via)
    q = me.quota
    limits: list[Any] = [
        f"gpus {q.max_gpus}" if q.max_gpus is not None else None,
        f"queued {q.max_queued}" if q.max_queued is not None else None,
        f"max timeout {q.max_timeout:g} s" if q.max_timeout is not None else None,
    ]
    click.echo(json.dumps(me.name) if not me.name.isprintable() else me.name)
    click.echo(
        f"{'admin' if me.admin else 'user'}, identified by {how}; jobs run as "
        f"{me.runs_as or '(nobody: no Unix account here)'}; quotas: "
        f"{', '.join(x for x in limits if x) or 'none'}",
        err=True,
    )
