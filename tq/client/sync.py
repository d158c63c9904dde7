"""The blocking ``Client``: the ``AsyncClient`` driven through a private event-loop thread (a
portal, as anyio does), so there is one implementation of the protocol, not two."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from tq.client.aio import AsyncClient, TaskInfo
from tq.errors import BrokerUnavailable
from tq.model import DEFAULT_MAX_RETRIES, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S

T = TypeVar("T")


STOP_WAIT_S = 2.0  # how long stop() lets the requests still running end before it stops the loop


class _Portal:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tq-client", daemon=True
        )
        self._lock = threading.Lock()
        self._stopping = False
        # Every caller's future not yet resolved: stop() fails those the loop will never get
        # to (a request scheduled just as the loop stopped would leave its caller blocked).
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._stopping:
                coro.close()  # never to run: no "was never awaited" warning
                raise BrokerUnavailable("client closed")
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            if self._stopping:  # cancelled by stop(), not by this caller
                raise BrokerUnavailable("client closed") from None
            raise
        except BaseException:
            # Ctrl-C (KeyboardInterrupt) lands here, in the caller's thread: the request must
            # stop too, or a `c.wait()` interrupted in a REPL would go on waiting behind it.
            fut.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop thread. Requests other threads still wait on are cancelled first
        (they raise ``BrokerUnavailable("client closed")``): stopped under them, their
        coroutines would never finish, and those threads would block forever."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        if self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(STOP_WAIT_S + 1)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # the loop is wedged or already stopped: the futures are failed below
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        for fut in list(self._futures):
            fut.cancel()
        self._loop.close()

    @property
    def stopped(self) -> bool:
        return self._stopping


async def _cancel_all() -> None:
    """Cancel every other task of the portal's loop and let them end (briefly)."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_WAIT_S)


class Client:
    """``with Client("tcp://127.0.0.1:7700") as c: c.submit("echo", {"x": 1})``"""

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        self.aio = AsyncClient(url, **kwargs)  # first: a bad URL must not leave a thread behind
        self._portal = _Portal()

    def __enter__(self) -> Client:
        try:
            self._portal.call(self.aio.connect())
        except BaseException:
            # ``__exit__`` does not run when ``__enter__`` raises: a producer retrying an
            # unreachable broker in a loop would leak a thread and a loop per attempt.
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the portal thread; closing again does nothing."""
        if self._portal.stopped:
            return
        try:
            self._portal.call(self.aio.close())
        finally:
            self._portal.stop()

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
        return self._portal.call(
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
        return self._portal.call(
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
        return self._portal.call(self.aio.status(task_id))

    def wait(self, task_id: str, timeout_s: float = 30.0) -> TaskInfo:
        return self._portal.call(self.aio.wait(task_id, timeout_s))

    def list(
        self,
        state: str = "pending",
        *,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
    ) -> builtins.list[TaskInfo]:
        return self._portal.call(self.aio.list(state, queue=queue, name=name, limit=limit))

    def cancel(self, task_id: str) -> TaskInfo:
        return self._portal.call(self.aio.cancel(task_id))

    def pause_queue(self, queue: str) -> None:
        self._portal.call(self.aio.pause_queue(queue))

    def resume_queue(self, queue: str) -> None:
        self._portal.call(self.aio.resume_queue(queue))

    def dead_letters(self, **filters: Any) -> builtins.list[TaskInfo]:
        """Filters as for ``AsyncClient.dead_letters``."""
        return self._portal.call(self.aio.dead_letters(**filters))

    def retry_dead(
        self, task_ids: builtins.list[str] | None = None, **filters: Any
    ) -> builtins.list[str]:
        return self._portal.call(self.aio.retry_dead(task_ids, **filters))

    def purge_dead(
        self, task_ids: builtins.list[str] | None = None, **filters: Any
    ) -> builtins.list[str]:
        return self._portal.call(self.aio.purge_dead(task_ids, **filters))

    def stats(self) -> dict[str, Any]:
        return self._portal.call(self.aio.stats())
