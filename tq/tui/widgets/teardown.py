"""What a worker of ``tq top`` does with an answer that arrives while the app quits."""

from __future__ import annotations

import contextlib

from textual.css.query import NoMatches

# The app takes its widgets down child first, and a view's workers are cancelled only when the
# view itself goes: an answer from the broker that lands in between finds the view's table gone.
# That answer has nowhere to be shown and is dropped; anything else still raises.
widgets_gone = contextlib.suppress(NoMatches)
