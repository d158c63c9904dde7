"""``tq history "SQL"`` over the known workload's exports: table, JSON and CSV output, the latest
export by default, and errors as one readable line."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from tq.history import HistoryQuery

from tests.conftest import ok, one_line_error, subprocess_env
from tests.history.conftest import BY_STATE, TOTAL, TQ, Workload, tq

BY_STATE_SQL = "SELECT state, count(*) AS n FROM tasks GROUP BY state ORDER BY state"


def history(workload: Workload, *args: str, state_dir: Path | None = None) -> str:
    return ok(tq("history", *args, state_dir=state_dir or workload.state_dir))


def test_json_output_is_an_array_of_objects(workload: Workload) -> None:
    for fmt, path in workload.exports.items():
        out = history(workload, "-o", "json", "--from", str(path), BY_STATE_SQL)
        assert json.loads(out) == [{"state": s, "n": n} for s, n in sorted(BY_STATE.items())], fmt


def test_json_times_are_iso_8601(workload: Workload) -> None:
    sql = "SELECT min(finished_at) AS first, max(run_ms) AS longest FROM tasks"
    [row] = json.loads(history(workload, "-o", "json", sql))
    assert row["first"][4] == "-"
    assert "T" in row["first"]
    assert isinstance(row["longest"], int)


def test_the_latest_export_is_the_default(workload: Workload) -> None:
    out = history(workload, "-o", "csv", "SELECT count(*) AS n FROM tasks")
    assert out == f"n\n{TOTAL}\n"


def test_csv_output_has_a_header_and_every_row(workload: Workload) -> None:
    out = history(workload, "-o", "csv", "SELECT id, error_message FROM tasks ORDER BY id")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["id", "error_message"]
    assert len(rows) == TOTAL + 1
    assert sum(1 for r in rows[1:] if r[1]) == 4


def test_table_output_shows_the_rows(workload: Workload) -> None:
    out = history(workload, BY_STATE_SQL)
    assert "4 rows" in out
    for state, n in BY_STATE.items():
        assert state in out
        assert str(n) in out


def test_table_output_stops_at_max_rows(workload: Workload) -> None:
    result = tq("history", "--max-rows", "3", "SELECT id FROM tasks", state_dir=workload.state_dir)
    assert "first 3 rows" in ok(result)
    assert "raise --max-rows" in result.stderr


def test_a_sql_error_is_one_line_and_exit_1(workload: Workload) -> None:
    line = one_line_error(tq("history", "SELEC 1", state_dir=workload.state_dir))
    assert "syntax error" in line
    line = one_line_error(tq("history", "SELECT nope FROM tasks", state_dir=workload.state_dir))
    assert "nope" in line


def test_without_any_export_history_says_so(tmp_path: Path) -> None:
    line = one_line_error(tq("history", "SELECT 1", state_dir=tmp_path))
    assert "no export yet" in line
    line = one_line_error(
        tq("history", "--from", str(tmp_path / "gone.parquet"), "SELECT 1", state_dir=tmp_path)
    )
    assert "no export at" in line


def test_a_duckdb_export_is_opened_read_only(workload: Workload, tmp_path: Path) -> None:
    copy = tmp_path / "copy.duckdb"
    shutil.copy(workload.exports["duckdb"], copy)
    line = one_line_error(
        tq("history", "--from", str(copy), "DELETE FROM tasks", state_dir=tmp_path)
    )
    assert "read-only" in line.lower()
    with HistoryQuery(str(copy)) as q:
        assert q.run("SELECT count(*) FROM tasks").rows == [(TOTAL,)]


def test_several_statements_print_the_last_ones_rows(workload: Workload) -> None:
    sql = (
        "CREATE TEMP TABLE slow AS SELECT * FROM tasks WHERE name = 'sleep'; "
        "SELECT count(*) AS n FROM slow"
    )
    path = str(workload.exports["parquet"])
    assert json.loads(history(workload, "-o", "json", "--from", path, sql)) == [{"n": 4}]


def test_sql_can_come_from_stdin(workload: Workload) -> None:
    result = subprocess.run(
        [*TQ, "history", "-o", "csv", "-"],
        input="SELECT count(*) AS n FROM tasks WHERE state = 'dead'",
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(XDG_STATE_HOME=str(workload.state_dir)),
        check=False,
    )
    assert ok(result) == f"n\n{BY_STATE['dead']}\n"


def test_a_mistyped_option_or_a_second_argument_is_a_usage_error(workload: Workload) -> None:
    state_dir = workload.state_dir
    line = one_line_error(tq("history", "--form", "x.csv", "SELECT 1", state_dir=state_dir), 2)
    assert "no such option: --form" in line
    line = one_line_error(tq("history", "SELECT 1", "-x", state_dir=state_dir), 2)
    assert "no such option: -x" in line
    line = one_line_error(tq("history", "SELECT 1", "SELECT 2", state_dir=state_dir), 2)
    assert "SELECT 2" in line


def test_json_output_writes_nan_and_infinity_as_null(workload: Workload) -> None:
    sql = (
        "SELECT 0.0 / 0.0 AS ratio, 1.0 / 0.0 AS inf, -1.0 / 0.0 AS neg, 1.5 AS fine, "
        "[0.0 / 0.0, 2.5] AS list, {'x': 1.0 / 0.0} AS struct"
    )
    out = history(workload, "-o", "json", sql)
    # strict parsing: Python's json.loads would accept the bare words NaN and Infinity
    rows = json.loads(out, parse_constant=lambda word: pytest.fail(f"not JSON: {word}"))
    assert rows == [
        {"ratio": None, "inf": None, "neg": None, "fine": 1.5, "list": [None, 2.5],
         "struct": {"x": None}}
    ]  # fmt: skip


def test_an_error_naming_brackets_shows_them_as_they_are(workload: Workload) -> None:
    line = one_line_error(tq("history", 'SELECT 1 FROM "[x]"', state_dir=workload.state_dir))
    assert "[x]" in line
    assert "\\[" not in line  # escaped twice, the message showed a backslash
