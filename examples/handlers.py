"""Custom task handlers: run them with ``tq worker --app examples/handlers.py``.

A handler is a function decorated with ``@task``. It gets the task's payload (decoded JSON) as its
one argument and returns a JSON-serializable result. ``async def`` handlers run on the worker's
event loop; plain functions run in the worker's thread pool, so blocking code is fine there.
An exception fails the attempt: the broker retries the task with exponential backoff and, once
its retries are used up, moves it to the dead-letter queue (state ``dead``).

The worker registers its built-in handlers (``echo``, ``sleep``, ``json``, ``fail``) as well.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from tq import task


@task
def add(payload: dict[str, int]) -> int:
    """Sync handler: ``{"a": 1, "b": 2}`` -> ``3``."""
    return payload["a"] + payload["b"]


@task(name="text.wordcount")
def wordcount(payload: str) -> dict[str, int]:
    """Sync handler registered under an explicit name: counts the words of a string."""
    counts: dict[str, int] = {}
    for word in payload.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts


@task
async def resize(payload: dict[str, Any]) -> dict[str, Any]:
    """Async handler: "resize" an image so that its longer side is at most ``max_side``.

    Payload ``{"image": "a.jpg", "width": 4000, "height": 3000, "max_side": 512}``. Nothing is
    really resized: it sleeps a little to stand in for the work and returns the new size."""
    await asyncio.sleep(0.05)
    width, height = int(payload["width"]), int(payload["height"])
    scale = min(1.0, int(payload.get("max_side", 512)) / max(width, height))
    return {
        "image": payload["image"],
        "width": round(width * scale),
        "height": round(height * scale),
        "pixels_saved": width * height - round(width * scale) * round(height * scale),
    }


@task
async def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """Async handler: totals over the results of the ``resize`` tasks of one workflow."""
    results: list[dict[str, Any]] = payload["results"]
    return {
        "images": len(results),
        "pixels_saved": sum(r["pixels_saved"] for r in results),
        "sizes": sorted({f"{r['width']}x{r['height']}" for r in results}),
        "failed": payload.get("failed", []),
    }


@task
def flaky(payload: dict[str, Any]) -> dict[str, Any]:
    """Sync handler that fails at random (``fail_rate``, default 0.3) to show retries.

    A handler sees only its payload, not the attempt number: the broker keeps that
    (``TaskInfo.attempt``). Each failure is recorded as the task's ``error`` and the task waits in
    state ``failed`` for its backoff; after ``max_retries`` retries it is ``dead``."""
    if random.random() < float(payload.get("fail_rate", 0.3)):
        raise ConnectionError(f"upstream for item {payload.get('item')} did not answer")
    return {"item": payload.get("item"), "ok": True}
