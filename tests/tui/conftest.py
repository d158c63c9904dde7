"""Helpers of the ``tq top`` tests: wait for a condition while the app keeps running."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from textual.pilot import Pilot
from tq.tui import TopApp


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
