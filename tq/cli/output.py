"""Printing results as a rich table, JSON or YAML (``-o``), and errors as one readable line.

Everything a command prints goes through the consoles of the current context: the process's
stdout and stderr by default, an SSH session's channel while the admin shell (tq/cli/shell.py)
runs a command for it (see :func:`redirect`).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tq.text import clean

console = Console()
err_console = Console(stderr=True)


@dataclass(frozen=True, slots=True)
class Consoles:
    """Where a command's output (``out``) and its errors (``err``) go."""

    out: Console
    err: Console


_DEFAULT = Consoles(console, err_console)
_consoles: ContextVar[Consoles | None] = ContextVar("tq_cli_consoles", default=None)


@contextmanager
def redirect(out: Console, err: Console) -> Iterator[None]:
    """Print through ``out`` and ``err`` in this context (a thread's copy of it, for the shell)."""
    token = _consoles.set(Consoles(out, err))
    try:
        yield
    finally:
        _consoles.reset(token)


def stdout() -> Console:
    """The console results go to."""
    return (_consoles.get() or _DEFAULT).out


def stderr() -> Console:
    """The console errors and progress go to."""
    return (_consoles.get() or _DEFAULT).err


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOpt = typer.Option(Format.table, "--output", "-o", help="table, json or yaml")


def error_line(message: str) -> None:
    """``tq: message`` on stderr: every error tq reports is one such line."""
    # The message is text, not markup: an id like "[/foo]" must not be parsed as a rich tag.
    stderr().print(f"[bold red]tq:[/] {escape(clean(message))}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    error_line(message)
    raise typer.Exit(code)


def say(text: str) -> None:
    """One line of plain text on the result console, as ``print`` would write it."""
    stdout().file.write(clean(text) + "\n")


def emit_data(data: Any, fmt: Format) -> None:
    out = stdout().file
    if fmt is Format.json:
        out.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        import yaml

        out.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def emit_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left", header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        # Text, not str: a cell is never parsed as markup ("[link=...]" in an error message).
        table.add_row(*(Text(clean("" if v is None else str(v))) for v in row))
    stdout().print(table)


def when(ms: int) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"
