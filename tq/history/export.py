"""``tq export``: stream finished tasks from a broker into Parquet, DuckDB or CSV.

Pages come over the protocol (``ExportTasks``), so a remote broker or a cluster works the same.
The next page is always requested before the current one is written, so the broker produces
while we write. Each page is encoded as JSON lines (one array per row, by msgspec) into a staging
file; every ``chunk_rows`` rows DuckDB ingests the staging file in a thread (``read_json``,
deriving the export columns in SQL) while the next pages arrive. Memory stays flat: a page or two
in Python, the staged table in DuckDB's buffer pool, which spills to its file.

Why not the Appender: it converts value by value in Python, ~3.8 µs a row here (1M rows: 3.8 s,
holding the GIL), against ~0.8 µs to encode a row with msgspec plus DuckDB's parallel JSON reader.
Measured end to end on 1M rows: 6.2 to 6.9 s with the Appender, 5.4 s this way.

The result is written next to the output under a temporary name and renamed into place, so a
failed export never leaves a half-written file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Final

import duckdb
import msgspec

from tq.client import AsyncClient
from tq.history.schema import (
    FINISHED_STATES,
    TABLE,
    FileFormat,
    HistoryError,
    create_table_sql,
    format_of,
    ingest_sql,
    sql_literal,
)
from tq.protocol.messages import HistoryRow

DEFAULT_PAGE: Final = 10_000
"""Rows per ``ExportTasks`` request: ~1 MB on the wire, ~30 ms of the broker's loop."""
DEFAULT_CHUNK: Final = 100_000
"""Rows staged per DuckDB ingest (~11 MB of JSON lines)."""
MEMORY_LIMIT: Final = "512MB"


@dataclass(frozen=True, slots=True)
class ExportSummary:
    path: str
    format: FileFormat
    rows: int
    seconds: float


async def export_tasks(
    client: AsyncClient,
    out: str,
    *,
    states: Sequence[str] | None = None,
    queue: str | None = None,
    since_ms: int = 0,
    until_ms: int = 0,
    page_size: int = DEFAULT_PAGE,
    chunk_rows: int = DEFAULT_CHUNK,
) -> ExportSummary:
    """Write every finished task matching the filters to ``out`` (format by extension) and
    return what was written. ``states`` defaults to all finished states; the time window
    [since_ms, until_ms) applies to ``finished_at`` (0 = unbounded)."""
    started = time.perf_counter()
    fmt = format_of(out)
    chosen = list(states) if states else [s.value for s in FINISHED_STATES]
    path, work = _workspace(out)
    stage = _Stage(work)
    try:
        stage.open()
        pages = _pages(client, chosen, queue, since_ms, until_ms, page_size)
        async with contextlib.aclosing(pages):
            async for rows in pages:
                stage.write(rows)
                if stage.pending_rows >= chunk_rows:
                    await stage.ingest()
        await stage.ingest()
        await stage.drain()
        await asyncio.to_thread(stage.save, path, fmt)
        return ExportSummary(out, fmt, stage.rows, time.perf_counter() - started)
    finally:
        await stage.drain(quiet=True)
        stage.close()
        shutil.rmtree(work, ignore_errors=True)


def _workspace(out: str) -> tuple[str, str]:
    """The output's absolute path and a fresh scratch directory beside it (same filesystem, so
    the finished file is renamed into place)."""
    path = os.path.abspath(out)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise HistoryError(f"cannot write {out}: {folder} is not a directory")
    try:
        return path, tempfile.mkdtemp(prefix=".tq-export-", dir=folder)
    except OSError as exc:
        raise HistoryError(f"cannot write to {folder}: {exc.strerror}") from None


async def _pages(
    client: AsyncClient,
    states: list[str],
    queue: str | None,
    since_ms: int,
    until_ms: int,
    page_size: int,
) -> AsyncGenerator[list[HistoryRow], None]:
    """Pages in order, with the next one always requested before the current one is yielded."""

    def fetch(after: str | None) -> asyncio.Task[tuple[list[HistoryRow], str | None]]:
        return asyncio.ensure_future(
            client.export_page(
                states=states,
                queue=queue,
                since_ms=since_ms,
                until_ms=until_ms,
                limit=page_size,
                after=after,
            )
        )

    ahead = fetch(None)
    try:
        while True:
            rows, after = await ahead
            if after is not None:
                ahead = fetch(after)
            if rows:
                yield rows
            if after is None:
                return
    finally:
        if not ahead.done():
            ahead.cancel()
            with contextlib.suppress(BaseException):
                await ahead


class _Stage:
    """JSON-lines chunks on disk, ingested one at a time into a DuckDB file in a thread."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.db_path = os.path.join(work, "stage.duckdb")
        self.rows = 0
        self.pending_rows = 0
        self._con: duckdb.DuckDBPyConnection | None = None
        self._file: BinaryIO | None = None
        self._file_path = ""
        self._chunks = 0
        self._ingesting: asyncio.Future[None] | None = None
        self._encode = msgspec.json.Encoder().encode_lines

    def open(self) -> None:
        try:
            con = duckdb.connect(self.db_path)
            con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
            con.execute(create_table_sql())
        except duckdb.Error as exc:
            raise HistoryError(f"cannot create the export: {_one_line(exc)}") from None
        self._con = con

    def write(self, rows: list[HistoryRow]) -> None:
        if self._file is None:
            self._file_path = os.path.join(self.work, f"chunk-{self._chunks}.jsonl")
            self._chunks += 1
            self._file = open(self._file_path, "wb")  # noqa: SIM115 - closed in ingest()
        self._file.write(self._encode(rows))
        self.pending_rows += len(rows)
        self.rows += len(rows)

    async def ingest(self) -> None:
        """Hand the current chunk to DuckDB (after the previous one is in)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self.pending_rows = 0
        await self.drain()
        self._ingesting = asyncio.ensure_future(asyncio.to_thread(self._load, self._file_path))

    async def drain(self, quiet: bool = False) -> None:
        """Wait for the ingest in progress, if any."""
        job, self._ingesting = self._ingesting, None
        if job is None:
            return
        if quiet:
            with contextlib.suppress(Exception):
                await job
        else:
            await job

    def _load(self, chunk: str) -> None:
        con = self._connection()
        try:
            con.execute(ingest_sql(chunk))
        except duckdb.Error as exc:
            raise HistoryError(f"cannot stage the export: {_one_line(exc)}") from None
        finally:
            os.unlink(chunk)

    def save(self, path: str, fmt: FileFormat) -> None:
        """Write the staged table to ``path`` (replacing it) in ``fmt``."""
        con = self._connection()
        tmp = os.path.join(self.work, "out" + os.path.splitext(path)[1])
        try:
            if fmt is FileFormat.duckdb:
                con.execute("CHECKPOINT")
                self.close()
                tmp = self.db_path
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + ".wal")  # an old database's log would replay onto ours
            elif fmt is FileFormat.parquet:
                con.execute(f"COPY {TABLE} TO {sql_literal(tmp)} (FORMAT parquet)")
            else:
                con.execute(f"COPY {TABLE} TO {sql_literal(tmp)} (FORMAT csv, HEADER)")
            # Replacing a file keeps its mode: an export someone made 0600 (it holds payloads
            # and error messages) must not become world-readable when refreshed.
            with contextlib.suppress(FileNotFoundError):
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            os.replace(tmp, path)
        except duckdb.Error as exc:
            raise HistoryError(f"cannot write {path}: {_one_line(exc)}") from None
        except OSError as exc:
            raise HistoryError(f"cannot write {path}: {exc.strerror}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._con is not None:
            self._con.close()
            self._con = None

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise HistoryError("the export is closed")
        return self._con


def _one_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
