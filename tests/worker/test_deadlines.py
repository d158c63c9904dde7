"""Deadlines: one timer serves every run's timeout, whatever order the runs end in."""

from __future__ import annotations

import asyncio

from tq.worker.deadlines import Deadlines


async def _collect(setup: list[tuple[int, float]], discard: set[int], wait_s: float) -> list[int]:
    loop = asyncio.get_running_loop()
    expired: list[int] = []
    deadlines = Deadlines(loop, expired.append)
    for token, timeout_s in setup:
        deadlines.add(token, timeout_s)
    for token, timeout_s in setup:
        if token in discard:
            deadlines.discard(token, timeout_s)
    await asyncio.sleep(wait_s)
    deadlines.close()
    return expired


async def test_runs_expire_in_deadline_order_across_timeouts() -> None:
    setup = [(1, 0.20), (2, 0.05), (3, 0.20), (4, 0.10), (5, 0.05)]
    assert await _collect(setup, set(), 0.4) == [2, 5, 4, 1, 3]


async def test_a_run_that_ended_never_expires() -> None:
    setup = [(1, 0.05), (2, 0.05), (3, 0.10)]
    assert await _collect(setup, {1, 3}, 0.3) == [2]


async def test_nothing_expires_before_its_timeout() -> None:
    assert await _collect([(1, 0.5), (2, 30.0)], set(), 0.1) == []


async def test_a_shorter_timeout_added_later_rearms_the_timer() -> None:
    loop = asyncio.get_running_loop()
    expired: list[tuple[int, float]] = []
    start = loop.time()
    deadlines = Deadlines(loop, lambda t: expired.append((t, loop.time() - start)))
    deadlines.add(1, 10.0)
    deadlines.add(2, 0.05)
    await asyncio.sleep(0.3)
    deadlines.close()
    assert [t for t, _ in expired] == [2]
    assert expired[0][1] < 0.25


async def test_the_timer_keeps_serving_runs_after_the_first_one_ended() -> None:
    """The timer armed for run 1 fires after run 1 ended: it must re-arm for run 2."""
    loop = asyncio.get_running_loop()
    expired: list[int] = []
    deadlines = Deadlines(loop, expired.append)
    deadlines.add(1, 0.05)
    await asyncio.sleep(0.02)
    deadlines.add(2, 0.05)
    deadlines.discard(1, 0.05)
    await asyncio.sleep(0.1)
    assert expired == [2]
    assert len(deadlines) == 0
    deadlines.close()


async def test_a_callback_may_add_runs() -> None:
    loop = asyncio.get_running_loop()
    expired: list[int] = []
    deadlines = Deadlines(loop, lambda t: (expired.append(t), t < 3 and deadlines.add(t + 1, 0.02)))
    deadlines.add(1, 0.02)
    await asyncio.sleep(0.3)
    deadlines.close()
    assert expired == [1, 2, 3]


async def test_close_cancels_the_timer() -> None:
    assert await _collect([(1, 0.05)], set(), 0.0) == []
    loop = asyncio.get_running_loop()
    expired: list[int] = []
    deadlines = Deadlines(loop, expired.append)
    deadlines.add(1, 0.05)
    deadlines.close()
    await asyncio.sleep(0.1)
    assert expired == []


def test_on_uvloop_too() -> None:
    """The worker runs on uvloop, whose timers have 1 ms resolution and may fire early."""
    import uvloop

    setup = [(1, 0.0203), (2, 0.0101), (3, 0.0307)]
    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(_collect(setup, set(), 0.2)) == [2, 1, 3]
    finally:
        loop.close()
