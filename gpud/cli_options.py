"""Options shared by the `gpud` commands in gpud.cli and its sibling modules (below them
all, as gpud.cli_common is: none of them imports gpud.cli)."""

from __future__ import annotations

import click

__all__ = ["url_option"]

url_option = click.option(
    "--url",
    envvar="GPUD_URL",
    default=None,
    metavar="URL",
    help="The daemon: unix:///path/to.sock or http://host:port (default: GPUD_URL, then "
    "~/.config/gpud/client.toml, then the default socket).",
)
