"""`gpud state JOB [FILE] [-o OUT]` (#14): list a job's state directory, or fetch a file."""

from __future__ import annotations

import os
import sys

import click

from gpud.cli_common import ago as _ago
from gpud.cli_common import client as _client
from gpud.cli_common import handle_errors
from gpud.cli_common import print_json as _print_json
from gpud.cli_options import url_option

__all__ = ["state"]


def _size(n: int) -> str:
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(x)


@click.command()
@click.argument("job_id", type=int)
@click.argument("file", required=False)
@click.option(
    "-o",
    "--output",
    "output",
    default=None,
    metavar="PATH",
    help="Write FILE here instead of to stdout.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@url_option
@handle_errors
def state(
    job_id: int, file: str | None, output: str | None, as_json: bool, url: str | None
) -> None:
    """List the files a job saved in its state directory ($GPUD_STATE_DIR), or print
    one of them (FILE, as listed; -o to save it to a file)."""
    with _client(url) as c:
        if file is None:
            if output is not None:
                raise click.UsageError("-o needs a FILE to fetch: gpud state JOB FILE -o PATH")
            lst = c.state_files(job_id)
            if as_json:
                _print_json(lst)
                return
            if not lst.files:
                click.echo(f"job {job_id}'s state directory is empty", err=True)
                return
            width = max(len(f.path) for f in lst.files)
            for f in lst.files:
                click.echo(f"{f.path:<{width}}  {_size(f.size):>9}  {_ago(f.mtime)}")
            if lst.truncated:
                click.echo(f"(only the first {len(lst.files)} files are listed)", err=True)
            return
        chunks = c.state_file(job_id, file)
        if output is None:
            out = sys.stdout.buffer
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            return
        tmp = f"{output}.part"
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        os.replace(tmp, output)
        click.echo(f"saved {file} of job {job_id} to {output}", err=True)
