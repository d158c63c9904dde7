"""Live state for watchers (``tq top``, later the web UI): snapshots on a timer, task events as
they are applied, both pushed over the watcher's own connection.

Cost is the design constraint: a broker doing tens of thousands of tasks a second must not pay
per task for someone looking at it. So the apply hook only keeps a reference to each applied
batch (no per-task work), and every ~100 ms the batches are turned into at most ``MAX_EVENTS``
events, newest first; the rest are only counted (``coalesced``). A snapshot (``Stats``) is built
once per interval and shared by every watcher. A watcher whose socket is backed up gets no events
(they are counted as ``dropped``) and, further backed up, no snapshots either: the broker never
buffers without bound or waits for a slow reader.

The hub measures its own CPU time (``cpu_ns``), so the overhead of watching is a number in
``tq stats`` and in a test, not a guess.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tq.broker.commands import Claim, Command, Report, RetryDead, Submit
from tq.errors import TqError
from tq.protocol.codec import encode
from tq.protocol.messages import Stats, TaskEvent, WatchUpdate

if TYPE_CHECKING:
    from tq.broker.state import ApplyResult, StateMachine

EVENT_FLUSH_S = 0.1
MAX_EVENTS = 256  # per flush and watcher; the rest are coalesced into a count
MAX_BATCHES = 512  # applied batches held between flushes (older ones are only counted)
EVENTS_HIGH_WATER = 256 * 1024  # socket backlog above which a watcher gets no events
SNAPSHOT_HIGH_WATER = 4 * 1024 * 1024  # ... and above which it gets nothing at all
MIN_INTERVAL_MS = 100
MAX_INTERVAL_MS = 60_000


@dataclass(slots=True, eq=False)
class Watcher:
    """One subscription: where to write and how backed up that socket is."""

    rid: int
    events: bool
    interval_s: float
    write: Callable[[bytes], None]
    backlog: Callable[[], int]
    owner: object
    next_snapshot: float = 0.0
    dropped: int = 0
    pending: list[TaskEvent] = field(default_factory=list)


class WatchHub:
    def __init__(
        self,
        sm: StateMachine,
        stats: Callable[[], Stats],
        clock: Callable[[], int],
        after_durable: Callable[[Callable[[], None]], None],
    ) -> None:
        self._sm = sm
        self._stats = stats
        self._clock = clock
        self._after_durable = after_durable  # no watcher sees state before it is durable
        self._watchers: dict[tuple[int, int], Watcher] = {}
        self._batches: list[tuple[int, list[Command], ApplyResult]] = []
        self._overflow = 0  # batches not kept since the last flush
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._progress: dict[str, tuple[float, str, int]] = {}
        self._progress_events: list[TaskEvent] = []
        self.cpu_ns = 0
        self.events_sent = 0
        self.updates_sent = 0

    # --- subscriptions ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._sm.observers.append(self.observe)

    def stop(self) -> None:
        if self.observe in self._sm.observers:
            self._sm.observers.remove(self.observe)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watchers.clear()

    @property
    def count(self) -> int:
        return len(self._watchers)

    def subscribe(
        self,
        owner: object,
        rid: int,
        *,
        events: bool,
        interval_ms: int,
        write: Callable[[bytes], None],
        backlog: Callable[[], int],
    ) -> None:
        interval = min(max(interval_ms, MIN_INTERVAL_MS), MAX_INTERVAL_MS) / 1000
        self._watchers[(id(owner), rid)] = Watcher(rid, events, interval, write, backlog, owner)
        self._arm(0.0)  # the first snapshot goes out at once

    def unsubscribe(self, owner: object, rid: int | None = None) -> None:
        """Drop one subscription of ``owner``, or all of them (its connection closed)."""
        for key in [k for k, w in self._watchers.items() if w.owner is owner]:
            if rid is None or key[1] == rid:
                del self._watchers[key]

    # --- inputs ----------------------------------------------------------------------------------

    def observe(self, now_ms: int, commands: list[Command], result: ApplyResult) -> None:
        """The apply hook: O(1) per batch, and nothing at all when nobody wants events."""
        if not self._watchers or not any(w.events for w in self._watchers.values()):
            return
        t0 = time.thread_time_ns()
        if len(self._batches) < MAX_BATCHES:
            self._batches.append((now_ms, commands, result))
        else:
            self._overflow += 1
        for task in result.finished:  # a finished task's progress is history
            self._progress.pop(task.id, None)
        self._arm(EVENT_FLUSH_S)
        self.cpu_ns += time.thread_time_ns() - t0

    def progress(self, task_id: str, fraction: float, message: str) -> None:
        """A running task's progress (checked against its lease by the caller)."""
        lease = self._sm.leases.get(task_id)
        if lease is None:
            return
        now = self._clock()
        self._progress[task_id] = (fraction, message, now)
        if any(w.events for w in self._watchers.values()):
            task = lease.task
            detail = message if fraction < 0 else f"{fraction:.0%} {message}".rstrip()
            self._progress_events.append(
                TaskEvent(
                    "progress",
                    task_id,
                    task.name,
                    task.queue,
                    now,
                    task.attempt,
                    lease.worker_id,
                    detail,
                )
            )
            del self._progress_events[:-MAX_EVENTS]
            self._arm(EVENT_FLUSH_S)

    def progress_of(self, task_id: str) -> tuple[float, str, int] | None:
        return self._progress.get(task_id)

    # --- output ----------------------------------------------------------------------------------

    def _arm(self, delay_s: float) -> None:
        if self._loop is None or not self._watchers:
            return
        if self._timer is not None:
            if self._timer.when() <= self._loop.time() + delay_s:
                return
            self._timer.cancel()
        self._timer = self._loop.call_later(delay_s, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if not self._watchers:
            self._batches.clear()
            self._progress_events.clear()
            self._overflow = 0
            return
        t0 = time.thread_time_ns()
        events, coalesced = self._events()
        self.cpu_ns += time.thread_time_ns() - t0
        self._after_durable(lambda: self._send(events, coalesced))

    def _send(self, events: list[TaskEvent], coalesced: int) -> None:
        t0 = time.thread_time_ns()
        assert self._loop is not None
        now = self._loop.time()
        stats: Stats | None = None
        at_ms = self._clock()
        next_due = now + MAX_INTERVAL_MS / 1000
        for w in list(self._watchers.values()):
            snapshot = now >= w.next_snapshot
            if snapshot:
                w.next_snapshot = now + w.interval_s
            next_due = min(next_due, w.next_snapshot)
            mine = events if w.events else []
            if not snapshot and not mine:
                continue
            backlog = w.backlog()
            if backlog > SNAPSHOT_HIGH_WATER:
                w.dropped += len(mine)
                continue
            if mine and backlog > EVENTS_HIGH_WATER:
                w.dropped += len(mine)
                mine = []
                if not snapshot:
                    continue
            if snapshot and stats is None:
                stats = self._stats()
            try:
                w.write(
                    encode(
                        WatchUpdate(
                            w.rid,
                            stats if snapshot else None,
                            mine,
                            coalesced if w.events else 0,
                            w.dropped,
                            at_ms,
                        )
                    )
                )
            except (OSError, RuntimeError):  # a dead transport: connection_lost unsubscribes it
                continue
            self.updates_sent += 1
            self.events_sent += len(mine)
        self.cpu_ns += time.thread_time_ns() - t0
        if self._batches or self._progress_events:
            next_due = min(next_due, now + EVENT_FLUSH_S)
        self._arm(max(0.0, next_due - self._loop.time()))

    def _events(self) -> tuple[list[TaskEvent], int]:
        """Turn the batches applied since the last flush into events, newest first, until
        ``MAX_EVENTS``; returns them oldest first and how many more there were."""
        batches, self._batches = self._batches, []
        progress, self._progress_events = self._progress_events, []
        overflow, self._overflow = self._overflow, 0
        out: list[TaskEvent] = []
        more = 0
        for now_ms, commands, result in reversed(batches):
            if len(out) >= MAX_EVENTS:
                more += _estimate(commands, result)
                continue
            batch_events = self._batch_events(now_ms, commands, result)
            room = MAX_EVENTS - len(out)
            if len(batch_events) > room:
                more += len(batch_events) - room
                batch_events = batch_events[-room:]
            out.extend(reversed(batch_events))
        out.reverse()
        if progress:
            out.extend(progress)
            out.sort(key=lambda e: e.at_ms)
        return out, more + overflow

    def _batch_events(
        self, now_ms: int, commands: list[Command], result: ApplyResult
    ) -> list[TaskEvent]:
        events: list[TaskEvent] = []
        finished_done: set[str] = set()
        for cmd, value in zip(commands, result.results, strict=False):
            if isinstance(value, TqError):
                continue
            if isinstance(cmd, Submit):
                rejected = {tid for tid, _ in value[1]} if value[1] else ()
                events.extend(
                    TaskEvent("submitted", s.id, s.name, s.queue, now_ms)
                    for s in cmd.specs
                    if s.id not in rejected
                )
            elif isinstance(cmd, Claim):
                events.extend(
                    TaskEvent(
                        "started",
                        lt.task.id,
                        lt.task.name,
                        lt.task.queue,
                        now_ms,
                        lt.task.attempt,
                        cmd.worker_id,
                    )
                    for lt in value
                )
            elif isinstance(cmd, Report):
                accepted = set(value[0])
                for outcome in cmd.outcomes:
                    if outcome.ok or outcome.task_id not in accepted:
                        continue
                    task = self._sm.get_task(outcome.task_id)
                    if task is None or task.state != "failed":
                        continue  # dead or otherwise final: reported from `finished` below
                    err = outcome.error
                    events.append(
                        TaskEvent(
                            "failed",
                            task.id,
                            task.name,
                            task.queue,
                            now_ms,
                            task.attempt,
                            cmd.worker_id,
                            f"{err.type}: {err.message}" if err else "",
                        )
                    )
            elif isinstance(cmd, RetryDead):
                for task_id in value:
                    task = self._sm.get_task(task_id)
                    if task is not None:
                        events.append(TaskEvent("retried", task.id, task.name, task.queue, now_ms))
        for task in result.finished:
            if task.id in finished_done:
                continue
            finished_done.add(task.id)
            err = task.error
            events.append(
                TaskEvent(
                    task.state,
                    task.id,
                    task.name,
                    task.queue,
                    now_ms,
                    task.attempt,
                    task.worker_id,
                    f"{err.type}: {err.message}" if err else "",
                )
            )
        return events


def _estimate(commands: list[Command], result: ApplyResult) -> int:
    """How many events a batch would have made, without making them (for the coalesced count)."""
    n = len(result.finished)
    for cmd, value in zip(commands, result.results, strict=False):
        if isinstance(value, TqError):
            continue
        if isinstance(cmd, Submit):
            n += len(cmd.specs)
        elif isinstance(cmd, Claim) and isinstance(value, list):
            n += len(value)
    return n


def watch_counters(hub: WatchHub) -> dict[str, int]:
    return {
        "watchers": hub.count,
        "watch_cpu_us": hub.cpu_ns // 1000,
        "watch_updates": hub.updates_sent,
        "watch_events": hub.events_sent,
    }
