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
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from tq.broker.commands import (
    Cancel,
    Claim,
    Command,
    Extend,
    RegisterWorker,
    Release,
    Report,
    Retention,
    Submit,
    Tick,
    WorkerLost,
)
from tq.errors import InvalidState, LeaseLost, TaskNotFound, TqError
from tq.model import ErrorInfo, Priority, RetryPolicy, Task, TaskState
from tq.protocol.messages import LeasedTask, LeaseRef, Outcome, QueueStats, TaskSpec, WorkerInfo
from tq.store import CF, Batch, Store, pending_key, split_pending_key
from tq.store.keys import pending_prefix

log = logging.getLogger("tq.broker.state")

_enc = msgspec.msgpack.Encoder()
_task_dec = msgspec.msgpack.Decoder(Task)

# Location byte stored in the ``ids`` column family: where a task lives now.
_LOC: Final[dict[str, bytes]] = {
    TaskState.PENDING: b"P",
    TaskState.RUNNING: b"R",
    TaskState.COMPLETED: b"C",
    TaskState.FAILED: b"F",
    TaskState.DEAD: b"D",
    TaskState.CANCELLED: b"X",
}
_LOC_STATE: Final = {v[0]: TaskState(k) for k, v in _LOC.items()}
_STATE_CF: Final = {
    TaskState.RUNNING: CF.IN_PROGRESS,
    TaskState.COMPLETED: CF.COMPLETED,
    TaskState.FAILED: CF.FAILED,
    TaskState.DEAD: CF.DEAD_LETTER,
    TaskState.CANCELLED: CF.CANCELLED,
}
_PRIORITIES: Final = tuple(int(p) for p in Priority)


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


@dataclass(slots=True)
class ApplyResult:
    """Per-command results (a value or a TqError) and the tasks that reached a final state."""

    results: list[Any]
    finished: list[Task]
    readied: bool


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
        # per-apply scratch
        self._batch: Batch | None = None
        self._finished: list[Task] = []
        self._readied = False

    # --- recovery --------------------------------------------------------------------------------

    def recover(self) -> None:
        """Rebuild every in-memory index from the store (pending keys only: no values are read)."""
        store = self.store
        max_seq = 0
        pending = 0
        for key in store.keys(CF.PENDING):
            queue, priority, seq = split_pending_key(key)
            self._ready(queue).push(priority, seq)
            max_seq = max(max_seq, seq)
            pending += 1
        self.counts[TaskState.PENDING] = pending
        for _key, value in store.items(CF.FAILED):
            task = _task_dec.decode(value)
            heapq.heappush(self.timers, (task.eta_ms, task.id))
            self.counts[TaskState.FAILED] += 1
        # Running tasks lost their workers with the old process: hold them under an already
        # expired lease so the first Tick puts them back to pending, through a normal command.
        for _key, value in store.items(CF.IN_PROGRESS):
            task = _task_dec.decode(value)
            self.leases[task.id] = Lease(task, 0, task.worker_id, 0)
            max_seq = max(max_seq, task.seq)
            self.counts[TaskState.RUNNING] += 1
        for key, value in store.items(CF.META):
            name = key.decode()
            number = int.from_bytes(value, "big")
            if name == "next_seq":
                self.next_seq = number
            elif name == "next_token":
                self.next_token = number
            elif name.startswith("count:"):
                self.counts[name[6:]] = number
            elif name.startswith("counter:"):
                self.counters[name[8:]] = number
        self.next_seq = max(self.next_seq, max_seq + 1)

    # --- apply -----------------------------------------------------------------------------------

    def apply(self, now_ms: int, commands: Iterable[Command]) -> ApplyResult:
        batch = self.store.batch()
        self._batch = batch
        self._finished = []
        self._readied = False
        counts_before = dict(self.counts)
        counters_before = dict(self.counters)
        seq_before, token_before = self.next_seq, self.next_token
        results: list[Any] = []
        for cmd in commands:
            try:
                results.append(self._apply_one(now_ms, cmd))
            except TqError as exc:
                results.append(exc)
            except Exception as exc:  # apply must never raise: record and go on
                log.exception("state.apply_failed", extra={"command": type(cmd).__name__})
                results.append(TqError(f"internal error applying {type(cmd).__name__}: {exc}"))
        self._write_meta(batch, counts_before, counters_before, seq_before, token_before)
        self.store.write(batch)
        self._batch = None
        return ApplyResult(results, self._finished, self._readied)

    def _apply_one(self, now: int, cmd: Command) -> Any:
        match cmd:
            case Submit(specs):
                return self._submit(now, specs)
            case Claim(worker_id, queues, n):
                return self._claim(now, worker_id, queues, n)
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
            case Retention(cutoff_ms, limit):
                return self._retention(cutoff_ms, limit)
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
            if counts.get(state) != n and state not in (TaskState.PENDING, TaskState.RUNNING):
                batch.put(meta, f"count:{state}".encode(), max(n, 0).to_bytes(8, "big"))
        for name, n in self.counters.items():
            if counters.get(name) != n:
                batch.put(meta, f"counter:{name}".encode(), n.to_bytes(8, "big"))

    # --- helpers ---------------------------------------------------------------------------------

    def _ready(self, queue: str) -> ReadyQueue:
        rq = self.ready.get(queue)
        if rq is None:
            rq = self.ready[queue] = ReadyQueue()
        return rq

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _move(self, task: Task, old: TaskState, new: TaskState, old_key: bytes) -> None:
        """Write ``task`` (already in state ``new``) and delete it from where it was."""
        batch = self._batch
        assert batch is not None
        if old is TaskState.PENDING:
            batch.delete(CF.PENDING, old_key)
        else:
            batch.delete(_STATE_CF[old], old_key)
        tid = task.id.encode()
        if new is TaskState.PENDING:
            key = pending_key(task.queue, task.priority, task.seq)
            batch.put(CF.PENDING, key, _enc.encode(task))
            batch.put(CF.IDS, tid, b"P" + key)
            self._ready(task.queue).push(task.priority, task.seq)
            self._readied = True
        else:
            batch.put(_STATE_CF[new], tid, _enc.encode(task))
            batch.put(CF.IDS, tid, _LOC[new])
        self.counts[old] -= 1
        self.counts[new] += 1
        if new.is_final:
            self._finished.append(task)

    def _enqueue(self, task: Task, old: TaskState, old_key: bytes) -> None:
        seq = self.next_seq
        self.next_seq += 1
        task = msgspec.structs.replace(
            task, state=TaskState.PENDING, seq=seq, worker_id="", eta_ms=0
        )
        self._move(task, old, TaskState.PENDING, old_key)

    def locate(self, task_id: str) -> tuple[TaskState, bytes] | None:
        loc = self.store.get(CF.IDS, task_id.encode(), self._batch)
        if loc is None:
            return None
        state = _LOC_STATE[loc[0]]
        key = loc[1:] if state is TaskState.PENDING else task_id.encode()
        return state, key

    def get_task(self, task_id: str) -> Task | None:
        lease = self.leases.get(task_id)
        if lease is not None:
            return lease.task
        where = self.locate(task_id)
        if where is None:
            return None
        state, key = where
        cf = CF.PENDING if state is TaskState.PENDING else _STATE_CF[state]
        raw = self.store.get(cf, key, self._batch)
        return None if raw is None else _task_dec.decode(raw)

    # --- commands --------------------------------------------------------------------------------

    def _submit(self, now: int, specs: list[TaskSpec]) -> tuple[list[str], list[tuple[str, str]]]:
        batch = self._batch
        assert batch is not None
        ids: list[str] = []
        ids_cf = CF.IDS
        pending_cf = CF.PENDING
        encode = _enc.encode
        get = self.store.get
        seq = self.next_seq
        for spec in specs:
            tid = spec.id.encode()
            if get(ids_cf, tid, batch) is not None:
                ids.append(spec.id)  # same id again: idempotent, the first submit wins
                continue
            task = Task(
                id=spec.id,
                name=spec.name,
                queue=spec.queue,
                priority=spec.priority,
                state=TaskState.PENDING,
                payload=spec.payload,
                max_retries=spec.max_retries,
                timeout_s=spec.timeout_s,
                submitted_at_ms=now,
                seq=seq,
                backoff_s=spec.backoff_s,
            )
            key = pending_key(spec.queue, spec.priority, seq)
            batch.put(pending_cf, key, encode(task))
            batch.put(ids_cf, tid, b"P" + key)
            self._ready(spec.queue).push(spec.priority, seq)
            seq += 1
            ids.append(spec.id)
        added = seq - self.next_seq
        self.next_seq = seq
        if added:
            self.counts[TaskState.PENDING] += added
            self._count("submitted", added)
            self._readied = True
        return ids, []

    def _claim(self, now: int, worker_id: str, queues: list[str], n: int) -> list[LeasedTask]:
        batch = self._batch
        assert batch is not None
        out: list[LeasedTask] = []
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = WorkerState(worker_id, last_seen_ms=now)
        worker.last_seen_ms = now
        deadline = now + self.lease_ms
        for priority in _PRIORITIES:
            for queue in queues:
                rq = self.ready.get(queue)
                if rq is None:
                    continue
                while len(out) < n:
                    seq = rq.pop(priority)
                    if seq is None:
                        break
                    key = pending_key(queue, priority, seq)
                    raw = self.store.get(CF.PENDING, key, batch)
                    if raw is None:  # cancelled or purged behind the index: skip it
                        continue
                    task = _task_dec.decode(raw)
                    token = self.next_token
                    self.next_token += 1
                    task = msgspec.structs.replace(
                        task,
                        state=TaskState.RUNNING,
                        attempt=task.attempt + 1,
                        started_at_ms=now,
                        worker_id=worker_id,
                    )
                    self._move(task, TaskState.PENDING, TaskState.RUNNING, key)
                    self.leases[task.id] = Lease(task, token, worker_id, deadline)
                    worker.leases.add(task.id)
                    out.append(LeasedTask(task, token, self.lease_ms))
                if len(out) >= n:
                    break
            if len(out) >= n:
                break
        if out:
            self._count("claimed", len(out))
        return out

    def _take_lease(self, worker_id: str, ref_id: str, token: int) -> Lease:
        lease = self.leases.get(ref_id)
        if lease is None or lease.token != token:
            raise LeaseLost(f"lease on {ref_id} expired or was superseded")
        del self.leases[ref_id]
        worker = self.workers.get(lease.worker_id)
        if worker is not None:
            worker.leases.discard(ref_id)
        return lease

    def _report(
        self, now: int, worker_id: str, outcomes: list[Outcome]
    ) -> tuple[list[str], list[tuple[str, str]]]:
        accepted: list[str] = []
        rejected: list[tuple[str, str]] = []
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.last_seen_ms = now
        for outcome in outcomes:
            try:
                lease = self._take_lease(worker_id, outcome.task_id, outcome.token)
            except LeaseLost as exc:
                rejected.append((outcome.task_id, exc.code))
                continue
            if worker is not None:
                worker.done += 1
            task = lease.task
            key = task.id.encode()
            if outcome.ok:
                done = msgspec.structs.replace(
                    task,
                    state=TaskState.COMPLETED,
                    finished_at_ms=now,
                    result=outcome.result,
                    error=None,
                )
                self._move(done, TaskState.RUNNING, TaskState.COMPLETED, key)
                self._count("completed")
            else:
                self._fail(now, task, outcome.error or ErrorInfo("Error", "failed"), key)
            accepted.append(outcome.task_id)
        return accepted, rejected

    def _fail(self, now: int, task: Task, error: ErrorInfo, key: bytes) -> None:
        self._count("failed")
        if task.attempt <= task.max_retries:
            eta = now + self.retry.delay_ms(task.id, task.attempt, task.backoff_s)
            failed = msgspec.structs.replace(
                task, state=TaskState.FAILED, finished_at_ms=now, error=error, eta_ms=eta
            )
            self._move(failed, TaskState.RUNNING, TaskState.FAILED, key)
            heapq.heappush(self.timers, (eta, task.id))
            self._count("retried")
        else:
            dead = msgspec.structs.replace(
                task, state=TaskState.DEAD, finished_at_ms=now, error=error
            )
            self._move(dead, TaskState.RUNNING, TaskState.DEAD, key)
            self._count("dead_lettered")

    def _extend(self, now: int, worker_id: str, leases: list[LeaseRef]) -> list[tuple[str, str]]:
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.last_seen_ms = now
        rejected: list[tuple[str, str]] = []
        deadline = now + self.lease_ms
        for ref in leases:
            lease = self.leases.get(ref.task_id)
            if lease is None or lease.token != ref.token:
                rejected.append((ref.task_id, LeaseLost.code))
            else:
                lease.deadline_ms = deadline
        return rejected

    def _register(self, now: int, cmd: RegisterWorker) -> None:
        worker = self.workers.get(cmd.worker_id)
        if worker is None:
            worker = self.workers[cmd.worker_id] = WorkerState(cmd.worker_id)
        worker.host, worker.pid = cmd.host, cmd.pid
        worker.concurrency, worker.queues = cmd.concurrency, list(cmd.queues)
        worker.last_seen_ms = now

    def _requeue_lease(self, now: int, lease: Lease, reason: str) -> None:
        """A lease ended without a result: back to pending at once, or dead if out of attempts."""
        task = lease.task
        key = task.id.encode()
        self._count("lease_expired")
        if task.attempt > task.max_retries:
            dead = msgspec.structs.replace(
                task,
                state=TaskState.DEAD,
                finished_at_ms=now,
                error=ErrorInfo("LeaseExpired", reason),
            )
            self._move(dead, TaskState.RUNNING, TaskState.DEAD, key)
            self._count("dead_lettered")
        else:
            self._enqueue(task, TaskState.RUNNING, key)

    def _worker_lost(self, now: int, worker_id: str) -> int:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return 0
        lost = 0
        for tid in sorted(worker.leases):
            lease = self.leases.pop(tid, None)
            if lease is not None:
                self._requeue_lease(now, lease, f"worker {worker_id} was lost")
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
            # Handed back unstarted: this attempt does not count.
            task = msgspec.structs.replace(lease.task, attempt=max(0, lease.task.attempt - 1))
            self._enqueue(task, TaskState.RUNNING, task.id.encode())
        return rejected

    def _cancel(self, now: int, task_id: str) -> Task:
        where = self.locate(task_id)
        if where is None:
            raise TaskNotFound(f"no task {task_id}")
        state, key = where
        if state not in (TaskState.PENDING, TaskState.FAILED):
            raise InvalidState(
                f"task {task_id} is {state}; only pending or failed can be cancelled"
            )
        task = self.get_task(task_id)
        assert task is not None
        if state is TaskState.PENDING:
            self._ready(task.queue).cancel(task.priority, task.seq)
        cancelled = msgspec.structs.replace(
            task, state=TaskState.CANCELLED, finished_at_ms=now, eta_ms=0
        )
        self._move(cancelled, state, TaskState.CANCELLED, key)
        self._count("cancelled")
        return cancelled

    def _tick(self, now: int) -> int:
        """Everything time-driven, as of ``now``: silent workers, expired leases, due retries."""
        changed = 0
        silent = [
            w.id for w in self.workers.values() if now - w.last_seen_ms > self.heartbeat_timeout_ms
        ]
        for worker_id in sorted(silent):
            changed += self._worker_lost(now, worker_id)
        expired = sorted(tid for tid, lease in self.leases.items() if lease.deadline_ms <= now)
        for tid in expired:
            lease = self.leases.pop(tid)
            worker = self.workers.get(lease.worker_id)
            if worker is not None:
                worker.leases.discard(tid)
            self._requeue_lease(now, lease, "lease expired")
            changed += 1
        while self.timers and self.timers[0][0] <= now:
            _, tid = heapq.heappop(self.timers)
            where = self.locate(tid)
            if where is None or where[0] is not TaskState.FAILED:
                continue  # cancelled or retried by hand meanwhile
            raw = self.store.get(CF.FAILED, where[1], self._batch)
            if raw is None:
                continue
            self._enqueue(_task_dec.decode(raw), TaskState.FAILED, where[1])
            changed += 1
        return changed

    def _retention(self, cutoff_ms: int, limit: int) -> int:
        batch = self._batch
        assert batch is not None
        deleted = 0
        for cf, state in ((CF.COMPLETED, TaskState.COMPLETED), (CF.CANCELLED, TaskState.CANCELLED)):
            for key, value in self.store.items(cf):
                if deleted >= limit:
                    break
                task = _task_dec.decode(value)
                if task.submitted_at_ms >= cutoff_ms:
                    break  # ids sort by submission time: nothing later can be older
                if task.finished_at_ms >= cutoff_ms:
                    continue
                batch.delete(cf, key)
                batch.delete(CF.IDS, key)
                self.counts[state] -= 1
                deleted += 1
        return deleted

    # --- read side (not commands: no state change) -----------------------------------------------

    def next_deadline_ms(self) -> int | None:
        """When the next Tick has work to do, or None if nothing is timed."""
        candidates: list[int] = []
        if self.timers:
            candidates.append(self.timers[0][0])
        if self.leases:
            candidates.append(min(lease.deadline_ms for lease in self.leases.values()))
        if self.workers:
            oldest = min(w.last_seen_ms for w in self.workers.values())
            candidates.append(oldest + self.heartbeat_timeout_ms + 1)
        return min(candidates) if candidates else None

    def has_ready(self, queues: Iterable[str]) -> bool:
        for queue in queues:
            rq = self.ready.get(queue)
            if rq is not None and rq.total() > 0:
                return True
        return False

    def queue_stats(self) -> dict[str, QueueStats]:
        out: dict[str, QueueStats] = {}
        running: dict[str, int] = {}
        for lease in self.leases.values():
            running[lease.task.queue] = running.get(lease.task.queue, 0) + 1
        delayed: dict[str, int] = {}
        names = set(self.ready) | set(running)
        for queue in sorted(names):
            rq = self.ready.get(queue) or ReadyQueue()
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
                running=running.get(queue, 0),
                delayed=delayed.get(queue, 0),
                oldest_pending_ms=oldest,
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
    ) -> tuple[list[Task], str | None]:
        """A page of tasks in one state; ``after`` is the cursor the previous page returned."""
        if state is TaskState.RUNNING:
            tasks = sorted((lease.task for lease in self.leases.values()), key=lambda t: t.id)
            if after:
                tasks = [t for t in tasks if t.id > after]
            source: Iterator[tuple[bytes, Task]] = ((t.id.encode(), t) for t in tasks)
        else:
            cf = CF.PENDING if state is TaskState.PENDING else _STATE_CF[state]
            start: bytes | None = None
            if after:
                start = bytes.fromhex(after) if state is TaskState.PENDING else after.encode()
            elif state is TaskState.PENDING and queue:
                start = pending_prefix(queue)
            source = ((k, _task_dec.decode(v)) for k, v in self.store.items(cf, start))
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
            if len(out) >= limit:
                cursor = key.hex() if state is TaskState.PENDING else task.id
                return out, cursor
        return out, None
