"""Dead letters: tasks whose retries ran out. Browse and inspect them, mark some (space, or ``a``
for all), retry the marked ones (or the one under the cursor) or purge them for good; both ask
first and show what the broker answered."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Static

from tq.client import TaskInfo
from tq.errors import TqError
from tq.tui import humanize
from tq.tui.data import LiveModel
from tq.tui.link import BrokerLink
from tq.tui.safe import one_line
from tq.tui.theme import tone, toned
from tq.tui.views.base import LiveView
from tq.tui.views.tasks import short_id
from tq.tui.widgets.table import LiveTable, Row
from tq.tui.widgets.teardown import widgets_gone

LIMIT = 1000


class DeadView(LiveView):
    BINDINGS = [
        Binding("space", "mark", "Mark"),
        Binding("a", "mark_all", "Mark all"),
        Binding("r", "retry", "Retry"),
        Binding("x", "purge", "Purge"),
    ]

    class Chosen(Message):
        def __init__(self, task_id: str) -> None:
            super().__init__()
            self.task_id = task_id

    class RetryRequested(Message):
        def __init__(self, task_ids: list[str]) -> None:
            super().__init__()
            self.task_ids = task_ids

    class PurgeRequested(Message):
        def __init__(self, task_ids: list[str]) -> None:
            super().__init__()
            self.task_ids = task_ids

    def __init__(self, model: LiveModel, link: BrokerLink, *, id: str | None = None) -> None:
        super().__init__(model, link, id=id)
        self.marked: set[str] = set()
        self._tasks: list[TaskInfo] = []
        self._seen: tuple[int, int] | None = None  # the model's list_version at the last fetch
        self._dirty = True
        self._error = ""

    def compose(self) -> ComposeResult:
        yield Static(id="dead-summary")
        yield LiveTable("✓", "ID", "Name", "Queue", "Att", "Died", "Error", id="dead-table")

    def focus_main(self) -> None:
        self.query_one("#dead-table", LiveTable).focus()

    def reload(self) -> None:
        self._dirty = True
        self.poll()

    def poll(self) -> None:
        if self._dirty or self.model.list_version() != self._seen:
            self._dirty = False
            self._seen = self.model.list_version()
            self._fetch()

    @work(exclusive=True, group="dead-list")
    async def _fetch(self) -> None:
        try:
            self._tasks = await self.link.dead_letters(limit=LIMIT)
            self._error = ""
        except TqError as exc:
            self._error = f"{exc.code}: {exc.message}"
            self._dirty = True
        ids = {t.id for t in self._tasks}
        self.marked &= ids
        with widgets_gone:
            if self.shown:  # a hidden view is drawn when it is shown
                self.refresh_view()

    def refresh_view(self) -> None:
        if not self.is_mounted:
            return
        now = self.model.at_ms
        rows: list[Row] = []
        for t in self._tasks:
            err = f"{t.error.type}: {t.error.message}" if t.error else ""
            mark = toned(self.app, "✓", "accent", bold=True) if t.id in self.marked else ""
            rows.append(
                (
                    t.id,
                    (
                        mark,
                        short_id(t.id),
                        t.name,
                        t.queue,
                        str(t.attempt),
                        humanize.since(t.finished_at_ms, now),
                        toned(self.app, err, "error"),
                    ),
                )
            )
        self.query_one("#dead-table", LiveTable).replace_rows(rows)
        summary = Text(f"{len(self._tasks)} dead letters")
        if len(self._tasks) >= LIMIT:
            summary.append(f" (the first {LIMIT})", style="dim")
        if self.marked:
            summary.append(f"  {len(self.marked)} marked", style=f"bold {tone(self.app, 'accent')}")
        summary.append("  space mark · a all · r retry · x purge · enter inspect", style="dim")
        if self._error:
            summary.append(f"  list failed: {one_line(self._error)}", style=tone(self.app, "error"))
        self.query_one("#dead-summary", Static).update(summary)

    def row_ids(self) -> list[str]:
        """Every dead letter listed, in order."""
        return [t.id for t in self._tasks]

    def chosen(self) -> list[str]:
        """The marked tasks, or else the one under the cursor."""
        if self.marked:
            return [t.id for t in self._tasks if t.id in self.marked]
        key = self.query_one("#dead-table", LiveTable).cursor_key()
        return [key] if key is not None else []

    def action_mark(self) -> None:
        key = self.query_one("#dead-table", LiveTable).cursor_key()
        if key is None:
            return
        self.marked ^= {key}
        self.refresh_view()
        table = self.query_one("#dead-table", LiveTable)
        table.move_cursor(row=min(table.cursor_row + 1, table.row_count - 1), animate=False)

    def action_mark_all(self) -> None:
        ids = {t.id for t in self._tasks}
        self.marked = set() if self.marked >= ids else ids
        self.refresh_view()

    def action_retry(self) -> None:
        ids = self.chosen()
        if ids:
            self.post_message(self.RetryRequested(ids))

    def action_purge(self) -> None:
        ids = self.chosen()
        if ids:
            self.post_message(self.PurgeRequested(ids))

    @on(DataTable.RowSelected, "#dead-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        key = self.query_one("#dead-table", LiveTable).cursor_key()
        if key is not None:
            self.post_message(self.Chosen(key))
