"""The single-node command log: apply, write (``sync=False``), then group-commit one fsync.

Everything applied in one loop tick shares one WAL flush, and a flush that is running lets the
next ticks pile up behind it, so the fsync rate adapts to load by itself. Callers get told when
what they wrote is durable; only then may they acknowledge. A failed flush is fatal: the broker
stops rather than acknowledge what it could not make durable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tq.broker.commands import Command
from tq.broker.state import ApplyResult, StateMachine
from tq.errors import NotLeader
from tq.logfields import kv
from tq.store import Store

log = logging.getLogger("tq.broker.log")

DurableCallback = Callable[[BaseException | None], None]


class LocalLog:
    def __init__(
        self,
        store: Store,
        sm: StateMachine,
        on_fatal: Callable[[BaseException], None],
        on_applied: Callable[[ApplyResult], None],
    ) -> None:
        self._store = store
        self._sm = sm
        self._on_fatal = on_fatal
        self._on_applied = on_applied
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._written = 0  # commits applied to the store
        self._durable = 0  # commits covered by a finished flush
        self._running_upto = -1  # commits the running flush covers (-1: none running)
        self._running_cbs: list[DurableCallback] = []
        self._next_cbs: list[DurableCallback] = []
        self._start_scheduled = False
        self.failed: BaseException | None = None
        self.flushes = 0
        self.flushed_commits = 0

    is_leader = True  # a single node always serves

    def leader_client(self) -> str | None:
        return None

    def not_leader(self) -> NotLeader:  # unreachable for a single node, which always leads
        return NotLeader("this node does not lead")

    def status(self) -> dict[str, Any]:
        return {"role": "single"}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tq-wal")

    def append(
        self,
        now_ms: int,
        commands: Iterable[Command],
        done: Callable[[ApplyResult | BaseException], None],
    ) -> None:
        """Apply and write now (``sync=False``); ``done`` gets the result once it is durable."""
        result = self._sm.apply(now_ms, commands)
        self._written += 1
        self._on_applied(result)

        def durable(exc: BaseException | None) -> None:
            done(exc if exc is not None else result)

        self.when_durable(durable)

    def when_durable(self, cb: DurableCallback) -> None:
        """Call ``cb`` once everything written so far is on disk (at once if it already is)."""
        if self.failed is not None:
            cb(self.failed)
        elif self._written == self._durable:
            cb(None)
        elif self._written == self._running_upto:
            self._running_cbs.append(cb)
        else:
            self._next_cbs.append(cb)
            if self._running_upto < 0 and not self._start_scheduled:
                self._start_scheduled = True
                assert self._loop is not None
                # Let the rest of this tick's writes join the same flush.
                self._loop.call_soon(self._start_flush)

    def kick(self) -> None:
        """End of a tick: start the flush now instead of one loop iteration later."""
        if self._next_cbs and self._running_upto < 0:
            self._start_flush()

    def _start_flush(self) -> None:
        self._start_scheduled = False
        if self._running_upto >= 0 or not self._next_cbs:
            return
        assert self._executor is not None
        assert self._loop is not None
        self._running_upto = self._written
        self._running_cbs, self._next_cbs = self._next_cbs, []
        loop = self._loop
        fut = self._executor.submit(self._store.flush_wal)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._flush_done, f))

    def _flush_done(self, fut: Future[None]) -> None:
        exc = fut.exception()
        cbs, self._running_cbs = self._running_cbs, []
        if exc is not None:
            self.failed = exc
            log.critical("store.flush_failed", extra=kv(error=str(exc)))
            for cb in cbs + self._next_cbs:
                cb(exc)
            self._next_cbs = []
            self._on_fatal(exc)
            return
        self.flushes += 1
        self.flushed_commits += self._running_upto - self._durable
        self._durable = self._running_upto
        self._running_upto = -1
        for cb in cbs:
            cb(None)
        if self._next_cbs:
            self._start_flush()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
