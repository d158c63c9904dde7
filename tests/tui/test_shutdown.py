"""Quitting ``tq top`` while it waits on the broker: the answers that arrive as the app takes its
widgets down must not crash it (a fetch that outlived its table used to end in ``NoMatches``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from textual.css.query import NoMatches
from tq.client.aio import TaskInfo
from tq.errors import BrokerUnavailable
from tq.tui import TopApp
from tq.tui.views.tasks import TasksView

from tests.tui.conftest import app_of, until
from tests.tui.fixed import FixedLink


class HeldLink(FixedLink):
    """Lists and loads wait until ``release`` is set; ``close()`` fails what still waits, as the
    real client does when its connection closes."""

    def __init__(self, hold: set[str]) -> None:
        super().__init__()
        self.hold = hold
        self.release = asyncio.Event()
        self.waiting = 0
        self.closed = False

    async def _held(self, what: str) -> None:
        if what not in self.hold:
            return
        self.waiting += 1
        await self.release.wait()
        if self.closed:
            raise BrokerUnavailable("connection to broker lost")

    async def list_page(self, state: str = "pending", **kw: Any) -> tuple[list[TaskInfo], None]:
        await self._held("list_page")
        return await super().list_page(state, **kw)

    async def dead_letters(self, **kw: Any) -> list[TaskInfo]:
        await self._held("dead_letters")
        return await super().dead_letters(**kw)

    async def status(self, task_id: str) -> TaskInfo:
        await self._held("status")
        return await super().status(task_id)

    async def close(self) -> None:
        self.closed = True
        self.release.set()


async def release_when_gone(app: TopApp, link: HeldLink, selector: str) -> None:
    """Answer the held requests the moment ``selector`` has left the DOM (the app is tearing its
    widgets down), before the view owning it is gone too."""
    while True:
        try:
            app.query_one(selector)
        except NoMatches:
            link.release.set()
            return
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("keys", "hold", "selector"),
    [
        (["3"], "list_page", "#tasks-table"),
        (["4"], "dead_letters", "#dead-table"),
        (["3", "enter"], "status", "#detail-fields"),
    ],
    ids=["tasks", "dead-letters", "task-detail"],
)
async def test_an_answer_arriving_while_the_app_quits_is_dropped(
    keys: list[str], hold: str, selector: str
) -> None:
    link = HeldLink({hold})
    app = TopApp(link, url="tcp://127.0.0.1:7700")
    async with app.run_test(size=(100, 30)) as pilot:
        tasks = app.query_one(TasksView)
        for key in keys:
            if key == "enter":
                await until(pilot, lambda: tasks.shown_tasks(), what="tasks listed")
            await pilot.press(key)
        await until(pilot, lambda: link.waiting > 0, what="a request waiting on the broker")
        watcher = asyncio.ensure_future(release_when_gone(app_of(pilot), link, selector))
    await asyncio.wait_for(watcher, 5)


async def test_closing_the_link_while_a_fetch_waits_is_dropped() -> None:
    link = HeldLink({"list_page"})
    app = TopApp(link, url="tcp://127.0.0.1:7700")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: link.waiting > 0, what="a fetch waiting on the broker")
    assert link.closed
