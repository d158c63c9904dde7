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
        self._idle = 0  # threads waiting for work that no submit has reserved
        self._backlog = 0  # work submitted while no thread was free
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if self._shutdown:
            raise RuntimeError("pool is shut down")
        fut: Future[T] = Future()
        with self._lock:
            # Reserve a thread for this work now, under the lock: an idle thread counted as idle
            # until it woke up once served several submits of one loop iteration, which then ran
            # one after another on it while their timeouts ran.
            if self._idle > 0:
                self._idle -= 1
            elif len(self._threads) < self._max:
                t = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
            else:
                self._backlog += 1  # every thread is busy: the first to finish takes it
        self._queue.put((fut, fn, args, kwargs))
        return fut

    @property
    def free(self) -> int:
        """Threads that could start a handler now: idle ones, plus those not yet created."""
        with self._lock:
            return self._max - len(self._threads) + self._idle

    def _run(self) -> None:
        # A thread starts reserved for the work that started it, and is idle (counted in
        # ``_idle``) only between finishing one piece of work and a submit reserving it again.
        while True:
            work = self._queue.get()
            if work is None:
                return
            fut, fn, args, kwargs = work
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    fut.set_exception(exc)
            with self._lock:
                if self._backlog > 0:
                    self._backlog -= 1  # stay reserved: take work queued while all were busy
                else:
                    self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()
