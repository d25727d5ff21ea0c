"""`gpud run FILE::FN [options] [function parameters as --options]`.

The function's parameters become options: underscores to dashes, types from the
annotations (or the default's type), bools as --x/--no-x, required when they have no
default. `gpud run FILE::FN --help` lists them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import click

from gpud.cli_common import EXIT, fail, handle_errors, load_job_value, print_value

__all__ = ["load_target", "params_command", "ring", "run"]

_SCALARS: dict[Any, click.ParamType[Any]] = {int: click.INT, float: click.FLOAT, str: click.STRING}


class _Json(click.ParamType[Any]):
    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            self.fail(
                f"{value!r} is not valid JSON (this parameter takes a list or dict, e.g. '[1, 2]')",
                param,
                ctx,
            )


def load_target(target: str) -> tuple[Any, str]:
    """Import FILE and return (the object named FN, "module.fn")."""
    file, sep, name = target.partition("::")
    if not sep:
        if target.count(":") == 1 and target.split(":")[0].endswith(".py"):
            raise click.UsageError(
                f"{target!r}: did you mean '::' instead of ':'? "
                f"(gpud run {target.replace(':', '::')})"
            )
        raise click.UsageError(
            f"{target!r}: name the function as FILE::FUNCTION, e.g. examples/hello.py::square"
        )
    path = Path(file)
    if not path.is_file():
        raise click.UsageError(f"{file}: no such file")
    if not name.isidentifier():
        raise click.UsageError(f"{name!r} is not a function name")
    module_name = path.stem if path.stem.isidentifier() else "gpud_target"
    # Like `python FILE`: the script's directory comes first on sys.path, so its local
    # imports resolve (and are captured by value when the job is pickled).
    sys.path.insert(0, str(path.resolve().parent))
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise click.ClickException(f"importing {file} failed: {type(e).__name__}: {e}") from e
    obj = getattr(module, name, None)
    if obj is None:
        found = sorted(
            k
            for k, v in vars(module).items()
            if callable(v)
            and not k.startswith("_")
            and getattr(v, "__module__", module_name) == module_name
        )
        hint = f"; functions there: {', '.join(found)}" if found else ""
        raise click.UsageError(f"{file} has no function {name!r}{hint}")
    return obj, f"{module_name}.{name}"


def params_command(fn: Any, name: str) -> click.Command:
    """A click command whose options are ``fn``'s parameters; its callback returns kwargs."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to defaults
        hints = {}
    params: list[click.Parameter] = []
    for pname, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        opt = "--" + pname.replace("_", "-")
        hint = hints.get(pname, p.annotation)
        has_default = p.default is not p.empty
        origin = typing.get_origin(hint)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = args[0] if len(args) == 1 else str
        # No `default=` at all when there is none: click counts an explicit None as given.
        extra: dict[str, Any] = {"default": p.default} if has_default else {}
        if hint is bool or (hint is p.empty and isinstance(p.default, bool)):
            params.append(
                click.Option(
                    [f"{opt}/--no-{pname.replace('_', '-')}", pname],
                    required=not has_default,
                    show_default=has_default,
                    **extra,
                )
            )
            continue
        if hint is p.empty:
            ptype = _SCALARS.get(type(p.default), click.STRING) if has_default else click.STRING
        elif hint in _SCALARS:
            ptype = _SCALARS[hint]
        elif typing.get_origin(hint) in (list, dict, tuple) or hint in (list, dict, tuple):
            ptype = _Json()
        else:
            ptype = click.STRING
        params.append(
            click.Option(
                [opt, pname],
                type=ptype,
                required=not has_default,
                show_default=has_default,
                **extra,
            )
        )
    return click.Command(
        name,
        params=params,
        callback=lambda **kw: kw,
        help=inspect.getdoc(fn) or None,
        add_help_option=False,
    )


def ring(text: str) -> None:
    """--notify bell: the terminal's bell and a line on stderr, and a desktop notice where
    notify-send is installed (best effort: a missing one is no error)."""
    click.echo(f"\a{text}", err=True)
    import shutil
    import subprocess

    desktop = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if desktop and shutil.which("notify-send"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["notify-send", "gpud", text],
                timeout=5,
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )


def _raw(obj: Any) -> Any:
    return getattr(obj, "raw", getattr(obj, "__wrapped__", obj))


@click.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.argument("target", required=False)
@click.option(
    "--gpu",
    default=None,
    metavar="SPEC",
    help="GPUs: h100, h100:2, any, any:2, or fallbacks 'h100:2,a100:4'.",
)
@click.option("--timeout", default=None, metavar="DURATION", help="e.g. 90s, 30m, 2h.")
@click.option("--retries", type=click.IntRange(0, 20), default=None)
@click.option("--priority", type=click.IntRange(-1000, 1000), default=None)
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Set in the job.")
@click.option("--image", default=None, help="The container image (Podman executor).")
@click.option(
    "--memory",
    default=None,
    metavar="SIZE",
    help="Memory limit, e.g. 512M or 16G (enforced by the Podman executor).",
)
@click.option(
    "--cpu",
    type=float,
    default=None,
    help="CPU limit in CPUs, e.g. 2 or 0.5 (enforced by the Podman executor).",
)
@click.option(
    "--python",
    "python",
    default=None,
    metavar="PATH",
    help="The interpreter the job runs with (process executor): a path on the "
    "daemon's machine, or 'daemon' for the admin's. Default: this one, i.e. "
    "your venv or conda env ($GPUD_JOB_PYTHON overrides).",
)
@click.option(
    "--signal-before",
    "signal_before",
    default=None,
    metavar="DURATION",
    help="Send --signal (SIGUSR1) this long before the timeout, e.g. 5m.",
)
@click.option(
    "--signal",
    "signal_name",
    default=None,
    metavar="NAME",
    help="The early warning's signal (default SIGUSR1).",
)
@click.option(
    "--grace",
    default=None,
    metavar="DURATION",
    help="Between SIGTERM and SIGKILL on cancel or timeout (default 10s).",
)
@click.option(
    "--after",
    "after",
    default=None,
    metavar="IDS",
    help="Start after these jobs of yours (comma-separated ids) have succeeded; "
    "if one does not, this job is cancelled.",
)
@click.option(
    "--after-any",
    is_flag=True,
    help="With --after: start once they have ended, however they ended.",
)
@click.option(
    "--notify",
    "notify",
    default=None,
    metavar="URL|bell",
    help="When the job ends: POST to this webhook URL (if the daemon's admin "
    "allows its host), or 'bell': ring the terminal (in the foreground).",
)
@click.option(
    "--notify-on",
    "notify_on",
    default=None,
    metavar="STATES",
    help="The final states that notify (comma-separated, e.g. failed,timed_out; default: all).",
)
@click.option("--detach", "-d", is_flag=True, help="Print the job id and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the return value as JSON.")
@click.option("--url", envvar="GPUD_URL", default=None, metavar="URL")
@click.option("-h", "--help", "show_help", is_flag=True, help="Show this and FN's parameters.")
@click.pass_context
def run(
    ctx: click.Context,
    target: str | None,
    gpu: str | None,
    timeout: str | None,
    retries: int | None,
    priority: int | None,
    env: tuple[str, ...],
    image: str | None,
    memory: str | None,
    cpu: float | None,
    python: str | None,
    signal_before: str | None,
    signal_name: str | None,
    grace: str | None,
    after: str | None,
    after_any: bool,
    notify: str | None,
    notify_on: str | None,
    detach: bool,
    as_json: bool,
    url: str | None,
    show_help: bool,
) -> None:
    """Run FILE::FN as a job and print its return value.

    FN's parameters become options (--my-param VALUE). The job's output streams to
    stderr; Ctrl-C cancels the job. Options given here override @app.function(...).
    """
    if target is None:
        if show_help:
            click.echo(ctx.get_help())
            return
        raise click.UsageError("name the function to run: gpud run FILE::FN")
    obj, qualname = load_target(target)
    if not callable(obj):
        raise click.UsageError(f"{target} is not a function")
    cmd = params_command(_raw(obj), f"gpud run {target}")
    if show_help:
        click.echo(ctx.get_help())
        click.echo("")
        with click.Context(cmd, info_name=cmd.name) as sub:
            click.echo(cmd.get_help(sub).replace("Usage: gpud run", "Parameters of", 1))
        return
    try:
        kwargs = cmd.main(args=list(ctx.args), standalone_mode=False, prog_name=cmd.name)
    except click.ClickException as e:
        raise click.UsageError(f"{e.format_message()} (see: gpud run {target} --help)") from None
    bell = notify is not None and notify.strip().lower() == "bell"
    if bell and detach:
        raise click.UsageError(
            "--notify bell rings this terminal, so it needs gpud run in "
            "the foreground: drop --detach, or give a webhook URL"
        )
    if after_any and not after:
        raise click.UsageError("--after-any goes with --after IDS")
    from gpud_client.notify import FINAL_STATES, parse_states

    try:
        ring_on = parse_states(notify_on) if notify_on is not None else FINAL_STATES
    except ValueError as e:
        raise click.UsageError(f"--notify-on: {e}") from None
    env_map = {}
    for item in env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.UsageError(f"--env {item!r}: write KEY=VALUE")
        env_map[k] = v

    @handle_errors
    def go() -> None:
        import gpud_client
        from gpud_client.payload import load_result

        fn = obj if isinstance(obj, gpud_client.Function) else gpud_client.function(obj)
        overrides: dict[str, Any] = {}
        if gpu is not None:
            overrides["gpu"] = gpu
        if timeout is not None:
            overrides["timeout"] = timeout
        if retries is not None:
            overrides["retries"] = retries
        if priority is not None:
            overrides["priority"] = priority
        if env_map:
            overrides["env"] = {**fn.options.env, **env_map}
        # A relative path is relative to where `gpud run` was typed.
        interpreter = python if python in (None, "daemon") else os.path.abspath(python)
        for key, value in (
            ("image", image),
            ("memory", memory),
            ("cpu", cpu),
            ("python", interpreter),
            ("signal_before", signal_before),
            ("signal", signal_name),
            ("grace", grace),
        ):
            if value is not None:
                overrides[key] = value
        if url is not None:
            overrides["url"] = url
        if after:
            overrides["after"] = after
            overrides["after_any"] = after_any
        if notify is not None and not bell:
            overrides["notify"] = notify
            if notify_on is not None:
                overrides["notify_on"] = ring_on
        try:
            fn = fn.with_options(**overrides) if overrides else fn
        except (TypeError, ValueError) as e:
            raise click.UsageError(str(e)) from None
        handle = fn.spawn(**kwargs)
        if detach:
            if as_json:
                click.echo(json.dumps({"job_id": handle.id}))
            else:
                click.echo(handle.id)
            return
        click.echo(f"job {handle.id} submitted", err=True)
        try:
            for chunk in handle.client.log_bytes(handle.id, follow=True):
                os.write(sys.stderr.fileno(), chunk)
            job = handle.wait()
        except KeyboardInterrupt:
            handle.cancel()
            click.echo(f"\ncancelled job {handle.id}", err=True)
            sys.exit(EXIT["interrupted"])
        if bell and job.state in ring_on:
            ring(f"gpud job {handle.id} {job.state.replace('_', ' ')}")
        if job.state == "succeeded" or job.has_result:
            value = load_job_value(load_result, handle.client.result(handle.id), job)
            print_value(value, as_json)
            return
        fail(
            f"job {handle.id} {job.state.replace('_', ' ')}: {job.error or job.state}",
            EXIT["job_failed"],
        )

    go()
