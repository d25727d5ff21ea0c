"""Asking the daemon for a ``gpud.Image``, with the build's log on stderr (#11).

The definition goes first without its files: an image built before answers at once, and
wheels or a build context are sent only when a build is needed. While it builds, the
log streams to ``out``; on a terminal with a spinner that shows the current step.
"""

from __future__ import annotations

import platform
import sys
from typing import IO

from gpud_client.client import Client
from gpud_client.errors import ApiError, GpudError
from gpud_client.image import Image
from gpud_client.models import ImageBuildEvent, ImageBuildRequest

__all__ = ["ImageBuildFailed", "ensure_image"]


class ImageBuildFailed(GpudError):
    """The image could not be built (or does not fit this Python); the message has the
    reason and the end of the build's log."""

    def __init__(self, detail: str, tail: list[str]) -> None:
        text = detail
        if tail:
            text += "\n" + "\n".join(f"  | {line}" for line in tail)
        super().__init__(text)
        self.detail = detail
        self.tail = tail


def ensure_image(
    client: Client, image: Image, *, out: IO[str] | None = None, python: str | None = None
) -> ImageBuildEvent:
    """The image of this definition, built by the daemon if it has to be. Returns the
    ``done`` event (``name``: the image to submit with)."""
    python = python or platform.python_version()
    request = ImageBuildRequest(spec=image.spec, python=python)
    try:
        return _follow(client, request, out)
    except ApiError as e:
        if e.code != "missing_files":
            raise
    request = ImageBuildRequest(spec=image.spec, files=image.files, python=python)
    return _follow(client, request, out)


def _follow(client: Client, request: ImageBuildRequest, out: IO[str] | None) -> ImageBuildEvent:
    out = out if out is not None else sys.stderr
    from rich.console import Console

    console = Console(file=out, highlight=False, markup=False, soft_wrap=True)
    done: ImageBuildEvent | None = None
    status = None
    try:
        for ev in client.build_image(request):
            if ev.kind == "log" and ev.line is not None:
                if status is None and console.is_terminal:
                    status = console.status("building the image ...")
                    status.start()
                console.print(ev.line, style="dim")
                if status is not None and ev.line.startswith("STEP "):
                    status.update(f"building the image: {ev.line[:70]}")
            elif ev.kind == "error":
                raise ImageBuildFailed(ev.detail or "the image build failed", ev.tail)
            elif ev.kind == "done":
                done = ev
    finally:
        if status is not None:
            status.stop()
    if done is None or not done.name:
        raise GpudError(
            "the daemon ended the image build without saying how it went: "
            "see its log, and try again"
        )
    if not done.cached:
        console.print(f"gpud: built image {done.name} (Python {done.python})")
    return done
