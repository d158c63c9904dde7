"""The ready queries of docs/history.md, run as written against the known workload's export, so
the documentation cannot rot. Expected figures come from the workload (tests/history/conftest.py)
or are recomputed in Python from the raw rows."""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from tq.history import QueryResult, run_query

from tests.conftest import ok, subprocess_env
from tests.history.conftest import BY_NAME, SLEEP_MS, TOTAL, TQ, Workload, tq

DOC = Path(__file__).resolve().parents[2] / "docs" / "history.md"


def doc_queries() -> dict[str, list[str]]:
    """Every ```sql block of the doc, by the ### heading above it."""
    queries: dict[str, list[str]] = defaultdict(list)
    heading = ""
    for part in re.split(r"^(### .*)$", DOC.read_text(), flags=re.MULTILINE):
        if part.startswith("### "):
            heading = part[4:].strip()
        else:
            queries[heading] += re.findall(r"```sql\n(.*?)```", part, flags=re.DOTALL)
    return dict(queries)


QUERIES = doc_queries()


def run(workload: Workload, heading: str, fmt: str = "parquet") -> list[dict[str, Any]]:
    [sql] = QUERIES[heading]
    return dicts(run_query(str(workload.exports[fmt]), sql))


def dicts(result: QueryResult) -> list[dict[str, Any]]:
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def all_rows(workload: Workload) -> list[dict[str, Any]]:
    return dicts(run_query(str(workload.exports["parquet"]), "SELECT * FROM tasks"))


def test_the_doc_has_the_four_ready_queries() -> None:
    for heading in (
        "Run time percentiles by task name",
        "Failure rate per hour",
        "Retries per task type",
        "Slowest workers",
    ):
        assert len(QUERIES.get(heading, [])) == 1, heading


@pytest.mark.parametrize("fmt", ["parquet", "duckdb", "csv"])
def test_run_time_percentiles_by_task_name(workload: Workload, fmt: str) -> None:
    rows = run(workload, "Run time percentiles by task name", fmt)
    assert {r["name"]: r["tasks"] for r in rows} == {"sleep": 4, "echo": 15}
    p99s = [r["p99_ms"] for r in rows]
    assert p99s == sorted(p99s, reverse=True)  # the slowest tail first
    for r in rows:
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    [sleep] = [r for r in rows if r["name"] == "sleep"]
    assert sleep["p50_ms"] >= SLEEP_MS
    completed = sorted(
        r["run_ms"]
        for r in all_rows(workload)
        if r["state"] == "completed" and r["name"] == "sleep"
    )
    assert sleep["p99_ms"] <= completed[-1]
    assert sleep["p50_ms"] == (completed[1] + completed[2]) / 2  # 4 values: the middle two


def test_failure_rate_per_hour(workload: Workload) -> None:
    rows = run(workload, "Failure rate per hour")
    expected: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
    for r in all_rows(workload):
        if r["state"] == "cancelled":
            continue
        hour = r["finished_at"].replace(minute=0, second=0, microsecond=0)
        expected[hour][0] += 1
        expected[hour][1] += r["state"] in ("failed", "dead")
    assert [(r["hour"], r["finished"], r["failures"]) for r in rows] == [
        (hour, n, f) for hour, (n, f) in sorted(expected.items())
    ]
    assert sum(r["finished"] for r in rows) == 23
    assert sum(r["failures"] for r in rows) == 4
    for r in rows:
        assert float(r["failure_pct"]) == round(100.0 * r["failures"] / r["finished"], 2)


def test_retries_per_task_type(workload: Workload) -> None:
    rows = run(workload, "Retries per task type")
    assert [(r["name"], r["tasks"], r["retries"], r["retried_tasks"]) for r in rows] == [
        ("fail", BY_NAME["fail"], 2, 1),
        ("echo", BY_NAME["echo"], 0, 0),
        ("sleep", BY_NAME["sleep"], 0, 0),
    ]
    by_name = {r["name"]: r for r in rows}
    assert float(by_name["fail"]["avg_attempts"]) == round((1 + 1 + 3 + 1) / 4, 2)
    assert float(by_name["echo"]["avg_attempts"]) == round(15 / 16, 2)  # one never ran


def test_slowest_workers(workload: Workload) -> None:
    rows = run(workload, "Slowest workers")
    ran = [r for r in all_rows(workload) if r["worker"] is not None and r["run_ms"] is not None]
    assert len(rows) == 1
    [row] = rows
    assert row["worker"] == workload.worker_id
    assert row["tasks"] == len(ran) == 23
    assert row["max_ms"] == max(r["run_ms"] for r in ran)
    assert float(row["avg_ms"]) == round(sum(r["run_ms"] for r in ran) / len(ran), 1)


def test_every_other_query_in_the_doc_runs(workload: Workload) -> None:
    for sqls in QUERIES.values():
        for sql in sqls:
            run_query(str(workload.exports["duckdb"]), sql)  # raises HistoryError if broken


def _every_doc_query() -> list[str]:
    return [sql for sqls in QUERIES.values() for sql in sqls]


def test_the_doc_shows_six_queries() -> None:
    assert len(_every_doc_query()) == 6


@pytest.mark.parametrize("sql", _every_doc_query(), ids=lambda sql: sql.split()[1])
def test_every_query_in_the_doc_runs_through_the_command_as_the_doc_says(
    workload: Workload, tmp_path: Path, sql: str
) -> None:
    """``tq history "$(cat query.sql)"`` and ``tq history - < query.sql``, both with the JSON
    output, give the same rows (a query starting with a `--` comment failed the first way)."""
    query = tmp_path / "query.sql"
    query.write_text(sql)
    export = str(workload.exports["parquet"])
    # "$(cat query.sql)": the file's text without its trailing newlines, as one argument
    as_argument = ok(
        tq(
            "history",
            "--from",
            export,
            "-o",
            "json",
            query.read_text().rstrip("\n"),
            state_dir=workload.state_dir,
        )
    )
    with query.open() as stdin:
        from_stdin = subprocess.run(
            [*TQ, "history", "--from", export, "-o", "json", "-"],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            env=subprocess_env(XDG_STATE_HOME=str(workload.state_dir)),
            check=False,
        )
    assert ok(from_stdin) == as_argument


def test_sql_that_starts_with_a_comment_is_sql_not_an_option(workload: Workload) -> None:
    sql = "-- the finished tasks by state\nSELECT count(*) AS n FROM tasks"
    out = ok(tq("history", "-o", "csv", sql, state_dir=workload.state_dir))
    assert out == f"n\n{TOTAL}\n"
