"""tq: a durable, fast distributed task queue.

The public API is what ``__all__`` names; everything else is internal.
"""

from __future__ import annotations

from tq._version import __version__
from tq.client import AsyncClient, Client, TaskInfo
from tq.worker.context import progress
from tq.worker.registry import task
from tq.worker.runner import Worker

__all__ = [
    "AsyncClient",
    "Client",
    "TaskInfo",
    "Worker",
    "__version__",
    "errors",
    "progress",
    "task",
]
