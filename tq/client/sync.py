"""The blocking ``Client``: the ``AsyncClient`` driven from the calling threads, so there is one
implementation of the protocol, not two."""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # see _getsignal
import asyncio
import builtins
import concurrent.futures
import logging
import os
import queue
import signal
import threading
import time
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
    VMs) each is tens of µs. A sequential ``submit`` from a thread took 0.70-0.72 ms through the
    portal and 0.42-0.55 ms with the thread running the loop (same broker, alternating runs;
    benchmarks/README.md).

    Threads share the loop and its connection as leader and followers: one drives, the others'
    requests ride along on its loop; when the driver's own call ends, a follower whose call is
    still open takes over. Between calls nothing runs the loop, and nothing needs to: it has
    work only while a request is in flight (replies, deadlines, liveness probes); a connection
    the broker closed meanwhile is found closed by the next call, which connects again, as
    after any lost connection.

    Signal handlers run in the main thread, so a Ctrl-C (or an exception a handler raises)
    would land anywhere inside the loop's callbacks and inside this class's locks: a review's
    storm of Ctrl-Cs left the lock held and the other threads blocked, and one landing in a
    connection's sweep stopped its request timeouts for good. So the main thread runs the loop
    only while Python's own Ctrl-C handler is in place and the program has set no Python
    handler on any other signal (``_others_unhandled``): such a handler may raise there,
    or call a client, whose call would then wait for the loop the thread is inside. For the
    call's length it swaps the Ctrl-C handler for one that raises nothing (``_Interrupts``, as
    ``asyncio.run`` does): a Ctrl-C cancels the call, and ``KeyboardInterrupt`` is raised once
    the call has ended. Under handlers of the program's own (a server's, pytest-timeout's
    SIGALRM), and in a thread whose own event loop is running (it cannot run a second one),
    calls are handed to a helper thread, which drives for them: waiting on a future, as the
    portal's callers did, is safe. That costs the two wake-ups again."""

    def __init__(self, unread: Callable[[], bool]) -> None:
        self._loop = asyncio.new_event_loop()
        self._unread = unread  # input came while nobody ran the loop (see _tracked)
        self._cond = threading.Condition()
        self._driving = False  # a thread runs the loop now
        self._stopping = False
        # Every caller's future not yet resolved: stop() fails those the loop will never get
        # to (a request scheduled just as the loop stopped would leave its caller blocked).
        self._futures: set[concurrent.futures.Future[Any]] = set()
        # The helper thread (see above), started at its first use: what it is to drive for.
        self._helper: threading.Thread | None = None
        self._helper_lock = threading.Lock()
        self._requests: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], list[asyncio.Task[Any]]] | None
        ] = queue.SimpleQueue()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is threading.main_thread():
            if _getsignal(SIGINT) is signal.default_int_handler:
                drive = asyncio._get_running_loop() is None and _others_unhandled()
                return self._call_deferring_sigint(coro, drive)
            return self._handed_over(coro)
        if asyncio._get_running_loop() is not None:
            return self._handed_over(coro)
        return self._call(coro)

    def _call_deferring_sigint(self, coro: Coroutine[Any, Any, T], drive: bool) -> T:
        """A main-thread call with Ctrl-C deferred (see the class): driven or followed by this
        thread, or handed over (a handler on another signal), where a Ctrl-C landing inside a
        future's ``cancel`` had left the request running (waits parked at the broker)."""
        interrupts = _Interrupts(self._loop)
        previous = _signal.signal(SIGINT, interrupts.handle)
        try:
            call = self._call if drive else self._handed_over
            result = call(coro, interrupts)
        except BaseException:
            if interrupts.count:
                raise KeyboardInterrupt from None  # (the call's CancelledError, or its error)
            raise
        finally:
            _signal.signal(SIGINT, previous)
        if interrupts.count:  # came as the call ended: the caller hears it all the same
            raise KeyboardInterrupt
        return result

    def _call(self, coro: Coroutine[Any, Any, T], interrupts: _Interrupts | None = None) -> T:
        with self._cond:
            if self._stopping:
                coro.close()  # never to run: no "was never awaited" warning
                raise BrokerUnavailable("client closed")
            drive = not self._driving
            if drive:
                self._driving = True
            else:  # another thread runs the loop: this request rides along
                tasks: list[asyncio.Task[Any]] = []
                fut = asyncio.run_coroutine_threadsafe(
                    _tracked(coro, tasks, self._unread), self._loop
                )
                self._futures.add(fut)
        if drive:
            return self._drive(coro, interrupts)
        if interrupts is not None:
            interrupts.arm(fut.cancel)
        fut.add_done_callback(self._settled)
        try:
            self._drive_until(fut)
        except BaseException:  # rare without signals (see the class): as in _handed_over
            fut.cancel()
            self._abandon(tasks)
            raise
        if interrupts is not None and interrupts.count:
            self._abandon(tasks)  # let its cancellation end (a wait withdrawn) if nobody drives
        return self._result(fut)

    def _handed_over(
        self, coro: Coroutine[Any, Any, T], interrupts: _Interrupts | None = None
    ) -> T:
        """A call the helper thread drives for (see the class). This thread takes no lock of
        this class and runs no loop code: a signal's exception can only land in the wait."""
        if self._stopping:
            coro.close()
            raise BrokerUnavailable("client closed")
        tasks: list[asyncio.Task[Any]] = []
        fut: concurrent.futures.Future[T] | None = None
        handed = False
        try:
            fut = asyncio.run_coroutine_threadsafe(_tracked(coro, tasks, self._unread), self._loop)
            self._futures.add(fut)  # (a set's add and discard are atomic)
            fut.add_done_callback(self._settled)
            self._hand_over(fut, tasks)
            handed = True
            if interrupts is not None:
                interrupts.arm(fut.cancel)
            concurrent.futures.wait([fut])
        except BaseException:
            # Ctrl-C (KeyboardInterrupt) lands here, in the caller's thread: the request must
            # stop too, or a `c.wait()` interrupted in a REPL would go on waiting at the broker.
            # The helper runs its cancellation (a wait withdraws itself), handed over now if
            # the Ctrl-C came first (in a storm, waits stayed parked at the broker so).
            if fut is not None:
                fut.cancel()
                if not handed:
                    self._hand_over(fut, tasks)
            raise
        return self._result(fut)

    def _result(self, fut: concurrent.futures.Future[T]) -> T:
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            self._raise_if_stopped()
            raise

    def _raise_if_stopped(self) -> None:
        """A call cancelled by stop(), not by its caller, fails as the client's close."""
        if self._stopping:
            raise BrokerUnavailable("client closed") from None

    def _drive(self, coro: Coroutine[Any, Any, T], interrupts: _Interrupts | None = None) -> T:
        """Run the loop for this call (the caller is the driver; ``_driving`` is set)."""
        task: asyncio.Task[T] | None = None
        try:
            task = self._loop.create_task(_tracked(coro, [], self._unread))
            if interrupts is not None:
                interrupts.arm(task.cancel)
            return self._loop.run_until_complete(task)
        except asyncio.CancelledError:
            self._raise_if_stopped()
            raise
        except BaseException:
            if task is not None and not task.done():  # interrupted mid-call: end its request
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
                    # Timed: a future cancelled in the main thread does not notify (see
                    # _settled), and a follower must not wait for the driver's whole call.
                    self._cond.wait(0.05)
                if fut.done():
                    return
                if self._loop.is_closed():  # stopped under a follower: nothing will run it now
                    fut.cancel()
                    return
                self._driving = True
            try:
                self._loop.run_until_complete(_done(fut))
            except asyncio.CancelledError:
                pass  # stop()'s _cancel_all cancelled _done before it ran: look again
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
        self._futures.discard(fut)
        if threading.current_thread() is not threading.main_thread() or _deferring():
            with self._cond:  # (not under a handler that may raise in the main thread)
                self._cond.notify_all()  # its follower, waiting in _drive_until

    def _hand_over(
        self, fut: concurrent.futures.Future[Any], tasks: list[asyncio.Task[Any]]
    ) -> None:
        """Have the helper thread drive the loop until ``fut`` is done (see the class)."""
        if self._helper is None:
            with self._helper_lock:  # the first hand-over only
                if self._helper is None:
                    helper = threading.Thread(target=self._serve, name="tq-client", daemon=True)
                    helper.start()
                    self._helper = helper
        self._requests.put((fut, tasks))

    def _serve(self) -> None:
        """The helper thread: drive (or follow) for each handed-over call in turn. A call whose
        caller gave up (Ctrl-C) is driven until its task has ended (its wait withdrawn)."""
        while (item := self._requests.get()) is not None:
            fut, tasks = item
            try:
                self._drive_until(fut)
                if tasks and not tasks[0].done():
                    self._abandon(tasks)
            except (Exception, asyncio.CancelledError):  # must not leave callers driverless
                log.exception("client.helper_failed")

    def stop(self) -> None:
        """Stop the loop. Requests other threads still wait on are cancelled first (they raise
        ``BrokerUnavailable("client closed")``): stopped under them, their coroutines would
        never finish, and those threads would block forever."""
        if self._stopping:
            return
        self._stopping = True  # no new call starts from here (a call checks it first)
        if self._loop.is_closed():
            return
        fut = asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop)
        try:
            # The main thread included, whatever its Ctrl-C handler: closing is rare, and
            # the helper needs no handler swapped.
            main = threading.current_thread() is threading.main_thread()
            if main or asyncio._get_running_loop() is not None:
                self._hand_over(fut, [])
                concurrent.futures.wait([fut], timeout=STOP_WAIT_S + 1)
            else:
                self._drive_until(fut)
        finally:
            if self._helper is not None:
                self._requests.put(None)
                self._helper.join(timeout=STOP_WAIT_S + 1)
            # Whoever drives lets go once its cancelled call ends. Polled, not waited on with
            # the class's lock, which the main thread takes only with Ctrl-C deferred.
            deadline = time.monotonic() + STOP_WAIT_S + 1
            while self._driving and time.monotonic() < deadline:
                time.sleep(0.005)
            if not self._driving:
                self._loop.close()
            for pending in list(self._futures):
                pending.cancel()

    @property
    def stopped(self) -> bool:
        return self._stopping


# The C half of ``signal``: its Python wrappers turn every handler into an enum and back, which
# cost 4 µs a ``getsignal`` here, against 0.07 µs. Every signal is looked at on each call.
_getsignal: Callable[[int], object] = _signal.getsignal
SIGINT = int(signal.SIGINT)
_OTHER_SIGNALS = tuple(int(s) for s in signal.valid_signals() if s != signal.SIGINT)
_NO_HANDLER = frozenset({0, 1, None})  # SIG_DFL, SIG_IGN, a handler not set from Python


def _others_unhandled() -> bool:
    """No Python handler on any signal but SIGINT, so the main thread may run the loop (see
    _Driver). ~2 µs for the 64 signals here."""
    try:
        return {*map(_getsignal, _OTHER_SIGNALS)} <= _NO_HANDLER
    except TypeError:  # a handler that cannot be hashed: somebody's, all the same
        return False


def _deferring() -> bool:
    """The main thread is inside a call with Ctrl-C deferred (the only way it drives)."""
    return isinstance(getattr(_getsignal(SIGINT), "__self__", None), _Interrupts)


def _after_fork_in_child() -> None:
    """A child forked (by another thread) during a main-thread call inherits the deferring
    handler, whose call and loop are not the child's: a Ctrl-C there would only be counted."""
    if _deferring():
        try:
            _signal.signal(SIGINT, signal.default_int_handler)
        except ValueError:  # (signal handlers can be set from the main thread only)
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Interrupts:
    """Ctrl-C during a main-thread call (driven, followed or handed over): counted, and the
    call cancelled from inside the loop, never an exception raised wherever the thread happens
    to be (as ``asyncio.Runner`` handles it). The handler does no more than a counter and a
    thread-safe call: it may run inside any lock this thread holds."""

    __slots__ = ("_cancel", "_loop", "count")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._cancel: Callable[[], Any] | None = None
        self.count = 0

    def handle(self, signum: int, frame: object) -> None:
        self.count += 1
        if self._cancel is not None:
            # Every time, not only the first: a cancellation can be swallowed (3.11's wait_for,
            # as the connect it wraps completes), and the call must not outlive a second Ctrl-C.
            self._schedule(self._cancel)

    def arm(self, cancel: Callable[[], Any]) -> None:
        """What a Ctrl-C cancels: the call's task or future, once it exists."""
        self._cancel = cancel
        if self.count:  # came before it existed
            self._schedule(cancel)

    def _schedule(self, cancel: Callable[[], Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # the loop closed (the client stopped): the call ends anyway
            pass


async def _tracked(
    coro: Coroutine[Any, Any, T], tasks: list[asyncio.Task[Any]], unread: Callable[[], bool]
) -> T:
    """Run ``coro``, leaving its task in ``tasks`` (for ``_Driver._abandon``). If the broker sent
    something while nobody ran the loop (its close, say), the loop reads it first: a request on
    a connection already closed is lost with it, and one not safe to repeat (a cancel) would
    fail, where it must go on a new connection. Two turns: the read, then what it calls next
    (connection_lost)."""
    task = asyncio.current_task()
    if task is not None:
        tasks.append(task)
    if unread():
        for _ in range(2):
            await asyncio.sleep(0)
    return await coro


async def _done(fut: concurrent.futures.Future[Any]) -> None:
    """Wait for ``fut`` without raising what it raised (its caller reads that). Cancelled by
    ``stop()`` (which cancels every task), it just ends: ``_drive_until`` looks again."""
    wrapped = asyncio.wrap_future(fut)
    try:
        await asyncio.wait([wrapped])
    except asyncio.CancelledError:
        return
    if not wrapped.cancelled():
        wrapped.exception()  # read here too: else asyncio logs it as never retrieved


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
