"""Handlers for tests/integration/test_worker_review.py (``tq worker --app <this file>``): what
a handler may hand back that the worker once recorded wrongly, and a run that records its start,
end or cancellation."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from tq.worker.registry import task


@task(name="review.stop_iteration")
def stop_iteration(payload: Any) -> Any:
    """An ordinary bug in a sync handler: ``next()`` on an empty iterator."""
    return next(iter(payload or []))


@task(name="review.generator_exit")
def generator_exit(payload: Any) -> Any:
    raise GeneratorExit("closing")


@task(name="review.self_ref")
def self_ref(payload: Any) -> Any:
    d: dict[str, Any] = {}
    d["d"] = d
    return d


@task(name="review.non_finite")
def non_finite(payload: Any) -> Any:
    return {"mean": float("nan"), "max": float("inf"), "none": None}


@task(name="review.nulls")
def nulls(payload: Any) -> Any:
    """A result with null and finite floats: completes as it is."""
    return {"none": None, "x": 1.5, "text": "null"}


@task(name="review.big_result")
def big_result(payload: dict[str, Any]) -> str:
    return "y" * int(payload["n"])


def record(path: str, key: str, what: str) -> None:
    """One JSON line ``{"k": key, "what": what}``, appended in one write."""
    line = (json.dumps({"k": key, "what": what}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_events(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    p = Path(path)
    if not p.exists():
        return []
    return [
        (e["k"], e["what"])
        for e in (json.loads(line) for line in p.read_text().splitlines() if line.strip())
    ]


def most_at_once(events: list[tuple[str, str]]) -> int:
    """The most runs going at once: each ``start`` opens one, anything else closes it."""
    now = most = 0
    for _, what in events:
        now += 1 if what == "start" else -1
        most = max(most, now)
    return most


@task(name="review.track")
async def track(payload: dict[str, Any]) -> Any:
    """Record the start, then the end or the cancellation, of a sleep of ``s`` seconds."""
    record(payload["file"], payload["k"], "start")
    try:
        await asyncio.sleep(float(payload["s"]))
    except asyncio.CancelledError:
        record(payload["file"], payload["k"], "cancelled")
        raise
    record(payload["file"], payload["k"], "end")
    return payload["k"]
