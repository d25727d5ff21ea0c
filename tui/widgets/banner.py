"""The bar that says the daemon is not answering (or answered nonsense), on every screen."""

from __future__ import annotations

from textual.widgets import Static

__all__ = ["Banner"]


class Banner(Static):
    DEFAULT_CSS = """
    Banner {
        display: none; height: auto; padding: 0 1;
        background: $error; color: $text; text-style: bold;
    }
    Banner.-shown { display: block; }
    """

    def on_mount(self) -> None:
        # A screen opened while the daemon is away says so from the start; the app
        # updates every mounted banner after that.
        self.show(getattr(self.app, "problem", None))

    def show(self, problem: str | None) -> None:
        self.set_class(problem is not None, "-shown")
        self.update(problem or "")
