"""``LiveTable``: a DataTable for a live list. Each refresh gives it every row (key and cells); it
changes only what changed, in place: the cells that differ, the rows that appeared or left. The
cursor stays on the same row (by key) and the scroll position stays put, so a live list can be
navigated while it changes.

Rebuilding the whole table on every refresh cost 1.3 s of CPU a snapshot with 3,000 queues, and
even computing every row's cells costs 64 us a row: a table that long passes ``cells_of``
(:meth:`LiveTable.show_rows`), and only the rows in view (and a page either side) are computed;
the others are brought up to date as they scroll into view.

Every cell is shown as Rich :class:`~rich.text.Text` on one line with control characters
escaped (:mod:`tq.tui.safe`): a ``str`` cell is never parsed as markup (DataTable would: a
worker host ``[/x]`` raised MarkupError), and no broker string reaches the terminal raw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from rich.text import Text
from textual.events import Resize
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey

from tq.tui.safe import is_one_line, line, one_line

Cell = str | Text
Row = tuple[str, Sequence[Cell]]
CellsOf = Callable[[str], Sequence[Cell]]

MIN_PAGE: Final = 20  # rows computed either side of the view, at least (a page before layout)


def _as_cell(cell: Cell) -> Text:
    if isinstance(cell, str):
        return Text(one_line(cell))
    if is_one_line(cell.plain):
        return cell
    # A view built Text from a broker string without cleaning it: clean it here, in its style
    # (its inner spans are lost: the offsets no longer match the escaped text).
    return line(cell.plain, style=cell.style if isinstance(cell.style, str) else "")


def _same(a: Text, b: Text) -> bool:
    # Text's own == ignores the base style: a cell recoloured by the theme switch would stay.
    return a.plain == b.plain and a.style == b.style and a.spans == b.spans


class LiveTable(DataTable[Text]):
    DEFAULT_CSS = """
    LiveTable { height: 1fr; }
    """

    def __init__(self, *columns: str, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self._columns = columns
        self._column_keys: list[ColumnKey] = []
        self._keys: list[str] = []  # the rows, in order
        self._shown: dict[str, tuple[Text, ...]] = {}  # each row's cells as the table has them
        self._cells_of: CellsOf | None = None  # set by show_rows: computes rows as they come in
        self._fresh: set[str] = set()  # rows computed since the last show_rows
        self._syncing = False  # rows being added or removed: the table and _keys disagree

    def on_mount(self) -> None:
        self._column_keys = self.add_columns(*self._columns)

    # --- filling ---------------------------------------------------------------------------------

    def replace_rows(self, rows: Sequence[Row]) -> None:
        """Show exactly ``rows`` (key, cells), in that order; every row is brought up to date."""
        by_key = dict(rows)
        self._sync([key for key, _ in rows], by_key.__getitem__, lazy=False)

    def show_rows(self, keys: Sequence[str], cells_of: CellsOf) -> None:
        """Show the rows ``keys``, in that order, asking ``cells_of(key)`` for the cells of new
        rows and of the rows in view (and a page either side) only. The others keep the cells
        they had and are asked for again as they scroll into view, so a refresh costs the same
        with 30 rows as with 3,000."""
        self._sync(list(keys), cells_of, lazy=True)

    def _sync(self, keys: list[str], cells_of: CellsOf, *, lazy: bool) -> None:
        if not self._column_keys:  # not mounted yet: nothing to show rows in
            return
        keys = list(dict.fromkeys(keys))  # a duplicate key would raise in DataTable: shown once
        self._cells_of = cells_of if lazy else None
        self._fresh = set()
        if keys != self._keys:
            # Removing rows and moving the cursor scroll the table, and a scroll computes rows
            # (_catch_up): not while the rows are half changed.
            self._syncing = True
            try:
                self._restructure(keys, cells_of)
            finally:
                self._syncing = False
        todo = self._window() if lazy else range(len(keys))
        for i in todo:
            key = keys[i]
            if key not in self._fresh:
                self._put(key, cells_of(key))

    def _restructure(self, keys: list[str], cells_of: CellsOf) -> None:
        """Remove the rows that left, add the new ones, put them in ``keys`` order; keep the
        cursor on its row (or, if that left, at the same height)."""
        current = self.cursor_key()
        row_index = self.cursor_row
        wanted = set(keys)
        left = [k for k in self._keys if k not in wanted]
        if len(left) * 2 > len(self._keys):  # most rows left: starting afresh is cheaper
            # (remove_row renumbers every row: removing k of n rows one by one costs k * n)
            self.clear()
            self._shown.clear()
            self._keys = []
        else:
            for key in left:
                self.remove_row(key)
                del self._shown[key]
            self._keys = [k for k in self._keys if k in wanted]
        for key in keys:
            if key not in self._shown:
                cells = tuple(_as_cell(c) for c in cells_of(key))
                # The first cell is a copy: sorting below finds each row by that object.
                cells = (cells[0].copy(), *cells[1:]) if cells else cells
                self.add_row(*cells, key=key)
                self._shown[key] = cells
                self._keys.append(key)
                self._fresh.add(key)
        if self._keys != keys:
            self._reorder(keys)
        if not keys:
            return
        target = keys.index(current) if current in wanted else min(row_index, len(keys) - 1)
        if target != self.cursor_row:
            self.move_cursor(row=max(0, target), animate=False)

    def _reorder(self, keys: list[str]) -> None:
        # DataTable can only append rows and sort them by their cells; the first cell of each
        # row is an object of its own (see _restructure and _put), so it names its row.
        rank = {id(self._shown[key][0]): i for i, key in enumerate(keys)}
        self.sort(self._column_keys[0], key=lambda first: rank[id(first)])
        self._keys = list(keys)

    def _put(self, key: str, raw: Sequence[Cell]) -> None:
        """Update the cells of row ``key`` that changed."""
        self._fresh.add(key)
        old = self._shown[key]
        new = tuple(_as_cell(c) for c in raw)
        if len(new) == len(old) and all(_same(a, b) for a, b in zip(old, new, strict=True)):
            return
        merged: list[Text] = []
        for i, column in enumerate(self._column_keys):
            before = old[i] if i < len(old) else None
            cell = new[i] if i < len(new) else Text()
            if before is not None and _same(before, cell):
                merged.append(before)
                continue
            if i == 0:
                cell = cell.copy()  # an object of its own: _reorder finds the row by it
            # Only a cell wider than its column asks for the width again: a narrower one would
            # make DataTable measure every cell of the column (3,000 of them).
            wider = cell.cell_len > self.columns[column].content_width
            self.update_cell(key, column, cell, update_width=wider)
            merged.append(cell)
        self._shown[key] = tuple(merged)

    # --- rows out of view ------------------------------------------------------------------------

    def _window(self) -> range:
        """The rows worth computing now: those in view and a page either side."""
        page = max(self.size.height, MIN_PAGE)
        top = int(self.scroll_y)
        return range(max(0, top - page), min(len(self._keys), top + 2 * page))

    def _catch_up(self) -> None:
        """Compute the rows that came into view since the last refresh."""
        cells_of = self._cells_of
        if cells_of is None or self._syncing:
            return
        for i in self._window():
            key = self._keys[i]
            if key not in self._fresh:
                self._put(key, cells_of(key))

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        self._catch_up()

    def on_resize(self, event: Resize) -> None:
        self._catch_up()

    # --- reading ---------------------------------------------------------------------------------

    def cursor_key(self) -> str | None:
        """The key of the row under the cursor, or None when the table is empty."""
        if not self._keys or not 0 <= self.cursor_row < len(self._keys):
            return None
        return self._keys[self.cursor_row]

    def row_keys(self) -> list[str]:
        return list(self._keys)

    def row_text(self, key: str) -> list[str]:
        """The cells of one row as plain text, as shown (empty if there is no such row)."""
        cells = self._shown.get(key)
        return [c.plain for c in cells] if cells is not None else []
