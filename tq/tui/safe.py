"""Broker-supplied strings made safe to show: every name, id, host, error and payload on screen
comes from whoever can submit a task or connect a worker.

Two dangers. Control characters written raw reach the operator's terminal: an ESC sequence in a
handler's error could retitle, recolour or clear it. And a plain ``str`` handed to a Textual
widget (``Static``, a ``DataTable`` cell, a Rich table cell, ``notify``) is parsed as markup: a
host named ``[/x]`` crashes the app with ``MarkupError``. So broker text goes on screen only as
a Rich :class:`~rich.text.Text` (never parsed) of :func:`clean` ed characters.

``clean`` is ``tq.text.clean``, which the CLI uses too.
"""

from __future__ import annotations

from rich.text import Text

from tq.text import clean, has_controls


def one_line(text: str) -> str:
    """:func:`clean`, and newlines as spaces: for a table cell, an event line, the status bar,
    where a newline would hide the rest of the value or forge a line of its own."""
    return clean(text).replace("\n", " ")


def is_one_line(text: str) -> bool:
    """Whether :func:`one_line` would leave ``text`` as it is."""
    return "\n" not in text and not has_controls(text)


def text(value: object, style: str = "") -> Text:
    """``value`` as Rich text that is shown as it is: cleaned, never parsed as markup."""
    return Text(clean(str(value)), style=style)


def line(value: object, style: str = "") -> Text:
    """Like :func:`text`, on one line."""
    return Text(one_line(str(value)), style=style)
