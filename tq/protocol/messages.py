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


class TaskEvent(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Something that happened to a task, as a watcher sees it. ``kind`` is one of submitted,
    started, progress, completed, failed (an attempt failed, a retry is scheduled), dead,
    cancelled, retried (brought back from the dead-letter queue).

    ``gc=False``: only scalars inside, so no cycles; untracked, hundreds of events made at once
    do not push the broker into a garbage collection (measured: most of the watch cost)."""

    kind: str
    task_id: str
    name: str = ""
    queue: str = ""
    at_ms: int = 0
    attempt: int = 0
    worker_id: str = ""
    detail: str = ""  # the error ("Type: message") or the progress message


class HistoryRow(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One finished task as ``tq export`` writes it (payload and result as sizes only)."""

    id: str
    name: str
    queue: str
    priority: int
    state: str
    attempts: int
    worker: str
    submitted_at_ms: int
    started_at_ms: int
    finished_at_ms: int
    error_type: str
    error_message: str
    payload_bytes: int
    result_bytes: int


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


class Ping(_Msg, tag="ping", frozen=True):
    """Are you there? Answered with an ``Ack`` at once. A client whose requests have heard
    nothing for a while asks, to tell a hung broker (a stopped process, whose kernel still takes
    the bytes) from a busy one, without waiting out each request's whole timeout."""

    rid: int


class QueryStatus(_Msg, tag="status", frozen=True):
    rid: int
    task_id: str


class WaitTask(_Msg, tag="wait", frozen=True):
    """Reply when the task reaches a final state (pushed by the broker) or after ``timeout_ms``."""

    rid: int
    task_id: str
    timeout_ms: int = 30_000


class Unwait(_Msg, tag="unwait", frozen=True):
    """The sender no longer wants the answer to its wait ``wait_rid``: the broker ends it without
    a reply. A wait costs the broker memory and a timer, and counts against the per-connection
    cap, until it is answered; a client that gives up on one (a cancelled ``wait``) says so."""

    rid: int
    wait_rid: int


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
    after: str | None = None  # ``list``: continue after this id (the last reply's ``next``)


class ClusterChange(_Msg, tag="cluster_change", frozen=True):
    """Add or remove a member (``op`` is "add" or "remove"; ``address`` its Raft host:port)."""

    rid: int
    op: str
    address: str


class Watch(_Msg, tag="watch", frozen=True):
    """Subscribe to live state: the broker acknowledges, then pushes WatchUpdate messages under
    this ``rid`` (a snapshot at most every ``interval_ms``; task events, if ``events``, coalesced
    about every 100 ms) until the connection closes or an Unwatch names this ``rid``."""

    rid: int
    events: bool = True
    interval_ms: int = 500


class Unwatch(_Msg, tag="unwatch", frozen=True):
    rid: int
    watch_rid: int


class Progress(_Msg, tag="progress", frozen=True):
    """A worker reports how far a running task has got (``fraction`` 0..1 and/or a message). Not
    replicated or stored: it is shown to watchers and in the task's status while it runs."""

    rid: int
    task_id: str
    token: int
    fraction: float = -1.0
    message: str = ""


class ExportTasks(_Msg, tag="export", frozen=True):
    """A page of finished tasks for ``tq export``: the given states, optionally one queue and a
    ``finished_at`` window [since_ms, until_ms) (0 = unbounded); ``after`` is the previous
    page's cursor."""

    rid: int
    states: list[str] = msgspec.field(
        default_factory=lambda: ["completed", "failed", "dead", "cancelled"]
    )
    queue: str | None = None
    since_ms: int = 0
    until_ms: int = 0
    limit: int = 10_000
    after: str | None = None


Request = (
    Hello
    | SubmitTask
    | SubmitBatch
    | ClaimTask
    | TaskResult
    | ResultBatch
    | Heartbeat
    | ReleaseTasks
    | Ping
    | QueryStatus
    | WaitTask
    | Unwait
    | ListTasks
    | CancelTask
    | GetStats
    | ClusterChange
    | PauseQueue
    | DeadLetters
    | Watch
    | Unwatch
    | Progress
    | ExportTasks
)


# --- responses -----------------------------------------------------------------------------------


class Welcome(_Msg, tag="welcome", frozen=True):
    """The answer to ``hello``. ``heartbeat_timeout_ms``: how long this broker lets a worker stay
    silent before declaring it lost; ``lease_ms``: how long a lease lasts unless a heartbeat
    extends it (0: not said). A worker fits its heartbeat interval to both. ``max_frame_bytes``:
    what a client must not send more than (a bigger frame closes the connection)."""

    rid: int
    version: int
    node_id: str = ""
    server: str = "tq"
    heartbeat_timeout_ms: int = 0
    lease_ms: int = 0
    max_frame_bytes: int = 0  # the largest frame body this broker takes (--max-frame)


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


class WatchUpdate(_Msg, tag="watch_update", frozen=True):
    """Pushed to a watcher. ``stats`` is set when a snapshot is due; ``events`` are the task events
    since the last update, newest last, at most a few hundred: under load the rest are counted in
    ``coalesced``. ``dropped`` counts events a slow reader lost (its socket was backed up)."""

    rid: int
    stats: Stats | None = None
    events: list[TaskEvent] = msgspec.field(default_factory=list)
    coalesced: int = 0
    dropped: int = 0
    at_ms: int = 0


class ExportReply(_Msg, tag="export_reply", frozen=True):
    rid: int
    rows: list[HistoryRow]
    next: str | None = None


Response = (
    Welcome
    | Ack
    | Nack
    | Leased
    | TaskInfoReply
    | TaskListReply
    | StatsReply
    | WatchUpdate
    | ExportReply
)

REQUEST_TYPES: Final[tuple[type[Any], ...]] = Request.__args__
RESPONSE_TYPES: Final[tuple[type[Any], ...]] = Response.__args__
