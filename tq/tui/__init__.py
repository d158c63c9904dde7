"""``tq top``: the live dashboard. Talks to the broker only through ``AsyncClient`` (``watch()``
for the live model, requests for lists and actions); never reads a store."""

from tq.tui.app import TopApp
from tq.tui.data import LiveModel

__all__ = ["LiveModel", "TopApp"]
