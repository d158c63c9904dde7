"""What an export holds: its columns, its file formats and the one error this package raises."""

from __future__ import annotations

import enum
import os
from typing import Final

from tq.errors import TqError
from tq.model import TaskState

FINISHED_STATES: Final = (
    TaskState.COMPLETED,
    TaskState.FAILED,
    TaskState.DEAD,
    TaskState.CANCELLED,
)
"""The states an export covers, in the order the broker streams them."""

TABLE: Final = "tasks"
"""The table (``.duckdb``) or view (Parquet, CSV) that queries read."""


class HistoryError(TqError):
    """An export or a query could not be done: a bad file, a SQL error, an unwritable path.
    Local to the command line: it never crosses the wire."""

    code = "HISTORY"


class FileFormat(enum.StrEnum):
    parquet = "parquet"
    duckdb = "duckdb"
    csv = "csv"


_EXTENSIONS: Final = {
    ".parquet": FileFormat.parquet,
    ".duckdb": FileFormat.duckdb,
    ".db": FileFormat.duckdb,
    ".csv": FileFormat.csv,
}


def format_of(path: str) -> FileFormat:
    """The file format a path's extension names (``.parquet``, ``.duckdb`` or ``.db``, ``.csv``)."""
    ext = os.path.splitext(path)[1].lower()
    try:
        return _EXTENSIONS[ext]
    except KeyError:
        raise HistoryError(
            f"cannot tell the format of {path!r}: use a .parquet, .duckdb or .csv file"
        ) from None


# name, DuckDB type, meaning. The order is the column order of every export.
COLUMNS: Final[tuple[tuple[str, str, str], ...]] = (
    ("id", "VARCHAR", "task id"),
    ("name", "VARCHAR", "task name (the handler)"),
    ("queue", "VARCHAR", "queue"),
    ("priority", "VARCHAR", "high, normal or low"),
    ("state", "VARCHAR", "completed, failed (retry scheduled), dead or cancelled"),
    ("attempts", "INTEGER", "attempts started (0 for a task cancelled before it ran)"),
    ("worker", "VARCHAR", "id of the worker that ran the last attempt (NULL if none)"),
    ("submitted_at", "TIMESTAMP", "when the broker accepted the task (UTC)"),
    ("started_at", "TIMESTAMP", "when the last attempt was leased (UTC; NULL if never)"),
    ("finished_at", "TIMESTAMP", "when it reached this state (UTC)"),
    ("wait_ms", "BIGINT", "started_at - submitted_at in ms (NULL if it never started)"),
    ("run_ms", "BIGINT", "finished_at - started_at in ms (NULL if it never started)"),
    ("error_type", "VARCHAR", "the last error's type (NULL if none)"),
    ("error_message", "VARCHAR", "the last error's message (NULL if none)"),
    ("payload_bytes", "BIGINT", "size of the payload"),
    ("result_bytes", "BIGINT", "size of the result (0 if none)"),
)

COLUMN_NAMES: Final = tuple(c[0] for c in COLUMNS)
COLUMN_TYPES: Final = {c[0]: c[1] for c in COLUMNS}


def _ms(expr: str) -> str:
    return f"CASE WHEN {expr} > 0 THEN epoch_ms({expr}) END"


def _span(late: str, early: str) -> str:
    return f"CASE WHEN {early} > 0 AND {late} > 0 THEN {late} - {early} END"


# HistoryRow (tq.protocol.messages), field by field, as staged: one JSON array per row.
_RAW: Final = (
    ("id", "VARCHAR"),
    ("name", "VARCHAR"),
    ("queue", "VARCHAR"),
    ("priority", "TINYINT"),
    ("state", "VARCHAR"),
    ("attempts", "INTEGER"),
    ("worker", "VARCHAR"),
    ("submitted_ms", "BIGINT"),
    ("started_ms", "BIGINT"),
    ("finished_ms", "BIGINT"),
    ("error_type", "VARCHAR"),
    ("error_message", "VARCHAR"),
    ("payload_bytes", "BIGINT"),
    ("result_bytes", "BIGINT"),
)

_DERIVED: Final = {
    "id": "id",
    "name": "name",
    "queue": "queue",
    "priority": "CASE priority WHEN 0 THEN 'high' WHEN 1 THEN 'normal' ELSE 'low' END",
    "state": "state",
    "attempts": "attempts",
    "worker": "NULLIF(worker, '')",
    "submitted_at": _ms("submitted_ms"),
    "started_at": _ms("started_ms"),
    "finished_at": _ms("finished_ms"),
    "wait_ms": _span("started_ms", "submitted_ms"),
    "run_ms": _span("finished_ms", "started_ms"),
    "error_type": "NULLIF(error_type, '')",
    "error_message": "NULLIF(error_message, '')",
    "payload_bytes": "payload_bytes",
    "result_bytes": "result_bytes",
}


def create_table_sql(table: str = TABLE) -> str:
    cols = ", ".join(f"{name} {kind}" for name, kind, _ in COLUMNS)
    return f"CREATE TABLE {table} ({cols})"


def ingest_sql(json_path: str, table: str = TABLE) -> str:
    """Append a file of staged rows (one JSON array of HistoryRow fields per line) to ``table``,
    deriving the export columns on the way in (vectorised, in DuckDB)."""
    fields = []
    for i, (name, kind) in enumerate(_RAW, start=1):
        if kind == "VARCHAR":
            fields.append(f"j[{i}] ->> '$' AS {name}")
        else:
            fields.append(f"CAST(j[{i}] AS {kind}) AS {name}")
    derived = ", ".join(_DERIVED[name] for name in COLUMN_NAMES)
    # Only our own names and a path quoted by sql_literal go into the statement.
    return (
        f"INSERT INTO {table} SELECT {derived} FROM (SELECT {', '.join(fields)} FROM "  # noqa: S608
        f"(SELECT json AS j FROM read_json({sql_literal(json_path)}, "
        "format = 'newline_delimited', records = false, columns = {'json': 'JSON[]'})))"
    )


def sql_literal(text: str) -> str:
    """A SQL string literal (for file paths in statements that take no parameters)."""
    return "'" + text.replace("'", "''") + "'"
