"""``tq history``: DuckDB SQL over an export, whose rows are the table (or view) ``tasks``."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import duckdb

from tq.history.schema import (
    COLUMN_TYPES,
    TABLE,
    FileFormat,
    HistoryError,
    format_of,
    sql_literal,
)


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


class HistoryQuery:
    """An export opened for queries (``with HistoryQuery(path) as q: q.run(sql)``).

    A ``.duckdb`` file is opened read-only and must hold a table ``tasks``; a Parquet or CSV file
    becomes a view ``tasks`` in an in-memory database (nothing is loaded until a query runs)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._con: duckdb.DuckDBPyConnection | None = None

    def __enter__(self) -> HistoryQuery:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        fmt = format_of(self.path)
        if not os.path.isfile(self.path):
            raise HistoryError(f"no export at {self.path}")
        try:
            if fmt is FileFormat.duckdb:
                self._con = duckdb.connect(self.path, read_only=True)
                return
            con = duckdb.connect()
            self._con = con
            source = sql_literal(os.path.abspath(self.path))
            if fmt is FileFormat.parquet:
                reader = f"read_parquet({source})"
            else:
                # The dialect is the one our export writes (DuckDB's COPY defaults), given
                # rather than sniffed: DuckDB sniffs from the first 20,480 rows only, and an
                # export whose first quoted field comes later was read with no quote character
                # at all ("CSV Error on Line: ...").
                reader = (
                    f"read_csv({source}, header = true, delim = ',', quote = '\"', "
                    f"escape = '\"'{_csv_types(self.path)})"
                )
            # The path is quoted by sql_literal; the rest is ours.
            con.execute(f"CREATE VIEW {TABLE} AS SELECT * FROM {reader}")  # noqa: S608
        except duckdb.Error as exc:
            self.close()
            raise HistoryError(f"cannot open {self.path}: {one_line(exc)}") from None

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def execute(self, sql: str) -> tuple[list[str], Iterator[list[tuple[Any, ...]]]]:
        """Run ``sql``; return its column names and an iterator over batches of rows (so a big
        result is never held whole). Statements that return no rows give no columns."""
        con = self._con
        if con is None:
            raise HistoryError("the export is not open")
        try:
            con.execute(sql)
        except duckdb.Error as exc:
            raise HistoryError(one_line(exc)) from None
        description = con.description
        if not description:
            return [], iter(())
        columns = [str(d[0]) for d in description]

        def batches() -> Iterator[list[tuple[Any, ...]]]:
            while True:
                try:
                    batch = con.fetchmany(10_000)
                except duckdb.Error as exc:
                    raise HistoryError(one_line(exc)) from None
                if not batch:
                    return
                yield batch

        return columns, batches()

    def run(self, sql: str) -> QueryResult:
        """Run ``sql`` and return every row."""
        columns, batches = self.execute(sql)
        return QueryResult(columns, [row for batch in batches for row in batch])


def run_query(path: str, sql: str) -> QueryResult:
    """Open the export at ``path``, run ``sql`` over ``tasks``, return its columns and rows."""
    with HistoryQuery(path) as q:
        return q.run(sql)


def one_line(exc: BaseException) -> str:
    """A DuckDB error as one line: its first line, plus the candidates it suggests."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    keep = [lines[0]] + [ln for ln in lines[1:] if ln.startswith(("Candidate", "Did you mean"))]
    return " ".join(keep)


def _csv_types(path: str) -> str:
    """Our column types for the columns of this CSV's header that are ours (an export read
    back keeps its types even when a column is all NULL); other columns are sniffed."""
    try:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return ""
    known = {name: COLUMN_TYPES[name] for name in header if name in COLUMN_TYPES}
    if not known:
        return ""
    pairs = ", ".join(f"{sql_literal(k)}: {sql_literal(v)}" for k, v in known.items())
    return f", types = {{{pairs}}}"
