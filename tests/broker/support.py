"""Comparing two state machines: their results as plain data, their stores byte for byte."""

from __future__ import annotations

from typing import Any

from tq.store import CF, Store


def normalize(value: Any) -> Any:
    """Results as comparable data: exceptions do not compare equal by value."""
    if isinstance(value, BaseException):
        return ("error", type(value).__name__, str(value))
    if isinstance(value, list | tuple):
        return type(value)(normalize(v) for v in value)
    return value


def dump_store(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every column family's items, in key order."""
    return {cf.value: list(store.items(cf)) for cf in CF}
