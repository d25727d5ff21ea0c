"""`gpud snapshots` and `gpud snapshots rm` (issue #4), through the API."""

from __future__ import annotations

import click

from gpud.cli_common import ago as _ago
from gpud.cli_common import client as _client
from gpud.cli_common import handle_errors
from gpud.cli_common import print_json as _print_json
from gpud.cli_common import print_table as _print_table
from gpud.cli_options import url_option

__all__ = ["snapshots"]


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n else "-"


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the snapshots as JSON.")
@url_option
@click.pass_context
@handle_errors
def snapshots(ctx: click.Context, as_json: bool, url: str | None) -> None:
    """List container snapshots (yours; an admin sees everyone's): function, image, size,
    when taken, restores, last use, and why one failed."""
    if ctx.invoked_subcommand is not None:
        return
    with _client(url) as c:
        lst = c.snapshots()
    if as_json:
        _print_json(lst)
        return
    if lst.note:
        click.echo(lst.note, err=True)
    if not lst.snapshots:
        click.echo(
            "no snapshots: a function run with snapshot=True gets one at its first call", err=True
        )
        return
    rows = []
    for s in lst.snapshots:
        info = s.last_error or ""
        if s.failures:
            info = f"{s.failures} failure{'s' if s.failures > 1 else ''} in a row: {info}"
        rows.append(
            (
                str(s.id),
                s.function,
                s.owner,
                s.image,
                s.state,
                _mb(s.size),
                _ago(s.created_at),
                str(s.restores),
                _ago(s.last_used),
                info,
            )
        )
    _print_table(
        (
            "ID",
            "FUNCTION",
            "OWNER",
            "IMAGE",
            "STATE",
            "SIZE",
            "CREATED",
            "RESTORES",
            "LAST USED",
            "INFO",
        ),
        rows,
    )
    click.echo(f"{_mb(lst.used_bytes)} of {_mb(lst.max_bytes)} (snapshot_max_bytes) used", err=True)


@snapshots.command("rm")
@click.argument("ids", nargs=-1, required=True, type=int)
@url_option
@handle_errors
def rm(ids: tuple[int, ...], url: str | None) -> None:
    """Remove snapshots (and their files); the function's next call takes a new one.
    This also brings a failed snapshot back into use."""
    with _client(url) as c:
        for i in ids:
            s = c.remove_snapshot(i)
            click.echo(f"removed snapshot {s.id} of {s.function}", err=True)
