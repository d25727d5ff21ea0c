"""`gpud tui`: a live view of the box for a team to keep open all day.

Talks to the daemon only through :mod:`gpud_client` (its async client over httpx).
"""

from __future__ import annotations

__all__ = ["run"]


def run(url: str | None = None, refresh: float = 1.0) -> None:
    """Run the TUI in this terminal until the user quits."""
    from tui.app import GpudTui

    GpudTui(url, refresh=refresh).run()
