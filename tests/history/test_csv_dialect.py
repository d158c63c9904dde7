"""A CSV export reads back whatever its size: DuckDB sniffs a CSV's dialect from its first 20,480
rows, so an export whose first quoted field came later was read with no quote character and
failed ("CSV Error on Line: 22502"). The export is written by tq's own code (``export_tasks``)
from fabricated pages, so no broker is needed and the test stays fast."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from tq.client import AsyncClient
from tq.history import export_tasks, run_query
from tq.protocol.messages import HistoryRow

from tests.conftest import ok
from tests.history.conftest import tq

PLAIN_ROWS = 22_500  # more than DuckDB's 20,480-row sniffing sample
MESSAGE = 'disk full, "retry" later\nsecond line'  # a comma, quotes and a newline


def _row(i: int, *, dead: bool = False) -> HistoryRow:
    t0 = 1_714_564_800_000 + i
    return HistoryRow(
        id=f"t{i:08d}",
        name="fail" if dead else "echo",
        queue="default",
        priority=1,
        state="dead" if dead else "completed",
        attempts=1,
        worker="w-1",
        submitted_at_ms=t0,
        started_at_ms=t0 + 1,
        finished_at_ms=t0 + 3,
        error_type="ConnectionError" if dead else "",
        error_message=MESSAGE if dead else "",
        payload_bytes=2,
        result_bytes=0 if dead else 2,
    )


class _Pages:
    """Stands in for ``AsyncClient.export_page``: the rows, in pages of ``limit``."""

    def __init__(self, rows: list[HistoryRow]) -> None:
        self.rows = rows

    async def export_page(
        self, *, limit: int, after: str | None, **_: Any
    ) -> tuple[list[HistoryRow], str | None]:
        start = int(after or 0)
        end = start + limit
        return self.rows[start:end], (str(end) if end < len(self.rows) else None)


def _export_csv(path: Path) -> None:
    rows = [_row(i) for i in range(PLAIN_ROWS)] + [_row(PLAIN_ROWS, dead=True)]
    client = cast(AsyncClient, _Pages(rows))
    summary = asyncio.run(export_tasks(client, str(path), page_size=10_000))
    assert summary.rows == PLAIN_ROWS + 1


def test_a_csv_export_with_a_late_quoted_field_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    _export_csv(path)
    result = run_query(
        str(path),
        "SELECT count(*) AS n, count(error_message) AS errors, max(error_message) AS message "
        "FROM tasks",
    )
    assert result.rows == [(PLAIN_ROWS + 1, 1, MESSAGE)]
    # and through the command, as the review ran it
    out = ok(
        tq(
            "history", "--from", str(path), "-o", "csv",
            "SELECT count(*) AS n FROM tasks WHERE state = 'dead'",
            state_dir=tmp_path,
        )
    )  # fmt: skip
    assert out == "n\n1\n"
