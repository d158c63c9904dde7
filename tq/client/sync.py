"""The blocking ``Client``: the ``AsyncClient`` driven from the calling threads, so there is one
implementation of the protocol, not two."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from tq.client.aio import AsyncClient, TaskInfo
from tq.errors import BrokerUnavailable
from tq.model import DEFAULT_MAX_RETRIES, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S

T = TypeVar("T")
log = logging.getLogger("tq.client")


STOP_WAIT_S = 2.0  # how long stop() lets the requests still running end before it stops the loop
ABANDON_WAIT_S = 1.0  # how long an interrupted call drives its cancellation (see _Driver.call)


class _Driver:
    """The client's event loop, run by whichever calling thread needs it, for as long as its
    call lasts.

    Why not a thread of its own (the portal this replaced, as anyio's): handing every call to a
    loop thread and its result back cost two thread wake-ups, and where idle CPUs halt (these
    VMs) each is tens of µs. A sequential ``submit`` took 0.72-0.79 ms through the portal and
    0.43-0.47 ms with the caller running the loop (same broker, alternating runs;
    benchmarks/README.md).

    Threads share the loop and its connection as leader and followers: one drives, the others'
    requests ride along on its loop; when the driver's own call ends, a follower whose call is
    still open takes over. Between calls nothing runs the loop, and nothing needs to: it has
    work only while a request is in flight (replies, deadlines, liveness probes); a connection
    the broker closed meanwhile is found closed by the next call, which connects again, as
    after any lost connection."""

    def __init__(self, unread: Callable[[], bool]) -> None:
        self._loop = asyncio.new_event_loop()
        self._unread = unread  # input came while nobody ran the loop (see _drive)
        self._cond = threading.Condition()
        self._driving = False  # a thread runs the loop now
        self._stopping = False
        # Every caller's future not yet resolved: stop() fails those the loop will never get
        # to (a request scheduled just as the loop stopped would leave its caller blocked).
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._helper: concurrent.futures.ThreadPoolExecutor | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if asyncio._get_running_loop() is not None:
            return self._from_a_loop(coro)
        with self._cond:
            if self._stopping:
                coro.close()  # never to run: no "was never awaited" warning
                raise BrokerUnavailable("client closed")
            drive = not self._driving
            if drive:
                self._driving = True
            else:  # another thread runs the loop: this request rides along
                tasks: list[asyncio.Task[Any]] = []
                fut = asyncio.run_coroutine_threadsafe(_tracked(coro, tasks), self._loop)
                self._futures.add(fut)
        if drive:
            return self._drive(coro)
        fut.add_done_callback(self._settled)
        try:
            self._drive_until(fut)
        except BaseException:
            # Ctrl-C (KeyboardInterrupt) lands here, in the caller's thread, waiting or
            # driving: the request must stop too, or a `c.wait()` interrupted in a REPL would go
            # on waiting at the broker. Its cancellation runs now (a wait withdraws itself).
            fut.cancel()
            self._abandon(tasks)
            raise
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            if self._stopping:  # cancelled by stop(), not by this caller
                raise BrokerUnavailable("client closed") from None
            raise

    def _drive(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run the loop for this call (the caller is the driver; ``_driving`` is set)."""
        task: asyncio.Task[T] | None = None
        try:
            if self._unread():
                # The broker sent something while nobody ran the loop: its close, say. Read it
                # first: a request on a connection already closed is lost with it, and one not
                # safe to repeat (a cancel) would fail, where it must go on a new connection.
                self._loop.run_until_complete(_turns(2))
            task = self._loop.create_task(coro)
            return self._loop.run_until_complete(task)
        except asyncio.CancelledError:
            if self._stopping:  # cancelled by stop(), not by this caller
                raise BrokerUnavailable("client closed") from None
            raise
        except BaseException:
            if task is not None and not task.done():  # interrupted (Ctrl-C): see call()
                task.cancel()
                self._run_briefly([task])
            raise
        finally:
            self._let_go()

    def _drive_until(self, fut: concurrent.futures.Future[Any]) -> None:
        """Return once ``fut`` is done: run the loop for it whenever no other thread does."""
        while True:
            with self._cond:
                while not fut.done() and self._driving:
                    self._cond.wait()
                if fut.done():
                    return
                if self._loop.is_closed():  # stopped under a follower: nothing will run it now
                    fut.cancel()
                    return
                self._driving = True
            try:
                self._loop.run_until_complete(_done(fut))
            finally:
                self._let_go()

    def _let_go(self) -> None:
        with self._cond:
            self._driving = False
            self._cond.notify_all()  # a follower whose call is still open takes over

    def _abandon(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Let an interrupted call's task end (briefly), if no other thread drives the loop."""
        with self._cond:
            if not tasks or self._driving or self._loop.is_closed():
                return  # not started (it never will), or the driver runs its cancellation
            self._driving = True
        try:
            self._run_briefly(tasks)
        finally:
            self._let_go()

    def _run_briefly(self, tasks: list[asyncio.Task[Any]]) -> None:
        try:
            self._loop.run_until_complete(asyncio.wait(tasks, timeout=ABANDON_WAIT_S))
        except BaseException as exc:  # a second Ctrl-C: the first is the one reported
            log.debug("client.abandon_interrupted", extra={"error": repr(exc)})

    def _settled(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._cond:
            self._futures.discard(fut)
            self._cond.notify_all()  # its follower, waiting in _drive_until

    def _from_a_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """A call from inside a running event loop (a coroutine using the blocking client):
        that loop is this thread's, so ours runs in a helper thread, which calls as any
        thread does (blocking this loop meanwhile, as a blocking call does)."""
        return self._helper_thread().submit(self.call, coro).result()

    def _helper_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._cond:
            if self._helper is None:
                self._helper = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="tq-client"
                )
            return self._helper

    def stop(self) -> None:
        """Stop the loop. Requests other threads still wait on are cancelled first (they raise
        ``BrokerUnavailable("client closed")``): stopped under them, their coroutines would
        never finish, and those threads would block forever."""
        if asyncio._get_running_loop() is not None:  # as for a call, see _from_a_loop
            self._helper_thread().submit(self.stop).result()
            return
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
        if self._loop.is_closed():
            return
        fut = asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop)
        try:
            self._drive_until(fut)
        finally:
            with self._cond:
                # Whoever drives lets go once its cancelled call ends.
                self._cond.wait_for(lambda: not self._driving, timeout=STOP_WAIT_S + 1)
                if not self._driving:
                    self._loop.close()
                futures = list(self._futures)
            for pending in futures:
                pending.cancel()
            if self._helper is not None:
                self._helper.shutdown(wait=False)

    @property
    def stopped(self) -> bool:
        return self._stopping


async def _tracked(coro: Coroutine[Any, Any, T], tasks: list[asyncio.Task[Any]]) -> T:
    """Run ``coro``, leaving its task in ``tasks`` (for ``_Driver._abandon``)."""
    task = asyncio.current_task()
    if task is not None:
        tasks.append(task)
    return await coro


async def _turns(n: int) -> None:
    """Let the loop go round ``n`` times: a read and what it calls next (connection_lost)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def _done(fut: concurrent.futures.Future[Any]) -> None:
    """Wait for ``fut`` without raising what it raised (its caller reads that). Cancelled by
    ``stop()`` (which cancels every task), it just ends: ``_drive_until`` looks again."""
    try:
        await asyncio.wait([asyncio.wrap_future(fut)])
    except asyncio.CancelledError:
        pass


async def _cancel_all() -> None:
    """Cancel every other task of the loop and let them end (briefly)."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_WAIT_S)


class Client:
    """``with Client("tcp://127.0.0.1:7700") as c: c.submit("echo", {"x": 1})``"""

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        self.aio = AsyncClient(url, **kwargs)  # first: a bad URL must not leave a thread behind
        self._driver = _Driver(self.aio.unread)

    def __enter__(self) -> Client:
        try:
            self._driver.call(self.aio.connect())
        except BaseException:
            # ``__exit__`` does not run when ``__enter__`` raises: a producer retrying an
            # unreachable broker in a loop would leak a thread and a loop per attempt.
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the loop; closing again does nothing."""
        if self._driver.stopped:
            return
        try:
            self._driver.call(self.aio.close())
        finally:
            self._driver.stop()

    def submit(
        self,
        name: str,
        payload: Any = None,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: str | int = "normal",
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backoff_s: float = 0.0,
        task_id: str | None = None,
    ) -> str:
        return self._driver.call(
            self.aio.submit(
                name,
                payload,
                queue=queue,
                priority=priority,
                max_retries=max_retries,
                timeout_s=timeout_s,
                backoff_s=backoff_s,
                task_id=task_id,
            )
        )

    def submit_batch(
        self,
        name: str,
        payloads: Iterable[Any],
        *,
        queue: str = DEFAULT_QUEUE,
        priority: str | int = "normal",
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backoff_s: float = 0.0,
    ) -> list[str]:
        return self._driver.call(
            self.aio.submit_batch(
                name,
                payloads,
                queue=queue,
                priority=priority,
                max_retries=max_retries,
                timeout_s=timeout_s,
                backoff_s=backoff_s,
            )
        )

    def status(self, task_id: str) -> TaskInfo:
        return self._driver.call(self.aio.status(task_id))

    def wait(self, task_id: str, timeout_s: float = 30.0) -> TaskInfo:
        return self._driver.call(self.aio.wait(task_id, timeout_s))

    def list(
        self,
        state: str = "pending",
        *,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
    ) -> builtins.list[TaskInfo]:
        return self._driver.call(self.aio.list(state, queue=queue, name=name, limit=limit))

    def cancel(self, task_id: str) -> TaskInfo:
        return self._driver.call(self.aio.cancel(task_id))

    def pause_queue(self, queue: str) -> None:
        self._driver.call(self.aio.pause_queue(queue))

    def resume_queue(self, queue: str) -> None:
        self._driver.call(self.aio.resume_queue(queue))

    def dead_letters(self, **filters: Any) -> builtins.list[TaskInfo]:
        """Filters as for ``AsyncClient.dead_letters``."""
        return self._driver.call(self.aio.dead_letters(**filters))

    def retry_dead(
        self, task_ids: builtins.list[str] | None = None, **filters: Any
    ) -> builtins.list[str]:
        return self._driver.call(self.aio.retry_dead(task_ids, **filters))

    def purge_dead(
        self, task_ids: builtins.list[str] | None = None, **filters: Any
    ) -> builtins.list[str]:
        return self._driver.call(self.aio.purge_dead(task_ids, **filters))

    def stats(self) -> dict[str, Any]:
        return self._driver.call(self.aio.stats())
