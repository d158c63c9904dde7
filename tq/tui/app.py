"""``TopApp``: the ``tq top`` dashboard. Composes the status bar, the five views (one tab each)
and the footer; runs the feed; routes the views' requests (open a task, cancel, retry, purge,
pause) to modal screens that ask first and show the broker's answer.

Everything it knows comes from a :class:`~tq.tui.link.BrokerLink` (an ``AsyncClient``): the live
model from ``watch()``, lists and actions from requests. It never reads a store.
"""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.widgets import Footer, TabbedContent, TabPane

from tq.tui.data import LiveModel
from tq.tui.feed import Feed
from tq.tui.link import BrokerLink
from tq.tui.screens.confirm import Action, Confirm
from tq.tui.screens.detail import TaskDetail
from tq.tui.screens.help import Help
from tq.tui.views.base import LiveView
from tq.tui.views.cluster import ClusterView
from tq.tui.views.dead import DeadView
from tq.tui.views.overview import OverviewView
from tq.tui.views.tasks import TasksView
from tq.tui.views.workers import WorkersView
from tq.tui.widgets.status import StatusBar

VIEWS = ("overview", "workers", "tasks", "dead", "cluster")
LIGHT, DARK = "textual-light", "textual-dark"


class TopApp(App[None]):
    CSS_PATH = str(Path(__file__).with_name("tq.tcss"))
    TITLE = "tq top"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        *(
            Binding(str(i), f"show('{view}')", view.capitalize(), show=False)
            for i, view in enumerate(VIEWS, 1)
        ),
        Binding("question_mark", "help", "Keys"),
        Binding("L", "toggle_theme", "Light/dark", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        link: BrokerLink,
        *,
        url: str,
        interval_s: float = 0.5,
        redraw_s: float = 0.25,
        poll_s: float = 1.0,
        theme: str | None = None,
        feed: bool = True,
    ) -> None:
        super().__init__()
        self.link = link
        self.url = url
        self.model = LiveModel()
        self.interval_s = interval_s
        self.redraw_s = redraw_s
        self.poll_s = poll_s
        self.start_theme = theme
        self.start_feed = feed
        self.feed = Feed(link, self.model, self._changed, interval_s=interval_s)
        self._drawn = -1
        self._dirty = True

    def compose(self) -> ComposeResult:
        m, link = self.model, self.link
        yield StatusBar(self.url)
        with TabbedContent(initial="overview", id="views"):
            with TabPane("1 Overview", id="overview"):
                yield OverviewView(m, link, id="overview-view")
            with TabPane("2 Workers", id="workers"):
                yield WorkersView(m, link, id="workers-view")
            with TabPane("3 Tasks", id="tasks"):
                yield TasksView(m, link, id="tasks-view")
            with TabPane("4 Dead letters", id="dead"):
                yield DeadView(m, link, id="dead-view")
            with TabPane("5 Cluster", id="cluster"):
                yield ClusterView(m, link, id="cluster-view")
        yield Footer()

    def on_mount(self) -> None:
        if self.start_theme:
            self.theme = self.start_theme
        if self.start_feed:
            self.run_worker(self.feed.run(), name="feed", group="feed", exit_on_error=True)
        self.set_interval(self.redraw_s, self.redraw)
        self.set_interval(self.poll_s, self.poll)
        self.redraw(force=True)
        self.active_view().focus_main()

    async def on_unmount(self) -> None:
        # Workers still waiting on the broker stop here, not with a closed-connection error.
        self.workers.cancel_all()
        await self.link.close()

    # --- drawing ---------------------------------------------------------------------------------

    def _changed(self) -> None:
        self._dirty = True

    def active_view(self) -> LiveView:
        active = self.query_one("#views", TabbedContent).active or "overview"
        return self.query_one(f"#{active}-view", LiveView)

    def redraw(self, force: bool = False) -> None:
        """Redraw the status bar and the visible view if the model moved (or ``force``)."""
        if not (force or self._dirty):
            return
        self._dirty = False
        try:
            bar, view = self.query_one(StatusBar), self.active_view()
        except NoMatches:  # shutting down: the widgets are gone before the timers
            return
        bar.show(self.model)
        view.refresh_view()

    def poll(self) -> None:
        try:
            view = self.active_view()
        except NoMatches:
            return
        view.poll()

    @on(TabbedContent.TabActivated)
    def _tab_activated(self) -> None:
        view = self.active_view()
        view.refresh_view()
        view.poll()
        view.focus_main()

    def watch_theme(self) -> None:
        self._dirty = True  # tables carry colours from the theme: draw them again

    # --- actions ---------------------------------------------------------------------------------

    def action_show(self, view: str) -> None:
        self.query_one("#views", TabbedContent).active = view
        self.active_view().focus_main()

    def action_help(self) -> None:
        self.push_screen(Help())

    def action_toggle_theme(self) -> None:
        self.theme = DARK if self.current_theme.name == LIGHT else LIGHT

    def confirm(self, title: str, question: str, action: Action) -> None:
        def done(ok: bool | None) -> None:
            self.query_one(DeadView).reload()
            self.query_one(TasksView).set_filters()
            self._dirty = True

        self.push_screen(Confirm(title, question, action), done)

    def open_task(self, task_id: str) -> None:
        self.push_screen(
            TaskDetail(task_id, self.model, self.link, self.ask_cancel, self.ask_retry)
        )

    def ask_cancel(self, task_id: str) -> None:
        async def cancel() -> str:
            info = await self.link.cancel(task_id)
            return f"task {task_id} is {info.state}"

        self.confirm("Cancel task", f"Cancel task {task_id}?", cancel)

    def ask_retry(self, task_ids: list[str]) -> None:
        async def retry() -> str:
            done = await self.link.retry_dead(task_ids)
            if not done:
                return "the broker retried nothing (no longer dead?)"
            return f"{len(done)} task(s) back to pending"

        self.confirm("Retry dead letters", f"Retry {_count(task_ids)}?", retry)

    def ask_purge(self, task_ids: list[str]) -> None:
        async def purge() -> str:
            done = await self.link.purge_dead(task_ids)
            return f"{len(done)} task(s) purged"

        self.confirm(
            "Purge dead letters",
            f"Delete {_count(task_ids)} for good? This cannot be undone.",
            purge,
        )

    def ask_pause(self, queue: str, paused: bool) -> None:
        async def pause() -> str:
            if paused:
                await self.link.resume_queue(queue)
                return f"queue {queue} resumed"
            await self.link.pause_queue(queue)
            return f"queue {queue} paused: no task of it is handed out until resumed"

        verb = "Resume" if paused else "Pause"
        self.confirm(f"{verb} queue", f"{verb} queue {queue!r}?", pause)

    # --- requests from the views -----------------------------------------------------------------

    @on(OverviewView.PauseRequested)
    def _on_pause_requested(self, msg: OverviewView.PauseRequested) -> None:
        self.ask_pause(msg.queue, msg.paused)

    @on(OverviewView.QueueChosen)
    def _on_queue_chosen(self, msg: OverviewView.QueueChosen) -> None:
        self.action_show("tasks")
        self.query_one(TasksView).set_filters(state="pending", queue=msg.queue)

    @on(TasksView.TaskChosen)
    def _on_task_chosen(self, msg: TasksView.TaskChosen) -> None:
        self.open_task(msg.task_id)

    @on(DeadView.Chosen)
    def _on_dead_chosen(self, msg: DeadView.Chosen) -> None:
        self.open_task(msg.task_id)

    @on(TasksView.CancelRequested)
    def _on_cancel_requested(self, msg: TasksView.CancelRequested) -> None:
        self.ask_cancel(msg.task_id)

    @on(DeadView.RetryRequested)
    def _on_retry_requested(self, msg: DeadView.RetryRequested) -> None:
        self.ask_retry(msg.task_ids)

    @on(DeadView.PurgeRequested)
    def _on_purge_requested(self, msg: DeadView.PurgeRequested) -> None:
        self.ask_purge(msg.task_ids)


def _count(task_ids: list[str]) -> str:
    return f"task {task_ids[0]}" if len(task_ids) == 1 else f"{len(task_ids)} tasks"
