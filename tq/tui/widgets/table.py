"""``LiveTable``: a DataTable whose rows are replaced wholesale on every refresh while the cursor
stays on the same row (by key), so a live list can be navigated while it changes."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import DataTable

Cell = str | Text
Row = tuple[str, Sequence[Cell]]


class LiveTable(DataTable[Cell]):
    DEFAULT_CSS = """
    LiveTable { height: 1fr; }
    """

    def __init__(self, *columns: str, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self._columns = columns
        self._rows: list[Row] = []

    def on_mount(self) -> None:
        self.add_columns(*self._columns)

    def replace_rows(self, rows: Sequence[Row]) -> None:
        rows = list(rows)
        if rows == self._rows:
            return
        self._rows = rows
        current = self.cursor_key()
        row_index = self.cursor_row
        self.clear()
        for key, cells in rows:
            self.add_row(*cells, key=key)
        if not rows:
            return
        keys = [key for key, _ in rows]
        target = keys.index(current) if current in keys else min(row_index, len(rows) - 1)
        self.move_cursor(row=max(0, target), animate=False)

    def cursor_key(self) -> str | None:
        """The key of the row under the cursor, or None when the table is empty."""
        if not self._rows or not 0 <= self.cursor_row < len(self._rows):
            return None
        return self._rows[self.cursor_row][0]

    def row_keys(self) -> list[str]:
        return [key for key, _ in self._rows]

    def row_text(self, key: str) -> list[str]:
        """The cells of one row as plain text (empty if there is no such row)."""
        for k, cells in self._rows:
            if k == key:
                return [c.plain if isinstance(c, Text) else c for c in cells]
        return []
