"""``--since`` / ``--until`` values: ISO-8601 times (UTC unless they say otherwise) and ages."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from tq.history import HistoryError, parse_when

NOW_MS = int(datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("text", "ago_ms"),
    [
        ("90s", 90_000),
        ("15m", 900_000),
        ("2h", 7_200_000),
        ("1.5h", 5_400_000),
        ("7d", 604_800_000),
        ("1w", 604_800_000),
        ("250ms", 250),
        (" 3 h ", 10_800_000),
    ],
)
def test_an_age_counts_back_from_now(text: str, ago_ms: int) -> None:
    assert parse_when(text, NOW_MS) == NOW_MS - ago_ms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
        ("2024-05-01T11:30:00", datetime(2024, 5, 1, 11, 30, tzinfo=UTC)),
        ("2024-05-01 11:30", datetime(2024, 5, 1, 11, 30, tzinfo=UTC)),
        ("2024-05-01T11:30:00Z", datetime(2024, 5, 1, 11, 30, tzinfo=UTC)),
        ("2024-05-01T13:30:00+02:00", datetime(2024, 5, 1, 11, 30, tzinfo=UTC)),
        ("2024-05-01T11:30:00.250", datetime(2024, 5, 1, 11, 30, 0, 250_000, tzinfo=UTC)),
    ],
)
def test_an_iso_time_without_an_offset_is_utc(text: str, expected: datetime) -> None:
    assert parse_when(text, NOW_MS) == int(expected.timestamp() * 1000)


def test_a_time_before_the_epoch_still_bounds_the_window() -> None:
    # 1 ms after the epoch, not 0: on the wire 0 means "no bound", and `--until 1960-01-01`
    # exported everything.
    assert parse_when("100000w", NOW_MS) == 1
    assert parse_when("1960-01-01", NOW_MS) == 1


@pytest.mark.parametrize("text", ["", "soon", "2h ago", "-2h", "2024-13-01", "5 years"])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(HistoryError, match="neither an ISO-8601 time"):
        parse_when(text, NOW_MS)
