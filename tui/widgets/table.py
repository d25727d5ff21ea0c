"""A DataTable that is updated in place, so a refresh every second never flickers.

:meth:`LiveTable.sync` takes the rows as they should be now and turns them into the
fewest changes: cells whose text changed are updated, rows that went away are removed,
new rows are added, and the order is fixed with one sort. The row under the cursor stays
under the cursor (by key, not by position) while rows come and go around it.

The table remembers what it shows (cells and order) rather than asking the DataTable,
whose row lists are rebuilt after every change: a refresh of an unchanged page costs a
comparison per cell and nothing else. The first column must show the row's key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, RowDoesNotExist

__all__ = ["Cell", "LiveTable"]

Cell = str | Text


def _same(a: Cell, b: Cell) -> bool:
    if isinstance(a, Text) and isinstance(b, Text):
        return a.plain == b.plain and a.style == b.style and a.spans == b.spans
    return type(a) is type(b) and a == b


class LiveTable(DataTable[Cell]):
    """Rows keyed by a string (a job id, a GPU index); columns declared once."""

    DEFAULT_CSS = """
    LiveTable { height: 1fr; }
    """

    # DataTable's own keyword arguments pass through as they are (Any: their honest type).
    def __init__(self, columns: Sequence[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._columns = list(columns)
        self._order: list[str] = []
        self._shown: dict[str, list[Cell]] = {}

    def on_mount(self) -> None:
        for key, label in self._columns:
            self.add_column(label, key=key)

    @property
    def keys(self) -> list[str]:
        """Row keys in display order."""
        return list(self._order)

    def selected_key(self) -> str | None:
        if not self._order or self.cursor_row < 0:
            return None
        try:
            row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except (CellDoesNotExist, RowDoesNotExist):
            return None
        return row_key.value

    def sync(self, rows: Sequence[tuple[str, Sequence[Cell]]]) -> None:
        """Make the table show ``rows`` (key, cells in column order), in that order."""
        selected = self.selected_key()
        wanted = {key: list(cells) for key, cells in rows}
        order = [key for key, _ in rows]
        for key in [k for k in self._order if k not in wanted]:
            self.remove_row(key)
            del self._shown[key]
        # Where the DataTable has the rows now: survivors in their order, new ones last.
        current = [k for k in self._order if k in wanted]
        column_keys = [k for k, _ in self._columns]
        for key, cells in wanted.items():
            shown = self._shown.get(key)
            if shown is None:
                self.add_row(*cells, key=key)
                current.append(key)
            else:
                for col, old, new in zip(column_keys, shown, cells, strict=True):
                    if not _same(old, new):
                        self.update_cell(key, col, new, update_width=True)
            self._shown[key] = cells
        if order != current:
            rank = {key: i for i, key in enumerate(order)}
            # DataTable sorts by cell values; the first column holds the key, which maps
            # back to the wanted position.
            self.sort(column_keys[0], key=lambda cell: rank.get(_plain(cell), len(rank)))
        self._order = order
        if selected is not None and selected in wanted:
            index = order.index(selected)
            if index != self.cursor_row:
                self.move_cursor(row=index, animate=False, scroll=False)


def _plain(cell: object) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)
