"""`gpud image build FILE::NAME` (#11): build a ``gpud.Image`` ahead of its first call."""

from __future__ import annotations

from typing import Any

import click

from gpud.cli_common import client as _client
from gpud.cli_common import handle_errors
from gpud.cli_common import print_json as _print_json
from gpud.cli_options import url_option

__all__ = ["image"]


@click.group()
def image() -> None:
    """Images built from gpud.Image definitions (Podman executor)."""


def _definition(obj: Any, target: str) -> Any:
    from gpud_client import Function, Image

    if isinstance(obj, Image):
        return obj
    if isinstance(obj, Function) and isinstance(obj.options.image, Image):
        return obj.options.image
    if isinstance(obj, Function):
        raise click.UsageError(
            f"{target} has no gpud.Image (its image= is "
            f"{obj.options.image!r}): there is nothing to build"
        )
    raise click.UsageError(
        f"{target} is neither a gpud.Image nor a function decorated with image=gpud.Image..."
    )


@image.command("build")
@click.argument("target", metavar="FILE::NAME")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@url_option
@handle_errors
def build(target: str, as_json: bool, url: str | None) -> None:
    """Build the image of FILE::NAME (a gpud.Image, or a function whose image= is one)
    now, with its log on stderr; print its name. Built before: prints it at once."""
    from gpud.cli_run import load_target
    from gpud_client.imagebuild import ensure_image

    obj, _ = load_target(target)
    definition = _definition(obj, target)
    with _client(url) as c:
        done = ensure_image(c, definition)
    if as_json:
        _print_json(done)
        return
    if done.cached:
        click.echo(f"gpud: image {done.name} was built before (Python {done.python})", err=True)
    click.echo(done.name)
