"""tq/cli/cancel.py: how the SSH shell stops a command running in one of its threads."""

from __future__ import annotations

import asyncio
import threading

import pytest
from tq.cli import cancel


def test_a_cancel_interrupts_what_is_registered_once_and_later_ones_at_once() -> None:
    scope = cancel.CancelScope()
    calls: list[str] = []
    with scope.interrupting(lambda: calls.append("a")):
        pass  # left before the cancel: not called
    with scope.interrupting(lambda: calls.append("b")):
        scope.cancel()
        scope.cancel()
    assert calls == ["b"]
    with scope.interrupting(lambda: calls.append("c")):
        assert calls == ["b", "c"]


def test_an_interrupt_that_fails_does_not_stop_the_others() -> None:
    scope = cancel.CancelScope()
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("Event loop is closed")

    with scope.interrupting(broken), scope.interrupting(lambda: calls.append("ok")):
        scope.cancel()
    assert calls == ["ok"]


def test_run_without_a_scope_is_asyncio_run() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert cancel.run(answer()) == 42


def test_run_in_a_scope_is_cancelled_from_another_thread_after_its_cleanup() -> None:
    scope = cancel.CancelScope()
    started = threading.Event()
    cleaned = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.append(True)

    threading.Timer(0.1, lambda: started.wait(5) and scope.cancel()).start()
    with cancel.scope(scope), pytest.raises(asyncio.CancelledError):
        cancel.run(forever())
    assert cleaned == [True]
