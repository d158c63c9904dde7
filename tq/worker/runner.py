"""The worker runtime: claim up to the free slots (long poll), run handlers, report results in
batches, heartbeat the leases it holds.

Lifecycle: ``run()`` until ``stop()`` (SIGTERM): stop claiming, let running tasks finish within
``grace_s``, hand back leases that arrive late, then cancel what is still running and leave (the
broker requeues those when the connection closes). ``burst=True`` returns once the queues are
empty and nothing runs, which is what tests and batch jobs want.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import traceback
from collections.abc import Callable

import psutil

from tq.client import AsyncClient, decode_value, encode_payload
from tq.errors import TqError
from tq.logfields import kv
from tq.model import ErrorInfo
from tq.protocol.messages import (
    Ack,
    ClaimTask,
    Heartbeat,
    Leased,
    LeasedTask,
    LeaseRef,
    Outcome,
    ReleaseTasks,
    Response,
    ResultBatch,
)
from tq.worker import context
from tq.worker.builtin import register_builtins
from tq.worker.registry import Registry, registry
from tq.worker.threads import DaemonThreadPool

log = logging.getLogger("tq.worker")

CLAIM_WAIT_MS = 10_000
MAX_UNREPORTED = 10_000


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
        self.broker = broker
        self.concurrency = concurrency
        self.queues = list(queues)
        self.handlers = handlers or registry
        self.heartbeat_s = heartbeat_s
        self.grace_s = grace_s
        self.burst = burst
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"
        self.token = token
        self.done = 0
        self.failed = 0
        # Keyed by fencing token, not task id: a stale and a fresh lease of one task are
        # different runs.
        self._running: dict[int, tuple[LeasedTask, asyncio.Task[None]]] = {}
        self._results: list[Outcome] = []
        # Finished, result not yet acknowledged: still listed in heartbeats (a lease a
        # heartbeat omits is one the broker may hand back).
        self._unacked: dict[int, LeaseRef] = {}
        self._results_scheduled = False
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._client: AsyncClient | None = None
        self._pool: DaemonThreadPool | None = None
        self._proc = psutil.Process()
        self._inflight_reports: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def stop(self) -> None:
        """Graceful stop: no new claims; running tasks get ``grace_s`` to finish."""
        self._stopping.set()
        self._slot_free.set()

    # --- main loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.handlers is registry:
            register_builtins()  # never replaces a handler the app registered
        client = AsyncClient(
            self.broker,
            role="worker",
            client_id=self.worker_id,
            token=self.token,
            connect_timeout_s=5.0,
            hello_extra={"concurrency": self.concurrency, "queues": self.queues},
        )
        self._client = client
        # Sync handlers may outlive their timeout (Python cannot kill a thread): leave headroom.
        self._pool = DaemonThreadPool(self.concurrency * 2)
        self._proc.cpu_percent()
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        try:
            await self._claim_loop(client)
            await self._drain()
        finally:
            heartbeat.cancel()
            await self._flush_results_now()
            await client.close()
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _claim_loop(self, client: AsyncClient) -> None:
        delay = 0.05
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                conn = await client.connect()
                conn.on_unsolicited = self._on_unsolicited
                self.connected.set()
                leased = await self._claim(client, free)
                delay = 0.05
            except TqError as exc:  # unreachable, or a cluster between leaders
                if self._stopping.is_set():
                    return
                log.warning("worker.broker_unavailable", extra=kv(error=str(exc), retry_in_s=delay))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            for lt in leased:
                self._start(lt)
            if self.burst and not leased and not self._running:
                return

    async def _claim(self, client: AsyncClient, free: int) -> list[LeasedTask]:
        wait_ms = 0 if self.burst else CLAIM_WAIT_MS
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
            if self.burst and not claim.result().tasks and self._running:
                # Burst mode with work still running: wait for a slot instead of spinning.
                self._slot_free.clear()
                await self._slot_free.wait()
            return claim.result().tasks
        # Stopping while the claim is parked: leases that still arrive are handed back.
        claim.add_done_callback(self._release_late)
        return []

    def _release_late(self, fut: asyncio.Future[Leased]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._release(fut.result().tasks)

    def _on_unsolicited(self, msg: Response) -> None:
        if isinstance(msg, Leased):
            self._release(msg.tasks)

    def _release(self, tasks: list[LeasedTask]) -> None:
        if not tasks or self._client is None:
            return
        refs = [LeaseRef(t.task.id, t.token) for t in tasks]
        client = self._client
        task = asyncio.ensure_future(
            client.call(lambda rid: ReleaseTasks(rid, refs), Ack, retry=False)
        )
        task.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _drain(self) -> None:
        if self._running:
            log.info("worker.draining", extra=kv(running=len(self._running), grace_s=self.grace_s))
            tasks = [t for _, t in self._running.values()]
            _, still = await asyncio.wait(tasks, timeout=self.grace_s)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
        if self._inflight_reports:
            await asyncio.wait(self._inflight_reports, timeout=5.0)

    # --- running one task ------------------------------------------------------------------------

    def _start(self, lt: LeasedTask) -> None:
        task = asyncio.create_task(self._execute(lt))
        self._running[lt.token] = (lt, task)

    async def _execute(self, lt: LeasedTask) -> None:
        try:
            outcome = await self._call_handler(lt)
        except asyncio.CancelledError:
            self._running.pop(lt.token, None)
            self._slot_free.set()
            raise
        self._running.pop(lt.token, None)
        self._unacked[lt.token] = LeaseRef(lt.task.id, lt.token)
        if outcome.ok:
            self.done += 1
        else:
            self.failed += 1
        self._results.append(outcome)
        if not self._results_scheduled:
            self._results_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_results)
        self._slot_free.set()

    async def _call_handler(self, lt: LeasedTask) -> Outcome:
        task = lt.task
        handler = self.handlers.get(task.name)
        if handler is None:
            return Outcome(
                task.id,
                lt.token,
                False,
                error=ErrorInfo("UnknownTask", f"no handler named {task.name!r} on this worker"),
            )
        try:
            payload = decode_value(task.payload)
            context.current.set(context.TaskContext(task.id, lt.token, self._progress_sender))
            # asyncio.timeout cancels this task in place: no second Task per run, as wait_for
            # creates on Python 3.11. A sync handler's thread cannot be killed: on timeout its
            # slot is freed and the thread finishes in the background.
            async with asyncio.timeout(task.timeout_s):
                if handler.is_async:
                    value = await handler.fn(payload)
                else:
                    loop = asyncio.get_running_loop()
                    value = await loop.run_in_executor(
                        self._pool, contextvars.copy_context().run, handler.fn, payload
                    )
            return Outcome(task.id, lt.token, True, result=encode_payload(value))
        except TimeoutError:
            return Outcome(
                task.id,
                lt.token,
                False,
                error=ErrorInfo(
                    "TIMEOUT", f"{task.name} exceeded its timeout of {task.timeout_s}s"
                ),
            )
        except TqError as exc:
            return Outcome(
                task.id, lt.token, False, error=ErrorInfo(type(exc).__name__, exc.message)
            )
        except Exception as exc:
            return Outcome(
                task.id,
                lt.token,
                False,
                error=ErrorInfo(type(exc).__name__, str(exc), traceback.format_exc(limit=20)),
            )

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
        outcomes, self._results = self._results, []
        task = asyncio.create_task(self._report(outcomes))
        self._inflight_reports.add(task)
        task.add_done_callback(self._inflight_reports.discard)

    async def _report(self, outcomes: list[Outcome]) -> None:
        assert self._client is not None
        try:
            # Resending is safe: each outcome names its lease's fencing token, so a result the
            # broker already took, or from a lease it ended, is refused, never applied twice.
            # After a cluster failover the results reach the new leader instead of being lost.
            ack = await self._client.call(lambda rid: ResultBatch(rid, outcomes), Ack, retry=True)
        except TqError as exc:
            log.warning("worker.report_failed", extra=kv(tasks=len(outcomes), error=str(exc)))
            if not self._stopping.is_set() and len(self._results) < MAX_UNREPORTED:
                # Keep them for the next report; the broker may also requeue the tasks when it
                # notices us gone: at-least-once holds either way.
                self._results[:0] = outcomes
                asyncio.get_running_loop().call_later(1.0, self._send_results)
            else:
                for outcome in outcomes:
                    self._unacked.pop(outcome.token, None)
            return
        for outcome in outcomes:
            self._unacked.pop(outcome.token, None)
        if ack.rejected:
            log.warning("worker.results_refused", extra=kv(tasks=len(ack.rejected)))

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

    async def _heartbeat_loop(self) -> None:
        await self.connected.wait()  # the interval depends on what the broker said in Welcome
        while True:
            await asyncio.sleep(self.heartbeat_interval())
            client = self._client
            if client is None or not client.connected:
                continue
            refs = [LeaseRef(lt.task.id, lt.token) for lt, _ in self._running.values()]
            refs += self._unacked.values()
            beat = self._heartbeat_message(refs)
            try:
                ack = await client.call(beat, Ack, retry=False)
            except TqError:
                continue
            lost = {task_id for task_id, _code in ack.rejected}
            for ref in refs:
                entry = self._running.get(ref.token) if ref.task_id in lost else None
                if entry is not None:
                    log.warning("worker.lease_lost", extra=kv(task=ref.task_id))
                    entry[1].cancel()

    def _heartbeat_message(self, refs: list[LeaseRef]) -> Callable[[int], Heartbeat]:
        cpu = self._proc.cpu_percent()
        rss = self._proc.memory_info().rss
        return lambda rid: Heartbeat(rid, refs, cpu, rss)
