"""``Help`` (``?``): every key of ``tq top``, by where it works."""

from __future__ import annotations

from typing import Final

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS: Final[list[tuple[str, list[tuple[str, str]]]]] = [
    (
        "Everywhere",
        [
            ("1 … 5", "Overview, Workers, Tasks, Dead letters, Cluster"),
            ("tab / shift+tab", "next / previous control"),
            ("↑ ↓ pgup pgdn", "move in a list"),
            ("L", "switch light / dark theme"),
            ("?", "this help"),
            ("q, ctrl+q", "quit"),
        ],
    ),
    (
        "Overview",
        [
            ("enter", "show the tasks of the queue under the cursor"),
            ("p", "pause or resume that queue (asks first)"),
        ],
    ),
    (
        "Tasks",
        [
            ("enter", "open the task under the cursor"),
            ("s", "next state filter (pending, running, completed, …)"),
            ("/", "text search (id, name, queue, worker, error, progress)"),
            ("c", "cancel the task under the cursor (asks first)"),
            ("escape", "back from a filter box to the list"),
        ],
    ),
    (
        "Dead letters",
        [
            ("enter", "inspect the task under the cursor"),
            ("space", "mark / unmark it"),
            ("a", "mark all / none"),
            ("r", "retry the marked tasks, or the one under the cursor (asks first)"),
            ("x", "purge them for good (asks first)"),
        ],
    ),
    (
        "Task detail",
        [
            ("c", "cancel this task (asks first)"),
            ("r", "retry it, if it is dead (asks first)"),
            ("escape, q", "close"),
        ],
    ),
    (
        "Confirmation",
        [
            ("y", "yes: send the action, then show the broker's answer"),
            ("n, escape", "no; after the answer: close"),
        ],
    ),
]


class Help(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for i, (section, keys) in enumerate(KEYS):
            if i:
                table.add_row("", "")
            table.add_row(f"[u]{section}[/u]", "")
            for key, what in keys:
                table.add_row(key, what)
        with VerticalScroll(id="help"):
            yield Static("tq top — keys", classes="dialog-title")
            yield Static(table)
            yield Static("esc closes", classes="dim")

    def action_close(self) -> None:
        self.dismiss(None)
