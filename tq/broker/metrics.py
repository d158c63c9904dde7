"""Prometheus metrics of one broker; the only importer of prometheus_client.

Two sources, no per-task logging:

- **What the state machine applies.** ``BrokerMetrics.observe`` is the state machine's observer
  (``StateMachine.observers`` in ``tq/broker/state.py``): it sees every applied batch, its commands
  and their results, and counts submitted, claimed, completed, failed, retried, dead-lettered and
  cancelled tasks by queue and task name, plus queue-wait and run-time histograms. Only a node
  that leads counts (a follower applies the same log), so summing a cluster's nodes is right.
  Counts live in plain dicts on the event loop and become metric families at scrape time: an
  apply costs a few dict updates per batch, not a lock per task.
- **Gauges read at scrape time** from the state machine and the log: tasks by state, queue depth
  by priority, oldest pending age, paused queues, connected workers and clients, the persisted
  lease-expiry and lost-worker counters, WAL flushes, and in a cluster role, term, commit and
  apply index and lag.

Each broker has its own ``CollectorRegistry`` (never the global one). Label values are bounded:
queue and task name only, never a task id, and at most ``MAX_SERIES`` (queue, task) pairs; the
rest are counted under ``_other``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from tq._version import __version__
from tq.broker.commands import Claim, Command, Report, Submit
from tq.errors import TqError
from tq.logfields import kv
from tq.model import Priority, Task

if TYPE_CHECKING:
    from tq.broker.core import BrokerCore
    from tq.broker.state import ApplyResult

log = logging.getLogger("tq.broker.metrics")

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
MAX_SERIES: Final = 1000
OVERFLOW: Final = ("_other", "_other")
TASK_COUNTERS: Final = {
    "submitted": "Tasks submitted (an idempotent resubmit of a known id is not counted)",
    "claimed": "Tasks leased to a worker (every attempt)",
    "completed": "Tasks completed",
    "failed": "Attempts that failed (a handler error or timeout)",
    "retried": "Failed attempts that were scheduled for a retry",
    "dead_lettered": "Tasks moved to the dead-letter queue (retries exhausted)",
    "cancelled": "Tasks cancelled",
}
STATE_COUNTERS: Final = (  # (metric, StateMachine.counters key, help): persisted, every node
    ("tq_lease_expiries", "lease_expired", "Leases that expired or whose worker was lost"),
    ("tq_workers_lost", "workers_lost", "Workers declared lost (connection closed or silent)"),
    ("tq_dead_letters_retried", "dlq_retried", "Dead-lettered tasks sent back to pending"),
    ("tq_dead_letters_purged", "dlq_purged", "Dead-lettered tasks deleted"),
    ("tq_tasks_expired", "expired_by_retention", "Finished tasks deleted by retention"),
)
TASK_SECONDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
DURABLE_SECONDS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_COMMANDS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
ROLES: Final = ("single", "leader", "follower", "candidate")

Key = tuple[str, ...]


class Histogram:
    """A histogram kept as plain lists (loop thread only), exported as a metric family."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.series: dict[Key, list[float]] = {}  # per bucket counts (+Inf last), then the sum

    def observe(self, key: Key, value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0.0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def family(self, name: str, doc: str, labels: Sequence[str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=labels)
        for key, series in self.series.items():
            buckets: list[tuple[str, float]] = []
            total = 0.0
            for bound, n in zip((*self.bounds, float("inf")), series, strict=False):
                total += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
            fam.add_metric(list(key), buckets, sum_value=series[-1])
        return fam


class BrokerMetrics:
    """The metrics of one broker. ``start()`` attaches the observer; ``render()`` is a scrape."""

    def __init__(self, core: BrokerCore, connections: Callable[[], tuple[int, int]]) -> None:
        self._core = core
        self._connections = connections  # () -> (connected workers, connected clients)
        self.registry = CollectorRegistry()
        self._counts: dict[str, dict[Key, int]] = {name: {} for name in TASK_COUNTERS}
        self._keys: set[Key] = set()
        self._wait = Histogram(TASK_SECONDS)
        self._run = Histogram(TASK_SECONDS)
        self._batch = Histogram(BATCH_COMMANDS)
        self._durable = Histogram(DURABLE_SECONDS)
        self._submitted = 0
        self._next_seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Attach to the core's state machine (after recovery) and register the collectors."""
        self._loop = asyncio.get_running_loop()
        self._submitted = self._core.sm.counters.get("submitted", 0)
        self._next_seq = self._core.sm.next_seq
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        self._core.sm.observers.append(self.observe)

    def stop(self) -> None:
        if self.observe in self._core.sm.observers:
            self._core.sm.observers.remove(self.observe)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- the apply hook --------------------------------------------------------------------------

    def observe(self, now_ms: int, commands: list[Command], result: ApplyResult) -> None:
        try:
            self._observe(now_ms, commands, result)
        except Exception:  # a metrics bug must never fail an apply
            log.exception("metrics.observe_failed", extra=kv(commands=len(commands)))

    def _observe(self, now_ms: int, commands: list[Command], result: ApplyResult) -> None:
        sm = self._core.sm
        submitted_before, self._submitted = self._submitted, sm.counters.get("submitted", 0)
        seq_before, self._next_seq = self._next_seq, sm.next_seq
        if not self._core.log.is_leader:
            return
        self._batch.observe((), len(commands))
        if not self._core.config.clustered and self._loop is not None:
            self._loop.call_soon(self._track_durable, time.monotonic())
        submits: list[Submit] = []
        failures: list[str] = []
        for cmd, value in zip(commands, result.results, strict=False):
            if isinstance(value, TqError):
                continue
            if isinstance(cmd, Submit):
                submits.append(cmd)
            elif isinstance(cmd, Claim):
                for leased in value:
                    task = leased.task
                    key = self._key(task.queue, task.name)
                    self._inc("claimed", key)
                    if task.attempt == 1:
                        self._wait.observe(key, max(0, now_ms - task.submitted_at_ms) / 1000)
            elif isinstance(cmd, Report):
                accepted = set(value[0])
                failures += [o.task_id for o in cmd.outcomes if not o.ok and o.task_id in accepted]
        if submits:
            self._count_submits(
                submits, sm.counters.get("submitted", 0) - submitted_before, seq_before
            )
        dead = self._count_finished(result.finished)
        for task_id in failures:
            failed = sm.get_task(task_id)
            if failed is None:
                continue
            key = self._key(failed.queue, failed.name)
            self._inc("failed", key)
            if task_id not in dead:
                self._inc("retried", key)
            self._run.observe(key, max(0, failed.finished_at_ms - failed.started_at_ms) / 1000)

    def _count_finished(self, finished: list[Task]) -> set[str]:
        """Count the tasks that reached a final state; returns the ids of the dead ones."""
        dead: set[str] = set()
        for task in finished:
            key = self._key(task.queue, task.name)
            if task.state == "completed":
                self._inc("completed", key)
                self._run.observe(key, max(0, task.finished_at_ms - task.started_at_ms) / 1000)
            elif task.state == "dead":
                self._inc("dead_lettered", key)
                dead.add(task.id)
            elif task.state == "cancelled":
                self._inc("cancelled", key)
        return dead

    def _count_submits(self, submits: list[Submit], added: int, seq_before: int) -> None:
        """Count the tasks the submits created. When the state machine's own counter grew by the
        number of specs, every spec made a task; otherwise some ids existed already, and a spec
        counts if it is the first of its id here and its task was numbered in this batch."""
        per_key: dict[tuple[str, str], int] = {}
        if added == sum(len(cmd.specs) for cmd in submits):
            for cmd in submits:
                for spec in cmd.specs:
                    k = (spec.queue, spec.name)
                    per_key[k] = per_key.get(k, 0) + 1
        else:
            seen: set[str] = set()
            for cmd in submits:
                for spec in cmd.specs:
                    if spec.id in seen:
                        continue
                    seen.add(spec.id)
                    task = self._core.sm.get_task(spec.id)
                    if task is not None and task.seq >= seq_before:
                        k = (spec.queue, spec.name)
                        per_key[k] = per_key.get(k, 0) + 1
        for (queue, name), n in per_key.items():
            self._inc("submitted", self._key(queue, name), n)

    def _track_durable(self, applied_at: float) -> None:
        self._core.after_durable(lambda: self._durable.observe((), time.monotonic() - applied_at))

    def _key(self, queue: str, name: str) -> Key:
        key = (queue, name)
        if key in self._keys:
            return key
        if len(self._keys) >= MAX_SERIES:
            return OVERFLOW
        self._keys.add(key)
        return key

    def _inc(self, counter: str, key: Key, n: int = 1) -> None:
        counts = self._counts[counter]
        counts[key] = counts.get(key, 0) + n

    # --- the collector ---------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        core = self._core
        sm = core.sm
        labels = ("queue", "task")
        for name, doc in TASK_COUNTERS.items():
            fam = CounterMetricFamily(f"tq_tasks_{name}", doc, labels=labels)
            for key, n in self._counts[name].items():
                fam.add_metric(list(key), n)
            yield fam
        yield self._wait.family("tq_task_wait_seconds", "From submit to the first claim", labels)
        yield self._run.family(
            "tq_task_run_seconds", "From claim to result, per reported attempt", labels
        )
        for metric, counter, doc in STATE_COUNTERS:
            yield CounterMetricFamily(metric, doc, value=sm.counters.get(counter, 0))
        states = GaugeMetricFamily("tq_tasks", "Tasks by state", labels=["state"])
        for state, n in sm.counts.items():
            states.add_metric([state], max(n, 0))
        yield states
        yield from self._queue_gauges()
        workers, clients = self._connections()
        yield GaugeMetricFamily(
            "tq_workers_connected", "Worker connections to this node", value=workers
        )
        yield GaugeMetricFamily(
            "tq_clients_connected", "Client connections to this node (TCP)", value=clients
        )
        yield self._batch.family(
            "tq_durable_write_commands", "Commands per applied (durably written) batch", ()
        )
        yield self._durable.family(
            "tq_durable_write_seconds",
            "From a batch's apply to its durable journal write (single node)",
            (),
        )
        yield CounterMetricFamily(
            "tq_wal_flushes",
            "Durable writes: journal writes or syncs (group commits)",
            value=core.log.flushes,
        )
        yield CounterMetricFamily(
            "tq_wal_flushed_commits",
            "Batches made durable by those writes",
            value=core.log.flushed_commits,
        )
        yield from self._cluster_gauges()
        info = GaugeMetricFamily(
            "tq_build_info", "tq version and node", labels=["version", "node_id"]
        )
        info.add_metric([__version__, core.node_id], 1)
        yield info

    def _queue_gauges(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "tq_queue_depth", "Ready tasks by queue and priority", labels=["queue", "priority"]
        )
        oldest = GaugeMetricFamily(
            "tq_queue_oldest_pending_age_seconds", "Age of the oldest ready task", labels=["queue"]
        )
        running = GaugeMetricFamily("tq_queue_running", "Running tasks", labels=["queue"])
        delayed = GaugeMetricFamily(
            "tq_queue_delayed", "Tasks waiting out a retry backoff", labels=["queue"]
        )
        paused = GaugeMetricFamily("tq_queue_paused", "1 if the queue is paused", labels=["queue"])
        left_out = GaugeMetricFamily(
            "tq_queues_left_out",
            "Queues with tasks that the per-queue series leave out (at most 1,000 are listed)",
        )
        now_ms = self._core.clock()
        sm = self._core.sm
        for queue, stats in sm.queue_stats().items():
            for priority in Priority:
                depth.add_metric([queue, priority.label], stats.pending.get(priority.label, 0))
            age = (now_ms - stats.oldest_pending_ms) / 1000 if stats.oldest_pending_ms else 0.0
            oldest.add_metric([queue], max(age, 0.0))
            running.add_metric([queue], stats.running)
            delayed.add_metric([queue], stats.delayed)
            paused.add_metric([queue], 1 if stats.paused else 0)
        left_out.add_metric([], sm.queues_left_out)
        yield from (depth, oldest, running, delayed, paused, left_out)

    def _cluster_gauges(self) -> Iterator[Metric]:
        status = self._core.log.status()
        role = str(status.get("role") or "single")
        roles = GaugeMetricFamily("tq_cluster_role", "1 for this node's role", labels=["role"])
        for name in dict.fromkeys((*ROLES, role)):
            roles.add_metric([name], 1 if name == role else 0)
        yield roles
        if not self._core.config.clustered:
            return
        term = status.get("term")
        commit = status.get("commit_index")
        applied = status.get("applied_index")
        quorum = status.get("has_quorum")
        for metric, doc, value in (
            ("tq_cluster_term", "Raft term", term),
            ("tq_cluster_commit_index", "Raft commit index", commit),
            ("tq_cluster_applied_index", "Last log entry applied here", applied),
            (
                "tq_cluster_apply_lag",
                "Committed entries not yet applied here",
                commit - applied if commit is not None and applied is not None else None,
            ),
            ("tq_cluster_has_quorum", "1 if this node hears from a majority", quorum),
        ):
            if value is not None:
                yield GaugeMetricFamily(metric, doc, value=max(float(value), 0.0))


__all__ = ["CONTENT_TYPE", "BrokerMetrics", "Histogram"]
