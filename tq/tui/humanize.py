"""Numbers and values as short text for narrow columns: ages, sizes, rates, sparklines, and
JSON pretty-printed with a hard bound on the output (a 10 MiB payload must never be rendered)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

BARS: Final = " ▁▂▃▄▅▆▇█"
PRETTY_LIMIT_CHARS: Final = 16_000


def age(ms: int) -> str:
    """``850ms``, ``12s``, ``4m05s``, ``3h12m``, ``2d04h``; empty for no value."""
    if ms < 0:
        ms = 0
    if ms < 1000:
        return f"{ms}ms"
    s = ms // 1000
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def since(at_ms: int, now_ms: int) -> str:
    return age(now_ms - at_ms) if at_ms else "—"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"  # pragma: no cover


def rate(per_s: float) -> str:
    if per_s >= 10_000:
        return f"{per_s / 1000:.0f}k"
    if per_s >= 100:
        return f"{per_s:.0f}"
    return f"{per_s:.1f}"


def when(ms: int) -> str:
    if not ms:
        return "—"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def spark(values: Sequence[float], width: int) -> str:
    """The last ``width`` buckets of ``values`` as block characters, scaled to their maximum."""
    if width <= 0:
        return ""
    if not values:
        return " " * width
    per = max(1, -(-len(values) // width))  # samples per bucket, so the whole history fits
    buckets = [
        sum(values[i : i + per]) / len(values[i : i + per]) for i in range(0, len(values), per)
    ][-width:]
    top = max(buckets)
    if top <= 0:
        line = BARS[1] * len(buckets)
    elif min(buckets) == top:  # a steady rate: a level line, not a wall
        line = BARS[4] * len(buckets)
    else:
        line = "".join(BARS[max(1, round(v / top * (len(BARS) - 1)))] for v in buckets)
    return line.rjust(width)


def pretty(value: Any, limit: int = PRETTY_LIMIT_CHARS) -> tuple[str, bool]:
    """``value`` as indented JSON, cut after about ``limit`` characters; returns the text and
    whether it was cut. Works incrementally, so a huge value costs no more than ``limit``."""
    if isinstance(value, bytes | bytearray):
        head = bytes(value[:256]).hex(" ")
        return f"<{len(value)} bytes, not JSON> {head}", len(value) > 256
    out: list[str] = []
    used = 0
    for chunk in json.JSONEncoder(indent=2, ensure_ascii=False, default=str).iterencode(value):
        if used + len(chunk) > limit:
            out.append(chunk[: max(0, limit - used)])
            return "".join(out), True
        out.append(chunk)
        used += len(chunk)
    return "".join(out), False


def clip(text: str, limit: int = PRETTY_LIMIT_CHARS) -> tuple[str, bool]:
    return (text[:limit], True) if len(text) > limit else (text, False)
