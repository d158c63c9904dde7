"""Colours from the running Textual theme, for Rich text in tables: the same words read on the
dark and the light themes (``L`` switches), because the theme picks the shade."""

from __future__ import annotations

from rich.text import Text
from textual.app import App

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
    style = tone(app, name)
    if bold:
        style = f"bold {style}".strip()
    return Text(text, style=style)
