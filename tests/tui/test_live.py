"""``tq top`` against a real broker process (and real workers where tasks must run): what the
screens show after a known workload, and the actions, each confirmed in the TUI and checked at
the broker. Tests are async (the app runs on the test's loop): the broker and worker fixtures
block, so processes are started before the app, or through ``asyncio.to_thread``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from tq.client import AsyncClient
from tq.errors import BrokerUnavailable
from tq.protocol.messages import WatchUpdate
from tq.tui import TopApp
from tq.tui.screens.confirm import Confirm
from tq.tui.screens.detail import TaskDetail
from tq.tui.views.dead import DeadView
from tq.tui.views.tasks import TasksView
from tq.tui.widgets.status import StatusBar
from tq.tui.widgets.table import LiveTable

from tests.apps.handlers import read_runs
from tests.conftest import HANDLERS_APP, BrokerProcess, WorkerProcess
from tests.tui.conftest import SIZE, app_of, status_text, top, until

StartWorker = Callable[..., WorkerProcess]


def queue_row(pilot: Pilot[None], queue: str) -> list[str]:
    return pilot.app.query_one("#queues", LiveTable).row_text(queue)


async def confirm_yes(pilot: Pilot[None]) -> Confirm:
    """Answer yes in the confirmation dialog; return it once the broker's answer is shown."""
    await until(pilot, lambda: isinstance(pilot.app.screen, Confirm), what="confirmation")
    dialog = pilot.app.screen
    assert isinstance(dialog, Confirm)
    await pilot.press("y")
    await until(pilot, lambda: dialog.phase == "done", what="the broker's answer")
    return dialog


async def test_overview_shows_queues_and_depths_after_a_known_workload(
    broker: BrokerProcess,
) -> None:
    async with AsyncClient(broker.url) as c:
        for priority, n in (("high", 3), ("normal", 2), ("low", 1)):
            await c.submit_batch("echo", [{}] * n, priority=priority)
        await c.submit_batch("emails.send", [{}] * 4, queue="emails")
    async with top(broker.url) as pilot:
        await until(pilot, lambda: queue_row(pilot, "emails"), what="emails row")
        default, emails = queue_row(pilot, "default"), queue_row(pilot, "emails")
        assert default[:3] == ["default", "3/2/1", "0"]
        assert emails[:3] == ["emails", "0/4/0", "0"]
        assert default[-1] == emails[-1] == "active"
        totals = str(pilot.app.query_one("#totals").content)
        assert "pending 10" in totals
        await until(pilot, lambda: "● live" in status_text(pilot), what="the live status line")
        assert "v0.1.0" in status_text(pilot)
        await pilot.press("5")
        summary = pilot.app.query_one("#cluster-summary")
        await until(pilot, lambda: str(summary.content).startswith("Single node"))


async def test_navigating_to_a_task_shows_its_result_and_progress(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    start_worker(broker.url, "-c", "2", app=HANDLERS_APP)
    async with top(broker.url) as pilot, AsyncClient(broker.url) as c:
        tid = await c.submit("echo", {"hello": "tui"})
        slow = await c.submit("test.progress", {"steps": 6, "pause": 0.5})
        assert (await c.wait(tid, timeout_s=10)).state == "completed"
        app = app_of(pilot)
        await pilot.press("3")
        tasks = app.query_one(TasksView)
        await until(pilot, lambda: tasks.state == "pending")
        await pilot.press("s")  # pending -> running
        await until(pilot, lambda: tasks.state == "running")
        await until(pilot, lambda: slow in app.query_one("#tasks-table", LiveTable).row_keys())
        await until(
            pilot, lambda: "step" in app.query_one("#tasks-table", LiveTable).row_text(slow)[-1]
        )
        await pilot.press("s")  # running -> completed
        table = app.query_one("#tasks-table", LiveTable)
        await until(pilot, lambda: tid in table.row_keys(), what="the task in the completed list")
        table.move_cursor(row=table.row_keys().index(tid))
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TaskDetail), what="the task detail")
        detail = app.screen
        assert isinstance(detail, TaskDetail)
        await until(pilot, lambda: detail.info is not None, what="the task loaded")
        result = str(detail.query_one("#detail-result").content)
        assert '"hello": "tui"' in result
        payload = str(detail.query_one("#detail-payload").content)
        assert '"hello": "tui"' in payload
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, TaskDetail))
        progress = app.model.latest_progress(slow)
        assert progress is not None
        assert re.fullmatch(r"\d+% step \d", progress.detail), progress.detail


async def test_retrying_a_dead_letter_from_the_tui_brings_it_back(
    broker: BrokerProcess, start_worker: StartWorker, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.jsonl"
    start_worker(broker.url, "-c", "2", app=HANDLERS_APP)
    async with top(broker.url) as pilot, AsyncClient(broker.url) as c:
        tid = await c.submit("test.record", {"file": str(runs), "fail_times": 1}, max_retries=0)
        assert (await c.wait(tid, timeout_s=10)).state == "dead"
        app = app_of(pilot)
        await pilot.press("4")
        dead = app.query_one(DeadView)
        await until(pilot, lambda: dead.chosen() == [tid], what="the dead letter listed")
        await pilot.press("r")
        dialog = await confirm_yes(pilot)
        assert dialog.ok, dialog.answer
        assert dialog.answer == "1 task(s) back to pending"
        await pilot.press("escape")
        info = await c.wait(tid, timeout_s=10)
        assert info.state == "completed"
        assert len(read_runs(runs)) == 2
        await until(pilot, lambda: dead.chosen() == [], what="the dead letter gone from the list")


async def test_pause_from_the_tui_stops_claims_and_resume_restarts_them(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    async with AsyncClient(broker.url) as c:
        first = await c.submit("echo", {"n": 1})
    async with top(broker.url) as pilot, AsyncClient(broker.url) as c:
        app = app_of(pilot)
        await until(pilot, lambda: queue_row(pilot, "default"), what="default row")
        await pilot.press("p")
        dialog = await confirm_yes(pilot)
        assert dialog.ok, dialog.answer
        await pilot.press("escape")
        await until(pilot, lambda: queue_row(pilot, "default")[-1] == "paused")
        await asyncio.to_thread(start_worker, broker.url, "-c", "2")
        second = await c.submit("echo", {"n": 2})
        await until(pilot, lambda: app.model.stats and app.model.stats.workers, what="worker")
        await pilot.pause(1.0)  # a worker is waiting for this queue all along
        assert (await c.status(first)).state == "pending"
        assert (await c.status(second)).state == "pending"
        await pilot.press("p")
        dialog = await confirm_yes(pilot)
        assert dialog.answer == "queue default resumed"
        await pilot.press("escape")
        assert (await c.wait(first, timeout_s=10)).state == "completed"
        assert (await c.wait(second, timeout_s=10)).state == "completed"


async def test_cancel_asks_and_shows_the_answer_or_the_refusal(
    broker: BrokerProcess,
) -> None:
    async with top(broker.url) as pilot, AsyncClient(broker.url) as c:
        tid = await c.submit("echo", {"n": 1})
        app = app_of(pilot)
        await pilot.press("3")
        table = app.query_one("#tasks-table", LiveTable)
        await until(pilot, lambda: table.row_keys() == [tid], what="the pending task listed")
        await pilot.press("c")
        dialog = await confirm_yes(pilot)
        assert dialog.ok
        assert dialog.answer == f"task {tid} is cancelled"
        await pilot.press("escape")
        assert (await c.status(tid)).state == "cancelled"
        # Cancelling it again: the broker refuses, and the dialog says why.
        app.ask_cancel(tid)
        dialog = await confirm_yes(pilot)
        assert not dialog.ok
        assert dialog.answer.startswith("refused: INVALID_STATE")
        await pilot.press("escape")


async def test_killing_the_broker_shows_disconnected_and_a_restart_reconnects(
    broker: BrokerProcess,
) -> None:
    async with top(broker.url) as pilot:
        await until(pilot, lambda: "● live" in status_text(pilot), what="the live status line")
        await asyncio.to_thread(broker.kill)
        await until(pilot, lambda: "disconnected" in status_text(pilot), what="disconnected")
        assert "reconnecting" in status_text(pilot)
        assert pilot.app.query_one(StatusBar).has_class("-down")
        await asyncio.to_thread(broker.restart)
        await until(pilot, lambda: "● live" in status_text(pilot), within_s=20, what="reconnected")
        async with AsyncClient(broker.url) as c:
            await c.submit("echo", {}, queue="after-restart")
        await until(pilot, lambda: queue_row(pilot, "after-restart"), what="fresh data")


class HeldWatchClient(AsyncClient):
    """An ``AsyncClient`` whose ``watch()`` fails while ``held`` is set: the dashboard stays
    disconnected for as long as the test needs, whatever the broker does meanwhile."""

    def __init__(self, url: str) -> None:
        super().__init__(url, connect_timeout_s=1.0, timeout_s=5.0)
        self.held = False

    async def watch(self, **kw: Any) -> AsyncIterator[WatchUpdate]:
        if self.held:
            raise BrokerUnavailable("held off by the test")
        async for update in super().watch(**kw):
            yield update


async def test_the_lists_are_fetched_again_after_a_reconnect(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    start_worker(broker.url, "-c", "1", "-q", "doomed")
    async with AsyncClient(broker.url) as c:
        before = await c.submit("echo", {})
        doomed = await c.submit("fail", {}, queue="doomed", max_retries=0)
        assert (await c.wait(doomed, timeout_s=10)).state == "dead"
    client = HeldWatchClient(broker.url)
    app = TopApp(client, url=broker.url, interval_s=0.2, redraw_s=0.1, poll_s=0.3)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "● live" in status_text(pilot), what="live")
        await pilot.press("4")
        dead = app.query_one(DeadView)
        await until(pilot, lambda: dead.row_ids() == [doomed], what="the dead letter listed")
        await pilot.press("3")
        table = app.query_one("#tasks-table", LiveTable)
        await until(pilot, lambda: table.row_keys() == [before], what="the pending task listed")
        client.held = True
        await asyncio.to_thread(broker.kill)
        await until(pilot, lambda: "disconnected" in status_text(pilot), what="disconnected")
        # While the dashboard is away, the broker restarts and its tasks change: no event of
        # that reaches the dashboard.
        await asyncio.to_thread(broker.restart)
        async with AsyncClient(broker.url) as c:
            after = await c.submit("echo", {})
            assert await c.purge_dead([doomed]) == [doomed]
        client.held = False
        await until(pilot, lambda: "● live" in status_text(pilot), within_s=20, what="live again")
        await until(pilot, lambda: table.row_keys() == [before, after], what="the new task")
        await pilot.press("4")
        await until(pilot, lambda: dead.row_ids() == [], what="the purged dead letter gone")


async def test_a_huge_payload_opens_cut_to_a_bound(broker: BrokerProcess) -> None:
    blob = "x" * (9 * 1024 * 1024)
    async with top(broker.url) as pilot, AsyncClient(broker.url) as c:
        tid = await c.submit("echo", {"blob": blob})
        app = app_of(pilot)
        await pilot.press("3")
        table = app.query_one("#tasks-table", LiveTable)
        await until(pilot, lambda: table.row_keys() == [tid], what="the task listed")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TaskDetail), what="the task detail")
        detail = app.screen
        assert isinstance(detail, TaskDetail)
        await until(pilot, lambda: detail.info is not None, what="the task loaded")
        payload = str(detail.query_one("#detail-payload").content)
        assert len(payload) < 20_000
        assert "… cut at" in payload


async def test_marking_all_dead_letters_and_purging_them_asks_then_deletes(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    start_worker(broker.url, "-c", "2", app=HANDLERS_APP)
    async with top(broker.url) as pilot, AsyncClient(broker.url) as c:
        ids = [await c.submit("test.boom", {"n": n}, max_retries=0) for n in range(2)]
        for tid in ids:
            assert (await c.wait(tid, timeout_s=10)).state == "dead"
        app = app_of(pilot)
        await pilot.press("4")
        dead = app.query_one(DeadView)
        await until(pilot, lambda: len(dead.chosen()) == 1 and len(dead.row_ids()) == 2)
        await pilot.press("a")
        assert sorted(dead.chosen()) == sorted(ids)
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, Confirm), what="confirmation")
        await pilot.press("n")  # no: nothing happens
        assert len(await c.dead_letters()) == 2
        await pilot.press("x")
        dialog = await confirm_yes(pilot)
        assert dialog.answer == "2 task(s) purged"
        await pilot.press("escape")
        assert await c.dead_letters() == []
        await until(pilot, lambda: dead.row_ids() == [], what="the list emptied")
