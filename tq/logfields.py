"""Structured log events without a logging dependency in every module.

Modules log ``noun.verb`` event names with key-value fields::

    log.info("worker.connected", extra=kv(worker=worker_id, host=host))

Only the CLI configures logging (tq/cli/logfmt.py renders the fields as JSON lines or as
``key=value`` on a console). Counts belong in metrics, not in per-task log lines.
"""

from __future__ import annotations

from typing import Any


def kv(**fields: Any) -> dict[str, Any]:
    """The ``extra`` argument that carries an event's fields."""
    return {"tq_fields": fields}
