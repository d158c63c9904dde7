"""``tq export`` and ``tq history``: finished tasks to a file, and DuckDB SQL over that file.

``tq export`` remembers the path it wrote in ``$XDG_STATE_HOME/tq/last_export`` (by default
``~/.local/state/tq/last_export``) so that ``tq history "SQL"`` reads the latest export unless
``--from`` names another file. See docs/history.md.
"""

from __future__ import annotations

import csv
import enum
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from datetime import time as clock
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from tq.cli.output import Format, OutputOpt, emit_data, emit_table, err_console, fail

if TYPE_CHECKING:
    from tq.client import AsyncClient
    from tq.history import ExportSummary, HistoryError

FINISHED = ("completed", "failed", "dead", "cancelled")


class QueryFormat(enum.StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("export")(export)
    # Unknown options reach history() as arguments: SQL that starts with a `--` comment (as a
    # file of SQL often does: `tq history "$(cat query.sql)"`) is SQL, not an option; history()
    # itself still refuses a mistyped option (see _unknown_option).
    app.command(
        "history", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
    )(history)


def last_export_file() -> Path:
    """Where ``tq export`` records the path of the file it wrote last."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "tq" / "last_export"


def export(
    out: str = typer.Option(
        ..., "--out", help="the file to write: .parquet, .duckdb or .csv (replaced if it exists)"
    ),
    since: str | None = typer.Option(
        None, "--since", help="finished at or after: ISO-8601 (2024-05-01T12:00) or an age (2h, 7d)"
    ),
    until: str | None = typer.Option(
        None, "--until", help="finished before: ISO-8601 or an age (30m)"
    ),
    queue: str | None = typer.Option(None, "--queue", "-q", help="only this queue"),
    state: list[str] | None = typer.Option(
        None,
        "--state",
        "-s",
        help="completed, failed, dead or cancelled (repeat for several; default: all four)",
    ),
    broker: str | None = typer.Option(
        None, "--broker", "-b", help="tcp://host:port[,...] (env TQ_BROKER)"
    ),
    page_size: int = typer.Option(10_000, "--page-size", min=1, max=50_000, hidden=True),
    quiet: bool = typer.Option(False, "--quiet", help="print nothing when it succeeds"),
    output: Format = OutputOpt,
) -> None:
    """Write finished tasks to Parquet, DuckDB or CSV (by the file's extension), streamed from
    the broker page by page."""
    from tq.cli.main import _run_client
    from tq.history import HistoryError, export_tasks, format_of, parse_when

    now_ms = int(time.time() * 1000)
    try:
        format_of(out)
        since_ms = parse_when(since, now_ms) if since else 0
        until_ms = parse_when(until, now_ms) if until else 0
    except HistoryError as exc:
        fail(exc.message, code=2)  # (fail prints its message as text: no markup escaping)
    for s in state or ():
        if s not in FINISHED:
            fail(f"--state must be one of {', '.join(FINISHED)}, not {s!r}", code=2)

    async def go(client: AsyncClient) -> ExportSummary | HistoryError:
        try:
            return await export_tasks(
                client,
                out,
                states=state or None,
                queue=queue,
                since_ms=since_ms,
                until_ms=until_ms,
                page_size=page_size,
            )
        except HistoryError as exc:
            return exc

    result = _run_client(go, broker)
    if isinstance(result, HistoryError):
        fail(result.message)
    _remember(os.path.abspath(result.path))
    if quiet:
        return
    summary = {
        "path": result.path,
        "format": str(result.format),
        "rows": result.rows,
        "seconds": round(result.seconds, 3),
    }
    if output is Format.table:
        sys.stdout.write(
            f"exported {result.rows:,} tasks to {result.path} in {result.seconds:.2f} s\n"
        )
    else:
        emit_data(summary, output)


def _remember(path: str) -> None:
    state_file = last_export_file()
    try:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_name(state_file.name + ".tmp")
        tmp.write_text(path + "\n")
        tmp.replace(state_file)
    except OSError as exc:
        err_console.print(
            f"[yellow]tq: could not record the latest export in {escape(str(state_file))}: "
            f"{escape(exc.strerror or str(exc))}[/]",
            highlight=False,
        )


def _latest_export() -> str:
    try:
        text = last_export_file().read_text().strip()
    except OSError:
        text = ""
    if not text:
        fail("no export yet: run `tq export --out FILE` first, or pass --from FILE")
    return text


def history(
    ctx: typer.Context,
    sql: str = typer.Argument(..., help="DuckDB SQL over the table `tasks` ('-' reads stdin)"),
    source: str | None = typer.Option(
        None, "--from", "-f", help="an export file (default: the latest `tq export`)"
    ),
    output: QueryFormat = typer.Option(
        QueryFormat.table, "--output", "-o", help="table, json or csv"
    ),
    max_rows: int = typer.Option(
        1000, "--max-rows", min=1, help="rows shown as a table (json and csv print every row)"
    ),
) -> None:
    """Run DuckDB SQL over an export: its rows are the table `tasks` (docs/history.md has
    ready queries)."""
    from tq.history import HistoryError, HistoryQuery

    for arg in (sql, *ctx.args):
        if _unknown_option(arg):
            fail(f"no such option: {arg} (see tq history --help)", code=2)
    if ctx.args:
        fail(f"one SQL argument expected, got also: {' '.join(ctx.args)}", code=2)
    if sql == "-":
        sql = sys.stdin.read()
    path = source or _latest_export()
    try:
        with HistoryQuery(path) as q:
            columns, batches = q.execute(sql)
            if output is QueryFormat.json:
                _write_json(columns, batches)
            elif output is QueryFormat.csv:
                _write_csv(columns, batches)
            else:
                _write_table(columns, batches, max_rows)
    except HistoryError as exc:
        fail(exc.message)


def _unknown_option(arg: str) -> bool:
    """``arg`` looks like a mistyped option (``--form``, ``-x``) rather than SQL: SQL that starts
    with a dash is a ``--`` comment, which runs to the end of its line, so holds whitespace."""
    return arg.startswith("-") and arg != "-" and not any(c.isspace() for c in arg)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None, also inside lists and structs: JSON has no
    such numbers, and json.dumps would write the bare words NaN and Infinity, which no JSON
    parser accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    """A value json can write: times as ISO-8601, decimals as numbers, bytes as hex."""
    if isinstance(value, datetime | date | clock):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def _write_json(columns: list[str], batches: Iterator[list[tuple[Any, ...]]]) -> None:
    out = sys.stdout
    first = True
    out.write("[")
    for batch in batches:
        for row in batch:
            out.write("\n  " if first else ",\n  ")
            record = {c: _finite(v) for c, v in zip(columns, row, strict=True)}
            out.write(json.dumps(record, default=_plain, allow_nan=False))
            first = False
    out.write("\n]\n" if not first else "]\n")


def _write_csv(columns: list[str], batches: Iterator[list[tuple[Any, ...]]]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    for batch in batches:
        writer.writerows(batch)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return value


def _write_table(
    columns: list[str], batches: Iterator[list[tuple[Any, ...]]], max_rows: int
) -> None:
    rows: list[list[Any]] = []
    more = False
    for batch in batches:
        for row in batch:
            if len(rows) == max_rows:
                more = True
                break
            rows.append([_cell(v) for v in row])
        if more:
            break
    if not columns:
        err_console.print("[dim]ok (no rows returned)[/]")
        return
    shown = f"first {len(rows):,} rows" if more else f"{len(rows):,} row{'s' * (len(rows) != 1)}"
    emit_table(shown, columns, rows)
    if more:
        err_console.print(
            f"[dim]only the first {max_rows:,} rows are shown: raise --max-rows or use -o csv[/]"
        )
