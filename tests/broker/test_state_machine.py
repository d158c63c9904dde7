"""Stateful property tests: ``StateMachine`` over a real RocksDB store against a naive model.

The model is plain Python (dicts and FIFO lists) and predicts the result of every command
exactly: which tasks a claim leases and in which order, the fencing tokens, what a Tick requeues
or dead-letters, the counts and counters. Retry times are the one thing it does not compute: it
reads them back from the broker and checks they lie inside the backoff bounds.

Ordering as the broker implements it (the model follows it): a fresh submit and a retry (a
``failed`` task whose timer fired) take a new sequence number at the back of their queue; a task
whose lease ended without a result (expired, worker lost, released) keeps its old sequence
number but goes to the back of the in-memory FIFO; a restart rebuilds the FIFOs in sequence
order. That last pair disagrees, see test_recovered_machine_claims_like_the_live_one.

Four machines share the rules: the plain one; one whose teardown replays the whole history on a
fresh store and demands identical results and identical store contents (determinism); one whose
replay restarts at other points than the original did, as a Raft replica that was killed and
restarted while the others went on (a restart must change nothing); and one whose teardown
closes the store, reopens it, recovers and checks that nothing was lost.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
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
from tq.broker.state import UNLISTED_GRACE_MS, StateMachine
from tq.errors import InvalidState, LeaseLost, TaskNotFound, TqError
from tq.model import ErrorInfo, Priority, Task, TaskState
from tq.protocol.messages import LeaseRef, Outcome, QueueStats, TaskSpec
from tq.store import CF, Store, split_pending_key

from tests.broker.support import dump_store, normalize

QUEUES = ("alpha", "beta")
CLAIM_QUEUES = (*QUEUES, "gamma")  # gamma never has tasks
WORKERS = ("w1", "w2")
LEASE_MS = 5_000
HEARTBEAT_TIMEOUT_MS = 3_000
# A lease that ends without a result puts the task back under a fresh sequence number: the back
# of its line both in memory and in key order (test_recovered_machine_claims_like_the_live_one).
REQUEUE_KEEPS_SEQ = False
# (lease_ms, heartbeat_timeout_ms) per run: a silent worker is usually dropped before its lease
# expires in the first, a lease of a live worker expires first in the second.
TIMINGS = ((LEASE_MS, HEARTBEAT_TIMEOUT_MS), (3_000, 5_000))
START_MS = 1_700_000_000_000
BACKOFFS = (0.0, 0.25, 1.5)  # 0.0 means the policy's base (1 s); each gives a delay >= 125 ms
DEFAULT_BASE_S = 1.0
MAX_DELAY_S = 300.0

PENDING, RUNNING, FAILED = TaskState.PENDING, TaskState.RUNNING, TaskState.FAILED
COMPLETED, DEAD, CANCELLED = TaskState.COMPLETED, TaskState.DEAD, TaskState.CANCELLED
TERMINAL_CFS = {
    COMPLETED: CF.COMPLETED,
    FAILED: CF.FAILED,
    DEAD: CF.DEAD_LETTER,
    CANCELLED: CF.CANCELLED,
}

# No explain phase: its line tracing of RocksDB-heavy steps is slow enough to hit the timeout.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
MAX_RESTARTS = 2  # per run: opening RocksDB costs ~25 ms, the rest of a step well under 1 ms
SETTINGS = settings(max_examples=50, stateful_step_count=30, deadline=None, phases=_PHASES)
TEARDOWN_SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None, phases=_PHASES)


# --- the model -----------------------------------------------------------------------------------


@dataclass
class MTask:
    id: str
    queue: str
    priority: int
    max_retries: int
    backoff_s: float
    order: int  # position in first-submit order
    seq: int  # sequence number of its pending record
    state: TaskState = PENDING
    attempt: int = 0
    token: int | None = None  # the live lease's token while running
    worker: str = ""
    deadline: int = 0
    eta: int | None = None  # failed: retry time, read back from the broker after the apply
    failed_at: int = 0
    tokens: list[int] = field(default_factory=list)  # every token ever issued, last = newest
    claimed_before: bool = False
    claimed_at: int = 0  # when the live lease was granted


@dataclass
class MWorker:
    last_seen: int
    leases: set[str] = field(default_factory=set)


class Model:
    def __init__(self, lease_ms: int, heartbeat_timeout_ms: int) -> None:
        self.lease_ms = lease_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.tasks: dict[str, MTask] = {}
        self.ready: dict[tuple[str, int], list[str]] = {}
        self.workers: dict[str, MWorker] = {}
        self.next_token = 1
        self.next_seq = 1
        self.counters: Counter[str] = Counter()
        # per Claim applied: priorities still ready in its queues right after it (a later command
        # of the same apply may change the ready lists before the result is checked)
        self.left_after_claim: list[list[int]] = []

    # helpers

    def fifo(self, queue: str, priority: int) -> list[str]:
        return self.ready.setdefault((queue, priority), [])

    def new_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1

    def enqueue(self, t: MTask, *, fresh_seq: bool) -> None:
        """To the back of the FIFO: a retry under a new sequence number, a lease that ended
        without a result under its old one."""
        t.state, t.token, t.worker, t.eta = PENDING, None, "", None
        if fresh_seq:
            t.seq = self.new_seq()
        self.fifo(t.queue, t.priority).append(t.id)

    def requeue_lease(self, now: int, t: MTask) -> None:
        self.counters["lease_expired"] += 1
        if t.attempt > t.max_retries:
            t.state, t.token = DEAD, None
            self.counters["dead_lettered"] += 1
        else:
            self.enqueue(t, fresh_seq=not REQUEUE_KEEPS_SEQ)

    def take_lease(self, worker: str, task_id: str, token: int) -> MTask | None:
        t = self.tasks.get(task_id)
        if t is None or t.state is not RUNNING or t.token != token or t.worker != worker:
            return None
        w = self.workers.get(t.worker)
        if w is not None:
            w.leases.discard(task_id)
        return t

    def counts(self) -> dict[str, int]:
        got = Counter(t.state.value for t in self.tasks.values())
        return {s.value: got.get(s.value, 0) for s in TaskState}

    def running_of(self, worker: str) -> list[MTask]:
        return [t for t in self.tasks.values() if t.state is RUNNING and t.worker == worker]

    # commands: each returns the expected result (an exception class for an error)

    def apply(self, now: int, cmd: Command) -> Any:
        match cmd:
            case Submit(specs):
                return self.submit(specs)
            case Claim(worker_id, queues, n):
                return self.claim(now, worker_id, queues, n)
            case Report(worker_id, outcomes):
                return self.report(now, worker_id, outcomes)
            case Extend(worker_id, leases):
                return self.extend(now, worker_id, leases)
            case Release(worker_id, leases):
                return self.release(worker_id, leases)
            case WorkerLost(worker_id):
                return self.worker_lost(now, worker_id)
            case Cancel(task_id):
                return self.cancel(task_id)
            case Tick():
                return self.tick(now)
        raise AssertionError(f"model cannot apply {cmd!r}")

    def submit(self, specs: list[TaskSpec]) -> tuple[list[str], list[tuple[str, str]]]:
        for spec in specs:
            if spec.id in self.tasks:
                continue  # idempotent: the first submit wins
            t = MTask(
                spec.id,
                spec.queue,
                spec.priority,
                spec.max_retries,
                spec.backoff_s,
                order=len(self.tasks),
                seq=self.new_seq(),
            )
            self.tasks[t.id] = t
            self.fifo(t.queue, t.priority).append(t.id)
            self.counters["submitted"] += 1
        return [s.id for s in specs], []

    def claim(self, now: int, worker: str, queues: list[str], n: int) -> list[tuple[str, int, int]]:
        w = self.workers.setdefault(worker, MWorker(now))
        w.last_seen = now
        out: list[tuple[str, int, int]] = []
        for priority in Priority:
            for queue in queues:
                fifo = self.fifo(queue, priority)
                while fifo and len(out) < n:
                    t = self.tasks[fifo.pop(0)]
                    t.state, t.attempt, t.worker = RUNNING, t.attempt + 1, worker
                    t.token, t.deadline = self.next_token, now + self.lease_ms
                    t.claimed_at = now
                    t.tokens.append(self.next_token)
                    self.next_token += 1
                    w.leases.add(t.id)
                    out.append((t.id, t.token, t.attempt))
        self.counters["claimed"] += len(out)
        self.left_after_claim.append([p for q in queues for p in Priority if self.fifo(q, p)])
        return out

    def report(
        self, now: int, worker: str, outcomes: list[Outcome]
    ) -> tuple[list[str], list[tuple[str, str]]]:
        if worker in self.workers:
            self.workers[worker].last_seen = now
        accepted: list[str] = []
        rejected: list[tuple[str, str]] = []
        for o in outcomes:
            t = self.take_lease(worker, o.task_id, o.token)
            if t is None:
                rejected.append((o.task_id, LeaseLost.code))
                continue
            accepted.append(o.task_id)
            t.token = None
            if o.ok:
                t.state = COMPLETED
                self.counters["completed"] += 1
                continue
            self.counters["failed"] += 1
            if t.attempt <= t.max_retries:
                t.state, t.eta, t.failed_at = FAILED, None, now
                self.counters["retried"] += 1
            else:
                t.state = DEAD
                self.counters["dead_lettered"] += 1
        return accepted, rejected

    def extend(self, now: int, worker: str, refs: list[LeaseRef]) -> list[tuple[str, str]]:
        if worker in self.workers:
            self.workers[worker].last_seen = now
        rejected = []
        for ref in refs:
            t = self.tasks.get(ref.task_id)
            if t is None or t.state is not RUNNING or t.token != ref.token or t.worker != worker:
                rejected.append((ref.task_id, LeaseLost.code))
            else:
                t.deadline = now + self.lease_ms
        w = self.workers.get(worker)
        if w is not None:
            # leases the heartbeat does not list, granted more than UNLISTED_GRACE_MS ago, are
            # handed back like a release (the worker never got them)
            listed = {ref.task_id for ref in refs}
            for task_id in sorted(w.leases - listed):
                t = self.tasks[task_id]
                if t.state is RUNNING and t.claimed_at < now - UNLISTED_GRACE_MS:
                    self.take_lease(worker, task_id, t.token)  # type: ignore[arg-type]
                    t.token = None
                    t.attempt = max(0, t.attempt - 1)
                    self.counters["leases_unknown_to_worker"] += 1
                    self.enqueue(t, fresh_seq=not REQUEUE_KEEPS_SEQ)
        return rejected

    def release(self, worker: str, refs: list[LeaseRef]) -> list[tuple[str, str]]:
        rejected = []
        for ref in refs:
            t = self.take_lease(worker, ref.task_id, ref.token)
            if t is None:
                rejected.append((ref.task_id, LeaseLost.code))
                continue
            t.attempt = max(0, t.attempt - 1)  # handed back unstarted: the attempt does not count
            self.enqueue(t, fresh_seq=not REQUEUE_KEEPS_SEQ)
        return rejected

    def worker_lost(self, now: int, worker: str) -> int:
        w = self.workers.pop(worker, None)
        if w is None:
            return 0
        for task_id in sorted(w.leases):
            self.requeue_lease(now, self.tasks[task_id])
        self.counters["workers_lost"] += 1
        return len(w.leases)

    def cancel(self, task_id: str) -> Any:
        t = self.tasks.get(task_id)
        if t is None:
            return TaskNotFound
        if t.state not in (PENDING, FAILED):
            return InvalidState
        if t.state is PENDING:
            self.fifo(t.queue, t.priority).remove(task_id)
        t.state, t.eta = CANCELLED, None
        self.counters["cancelled"] += 1
        return CANCELLED

    def tick(self, now: int) -> int:
        changed = 0
        silent = [
            wid for wid, w in self.workers.items() if now - w.last_seen > self.heartbeat_timeout_ms
        ]
        for wid in sorted(silent):
            changed += self.worker_lost(now, wid)
        expired = sorted(
            t.id for t in self.tasks.values() if t.state is RUNNING and t.deadline <= now
        )
        for task_id in expired:
            t = self.tasks[task_id]
            if t.state is not RUNNING:  # requeued just above, with its silent worker
                continue
            w = self.workers.get(t.worker)
            if w is not None and now - w.last_seen >= self.lease_ms:
                # silent for a whole lease: the worker is lost with all its leases
                changed += self.worker_lost(now, t.worker)
                continue
            if w is not None:
                w.leases.discard(task_id)
            self.requeue_lease(now, t)
            changed += 1
        due = sorted(
            (t.eta, t.id)
            for t in self.tasks.values()
            if t.state is FAILED and t.eta is not None and t.eta <= now
        )
        for _, task_id in due:
            self.enqueue(self.tasks[task_id], fresh_seq=True)
            changed += 1
        return changed

    def next_deadline(self) -> int | None:
        """When the next Tick has something to do: a lease ends, a worker turns silent, a retry
        is due."""
        times = [t.deadline for t in self.tasks.values() if t.state is RUNNING]
        times += [w.last_seen + self.heartbeat_timeout_ms + 1 for w in self.workers.values()]
        times += [t.eta for t in self.tasks.values() if t.state is FAILED and t.eta is not None]
        return min(times, default=None)

    def restart(self) -> None:
        """A restart keeps everything a command's outcome depends on: the leases with their
        deadlines and the worker table included (a restarted Raft replica must go on exactly as
        the others do). The FIFOs are rebuilt in seq order."""
        for fifo in self.ready.values():
            fifo.sort(key=lambda task_id: self.tasks[task_id].seq)


# --- machines ------------------------------------------------------------------------------------


def make_machine(
    store: Store, lease_ms: int = LEASE_MS, heartbeat_timeout_ms: int = HEARTBEAT_TIMEOUT_MS
) -> StateMachine:
    return StateMachine(store, lease_ms=lease_ms, heartbeat_timeout_ms=heartbeat_timeout_ms)


def check_result(cmd: Command, expected: Any, actual: Any, lease_ms: int) -> None:
    if isinstance(expected, type) and issubclass(expected, TqError):
        assert isinstance(actual, expected), (cmd, actual)
        return
    assert not isinstance(actual, BaseException), (cmd, actual)
    match cmd:
        case Submit() | Report():
            assert actual == expected, cmd
        case Claim(worker_id=worker_id):
            got = [(lt.task.id, lt.token, lt.task.attempt) for lt in actual]
            assert got == expected, cmd
            for lt in actual:
                assert lt.lease_ms == lease_ms
                assert lt.task.state == RUNNING
                assert lt.task.worker_id == worker_id
        case Extend() | Release():
            assert actual == expected, cmd
        case WorkerLost() | Tick():
            assert actual == expected, cmd
        case Cancel(task_id=task_id):
            assert isinstance(actual, Task)
            assert (actual.id, actual.state) == (task_id, expected)
        case _:
            raise AssertionError(f"unchecked command {cmd!r}")


# --- the machine ---------------------------------------------------------------------------------


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="tq-sm-")
        self.path = f"{self.root}/store"
        self.store = Store(self.path)
        self.store.open()
        self.lease_ms, self.heartbeat_timeout_ms = TIMINGS[0]
        self.sm = self._machine(self.store)
        self.model = Model(self.lease_ms, self.heartbeat_timeout_ms)
        self.now = START_MS
        self.ids = itertools.count()
        self.restarts = 0
        # ("apply", now, commands, normalized results) or ("restart",): enough to replay
        self.history: list[tuple[Any, ...]] = []

        self.batch_ids: list[str] = []  # ids submitted by earlier commands of the same apply

    def _machine(self, store: Store) -> StateMachine:
        return make_machine(store, self.lease_ms, self.heartbeat_timeout_ms)

    @initialize(timing=st.sampled_from(TIMINGS))
    def choose_timing(self, timing: tuple[int, int]) -> None:
        self.lease_ms, self.heartbeat_timeout_ms = timing
        self.sm = self._machine(self.store)
        self.model = Model(*timing)

    def teardown(self) -> None:
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- applying --------------------------------------------------------------------------------

    def apply(self, commands: list[Command]) -> list[Any]:
        expected = [self.model.apply(self.now, cmd) for cmd in commands]
        result = self.sm.apply(self.now, commands)
        self.history.append(("apply", self.now, commands, normalize(result.results)))
        assert len(result.results) == len(commands)
        left = iter(self.model.left_after_claim)
        for cmd, exp, got in zip(commands, expected, result.results, strict=True):
            check_result(cmd, exp, got, self.lease_ms)
            if isinstance(cmd, Claim):
                self.check_claim_order(cmd, got, next(left))
        self.model.left_after_claim.clear()
        self.read_back_retry_times()
        return result.results

    def read_back_retry_times(self) -> None:
        for t in self.model.tasks.values():
            if t.state is not FAILED or t.eta is not None:
                continue
            task = self.sm.get_task(t.id)
            assert task is not None
            base_s = t.backoff_s if t.backoff_s > 0 else DEFAULT_BASE_S
            raw_ms = min(MAX_DELAY_S, base_s * 2 ** max(0, t.attempt - 1)) * 1000
            delay = task.eta_ms - t.failed_at
            assert raw_ms // 2 - 1 <= delay <= raw_ms, (t, task.eta_ms)  # jitter in [0.5, 1)
            t.eta = task.eta_ms

    def check_claim_order(self, cmd: Claim, leased: list[Any], left: list[int]) -> None:
        """Strict priority across the worker's queues; fresh submits FIFO inside one queue and
        priority (the exact order, requeued tasks included, is checked against the model)."""
        tasks = [lt.task for lt in leased]
        priorities = [t.priority for t in tasks]
        assert priorities == sorted(priorities), priorities
        for queue, priority in itertools.product(cmd.queues, Priority):
            same = [t for t in tasks if (t.queue, t.priority) == (queue, priority)]
            fresh = [t for t in same if not self.model.tasks[t.id].claimed_before]
            assert [t.seq for t in fresh] == sorted(t.seq for t in fresh)
            order = [self.model.tasks[t.id].order for t in fresh]
            assert order == sorted(order)
        for t in tasks:
            self.model.tasks[t.id].claimed_before = True
        # Nothing better was left behind: a short claim emptied the queues, a full one took
        # nothing of a lower priority while a higher one was still waiting.
        if len(tasks) < cmd.max:
            assert not left, left
        elif tasks:
            assert all(p >= max(priorities) for p in left), (left, priorities)

    # --- command builders (from the model's current state) ---------------------------------------

    def build_submit(self, data: st.DataObject) -> Submit:
        specs = []
        for _ in range(data.draw(st.integers(1, 5), label="batch_size")):
            kind = data.draw(st.sampled_from(["new", "new", "new", "again", "twice"]), label="id")
            known = [*self.model.tasks, *self.batch_ids, *(s.id for s in specs)]
            if kind == "again" and known:
                task_id = data.draw(st.sampled_from(known), label="resubmit")
            else:
                task_id = f"task-{next(self.ids)}"
            spec = TaskSpec(
                id=task_id,
                name="job",
                payload=data.draw(st.binary(max_size=8), label="payload"),
                queue=data.draw(st.sampled_from(QUEUES), label="queue"),
                priority=data.draw(st.sampled_from(list(Priority)), label="priority"),
                max_retries=data.draw(st.integers(0, 2), label="max_retries"),
                backoff_s=data.draw(st.sampled_from(BACKOFFS), label="backoff_s"),
            )
            specs.append(spec)
            self.batch_ids.append(task_id)
            if kind == "twice":  # the same id twice in one batch: the first one wins
                specs.append(msgspec.structs.replace(spec, priority=Priority.LOW, queue="beta"))
        return Submit(specs)

    def build_claim(self, data: st.DataObject) -> Claim:
        return Claim(
            data.draw(st.sampled_from(WORKERS), label="worker"),
            data.draw(
                st.lists(st.sampled_from(CLAIM_QUEUES), min_size=1, max_size=3, unique=True),
                label="queues",
            ),
            data.draw(st.integers(1, 3), label="max"),
        )

    def pick_lease(self, data: st.DataObject) -> tuple[str, str, int] | None:
        """(worker, task id, token) of a lease a worker believes it holds, or a stale one: a
        superseded token, a token never issued, or the last token of a task no longer running."""
        leased = [t for t in self.model.tasks.values() if t.tokens]
        if not leased:
            return None
        t = data.draw(st.sampled_from(leased), label="lease_task")
        worker = t.worker if t.state is RUNNING else data.draw(st.sampled_from(WORKERS))
        kind = data.draw(st.sampled_from(["live", "live", "live", "stale"]), label="lease_kind")
        if kind == "live" or (t.state is not RUNNING):
            return worker, t.id, t.tokens[-1]
        old = t.tokens[:-1]
        token = data.draw(st.sampled_from(old), label="old") if old else t.tokens[-1] + 10**6
        return worker, t.id, token

    def build_report(self, data: st.DataObject) -> Report | None:
        outcomes: list[Outcome] = []
        worker = None
        for _ in range(data.draw(st.integers(1, 3), label="n_outcomes")):
            picked = self.pick_lease(data)
            if picked is None:
                return None
            worker = worker or picked[0]
            ok = data.draw(st.booleans(), label="ok")
            outcomes.append(
                Outcome(
                    picked[1],
                    picked[2],
                    ok,
                    result=b"done" if ok else None,
                    error=None if ok else ErrorInfo("ValueError", "boom"),
                )
            )
        assert worker is not None
        return Report(worker, outcomes)

    def build_heartbeat(self, data: st.DataObject) -> Extend:
        worker = data.draw(st.sampled_from(WORKERS), label="worker")
        refs = [LeaseRef(t.id, t.tokens[-1]) for t in self.model.running_of(worker)]
        if len(refs) >= 2 and data.draw(st.booleans(), label="drop_one_list_one_twice"):
            refs[-1] = refs[0]  # a buggy worker: one lease unlisted, the count still matches
        if data.draw(st.booleans(), label="add_stale"):
            picked = self.pick_lease(data)
            if picked is not None:
                refs.append(LeaseRef(picked[1], picked[2]))
        return Extend(worker, refs)

    def build_release(self, data: st.DataObject) -> Release | None:
        picked = self.pick_lease(data)
        if picked is None:
            return None
        return Release(picked[0], [LeaseRef(picked[1], picked[2])])

    def build_worker_lost(self, data: st.DataObject) -> WorkerLost:
        return WorkerLost(data.draw(st.sampled_from(WORKERS), label="worker"))

    def build_cancel(self, data: st.DataObject) -> Cancel:
        ids = [*self.model.tasks, "no-such-task"]
        return Cancel(data.draw(st.sampled_from(ids), label="cancel_id"))

    def build_tick(self, data: st.DataObject) -> Tick:
        return Tick()

    BUILDERS = (
        "build_submit",
        "build_claim",
        "build_report",
        "build_heartbeat",
        "build_release",
        "build_worker_lost",
        "build_cancel",
        "build_tick",
    )

    # --- rules -----------------------------------------------------------------------------------

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        cmd = self.build_submit(data)
        self.batch_ids = []
        self.apply([cmd])

    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        self.apply([self.build_claim(data)])

    @precondition(lambda self: any(t.tokens for t in self.model.tasks.values()))
    @rule(data=st.data())
    def report(self, data: st.DataObject) -> None:
        cmd = self.build_report(data)
        assert cmd is not None
        self.apply([cmd])

    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        self.apply([self.build_heartbeat(data)])

    @precondition(lambda self: any(t.tokens for t in self.model.tasks.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        cmd = self.build_release(data)
        assert cmd is not None
        self.apply([cmd])

    @rule(data=st.data())
    def worker_lost(self, data: st.DataObject) -> None:
        self.apply([self.build_worker_lost(data)])

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.apply([self.build_cancel(data)])

    @rule(ms=st.one_of(st.integers(0, 2_000), st.integers(2_000, 12_000)))
    def advance_and_tick(self, ms: int) -> None:
        self.now += ms  # time only moves forward
        self.apply([Tick()])

    @rule(offset=st.sampled_from([-1, 0, 0, 1]))
    def tick_at_next_deadline(self, offset: int) -> None:
        """Time jumps to just before, exactly at or just after the next deadline: the
        boundaries (a lease ends at its deadline, a worker is silent after the timeout)."""
        deadline = self.model.next_deadline()
        if deadline is not None:
            self.now = max(self.now, deadline + offset)
        self.apply([Tick()])

    @rule(data=st.data())
    def several_commands_in_one_apply(self, data: st.DataObject) -> None:
        names = data.draw(st.lists(st.sampled_from(self.BUILDERS), min_size=2, max_size=4))
        self.batch_ids = []  # a later submit of this apply may resubmit an id of an earlier one
        try:
            commands = [cmd for name in names if (cmd := getattr(self, name)(data)) is not None]
        finally:
            self.batch_ids = []
        self.apply(commands)

    @precondition(lambda self: self.restarts < MAX_RESTARTS)
    @rule()
    def restart(self) -> None:
        self.restarts += 1
        self.store.close()
        self.store = Store(self.path)
        self.store.open()
        self.sm = self._machine(self.store)
        self.sm.recover()
        self.model.restart()
        self.history.append(("restart",))

    # --- invariants ------------------------------------------------------------------------------

    @invariant()
    def no_task_is_lost(self) -> None:
        for t in self.model.tasks.values():
            task = self.sm.get_task(t.id)
            assert task is not None, f"task {t.id} was lost"
            assert task.state == t.state, (t, task)
            assert (task.queue, task.priority, task.max_retries) == (
                t.queue,
                t.priority,
                t.max_retries,
            )
            assert task.attempt == t.attempt, (t, task)
            assert 0 <= task.attempt <= task.max_retries + 1
            if t.state in (PENDING, RUNNING):
                assert task.seq == t.seq, (t, task)
            if t.state is RUNNING:
                assert task.worker_id == t.worker
            if t.state is FAILED:
                assert task.eta_ms == t.eta

    @invariant()
    def store_holds_each_task_exactly_once(self) -> None:
        """One record per task: in ``pending`` while pending or running (a running one also has
        a lease marker in ``in_progress``), else in the column family of its final state."""
        tasks = self.model.tasks.values()
        records: list[str] = []
        for key, value in self.store.items(CF.PENDING):
            task = msgspec.msgpack.decode(value, type=Task)
            t = self.model.tasks[task.id]
            assert split_pending_key(key) == (t.queue, t.priority, t.seq), task.id
            records.append(task.id)
        assert sorted(records) == sorted(t.id for t in tasks if t.state in (PENDING, RUNNING))
        marks = sorted(k.decode() for k in self.store.keys(CF.IN_PROGRESS))
        assert marks == sorted(t.id for t in tasks if t.state is RUNNING)
        for state, cf in TERMINAL_CFS.items():
            stored = [k.decode() for k in self.store.keys(cf)]
            assert sorted(stored) == sorted(t.id for t in tasks if t.state is state), state
            records.extend(stored)
        assert len(records) == len(set(records)), "a task has two records"
        assert sorted(k.decode() for k in self.store.keys(CF.IDS)) == sorted(self.model.tasks)

    @invariant()
    def one_live_lease_per_running_task(self) -> None:
        running = {t.id: t for t in self.model.tasks.values() if t.state is RUNNING}
        assert set(self.sm.leases) == set(running)
        for task_id, lease in self.sm.leases.items():
            assert lease.token == running[task_id].token
            assert lease.worker_id == running[task_id].worker
            assert lease.deadline_ms == running[task_id].deadline, task_id
        tokens = [lease.token for lease in self.sm.leases.values()]
        assert len(tokens) == len(set(tokens)), "two live leases share a fencing token"
        assert all(0 < token < self.model.next_token for token in tokens)
        assert set(self.sm.workers) == set(self.model.workers)
        held: list[str] = []
        for worker_id, worker in self.sm.workers.items():
            assert worker.leases == self.model.workers[worker_id].leases, worker_id
            held.extend(worker.leases)
        assert len(held) == len(set(held)), "a task is leased to two workers"

    @invariant()
    def counts_match(self) -> None:
        assert self.sm.counts == self.model.counts()
        assert self.sm.counters == {k: v for k, v in self.model.counters.items() if v}
        for (queue, priority), fifo in self.model.ready.items():
            rq = self.sm.ready.get(queue)
            assert (rq.count(priority) if rq else 0) == len(fifo), (queue, priority)
        for queue in CLAIM_QUEUES:
            has = any(self.model.ready.get((queue, p)) for p in Priority)
            assert self.sm.has_ready([queue]) == has
        tasks = self.model.tasks.values()
        stats = self.sm.queue_stats()
        for queue in CLAIM_QUEUES:
            want = QueueStats(
                pending={p.label: len(self.model.ready.get((queue, p), [])) for p in Priority},
                running=sum(t.state is RUNNING and t.queue == queue for t in tasks),
                delayed=sum(t.state is FAILED and t.queue == queue for t in tasks),
            )
            got = stats.get(queue, QueueStats(pending={p.label: 0 for p in Priority}))
            assert (got.pending, got.running, got.delayed) == (
                want.pending,
                want.running,
                want.delayed,
            ), queue

    @invariant()
    def never_sleeps_past_a_deadline(self) -> None:
        """The broker sleeps until next_deadline_ms(): never later than the model's next due
        event (earlier is only a spurious wake-up, e.g. the timer of a cancelled retry)."""
        want = self.model.next_deadline()
        got = self.sm.next_deadline_ms()
        if want is not None:
            assert got is not None
            assert got <= want, (got, want)


class ReplayMachine(QueueMachine):
    """Teardown replays the recorded history on a fresh store: same results, same bytes."""

    def restart_points(self) -> set[int]:
        """Before which entries the replay restarts: where the original did."""
        return {i for i, entry in enumerate(self.history) if entry[0] == "restart"}

    def teardown(self) -> None:
        root = tempfile.mkdtemp(prefix="tq-replay-")
        path = f"{root}/store"
        store = Store(path)
        store.open()
        restarts = self.restart_points()
        try:
            sm = self._machine(store)
            for i, entry in enumerate(self.history):
                if i in restarts:
                    store.close()
                    store = Store(path)
                    store.open()
                    sm = self._machine(store)
                    sm.recover()
                if entry[0] == "restart":  # (the replay restarts before entry i, if it does)
                    continue
                _, now, commands, results = entry
                assert normalize(sm.apply(now, commands).results) == results, (i, commands)
            assert dump_store(store) == dump_store(self.store)
            assert sm.counts == self.sm.counts
            assert sm.counters == self.sm.counters
            assert (sm.next_seq, sm.next_token) == (self.sm.next_seq, self.sm.next_token)
        finally:
            store.close()
            shutil.rmtree(root, ignore_errors=True)
            super().teardown()


class ReplicaMachine(ReplayMachine):
    """The replay restarts where the original did not (and not where it did): a follower
    killed and restarted mid-run while the leader went on must give the same results and hold
    the same bytes, or it has diverged (it would, were lease deadlines or the worker table kept
    in memory only: its next Tick would expire what the others keep)."""

    def restart_points(self) -> set[int]:
        n = len(self.history)
        original = super().restart_points()
        return {i for i in (n // 4, n // 2, 3 * n // 4) if i not in original and 0 < i < n}


class RecoveryMachine(QueueMachine):
    """Teardown closes the store, reopens it and recovers: every task is still there, under the
    same lease with the same deadline, and once the workers have been silent past the timeout
    and the leases past their deadlines a Tick puts every task that was running back to pending
    (or dead if out of attempts)."""

    def teardown(self) -> None:
        try:
            before = {t.id: t.state for t in self.model.tasks.values()}
            self.restart()
            self.no_task_is_lost()
            self.store_holds_each_task_exactly_once()
            self.one_live_lease_per_running_task()
            self.counts_match()
            assert {t.id: t.state for t in self.model.tasks.values()} == before
            self.now += max(self.lease_ms, self.heartbeat_timeout_ms) + 1
            self.apply([Tick()])
            assert not self.sm.leases
            for task_id, state in before.items():
                now = self.model.tasks[task_id].state
                if state is RUNNING:
                    assert now in (PENDING, DEAD)
                elif state is not FAILED:  # a failed task may have become due meanwhile
                    assert now is state
            self.no_task_is_lost()
            self.counts_match()
        finally:
            super().teardown()


TestStateMachine = QueueMachine.TestCase
TestStateMachine.settings = SETTINGS
TestReplayIsDeterministic = ReplayMachine.TestCase
TestReplayIsDeterministic.settings = TEARDOWN_SETTINGS
TestRecoveryKeepsEveryTask = RecoveryMachine.TestCase
TestRestartedReplicaDoesNotDiverge = ReplicaMachine.TestCase
TestRestartedReplicaDoesNotDiverge.settings = TEARDOWN_SETTINGS
TestRecoveryKeepsEveryTask.settings = TEARDOWN_SETTINGS


# --- example-based checks of the same properties ------------------------------------------------


def _open(path: str) -> tuple[Store, StateMachine]:
    store = Store(path)
    store.open()
    return store, make_machine(store)


def test_recover_after_reopen_keeps_pending_failed_and_running_tasks() -> None:
    root = tempfile.mkdtemp(prefix="tq-recover-")
    path = f"{root}/store"
    store, sm = _open(path)
    try:
        specs = [TaskSpec(id=f"t{i}", name="job", payload=b"x", queue="alpha") for i in range(4)]
        specs.append(TaskSpec(id="t4", name="job", payload=b"x", queue="beta", max_retries=0))
        sm.apply(START_MS, [Submit(specs)])
        (leased,) = sm.apply(START_MS, [Claim("w1", ["alpha", "beta"], 2)]).results
        assert [lt.task.id for lt in leased] == ["t0", "t1"]
        outcome = Outcome("t0", leased[0].token, ok=False, error=ErrorInfo("E", "x"))
        sm.apply(START_MS, [Report("w1", [outcome])])  # t0 failed, waits for its retry
        (tail,) = sm.apply(START_MS, [Claim("w2", ["beta"], 1)]).results  # t4: last attempt
        store.close()

        store, sm = _open(path)
        sm.recover()
        tasks = {f"t{i}": sm.get_task(f"t{i}") for i in range(5)}
        assert {k: t.state if t else None for k, t in tasks.items()} == {
            "t0": "failed", "t1": "running", "t2": "pending", "t3": "pending", "t4": "running"
        }  # fmt: skip
        assert tasks["t1"].worker_id == "w1"  # type: ignore[union-attr]
        assert tasks["t1"].attempt == tasks["t4"].attempt == 1  # type: ignore[union-attr]
        expected_counts = {"pending": 2, "running": 2, "failed": 1}
        assert {k: v for k, v in sm.counts.items() if v} == expected_counts
        assert set(sm.leases) == {"t1", "t4"}

        assert sm.apply(START_MS + 1, [Tick()]).results == [0]  # the leases still hold
        assert {k: lease.deadline_ms for k, lease in sm.leases.items()} == {
            "t1": START_MS + LEASE_MS, "t4": START_MS + LEASE_MS
        }  # fmt: skip
        assert set(sm.workers) == {"w1", "w2"}
        assert sm.workers["w1"].leases == {"t1"}
        # Past the deadlines (and the heartbeat timeout): both leases end, one task back to
        # pending, the other to the dead letters (out of attempts); t0's retry is due too.
        (moved,) = sm.apply(START_MS + LEASE_MS, [Tick()]).results
        assert moved == 3
        assert sm.get_task("t1").state == "pending"  # type: ignore[union-attr]
        assert sm.get_task("t4").state == "dead"  # type: ignore[union-attr]
        assert sm.get_task("t0").state == "pending"  # type: ignore[union-attr]
        assert not sm.leases
        assert not sm.workers  # both silent past the timeout
        assert {k: v for k, v in sm.counts.items() if v} == {"pending": 4, "dead": 1}
        (again,) = sm.apply(START_MS + LEASE_MS, [Claim("w3", ["alpha"], 5)]).results
        assert sorted(lt.task.id for lt in again) == ["t0", "t1", "t2", "t3"]
        assert all(lt.token > tail[0].token for lt in again)  # tokens never reused
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def _ready_lines(sm: StateMachine) -> dict[tuple[str, int], list[int]]:
    """Every queue's ready line per priority, as claims would take it."""
    return {
        (queue, p): [seq for seq in rq.arrays[p][rq.heads[p] :] if seq not in rq.dead]
        for queue, rq in sm.ready.items()
        for p in Priority
        if rq.count(p)
    }


def test_recovery_rebuilds_ready_lines_read_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery reads the pending keys in slices and whole runs (``pending_runs``): lines cut
    across slices, several queues and priorities, running tasks (still in ``pending``) left out,
    come back exactly as the live machine holds them."""
    import tq.store.keys

    monkeypatch.setattr(tq.store.keys, "RUN_SLICE", 3)
    root = tempfile.mkdtemp(prefix="tq-recover-slices-")
    path = f"{root}/store"
    store, sm = _open(path)
    try:
        specs = [
            TaskSpec(id=f"t{i:02}", name="job", payload=b"", queue=q, priority=p)
            for i, (q, p) in enumerate(itertools.product(["a", "bb", "c"] * 3, Priority))
        ]
        sm.apply(START_MS, [Submit(specs)])
        (leased,) = sm.apply(START_MS, [Claim("w1", ["a", "bb"], 4)]).results
        ref = LeaseRef(leased[1].task.id, leased[1].token)
        sm.apply(START_MS, [Release("w1", [ref])])  # back in line, at its end
        live, counts = _ready_lines(sm), dict(sm.counts)
        assert sum(map(len, live.values())) == len(specs) - 3
        store.close()

        store, sm = _open(path)
        sm.recover()
        assert _ready_lines(sm) == live
        assert sm.counts == counts
        assert sm.next_seq == len(specs) + 2  # numbers from 1; the release took one more
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("how", ["release", "worker_lost", "lease_expired"])
def test_recovered_machine_claims_like_the_live_one(how: str) -> None:
    """Two brokers, same history; one restarts when no lease is outstanding. Their stores are
    byte-identical, so the next Claim must lease the same task on both."""
    roots = [tempfile.mkdtemp(prefix="tq-diverge-") for _ in range(2)]
    opened: list[Store] = []
    try:
        claimed = []
        dumps = []
        for restart, root in zip((False, True), roots, strict=True):
            store, sm = _open(f"{root}/store")
            opened.append(store)
            specs = [TaskSpec(id=i, name="job", payload=b"", queue="alpha") for i in "AB"]
            sm.apply(START_MS, [Submit(specs)])
            ((lease,),) = sm.apply(START_MS, [Claim("w1", ["alpha"], 1)]).results
            assert lease.task.id == "A"
            now = START_MS + 1
            if how == "release":
                sm.apply(now, [Release("w1", [LeaseRef("A", lease.token)])])
            elif how == "worker_lost":
                sm.apply(now, [WorkerLost("w1")])
            else:
                now += LEASE_MS
                sm.apply(now, [Extend("w1", []), Tick()])  # w1 alive, its lease expired
            assert sm.get_task("A").state == "pending"  # type: ignore[union-attr]
            assert not sm.leases
            dumps.append(dump_store(store))
            if restart:
                store.close()
                store, sm = _open(f"{root}/store")
                opened[-1] = store
                sm.recover()
            ((first,),) = sm.apply(now + 1, [Claim("w2", ["alpha"], 1)]).results
            claimed.append(first.task.id)
        assert dumps[0] == dumps[1]
        assert claimed[0] == claimed[1], f"live broker leased {claimed[0]}, restarted {claimed[1]}"
    finally:
        for store in opened:
            store.close()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def test_resubmits_are_found_above_and_below_the_id_watermark_and_after_recovery() -> None:
    """Ids above every stored id skip the lookup (``max_id``); repeats must still be found:
    later in the same apply, below the watermark, and after a restart."""
    root = tempfile.mkdtemp(prefix="tq-ids-")
    path = f"{root}/store"
    store, sm = _open(path)

    def spec(task_id: str) -> TaskSpec:
        return TaskSpec(id=task_id, name="job", payload=b"x", queue="alpha")

    try:
        sm.apply(START_MS, [Submit([spec("b")]), Submit([spec("b"), spec("c")])])
        assert sm.counts["pending"] == 2
        assert sm.max_id == b"c"
        sm.apply(START_MS, [Submit([spec("a"), spec("c"), spec("d")])])  # a: below, looked up
        assert sm.counts["pending"] == 4
        store.close()

        store, sm = _open(path)
        sm.recover()
        assert sm.max_id == b"d"
        sm.apply(START_MS, [Submit([spec("d"), spec("e"), spec("a")])])
        assert sm.counts["pending"] == 5
        assert sorted(t.id for t in sm.list_tasks(TaskState.PENDING, None, None, 10, None)[0]) == [
            "a", "b", "c", "d", "e"
        ]  # fmt: skip
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_stale_retry_timer_decides_nothing() -> None:
    """A failed task cancelled leaves its retry timer behind in memory (a recovered heap does
    not have it). Once retention frees the id and the same id is submitted and fails again, the
    old timer must not fire the new retry early: the live and the restarted machine agree."""
    roots = [tempfile.mkdtemp(prefix="tq-stale-") for _ in range(2)]
    opened: list[Store] = []
    spec = TaskSpec(id="t", name="job", payload=b"", queue="alpha", max_retries=3, backoff_s=10)
    boom = ErrorInfo("E", "x")
    try:
        outcomes = []
        for restart, root in zip((False, True), roots, strict=True):
            store, sm = _open(f"{root}/store")
            opened.append(store)
            sm.apply(START_MS, [Submit([spec])])
            ((lease,),) = sm.apply(START_MS, [Claim("w1", ["alpha"], 1)]).results
            sm.apply(START_MS, [Report("w1", [Outcome("t", lease.token, False, error=boom)])])
            ((first_eta, _),) = sm.timers
            sm.apply(START_MS + 1, [Cancel("t")])
            sm.apply(START_MS + 2, [Retention(START_MS + 3, ["t"])])  # the id is free again
            sm.apply(START_MS + 3, [Submit([spec])])
            ((lease,),) = sm.apply(START_MS + 3, [Claim("w1", ["alpha"], 1)]).results
            failed_at = first_eta - 1_000  # the new retry is due well after the old one
            sm.apply(failed_at, [Report("w1", [Outcome("t", lease.token, False, error=boom)])])
            if restart:
                store.close()
                store, sm = _open(f"{root}/store")
                opened[-1] = store
                sm.recover()
            outcomes.append((sm.apply(first_eta, [Tick()]).results, dump_store(store)))
            assert sm.get_task("t").state == "failed"  # type: ignore[union-attr]
        assert outcomes[0] == outcomes[1]
    finally:
        for store in opened:
            store.close()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def test_a_list_page_ends_early_once_its_results_add_up_to_max_bytes() -> None:
    """Fifty big results made one list reply bigger than the frame limit."""
    root = tempfile.mkdtemp(prefix="tq-list-bytes-")
    store, sm = _open(f"{root}/store")
    try:
        ids = [f"t{i}" for i in range(6)]
        sm.apply(START_MS, [Submit([TaskSpec(id=t, name="job", payload=b"") for t in ids])])
        (leases,) = sm.apply(START_MS, [Claim("w1", ["default"], 6)]).results
        done = [Outcome(lt.task.id, lt.token, True, result=b"r" * 1000) for lt in leases]
        sm.apply(START_MS, [Report("w1", done)])
        pages: list[list[str]] = []
        after: str | None = None
        while True:
            page, after = sm.list_tasks(TaskState.COMPLETED, None, None, 100, after, 2000)
            pages.append([t.id for t in page])
            if after is None:
                break
        assert pages == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], []]
        one, _ = sm.list_tasks(TaskState.COMPLETED, None, None, 100, None, 1)
        assert [t.id for t in one] == ["t0"]  # never an empty page with a cursor
        everything, cursor = sm.list_tasks(TaskState.COMPLETED, None, None, 100, None)
        assert len(everything) == 6
        assert cursor is None
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_lease_listed_twice_does_not_hide_an_unlisted_one() -> None:
    """The unlisted-lease check compared counts: a heartbeat naming lease A twice and lease B
    never kept B until its lease ran out, instead of handing it back at once."""
    root = tempfile.mkdtemp(prefix="tq-hb-repeat-")
    store, sm = _open(f"{root}/store")
    try:
        specs = [TaskSpec(id=t, name="job", payload=b"") for t in ("a", "b")]
        sm.apply(START_MS, [RegisterWorker("w1"), Submit(specs)])
        (leases,) = sm.apply(START_MS, [Claim("w1", ["default"], 2)]).results
        first = LeaseRef(leases[0].task.id, leases[0].token)
        sm.apply(START_MS + UNLISTED_GRACE_MS + 1, [Extend("w1", [first, first])])
        assert [t.id for t in sm.list_tasks(TaskState.PENDING, None, None, 10, None)[0]] == ["b"]
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_cancelled_retry_does_not_wake_the_broker() -> None:
    """A failed task that is cancelled leaves its retry timer in the heap: the Tick ignores
    it, but ``next_deadline_ms`` still woke the broker for it, where a restarted machine (its
    heap rebuilt from the store) did not (found by test_restart_changes_nothing)."""
    root = tempfile.mkdtemp(prefix="tq-stale-wake-")
    store, sm = _open(f"{root}/store")
    # a retry due long before the worker's heartbeat deadline, so the timer decides the wake-up
    spec = TaskSpec(id="t", name="job", payload=b"", queue="alpha", max_retries=3, backoff_s=0.1)
    try:
        ((lease,),) = sm.apply(START_MS, [Submit([spec]), Claim("w1", ["alpha"], 1)]).results[1:]
        boom = ErrorInfo("E", "x")
        sm.apply(START_MS, [Report("w1", [Outcome("t", lease.token, False, error=boom)])])
        ((eta, _),) = sm.timers
        assert sm.next_deadline_ms() == eta
        sm.apply(START_MS + 1, [Cancel("t")])
        assert sm.next_deadline_ms() != eta
        assert sm.timers == []
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
