"""The broker core: turns requests into command batches, one per loop tick, and replies after the
batch is durable.

It also owns what is connection-shaped rather than state: claims parked until a task is ready
(long poll), waiters for a task's final state, the timer that drives lease expiry and retries, and
informational worker metrics (CPU, memory) that do not belong in the replicated state.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tq._version import __version__
from tq.broker.commands import Claim, Command, Retention, Submit, Tick
from tq.broker.log import LocalLog
from tq.broker.placement import place_loop_thread
from tq.logfields import kv
from tq.spin import Spinner

if TYPE_CHECKING:
    from tq.broker.cluster import ClusterLog
import msgspec

from tq.broker.state import ApplyResult, RetentionCursor, StateMachine
from tq.broker.watch import WatchHub, watch_counters
from tq.config import MAX_WAIT_S, BrokerConfig
from tq.errors import (
    BadRequest,
    InvalidState,
    ShuttingDown,
    TaskNotFound,
    TqError,
    WaitTimeout,
)
from tq.model import RetryPolicy, Task, TaskState
from tq.protocol.messages import QueueStats, Stats
from tq.store import Store

log = logging.getLogger("tq.broker")

Reply = Callable[[Any], None]
RETENTION_SCAN = 20_000  # finished records looked at per retention run
JOURNAL_FILE = "tq-journal"  # beside RocksDB's files in a single node's data dir
TICK_RESEND_S = 2.0  # a Tick not applied by then (lost in a leader change) is sent again
MAX_WAIT_MS = int(MAX_WAIT_S * 1000)  # a longer wait is clamped to this (clients refuse it)
TICK_RETRY_S = 0.1  # after a Tick failed (a full Raft queue, a term change): not at once


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _coalesce_submits(
    items: list[tuple[Command, Reply | None]],
) -> tuple[list[Command], list[Reply | None]]:
    """Merge each run of adjacent Submit commands of one tick into one: a pipelining client sends
    hundreds of single-task submits per tick, and one big command costs far less to apply than
    many small ones. Order is kept; the merged result is split back into one reply per request."""
    cmds: list[Command] = []
    replies: list[Reply | None] = []
    run: list[tuple[Submit, Reply | None]] = []

    def close_run() -> None:
        if len(run) == 1:
            cmds.append(run[0][0])
            replies.append(run[0][1])
        elif run:
            cmds.append(Submit([spec for cmd, _ in run for spec in cmd.specs]))
            replies.append(_splitter([(reply, len(cmd.specs)) for cmd, reply in run]))
        run.clear()

    for cmd, reply in items:
        if isinstance(cmd, Submit):
            run.append((cmd, reply))
        else:
            close_run()
            cmds.append(cmd)
            replies.append(reply)
    close_run()
    return cmds, replies


def _splitter(parts: list[tuple[Reply | None, int]]) -> Reply:
    def split(value: Any) -> None:
        offset = 0
        for reply, n in parts:
            if reply is not None:
                if isinstance(value, BaseException):
                    reply(value)
                else:
                    reply((value[0][offset : offset + n], []))
            offset += n

    return split


@dataclass(slots=True, eq=False)
class ParkedClaim:
    worker_id: str
    queues: list[str]
    max: int
    reply: Reply
    owner: object
    timer: asyncio.TimerHandle | None = None
    dropped: bool = False  # its connection closed (or its worker was lost) while being served
    ended: bool = False  # answered while being served (a release): reply, never park again


class _PendingWait:
    """A wait that starts once the writes sent before it are applied. Until then it can end
    (withdrawn, or its connection gone) and then never starts; after, ending it ends the wait."""

    __slots__ = ("_begin", "_begun", "_ended", "_owned", "_started")

    def __init__(
        self,
        begin: Callable[[], Callable[[], bool] | None],
        owned: set[_Wait | _PendingWait] | None,
    ) -> None:
        self._begin, self._owned = begin, owned
        self._started: Callable[[], bool] | None = None
        self._begun = False
        self._ended = False
        if owned is not None:
            owned.add(self)

    def start(self) -> None:
        if self._ended:
            return
        if self._owned is not None:
            self._owned.discard(self)
        self._begun = True
        self._started = self._begin()

    def end(self) -> bool:
        """End it; True if that stopped an answer, False if one is coming (or came) anyway:
        a wait that found its task final or missing has its reply on the way."""
        if self._ended:
            return False
        self._ended = True
        if self._owned is not None:
            self._owned.discard(self)
        if not self._begun:
            return True
        return self._started() if self._started is not None else False


class _Wait:
    """One client waiting for one task to finish. It ends once: answered (the task, a timeout,
    a refusal), or without an answer when its connection goes or the client withdraws it;
    either way its timer stops and it leaves the task's waiters and its owner's set."""

    __slots__ = ("_done", "_owned", "_reply", "_task_id", "_timer", "_waiters")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        waiters: dict[str, list[Reply]],
        task_id: str,
        timeout_ms: int,
        reply: Reply,
        owned: set[_Wait | _PendingWait] | None,
    ) -> None:
        self._done = False
        self._waiters, self._task_id, self._reply, self._owned = waiters, task_id, reply, owned
        # Clamped: a timeout beyond a year (or one a client sent as 2**63) is not a timer.
        delay_s = min(max(timeout_ms, 0), MAX_WAIT_MS) / 1000
        self._timer = loop.call_later(delay_s, self._time_out, timeout_ms)
        waiters.setdefault(task_id, []).append(self.answer)
        if owned is not None:
            owned.add(self)

    def answer(self, value: Any) -> None:
        if self._finish():
            self._reply(value)

    def end(self) -> bool:
        """No answer at all; True if it was still unanswered."""
        return self._finish()

    def _time_out(self, timeout_ms: int) -> None:
        if self._finish():
            self._reply(WaitTimeout(f"task {self._task_id} did not finish within {timeout_ms} ms"))

    def _finish(self) -> bool:
        if self._done:
            return False
        self._done = True
        self._timer.cancel()
        lst = self._waiters.get(self._task_id)
        if lst is not None and self.answer in lst:
            lst.remove(self.answer)
            if not lst:
                del self._waiters[self._task_id]
        if self._owned is not None:
            self._owned.discard(self)
        return True


class BrokerCore:
    def __init__(self, config: BrokerConfig, clock: Callable[[], int] = wall_ms) -> None:
        self.config = config
        self.clock = clock
        self.store = Store(
            os.path.join(config.data_dir, "store") if config.clustered else config.data_dir
        )
        self.sm = StateMachine(
            self.store,
            lease_ms=int(config.lease_s * 1000),
            heartbeat_timeout_ms=int(config.heartbeat_timeout_s * 1000),
            retry=RetryPolicy(base_s=config.retry_base_s, max_s=config.retry_max_s),
        )
        self.log: LocalLog | ClusterLog
        if config.clustered:
            from tq.broker.cluster import ClusterLog  # pysyncobj only when clustering

            self.node_id = config.node_id or f"{config.host}:{config.raft_port}"
            self.log = ClusterLog(
                self.store,
                self.sm,
                self._fatal,
                self._on_applied,
                node_id=self.node_id,
                raft_address=f"{config.host}:{config.raft_port}",
                peers=list(config.peers),
                client_address=f"tcp://{config.host}:{config.port}",
                data_dir=config.data_dir,
                password=config.raft_secret,
                bind_address=config.raft_bind,
                compaction_min_entries=config.compaction_min_entries,
                on_role_change=self._role_changed,
            )
        else:
            self.node_id = "single"
            self.log = LocalLog(
                self.store,
                self.sm,
                self._fatal,
                self._on_applied,
                journal_path=os.path.join(config.data_dir, JOURNAL_FILE),
                journal_bytes=config.journal_bytes,
                spin_us=config.spin_us,
            )
            # a commit's replies leave as soon as they are queued (see TcpServer.flush)
            self.log.on_delivered = self._replies_queued
        # Polls the TCP connections for the next request before the loop sleeps (tq/spin.py). A
        # single node only: a cluster node's commits come from the Raft thread, which a poll of
        # the sockets would not see.
        self.spinner = Spinner(0 if config.clustered else config.spin_us)
        self.started_at = time.monotonic()
        self.fatal: BaseException | None = None
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[tuple[Command, Reply | None]] = []
        self._tick_scheduled = False
        self._parked: dict[int, ParkedClaim] = {}
        # Parked claims taken off ``_parked`` to be served, until their commit is durable: a
        # connection that closes meanwhile must still be able to drop them (see drop_parked).
        self._serving: dict[int, ParkedClaim] = {}
        self._waiters: dict[str, list[Reply]] = {}
        # Reads wait for the writes that came before them (see after_durable): the log appends
        # made and not yet answered, by number; the reads behind them, each with the number of
        # the last append it must see; and the reads that came while commands were queued for
        # the next tick, which get that tick's number once it is appended.
        self._appends = 0
        self._appends_open: set[int] = set()
        self._reads_waiting: collections.deque[tuple[int, Callable[[], None]]] = collections.deque()
        self._reads_after_tick: list[Callable[[], None]] = []
        self._owned_waits: dict[object, set[_Wait | _PendingWait]] = {}  # see drop_waits
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0
        self._tick_in_flight = False
        self._tick_gen = 0  # which Tick is in flight: a late reply of a resent one is ignored
        self._retention: asyncio.TimerHandle | None = None
        # where the next retention scan resumes: a column family and a key in it
        self._retention_cursor: RetentionCursor | None = None
        self._rate_samples: deque[tuple[float, dict[str, int], dict[str, int]]] = deque(maxlen=61)
        self._rate_timer: asyncio.TimerHandle | None = None
        self.worker_metrics: dict[str, dict[str, Any]] = {}
        self.on_worker_lost: Callable[[str], None] | None = None
        self.on_replies: Callable[[], None] | None = None  # a batch's replies are queued: send
        self.stopped = asyncio.Event()
        self.watch = WatchHub(self.sm, self.stats, self.clock, self.after_durable)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Owner-only when tq makes it: the store and the journal hold every task's payload.
        # (A data dir that already exists keeps the mode its owner gave it.)
        os.makedirs(self.config.data_dir, mode=0o700, exist_ok=True)
        self.store.open()
        if self.config.avoid_irq_cpus and not self.config.clustered:
            # After the store opened: RocksDB's own threads keep every CPU (see placement).
            cpus = place_loop_thread(self.config.data_dir)
            log.info("broker.placement", extra=kv(loop_cpus=sorted(cpus) if cpus else "any"))
        t0 = time.monotonic()
        # A single node's log opens the state machine itself, then applies what the journal
        # holds beyond the store; a cluster node's Raft log does that once it runs.
        if isinstance(self.log, LocalLog):
            replayed = self.log.recover()
        else:
            replayed = 0
            self.sm.recover()
        log.info(
            "store.recovered",
            extra=kv(
                pending=self.sm.counts["pending"],
                running=self.sm.counts["running"],
                replayed=replayed,
                seconds=round(time.monotonic() - t0, 3),
            ),
        )
        if isinstance(self.log, LocalLog):
            self.log.start(self._loop)
        self._arm_timer()
        self._schedule_retention()
        self._sample_rates()
        self.watch.start(self._loop)

    def start_replication(self, client_port: int) -> None:
        """Cluster mode, once the client port is bound: join the Raft group (the address this
        node announces when it leads must be the real one, even with ``--port 0``)."""
        if not isinstance(self.log, LocalLog):
            assert self._loop is not None
            self.log.client_address = f"tcp://{self.config.host}:{client_port}"
            self.log.start(self._loop)

    async def replication_bound(self) -> None:
        """Cluster mode: return once the Raft port is bound (``OSError`` if it cannot be)."""
        if not isinstance(self.log, LocalLog):
            await self.log.wait_bound()

    async def drain(self) -> None:
        """Stop taking commands, let the in-flight log write finish, close the store."""
        self.closing = True
        if self._queue:
            self._run_tick()
        done = asyncio.Event()
        self.log.when_durable(lambda _exc: done.set())
        await done.wait()
        self.watch.stop()
        for timer in (self._timer, self._retention, self._rate_timer):
            if timer is not None:
                timer.cancel()
        for parked in list(self._parked.values()):
            self._unpark(parked)
            parked.reply([])
        self.log.close()
        self.spinner.close()
        self.store.close()

    def _fatal(self, exc: BaseException) -> None:
        self.fatal = exc
        self.closing = True
        self.stopped.set()

    # --- commands --------------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """Only the leader serves (always true for a single node)."""
        return self.log.is_leader and not self.closing

    def refusal(self) -> TqError:
        if self.closing:
            return ShuttingDown("broker is shutting down")
        return self.log.not_leader()

    def submit(self, cmd: Command, reply: Reply | None) -> None:
        """Queue a command for this tick; ``reply`` gets its result once it is durable."""
        if not self.serving:
            if reply is not None:
                reply(self.refusal())
            return
        self._queue.append((cmd, reply))
        if not self._tick_scheduled:
            self._tick_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._run_tick)

    def _run_tick(self) -> None:
        self._tick_scheduled = False
        items, self._queue = self._queue, []
        if not items:
            return
        cmds, replies = _coalesce_submits(items)
        if self._reads_after_tick:
            # Before the append: a log that answers at once (a cluster node no longer leading)
            # releases the reads behind the batch in that answer, and reads queued after it
            # would wait for a later write that may never come.
            reads, self._reads_after_tick = self._reads_after_tick, []
            self._reads_waiting.extend((self._appends + 1, fn) for fn in reads)
        self._append(self.clock(), cmds, replies)
        self.log.kick()

    def _append(self, now: int, cmds: list[Command], replies: list[Reply | None]) -> None:
        """Append a batch to the log under the next number; reads behind it wait for its answer."""
        self._appends += 1
        number = self._appends
        self._appends_open.add(number)
        self.log.append(now, cmds, self._deliverer(replies, number))

    def _on_applied(self, result: ApplyResult) -> None:
        """Every applied batch passes here (on every node): serve parked claims at once."""
        for worker_id in result.lost_workers:
            # A worker declared lost must not get its own requeued tasks back through a claim
            # it parked earlier; its connection is closed so it reconnects and registers anew.
            for parked in [p for p in self._parked.values() if p.worker_id == worker_id]:
                self._unpark(parked)
            for parked in self._serving.values():
                if parked.worker_id == worker_id:
                    parked.dropped = True
            self.worker_metrics.pop(worker_id, None)
            if self.on_worker_lost is not None:
                self.on_worker_lost(worker_id)
        if self._parked and result.readied:
            self._serve_parked(self.clock())
        # After the apply, not after the append: in a cluster a command is applied only once
        # committed, and a timer armed from the state before it would miss what it changed (a
        # retry falling due, a new lease) until some unrelated command came along.
        self._arm_timer()

    def _replies_queued(self) -> None:
        if self.on_replies is not None:
            self.on_replies()

    def _deliverer(
        self, replies: list[Reply | None], number: int
    ) -> Callable[[ApplyResult | BaseException], None]:
        def deliver(outcome: ApplyResult | BaseException) -> None:
            try:
                answer(outcome)
            finally:
                self._appends_open.discard(number)
                self._release_reads()

        def answer(outcome: ApplyResult | BaseException) -> None:
            if isinstance(outcome, BaseException):
                err = (
                    outcome
                    if isinstance(outcome, TqError)
                    else TqError(f"log write failed: {outcome}")
                )
                for reply in replies:
                    if reply is not None:
                        reply(err)
                return
            for reply, value in zip(replies, outcome.results, strict=True):
                if reply is not None:
                    reply(value)
            if outcome.finished and self._waiters:
                for task in outcome.finished:
                    for waiter in self._waiters.pop(task.id, ()):
                        waiter(task)

        return deliver

    def after_durable(self, fn: Callable[[], None]) -> None:
        """Run a read once every write that came before it is applied and durable: no reply
        reveals unsaved state, and a read sees the writes sent before it. A client that sent
        ``submit(x)`` and ``status(x)`` in one write got TASK_NOT_FOUND: the submit waited in
        the tick's queue while the read ran at once (and in a cluster, a write appended to the
        log is applied only once a majority has it)."""
        if self._queue:
            self._reads_after_tick.append(fn)
        elif self._appends_open:
            self._reads_waiting.append((self._appends, fn))
        else:
            self._read_when_durable(fn)

    def _writes_ahead(self) -> bool:
        return bool(self._queue or self._appends_open)

    def _read_when_durable(self, fn: Callable[[], None]) -> None:
        def run(exc: BaseException | None) -> None:
            if exc is None:
                fn()

        self.log.when_durable(run)

    def _release_reads(self) -> None:
        """An append was answered: run the reads whose writes all are (appends are answered in
        order, except a cluster's refusals, hence the lowest open number)."""
        lowest = min(self._appends_open, default=self._appends + 1)
        waiting = self._reads_waiting
        while waiting and waiting[0][0] < lowest:
            self._read_when_durable(waiting.popleft()[1])

    # --- claims ----------------------------------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        queues: list[str],
        n: int,
        wait_ms: int,
        reply: Reply,
        owner: object,
    ) -> None:
        """Lease up to ``n`` tasks now, or park the claim until one is ready (long poll)."""
        if not self.serving:
            reply(self.refusal())
            return
        if wait_ms <= 0 or self.sm.has_ready(queues):
            self.submit(Claim(worker_id, queues, n), reply)
            return
        self._park(ParkedClaim(worker_id, queues, n, reply, owner), wait_ms)

    def _park(self, parked: ParkedClaim, wait_ms: int) -> None:
        assert self._loop is not None
        self._parked[id(parked)] = parked

        def expire() -> None:
            if self._parked.pop(id(parked), None) is not None:
                parked.reply([])

        parked.timer = self._loop.call_later(wait_ms / 1000, expire)

    def _unpark(self, parked: ParkedClaim) -> None:
        self._parked.pop(id(parked), None)
        if parked.timer is not None:
            parked.timer.cancel()

    def drop_parked(self, owner: object, answer: bool = False) -> None:
        """Forget ``owner``'s parked claims (its connection closed); with ``answer``, reply to
        each with no tasks."""
        for parked in [p for p in self._parked.values() if p.owner is owner]:
            self._unpark(parked)
            if answer:
                parked.reply([])
        # Those being served must not be parked again when their commit comes back empty:
        # parked for a closed connection, the claim would lease the next ready task to a worker
        # nobody runs, and the task would wait out the heartbeat timeout and lose an attempt.
        # A connection still open (``answer``) gets their reply, tasks or none, like any other:
        # a stopping worker releases what arrives after its release.
        for parked in self._serving.values():
            if parked.owner is owner:
                if answer:
                    parked.ended = True
                else:
                    parked.dropped = True

    def _serve_parked(self, now: int) -> None:
        """Tasks became ready: lease them to parked claims in this tick (one fsync for both)."""
        serving: list[ParkedClaim] = []
        for parked in list(self._parked.values()):
            if self.sm.has_ready(parked.queues):
                self._unpark(parked)
                serving.append(parked)
        if not serving:
            return
        cmds: list[Command] = [Claim(p.worker_id, p.queues, p.max) for p in serving]
        for parked in serving:
            self._serving[id(parked)] = parked

        def reply_or_repark(parked: ParkedClaim) -> Reply:
            def reply(value: Any) -> None:
                self._serving.pop(id(parked), None)
                if parked.dropped:
                    # Nobody to answer. Tasks it leased anyway are requeued by the WorkerLost
                    # that the closing connection logged after this claim.
                    return
                if isinstance(value, list) and not value and not self.closing and not parked.ended:
                    self._park(parked, 1000)  # raced with another claim: wait again
                else:
                    parked.reply(value)

            return reply

        self._append(now, cmds, [reply_or_repark(p) for p in serving])

    # --- waiting for a result --------------------------------------------------------------------

    def wait(
        self, task_id: str, timeout_ms: int, reply: Reply, owner: object = None
    ) -> Callable[[], bool] | None:
        """Reply when the task is final, or with ``WaitTimeout``. An ``owner`` (a connection)
        can drop its waits with ``drop_waits`` when it goes: a client that gave up (Ctrl-C on
        ``tq wait``) must not leave a waiter, and its timer, behind until the timeout.

        Returns what ends this wait without a reply (the client withdrew it), or None when the
        answer is already decided (it is sent anyway)."""
        if not self.serving:
            reply(self.refusal())
            return None
        if self._writes_ahead():
            # The task may be in a write sent just before this wait: look it up after that.
            owned = self._owned_waits.setdefault(owner, set()) if owner is not None else None
            pending = _PendingWait(lambda: self._wait(task_id, timeout_ms, reply, owner), owned)
            self.after_durable(pending.start)
            return pending.end
        return self._wait(task_id, timeout_ms, reply, owner)

    def _wait(
        self, task_id: str, timeout_ms: int, reply: Reply, owner: object
    ) -> Callable[[], bool] | None:
        if not self.serving:
            # A wait that started late (behind a write): this node may have stopped leading
            # meanwhile, and a follower's state would answer it wrongly (or never).
            reply(self.refusal())
            return None
        task = self.sm.get_task(task_id)
        if task is None:
            self.after_durable(lambda: reply(TaskNotFound(f"no task {task_id[:80]}")))
            return None
        if TaskState(task.state).is_final:
            self.after_durable(lambda: reply(task))
            return None
        assert self._loop is not None
        owned = self._owned_waits.setdefault(owner, set()) if owner is not None else None
        return _Wait(self._loop, self._waiters, task_id, timeout_ms, reply, owned).end

    def drop_waits(self, owner: object) -> None:
        """``owner`` (a connection) is gone: its waits end without a reply."""
        for wait in list(self._owned_waits.pop(owner, ())):
            wait.end()

    # --- timers ----------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        """Wake up when the next Tick has work to do. Only the leader ticks; while a Tick is in
        flight its reply re-arms the timer."""
        if self._tick_in_flight or self.closing or not self.log.is_leader:
            return
        due = self.sm.next_deadline_ms()
        if due is None:
            return
        if self._timer is not None and self._timer_at <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        delay_s = max(0.0, (due - self.clock()) / 1000)
        self._timer_at = due
        self._timer = self._loop.call_later(delay_s, self._on_timer)

    def select_dead(
        self,
        ids: list[str] | None,
        *,
        queue: str | None = None,
        name: str | None = None,
        error_type: str | None = None,
        older_than_s: float | None = None,
        limit: int = 1000,
        after: str | None = None,
    ) -> list[Task]:
        """The dead-lettered tasks named by ``ids`` (if any) that match every filter given: the
        one selection behind ``tq dlq`` (TCP) and ``/api/v1/dead-letters`` (HTTP). Filters
        apply to named ids too, as documented: ``purge ID --queue q`` must not purge ``ID``
        from another queue.

        ``limit`` bounds a selection by filters only. Named ids are each selected when dead:
        cutting them to ``limit`` (1,000 by default) answered 200 for a retry of 1,200 ids and
        left 200 of them dead, saying nothing. What bounds the work instead is the number of
        ids, at most 10,000: the HTTP schema refuses more, and so does this for the TCP
        protocol, whose message has no such bound of its own (a 16 MiB frame holds some
        500,000 ids, each a store read on the event loop)."""
        max_ids = 10_000  # tcp.MAX_LIST (tcp imports this module, so it cannot be imported here)
        sm = self.sm
        if older_than_s is not None and not older_than_s >= 0:  # NaN fails this too
            raise BadRequest("older_than_s must be a number >= 0")
        if ids and len(ids) > max_ids:
            raise BadRequest(f"at most {max_ids:,} task ids at once (got {len(ids):,})")
        before = None
        if older_than_s is not None:
            # clamp: an absurd age means "everything", not an overflow
            before = self.clock() - int(min(older_than_s, 10 * 365 * 86400.0) * 1000)
        if ids:
            # dict.fromkeys: an id named twice is selected (and retried or purged) once
            found = (sm.get_task(i) for i in dict.fromkeys(ids))
            return [
                t
                for t in found
                if t is not None
                and t.state == "dead"
                and (queue is None or t.queue == queue)
                and (name is None or t.name == name)
                and (error_type is None or (t.error is not None and t.error.type == error_type))
                and (before is None or t.finished_at_ms < before)
            ]
        return sm.dead_letters(
            queue=queue,
            name=name,
            error_type=error_type,
            finished_before_ms=before,
            limit=limit,
            after=after,
        )

    def cluster_change(self, op: str, address: str, reply: Reply) -> None:
        if not self.config.clustered:
            reply(BadRequest("this broker runs single-node: there is no cluster to change"))
            return
        if not self.serving:
            reply(self.refusal())
            return
        assert not isinstance(self.log, LocalLog)
        if op == "remove" and address == self.log.raft_address:
            reply(
                InvalidState(
                    f"{address} is the leader: stop it (the others elect a new leader), "
                    "then remove it through the new leader"
                )
            )
            return
        fut = self.log.add_node(address) if op == "add" else self.log.remove_node(address)

        def done(f: asyncio.Future[None]) -> None:
            exc = f.exception()
            if exc is None:
                log.info("cluster.membership_changed", extra=kv(op=op, address=address))
                reply(None)
            else:
                reply(self.refusal() if not self.serving else InvalidState(str(exc)))

        fut.add_done_callback(done)

    def _role_changed(self, role: str) -> None:
        """Cluster mode: a new leader drives the timers; a node that stopped leading lets go of
        the claims and waits it was holding (clients retry at the new leader)."""
        if role == "leader":
            self._arm_timer()
            return
        for parked in list(self._parked.values()):
            self._unpark(parked)
            parked.reply(self.refusal())
        waiters, self._waiters = self._waiters, {}
        for lst in waiters.values():
            for waiter in lst:
                waiter(self.refusal())

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = 0
        due = self.sm.next_deadline_ms()
        if due is None or due > self.clock():
            self._arm_timer()
            return
        # One Tick at a time. In a cluster it is applied once committed, and until then the state
        # still says a Tick is due: re-arming at once sent Tick after Tick into the log.
        self._tick_in_flight = True
        self._tick_gen += 1
        gen = self._tick_gen
        assert self._loop is not None
        self._timer = self._loop.call_later(TICK_RESEND_S, self._tick_lost)
        self.submit(Tick(), lambda result: self._tick_done(gen, result))

    def _tick_done(self, gen: int, result: object) -> None:
        if gen != self._tick_gen:
            return  # the reply of a Tick given up for lost: the one sent since is in flight
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(result, BaseException) and not self.closing:
            # Refused or failed while this node may still lead: the state still says a Tick is
            # due, and re-arming would send the next one at once, every loop iteration.
            assert self._loop is not None
            self._timer = self._loop.call_later(TICK_RETRY_S, self._tick_lost)
            return
        self._tick_in_flight = False
        self._arm_timer()

    def _tick_lost(self) -> None:
        self._timer = None
        self._tick_in_flight = False
        self._arm_timer()

    def _schedule_retention(self) -> None:
        assert self._loop is not None

        def run() -> None:
            if not self.serving:  # followers apply the leader's Retention commands instead
                self._schedule_retention()
                return
            cutoff = self.clock() - int(self.config.retention_s * 1000)
            ids, self._retention_cursor = self.sm.retention_candidates(
                cutoff, self._retention_cursor, RETENTION_SCAN
            )
            if ids:
                self.submit(Retention(cutoff, ids), None)
            self._schedule_retention()

        self._retention = self._loop.call_later(self.config.retention_interval_s, run)

    # --- read side -------------------------------------------------------------------------------

    def _sample_rates(self) -> None:
        """Once a second: per-queue totals, so stats can show in/out rates over a minute."""
        assert self._loop is not None
        self._rate_samples.append(
            (time.monotonic(), dict(self.sm.queue_in), dict(self.sm.queue_out))
        )
        self._rate_timer = self._loop.call_later(1.0, self._sample_rates)

    def queue_stats(self) -> dict[str, QueueStats]:
        stats = self.sm.queue_stats()
        if len(self._rate_samples) < 2:
            return stats
        t0, in0, out0 = self._rate_samples[0]
        t1, in1, out1 = self._rate_samples[-1]
        span = max(t1 - t0, 1e-3)
        return {
            queue: msgspec.structs.replace(
                qs,
                rate_in=round((in1.get(queue, 0) - in0.get(queue, 0)) / span, 2),
                rate_out=round((out1.get(queue, 0) - out0.get(queue, 0)) / span, 2),
            )
            for queue, qs in stats.items()
        }

    def stats(self) -> Stats:
        queues = self.queue_stats()
        # Stats list a bounded number of queues (StateMachine.queue_stats): say how many more
        # there are, here where every face (TCP, HTTP, tq top's snapshots) gets its stats.
        left_out = self.sm.queues_left_out
        return Stats(
            states=dict(self.sm.counts),
            queues=queues,
            workers=self.sm.worker_infos(self.worker_metrics),
            version=__version__,
            node_id=self.node_id,
            uptime_s=round(time.monotonic() - self.started_at, 3),
            counters=dict(self.sm.counters)
            | {"wal_flushes": self.log.flushes, "wal_commits": self.log.flushed_commits}
            | (self.log.counters() if isinstance(self.log, LocalLog) else {})
            | (
                {"spins": self.spinner.spins, "spin_hits": self.spinner.hits}
                if self.spinner.enabled
                else {}
            )
            | watch_counters(self.watch)
            | {"waits": sum(len(w) for w in self._waiters.values())}
            | ({"queues_left_out": left_out} if left_out else {}),
            cluster=self.log.status(),
        )
