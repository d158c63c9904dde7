"""Every message on the wire, as msgspec tagged structs (array-like: compact and fast).

Requests are imperative and carry ``rid``, a request id chosen by the sender, so many requests can
be in flight on one connection; every response echoes the ``rid`` it answers. ``rid`` 0 is reserved
for messages the broker sends unasked (a NACK for a frame it could not read).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from tq.model import ErrorInfo, Task

PROTOCOL_VERSION: Final = 1


class _Msg(msgspec.Struct, frozen=True, array_like=True, tag_field="t"):
    pass


# --- shared pieces -------------------------------------------------------------------------------


class TaskSpec(msgspec.Struct, frozen=True, array_like=True):
    """What a producer asks for; the broker stamps time, sequence and state when it applies it."""

    id: str
    name: str
    payload: bytes
    queue: str = "default"
    priority: int = 1
    max_retries: int = 3
    timeout_s: float = 300.0
    backoff_s: float = 0.0


class Outcome(msgspec.Struct, frozen=True, array_like=True):
    """One finished attempt as a worker reports it; ``token`` is the lease's fencing token."""

    task_id: str
    token: int
    ok: bool
    result: bytes | None = None
    error: ErrorInfo | None = None


class LeaseRef(msgspec.Struct, frozen=True, array_like=True):
    task_id: str
    token: int


class LeasedTask(msgspec.Struct, frozen=True, array_like=True):
    task: Task
    token: int
    lease_ms: int


class QueueStats(msgspec.Struct, frozen=True):
    pending: dict[str, int]
    running: int = 0
    delayed: int = 0
    oldest_pending_ms: int = 0
    paused: bool = False
    rate_in: float = 0.0  # tasks/s submitted, over the last minute
    rate_out: float = 0.0  # tasks/s completed, over the last minute


class WorkerInfo(msgspec.Struct, frozen=True):
    id: str
    host: str = ""
    pid: int = 0
    concurrency: int = 0
    queues: list[str] = msgspec.field(default_factory=list)
    running: int = 0
    done: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    last_heartbeat_ms: int = 0


class Stats(msgspec.Struct, frozen=True):
    states: dict[str, int]
    queues: dict[str, QueueStats]
    workers: list[WorkerInfo]
    version: str = ""
    node_id: str = ""
    uptime_s: float = 0.0
    counters: dict[str, int] = msgspec.field(default_factory=dict)
    cluster: dict[str, Any] = msgspec.field(default_factory=dict)


# --- requests ------------------------------------------------------------------------------------


class Hello(_Msg, tag="hello", frozen=True):
    rid: int
    version: int
    role: str = "client"
    client_id: str = ""
    token: str | None = None
    host: str = ""
    pid: int = 0
    concurrency: int = 0
    queues: list[str] = msgspec.field(default_factory=list)


class SubmitTask(_Msg, tag="submit", frozen=True):
    rid: int
    task: TaskSpec


class SubmitBatch(_Msg, tag="submit_batch", frozen=True):
    rid: int
    tasks: list[TaskSpec]


class ClaimTask(_Msg, tag="claim", frozen=True):
    """Lease up to ``max`` tasks; with ``wait_ms`` > 0 the broker parks the claim until a task is
    ready or the wait ends (long poll), so idle workers cost nothing and nobody sleeps."""

    rid: int
    queues: list[str]
    max: int = 1
    wait_ms: int = 0


class TaskResult(_Msg, tag="result", frozen=True):
    rid: int
    outcome: Outcome


class ResultBatch(_Msg, tag="result_batch", frozen=True):
    rid: int
    outcomes: list[Outcome]


class Heartbeat(_Msg, tag="heartbeat", frozen=True):
    """The worker is alive; the leases it lists are extended. The ACK's ``rejected`` names leases
    the broker no longer honours, so the worker can stop work that will be refused anyway."""

    rid: int
    leases: list[LeaseRef] = msgspec.field(default_factory=list)
    cpu_percent: float = 0.0
    rss_bytes: int = 0


class ReleaseTasks(_Msg, tag="release", frozen=True):
    """A worker hands back leased tasks it will not start (shutdown)."""

    rid: int
    leases: list[LeaseRef]


class QueryStatus(_Msg, tag="status", frozen=True):
    rid: int
    task_id: str


class WaitTask(_Msg, tag="wait", frozen=True):
    """Reply when the task reaches a final state (pushed by the broker) or after ``timeout_ms``."""

    rid: int
    task_id: str
    timeout_ms: int = 30_000


class ListTasks(_Msg, tag="list", frozen=True):
    rid: int
    state: str = "pending"
    queue: str | None = None
    name: str | None = None
    limit: int = 100
    after: str | None = None


class CancelTask(_Msg, tag="cancel", frozen=True):
    rid: int
    task_id: str


class GetStats(_Msg, tag="stats", frozen=True):
    rid: int


class PauseQueue(_Msg, tag="pause", frozen=True):
    """Pause (``paused`` true) or resume handing out a queue's tasks."""

    rid: int
    queue: str
    paused: bool = True


class DeadLetters(_Msg, tag="dlq", frozen=True):
    """List, retry or purge dead-lettered tasks: by ``task_ids``, or by the filters (queue, task
    name, error type, finished more than ``older_than_s`` ago). ``dry_run`` only reports which
    tasks would be affected. Replies: TaskListReply for ``list``, Ack(ids) otherwise."""

    rid: int
    op: str = "list"
    task_ids: list[str] = msgspec.field(default_factory=list)
    queue: str | None = None
    name: str | None = None
    error_type: str | None = None
    older_than_s: float | None = None
    dry_run: bool = False
    limit: int = 1000


class ClusterChange(_Msg, tag="cluster_change", frozen=True):
    """Add or remove a member (``op`` is "add" or "remove"; ``address`` its Raft host:port)."""

    rid: int
    op: str
    address: str


Request = (
    Hello
    | SubmitTask
    | SubmitBatch
    | ClaimTask
    | TaskResult
    | ResultBatch
    | Heartbeat
    | ReleaseTasks
    | QueryStatus
    | WaitTask
    | ListTasks
    | CancelTask
    | GetStats
    | ClusterChange
    | PauseQueue
    | DeadLetters
)


# --- responses -----------------------------------------------------------------------------------


class Welcome(_Msg, tag="welcome", frozen=True):
    rid: int
    version: int
    node_id: str = ""
    server: str = "tq"


class Ack(_Msg, tag="ack", frozen=True):
    """Success. ``ids`` are the task ids concerned (for a submit: in request order);
    ``rejected`` lists ``[task_id, code]`` for items of a batch the broker refused."""

    rid: int
    ids: list[str] = msgspec.field(default_factory=list)
    rejected: list[tuple[str, str]] = msgspec.field(default_factory=list)


class Nack(_Msg, tag="nack", frozen=True):
    rid: int
    code: str
    message: str
    leader: str | None = None


class Leased(_Msg, tag="leased", frozen=True):
    rid: int
    tasks: list[LeasedTask]


class TaskInfoReply(_Msg, tag="task", frozen=True):
    rid: int
    task: Task


class TaskListReply(_Msg, tag="tasks", frozen=True):
    rid: int
    tasks: list[Task]
    next: str | None = None


class StatsReply(_Msg, tag="stats_reply", frozen=True):
    rid: int
    stats: Stats


Response = Welcome | Ack | Nack | Leased | TaskInfoReply | TaskListReply | StatsReply

REQUEST_TYPES: Final[tuple[type[Any], ...]] = Request.__args__
RESPONSE_TYPES: Final[tuple[type[Any], ...]] = Response.__args__
