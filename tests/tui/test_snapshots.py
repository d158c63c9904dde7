"""SVG snapshots of the main screens at 80x24, from a fixed broker link (tests/tui/fixed.py):
fixed stats, events and tasks, and every age measured on the broker's fixed clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot
from tq.tui import TopApp
from tq.tui.screens.detail import TaskDetail
from tq.tui.views.dead import DeadView
from tq.tui.views.tasks import TasksView

from tests.tui.conftest import app_of, until
from tests.tui.fixed import UPDATES, FixedLink

SnapCompare = Callable[..., bool]


def make_app(*, cluster: bool = False) -> TopApp:
    return TopApp(FixedLink(cluster=cluster), url="tcp://127.0.0.1:7700")


async def settled(pilot: Pilot[None]) -> None:
    """Every fixed update applied and drawn."""
    app = app_of(pilot)
    await until(pilot, lambda: app.model.generation >= UPDATES + 1, what="all updates")
    app.redraw(force=True)
    await pilot.pause()


def keys_then_settle(*keys: str) -> Callable[[Pilot[None]], Any]:
    async def run(pilot: Pilot[None]) -> None:
        await settled(pilot)
        await pilot.press(*keys)
        await pilot.pause(0.2)
        app = app_of(pilot)
        if app.active_view().id == "tasks-view":
            view = app.query_one(TasksView)
            await until(pilot, lambda: view.shown_tasks(), what="tasks listed")
        if app.active_view().id == "dead-view":
            dead = app.query_one(DeadView)
            await until(pilot, lambda: dead.chosen(), what="dead letters listed")
        app.redraw(force=True)
        await pilot.pause(0.1)

    return run


def test_overview_screen(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=keys_then_settle())


def test_workers_screen(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=keys_then_settle("2"))


def test_tasks_screen(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=keys_then_settle("3"))


def test_dead_letters_screen(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=keys_then_settle("4"))


def test_task_detail_with_error_and_traceback(snap_compare: SnapCompare) -> None:
    async def run(pilot: Pilot[None]) -> None:
        await keys_then_settle("4")(pilot)
        await pilot.press("enter")
        app = app_of(pilot)
        await until(
            pilot,
            lambda: isinstance(app.screen, TaskDetail) and app.screen.info is not None,
            what="the task loaded",
        )
        app.redraw(force=True)
        await pilot.pause(0.1)

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=run)


def test_cluster_screen_with_a_node_down(snap_compare: SnapCompare) -> None:
    assert snap_compare(
        make_app(cluster=True), terminal_size=(80, 24), run_before=keys_then_settle("5")
    )


def test_help_screen(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=keys_then_settle("?"))


def test_light_theme_overview(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=keys_then_settle("L"))
