"""``tq export`` after a known workload (tests/history/conftest.py): every format holds the same
rows and columns and opens in DuckDB, the filters select what they say, paging loses nothing."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import duckdb
import pytest
from tq.client import AsyncClient
from tq.history import export_tasks, run_query

from tests.conftest import ok, one_line_error
from tests.history.conftest import (
    BY_NAME,
    BY_QUEUE,
    BY_STATE,
    EXPORT_COLUMNS,
    SLEEP_MS,
    TOTAL,
    Workload,
    tq,
)

READERS = {
    "parquet": "read_parquet('{}')",
    "csv": "read_csv('{}', header = true)",
}


def open_raw(path: Path) -> tuple[duckdb.DuckDBPyConnection, str]:
    """DuckDB on the file, without our query code: a connection and what to select from."""
    fmt = path.suffix.lstrip(".")
    if fmt == "duckdb":
        return duckdb.connect(str(path), read_only=True), "tasks"
    return duckdb.connect(), READERS[fmt].format(path)


def counts(con: duckdb.DuckDBPyConnection, source: str, column: str) -> dict[str, int]:
    rows = con.execute(f"SELECT {column}, count(*) FROM {source} GROUP BY ALL").fetchall()
    return {str(k): int(n) for k, n in rows}


@pytest.mark.parametrize("fmt", ["parquet", "duckdb", "csv"])
def test_each_format_opens_in_duckdb_with_every_task_and_column(
    workload: Workload, fmt: str
) -> None:
    con, source = open_raw(workload.exports[fmt])
    try:
        columns = [d[0] for d in con.execute(f"SELECT * FROM {source} LIMIT 0").description]
        assert columns == EXPORT_COLUMNS
        assert con.execute(f"SELECT count(*) FROM {source}").fetchone() == (TOTAL,)
        assert counts(con, source, "state") == BY_STATE
        assert counts(con, source, "queue") == BY_QUEUE
        assert counts(con, source, "name") == BY_NAME
        assert con.execute(f"SELECT count(DISTINCT id) FROM {source}").fetchone() == (TOTAL,)
        types = {
            row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
        }
        assert types["finished_at"] == "TIMESTAMP"
        assert types["run_ms"] == "BIGINT"
    finally:
        con.close()


def test_rows_carry_the_task_as_the_broker_saw_it(workload: Workload) -> None:
    rows = {
        r["id"]: r
        for r in _dicts(run_query(str(workload.exports["parquet"]), "SELECT * FROM tasks"))
    }
    assert len(rows) == TOTAL
    sleeps = [r for r in rows.values() if r["name"] == "sleep"]
    assert {r["priority"] for r in sleeps} == {"high"}
    assert all(r["run_ms"] >= SLEEP_MS for r in sleeps)
    assert all(r["worker"] == workload.worker_id for r in sleeps)
    assert all(r["payload_bytes"] == len('{"seconds":0.05}') for r in sleeps)
    assert all(r["result_bytes"] == len('{"seconds":0.05}') for r in sleeps)

    for r in rows.values():
        assert r["finished_at"] is not None
        if r["state"] == "cancelled":
            assert (r["attempts"], r["worker"], r["started_at"]) == (0, None, None)
            assert (r["wait_ms"], r["run_ms"]) == (None, None)
        else:
            assert r["submitted_at"] <= r["started_at"] <= r["finished_at"]
            assert r["wait_ms"] >= 0
            assert r["run_ms"] >= 0
            assert r["worker"] == workload.worker_id

    errors = [r for r in rows.values() if r["error_type"] is not None]
    assert sorted(r["state"] for r in errors) == ["dead", "dead", "dead", "failed"]
    assert {r["error_type"] for r in errors} == {"RuntimeError"}
    assert {r["error_message"] for r in errors} == {"boom", "try later"}
    dead_attempts = sorted(r["attempts"] for r in errors if r["state"] == "dead")
    assert dead_attempts == [1, 1, 3]
    assert all(r["result_bytes"] == 0 for r in errors)


def test_every_format_holds_the_same_rows(workload: Workload) -> None:
    query = (
        "SELECT id, name, queue, priority, state, attempts, worker, finished_at, "
        "wait_ms, run_ms, error_type FROM tasks ORDER BY id"
    )
    results = {fmt: run_query(str(path), query).rows for fmt, path in workload.exports.items()}
    assert results["parquet"] == results["duckdb"] == results["csv"]
    assert len(results["parquet"]) == TOTAL


def test_export_remembers_the_latest_file_for_tq_history(workload: Workload) -> None:
    # The fixture exported parquet, duckdb, then csv: the csv is the latest.
    latest = (workload.state_dir / "tq" / "last_export").read_text().strip()
    assert latest == str(workload.exports["csv"])


def export_count(workload: Workload, tmp_path: Path, *args: str) -> dict[str, Any]:
    """Export with ``args`` to a fresh file; return the command's JSON summary."""
    out = tmp_path / f"x{len(list(tmp_path.iterdir()))}.parquet"
    summary: dict[str, Any] = json.loads(
        ok(
            tq(
                "export",
                "-b",
                workload.url,
                "--out",
                str(out),
                "-o",
                "json",
                *args,
                state_dir=tmp_path / "state",
            )
        )
    )
    assert summary["path"] == str(out)
    assert summary["format"] == "parquet"
    assert run_query(str(out), "SELECT count(*) FROM tasks").rows == [(summary["rows"],)]
    return summary


def test_queue_and_state_filters_select_only_those_tasks(
    workload: Workload, tmp_path: Path
) -> None:
    assert export_count(workload, tmp_path, "--queue", "reports")["rows"] == BY_QUEUE["reports"]
    assert export_count(workload, tmp_path, "--state", "dead")["rows"] == BY_STATE["dead"]
    both = export_count(workload, tmp_path, "-s", "dead", "-s", "cancelled", "-q", "reports")
    assert both["rows"] == BY_STATE["dead"]  # the cancelled task was on `parked`


def test_time_window_filters_on_finished_at(workload: Workload, tmp_path: Path) -> None:
    assert export_count(workload, tmp_path, "--since", "1h")["rows"] == TOTAL
    assert export_count(workload, tmp_path, "--until", "1h")["rows"] == 0
    assert export_count(workload, tmp_path, "--since", "2999-01-01")["rows"] == 0
    assert export_count(workload, tmp_path, "--until", "2999-01-01T00:00:00Z")["rows"] == TOTAL
    # An empty export still has every column.
    empty = tmp_path / "empty.csv"
    ok(
        tq(
            "export",
            "-b",
            workload.url,
            "--out",
            str(empty),
            "--since",
            "2999-01-01",
            state_dir=tmp_path,
        )
    )
    assert empty.read_text().strip() == ",".join(EXPORT_COLUMNS)


def test_small_pages_and_chunks_export_the_same_rows(workload: Workload, tmp_path: Path) -> None:
    out = tmp_path / "paged.duckdb"
    ok(
        tq(
            "export",
            "-b",
            workload.url,
            "--out",
            str(out),
            "--page-size",
            "5",
            state_dir=tmp_path,
        )
    )
    query = "SELECT * FROM tasks ORDER BY id"
    expected = run_query(str(workload.exports["duckdb"]), query).rows
    assert run_query(str(out), query).rows == expected


async def test_export_api_stages_many_chunks_and_replaces_the_file(
    workload: Workload, tmp_path: Path
) -> None:
    out = tmp_path / "api.parquet"
    out.write_text("an old file")
    async with AsyncClient(workload.url) as client:
        summary = await export_tasks(client, str(out), page_size=3, chunk_rows=4)
    assert summary.rows == TOTAL
    query = "SELECT state, count(*) FROM tasks GROUP BY ALL ORDER BY ALL"
    assert run_query(str(out), query).rows == sorted(BY_STATE.items())
    assert sorted(os.listdir(tmp_path)) == ["api.parquet"]  # no scratch left behind


def test_export_from_a_dead_broker_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "x.parquet"
    line = one_line_error(
        tq("export", "-b", f"tcp://127.0.0.1:{port}", "--out", str(out), state_dir=tmp_path)
    )
    assert "cannot reach a broker" in line
    assert not out.exists()
    assert not (tmp_path / "tq" / "last_export").exists()


def test_usage_errors_exit_2(workload: Workload, tmp_path: Path) -> None:
    def run(*args: str) -> str:
        return one_line_error(tq("export", "-b", workload.url, *args, state_dir=tmp_path), code=2)

    assert ".parquet, .duckdb or .csv" in run("--out", str(tmp_path / "x.xlsx"))
    assert "neither an ISO-8601 time" in run("--out", str(tmp_path / "x.csv"), "--since", "soon")
    assert "--state must be one of" in run("--out", str(tmp_path / "x.csv"), "-s", "pending")


def test_an_unwritable_destination_is_one_line(workload: Workload, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "x.parquet"
    result = tq("export", "-b", workload.url, "--out", str(missing), state_dir=tmp_path)
    line = one_line_error(result)
    assert "is not a directory" in line


def _dicts(result: Any) -> list[dict[str, Any]]:
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]
