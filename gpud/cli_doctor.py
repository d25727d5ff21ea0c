"""`gpud doctor`: one line per thing gpud needs, ok or what to do (#16).

Exit code 0 when no check fails (warnings and n/a included), 1 when one does, so a
provisioning script can gate on it.
"""

from __future__ import annotations

import json
import sys

import click

from gpud.cli_common import fail

_STYLE = {"ok": "green", "warn": "yellow", "fail": "red", "n/a": "bright_black"}


@click.command("doctor")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="GPUD_CONFIG",
    help="The daemon's TOML config file (as `gpud serve`).",
)
@click.option("--data-dir", default=None, help="The daemon's data directory.")
@click.option("--socket", "socket_path", default=None, help="The daemon's Unix socket.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(
    config_path: str | None, data_dir: str | None, socket_path: str | None, as_json: bool
) -> None:
    """Check what gpud needs on this machine and say what to fix.

    Reads the settings as `gpud serve` does (run it as the daemon's user, e.g. with sudo
    for the system daemon). Exit code 0 if no check fails, 1 if one does.
    """
    from gpud.config import ConfigError, load_config
    from gpud.doctor import run_checks

    try:
        cfg = load_config(config_path, data_dir=data_dir, socket=socket_path)
    except ConfigError as e:
        fail(str(e))
    checks = run_checks(cfg)
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        click.echo(
            json.dumps({"ok": not failed, "checks": [c.to_dict() for c in checks]}, indent=2)
        )
    else:
        width = max(len(c.name) for c in checks)
        color = sys.stdout.isatty()
        for c in checks:
            status = f"{c.status:<4}"
            if color:
                status = click.style(status, fg=_STYLE.get(c.status))
            line = f"{status}  {c.name:<{width}}  {c.message}"
            if c.fix:
                line += f"\n      {'':<{width}}  -> {c.fix}"
            click.echo(line)
        counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail", "n/a")}
        click.echo(", ".join(f"{n} {s}" for s, n in counts.items()), err=True)
    sys.exit(1 if failed else 0)
