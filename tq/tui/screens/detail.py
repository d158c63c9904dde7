"""``TaskDetail``: one task: its fields, timings, latest progress, payload and result as pretty
JSON (cut at a bound, so a 10 MiB payload costs no more than a small one), the error with its
traceback. It re-reads the task while it is not finished, at most once a second."""

from __future__ import annotations

from collections.abc import Callable

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from tq.client import TaskInfo
from tq.errors import TqError
from tq.tui import humanize
from tq.tui.data import LiveModel
from tq.tui.link import BrokerLink
from tq.tui.safe import line, text
from tq.tui.theme import tone
from tq.tui.widgets.teardown import widgets_gone

FINAL = ("completed", "dead", "cancelled")


class TaskDetail(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,q", "close", "Close"),
        Binding("c", "cancel", "Cancel task"),
        Binding("r", "retry", "Retry (dead)"),
    ]

    def __init__(
        self,
        task_id: str,
        model: LiveModel,
        link: BrokerLink,
        on_cancel: Callable[[str], None],
        on_retry: Callable[[list[str]], None],
    ) -> None:
        super().__init__()
        self.task_id = task_id
        self.model = model
        self.link = link
        self.on_cancel = on_cancel
        self.on_retry = on_retry
        self.info: TaskInfo | None = None
        self.error = ""
        self._seen: tuple[int, int] | None = None  # the model's list_version at the last load

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail"):
            # Everything shown here comes from the broker: as cleaned Text, never markup.
            yield Static(line(f"task {self.task_id}"), id="detail-title", classes="dialog-title")
            yield Static(Text("loading…", style="dim"), id="detail-fields")
            yield Static(id="detail-error")
            yield Static("Result", classes="section")
            yield Static(id="detail-result")
            yield Static("Payload", classes="section")
            yield Static(id="detail-payload")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#detail", VerticalScroll).focus()
        self.reload()
        self.set_interval(1.0, self._tick)

    def _tick(self) -> None:
        if self.info is not None and self.info.state in FINAL:
            return
        if self.model.list_version() != self._seen:
            self.reload()

    def reload(self) -> None:
        self._seen = self.model.list_version()
        self._load()

    @work(exclusive=True, group="detail")
    async def _load(self) -> None:
        try:
            self.info = await self.link.status(self.task_id)
            self.error = ""
        except TqError as exc:
            self.error = f"{exc.code}: {exc.message}"
        with widgets_gone:
            self.render_info()

    def render_info(self) -> None:
        info = self.info
        fields = self.query_one("#detail-fields", Static)
        if info is None:
            fields.update(
                text(f"cannot load the task: {self.error}", style=tone(self.app, "error"))
            )
            return
        fields.update(self._fields(info))
        err = self.query_one("#detail-error", Static)
        if info.error is not None:
            shown = Text()
            shown.append_text(
                text(
                    f"{info.error.type}: {info.error.message}\n",
                    style=f"bold {tone(self.app, 'error')}",
                )
            )
            tb, cut = humanize.clip(info.error.traceback or "(no traceback)")
            shown.append_text(text(tb))
            if cut:
                shown.append("\n… traceback cut", style="dim")
            err.update(shown)
            err.display = True
        else:
            err.display = False
        self.query_one("#detail-result", Static).update(self._value(info.result, info.state))
        self.query_one("#detail-payload", Static).update(self._value(info.payload, "payload"))

    def _value(self, value: object, state: str) -> Text:
        if value is None:
            msg = "(none)" if state in (*FINAL, "payload") else f"(none yet: {state})"
            return Text(msg, style="dim")
        # JSON escapes C0 controls in strings, but not DEL or C1 (ensure_ascii=False): clean.
        pretty, cut = humanize.pretty(value)
        out = text(pretty)
        if cut:
            out.append(
                f"\n… cut at {humanize.PRETTY_LIMIT_CHARS:,} characters "
                "(use `tq status -o json` for all of it)",
                style="dim",
            )
        return out

    def _fields(self, t: TaskInfo) -> Table:
        now = self.model.at_ms
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        # A str cell of a Rich table is parsed as markup: every value goes in as cleaned Text.
        grid.add_row("name", line(t.name))
        grid.add_row("state", line(t.state, style=f"bold {tone(self.app, _tone(t.state))}"))
        grid.add_row("queue", line(f"{t.queue}  priority {t.priority}"))
        grid.add_row(
            "attempts", line(f"{t.attempt} of {t.max_retries + 1}  timeout {t.timeout_s:g}s")
        )
        grid.add_row("worker", line(t.worker_id or "—"))
        grid.add_row("submitted", humanize.when(t.submitted_at_ms))
        if t.eta_ms:
            grid.add_row("eta", humanize.when(t.eta_ms))
        grid.add_row("started", humanize.when(t.started_at_ms))
        grid.add_row("finished", humanize.when(t.finished_at_ms))
        if t.started_at_ms and t.submitted_at_ms:
            waited = humanize.age(t.started_at_ms - t.submitted_at_ms)
            if t.finished_at_ms:
                ran = humanize.age(t.finished_at_ms - t.started_at_ms)
            elif t.state == "running" and now:
                ran = humanize.age(now - t.started_at_ms) + " so far"
            else:
                ran = "—"
            grid.add_row("timings", f"waited {waited}, ran {ran}")
        progress = self.model.latest_progress(t.id)
        if progress is not None:
            grid.add_row(
                "progress",
                line(
                    f"{progress.detail}  ({humanize.since(progress.at_ms, now)} ago)",
                    style=tone(self.app, "accent"),
                ),
            )
        return grid

    def action_close(self) -> None:
        self.dismiss(None)

    def action_cancel(self) -> None:
        self.on_cancel(self.task_id)

    def action_retry(self) -> None:
        if self.info is not None and self.info.state != "dead":
            self.notify(
                f"only dead tasks can be retried (this one is {line(self.info.state).plain})",
                markup=False,
            )
            return
        self.on_retry([self.task_id])


def _tone(state: str) -> str:
    return {
        "completed": "success",
        "dead": "error",
        "failed": "warning",
        "running": "accent",
        "pending": "primary",
    }.get(state, "muted")
