"""`gpud gc`: apply the daemon's retention settings now (#12), through its API.

The daemon owns the ledger (it rolls usage up and removes records in its own
transactions) and already collects every ``retention_interval``; this asks it to do so
now, or with --dry-run, to say what it would remove.
"""

from __future__ import annotations

import click

from gpud.cli_common import EXIT, fail, handle_errors
from gpud.cli_common import client as _client
from gpud.cli_common import print_json as _print_json
from gpud.cli_options import url_option

__all__ = ["gc_command"]


def _size(n: int) -> str:
    for unit, step in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} bytes"


def _setting(value: float | int | None, size: bool = False) -> str:
    from gpud_client.duration import format_duration

    if value is None:
        return "none (kept)"
    return _size(int(value)) if size else format_duration(float(value))


@click.command("gc")
@click.option(
    "--dry-run", "-n", is_flag=True, help="Only say what would be removed, and how many bytes."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@url_option
@handle_errors
def gc_command(dry_run: bool, as_json: bool, url: str | None) -> None:
    """Remove finished jobs' directories and old records now, as the retention settings
    say (admins). The daemon also does this by itself every retention_interval; jobs'
    usage is rolled up first, so `gpud usage` keeps its totals."""
    with _client(url) as c:
        r = c.gc(dry_run=dry_run)
    if as_json:
        _print_json(r)
    else:
        verb = "would remove" if dry_run else "removed"
        cap = f"; {r.over_cap_dirs} of them over retention_max_bytes" if r.over_cap_dirs else ""
        click.echo(
            f"{verb} {r.job_dirs} finished jobs' directories ({_size(r.job_dir_bytes)}{cap})",
            err=True,
        )
        click.echo(
            f"{verb} the records of {r.jobs} jobs ({r.attempts} attempts, {r.events} "
            f"events, {r.payloads} payloads); their usage is kept, rolled up",
            err=True,
        )
        if r.jobs_dir_bytes is not None:
            click.echo(
                f"the jobs directory holds {_size(r.jobs_dir_bytes)}"
                + (" after" if not dry_run else ""),
                err=True,
            )
        click.echo(
            f"the ledger has {_size(r.ledger_bytes)} in use; took {r.seconds:.1f} s", err=True
        )
        click.echo(
            f"settings: retention_job_dirs {_setting(r.retention_job_dirs)}, "
            f"retention_jobs {_setting(r.retention_jobs)}, retention_max_bytes "
            f"{_setting(r.retention_max_bytes, size=True)}",
            err=True,
        )
    for e in r.errors:
        click.echo(f"warning: {e}", err=True)
    if r.errors:
        fail(
            f"{len(r.errors)} directories could not be removed (see above; the daemon's log "
            "has them too)",
            EXIT["error"],
        )
