"""Commands: every change of broker state is one of these, applied by ``StateMachine.apply``.

They are msgspec structs because they cross process boundaries once replicated (a Raft entry is a
batch of them). Time is never read during apply: the batch carries ``now_ms``, stamped once by the
node that accepted it.
"""

from __future__ import annotations

import msgspec

from tq.config import DEFAULT_FRAME_LIMIT
from tq.model import RetryPolicy
from tq.protocol.messages import LeaseRef, Outcome, TaskSpec

# What one claim leases at most, in payload (and error) bytes, before it stops: a reply of eight
# 9.9 MB tasks was more than a client takes in one frame, the worker dropped the connection, the
# broker requeued the leases with the attempt counted, and the tasks died without running. The
# limit is on the command, so every replica applies a claim with the leader's budget. A client's
# frame limit takes a default frame and two payloads more, so a claim that stops once this half
# frame is reached (one task past it at most) always fits.
CLAIM_MAX_BYTES = DEFAULT_FRAME_LIMIT // 2


class _Cmd(msgspec.Struct, frozen=True, array_like=True, tag_field="c"):
    pass


class Submit(_Cmd, tag="submit", frozen=True):
    specs: list[TaskSpec]


class Claim(_Cmd, tag="claim", frozen=True):
    """Lease up to ``max`` ready tasks, and no more once their payloads add up to ``max_bytes``
    (always at least one)."""

    worker_id: str
    queues: list[str]
    max: int
    max_bytes: int = CLAIM_MAX_BYTES


class Report(_Cmd, tag="report", frozen=True):
    worker_id: str
    outcomes: list[Outcome]


class Extend(_Cmd, tag="extend", frozen=True):
    """A heartbeat: the worker is alive and still runs these leases."""

    worker_id: str
    leases: list[LeaseRef]


class RegisterWorker(_Cmd, tag="register", frozen=True):
    worker_id: str
    host: str = ""
    pid: int = 0
    concurrency: int = 0
    queues: list[str] = msgspec.field(default_factory=list)


class WorkerLost(_Cmd, tag="worker_lost", frozen=True):
    """The worker's connection closed: its leases go back to pending at once."""

    worker_id: str


class Release(_Cmd, tag="release", frozen=True):
    worker_id: str
    leases: list[LeaseRef]


class Cancel(_Cmd, tag="cancel", frozen=True):
    task_id: str


class Tick(_Cmd, tag="tick", frozen=True):
    """Expire leases and silent workers, fire retry timers that are due (all as of ``now_ms``)."""


class Retention(_Cmd, tag="retention", frozen=True):
    """Delete these finished tasks (completed, cancelled) if they finished before ``cutoff_ms``."""

    cutoff_ms: int
    task_ids: list[str]


class PauseQueue(_Cmd, tag="pause", frozen=True):
    """Stop (``paused``) or restart serving claims from a queue; submits are still accepted."""

    queue: str
    paused: bool


class RetryDead(_Cmd, tag="retry_dead", frozen=True):
    """Send these dead-lettered tasks back to pending with their attempts reset. The ids are
    chosen by the leader (filters are a read); applying the list is deterministic."""

    task_ids: list[str]


class PurgeDead(_Cmd, tag="purge_dead", frozen=True):
    """Delete these dead-lettered tasks for good."""

    task_ids: list[str]


class Announce(_Cmd, tag="announce", frozen=True):
    """A node that became leader tells every node its client address (for NOT_LEADER hints)."""

    raft_address: str
    client_address: str
    node_id: str = ""


Command = (
    Submit
    | Claim
    | Report
    | Extend
    | RegisterWorker
    | WorkerLost
    | Release
    | Cancel
    | Tick
    | Retention
    | Announce
    | PauseQueue
    | RetryDead
    | PurgeDead
)


class ApplySettings(msgspec.Struct, frozen=True, array_like=True):
    """The broker flags ``apply`` depends on (``--lease``, ``--heartbeat-timeout``,
    ``--retry-base``/``--retry-max``): a claim's lease deadline, and whether a later tick
    expires that lease, depend on them."""

    lease_ms: int
    heartbeat_timeout_ms: int
    retry: RetryPolicy


class CommandBatch(msgspec.Struct, frozen=True, array_like=True):
    """One log entry: everything one loop tick collected, stamped with the clock and the
    settings of the node that accepted it. Every replica, and every replay after a restart,
    applies it with those, not its own flags: a follower (or a restart) with another
    ``--lease`` would otherwise give a claim another deadline and diverge. (Entries written
    before ``settings`` existed have none: the applying node's own are used.)"""

    now_ms: int
    commands: list[Command]
    settings: ApplySettings | None = None
