"""Per-run timeouts for a worker's tasks, all served by one loop timer.

``asyncio.timeout()`` per run arms a loop timer when the run starts and cancels it when the run
ends; uvloop backs each ``call_at`` with its own libuv timer. For short tasks that was the
worker's largest single cost: 7-9 µs a run (measured on uvloop: 16-18 µs a run with it, 9-10
without), a fifth of the worker's CPU in a py-spy profile of ``tq bench``'s end-to-end scenario.

Runs with the same timeout reach their deadlines in the order they started, so each distinct
timeout keeps its runs in an insertion-ordered dict (token -> deadline): the first entry is the
earliest, adding and removing are O(1), and one timer armed for the earliest first entry serves
them all. A timer that fires after its run ended finds nothing due and re-arms for the next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadlines:
    """Calls ``on_expired(token)`` once for each run still registered when its timeout is up."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expired: Callable[[int], None]) -> None:
        self._loop = loop
        self._on_expired = on_expired
        # timeout_s -> {token: deadline}, in start order, so in deadline order
        self._groups: dict[float, dict[int, float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return sum(len(group) for group in self._groups.values())

    def add(self, token: int, timeout_s: float) -> None:
        """Start the clock of a run (``token`` unique among the runs registered)."""
        deadline = self._loop.time() + timeout_s
        group = self._groups.get(timeout_s)
        if group is None:
            group = self._groups[timeout_s] = {}
        group[token] = deadline
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    def discard(self, token: int, timeout_s: float) -> None:
        """The run ended: it can no longer expire. The timer stays armed (cheaper than
        re-arming on every run's end); if it fires early it finds nothing due."""
        group = self._groups.get(timeout_s)
        if group is not None and group.pop(token, None) is not None and not group:
            del self._groups[timeout_s]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._groups.clear()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        # A loop may run a timer up to its clock's resolution early (uvloop: 1 ms): count what
        # is due within it, or the timer would re-arm for the same deadline until it is due.
        now = self._loop.time() + 0.001
        due: list[int] = []
        earliest: float | None = None
        for timeout_s in list(self._groups):
            group = self._groups[timeout_s]
            while group:
                token, deadline = next(iter(group.items()))
                if deadline > now:
                    earliest = deadline if earliest is None else min(earliest, deadline)
                    break
                del group[token]
                due.append(token)
            if not group:
                del self._groups[timeout_s]
        if earliest is not None:
            self._arm(earliest)
        for token in due:  # after re-arming: a callback may add or discard runs
            self._on_expired(token)
