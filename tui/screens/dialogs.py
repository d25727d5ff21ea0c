"""Small modal screens: confirm a cancel, type an owner to filter by."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

__all__ = ["ConfirmCancel", "OwnerPrompt"]

_DIALOG_CSS = """
%s { align: center middle; }
%s > Vertical {
    width: 64; height: auto; padding: 1 2;
    border: thick $warning; background: $surface;
}
%s Label { width: 100%%; }
%s Horizontal { height: auto; margin-top: 1; align: right middle; }
%s Button { margin-left: 2; }
"""


class ConfirmCancel(ModalScreen[bool]):
    """ "Cancel job 12 (train)?" - y or its button cancels; n, escape or enter (the
    focused "keep it" button) keeps it."""

    DEFAULT_CSS = _DIALOG_CSS % (("ConfirmCancel",) * 5)
    BINDINGS = [
        Binding("y", "answer(True)", "Yes, cancel it"),
        Binding("n,escape", "answer(False)", "No, keep it"),
    ]

    def __init__(self, job_id: int, name: str = "") -> None:
        super().__init__()
        self.job_id = job_id
        self.job_name = name

    def compose(self) -> ComposeResult:
        what = f"job {self.job_id}" + (f" ({self.job_name})" if self.job_name else "")
        with Vertical():
            yield Label(f"Cancel {what}?")
            yield Label(
                "A running job is stopped: SIGTERM, then SIGKILL after the grace "
                "period. This cannot be undone.",
                classes="dim",
            )
            with Horizontal():
                yield Button("Keep it (n)", id="no")
                yield Button("Cancel job (y)", id="yes", variant="error")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class OwnerPrompt(ModalScreen[str | None]):
    """Type an owner name; empty shows every owner's jobs; escape changes nothing."""

    DEFAULT_CSS = _DIALOG_CSS % (("OwnerPrompt",) * 5)
    BINDINGS = [Binding("escape", "dismiss_none", "Never mind")]

    def __init__(self, current: str = "") -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Show the jobs of owner (empty: everyone):")
            yield Input(value=self.current, placeholder="user name", id="owner")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
