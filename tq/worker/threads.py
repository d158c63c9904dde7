"""A thread pool of daemon threads for sync handlers.

``concurrent.futures.ThreadPoolExecutor`` joins its threads at interpreter exit, so one handler
stuck in a blocking call would keep a SIGTERMed worker alive past ``--grace`` (and its task would
run twice: once here, once redelivered). Python cannot kill a thread; a daemon thread at least
does not hold the process hostage. Written by hand because the standard library has no daemon
option and this is thirty lines.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreadPool(Executor):
    def __init__(self, max_workers: int, name: str = "tq-handler") -> None:
        self._max = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if self._shutdown:
            raise RuntimeError("pool is shut down")
        fut: Future[T] = Future()
        self._queue.put((fut, fn, args, kwargs))
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._max:
                t = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
        return fut

    @property
    def free(self) -> int:
        """Threads that could start a handler now: idle ones, plus those not yet created."""
        with self._lock:
            return self._max - len(self._threads) + self._idle

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            work = self._queue.get()
            with self._lock:
                self._idle -= 1
            if work is None:
                return
            fut, fn, args, kwargs = work
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                fut.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()
