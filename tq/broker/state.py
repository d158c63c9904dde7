"""The deterministic state machine: the heart of the broker.

``apply(now_ms, commands)`` is the only way state changes. It reads no clock, no randomness and no
network; given the same store contents and the same batches it produces the same store contents
and the same results, which is what lets one code path run single-node (group commit) and
replicated (Raft), and lets tests replay a history. Apply never raises: a command that cannot be
applied yields a ``TqError`` as its result and the batch still applies.

Memory holds only small indexes; task records live in the store:

- ready tasks: per queue and priority an ``array('Q')`` of pending sequence numbers (~8 bytes a
  task, where a tuple in a heap costs 120-200);
- leases of running tasks (bounded by the workers' concurrency), with their fencing token;
- a heap of retry timers for tasks in ``failed`` (waiting out their backoff);
- registered workers and their last heartbeat.
"""

from __future__ import annotations

import heapq
import logging
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from tq.broker.commands import (
    Announce,
    ApplySettings,
    Cancel,
    Claim,
    Command,
    Extend,
    PauseQueue,
    PurgeDead,
    RegisterWorker,
    Release,
    Report,
    Retention,
    RetryDead,
    Submit,
    Tick,
    WorkerLost,
)
from tq.errors import InvalidState, LeaseLost, TaskNotFound, TqError
from tq.logfields import kv
from tq.model import ErrorInfo, Priority, RetryPolicy, Task, TaskState
from tq.protocol.messages import (
    HistoryRow,
    LeasedTask,
    LeaseRef,
    Outcome,
    QueueStats,
    TaskSpec,
    WorkerInfo,
)
from tq.store import CF, Batch, Store, StoreError, pending_key, split_pending_key
from tq.store.keys import pending_prefix, pending_runs

log = logging.getLogger("tq.broker.state")

_enc = msgspec.msgpack.Encoder()
_task_dec = msgspec.msgpack.Decoder(Task)

# Plain aliases: attribute access on an Enum class is slow enough to show on the hot path.
PENDING: Final[str] = TaskState.PENDING.value
RUNNING: Final[str] = TaskState.RUNNING.value
COMPLETED: Final[str] = TaskState.COMPLETED.value
FAILED: Final[str] = TaskState.FAILED.value
DEAD: Final[str] = TaskState.DEAD.value
CANCELLED: Final[str] = TaskState.CANCELLED.value
CF_PENDING: Final = CF.PENDING
CF_IN_PROGRESS: Final = CF.IN_PROGRESS
CF_IDS: Final = CF.IDS

_TERMINAL_CF: Final[dict[str, CF]] = {
    TaskState.FAILED: CF.FAILED,
    TaskState.COMPLETED: CF.COMPLETED,
    TaskState.DEAD: CF.DEAD_LETTER,
    TaskState.CANCELLED: CF.CANCELLED,
}
_PRIORITIES: Final = tuple(int(p) for p in Priority)
_RETENTION_CFS: Final = (CF.COMPLETED, CF.CANCELLED)  # what retention deletes, scanned in order
# Where a retention scan resumes: the column family and the key to start at in it.
RetentionCursor = tuple[CF, bytes]
_LOOKUP_ORDER: Final = (CF.COMPLETED, CF.FAILED, CF.DEAD_LETTER, CF.CANCELLED)
_FINAL_STATES: Final = frozenset({TaskState.COMPLETED, TaskState.DEAD, TaskState.CANCELLED})
_PERSISTED_COUNTS: Final = frozenset({TaskState.COMPLETED, TaskState.DEAD, TaskState.CANCELLED})
_SEQ: Final = struct.Struct(">BQ")
UNLISTED_GRACE_MS: Final = 5_000  # a lease a heartbeat omits is released after this long
_ROW_BYTES: Final = 64  # what an export row's numbers and framing take, besides its strings
MAX_STATS_QUEUES: Final = 1_000  # queues listed in stats at most (the busiest; see queue_stats)


class LeaseMark(msgspec.Struct, frozen=True, array_like=True):
    """What ``in_progress`` holds for a running task. The task record itself stays in
    ``pending`` while it runs, so a claim writes this small marker instead of moving the record,
    and a crash leaves running tasks exactly where a restart must put them: pending.

    The deadline is stored (and rewritten by every extend) because a Tick decides by it: a
    replica that restarts must come back with the very leases the others still hold, or the next
    Tick expires on it what the others keep, and the replicas diverge. Marks written before the
    field existed decode with 0: already expired, as every restart used to treat them."""

    key: bytes
    attempt: int
    started_at_ms: int
    worker_id: str
    token: int
    deadline_ms: int = 0


_mark_dec = msgspec.msgpack.Decoder(LeaseMark)


def _error_bytes(error: ErrorInfo | None) -> int:
    """About what an error adds to a reply: its text's length (in characters, near enough)."""
    if error is None:
        return 0
    return len(error.type) + len(error.message) + len(error.traceback)


class WorkerRecord(msgspec.Struct, frozen=True, array_like=True):
    """A worker as ``meta`` keeps it (key ``worker:<id>``), written whenever an apply touches
    it. Ticks and heartbeats decide by the worker table (who has been silent too long, which
    leases a worker holds), so it is state like any other: kept in the store, a restarted
    replica has the table the others have. Its leases are not stored twice: recovery reads them
    from the marks."""

    last_seen_ms: int
    host: str = ""
    pid: int = 0
    concurrency: int = 0
    queues: list[str] = msgspec.field(default_factory=list)
    done: int = 0


_worker_dec = msgspec.msgpack.Decoder(WorkerRecord)
WORKER_PREFIX: Final = b"worker:"


class ReadyQueue:
    """FIFO of pending sequence numbers per priority, with lazy removal for cancelled tasks."""

    __slots__ = ("arrays", "dead", "dead_counts", "heads")

    def __init__(self) -> None:
        self.arrays = [array("Q") for _ in _PRIORITIES]
        self.heads = [0 for _ in _PRIORITIES]
        self.dead: set[int] = set()
        self.dead_counts = [0 for _ in _PRIORITIES]

    def cancel(self, priority: int, seq: int) -> None:
        self.dead.add(seq)
        self.dead_counts[priority] += 1

    def push(self, priority: int, seq: int) -> None:
        self.arrays[priority].append(seq)

    def pop(self, priority: int) -> int | None:
        arr = self.arrays[priority]
        head = self.heads[priority]
        dead = self.dead
        while head < len(arr):
            seq = arr[head]
            head += 1
            if dead and seq in dead:
                dead.discard(seq)
                self.dead_counts[priority] -= 1
                continue
            self._advance(priority, head)
            return seq
        self._advance(priority, head)
        return None

    def _advance(self, priority: int, head: int) -> None:
        arr = self.arrays[priority]
        if head >= 4096 and head * 2 >= len(arr):
            del arr[:head]
            head = 0
        self.heads[priority] = head

    def count(self, priority: int) -> int:
        return len(self.arrays[priority]) - self.heads[priority] - self.dead_counts[priority]

    def peek(self, priority: int) -> int | None:
        arr = self.arrays[priority]
        for i in range(self.heads[priority], len(arr)):
            if arr[i] not in self.dead:
                return arr[i]
        return None

    def total(self) -> int:
        return sum(self.count(p) for p in _PRIORITIES)


@dataclass(slots=True)
class Lease:
    task: Task
    token: int
    worker_id: str
    deadline_ms: int
    key: bytes  # the task's record in ``pending``


@dataclass(slots=True)
class WorkerState:
    id: str
    host: str = ""
    pid: int = 0
    concurrency: int = 0
    queues: list[str] = field(default_factory=list)
    last_seen_ms: int = 0
    done: int = 0
    leases: set[str] = field(default_factory=set)


ApplyObserver = Callable[[int, "list[Command]", "ApplyResult"], None]


@dataclass(slots=True)
class ApplyResult:
    """Per-command results (a value or a TqError) and the tasks that reached a final state."""

    results: list[Any]
    finished: list[Task]
    readied: bool
    lost_workers: list[str] = field(default_factory=list)


class StateMachine:
    def __init__(
        self,
        store: Store,
        *,
        lease_ms: int = 30_000,
        heartbeat_timeout_ms: int = 10_000,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.store = store
        self.lease_ms = lease_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.retry = retry or RetryPolicy()
        self.ready: dict[str, ReadyQueue] = {}
        self.leases: dict[str, Lease] = {}
        self.workers: dict[str, WorkerState] = {}
        self.timers: list[tuple[int, str]] = []  # (eta_ms, task_id) of tasks in `failed`
        self.counts: dict[str, int] = {s.value: 0 for s in TaskState}
        self.counters: dict[str, int] = {}
        self.next_seq = 1
        self.next_token = 1
        self.applied_index = 0  # the last replicated log entry applied (cluster mode)
        self.max_id = b""  # no stored task id is greater (ids CF keys; see _known_ids)
        self.nodes: dict[str, str] = {}  # raft address -> client address, from Announce
        self.paused: set[str] = set()  # queues whose tasks are not handed out
        # See every applied batch, on every node: metrics (tq/broker/metrics.py) and watchers
        # (tq/broker/watch.py). An observer must not raise and must not change state.
        self.observers: list[ApplyObserver] = []
        # per queue, since start: tasks submitted and completed (in memory only; for rates)
        self.queue_in: dict[str, int] = {}
        self.queue_out: dict[str, int] = {}
        # per-apply scratch
        self._batch: Batch | None = None
        self._finished: list[Task] = []
        self._readied = False
        self._lost: list[str] = []
        self._mirror = True
        self._touched_workers: set[str] = set()  # workers to write back at the end of the apply
        self.delayed: dict[str, int] = {}  # queue -> tasks in `failed` waiting for a retry
        self.queues_left_out = 0  # what the last queue_stats() did not list (read side only)

    def reset(self) -> None:
        """Forget every in-memory index (before ``recover()`` from a store replaced by a
        snapshot)."""
        self.ready.clear()
        self.leases.clear()
        self.workers.clear()
        self.timers.clear()
        self.delayed.clear()
        self.counts = {s.value: 0 for s in TaskState}
        self.counters.clear()
        self.nodes.clear()
        self.paused.clear()
        self.next_seq = 1
        self.next_token = 1
        self.applied_index = 0
        self.max_id = b""
        self._touched_workers.clear()

    # --- recovery --------------------------------------------------------------------------------

    def recover(self) -> None:
        """Rebuild every in-memory index from the store. Pending keys are scanned without their
        values; only running and retry-waiting tasks (few) are decoded.

        Everything a command's outcome depends on comes back as it was, lease deadlines and the
        worker table included: a restarted Raft replica then applies the next entries exactly as
        the replicas that never stopped do, and a single node's workers keep their leases across
        a quick broker restart."""
        store = self.store
        running_keys: set[bytes] = set()
        for _key, value in store.items(CF.IN_PROGRESS):
            mark = _mark_dec.decode(value)
            raw = store.get(CF.PENDING, mark.key)
            if raw is None:
                continue
            task = msgspec.structs.replace(
                _task_dec.decode(raw),
                state=TaskState.RUNNING,
                attempt=mark.attempt,
                started_at_ms=mark.started_at_ms,
                worker_id=mark.worker_id,
            )
            self.leases[task.id] = Lease(
                task, mark.token, mark.worker_id, mark.deadline_ms, mark.key
            )
            running_keys.add(mark.key)
        max_seq = 0
        pending = 0
        for queue, priority, seqs in pending_runs(store.scan_keys(CF.PENDING)):
            max_seq = max(max_seq, max(seqs))
            self._ready(queue).arrays[priority].extend(seqs)
            pending += len(seqs)
        # A running task's record stays in pending beside its lease mark: not in a ready line.
        running: dict[tuple[str, int], set[int]] = {}
        for key in running_keys:
            queue, priority, seq = split_pending_key(key)
            running.setdefault((queue, priority), set()).add(seq)
        for (queue, priority), skip in running.items():
            rq = self._ready(queue)
            arr = rq.arrays[priority]
            kept = array("Q", [seq for seq in arr if seq not in skip])
            pending -= len(arr) - len(kept)
            rq.arrays[priority] = kept
        self.counts[TaskState.PENDING] = pending
        self.counts[TaskState.RUNNING] = len(self.leases)
        for _key, value in store.items(CF.FAILED):
            task = _task_dec.decode(value)
            heapq.heappush(self.timers, (task.eta_ms, task.id))
            self.delayed[task.queue] = self.delayed.get(task.queue, 0) + 1
        self._recover_meta()
        for task_id, lease in self.leases.items():
            worker = self.workers.get(lease.worker_id)
            if worker is None:
                # A store written before workers were stored: a worker unheard of since epoch 0,
                # so the first Tick declares it lost and requeues its leases (as restarts did
                # then), the same on every replica; a heartbeat meanwhile finds it and its leases.
                worker = self.workers[lease.worker_id] = WorkerState(lease.worker_id)
            worker.leases.add(task_id)
        self.counts[TaskState.FAILED] = len(self.timers)
        self.next_seq = max(self.next_seq, max_seq + 1)
        self.max_id = next(store.keys(CF_IDS, backwards=True), b"")

    def _recover_meta(self) -> None:
        for key, value in self.store.items(CF.META):
            name = key.decode()
            if key.startswith(WORKER_PREFIX):
                rec = _worker_dec.decode(value)
                worker_id = name[len(WORKER_PREFIX) :]
                self.workers[worker_id] = WorkerState(
                    worker_id,
                    rec.host,
                    rec.pid,
                    rec.concurrency,
                    list(rec.queues),
                    rec.last_seen_ms,
                    rec.done,
                )
                continue
            number = int.from_bytes(value, "big")
            if name == "next_seq":
                self.next_seq = number
            elif name == "next_token":
                self.next_token = number
            elif name.startswith("count:"):
                self.counts[name[6:]] = number
            elif name.startswith("counter:"):
                self.counters[name[8:]] = number
            elif name == "applied_index":
                self.applied_index = number
            elif name.startswith("node:"):
                self.nodes[name[5:]] = value.decode()
            elif name.startswith("paused:"):
                self.paused.add(name[7:])

    @property
    def settings(self) -> ApplySettings:
        return ApplySettings(self.lease_ms, self.heartbeat_timeout_ms, self.retry)

    @settings.setter
    def settings(self, value: ApplySettings) -> None:
        self.lease_ms = value.lease_ms
        self.heartbeat_timeout_ms = value.heartbeat_timeout_ms
        self.retry = value.retry

    # --- apply -----------------------------------------------------------------------------------

    def apply(
        self, now_ms: int, commands: Iterable[Command], applied_index: int | None = None
    ) -> ApplyResult:
        """Apply one batch. With ``applied_index`` (a replicated log entry) the index is recorded
        in the same write, so a replay after a restart skips exactly what is already applied."""
        if not isinstance(commands, list):
            commands = list(commands)
        batch = self.store.batch()
        self._batch = batch
        self._finished = []
        self._readied = False
        self._lost = []
        counts_before = dict(self.counts)
        counters_before = dict(self.counters)
        seq_before, token_before = self.next_seq, self.next_token
        results: list[Any] = []
        last = len(commands) - 1
        for i, cmd in enumerate(commands):
            # Later commands of this batch may read what this one writes (a submit then a claim
            # in one tick): only then must a submit mirror its writes in the batch's overlay.
            self._mirror = i < last
            try:
                results.append(self._apply_one(now_ms, cmd))
            except StoreError:
                # Not this command's failure: the disk's. Memory may already have changed for
                # it, so nothing after it can be trusted; the log makes it fatal.
                raise
            except TqError as exc:
                results.append(exc)
            except Exception as exc:  # apply must never raise: record and go on
                log.exception("state.apply_failed", extra=kv(command=type(cmd).__name__))
                results.append(TqError(f"internal error applying {type(cmd).__name__}: {exc}"))
        self._write_meta(batch, counts_before, counters_before, seq_before, token_before)
        if applied_index is not None:
            self.applied_index = applied_index
            batch.put(CF.META, b"applied_index", applied_index.to_bytes(8, "big"))
        self.store.write(batch)
        self._batch = None
        result = ApplyResult(results, self._finished, self._readied, self._lost)
        for observer in self.observers:
            try:
                observer(now_ms, commands, result)
            except Exception:  # what is applied stays applied: an observer bug costs only itself
                log.exception("state.observer_failed", extra=kv(observer=repr(observer)))
        return result

    def _apply_one(self, now: int, cmd: Command) -> Any:
        match cmd:
            case Submit(specs):
                return self._submit(now, specs)
            case Claim(worker_id, queues, n, max_bytes):
                return self._claim(now, worker_id, queues, n, max_bytes)
            case Report(worker_id, outcomes):
                return self._report(now, worker_id, outcomes)
            case Extend(worker_id, leases):
                return self._extend(now, worker_id, leases)
            case RegisterWorker():
                return self._register(now, cmd)
            case WorkerLost(worker_id):
                return self._worker_lost(now, worker_id)
            case Release(worker_id, leases):
                return self._release(now, worker_id, leases)
            case Cancel(task_id):
                return self._cancel(now, task_id)
            case Tick():
                return self._tick(now)
            case Retention(cutoff_ms, task_ids):
                return self._retention(cutoff_ms, task_ids)
            case PauseQueue(queue, paused):
                return self._pause(queue, paused)
            case RetryDead(task_ids):
                return self._retry_dead(now, task_ids)
            case PurgeDead(task_ids):
                return self._purge_dead(task_ids)
            case Announce(raft_address, client_address):
                self.nodes[raft_address] = client_address
                assert self._batch is not None
                self._batch.put(CF.META, f"node:{raft_address}".encode(), client_address.encode())
                return None
        raise TqError(f"unknown command {type(cmd).__name__}")

    def _write_meta(
        self,
        batch: Batch,
        counts: dict[str, int],
        counters: dict[str, int],
        seq: int,
        token: int,
    ) -> None:
        meta = CF.META
        if self.next_seq != seq:
            batch.put(meta, b"next_seq", self.next_seq.to_bytes(8, "big"))
        if self.next_token != token:
            batch.put(meta, b"next_token", self.next_token.to_bytes(8, "big"))
        for state, n in self.counts.items():
            if counts.get(state) != n and state in _PERSISTED_COUNTS:
                batch.put(meta, f"count:{state}".encode(), max(n, 0).to_bytes(8, "big"))
        for name, n in self.counters.items():
            if counters.get(name) != n:
                batch.put(meta, f"counter:{name}".encode(), n.to_bytes(8, "big"))
        if self._touched_workers:
            for worker_id in sorted(self._touched_workers):
                key = WORKER_PREFIX + worker_id.encode()
                w = self.workers.get(worker_id)
                if w is None:
                    batch.delete(meta, key)
                else:
                    record = WorkerRecord(
                        w.last_seen_ms, w.host, w.pid, w.concurrency, w.queues, w.done
                    )
                    batch.put(meta, key, _enc.encode(record))
            self._touched_workers.clear()

    # --- helpers ---------------------------------------------------------------------------------

    def _ready(self, queue: str) -> ReadyQueue:
        rq = self.ready.get(queue)
        if rq is None:
            rq = self.ready[queue] = ReadyQueue()
        return rq

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _finish(self, lease: Lease, task: Task) -> None:
        """A running task leaves ``pending`` for good (completed, failed or dead)."""
        batch = self._batch
        assert batch is not None
        tid = task.id.encode()
        batch.delete(CF_PENDING, lease.key)
        batch.delete(CF_IN_PROGRESS, tid)
        batch.put(_TERMINAL_CF[task.state], tid, _enc.encode(task))
        self.counts[RUNNING] -= 1
        self.counts[task.state] += 1
        if task.state == COMPLETED:
            self.queue_out[task.queue] = self.queue_out.get(task.queue, 0) + 1
        if task.state in _FINAL_STATES:
            self._finished.append(task)

    def _pend(self, task: Task) -> None:
        """Make ``task`` pending again, under a fresh sequence number (the back of its line)."""
        batch = self._batch
        assert batch is not None
        seq = self.next_seq
        self.next_seq += 1
        key = pending_key(task.queue, task.priority, seq)
        batch.put(CF_IDS, task.id.encode(), key)
        task = msgspec.structs.replace(
            task, state=PENDING, seq=seq, worker_id="", eta_ms=0, started_at_ms=0
        )
        batch.put(CF_PENDING, key, _enc.encode(task))
        self._ready(task.queue).push(task.priority, seq)
        self.counts[PENDING] += 1
        self._readied = True

    def _drop_lease(self, task_id: str) -> Lease | None:
        lease = self.leases.pop(task_id, None)
        if lease is not None:
            worker = self.workers.get(lease.worker_id)
            if worker is not None:
                worker.leases.discard(task_id)
        return lease

    def get_task(self, task_id: str) -> Task | None:
        lease = self.leases.get(task_id)
        if lease is not None:
            return lease.task
        batch = self._batch
        tid = task_id.encode()
        key = self.store.get(CF_IDS, tid, batch)
        if key is None:
            return None
        raw = self.store.get(CF_PENDING, key, batch)
        if raw is None:
            for cf in _LOOKUP_ORDER:
                raw = self.store.get(cf, tid, batch)
                if raw is not None:
                    break
        return None if raw is None else _task_dec.decode(raw)

    # --- commands --------------------------------------------------------------------------------

    def _submit(self, now: int, specs: list[TaskSpec]) -> tuple[list[str], list[tuple[str, str]]]:
        batch = self._batch
        assert batch is not None
        ids_cf = CF_IDS
        pending_cf = CF_PENDING
        encode = _enc.encode
        put, pending_h, pending_ov = batch.writer(pending_cf)
        _, ids_h, ids_ov = batch.writer(ids_cf)
        seq = self.next_seq
        pending = PENDING
        tids = [spec.id.encode() for spec in specs]
        known = self._known_ids(tids, batch)
        if any(known) or len(set(tids)) != len(tids):
            # same id again (in the store or earlier in this batch): idempotent, the first wins
            seen: set[bytes] = set()
            fresh = []
            for spec, tid, dup in zip(specs, tids, known, strict=True):
                if not dup and tid not in seen:
                    seen.add(tid)
                    fresh.append((spec, tid))
        else:
            fresh = list(zip(specs, tids, strict=True))
        ready = self.ready
        queue_in = self.queue_in
        prefixes: dict[str, bytes] = {}
        pack = _SEQ.pack
        mirror = self._mirror
        for spec, tid in fresh:
            queue = spec.queue
            prefix = prefixes.get(queue)
            if prefix is None:
                prefix = prefixes[queue] = queue.encode() + b"\x00"
            key = prefix + pack(spec.priority, seq)
            value = encode(
                Task(  # positional: every field, in declaration order (cheaper than keywords)
                    spec.id,
                    spec.name,
                    queue,
                    spec.priority,
                    pending,
                    spec.payload,
                    0,
                    spec.max_retries,
                    spec.timeout_s,
                    now,
                    0,
                    0,
                    0,
                    None,
                    None,
                    "",
                    seq,
                    spec.backoff_s,
                )
            )
            put(key, value, pending_h)
            put(tid, key, ids_h)
            if mirror:
                pending_ov[key] = value
                ids_ov[tid] = key
            rq = ready.get(queue)
            if rq is None:
                rq = self._ready(queue)
            rq.arrays[spec.priority].append(seq)
            queue_in[queue] = queue_in.get(queue, 0) + 1
            seq += 1
        ids = [spec.id for spec in specs]  # in request order, duplicates included
        added = seq - self.next_seq
        batch.count(2 * added)
        self.next_seq = seq
        if added:
            self.counts[PENDING] += added
            self._count("submitted", added)
            self._readied = True
        return ids, []

    def _known_ids(self, tids: list[bytes], batch: Batch) -> list[bool]:
        """Which of these ids exist already. An id above every id ever stored (``max_id``) cannot
        exist, and ids are time-ordered, so a producer's fresh ids usually are: only the others
        are looked up, in one multi-get (RocksDB probes every level for a missing key: ~1 us a
        key, a fifth of a batched submit's cost). ``max_id`` only grows, at once, so a repeat
        later in the same batch is looked up (and found in the batch's overlay)."""
        top = self.max_id
        hi = max(tids)
        if hi > top:
            self.max_id = hi
        if min(tids) > top:
            return [False] * len(tids)
        below = [i for i, tid in enumerate(tids) if tid <= top]
        if len(below) == len(tids):
            return self.store.exists_many(CF_IDS, tids, batch)
        known = [False] * len(tids)
        found = self.store.exists_many(CF_IDS, [tids[i] for i in below], batch)
        for i, hit in zip(below, found, strict=True):
            known[i] = hit
        return known

    def _claim(
        self, now: int, worker_id: str, queues: list[str], n: int, max_bytes: int
    ) -> list[LeasedTask]:
        """Lease up to ``n`` ready tasks, stopping once their payloads (and the errors of earlier
        attempts) reach ``max_bytes``: the reply must fit in a frame the worker accepts, or the
        worker drops the connection and every task of the claim loses an attempt unrun."""
        batch = self._batch
        assert batch is not None
        out: list[LeasedTask] = []
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = WorkerState(worker_id, last_seen_ms=now)
        worker.last_seen_ms = now
        self._touched_workers.add(worker_id)
        deadline = now + self.lease_ms
        lease_ms = self.lease_ms
        get = self.store.get
        put = batch.put
        decode = _task_dec.decode
        encode = _enc.encode
        replace = msgspec.structs.replace
        leases = self.leases
        held = worker.leases
        running = RUNNING
        paused = self.paused
        size = 0
        full = n <= 0  # n leased, or their bytes reached max_bytes (after at least one)
        for priority in _PRIORITIES:
            for queue in queues:
                rq = self.ready.get(queue)
                if rq is None or (paused and queue in paused):
                    continue
                prefix = queue.encode() + b"\x00"
                while not full:
                    seq = rq.pop(priority)
                    if seq is None:
                        break
                    key = prefix + _SEQ.pack(priority, seq)
                    raw = get(CF_PENDING, key, batch)
                    if raw is None:  # removed behind the index: nothing to lease
                        continue
                    stored = decode(raw)
                    token = self.next_token
                    self.next_token = token + 1
                    attempt = stored.attempt + 1
                    task = replace(
                        stored,
                        state=running,
                        attempt=attempt,
                        started_at_ms=now,
                        worker_id=worker_id,
                    )
                    put(
                        CF_IN_PROGRESS,
                        stored.id.encode(),
                        encode(LeaseMark(key, attempt, now, worker_id, token, deadline)),
                    )
                    leases[task.id] = Lease(task, token, worker_id, deadline, key)
                    held.add(task.id)
                    out.append(LeasedTask(task, token, lease_ms))
                    size += len(stored.payload) + _error_bytes(stored.error)
                    full = len(out) >= n or size >= max_bytes
                if full:
                    break
            if full:
                break
        if out:
            self.counts[PENDING] -= len(out)
            self.counts[RUNNING] += len(out)
            self._count("claimed", len(out))
        return out

    def _take_lease(self, worker_id: str, task_id: str, token: int) -> Lease:
        lease = self.leases.get(task_id)
        if lease is None or lease.token != token or lease.worker_id != worker_id:
            raise LeaseLost(f"lease on {task_id} expired or was superseded")
        self._drop_lease(task_id)
        return lease

    def _report(
        self, now: int, worker_id: str, outcomes: list[Outcome]
    ) -> tuple[list[str], list[tuple[str, str]]]:
        accepted: list[str] = []
        rejected: list[tuple[str, str]] = []
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.last_seen_ms = now
            self._touched_workers.add(worker_id)
        replace = msgspec.structs.replace
        completed = 0
        for outcome in outcomes:
            try:
                lease = self._take_lease(worker_id, outcome.task_id, outcome.token)
            except LeaseLost as exc:
                rejected.append((outcome.task_id, exc.code))
                continue
            if outcome.ok:
                done = replace(
                    lease.task,
                    state=COMPLETED,
                    finished_at_ms=now,
                    result=outcome.result,
                    error=None,
                )
                self._finish(lease, done)
                completed += 1
            else:
                self._fail(now, lease, outcome.error or ErrorInfo("Error", "failed"))
            accepted.append(outcome.task_id)
        if worker is not None:
            worker.done += len(accepted)
        if completed:
            self._count("completed", completed)
        return accepted, rejected

    def _fail(self, now: int, lease: Lease, error: ErrorInfo) -> None:
        task = lease.task
        self._count("failed")
        if task.attempt <= task.max_retries:
            eta = now + self.retry.delay_ms(task.id, task.attempt, task.backoff_s)
            failed = msgspec.structs.replace(
                task, state=FAILED, finished_at_ms=now, error=error, eta_ms=eta
            )
            self._finish(lease, failed)
            heapq.heappush(self.timers, (eta, task.id))
            self.delayed[task.queue] = self.delayed.get(task.queue, 0) + 1
            self._count("retried")
        else:
            dead = msgspec.structs.replace(task, state=DEAD, finished_at_ms=now, error=error)
            self._finish(lease, dead)
            self._count("dead_lettered")

    def _extend(self, now: int, worker_id: str, leases: list[LeaseRef]) -> list[tuple[str, str]]:
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.last_seen_ms = now
            self._touched_workers.add(worker_id)
        rejected: list[tuple[str, str]] = []
        deadline = now + self.lease_ms
        batch = self._batch
        assert batch is not None
        encode = _enc.encode
        for ref in leases:
            lease = self.leases.get(ref.task_id)
            if lease is None or lease.token != ref.token or lease.worker_id != worker_id:
                rejected.append((ref.task_id, LeaseLost.code))
            else:
                lease.deadline_ms = deadline
                task = lease.task
                mark = LeaseMark(
                    lease.key, task.attempt, task.started_at_ms, worker_id, lease.token, deadline
                )
                batch.put(CF_IN_PROGRESS, ref.task_id.encode(), encode(mark))
        listed = {ref.task_id for ref in leases} if worker is not None else set()
        if worker is not None and len(worker.leases) > len(listed):  # a set: repeats count once
            # A heartbeat lists everything the worker runs or has not yet reported. A lease it
            # does not list, claimed long enough ago for the claim's reply to have arrived, is
            # one the worker never received (a reply lost in a failover): hand the task back
            # now instead of letting it sit out the whole lease.
            cutoff = now - UNLISTED_GRACE_MS
            for task_id in sorted(worker.leases - listed):
                lease = self.leases.get(task_id)
                if lease is not None and lease.task.started_at_ms < cutoff:
                    self._drop_lease(task_id)
                    self._requeue(now, lease, "unknown to its worker", counts_attempt=False)
                    self._count("leases_unknown_to_worker")
        return rejected

    def _register(self, now: int, cmd: RegisterWorker) -> None:
        worker = self.workers.get(cmd.worker_id)
        if worker is None:
            worker = self.workers[cmd.worker_id] = WorkerState(cmd.worker_id)
        worker.host, worker.pid = cmd.host, cmd.pid
        worker.concurrency, worker.queues = cmd.concurrency, list(cmd.queues)
        worker.last_seen_ms = now
        self._touched_workers.add(cmd.worker_id)

    def _requeue(self, now: int, lease: Lease, reason: str, counts_attempt: bool = True) -> None:
        """A lease ended without a result: back to pending at once, or to the dead-letter queue
        once out of attempts."""
        batch = self._batch
        assert batch is not None
        task = lease.task
        if not counts_attempt:
            task = msgspec.structs.replace(task, attempt=task.attempt - 1)
        if counts_attempt and task.attempt > task.max_retries:
            dead = msgspec.structs.replace(
                task,
                state=DEAD,
                finished_at_ms=now,
                error=ErrorInfo("LeaseExpired", reason),
            )
            self._finish(lease, dead)
            self._count("dead_lettered")
            return
        batch.delete(CF_IN_PROGRESS, task.id.encode())
        batch.delete(CF_PENDING, lease.key)
        self.counts[RUNNING] -= 1
        # A fresh sequence number puts it at the back of its priority both in memory and in key
        # order, so a restarted broker claims in exactly the order the live one would.
        self._pend(task)

    def _worker_lost(self, now: int, worker_id: str) -> int:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return 0
        self._lost.append(worker_id)
        self._touched_workers.add(worker_id)  # deleted from the store with the batch
        lost = 0
        for tid in sorted(worker.leases):
            lease = self.leases.pop(tid, None)
            if lease is not None:
                self._requeue(now, lease, f"worker {worker_id} was lost")
                self._count("lease_expired")
                lost += 1
        self._count("workers_lost")
        return lost

    def _release(self, now: int, worker_id: str, leases: list[LeaseRef]) -> list[tuple[str, str]]:
        rejected: list[tuple[str, str]] = []
        for ref in leases:
            try:
                lease = self._take_lease(worker_id, ref.task_id, ref.token)
            except LeaseLost as exc:
                rejected.append((ref.task_id, exc.code))
                continue
            self._requeue(now, lease, "released", counts_attempt=False)  # never started
        return rejected

    def _cancel(self, now: int, task_id: str) -> Task:
        task = self.get_task(task_id)
        if task is None:
            raise TaskNotFound(f"no task {task_id[:80]}")
        state = task.state
        if state not in (PENDING, FAILED):
            raise InvalidState(
                f"task {task_id} is {state}; only pending or failed can be cancelled"
            )
        batch = self._batch
        assert batch is not None
        tid = task_id.encode()
        if state == PENDING:
            batch.delete(CF_PENDING, pending_key(task.queue, task.priority, task.seq))
            self._ready(task.queue).cancel(task.priority, task.seq)
        else:
            batch.delete(CF.FAILED, tid)
            self.delayed[task.queue] -= 1
        cancelled = msgspec.structs.replace(task, state=CANCELLED, finished_at_ms=now, eta_ms=0)
        batch.put(CF.CANCELLED, tid, _enc.encode(cancelled))
        self.counts[state] -= 1
        self.counts[CANCELLED] += 1
        self._finished.append(cancelled)
        self._count("cancelled")
        return cancelled

    def _tick(self, now: int) -> int:
        """Everything time-driven, as of ``now``: silent workers, expired leases, due retries."""
        batch = self._batch
        assert batch is not None
        changed = 0
        silent = [
            w.id for w in self.workers.values() if now - w.last_seen_ms > self.heartbeat_timeout_ms
        ]
        for worker_id in sorted(silent):
            changed += self._worker_lost(now, worker_id)
        expired = sorted(tid for tid, lease in self.leases.items() if lease.deadline_ms <= now)
        for tid in expired:
            lease = self.leases.get(tid)
            if lease is None:  # its worker was declared lost just above, for an earlier one
                continue
            worker = self.workers.get(lease.worker_id)
            if worker is not None and now - worker.last_seen_ms >= self.lease_ms:
                # Silent for a whole lease (frozen, cut off), so every lease it holds is running
                # out: the worker is lost now, not at the heartbeat timeout. Requeueing the task
                # alone handed it straight back to the claim the silent worker had parked, to
                # expire again and be dead-lettered as LeaseExpired while a healthy worker sat
                # idle. (A worker still heartbeating lets a lease run out by leaving it out of its
                # heartbeats; then only that lease ends.)
                changed += self._worker_lost(now, lease.worker_id)
                continue
            self._drop_lease(tid)
            self._requeue(now, lease, "lease expired")
            self._count("lease_expired")
            changed += 1
        while self.timers and self.timers[0][0] <= now:
            eta, tid = heapq.heappop(self.timers)
            task = self._timer_task(eta, tid, batch)
            if task is None:
                continue
            batch.delete(CF.FAILED, tid.encode())
            self.counts[FAILED] -= 1
            self.delayed[task.queue] -= 1
            self._pend(task)
            changed += 1
        return changed

    def _pause(self, queue: str, paused: bool) -> bool:
        batch = self._batch
        assert batch is not None
        key = f"paused:{queue}".encode()
        if paused:
            self.paused.add(queue)
            batch.put(CF.META, key, b"1")
        else:
            self.paused.discard(queue)
            batch.delete(CF.META, key)
            self._readied = True  # parked claims on this queue can be served now
        return paused

    def _retry_dead(self, now: int, task_ids: list[str]) -> list[str]:
        batch = self._batch
        assert batch is not None
        retried: list[str] = []
        for task_id in task_ids:
            tid = task_id.encode()
            raw = self.store.get(CF.DEAD_LETTER, tid, batch)
            if raw is None:
                continue  # no longer dead (retried or purged meanwhile)
            batch.delete(CF.DEAD_LETTER, tid)
            self.counts[DEAD] -= 1
            task = msgspec.structs.replace(_task_dec.decode(raw), attempt=0, finished_at_ms=0)
            self._pend(task)
            retried.append(task_id)
        if retried:
            self._count("dlq_retried", len(retried))
        return retried

    def _purge_dead(self, task_ids: list[str]) -> list[str]:
        batch = self._batch
        assert batch is not None
        purged: list[str] = []
        for task_id in task_ids:
            tid = task_id.encode()
            if self.store.get(CF.DEAD_LETTER, tid, batch) is None:
                continue
            batch.delete(CF.DEAD_LETTER, tid)
            batch.delete(CF_IDS, tid)
            self.counts[DEAD] -= 1
            purged.append(task_id)
        if purged:
            self._count("dlq_purged", len(purged))
        return purged

    def dead_letters(
        self,
        *,
        queue: str | None = None,
        name: str | None = None,
        error_type: str | None = None,
        finished_before_ms: int | None = None,
        limit: int = 10_000,
        after: str | None = None,
    ) -> list[Task]:
        """Dead-lettered tasks matching every filter given, by id after ``after`` (a read,
        outside apply). Payloads are left out, as ``list_tasks`` does (``status`` shows a task
        whole): five dead tasks of 9.9 MB made a reply no client would take, so ``tq dlq list``
        could not show the dead-letter queue at all. Retry and purge need only the ids."""
        out: list[Task] = []
        start = after.encode() if after else None
        for key, value in self.store.items(CF.DEAD_LETTER, start):
            if start is not None and key == start:
                continue  # the cursor itself was on the previous page
            task = _task_dec.decode(value)
            if queue and task.queue != queue:
                continue
            if name and task.name != name:
                continue
            if error_type and (task.error is None or task.error.type != error_type):
                continue
            if finished_before_ms is not None and task.finished_at_ms >= finished_before_ms:
                continue
            out.append(msgspec.structs.replace(task, payload=b""))
            if len(out) >= limit:
                break
        return out

    def _retention(self, cutoff_ms: int, task_ids: list[str]) -> int:
        """Delete the named finished tasks if they still finished before ``cutoff_ms``. The
        leader picks the ids (a read, outside apply); applying the list is deterministic."""
        batch = self._batch
        assert batch is not None
        deleted = 0
        for task_id in task_ids:
            tid = task_id.encode()
            for cf, state in ((CF.COMPLETED, COMPLETED), (CF.CANCELLED, CANCELLED)):
                raw = self.store.get(cf, tid, batch)
                if raw is None:
                    continue
                if _task_dec.decode(raw).finished_at_ms < cutoff_ms:
                    batch.delete(cf, tid)
                    batch.delete(CF_IDS, tid)
                    self.counts[state] -= 1
                    deleted += 1
                break
        if deleted:
            self._count("expired_by_retention", deleted)
        return deleted

    def retention_candidates(
        self, cutoff_ms: int, start: RetentionCursor | None, limit: int
    ) -> tuple[list[str], RetentionCursor | None]:
        """Finished tasks older than the cutoff, scanning at most ``limit`` records from
        ``start``; returns the ids and where the next scan resumes (None: wrapped around).

        The cursor names its column family with the key: one bare key for both families sent
        a key from ``cancelled`` into ``completed`` (skipping the ids before it there) and
        started ``cancelled`` over at every run, so expired cancelled tasks behind 20,000 live
        ones were never reached."""
        found: list[str] = []
        scanned = 0
        first = 0
        key_from: bytes | None = None
        if start is not None and start[0] in _RETENTION_CFS:
            first, key_from = _RETENTION_CFS.index(start[0]), start[1]
        for cf in _RETENTION_CFS[first:]:
            for key, value in self.store.items(cf, key_from):
                scanned += 1
                if _task_dec.decode(value).finished_at_ms < cutoff_ms:
                    found.append(key.decode())
                if scanned >= limit:
                    return found, (cf, key + b"\x00")
            key_from = None
        return found, None

    # --- read side (not commands: no state change) -----------------------------------------------

    def next_deadline_ms(self) -> int | None:
        """When the next Tick has work to do, or None if nothing is timed."""
        candidates: list[int] = []
        self._drop_stale_timers()
        if self.timers:
            candidates.append(self.timers[0][0])
        if self.leases:
            candidates.append(min(lease.deadline_ms for lease in self.leases.values()))
        if self.workers:
            oldest = min(w.last_seen_ms for w in self.workers.values())
            candidates.append(oldest + self.heartbeat_timeout_ms + 1)
        return min(candidates) if candidates else None

    def _drop_stale_timers(self) -> None:
        """Pop retry timers at the head of the heap whose task left ``failed`` (cancelled) or
        failed again with another eta: they decide nothing at the Tick, but a machine that
        never restarted still woke for them, where a restarted one (its heap rebuilt from the
        store) did not. One store read per call while the head is live."""
        while self.timers and self._timer_task(*self.timers[0]) is None:
            heapq.heappop(self.timers)

    def _timer_task(self, eta: int, task_id: str, batch: Batch | None = None) -> Task | None:
        """The failed task a retry timer stands for, or None for a stale entry: its task was
        cancelled, or (its id freed by retention and submitted again) failed anew with another
        eta, which has its own entry. The heap keeps stale entries; a recovered heap does not,
        so they must decide nothing."""
        raw = self.store.get(CF.FAILED, task_id.encode(), batch)
        if raw is None:
            return None
        task = _task_dec.decode(raw)
        return task if task.eta_ms == eta else None

    def has_ready(self, queues: Iterable[str]) -> bool:
        for queue in queues:
            rq = self.ready.get(queue)
            if rq is not None and rq.total() > 0 and queue not in self.paused:
                return True
        return False

    def queue_stats(self, limit: int = MAX_STATS_QUEUES) -> dict[str, QueueStats]:
        """Per queue with something to show (ready, running or delayed tasks, paused, or served
        by a registered worker): its ready tasks by priority, running, delayed, the oldest ready
        task's submit time.

        Every queue that ever held a task was listed, empty or not, and after 140,000 queues the
        stats reply (and every ``tq top`` snapshot) was over the frame limit until a restart. At
        most ``limit`` are listed: first those with running or delayed tasks or paused (a burst
        worker decides by its queues' delayed tasks), then the deepest; ``queues_left_out``
        says how many more there were."""
        running: dict[str, int] = {}
        for lease in self.leases.values():
            running[lease.task.queue] = running.get(lease.task.queue, 0) + 1
        delayed = self.delayed
        paused = self.paused
        # an idle queue a worker waits on is still worth a line (bounded: 100 queues a worker)
        served = {q for w in self.workers.values() for q in w.queues}
        names = set(self.ready) | set(running) | {q for q, n in delayed.items() if n} | paused
        empty = ReadyQueue()
        shown: list[tuple[str, ReadyQueue, int, int]] = []
        for queue in names | served:
            rq = self.ready.get(queue) or empty
            busy = running.get(queue, 0) + delayed.get(queue, 0)
            if busy or queue in paused or queue in served or rq.total():
                shown.append((queue, rq, running.get(queue, 0), delayed.get(queue, 0)))
        self.queues_left_out = max(len(shown) - limit, 0)
        if self.queues_left_out:
            shown.sort(
                key=lambda s: (
                    not (s[2] or s[3] or s[0] in paused),
                    -(s[1].total() + s[2] + s[3]),
                    s[0],
                )
            )
            del shown[limit:]
        out: dict[str, QueueStats] = {}
        for queue, rq, run, delay in sorted(shown, key=lambda s: s[0]):
            depth = {Priority(p).label: rq.count(p) for p in _PRIORITIES}
            oldest = 0
            for p in _PRIORITIES:
                seq = rq.peek(p)
                if seq is None:
                    continue
                raw = self.store.get(CF.PENDING, pending_key(queue, p, seq))
                if raw is not None:
                    submitted = _task_dec.decode(raw).submitted_at_ms
                    oldest = submitted if oldest == 0 else min(oldest, submitted)
            out[queue] = QueueStats(
                pending=depth,
                running=run,
                delayed=delay,
                oldest_pending_ms=oldest,
                paused=queue in paused,
            )
        return out

    def worker_infos(self, extra: dict[str, dict[str, Any]] | None = None) -> list[WorkerInfo]:
        extra = extra or {}
        infos: list[WorkerInfo] = []
        for w in sorted(self.workers.values(), key=lambda w: w.id):
            more = extra.get(w.id, {})
            infos.append(
                WorkerInfo(
                    id=w.id,
                    host=w.host,
                    pid=w.pid,
                    concurrency=w.concurrency,
                    queues=list(w.queues),
                    running=len(w.leases),
                    done=w.done,
                    cpu_percent=float(more.get("cpu_percent", 0.0)),
                    rss_bytes=int(more.get("rss_bytes", 0)),
                    last_heartbeat_ms=w.last_seen_ms,
                )
            )
        return infos

    def list_tasks(
        self,
        state: TaskState,
        queue: str | None,
        name: str | None,
        limit: int,
        after: str | None,
        max_bytes: int | None = None,
    ) -> tuple[list[Task], str | None]:
        """A page of tasks in one state; ``after`` is the cursor the previous page returned.

        With ``max_bytes`` the page also ends (with a cursor) once its results and errors add
        up to that much: fifty 350 KB results made a reply over the frame limit, and
        ``tq list`` failed on legitimate data. A page always holds at least one task."""
        size = 0
        if state is TaskState.RUNNING:
            tasks = sorted((lease.task for lease in self.leases.values()), key=lambda t: t.id)
            if after:
                tasks = [t for t in tasks if t.id > after]
            source: Iterator[tuple[bytes, Task]] = ((t.id.encode(), t) for t in tasks)
        else:
            cf = CF.PENDING if state is TaskState.PENDING else _TERMINAL_CF[state]
            start: bytes | None = None
            if after:
                start = bytes.fromhex(after) if state is TaskState.PENDING else after.encode()
            elif state is TaskState.PENDING and queue:
                start = pending_prefix(queue)
            source = ((k, _task_dec.decode(v)) for k, v in self.store.items(cf, start))
            if state is TaskState.PENDING:  # running tasks keep their record in `pending`
                source = ((k, t) for k, t in source if t.id not in self.leases)
        out: list[Task] = []
        last_key: bytes | None = None
        for key, task in source:
            if after and last_key is None and key == start:
                last_key = key
                continue  # the cursor itself was on the previous page
            last_key = key
            if state is TaskState.PENDING and queue and task.queue != queue:
                if task.queue > queue:
                    break
                continue
            if queue and task.queue != queue:
                continue
            if name and task.name != name:
                continue
            out.append(msgspec.structs.replace(task, payload=b""))
            if max_bytes is not None:
                size += 256 + len(task.result or b"")
                if task.error is not None:
                    size += len(task.error.message) + len(task.error.traceback)
            if len(out) >= limit or (max_bytes is not None and size >= max_bytes):
                cursor = key.hex() if state is TaskState.PENDING else task.id
                return out, cursor
        return out, None

    def history_page(
        self,
        states: list[TaskState],
        queue: str | None,
        since_ms: int,
        until_ms: int,
        limit: int,
        after: str | None,
        max_bytes: int | None = None,
    ) -> tuple[list[HistoryRow], str | None]:
        """A page of finished tasks for export, state by state in the order given, by id within
        a state. The cursor is ``state:task_id`` of the last row returned (raises ValueError for
        a cursor that names no listed state).

        With ``max_bytes`` the page also ends (with a cursor) once its rows add up to about that
        much: 5,000 dead tasks with 8 KiB error messages made a page over the client's frame
        limit, and ``tq export`` failed. A page always holds at least one row."""
        start_state = 0
        start_key: bytes | None = None
        if after:
            state_name, _, last_id = after.partition(":")
            names = [s.value for s in states]
            if state_name not in names or not last_id:
                raise ValueError("bad cursor")
            start_state = names.index(state_name)
            start_key = last_id.encode()
        rows: list[HistoryRow] = []
        size = 0
        decode = _task_dec.decode
        for i in range(start_state, len(states)):
            state = states[i]
            skip = start_key if i == start_state else None
            for key, raw in self.store.items(_TERMINAL_CF[state], skip):
                if skip is not None and key == skip:
                    continue
                task = decode(raw)
                finished = task.finished_at_ms
                if (
                    (queue and task.queue != queue)
                    or finished < since_ms
                    or (until_ms and finished >= until_ms)
                ):
                    continue
                error = task.error
                row = HistoryRow(
                    task.id,
                    task.name,
                    task.queue,
                    task.priority,
                    task.state,
                    task.attempt,
                    task.worker_id,
                    task.submitted_at_ms,
                    task.started_at_ms,
                    finished,
                    error.type if error is not None else "",
                    error.message if error is not None else "",
                    len(task.payload),
                    len(task.result) if task.result is not None else 0,
                )
                rows.append(row)
                if max_bytes is not None:
                    size += _ROW_BYTES + len(row.id) + len(row.name) + len(row.queue)
                    size += len(row.worker) + len(row.error_type) + len(row.error_message)
                if len(rows) >= limit or (max_bytes is not None and size >= max_bytes):
                    return rows, f"{state.value}:{task.id}"
        return rows, None
