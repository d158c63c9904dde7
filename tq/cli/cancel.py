"""Stopping a running CLI command from another thread.

The SSH shell (tq/cli/shell.py) runs each command in one of its worker threads. When the session
that typed it goes away (or the broker stops), the command must end too: a `tq wait` used to run
to its timeout with nobody reading, holding one of the shell's four threads (and, at exit, the
broker's). Python cannot stop a thread, but every command that can run long spends that time in
something that can be interrupted: an event loop (the client's requests) or a DuckDB query. Each
registers how to interrupt it with the command's :class:`CancelScope`; the shell cancels the scope.

A command run outside the shell (the local CLI) has no scope, and Ctrl-C does what it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

_scope: ContextVar[CancelScope | None] = ContextVar("tq_cli_cancel_scope", default=None)


class CancelScope:
    """One command's cancellation: thread-safe; cancelling runs every registered interrupt once
    (and one registered after the cancel runs at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interrupts: list[Callable[[], object]] = []
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            interrupts, self._interrupts = self._interrupts, []
        for interrupt in interrupts:
            _quietly(interrupt)

    @contextlib.contextmanager
    def interrupting(self, interrupt: Callable[[], object]) -> Iterator[None]:
        """While inside, a cancel calls ``interrupt`` (from the cancelling thread)."""
        with self._lock:
            now = self.cancelled
            if not now:
                self._interrupts.append(interrupt)
        if now:
            _quietly(interrupt)
        try:
            yield
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._interrupts.remove(interrupt)


def _quietly(interrupt: Callable[[], object]) -> None:
    # What is interrupted may have just finished (a closed loop refuses call_soon_threadsafe):
    # then there is nothing left to stop.
    with contextlib.suppress(Exception):
        interrupt()


@contextlib.contextmanager
def scope(cancel_scope: CancelScope) -> Iterator[None]:
    """Commands run inside (in this context) are cancelled with ``cancel_scope``."""
    token = _scope.set(cancel_scope)
    try:
        yield
    finally:
        _scope.reset(token)


@contextlib.contextmanager
def interrupting(interrupt: Callable[[], object]) -> Iterator[None]:
    """Register ``interrupt`` with the running command's scope, if it has one."""
    current = _scope.get()
    if current is None:
        yield
        return
    with current.interrupting(interrupt):
        yield


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)``, cancelled with the command's scope: the cancel cancels the main
    task, so ``CancelledError`` comes out of here, after the coroutine's cleanup."""

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        with interrupting(lambda: loop.call_soon_threadsafe(task.cancel)):
            return await coro

    return asyncio.run(main())
