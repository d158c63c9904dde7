"""The live tables on a broker with thousands of queues: a snapshot updates the rows in place
(no table rebuilt) and computes only the rows in view; a row out of view is brought up to date
as it scrolls in; rows that appear or leave are added or removed where they belong, the cursor
staying on its row. From a link with fixed snapshots sent when the test says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from textual.widgets import Select
from tq.model import TaskState
from tq.protocol.messages import QueueStats, Stats, WatchUpdate
from tq.tui import TopApp
from tq.tui.views.overview import OverviewView
from tq.tui.views.tasks import TasksView
from tq.tui.widgets.table import Cell, LiveTable

from tests.tui.conftest import until
from tests.tui.fixed import T0, FixedLink


class QueuesLink(FixedLink):
    """Sends a snapshot of the queues named in ``send(at_ms, names)``, each with one task
    pending since ``T0``."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: asyncio.Queue[tuple[int, Sequence[str]]] = asyncio.Queue()

    def send(self, at_ms: int, names: Sequence[str]) -> None:
        self.updates.put_nowait((at_ms, names))

    async def watch(
        self, *, events: bool = True, interval_s: float = 0.5, buffer: int = 256
    ) -> AsyncIterator[WatchUpdate]:
        while True:
            at_ms, names = await self.updates.get()
            queues = {n: QueueStats({"normal": 1}, oldest_pending_ms=T0) for n in names}
            yield WatchUpdate(1, Stats({"pending": len(names)}, queues, []), [], 0, 0, at_ms)


def names(n: int) -> list[str]:
    return [f"q{i:05d}" for i in range(n)]


def oldest(table: LiveTable, queue: str) -> str:
    return table.row_text(queue)[3]


async def test_thousands_of_queues_refresh_in_place_computing_only_the_rows_in_view() -> None:
    link = QueuesLink()
    app = TopApp(link, url="tcp://127.0.0.1:7700", redraw_s=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        table = app.query_one("#queues", LiveTable)
        link.send(T0 + 1_000, names(3000))
        await until(pilot, lambda: len(table.row_keys()) == 3000, what="3,000 rows")
        rows = dict(table.rows)
        view = app.query_one(OverviewView)
        computed: list[str] = []
        cells_of = view._queue_cells

        def counting(name: str) -> list[Cell]:
            computed.append(name)
            return cells_of(name)

        view._queue_cells = counting  # type: ignore[method-assign]
        link.send(T0 + 61_000, names(3000))
        await until(pilot, lambda: oldest(table, "q00000") == "1m01s", what="the first row")
        assert 0 < len(set(computed)) <= 100, len(set(computed))
        assert all(table.rows[key] is row for key, row in rows.items()), "rows were rebuilt"
        # The last row was out of view: it still says what it said, until it scrolls in.
        assert oldest(table, "q02999") == "1s"
        await pilot.press("ctrl+end")
        await until(pilot, lambda: table.cursor_key() == "q02999", what="the cursor at the end")
        # No snapshot came since (no redraw): scrolling alone brought it up to date.
        await until(pilot, lambda: oldest(table, "q02999") == "1m01s", what="the last row")


async def test_rows_that_appear_or_leave_go_where_they_belong_and_the_cursor_stays() -> None:
    link = QueuesLink()
    app = TopApp(link, url="tcp://127.0.0.1:7700", redraw_s=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        table = app.query_one("#queues", LiveTable)
        link.send(T0 + 1_000, names(50))
        await until(pilot, lambda: len(table.row_keys()) == 50, what="50 rows")
        table.move_cursor(row=30)
        rows = dict(table.rows)
        now = [n for n in names(50) if n != "q00010"] + ["q00015b", "a-first"]
        link.send(T0 + 2_000, now)
        await until(pilot, lambda: "a-first" in table.row_keys(), what="the new queues")
        assert all(table.rows[key] is rows[key] for key in now if key in rows), "rows rebuilt"
        assert table.row_keys() == sorted(now)
        assert [table.get_row_at(i)[0].plain for i in range(len(now))] == sorted(now)
        assert table.cursor_key() == "q00030"


@pytest.mark.parametrize("size", [(80, 24), (100, 30)])
async def test_the_state_filter_shows_every_state_on_one_line(size: tuple[int, int]) -> None:
    app = TopApp(FixedLink(), url="tcp://127.0.0.1:7700")
    async with app.run_test(size=size) as pilot:
        await pilot.press("3")
        tasks = app.query_one(TasksView)
        select = app.query_one("#f-state", Select)
        for state in TaskState:
            tasks.set_filters(state=state.value)
            await pilot.pause()
            label = select.query_one("SelectCurrent #label")
            assert label.size.height == 1, f"{state.value!r} wraps at {size}"
            assert select.size.height == 3  # the height of the filter row
