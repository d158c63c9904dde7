"""Handlers every worker has: handy for trying tq out and for benchmarks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from tq.worker.registry import registry


async def echo(payload: Any) -> Any:
    """Return the payload unchanged."""
    return payload


async def sleep(payload: Any) -> Any:
    """Sleep ``payload`` seconds (a number, or ``{"seconds": n}``), then return the payload."""
    seconds = payload.get("seconds", 1) if isinstance(payload, dict) else payload
    await asyncio.sleep(float(seconds or 0))
    return payload


def json_handler(payload: Any) -> Any:
    """Parse a JSON document given as a string payload; any other payload is returned as is."""
    if isinstance(payload, str):
        return msgspec.json.decode(payload)
    return payload


def fail(payload: Any) -> Any:
    """Always raise: shows retries, backoff and the dead-letter queue."""
    message = payload.get("message", "failed on purpose") if isinstance(payload, dict) else payload
    raise RuntimeError(str(message))


async def timestamp(payload: Any) -> Any:
    """Return when the handler started (ns since the epoch): ``tq bench`` measures dispatch."""
    return {"started_ns": time.time_ns()}


def register_builtins() -> None:
    """Add the built-ins under names the app did not take: a user's ``echo`` wins."""
    for name, fn in (
        ("echo", echo),
        ("sleep", sleep),
        ("json", json_handler),
        ("fail", fail),
        ("timestamp", timestamp),
    ):
        if registry.get(name) is None:
            registry.register(name, fn)
