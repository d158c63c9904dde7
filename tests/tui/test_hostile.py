"""Broker strings that are terminal escape sequences or Rich markup: every one the dashboard shows
(queue, task and worker names, hosts, errors, tracebacks, progress, results, cluster addresses)
is shown escaped, never written raw to the terminal, and never parsed as markup.

What reaches the terminal is checked on the screen as exported (the same segments the driver
writes): it must hold no control character at all."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Static
from tq.client import AsyncClient
from tq.model import ErrorInfo
from tq.protocol.messages import QueueStats, Stats, TaskEvent, WatchUpdate, WorkerInfo
from tq.tui import TopApp
from tq.tui.screens.confirm import Confirm
from tq.tui.screens.detail import TaskDetail
from tq.tui.views.dead import DeadView
from tq.tui.views.tasks import TasksView
from tq.tui.widgets.table import LiveTable

from tests.conftest import BrokerProcess, WorkerProcess
from tests.tui.conftest import app_of, top, until
from tests.tui.fixed import T0, FixedLink, cluster_stats, single_node_stats

StartWorker = Callable[..., WorkerProcess]

OSC_TITLE = "\x1b]0;PWNED\x1b\\"  # sets the terminal's title
RED = "\x1b[31mred\x1b[0m"
CLEAR = "\x1b[2J"
CSI_C1 = "\x9b31m"  # the one-byte CSI: a terminal reads it like ESC [
MARKUP = "[/x]"  # a closing tag that matches nothing: MarkupError if parsed
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def screen(pilot: Pilot[None]) -> str:
    """The screen as exported: every character the driver would write, styles aside."""
    return pilot.app.export_screenshot()


def assert_clean(pilot: Pilot[None], where: str) -> str:
    shown = screen(pilot)
    found = CONTROL.search(shown)
    assert found is None, f"{where}: {found.group()!r} written raw to the terminal"
    return shown


class HostileLink(FixedLink):
    """The fixed broker, with a control sequence or markup in every string it sends."""

    def __init__(self, *, cluster: bool = False) -> None:
        super().__init__(cluster=cluster)
        error = ErrorInfo(f"Boom{MARKUP}", f"{OSC_TITLE}{RED}", f"Traceback {CLEAR}\n  {CSI_C1}")
        odd: dict[str, Any] = {
            "name": f"{MARKUP}emails{CSI_C1}",
            "queue": f"{MARKUP}q",
            "worker_id": f"w{RED}",
            "payload": {"to": f"{CSI_C1}\x7f{MARKUP}"},
        }
        self.tasks = {
            state: [replace(t, **odd, error=error if t.error else None) for t in tasks]
            for state, tasks in self.tasks.items()
        }
        self.tasks["completed"] = [
            replace(t, result={"sent": f"{CSI_C1}{RED}"}) for t in self.tasks["completed"]
        ]

    def stats(self, i: int, at_ms: int) -> Stats:
        base = cluster_stats(i, at_ms) if self.cluster else single_node_stats(i, at_ms)
        queues = {
            MARKUP: QueueStats({"normal": 1}, oldest_pending_ms=at_ms - 1000),
            f"{RED}q": QueueStats({"high": 2}, paused=True),
        }
        worker = WorkerInfo(
            f"w{MARKUP}", f"{MARKUP}{OSC_TITLE}", 7, 2, [MARKUP, RED], 1, 3, 1.0, 1, at_ms
        )
        cluster = dict(base.cluster)
        if self.cluster:
            cluster |= {
                "raft_address": f"{MARKUP}:7800",
                "leader": f"{RED}:7800",
                "leader_client": f"tcp://{MARKUP}",
                "role": f"leader{CSI_C1}",
                "term": f"7{CLEAR}",
                "peers": {
                    f"{OSC_TITLE}:1": {"connected": False, "match_index": 1},
                    "odd:2": {"connected": True, "match_index": "x", "last_contact_s": "y"},
                },
            }
        return Stats(
            base.states,
            queues,
            [worker],
            f"0.1{RED}",
            f"n{MARKUP}{CSI_C1}",
            base.uptime_s,
            cluster=cluster,
        )

    async def watch(
        self, *, events: bool = True, interval_s: float = 0.5, buffer: int = 256
    ) -> AsyncIterator[WatchUpdate]:
        for i in range(3):
            at_ms = T0 + i * 500
            evs = [
                TaskEvent(f"failed{RED}", f"t{CSI_C1}", MARKUP, f"{MARKUP}q", at_ms, 1, "w", RED),
                TaskEvent("progress", "t2", "n", "q", at_ms, 1, "w", f"50%\n{OSC_TITLE}forged"),
            ]
            yield WatchUpdate(1, self.stats(i, at_ms), evs, 0, 0, at_ms)
        await asyncio.Event().wait()


async def settled(pilot: Pilot[None]) -> TopApp:
    app = app_of(pilot)
    await until(pilot, lambda: app.model.generation >= 4, what="the hostile updates")
    return app


async def test_every_view_shows_hostile_broker_strings_escaped_and_never_as_markup() -> None:
    app = TopApp(HostileLink(), url="tcp://127.0.0.1:7700")
    async with app.run_test(size=(100, 30)) as pilot:
        await settled(pilot)
        app.redraw(force=True)
        await pilot.pause()
        shown = assert_clean(pilot, "overview")
        assert "[/x]" in shown  # the queue, named as it is
        assert "\\x1b[31mred" in shown  # the paused queue, escaped
        assert "\\x1b]0;PWNED" in shown  # the progress message, escaped
        await pilot.press("2")
        await pilot.pause()
        shown = assert_clean(pilot, "workers")
        assert app.query_one("#workers-table", LiveTable).row_text("w[/x]")[7].startswith("[/x]")
        await pilot.press("3")
        tasks = app.query_one(TasksView)
        await until(pilot, lambda: tasks.shown_tasks(), what="tasks listed")
        assert_clean(pilot, "tasks")
        tasks.set_filters(state="completed")
        await until(pilot, lambda: tasks.state == "completed" and tasks.shown_tasks())
        await pilot.pause(0.1)
        assert "\\x9b31m" in assert_clean(pilot, "tasks, completed")  # the result's C1
        await pilot.press("4")
        dead = app.query_one(DeadView)
        await until(pilot, lambda: dead.chosen(), what="dead letters listed")
        await pilot.pause(0.1)
        assert "\\x1b]0;PWNED" in assert_clean(pilot, "dead letters")
        await pilot.press("enter")
        await until(
            pilot,
            lambda: isinstance(app.screen, TaskDetail) and app.screen.info is not None,
            what="the task detail",
        )
        await pilot.pause(0.1)
        shown = assert_clean(pilot, "task detail")
        assert "\\x1b[2J" in shown  # the traceback
        await pilot.press("escape")
        await pilot.press("1")
        queues = app.query_one("#queues", LiveTable)
        queues.move_cursor(row=queues.row_keys().index(MARKUP))
        await pilot.press("p")  # pause the queue under the cursor: "[/x]"
        await until(pilot, lambda: isinstance(app.screen, Confirm), what="confirmation")
        await pilot.pause(0.1)
        assert_clean(pilot, "confirmation")
        question = app.screen.query_one("#question", Static)
        assert str(question.content) == "Pause queue '[/x]'?"
        await pilot.press("n")


async def test_the_cluster_view_and_status_line_show_hostile_strings_escaped() -> None:
    app = TopApp(HostileLink(cluster=True), url="tcp://127.0.0.1:7700")
    async with app.run_test(size=(100, 30)) as pilot:
        await settled(pilot)
        await pilot.press("5")
        app.redraw(force=True)
        await pilot.pause(0.1)
        shown = assert_clean(pilot, "cluster")
        assert "\\x1b]0;PWNED" in shown  # the peer that is down
        assert "[/x]" in shown


async def test_a_dead_letter_whose_error_is_an_escape_sequence_is_shown_escaped(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    start_worker(broker.url, "-c", "1")
    async with top(broker.url) as pilot, AsyncClient(broker.url) as c:
        tid = await c.submit("fail", {"message": f"{OSC_TITLE}{RED} {MARKUP}"}, max_retries=0)
        assert (await c.wait(tid, timeout_s=10)).state == "dead"
        app = app_of(pilot)
        await pilot.press("4")
        dead = app.query_one(DeadView)
        await until(pilot, lambda: dead.chosen() == [tid], what="the dead letter listed")
        await pilot.pause(0.1)
        error = app.query_one("#dead-table", LiveTable).row_text(tid)[-1]
        assert error == "RuntimeError: \\x1b]0;PWNED\\x1b\\\\x1b[31mred\\x1b[0m [/x]"
        assert "\\x1b]0;PWNED" in assert_clean(pilot, "dead letters")


async def test_a_worker_whose_host_is_markup_is_listed_not_parsed(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker's hello carries its host; the broker takes any printable text.
    monkeypatch.setattr(socket, "gethostname", lambda: MARKUP)
    odd = AsyncClient(
        broker.url,
        role="worker",
        client_id="odd-1",
        hello_extra={"concurrency": 1, "queues": ["odd"]},
    )
    await odd.connect()
    monkeypatch.undo()
    try:
        async with top(broker.url) as pilot:
            app = app_of(pilot)
            await pilot.press("2")
            table = app.query_one("#workers-table", LiveTable)
            await until(pilot, lambda: table.row_text("odd-1"), what="the worker listed")
            await pilot.pause(0.1)
            assert table.row_text("odd-1")[7] == MARKUP
            assert_clean(pilot, "workers")
    finally:
        await odd.close()
