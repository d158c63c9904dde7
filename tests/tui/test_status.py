"""The status line while the link is down says what is going on: the wait before the next
attempt, then that an attempt is under way (a connect can take seconds: the countdown it
showed before was long expired), and why the last one failed, in words even when the client's
error has none (a connect that timed out)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tq.errors import BrokerUnavailable
from tq.protocol.messages import WatchUpdate
from tq.tui import TopApp
from tq.tui.feed import describe

from tests.tui.conftest import status_text, until
from tests.tui.fixed import T0, FixedLink, single_node_stats


class DroppingLink(FixedLink):
    """The first watch sends one update and drops; the second fails like a connect to a stopped
    broker (the client's "cannot reach" with an empty last error); the third never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def watch(
        self, *, events: bool = True, interval_s: float = 0.5, buffer: int = 256
    ) -> AsyncIterator[WatchUpdate]:
        self.calls += 1
        if self.calls == 1:
            yield WatchUpdate(1, single_node_stats(0, T0), [], 0, 0, T0)
            raise BrokerUnavailable("connection to broker lost")
        if self.calls == 2:
            raise BrokerUnavailable("cannot reach a broker at 127.0.0.1:7700: ")
        await asyncio.Event().wait()
        yield WatchUpdate(1, None, [], 0, 0, T0)  # never reached


async def test_the_status_line_says_when_an_attempt_is_under_way_and_why_the_last_failed() -> None:
    link = DroppingLink()
    app = TopApp(link, url="tcp://127.0.0.1:7700", redraw_s=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: "timed out" in status_text(pilot), what="the 2nd failure")
        assert status_text(pilot).endswith(
            "(attempt 2, next in 1.0s): cannot reach a broker at 127.0.0.1:7700: timed out"
        )
        await until(pilot, lambda: link.calls == 3, what="the 3rd attempt")
        await until(pilot, lambda: "trying now" in status_text(pilot), what="trying now")
        assert "next in" not in status_text(pilot)
        assert status_text(pilot).endswith(
            "(attempt 2, trying now…): cannot reach a broker at 127.0.0.1:7700: timed out"
        )


def test_an_error_without_words_reads_timed_out() -> None:
    assert describe(BrokerUnavailable("cannot reach a broker at h:1: ")) == (
        "cannot reach a broker at h:1: timed out"
    )
    assert describe(BrokerUnavailable("connection to broker lost")) == "connection to broker lost"
