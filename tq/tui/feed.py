"""``Feed``: keeps the live model fed from ``watch()``, forever.

When the stream ends (the broker died, the connection dropped, or nothing arrived for
``stall_s``) the model is marked disconnected and ``watch()`` is called again after a backoff
(0.5 s, doubling to ``max_backoff_s``); the client reconnects, following NOT_LEADER to the
leader in a cluster. The first update after that marks the model connected again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tq.errors import TqError
from tq.tui.data import LiveModel
from tq.tui.link import BrokerLink


class Feed:
    def __init__(
        self,
        link: BrokerLink,
        model: LiveModel,
        on_change: Callable[[], None],
        *,
        interval_s: float = 0.5,
        max_backoff_s: float = 3.0,
        stall_s: float | None = None,
    ) -> None:
        self.link = link
        self.model = model
        self.on_change = on_change
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.stall_s = stall_s if stall_s is not None else max(10.0, interval_s * 10)

    def backoff_s(self, attempt: int) -> float:
        return float(min(self.max_backoff_s, 0.5 * 2 ** max(0, attempt - 1)))

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._follow()
                reason = "the broker ended the watch"
            except TqError as exc:
                reason = exc.message
            except TimeoutError:
                reason = f"no update for {self.stall_s:g}s"
                await self.link.close()  # a silent link: drop it, the next watch reconnects
            attempt = 1 if self.model.connection.connected else attempt + 1
            delay = self.backoff_s(attempt)
            self.model.disconnected(reason, attempt, delay)
            self.on_change()
            await asyncio.sleep(delay)

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.stall_s + 10.0) as deadline:  # covers the (re)connect
            async for update in self.link.watch(events=True, interval_s=self.interval_s):
                deadline.reschedule(loop.time() + self.stall_s)
                if not self.model.connection.connected:
                    self.model.connected()
                self.model.apply(update)
                self.on_change()
