"""Text from the broker made safe for a terminal: shared by the CLI and ``tq top``.

Task names, errors, results, hosts and ids come from whoever can submit a task or connect a
worker. Printed raw, an ESC sequence in a handler's error could clear, retitle or recolour the
terminal of the operator reading it (and write its clipboard, with OSC 52)."""

from __future__ import annotations

import re
from typing import Final

# Control characters other than tab and newline, shown as \x1b and so on (C0, DEL and C1: a
# terminal reads 0x9b as CSI just like ESC [).
_CONTROLS: Final = {
    c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in (9, 10)
}


def clean(text: str) -> str:
    """``text`` with every control character but tab and newline escaped (``\\x1b``)."""
    return text.translate(_CONTROLS)


# The same characters, for a test that allocates nothing (``tq top`` checks every table cell).
_CONTROL_RE: Final = re.compile("[" + re.escape("".join(map(chr, _CONTROLS))) + "]")


def has_controls(text: str) -> bool:
    """Whether :func:`clean` would change ``text``."""
    return _CONTROL_RE.search(text) is not None
