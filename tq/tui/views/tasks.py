"""Tasks: a live list of tasks in one state, filtered by queue, name and a text search, refreshed
as task events arrive (at most once a second). Enter opens a task, ``c`` cancels one."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import DataTable, Input, Select, Static

from tq.client import TaskInfo
from tq.errors import TqError
from tq.model import TaskState
from tq.tui import humanize
from tq.tui.data import LiveModel
from tq.tui.link import BrokerLink
from tq.tui.safe import line, one_line
from tq.tui.theme import tone, toned
from tq.tui.views.base import LiveView
from tq.tui.widgets.table import LiveTable, Row
from tq.tui.widgets.teardown import widgets_gone

PAGE = 500
STATE_TONES = {
    "pending": "primary",
    "running": "accent",
    "completed": "success",
    "failed": "warning",
    "dead": "error",
    "cancelled": "muted",
}


def short_id(task_id: str) -> str:
    return task_id if len(task_id) <= 14 else "…" + task_id[-13:]


class TasksView(LiveView):
    BINDINGS = [
        Binding("slash", "search", "Search"),
        Binding("s", "next_state", "State"),
        Binding("c", "cancel", "Cancel task"),
        Binding("escape", "back_to_list", "List", show=False),
    ]

    class TaskChosen(Message):
        def __init__(self, task_id: str) -> None:
            super().__init__()
            self.task_id = task_id

    class CancelRequested(Message):
        def __init__(self, task_id: str) -> None:
            super().__init__()
            self.task_id = task_id

    def compose(self) -> ComposeResult:
        with Horizontal(id="task-filters"):
            yield Select(
                [(s.value, s.value) for s in TaskState],
                value="pending",
                allow_blank=False,
                id="f-state",
            )
            yield Input(placeholder="queue", id="f-queue")
            yield Input(placeholder="name", id="f-name")
            yield Input(placeholder="/ search", id="f-search")
        yield Static(id="tasks-summary")
        yield LiveTable("ID", "Name", "Queue", "Att", "Age", "Progress / error", id="tasks-table")

    def __init__(self, model: LiveModel, link: BrokerLink, *, id: str | None = None) -> None:
        super().__init__(model, link, id=id)
        self._seen: tuple[int, int] | None = None  # the model's list_version at the last fetch
        self._tasks: list[TaskInfo] = []
        self._more = False  # the broker has more tasks than the list shows
        self._error = ""
        self._dirty = True

    def focus_main(self) -> None:
        self.query_one("#tasks-table", LiveTable).focus()

    # --- filters ---------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        value = self.query_one("#f-state", Select).value
        return value if isinstance(value, str) else "pending"

    def set_filters(self, *, state: str | None = None, queue: str | None = None) -> None:
        if state is not None:
            self.query_one("#f-state", Select).value = state
        if queue is not None:
            self.query_one("#f-queue", Input).value = queue
        self._dirty = True
        self.poll()

    @on(Select.Changed, "#f-state")
    @on(Input.Submitted)
    def _filters_changed(self) -> None:
        self._dirty = True
        self.poll()

    @on(Input.Changed, "#f-search")
    def _search_changed(self) -> None:
        self.refresh_view()

    def action_search(self) -> None:
        self.query_one("#f-search", Input).focus()

    def action_back_to_list(self) -> None:
        self.focus_main()

    def action_next_state(self) -> None:
        states = [s.value for s in TaskState]
        self.set_filters(state=states[(states.index(self.state) + 1) % len(states)])

    # --- data ------------------------------------------------------------------------------------

    def poll(self) -> None:
        if self._dirty or self.model.list_version() != self._seen:
            self._dirty = False
            self._seen = self.model.list_version()
            self._fetch()

    @work(exclusive=True, group="tasks-list")
    async def _fetch(self) -> None:
        queue = self.query_one("#f-queue", Input).value.strip() or None
        name = self.query_one("#f-name", Input).value.strip() or None
        try:
            # The broker ends a page early when its results are big (a page must fit in a
            # frame): follow the cursor up to PAGE tasks, and say so if more are left.
            tasks, after = await self.link.list_page(self.state, queue=queue, name=name, limit=PAGE)
            while after is not None and len(tasks) < PAGE:
                more, after = await self.link.list_page(
                    self.state, queue=queue, name=name, limit=PAGE - len(tasks), after=after
                )
                tasks += more
        except TqError as exc:
            self._error = f"{exc.code}: {exc.message}"
            self._dirty = True  # try again at the next poll
        else:
            self._tasks = tasks
            self._more = after is not None
            self._error = ""
        with widgets_gone:
            if self.shown:  # a hidden view is drawn when it is shown
                self.refresh_view()

    def shown_tasks(self) -> list[TaskInfo]:
        needle = self.query_one("#f-search", Input).value.strip().lower()
        if not needle:
            return self._tasks
        out = []
        for t in self._tasks:
            progress = self.model.latest_progress(t.id)
            hay = [t.id, t.name, t.queue, t.worker_id, progress.detail if progress else ""]
            if t.error is not None:
                hay += [t.error.type, t.error.message]
            if any(needle in h.lower() for h in hay):
                out.append(t)
        return out

    def refresh_view(self) -> None:
        if not self.is_mounted:
            return
        shown = self.shown_tasks()
        rows: list[Row] = [(t.id, self._cells(t)) for t in shown]
        self.query_one("#tasks-table", LiveTable).replace_rows(rows)
        summary = Text(f"{len(shown)} {self.state} tasks shown")
        if self._more:
            summary.append(f" (the first {len(self._tasks)})", style="dim")
        if self._error:
            summary.append(f"  list failed: {one_line(self._error)}", style=tone(self.app, "error"))
        self.query_one("#tasks-summary", Static).update(summary)

    def _cells(self, t: TaskInfo) -> list[str | Text]:
        now = self.model.at_ms
        if t.state == "running":
            age = humanize.since(t.started_at_ms, now)
        elif t.finished_at_ms:
            age = humanize.since(t.finished_at_ms, now)
        else:
            age = humanize.since(t.submitted_at_ms, now)
        info: str | Text = ""
        progress = self.model.latest_progress(t.id)
        if t.error is not None:
            info = toned(self.app, f"{t.error.type}: {t.error.message}", STATE_TONES[t.state])
        elif progress is not None and t.state == "running":
            info = toned(self.app, progress.detail, "accent")
        elif t.state == "completed":
            info = line(humanize.pretty(t.result, 60)[0], style="dim")
        return [
            short_id(t.id),
            t.name,
            t.queue,
            f"{t.attempt}/{t.max_retries + 1}",
            age,
            info,
        ]

    # --- actions ---------------------------------------------------------------------------------

    @on(DataTable.RowSelected, "#tasks-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        key = self.query_one("#tasks-table", LiveTable).cursor_key()
        if key is not None:
            self.post_message(self.TaskChosen(key))

    def action_cancel(self) -> None:
        key = self.query_one("#tasks-table", LiveTable).cursor_key()
        if key is None:
            self.notify("no task selected", severity="warning")
            return
        self.post_message(self.CancelRequested(key))
