"""The help screen: what each key does, and what the screen shows."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

__all__ = ["HELP", "HelpScreen"]

HELP = """\
# gpud tui

A live view of the box: its **GPUs** (type, memory, utilisation, temperature, power,
the last minutes of utilisation and memory as sparklines, and which job holds each;
*fake* GPUs and GPUs busy with processes gpud did not start are marked), the **queue**
(pending jobs in scheduling order with the scheduler's reason) and **running and
recent jobs**.

## Everywhere

| key | |
|---|---|
| `tab` / `shift+tab` | next / previous table |
| `↑` `↓` `pgup` `pgdn` | move in a table |
| `enter` (or click a row) | open the job: its fields, history, live log, result or traceback |
| `c` | cancel the selected job (asks first) |
| `g` | refresh now |
| `?` | this help |
| `q` | quit |

## Jobs table

| key | |
|---|---|
| `f` | state filter: all, active, running, succeeded, failed, cancelled |
| `o` | owner filter (type a name; empty for everyone) |
| `m` | only my jobs / everyone's |
| `s` / `S` | sort by the next column / reverse (or click a column header) |
| `]` / `[` | older / newer page |

The table shows one page of the ledger (newest first), plus every running job on the
first page; filters are applied by the daemon, sorting orders the page.

## Job screen

| key | |
|---|---|
| `escape` | back |
| `c` | cancel this job |
| `f` | follow the log (keep scrolling to its end) on/off |
| `r` | load the return value (unpickles it: only for jobs you trust) |

If the daemon stops answering, a red bar says so and the view keeps retrying; it
catches up by itself when the daemon is back.
"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90%; max-width: 100; height: 90%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    """
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close help")]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)
