"""``Confirm``: ask before an action, run it, and show the broker's answer, or its refusal, in
the same dialog until the user closes it. Dismisses with True when the action succeeded."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from tq.errors import TqError
from tq.tui.safe import line, text
from tq.tui.theme import tone
from tq.tui.widgets.teardown import widgets_gone

Action = Callable[[], Awaitable[str]]


class Confirm(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "yes", "Yes"),
        Binding("n,escape", "no", "No / close"),
    ]

    def __init__(self, title: str, question: str, action: Action) -> None:
        super().__init__()
        self.title_text = title
        self.question = question
        self.action = action
        self.phase = "asking"  # asking -> working -> done
        self.ok = False
        self.answer = ""

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            # The question names queues and tasks, the answer quotes the broker: both are shown
            # as cleaned Text (a str would be parsed as markup: a queue "[/x]" would crash).
            yield Static(line(self.title_text), classes="dialog-title")
            yield Static(text(self.question), id="question")
            yield Static(id="answer")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="warning")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed, "#yes")
    def action_yes(self) -> None:
        if self.phase == "asking":
            self.phase = "working"
            self.query_one("#answer", Static).update(Text("asking the broker…", style="dim"))
            self.query_one("#yes", Button).disabled = True
            self._run()
        elif self.phase == "done":
            self.dismiss(self.ok)

    @on(Button.Pressed, "#no")
    def action_no(self) -> None:
        if self.phase == "asking":
            self.dismiss(False)
        elif self.phase == "done":
            self.dismiss(self.ok)

    @work(exclusive=True)
    async def _run(self) -> None:
        try:
            answer = await self.action()
        except TqError as exc:
            self.ok = False
            self.answer = f"refused: {exc.code}: {exc.message}"
            style = f"bold {tone(self.app, 'error')}"
            shown = text(f"✖ {self.answer}", style=style)
        else:
            self.ok = True
            self.answer = answer
            shown = text(f"✔ {answer}", style=f"bold {tone(self.app, 'success')}")
        self.phase = "done"
        with widgets_gone:
            self.query_one("#answer", Static).update(shown)
            self.query_one("#yes", Button).display = False
            no = self.query_one("#no", Button)
            no.label = "Close (esc)"
            no.focus()
