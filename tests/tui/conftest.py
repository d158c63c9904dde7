"""Helpers of the ``tq top`` tests: run the app on a broker, wait for a condition while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from textual.pilot import Pilot
from tq.client import AsyncClient
from tq.tui import TopApp
from tq.tui.widgets.status import StatusBar

SIZE = (100, 30)


async def until(
    pilot: Pilot[None], predicate: Callable[[], object], within_s: float = 10.0, what: str = ""
) -> None:
    """Let the app run until ``predicate()`` is truthy; AssertionError after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what or predicate}")
        await pilot.pause(0.05)


def app_of(pilot: Pilot[None]) -> TopApp:
    app = pilot.app
    assert isinstance(app, TopApp)
    return app


@asynccontextmanager
async def top(url: str) -> AsyncIterator[Pilot[None]]:
    """``tq top`` on ``url`` (fast snapshots, so the tests wait little), connected."""
    client = AsyncClient(url, connect_timeout_s=1.0, timeout_s=5.0)
    app = TopApp(client, url=url, interval_s=0.2, redraw_s=0.1, poll_s=0.3)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.stats is not None, what="first snapshot")
        yield pilot


def status_text(pilot: Pilot[None]) -> str:
    return pilot.app.query_one(StatusBar).text
