"""Colours from the running Textual theme, for Rich text in tables: the same words read on the
dark and the light themes (``L`` switches), because the theme picks the shade."""

from __future__ import annotations

from rich.text import Text
from textual.app import App

from tq.tui.safe import one_line

TONES = {
    "error": "text-error",
    "warning": "text-warning",
    "success": "text-success",
    "accent": "text-accent",
    "primary": "text-primary",
}


def tone(app: App[object], name: str) -> str:
    """A Rich style for ``name`` (error, warning, success, accent, primary, muted)."""
    if name == "muted":
        return "dim"
    value = app.theme_variables.get(TONES.get(name, name), "")
    return value if value.startswith("#") else ""


def toned(app: App[object], text: str, name: str, bold: bool = False) -> Text:
    """``text`` on one line in the colour ``name``: often broker data (an error, a progress
    message), so it is cleaned (:mod:`tq.tui.safe`), and being Text it is never parsed as markup."""
    text = one_line(text)
    style = tone(app, name)
    if bold:
        style = f"bold {style}".strip()
    return Text(text, style=style)
