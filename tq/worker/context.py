"""What a handler may ask about the task it is running: ``tq.progress()``.

The worker sets a context variable around each handler call (copied into the thread of a sync
handler), so a handler reports progress without being passed anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

MIN_INTERVAL_S = 0.1  # progress reports of one task closer together than this are skipped


@dataclass(slots=True)
class TaskContext:
    task_id: str
    token: int
    send: Callable[[str, int, float, str], None]  # thread-safe, fire and forget
    last: float = 0.0


current: ContextVar[TaskContext | None] = ContextVar("tq_task", default=None)


def progress(fraction: float = -1.0, message: str = "") -> bool:
    """Report how far the running task has got: ``fraction`` in 0..1 (or -1 for none) and/or a
    short message. Watchers (``tq top``) see it live. Works from sync and async handlers; outside
    a handler it does nothing. Returns False when the report was skipped (too soon after the
    previous one, or not in a task)."""
    ctx = current.get()
    if ctx is None:
        return False
    now = time.monotonic()
    if now - ctx.last < MIN_INTERVAL_S and fraction < 1.0:
        return False
    ctx.last = now
    ctx.send(ctx.task_id, ctx.token, max(-1.0, min(1.0, float(fraction))), message[:1000])
    return True
