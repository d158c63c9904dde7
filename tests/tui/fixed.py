"""A broker link with fixed answers, for the snapshot tests: the same updates, tasks and clock
every run, so the screens render identically. It implements ``tq.tui.link.BrokerLink`` (our own
Protocol), like ``AsyncClient`` does; nothing here talks to a network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tq.client import TaskInfo
from tq.errors import InvalidState, TaskNotFound
from tq.model import ErrorInfo
from tq.protocol.messages import QueueStats, Stats, TaskEvent, WatchUpdate, WorkerInfo

T0 = 1_750_000_000_000  # the broker's clock at the first update (ms)
STEP_MS = 500
UPDATES = 60

TRACEBACK = """Traceback (most recent call last):
  File "/srv/app/handlers.py", line 42, in send_invoice
    raise ValueError("customer 1234 has no e-mail address")
ValueError: customer 1234 has no e-mail address"""


def _task(n: int, state: str, **kw: Any) -> TaskInfo:
    fields: dict[str, Any] = {
        "id": f"0197a1b2c3d4a1b2c3d4{n:010x}",
        "name": "emails.send",
        "queue": "emails",
        "priority": "normal",
        "state": state,
        "attempt": 0,
        "max_retries": 3,
        "timeout_s": 300.0,
        "submitted_at_ms": T0 - 60_000 + n * 1000,
        "started_at_ms": 0,
        "finished_at_ms": 0,
        "eta_ms": 0,
        "worker_id": "",
        "result": None,
        "error": None,
        "payload": {"to": f"user{n}@example.com", "template": "welcome"},
    }
    fields.update(kw)
    return TaskInfo(**fields)


def _rate(i: int, base: float) -> float:
    """A rate that climbs over the five minutes and wobbles a little: sparklines with a shape."""
    return round(base * (0.15 + 0.85 * i / UPDATES + ((i * 7) % 5) / 20), 2)


def single_node_stats(i: int, at_ms: int) -> Stats:
    return Stats(
        states={
            "pending": 31,
            "running": 5,
            "completed": 18_204,
            "failed": 2,
            "dead": 3,
            "cancelled": 1,
        },
        queues={
            "default": QueueStats(
                {"high": 2, "normal": 12, "low": 0},
                running=3,
                oldest_pending_ms=at_ms - 4_200,
                rate_in=_rate(i, 40.0),
                rate_out=_rate(i + 3, 38.0),
            ),
            "emails": QueueStats(
                {"high": 0, "normal": 9, "low": 4},
                running=2,
                delayed=2,
                oldest_pending_ms=at_ms - 95_000,
                rate_in=_rate(i, 3.0),
                rate_out=_rate(i + 5, 2.5),
            ),
            "reports": QueueStats(
                {"high": 0, "normal": 0, "low": 4},
                oldest_pending_ms=at_ms - 3_725_000,
                paused=True,
                rate_in=0.2,
            ),
        },
        workers=[
            WorkerInfo(
                "web-1-4121-a3f0",
                "web-1",
                4121,
                8,
                ["default", "emails"],
                3,
                9_120,
                37.5,
                84 * 2**20,
                at_ms - 800,
            ),
            WorkerInfo(
                "web-2-977-0b1c",
                "web-2",
                977,
                8,
                ["default", "emails"],
                8,
                9_080,
                96.0,
                131 * 2**20,
                at_ms - 1_500,
            ),
            WorkerInfo(
                "batch-1-33-77aa",
                "batch-1",
                33,
                2,
                ["reports"],
                0,
                4,
                0.0,
                52 * 2**20,
                at_ms - 9_300,
            ),
        ],
        version="0.1.0",
        node_id="n1",
        uptime_s=3_845.2,
        cluster={"role": "single"},
    )


def cluster_stats(i: int, at_ms: int) -> Stats:
    base = single_node_stats(i, at_ms)
    return Stats(
        base.states,
        base.queues,
        base.workers,
        base.version,
        "n1",
        base.uptime_s,
        cluster={
            "node_id": "n1",
            "raft_address": "10.0.0.1:7800",
            "client_address": "tcp://10.0.0.1:7700",
            "role": "leader",
            "leader": "10.0.0.1:7800",
            "leader_client": "tcp://10.0.0.1:7700",
            "term": 7,
            "commit_index": 48_213,
            "applied_index": 48_213,
            "has_quorum": True,
            "peers": {
                "10.0.0.2:7800": {"connected": True, "match_index": 48_210},
                # down for the last 20 updates (10 s)
                "10.0.0.3:7800": {"connected": i < UPDATES - 20, "match_index": 47_001},
            },
        },
    )


EVENTS = [
    TaskEvent("submitted", "0197a1b2c3d4a1b2c3d40000000031", "emails.send", "emails", 0),
    TaskEvent(
        "started",
        "0197a1b2c3d4a1b2c3d40000000007",
        "reports.build",
        "default",
        0,
        1,
        "web-1-4121-a3f0",
    ),
    TaskEvent(
        "progress",
        "0197a1b2c3d4a1b2c3d40000000007",
        "reports.build",
        "default",
        0,
        1,
        "web-1-4121-a3f0",
        "67% step 2 of 3",
    ),
    TaskEvent(
        "completed",
        "0197a1b2c3d4a1b2c3d40000000005",
        "emails.send",
        "emails",
        0,
        1,
        "web-2-977-0b1c",
    ),
    TaskEvent(
        "failed",
        "0197a1b2c3d4a1b2c3d40000000006",
        "emails.send",
        "emails",
        0,
        1,
        "web-2-977-0b1c",
        "TimeoutError: smtp did not answer",
    ),
    TaskEvent(
        "dead",
        "0197a1b2c3d4a1b2c3d40000000003",
        "emails.send",
        "emails",
        0,
        4,
        "web-1-4121-a3f0",
        "ValueError: customer 1234 has no e-mail address",
    ),
]


class FixedLink:
    """``BrokerLink`` with canned answers. ``cluster=True`` reports a three-node cluster."""

    def __init__(self, *, cluster: bool = False) -> None:
        self.cluster = cluster
        dead_error = ErrorInfo("ValueError", "customer 1234 has no e-mail address", TRACEBACK)
        self.tasks: dict[str, list[TaskInfo]] = {
            "pending": [_task(n, "pending") for n in range(20, 32)],
            "running": [
                _task(
                    7,
                    "running",
                    name="reports.build",
                    queue="default",
                    attempt=1,
                    started_at_ms=T0 + 2_000,
                    worker_id="web-1-4121-a3f0",
                ),
            ],
            "completed": [
                _task(
                    5,
                    "completed",
                    attempt=1,
                    started_at_ms=T0 - 40_000,
                    finished_at_ms=T0 - 39_000,
                    worker_id="web-2-977-0b1c",
                    result={"sent": True, "message_id": "<a1@example.com>"},
                ),
            ],
            "failed": [],
            "dead": [
                _task(
                    n,
                    "dead",
                    attempt=4,
                    started_at_ms=T0 - 20_000 + n,
                    finished_at_ms=T0 - 19_000 + n * 1000,
                    worker_id="web-1-4121-a3f0",
                    error=dead_error,
                )
                for n in (1, 2, 3)
            ],
            "cancelled": [],
        }
        self.actions: list[tuple[str, Any]] = []

    async def watch(
        self, *, events: bool = True, interval_s: float = 0.5, buffer: int = 256
    ) -> AsyncIterator[WatchUpdate]:
        for i in range(UPDATES):
            at_ms = T0 + i * STEP_MS
            stats = cluster_stats(i, at_ms) if self.cluster else single_node_stats(i, at_ms)
            evs = (
                [
                    TaskEvent(
                        e.kind, e.task_id, e.name, e.queue, at_ms, e.attempt, e.worker_id, e.detail
                    )
                    for e in EVENTS
                ]
                if i == UPDATES - 1
                else []
            )
            yield WatchUpdate(1, stats, evs, 0, 0, at_ms)
        await asyncio.Event().wait()  # a quiet broker from now on

    async def list_page(
        self,
        state: str = "pending",
        *,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> tuple[list[TaskInfo], str | None]:
        tasks = [
            t
            for t in self.tasks.get(state, [])
            if (queue is None or t.queue == queue) and (name is None or t.name == name)
        ]
        return tasks[:limit], None

    async def status(self, task_id: str) -> TaskInfo:
        for tasks in self.tasks.values():
            for t in tasks:
                if t.id == task_id:
                    return t
        raise TaskNotFound(f"no task {task_id}")

    async def cancel(self, task_id: str) -> TaskInfo:
        t = await self.status(task_id)
        raise InvalidState(f"task {task_id} is {t.state}; only pending or failed can be cancelled")

    async def pause_queue(self, queue: str) -> None:
        self.actions.append(("pause", queue))

    async def resume_queue(self, queue: str) -> None:
        self.actions.append(("resume", queue))

    async def dead_letters(
        self,
        *,
        queue: str | None = None,
        name: str | None = None,
        error_type: str | None = None,
        older_than_s: float | None = None,
        limit: int = 1000,
    ) -> list[TaskInfo]:
        return self.tasks["dead"][:limit]

    async def retry_dead(self, task_ids: list[str] | None = None, **kw: Any) -> list[str]:
        self.actions.append(("retry", task_ids))
        return list(task_ids or [])

    async def purge_dead(self, task_ids: list[str] | None = None, **kw: Any) -> list[str]:
        self.actions.append(("purge", task_ids))
        return list(task_ids or [])

    async def close(self) -> None:
        pass
