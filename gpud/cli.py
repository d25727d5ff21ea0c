"""The `gpud` command: the daemon (`gpud serve`) and every client subcommand.

Conventions: data goes to stdout, people-talk to stderr; every read command has --json;
user errors print ``Error: ...`` with the fix and exit 1. Exit codes (docs/cli.md):
0 ok, 1 error, 2 usage error, 3 no daemon answers, 4 the job failed (raised, timed out,
was cancelled or lost), 130 interrupted.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from gpud import __version__
from gpud.cli_common import EXIT, fail, handle_errors, load_job_value, print_value
from gpud.cli_common import ago as _ago
from gpud.cli_common import client as _client
from gpud.cli_common import print_json as _print_json
from gpud.cli_common import print_table as _print_table
from gpud.cli_lazy import LazyGroup
from gpud.cli_options import url_option

if TYPE_CHECKING:
    from gpud_client.models import CheckpointInfo

__all__ = ["EXIT", "main"]

#: Commands in their own modules, imported only when run (#12: `gpud ps` should not pay
#: for sqlite3, inspect or the usage report). tests/test_imports.py keeps it so.
LAZY = {
    "run": "gpud.cli_run:run",  # the largest command
    # the shared box (#5): accounting, identity, administration
    "admin": "gpud.cli_admin:admin",
    "snapshots": "gpud.cli_snapshots:snapshots",
    "state": "gpud.cli_state:state",  # #14
    "image": "gpud.cli_images:image",
    "usage": "gpud.cli_usage:usage",
    "whoami": "gpud.cli_usage:whoami",
    "gc": "gpud.cli_gc:gc_command",
    "suspend": "gpud.cli_suspend:suspend",  # #13
    "resume": "gpud.cli_suspend:resume",
    "doctor": "gpud.cli_doctor:doctor",
    "shell": "gpud.cli_shell:shell",  # #14
    "attach": "gpud.cli_shell:attach",
    "exec": "gpud.cli_shell:exec_command",
}


@click.group(cls=LazyGroup, lazy=LAZY, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="gpud")
def cli() -> None:
    """gpud: run Python functions on this machine's GPUs.

    Start the daemon with `gpud serve`, then `gpud run script.py::fn --gpu h100`.
    """


# -- serve ---------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="GPUD_CONFIG",
    help="A TOML config file (default: none; built-in defaults).",
)
@click.option("--data-dir", default=None, help="Where the ledger and job files live.")
@click.option("--socket", "socket_path", default=None, help="The Unix socket to listen on.")
@click.option(
    "--tcp",
    default=None,
    metavar="HOST:PORT",
    help="Also listen on TCP (every request there needs a token).",
)
@click.option(
    "--fake-gpus",
    default=None,
    metavar="TYPES",
    help="Comma-separated fake GPU types, used only where no NVIDIA driver exists.",
)
@click.option(
    "--gpus",
    "gpu_mode",
    type=click.Choice(["auto", "fake", "none"]),
    default=None,
    help="auto: NVML, or fake GPUs without a driver; fake: always fake; none.",
)
@click.option("--cpu-slots", type=int, default=None, help="Concurrent CPU-only jobs.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
def serve(
    config_path: str | None,
    data_dir: str | None,
    socket_path: str | None,
    tcp: str | None,
    fake_gpus: str | None,
    gpu_mode: str | None,
    cpu_slots: int | None,
    log_level: str | None,
) -> None:
    """Run the daemon in the foreground (Ctrl-C or SIGTERM stops it; jobs keep running
    and are re-adopted by the next start)."""
    import logging

    import trio

    from gpud.config import ConfigError, load_config
    from gpud.daemon import AlreadyRunning
    from gpud.executors.process import WorkerPythonError
    from gpud.gpus import GpuInventoryError
    from gpud.server import serve as run_server

    try:
        cfg = load_config(
            config_path,
            data_dir=data_dir,
            socket=socket_path,
            tcp=tcp,
            fake_gpus=fake_gpus,
            gpus=gpu_mode,
            cpu_slots=cpu_slots,
            log_level=log_level,
        )
    except ConfigError as e:
        fail(str(e))
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        stream=sys.stderr,
        # journald adds its own timestamps; a plain level prefix keeps lines greppable.
        format="%(levelname)s %(name)s: %(message)s",
    )
    from gpud import systemd

    if systemd.stderr_is_journal():  # under systemd: levels as journal priorities (#5)
        for h in logging.getLogger().handlers:
            h.setFormatter(systemd.JournalFormatter())
    from gpud import logthrottle

    # A request that trips a bug can be repeated: one traceback per place a minute (#10).
    logthrottle.install(interval=60.0)

    async def main() -> None:
        import signal

        async with trio.open_nursery() as nursery:
            served = await nursery.start(run_server, cfg)
            systemd.notify(f"READY=1\nSTATUS=serving on {served.socket}")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for sig in signals:
                    systemd.notify("STOPPING=1")
                    logging.getLogger("gpud").info(
                        "stopping on %s; running jobs keep running and are re-adopted on the "
                        "next start",
                        signal.Signals(sig).name,
                    )
                    nursery.cancel_scope.cancel()
                    break

    from gpud.executors.podman import PodmanUnavailable
    from gpud.ledger.schema import SchemaTooNew

    expected = (
        AlreadyRunning,
        WorkerPythonError,
        GpuInventoryError,
        ConfigError,
        ValueError,
        PodmanUnavailable,
        SchemaTooNew,
    )
    try:
        trio.run(main)
    except BaseException as e:  # noqa: BLE001 - trio wraps start-up errors in a group
        err = _first_leaf(e)
        if isinstance(err, expected):
            fail(str(err))
        if isinstance(err, PermissionError):
            fail(
                f"{err}: run gpud serve as a user that can write there, or set --data-dir/--socket"
            )
        raise


def _first_leaf(e: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


# -- read commands -------------------------------------------------------------------------


def _duration(job: Any) -> str:
    if job.started_at is None:
        return "-"
    end = job.ended_at or time.time()
    s = max(0.0, end - job.started_at)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _start_kind(job: Any) -> str:
    """How the job started and how long until its code ran: "warm 4ms", "cold 61ms"."""
    if not job.start_kind:
        return "-"
    if job.startup is None:
        return str(job.start_kind)
    return f"{job.start_kind} {job.startup * 1000:.0f}ms"


def _python_of(job: Any) -> str:
    """Which interpreter ran the job (#11): its path, or the image's for a container."""
    if job.python_path:
        return str(job.python_path)
    return f"image {job.image}" if job.image else "-"


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Include finished jobs.")
@click.option("--state", default=None, help="Only these states (comma-separated).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option(
    "--before",
    type=click.IntRange(min=1),
    default=None,
    metavar="ID",
    help="Only jobs with a lower id: the next page, as the last line says.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
@url_option
@handle_errors
def ps(
    show_all: bool,
    state: str | None,
    limit: int,
    before: int | None,
    as_json: bool,
    url: str | None,
) -> None:
    """List jobs: queued and running ones (with why they wait), or --all."""
    asked = state
    if state is None and not show_all:
        state = "queued,starting,running,suspended"
    with _client(url) as c:
        page = c.list_jobs(state=state, limit=limit, cursor=before)
    if as_json:
        _print_json(page.jobs)
        return
    if not page.jobs:
        click.echo(
            "no jobs"
            + (
                f" below id {before}"
                if before
                else ""
                if show_all
                else " queued or running (see --all)"
            ),
            err=True,
        )
        for line in _parked_lines(page.parked):
            click.echo(line)
        return
    rows = []
    for j in page.jobs:
        gpus = (
            ",".join(map(str, j.gpu_indices))
            if j.gpu_indices
            else ("/".join(j.gpu) if j.gpu else "cpu")
        )
        info = (
            (f"{j.reason}; position {j.position}" if j.position else j.reason)
            if j.reason
            else j.error or (f"attempt {j.attempt}/{j.retries + 1}" if j.retries else "")
        )
        rows.append(
            (
                str(j.id),
                j.name,
                j.state,
                j.owner,
                gpus,
                _ago(j.submitted_at),
                _start_kind(j),
                _duration(j),
                _python_of(j),
                info,
            )
        )
    _print_table(
        ("ID", "NAME", "STATE", "OWNER", "GPUS", "SUBMITTED", "START", "RUNTIME", "PYTHON", "INFO"),
        rows,
    )
    for line in _parked_lines(page.parked):
        click.echo(line)
    if page.next_cursor is not None:
        # A page, never the whole ledger (a million jobs): say how to get the next one.
        opts = " --all" if show_all and asked is None else ""
        opts += f" --state {asked}" if asked else ""
        opts += f" --limit {limit}" if limit != 50 else ""
        click.echo(f"older jobs: gpud ps{opts} --before {page.next_cursor}", err=True)


@cli.command()
@click.argument("job_id", type=int)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@url_option
@handle_errors
def logs(job_id: int, follow: bool, url: str | None) -> None:
    """Print a job's output (stdout and stderr, as written)."""
    out = sys.stdout.buffer
    with _client(url) as c:
        for chunk in c.log_bytes(job_id, follow=follow):
            out.write(chunk)
            out.flush()


@cli.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the value as JSON.")
@url_option
@handle_errors
def result(job_id: int, as_json: bool, url: str | None) -> None:
    """Print a finished job's return value (repr, or --json); a failed job's error."""
    from gpud_client.payload import load_result

    with _client(url) as c:
        job = c.get_job(job_id)
        if job.state in ("queued", "starting", "running", "suspended"):
            fail(f"job {job_id} is {job.state}; wait for it (gpud logs {job_id} -f) and retry")
        if not job.has_result:
            fail(
                f"job {job_id} ended {job.state} without a result: {job.error or job.state}",
                EXIT["job_failed"],
            )
        data = c.result(job_id)
    print_value(load_job_value(load_result, data, job), as_json)


@cli.command()
@click.argument("job_ids", type=int, nargs=-1)
@click.option(
    "--batch",
    "batch_ids",
    type=int,
    multiple=True,
    metavar="ID",
    help="Cancel the jobs of this batch (a .map) that are not over.",
)
@click.option("--json", "as_json", is_flag=True)
@url_option
@handle_errors
def cancel(
    job_ids: tuple[int, ...], batch_ids: tuple[int, ...], as_json: bool, url: str | None
) -> None:
    """Cancel jobs: queued ones at once, running ones are stopped (TERM, then KILL)."""
    from gpud_client import ApiError

    if not job_ids and not batch_ids:
        fail("name the jobs to cancel (gpud cancel 12 13) or a batch (gpud cancel --batch 3)")
    out: list[Any] = []
    failed = False
    with _client(url) as c:
        for bid in batch_ids:
            try:
                batch = c.cancel_batch(bid)
            except ApiError as e:
                click.echo(f"Error: batch {bid}: {e.detail}", err=True)
                failed = True
                continue
            out.append(batch)
            if not as_json:
                n = batch.counts
                click.echo(
                    f"batch {bid}: {n.cancelled} cancelled, {batch.done - n.cancelled} "
                    f"ended otherwise, of {batch.size}",
                    err=True,
                )
        for jid in job_ids:
            try:
                job = c.cancel(jid)
            except ApiError as e:
                click.echo(f"Error: job {jid}: {e.detail}", err=True)
                failed = True
                continue
            out.append(job)
            if not as_json:
                what = "cancelled" if job.state == "cancelled" else f"already {job.state}"
                click.echo(f"job {jid}: {what}", err=True)
    if as_json:
        _print_json(out)
    if failed:
        sys.exit(EXIT["error"])


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@url_option
@handle_errors
def gpus(as_json: bool, url: str | None) -> None:
    """Show the box's GPUs: type, memory, utilisation, temperature, power, holder."""
    with _client(url) as c:
        lst = c.gpus()
    if as_json:
        _print_json(lst)
        return
    if lst.note:
        click.echo(lst.note, err=True)
    if lst.checkpoint is not None:
        click.echo(_checkpoint_line(lst.checkpoint), err=True)
    if not lst.gpus:
        click.echo("no GPUs", err=True)
        return
    rows = []
    gib = 1024**3
    for g in lst.gpus:
        held = (
            f"job {g.job_id} ({g.owner})"
            if g.job_id is not None
            else f"slurm job {g.cluster_job} ({g.cluster_user}), not gpud's"
            if g.cluster_job is not None
            else "other processes: " + ",".join(str(p.pid) for p in g.processes if p.job_id is None)
            if g.busy_foreign
            else "-"
        )
        rows.append(
            (
                str(g.index),
                g.type + (" (FAKE)" if g.fake else ""),
                g.name,
                f"{g.memory_used / gib:.1f}/{g.memory_total / gib:.0f} GiB",
                "-" if g.utilization is None else f"{g.utilization}%",
                "-" if g.temperature is None else f"{g.temperature}C",
                "-" if g.power_w is None else f"{g.power_w:.0f}W",
                held,
                g.uuid,
            )
        )
    _print_table(
        ("IDX", "TYPE", "NAME", "MEMORY", "UTIL", "TEMP", "POWER", "HELD BY", "UUID"), rows
    )
    for line in _parked_lines(lst.parked, lst.park_max_bytes):
        click.echo(line)


def _parked_lines(parked: list[Any], budget: int | None = None) -> list[str]:
    """#13: idle warm workers whose GPU state waits in host memory for their next call."""
    if not parked:
        return []
    gib = 1024**3
    used = sum(p.bytes for p in parked)
    head = f"parked warm workers: {len(parked)}, {used / gib:.1f} GiB in host memory"
    if budget:
        head += f" of {budget / gib:.1f} GiB (park_max_bytes)"
    return [head] + [
        f"  worker {p.worker_id}: {p.function} (job {p.job_id}, {p.owner}), "
        f"{p.bytes / gib:.1f} GiB from GPU {','.join(map(str, p.gpus)) or '-'}, "
        f"parked {_ago(p.parked_at)}"
        for p in parked
    ]


def _checkpoint_line(c: CheckpointInfo) -> str:
    """#13: whether idle GPU state can be parked in host memory, and if not why."""
    if c.kind == "fake":
        return f"GPU checkpointing: FAKE ({c.reason})"
    if c.available:
        return f"GPU checkpointing: available ({c.reason})"
    return f"GPU checkpointing: unavailable: {c.reason}"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the images as JSON.")
@url_option
@handle_errors
def images(as_json: bool, url: str | None) -> None:
    """List the local images jobs can use (Podman executor), with their Python; those
    gpud built from a gpud.Image with their definition's hash, creator and last use."""
    with _client(url) as c:
        lst = c.images()
    if as_json:
        _print_json(lst)
        return
    if lst.note:
        click.echo(lst.note, err=True)
    if not lst.images:
        if lst.executor == "podman":
            click.echo("no images: build one (podman build) first; gpud never pulls", err=True)
        return
    rows = [
        (
            i.name,
            i.python or "(not inspected yet)",
            f"{i.size / 1e6:.0f} MB",
            i.id[:12],
            (i.definition or "-")[:12],
            i.creator or "-",
            _ago(i.last_used),
            "default" if i.name == lst.default else "",
        )
        for i in lst.images
    ]
    _print_table(("IMAGE", "PYTHON", "SIZE", "ID", "DEFINITION", "CREATOR", "LAST USED", ""), rows)
    if lst.max_bytes:
        built = sum(i.size for i in lst.images if i.definition)
        click.echo(
            f"built images: {built / 2**20:.0f} MB of {lst.max_bytes / 2**20:.0f} MB "
            "(image_max_bytes)",
            err=True,
        )


@cli.command()
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="How often to poll the daemon.",
)
@url_option
@handle_errors
def tui(refresh: float, url: str | None) -> None:
    """A live view of the box: GPUs, the queue, running and recent jobs, logs; cancel
    from the keyboard (q quits, ? shows the keys)."""
    # Imported here: Textual takes a while to import, and no other command needs it.
    from tui import run as run_tui

    run_tui(url, refresh)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@url_option
def version(as_json: bool, url: str | None) -> None:
    """Print the client's version and, if one answers, the daemon's."""
    from gpud_client import GpudError

    daemon: dict[str, Any] | None = None
    try:
        with _client(url) as c:
            h = c.health()
        daemon = {
            "version": h.version,
            "executor": h.executor,
            "worker_python": h.worker_python,
            "gpus": h.gpu_source,
        }
    except GpudError as e:
        daemon = None
        err = str(e)
    info = {"client": __version__, "python": sys.version.split()[0], "daemon": daemon}
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"gpud {__version__} (Python {info['python']})")
    if daemon:
        click.echo(
            f"daemon {daemon['version']}: executor {daemon['executor']}, worker Python "
            f"{daemon['worker_python']}, GPUs from {daemon['gpus']}"
        )
    else:
        click.echo(f"daemon: not reachable ({err})", err=True)


def main() -> None:
    cli(prog_name="gpud")
