"""The Tasks view follows the broker's cursor: a page ends early when its results are big."""

from __future__ import annotations

from textual.widgets import Static
from tq.client import TaskInfo
from tq.tui import TopApp
from tq.tui.views.tasks import TasksView

from tests.tui.conftest import until
from tests.tui.fixed import FixedLink, _task


class SmallPagesLink(FixedLink):
    """Pages of at most 4 tasks, each with a cursor while more are left, as the broker cuts a
    page of big results to fit its frame limit."""

    def __init__(self, completed: int) -> None:
        super().__init__()
        self.tasks["completed"] = [_task(n, "completed") for n in range(completed)]

    async def list_page(
        self,
        state: str = "pending",
        *,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> tuple[list[TaskInfo], str | None]:
        tasks = self.tasks.get(state, [])
        start = 0 if after is None else int(after)
        page = tasks[start : start + min(limit, 4)]
        end = start + len(page)
        return page, (str(end) if end < len(tasks) else None)


async def _summary(completed: int) -> str:
    app = TopApp(SmallPagesLink(completed), url="tcp://127.0.0.1:7700")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("3")
        tasks = app.query_one(TasksView)
        tasks.set_filters(state="completed")
        await until(pilot, lambda: tasks.state == "completed" and len(tasks.shown_tasks()) > 4)
        await pilot.pause(0.1)
        return str(app.query_one("#tasks-summary", Static).render())


async def test_every_task_of_short_pages_is_listed() -> None:
    """It showed the first page alone, "4 completed tasks shown", with no hint of more."""
    assert (await _summary(30)).startswith("30 completed tasks shown")


async def test_more_than_a_screenful_says_so() -> None:
    summary = await _summary(600)
    assert summary.startswith("500 completed tasks shown (the first 500)")
