"""``--since`` and ``--until``: an ISO-8601 time, or an age such as ``15m``, ``2h``, ``7d``."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

from tq.history.schema import HistoryError

_AGE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS: Final = {
    "ms": 1,
    "s": 1_000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 604_800_000,
}


def parse_when(text: str, now_ms: int) -> int:
    """Milliseconds since the epoch for ``text``: an age (``2h`` = two hours before ``now_ms``)
    or an ISO-8601 date or time (``2024-05-01``, ``2024-05-01T12:30:00+02:00``; without an
    offset it is UTC).

    Never below 1: a time before 1970 must still bound the window, and 0 means "no bound" on
    the wire (``--until 1960-01-01`` exported everything)."""
    m = _AGE.match(text)
    if m:
        return max(1, now_ms - int(float(m[1]) * _UNIT_MS[m[2]]))
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise HistoryError(
            f"{text!r} is neither an ISO-8601 time (2024-05-01T12:00:00) nor an age (30m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(1, int(when.timestamp() * 1000))
