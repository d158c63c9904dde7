"""The worker runtime: claim up to the free slots (long poll), run handlers, report results in
batches, heartbeat the leases it holds.

Lifecycle: ``run()`` until ``stop()`` (SIGTERM): stop claiming, let running tasks finish within
``grace_s``, hand back leases that arrive late, then cancel what is still running and leave (the
broker requeues those when the connection closes). ``burst=True`` returns once the queues are
empty, nothing runs and no task of them waits out a retry backoff, which is what tests and batch
jobs want.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import logging
import os
import re
import socket
from collections.abc import Callable
from typing import Any

import psutil

from tq.client import AsyncClient, decode_value, encode_payload
from tq.config import DEFAULT_FRAME_LIMIT
from tq.errors import (
    BadRequest,
    BrokerUnavailable,
    FrameTooLarge,
    InternalError,
    NotLeader,
    ShuttingDown,
    TqError,
    Unauthenticated,
    UnsupportedVersion,
)
from tq.logfields import kv
from tq.model import valid_name, valid_task_id
from tq.protocol.messages import (
    Ack,
    ClaimTask,
    GetStats,
    Heartbeat,
    Leased,
    LeasedTask,
    LeaseRef,
    Outcome,
    ReleaseTasks,
    Response,
    ResultBatch,
    StatsReply,
)
from tq.worker import context, outcomes
from tq.worker.builtin import register_builtins
from tq.worker.deadlines import Deadlines
from tq.worker.registry import Registry, registry
from tq.worker.threads import DaemonThreadPool

log = logging.getLogger("tq.worker")

CLAIM_WAIT_MS = 10_000
MAX_UNREPORTED = 10_000

# The broker refused to have this worker at all (its hello or its claims): retrying cannot change
# its mind, so the worker stops with the error (``tq worker`` prints it and exits 1).
FATAL = (Unauthenticated, UnsupportedVersion, BadRequest)
# Errors a result report may meet that a later resend can get past: the connection, a leader
# change, a broker stopping, a cluster entry applied without a result, or a frame limit that
# changed with the broker (results are fitted again to the new one). Any other refusal of a
# report (BAD_REQUEST, PAYLOAD_TOO_LARGE, ...) would be the same for every resend: those results
# are dropped, and the broker requeues their leases (their heartbeats no longer list them).
TRANSIENT_REPORT_ERRORS = (BrokerUnavailable, NotLeader, ShuttingDown, InternalError, FrameTooLarge)


class _Raised:
    """What a sync handler raised, handed back from its thread as a value: an exception set on a
    future is raised again through asyncio, which cannot take every exception (StopIteration
    cannot be set on an asyncio future: the run waited out its whole timeout, reported as
    TIMEOUT)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _call_sync(fn: Callable[[Any], Any], payload: Any) -> Any:
    """Run a sync handler (in a pool thread): its return value, or ``_Raised``."""
    try:
        return fn(payload)
    except BaseException as exc:
        return _Raised(exc)


def _default_worker_id() -> str:
    """``host-pid-xxxx``, a valid client id (1-64 of ``A-Za-z0-9_.:-``) whatever the host name:
    the broker refuses a hello with any other."""
    host = re.sub(r"[^A-Za-z0-9_.:-]", "-", socket.gethostname())[:48] or "worker"
    return f"{host}-{os.getpid()}-{os.urandom(2).hex()}"


class Worker:
    def __init__(
        self,
        broker: str | None = None,
        *,
        concurrency: int = 8,
        queues: tuple[str, ...] | list[str] = ("default",),
        handlers: Registry | None = None,
        heartbeat_s: float = 2.0,
        grace_s: float = 30.0,
        burst: bool = False,
        worker_id: str | None = None,
        token: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        # What the broker would refuse in the hello, refused here: as a BAD_REQUEST it read as
        # a broker that cannot be reached, retried forever.
        if not 1 <= len(queues) <= 100 or not all(valid_name(q) for q in queues):
            raise ValueError("queues must be 1-100 names of 1-200 of A-Za-z0-9_.:-")
        if worker_id is not None and not valid_task_id(worker_id):
            raise ValueError("worker_id must be 1-64 of A-Za-z0-9_.:-")
        self.broker = broker
        self.concurrency = concurrency
        self.queues = list(queues)
        self.handlers = handlers or registry
        self.heartbeat_s = heartbeat_s
        self.grace_s = grace_s
        self.burst = burst
        self._awaiting_retries = False  # burst mode: parked until a retry falls due
        self.worker_id = worker_id or _default_worker_id()
        self.token = token
        self.done = 0
        self.failed = 0
        # Runs by a worker-local id, not by task id (a stale and a fresh lease of one task are
        # different runs) nor by fencing token: a token is unique only per broker, and a broker
        # started afresh on the same address hands out token 1 again. Keyed by token, a new
        # lease overwrote a run still going: that run was no longer counted against
        # ``concurrency`` nor listed in heartbeats, so it was never cancelled as lease-lost.
        # (A deadline keyed by token once timed out another run too.)
        self._run_ids = itertools.count(1)
        self._running: dict[int, tuple[LeasedTask, asyncio.Task[None]]] = {}
        self._timed_out: set[int] = set()  # ids of runs cancelled by their deadline
        # Finished, result not yet acknowledged: waiting to be sent (``_results``) or sent and
        # not yet answered (``_reporting``). Heartbeats still list their leases (a lease a
        # heartbeat omits is one the broker may hand back).
        self._results: list[Outcome] = []
        self._reporting: list[list[Outcome]] = []
        self._results_scheduled = False
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # stopped a second time: no more grace
        self._client: AsyncClient | None = None
        self._pool: DaemonThreadPool | None = None
        self._proc = psutil.Process()
        self._inflight_reports: set[asyncio.Task[None]] = set()
        self._threads_short = False  # the last _free() was limited by stuck handler threads
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: Deadlines | None = None

    def stop(self) -> None:
        """Graceful stop: no new claims; running tasks get ``grace_s`` to finish. A second call
        (a second SIGTERM or Ctrl-C) cuts the grace short: what still runs is handed back now."""
        if self._stopping.is_set() and not self._hurry.is_set():
            log.warning("worker.stop_now", extra=kv(why="stopped again during the grace period"))
            self._hurry.set()
        self._stopping.set()
        self._slot_free.set()

    # --- main loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadlines = Deadlines(self._loop, self._expire)
        if self.handlers is registry:
            register_builtins()  # never replaces a handler the app registered
        client = AsyncClient(
            self.broker,
            role="worker",
            client_id=self.worker_id,
            token=self.token,
            connect_timeout_s=5.0,
            hello_extra={"concurrency": self.concurrency, "queues": self.queues},
            # No polling for replies: nobody waits on the answer to a result report, a claim
            # mostly waits at the broker, and the CPU belongs to the handlers (end-to-end
            # measured the same without it).
            spin_us=0,
        )
        self._client = client
        # Sync handlers may outlive their timeout (Python cannot kill a thread): leave headroom.
        self._pool = DaemonThreadPool(self.concurrency * 2)
        self._proc.cpu_percent()
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        try:
            await self._claim_loop(client)
            await self._drain()
        except FATAL:
            for _, task in list(self._running.values()):  # nothing they do can be reported
                task.cancel()
            raise
        finally:
            heartbeat.cancel()
            self._deadlines.close()
            await self._flush_results_now()
            await client.close()
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _claim_loop(self, client: AsyncClient) -> None:
        delay = 0.05
        while not self._stopping.is_set():
            free = self._free()
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            # Burst mode ends only on a claim made with nothing running: one made while a task
            # ran comes back empty at once (``wait_ms`` 0), and a task submitted while it ran,
            # maybe by it, is still to be claimed.
            idle = not self._running
            try:
                conn = await client.connect()
                conn.on_unsolicited = self._on_unsolicited
                self.connected.set()
                leased = await self._claim(client, free)
                delay = 0.05
            except TqError as exc:  # unreachable, or a cluster between leaders
                if self._stopping.is_set():
                    return
                if isinstance(exc, FATAL):
                    raise  # run() raises it: the caller says it (tq worker: one line, exit 1)
                log.warning("worker.broker_unavailable", extra=kv(error=str(exc), retry_in_s=delay))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            for lt in leased:
                self._start(lt)
            if leased:
                self._awaiting_retries = False
            elif self.burst and idle:
                self._awaiting_retries = await self._retries_pending(client)
                if not self._awaiting_retries:
                    return

    def _thread_freed(self, loop: asyncio.AbstractEventLoop) -> None:
        """A handler thread finished (any thread; maybe after the worker stopped)."""
        try:
            loop.call_soon_threadsafe(self._slot_free.set)
        except RuntimeError:  # the loop is closed: nobody is waiting for a slot any more
            pass

    def _free(self) -> int:
        """How many tasks to claim. A sync handler past its timeout frees its slot but not its
        thread (Python cannot kill one), so the pool may have fewer free threads than there are
        free slots: claim no more than both, or a claimed sync task would wait for a thread
        while its timeout runs, and time out without ever starting."""
        free = self.concurrency - len(self._running)
        threads = self._pool.free if self._pool is not None else free
        short = threads < free
        if short and not self._threads_short:
            log.warning(
                "worker.threads_stuck",
                extra=kv(
                    free_slots=free,
                    free_threads=threads,
                    why="sync handlers past their timeout are still running",
                ),
            )
        self._threads_short = short
        return min(free, threads)

    async def _retries_pending(self, client: AsyncClient) -> bool:
        """Burst mode, nothing to claim: do tasks of these queues wait out a retry backoff? They
        are work still to do (a burst worker that left then left them unfinished). Paused queues
        do not count: nobody could claim their retries."""
        # The last results first: a failure still on its way would not show as a retry yet.
        await self._flush_results_now()
        try:
            reply = await client.call(GetStats, StatsReply)
        except TqError:
            return True  # the broker is away: the loop reconnects, then asks again
        queues = reply.stats.queues
        return any(
            (q := queues.get(name)) is not None and q.delayed > 0 and not q.paused
            for name in self.queues
        )

    async def _claim(self, client: AsyncClient, free: int) -> list[LeasedTask]:
        # Burst mode asks without waiting, unless it knows a retry will fall due: then the claim
        # parks until it does (the broker serves it then), or for CLAIM_WAIT_MS.
        wait_ms = 0 if self.burst and not self._awaiting_retries else CLAIM_WAIT_MS
        claim = asyncio.ensure_future(
            client.call(
                lambda rid: ClaimTask(rid, self.queues, free, wait_ms),
                Leased,
                retry=False,
                timeout_s=wait_ms / 1000 + 30,
            )
        )
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({claim, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if claim in done:
            tasks = claim.result().tasks
            if self.burst and not tasks and self._running:
                # Burst mode with work still running: wait for a slot instead of spinning, then
                # claim again (the loop does: what it asked for before is not all there is now).
                self._slot_free.clear()
                await self._slot_free.wait()
            return tasks
        # Stopping while the claim is parked: leases that still arrive are handed back.
        claim.add_done_callback(self._release_late)
        return []

    def _release_late(self, fut: asyncio.Future[Leased]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._release(fut.result().tasks)

    async def _release_now(self, tasks: list[LeasedTask]) -> None:
        """Release and wait (briefly) for the broker's answer: the worker is about to leave."""
        if not tasks or self._client is None or not self._client.connected:
            return  # the broker requeues them when the connection closes (attempt counted)
        refs = [LeaseRef(t.task.id, t.token) for t in tasks]
        try:
            await self._client.call(
                lambda rid: ReleaseTasks(rid, refs), Ack, retry=False, timeout_s=5.0
            )
        except TqError as exc:
            log.warning("worker.release_failed", extra=kv(tasks=len(refs), error=str(exc)))

    def _on_unsolicited(self, msg: Response) -> None:
        if isinstance(msg, Leased):
            self._release(msg.tasks)

    def _release(self, tasks: list[LeasedTask]) -> None:
        """``_release_now`` without waiting for it (from callbacks)."""
        if tasks:
            task = asyncio.ensure_future(self._release_now(tasks))
            task.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _drain(self) -> None:
        if self._running:
            log.info("worker.draining", extra=kv(running=len(self._running), grace_s=self.grace_s))
            running = list(self._running.values())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.grace_s
            still = {t for _, t in running}
            hurry = asyncio.create_task(self._hurry.wait())
            # Until every run has ended, the grace has run out, or a second stop says not to
            # wait any more.
            while still and not hurry.done():
                left = deadline - loop.time()
                if left <= 0:
                    break
                done, _ = await asyncio.wait(
                    {hurry, *still}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                still -= done
            hurry.cancel()
            still = {t for t in still if not t.done()}
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
                # A graceful stop is not the task's failure: hand the cut-short runs back
                # without counting the attempt (as Sidekiq does), or every deploy would use up
                # an attempt of each long task, and dead-letter those on their last one.
                cut = [lt for lt, t in running if t in still]
                log.warning("worker.grace_exceeded", extra=kv(tasks=len(cut), action="released"))
                await self._release_now(cut)
        if self._inflight_reports:
            await asyncio.wait(self._inflight_reports, timeout=5.0)

    # --- running one task ------------------------------------------------------------------------

    def _start(self, lt: LeasedTask) -> None:
        run = next(self._run_ids)
        self._running[run] = (lt, asyncio.create_task(self._execute(lt, run)))

    def _expire(self, run: int) -> None:
        """A run's timeout is up: cancel it in place (``_call_handler`` reports ``TIMEOUT``)."""
        entry = self._running.get(run)
        if entry is not None and not entry[1].done():
            self._timed_out.add(run)
            entry[1].cancel()

    def _ended(self, lt: LeasedTask, run: int) -> None:
        self._running.pop(run, None)
        self._timed_out.discard(run)
        assert self._deadlines is not None
        self._deadlines.discard(run, lt.task.timeout_s)

    async def _execute(self, lt: LeasedTask, run: int) -> None:
        try:
            outcome = await self._call_handler(lt, run)
        except asyncio.CancelledError:
            self._ended(lt, run)
            self._slot_free.set()
            raise
        except BaseException as exc:  # a bug here must not leave the task running forever
            log.exception("worker.execute_failed", extra=kv(task=lt.task.id))
            outcome = outcomes.failure(lt.task.id, lt.token, "INTERNAL", outcomes.describe(exc))
        self._ended(lt, run)
        if outcome.ok:
            self.done += 1
        else:
            self.failed += 1
        self._results.append(outcome)
        if not self._results_scheduled:
            self._results_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_results)
        self._slot_free.set()

    async def _call_handler(self, lt: LeasedTask, run: int) -> Outcome:
        task = lt.task
        handler = self.handlers.get(task.name)
        if handler is None:
            return outcomes.failure(
                task.id, lt.token, "UnknownTask", f"no handler named {task.name!r} on this worker"
            )
        # The timeout cancels this task in place, as asyncio.timeout would, without a timer per
        # run (``Deadlines``). It starts here, inside the run, so it cannot cancel a run that has
        # not started. A sync handler's thread cannot be killed: on timeout its slot is freed
        # and the thread finishes in the background.
        assert self._deadlines is not None
        self._deadlines.add(run, task.timeout_s)
        try:
            payload = decode_value(task.payload)
            context.current.set(context.TaskContext(task.id, lt.token, self._progress_sender))
            if handler.is_async:
                value = await handler.fn(payload)
            else:
                assert self._pool is not None
                loop = asyncio.get_running_loop()
                work = self._pool.submit(
                    contextvars.copy_context().run, _call_sync, handler.fn, payload
                )
                # A thread that outlived its timeout frees its slot only now (see _free).
                work.add_done_callback(lambda _: self._thread_freed(loop))
                value = await asyncio.wrap_future(work)
                if type(value) is _Raised:
                    # Raised here, on the loop, to meet the handlers below like the exception
                    # of an async handler (its traceback, the handler's frames, goes with it).
                    raise value.exc
            if inspect.isawaitable(value):
                # an async function behind a plain decorator, or an async callable object
                value = await value
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if run in self._timed_out and current is not None:
                self._timed_out.discard(run)
                if current.uncancel() == 0:  # nobody else cancelled it: this is the timeout
                    return outcomes.failure(
                        task.id,
                        lt.token,
                        "TIMEOUT",
                        f"{task.name} exceeded its timeout of {task.timeout_s}s",
                    )
            if current is not None and current.cancelling():
                raise  # the worker is cancelling this run (shutdown past its grace)
            # Raised by the handler itself: reporting nothing would hand the task back without
            # counting the attempt, and it would run again, forever.
            return outcomes.from_exception(task.id, lt.token, exc)
        except TqError as exc:
            return outcomes.failure(task.id, lt.token, type(exc).__name__, exc.message)
        except BaseException as exc:
            # BaseException, not Exception: a handler's SystemExit (argparse on bad input) or
            # KeyboardInterrupt is that task's failure, not the end of the worker and of every
            # other task it runs. (Signals reach the worker through its loop's handlers, never
            # as exceptions inside a task.)
            return outcomes.from_exception(task.id, lt.token, exc)
        try:
            result = encode_payload(value)
        except TqError as exc:
            return outcomes.failure(
                task.id, lt.token, "ResultNotSerializable", f"the handler's result: {exc.message}"
            )
        return Outcome(task.id, lt.token, True, result=result)

    # --- reporting -------------------------------------------------------------------------------

    def _progress_sender(self, task_id: str, token: int, fraction: float, message: str) -> None:
        """Called from handler code (any thread): one fire-and-forget Progress request."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def send() -> None:
            client = self._client
            if client is None:
                return
            fut = asyncio.ensure_future(client.report_progress(task_id, token, fraction, message))
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

        loop.call_soon_threadsafe(send)

    def _send_results(self) -> None:
        self._results_scheduled = False
        if not self._results or self._client is None:
            return
        pending, self._results = self._results, []
        welcome = self._client.welcome
        limit = (welcome.max_frame_bytes if welcome is not None else 0) or DEFAULT_FRAME_LIMIT
        # A frame the broker refuses would close the connection (and end every lease on it),
        # then be sent again: so each result must fit, and each batch too.
        for batch in outcomes.prepare(pending, limit):
            self._reporting.append(batch)  # now: a heartbeat must list them from here on
            task = asyncio.create_task(self._report(batch))
            self._inflight_reports.add(task)
            task.add_done_callback(self._inflight_reports.discard)

    async def _report(self, batch: list[Outcome]) -> None:
        assert self._client is not None
        try:
            # Resending is safe: each outcome names its lease's fencing token, so a result the
            # broker already took, or from a lease it ended, is refused, never applied twice.
            # After a cluster failover the results reach the new leader instead of being lost.
            ack = await self._client.call(lambda rid: ResultBatch(rid, batch), Ack, retry=True)
        except TqError as exc:
            self._reported(batch)
            if not isinstance(exc, TRANSIENT_REPORT_ERRORS):
                # Refused for what it holds: every resend would be too, and every result
                # finished meanwhile would join it and be refused with it, forever.
                log.error(
                    "worker.results_dropped",
                    extra=kv(tasks=len(batch), code=exc.code, error=exc.message),
                )
                return
            log.warning("worker.report_failed", extra=kv(tasks=len(batch), error=str(exc)))
            if not self._stopping.is_set() and len(self._results) < MAX_UNREPORTED:
                # Keep them for the next report; the broker may also requeue the tasks when it
                # notices us gone: at-least-once holds either way.
                self._results[:0] = batch
                asyncio.get_running_loop().call_later(1.0, self._send_results)
            return
        self._reported(batch)
        if ack.rejected:
            log.warning(
                "worker.results_refused",
                extra=kv(tasks=len(ack.rejected), codes=sorted({c for _, c in ack.rejected})),
            )

    def _reported(self, batch: list[Outcome]) -> None:
        """``batch`` is no longer in flight (answered, dropped or back in ``_results``)."""
        for i, sent in enumerate(self._reporting):
            if sent is batch:
                del self._reporting[i]
                return

    async def _flush_results_now(self) -> None:
        self._send_results()
        if self._inflight_reports:
            await asyncio.wait(self._inflight_reports, timeout=5.0)

    # --- heartbeats ------------------------------------------------------------------------------

    def heartbeat_interval(self) -> float:
        """``heartbeat_s``, shortened to a third of the broker's heartbeat timeout or lease when
        either is shorter. A worker that beats once per timeout is declared lost by any late
        beat, and one that beats once per lease sees every lease expire under a running task
        (``--lease 2`` against the 2 s default dead-lettered every task longer than 2 s).
        Both are the broker operator's choice, so the broker says them in ``Welcome``."""
        welcome = self._client.welcome if self._client is not None else None
        interval = self.heartbeat_s
        if welcome is not None:
            for limit_ms in (welcome.heartbeat_timeout_ms, welcome.lease_ms):
                if limit_ms > 0:
                    interval = min(interval, limit_ms / 3000)
        return interval

    def heartbeat_answer_timeout(self) -> float:
        """How long a heartbeat may go unanswered before the worker gives up on the connection:
        twice the broker's heartbeat timeout (the silence it allows the worker; twice, so that
        a broker stalled for about that long, by a snapshot say, is not left at once, its
        leases requeued), else ten intervals; at least a second. Not the request timeout
        (30 s): a broker that answers nothing is usually hung, and the new leader requeues its
        leases at its heartbeat timeout; the worker should be claiming there by then."""
        welcome = self._client.welcome if self._client is not None else None
        if welcome is not None and welcome.heartbeat_timeout_ms > 0:
            return max(1.0, 2 * welcome.heartbeat_timeout_ms / 1000)
        return max(1.0, 10 * self.heartbeat_interval())

    async def _heartbeat_loop(self) -> None:
        await self.connected.wait()  # the interval depends on what the broker said in Welcome
        while True:
            await asyncio.sleep(self.heartbeat_interval())
            client = self._client
            if client is None or not client.connected:
                continue
            running = [(run, lt) for run, (lt, _) in self._running.items()]
            refs = [LeaseRef(lt.task.id, lt.token) for _, lt in running]
            refs += [LeaseRef(o.task_id, o.token) for o in self._results]
            for batch in self._reporting:
                refs += [LeaseRef(o.task_id, o.token) for o in batch]
            beat = self._heartbeat_message(refs)
            try:
                ack = await client.call(
                    beat, Ack, retry=False, timeout_s=self.heartbeat_answer_timeout()
                )
            except TqError as exc:
                # A beat not answered in time has dropped the connection (AsyncClient.call
                # does): the claim parked on it fails, and the claim loop reconnects, trying the
                # other addresses first. Skipping the beat and staying used to keep a worker on
                # a hung (SIGSTOPped) leader for ever, running nothing, while the cluster had
                # elected another.
                log.warning("worker.heartbeat_failed", extra=kv(error=str(exc)))
                continue
            if ack.rejected:
                self._cancel_lost(running, refs, ack.rejected)

    def _cancel_lost(
        self,
        running: list[tuple[int, LeasedTask]],
        refs: list[LeaseRef],
        rejected: list[tuple[str, str]],
    ) -> None:
        """Cancel the runs whose leases a heartbeat came back rejected for: the broker will
        refuse their results. Each run is matched by its task id and token (the leases the
        heartbeat listed), never by token alone: two brokers hand out the same tokens."""
        lost: dict[str, int] = {}
        for task_id, _code in rejected:
            lost[task_id] = lost.get(task_id, 0) + 1
        listed: dict[str, int] = {}
        for ref in refs:
            if ref.task_id in lost:
                listed[ref.task_id] = listed.get(ref.task_id, 0) + 1
        # A rejection names a task id only. A task id listed more often than it was rejected
        # (a stale and a fresh run of one task) had one lease honoured: the newest run's.
        for run, lt in reversed(running):
            task_id = lt.task.id
            if task_id not in lost:
                continue
            if listed[task_id] > lost[task_id]:
                listed[task_id] -= 1
                continue
            entry = self._running.get(run)
            if entry is not None and entry[0] is lt:
                log.warning("worker.lease_lost", extra=kv(task=task_id, token=lt.token))
                entry[1].cancel()

    def _heartbeat_message(self, refs: list[LeaseRef]) -> Callable[[int], Heartbeat]:
        cpu = self._proc.cpu_percent()
        rss = self._proc.memory_info().rss
        return lambda rid: Heartbeat(rid, refs, cpu, rss)
