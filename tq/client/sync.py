"""The blocking ``Client``: the ``AsyncClient`` driven through a private event-loop thread (a
portal, as anyio does), so there is one implementation of the protocol, not two."""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from tq.client.aio import AsyncClient, TaskInfo
from tq.model import DEFAULT_MAX_RETRIES, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S

T = TypeVar("T")


class _Portal:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tq-client", daemon=True
        )
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            # Ctrl-C (KeyboardInterrupt) lands here, in the caller's thread: the request must
            # stop too, or a `c.wait()` interrupted in a REPL would go on waiting behind it.
            fut.cancel()
            raise

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    @property
    def stopped(self) -> bool:
        return self._loop.is_closed()


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
