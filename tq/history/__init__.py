"""Task history: export finished tasks over the protocol, query them with DuckDB.

``export_tasks(client, "tasks.parquet")`` streams every finished task from the broker into a
Parquet, DuckDB or CSV file (by extension); ``run_query("tasks.parquet", sql)`` runs DuckDB SQL
over it as the table ``tasks``. The columns are in ``COLUMNS`` and docs/history.md.
"""

from __future__ import annotations

from tq.history.export import ExportSummary, export_tasks
from tq.history.query import HistoryQuery, QueryResult, run_query
from tq.history.schema import COLUMNS, FINISHED_STATES, FileFormat, HistoryError, format_of
from tq.history.window import parse_when

__all__ = [
    "COLUMNS",
    "FINISHED_STATES",
    "ExportSummary",
    "FileFormat",
    "HistoryError",
    "HistoryQuery",
    "QueryResult",
    "export_tasks",
    "format_of",
    "parse_when",
    "run_query",
]
