"""`gpud suspend` and `gpud resume` (#13): stop a running job where it is, freeing its
GPUs and stopping its timeout clock, and continue it later, through the API."""

from __future__ import annotations

import sys

import click

from gpud.cli_common import EXIT, handle_errors
from gpud.cli_common import client as _client
from gpud.cli_common import print_json as _print_json
from gpud.cli_options import url_option

__all__ = ["resume", "suspend"]


def _each(job_ids: tuple[int, ...], as_json: bool, url: str | None, act: str) -> None:
    from gpud_client import ApiError

    out = []
    failed = False
    with _client(url) as c:
        for jid in job_ids:
            try:
                job = c.suspend(jid) if act == "suspend" else c.resume(jid)
            except ApiError as e:
                click.echo(f"Error: job {jid}: {e.detail}", err=True)
                failed = True
                continue
            out.append(job)
            if not as_json:
                if job.state == "suspended":
                    what = job.reason or "suspended"
                else:
                    what = f"resumed ({job.state})" if act == "resume" else job.state
                click.echo(f"job {jid}: {what}", err=True)
    if as_json:
        _print_json(out)
    if failed:
        sys.exit(EXIT["error"])


@click.command()
@click.argument("job_ids", type=int, nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
@url_option
@handle_errors
def suspend(job_ids: tuple[int, ...], as_json: bool, url: str | None) -> None:
    """Suspend running jobs (yours; admins: any): their processes stop where they are,
    their GPUs go to other jobs, their timeout clock stops and no GPU time is charged.
    `gpud resume` continues them."""
    _each(job_ids, as_json, url, "suspend")


@click.command()
@click.argument("job_ids", type=int, nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
@url_option
@handle_errors
def resume(job_ids: tuple[int, ...], as_json: bool, url: str | None) -> None:
    """Resume suspended jobs: at once where their GPUs are free, else as soon as they are
    (ahead of newer work of their priority)."""
    _each(job_ids, as_json, url, "resume")
