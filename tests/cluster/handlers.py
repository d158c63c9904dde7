"""Handlers the cluster tests load into real workers (``tq worker --app <this file>``).

``cluster.mark`` appends the task id from its payload to the file named in the payload, one line
per execution (one ``O_APPEND`` write, so concurrent workers never interleave): the history
checker reads it back to see which acknowledged tasks really ran (at-least-once).
"""

from __future__ import annotations

import os
from typing import Any

from tq.worker.registry import task

MARK = "cluster.mark"


@task(name=MARK)
def mark(payload: dict[str, Any]) -> str:
    tid = str(payload["id"])
    fd = os.open(payload["f"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tid}\n".encode())
    finally:
        os.close(fd)
    return tid
