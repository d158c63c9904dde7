"""Live state for watchers (``tq top``, later the web UI): snapshots on a timer, task events as
they are applied, both pushed over the watcher's own connection.

Cost is the design constraint: a broker doing tens of thousands of tasks a second must not pay
per task for someone looking at it. So the apply hook only keeps a reference to each applied
batch (no per-task work), and every ~100 ms the batches are turned into at most ``MAX_EVENTS``
events, newest first; the rest are only counted (``coalesced``). A snapshot (``Stats``) is built
once per interval and shared by every watcher. A watcher whose socket is backed up gets no events
(they are counted as ``dropped``) and, further backed up, no snapshots either: the broker never
buffers without bound or waits for a slow reader.

The hub measures the time it spends (``cpu_ns``: elapsed time of its non-blocking sections, an
upper bound of their CPU time, read from the cheap monotonic clock rather than the thread CPU
clock, which is a system call here), so the overhead of watching is a number in ``tq stats``
and in a test, not a guess.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tq.broker.commands import Claim, Command, Report, RetryDead, Submit
from tq.errors import TqError
from tq.model import Task
from tq.protocol.codec import encode
from tq.protocol.messages import Stats, TaskEvent, WatchUpdate

if TYPE_CHECKING:
    from tq.broker.state import ApplyResult, StateMachine

EVENT_FLUSH_S = 0.2
MAX_EVENTS = 200  # per flush and watcher; the rest are coalesced into a count
MAX_BATCHES = 512  # applied batches held between flushes (older ones are only counted)
EVENTS_HIGH_WATER = 128 * 1024  # socket backlog above which a watcher gets no events
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
        self._overflow = 0  # events of the batches not kept since the last flush
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0
        self._progress_events: list[TaskEvent] = []
        self.cpu_ns = 0
        self.events_sent = 0
        self.events_dropped = 0  # not sent to a watcher whose socket was backed up
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

    def owned_by(self, owner: object) -> int:
        return sum(1 for w in self._watchers.values() if w.owner is owner)

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
        t0 = time.perf_counter_ns()
        if len(self._batches) < MAX_BATCHES:
            self._batches.append((now_ms, commands, result))
        else:  # only counted: none of its events could be among the newest sent
            self._overflow += self._batch_events(now_ms, commands, result, 0)[1]
        self._arm(EVENT_FLUSH_S)
        self.cpu_ns += time.perf_counter_ns() - t0

    def progress(self, task_id: str, fraction: float, message: str) -> None:
        """A running task's progress (checked against its lease by the caller): an event for
        the watchers, kept nowhere else."""
        lease = self._sm.leases.get(task_id)
        if lease is None:
            return
        if any(w.events for w in self._watchers.values()):
            now = self._clock()
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

    # --- output ----------------------------------------------------------------------------------

    def _arm(self, delay_s: float) -> None:
        if self._loop is None or not self._watchers:
            return
        due = self._loop.time() + delay_s
        if self._timer is not None:
            if self._timer_at <= due:
                return
            self._timer.cancel()
        # uvloop returns a plain Handle (no .when()) for a zero delay: keep the time ourselves
        self._timer_at = due
        self._timer = self._loop.call_later(delay_s, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if not self._watchers:
            self._batches.clear()
            self._progress_events.clear()
            self._overflow = 0
            return
        t0 = time.perf_counter_ns()
        batches, self._batches = self._batches, []
        events, coalesced = self._events(batches)
        self.cpu_ns += time.perf_counter_ns() - t0
        # Freeing the batches' commands and results (outside the measured time) is the cost of
        # applying them, which the broker pays with or without watchers: they are only held
        # here a little longer.
        del batches
        self._after_durable(lambda: self._send(events, coalesced))

    def _send(self, events: list[TaskEvent], coalesced: int) -> None:
        t0 = time.perf_counter_ns()
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
                self.events_dropped += len(mine)
                continue
            if mine and backlog > EVENTS_HIGH_WATER:
                w.dropped += len(mine)
                self.events_dropped += len(mine)
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
        self.cpu_ns += time.perf_counter_ns() - t0
        if self._batches or self._progress_events:
            next_due = min(next_due, now + EVENT_FLUSH_S)
        self._arm(max(0.0, next_due - self._loop.time()))

    def _events(
        self, batches: list[tuple[int, list[Command], ApplyResult]]
    ) -> tuple[list[TaskEvent], int]:
        """Turn the batches applied since the last flush into events, newest first, until
        ``MAX_EVENTS``; returns them oldest first and how many more there were. Only the events
        that are sent are ever built: under load that is a few hundred of many thousands."""
        progress, self._progress_events = self._progress_events, []
        overflow, self._overflow = self._overflow, 0
        newest_first: list[TaskEvent] = []
        more = 0
        for now_ms, commands, result in reversed(batches):
            room = MAX_EVENTS - len(newest_first)  # 0: only count them
            events, total = self._batch_events(now_ms, commands, result, room)
            newest_first.extend(events)
            more += total - len(events)
        newest_first.reverse()
        if progress:
            newest_first.extend(progress)
            newest_first.sort(key=lambda e: e.at_ms)
        return newest_first, more + overflow

    def _batch_events(
        self, now_ms: int, commands: list[Command], result: ApplyResult, room: int
    ) -> tuple[list[TaskEvent], int]:
        """The newest ``room`` events of one batch, newest first, and how many it has in all.
        Within a batch the finished tasks come last, after the commands in their order."""
        out: list[TaskEvent] = []
        total = len(result.finished)
        for task in reversed(result.finished):
            if len(out) >= room:
                break
            out.append(_final_event(task, now_ms))
        for cmd, value in reversed(list(zip(commands, result.results, strict=False))):
            if isinstance(value, TqError):
                continue
            n, make = self._command_events(cmd, value, now_ms)
            total += n
            want = min(n, room - len(out))
            if want > 0:
                out.extend(make(want))
        return out, total

    def _command_events(
        self, cmd: Command, value: Any, now_ms: int
    ) -> tuple[int, Callable[[int], list[TaskEvent]]]:
        """How many events a command made, and a function building its newest ``k``, newest
        first (built only if they will be sent)."""
        if isinstance(cmd, Submit):
            rejected = {tid for tid, _ in value[1]} if value[1] else set()
            specs = cmd.specs

            def submitted(k: int) -> list[TaskEvent]:
                out: list[TaskEvent] = []
                for s in reversed(specs):
                    if len(out) >= k:
                        break
                    if s.id not in rejected:
                        out.append(TaskEvent("submitted", s.id, s.name, s.queue, now_ms))
                return out

            return len(specs) - len(rejected), submitted
        if isinstance(cmd, Claim):
            leased = value
            worker = cmd.worker_id

            def started(k: int) -> list[TaskEvent]:
                return [
                    TaskEvent(
                        "started", lt.task.id, lt.task.name, lt.task.queue, now_ms,
                        lt.task.attempt, worker,
                    )
                    for lt in reversed(leased[-k:])
                ]  # fmt: skip

            return len(leased), started
        if isinstance(cmd, Report):
            return self._failure_events(cmd, value, now_ms)
        if isinstance(cmd, RetryDead):
            return self._retry_events(list(value), now_ms)
        return 0, _no_events

    def _failure_events(
        self, cmd: Report, value: Any, now_ms: int
    ) -> tuple[int, Callable[[int], list[TaskEvent]]]:
        sm = self._sm
        failures = [o for o in cmd.outcomes if not o.ok]  # usually none: no per-task work
        if failures and value[1]:  # some outcomes were refused (stale leases): not failures
            refused = {tid for tid, _ in value[1]}
            failures = [o for o in failures if o.task_id not in refused]
        worker = cmd.worker_id

        def failed(k: int) -> list[TaskEvent]:
            out: list[TaskEvent] = []
            for outcome in reversed(failures[-k:]):
                task = sm.get_task(outcome.task_id)
                if task is None or task.state != "failed":
                    continue  # dead: reported with the finished tasks
                err = outcome.error
                detail = f"{err.type}: {err.message}" if err else ""
                out.append(
                    TaskEvent(
                        "failed", task.id, task.name, task.queue, now_ms, task.attempt,
                        worker, detail,
                    )
                )  # fmt: skip
            return out

        return len(failures), failed

    def _retry_events(
        self, retried: list[str], now_ms: int
    ) -> tuple[int, Callable[[int], list[TaskEvent]]]:
        sm = self._sm

        def brought_back(k: int) -> list[TaskEvent]:
            out: list[TaskEvent] = []
            for task_id in reversed(retried[-k:]):
                task = sm.get_task(task_id)
                if task is not None:
                    out.append(TaskEvent("retried", task.id, task.name, task.queue, now_ms))
            return out

        return len(retried), brought_back


def _no_events(_k: int) -> list[TaskEvent]:
    return []


def _final_event(task: Task, now_ms: int) -> TaskEvent:
    err = task.error
    return TaskEvent(
        task.state,
        task.id,
        task.name,
        task.queue,
        now_ms,
        task.attempt,
        task.worker_id,
        f"{err.type}: {err.message}" if err else "",
    )


def watch_counters(hub: WatchHub) -> dict[str, int]:
    return {
        "watchers": hub.count,
        "watch_cpu_us": hub.cpu_ns // 1000,
        "watch_updates": hub.updates_sent,
        "watch_events": hub.events_sent,
        "watch_dropped": hub.events_dropped,
    }
