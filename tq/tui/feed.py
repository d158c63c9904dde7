"""``Feed``: keeps the live model fed from ``watch()``, forever.

When the stream ends (the broker died, the connection dropped, or nothing arrived for
``stall_s``) the model is marked disconnected and ``watch()`` is called again after a backoff
(0.5 s, doubling to ``max_backoff_s``); the client reconnects, following NOT_LEADER to the
leader in a cluster. The first update after that marks the model connected again.

An attempt is not instant: the client retries the connect for its whole connect timeout (2 s in
``tq top``), and a broker that accepts but does not answer (stopped, SIGSTOP) holds it for the
request timeout. So the model is told when an attempt starts (the status bar says so) rather
than showing a "next in 0.5s" that expired long ago.
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
            if attempt:
                self.model.reconnecting()
                self.on_change()
            try:
                await self._follow()
                reason = "the broker ended the watch"
            except TqError as exc:
                reason = describe(exc)
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


def describe(exc: TqError) -> str:
    """Why the link failed, in words. The client says "cannot reach a broker at ADDR: <the last
    error>", and a connect or hello that timed out leaves that last part empty
    (``str(TimeoutError())`` is ""): an empty reason is a timeout."""
    message = exc.message.rstrip()
    return f"{message} timed out" if message.endswith(":") else message
