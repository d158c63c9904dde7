"""Task handlers the integration tests load into real workers (``tq worker --app <this file>``).

Handlers that need to be observed record every execution as one JSON line in the file named by
``payload["file"]``; the tests read that file back with :func:`read_runs` to count executions,
see which worker process ran them and when.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from tq.worker.registry import task


def _append(path: str, record: dict[str, Any]) -> int:
    """Append one JSON line atomically (one O_APPEND write); return how many runs are recorded."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return len(read_runs(path))


def read_runs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every recorded execution, in the order they happened."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@task(name="test.record")
def record(payload: dict[str, Any]) -> dict[str, Any]:
    """Record this run, then do what the payload asks.

    ``file`` (required): where to record; ``tag``: copied into the record;
    ``sleep``: seconds to sleep (blocking, in the worker's thread pool);
    ``sleep_first``: seconds to sleep on the first recorded run only;
    ``fail``: raise on every run; ``fail_times``: raise on the first N runs only.
    """
    n = _append(
        payload["file"],
        {"t": time.time(), "pid": os.getpid(), "tag": payload.get("tag")},
    )
    if n == 1 and payload.get("sleep_first"):
        time.sleep(float(payload["sleep_first"]))
    if payload.get("sleep"):
        time.sleep(float(payload["sleep"]))
    if payload.get("fail") or n <= int(payload.get("fail_times", 0)):
        raise RuntimeError(f"recorded failure on run {n}")
    return {"runs": n, "tag": payload.get("tag")}


@task(name="test.boom")
def boom(payload: Any) -> Any:
    """Always raises ValueError."""
    raise ValueError(f"boom: {payload!r}")


@task(name="test.slow_sync")
def slow_sync(payload: Any) -> Any:
    """Blocking sleep of ``payload`` seconds (a handler Python cannot cancel), then echo it."""
    time.sleep(float(payload))
    return payload


@task(name="test.long_sleep")
async def long_sleep(payload: dict[str, Any]) -> Any:
    """Record the start in ``payload["file"]``, then sleep ``payload["seconds"]`` (async)."""
    _append(payload["file"], {"t": time.time(), "pid": os.getpid(), "tag": "start"})
    await asyncio.sleep(float(payload.get("seconds", 60)))
    return "woke up"


@task(name="test.progress")
def report_progress(payload: dict[str, Any]) -> str:
    """Report progress in ``steps`` steps (``pause`` seconds apart), then finish."""
    import tq

    steps = int(payload.get("steps", 3))
    for i in range(1, steps + 1):
        time.sleep(float(payload.get("pause", 0.15)))
        tq.progress(i / steps, f"step {i}")
    return "done"
