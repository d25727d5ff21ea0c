"""A click group whose subcommands are imported when they are run (#12).

`gpud ps` used to import every command's module first: the admin commands (sqlite3,
pwd), `gpud run` (inspect, importlib.util), the usage report... A lazy command is named
here with the module and attribute it lives in; `gpud --help` and tests/test_docs.py
(which list every command) import them all, the command that runs imports its own.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

__all__ = ["LazyGroup"]


class LazyGroup(click.Group):
    # click.Group's own arguments pass through as they are: Any is their honest type here.
    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: command name -> "module:attribute"
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, attr = self.lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
            self.commands[cmd_name] = command
        return super().get_command(ctx, cmd_name)

    def all_commands(self) -> dict[str, click.Command]:
        """Every command, the lazy ones imported (for the docs check)."""
        ctx = click.Context(self)
        return {n: c for n in self.list_commands(ctx) if (c := self.get_command(ctx, n))}
