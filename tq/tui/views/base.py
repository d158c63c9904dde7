"""``LiveView``: what every view has: the live model, the broker link, and ``refresh_view``,
which the app calls when the model changed (only for the visible view)."""

from __future__ import annotations

from textual.containers import Vertical
from textual.widget import Widget

from tq.tui.data import LiveModel
from tq.tui.link import BrokerLink


class LiveView(Vertical):
    def __init__(self, model: LiveModel, link: BrokerLink, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model
        self.link = link

    @property
    def shown(self) -> bool:
        """Whether this view's tab is the one on screen. A hidden view is not drawn: the app
        draws a view when its tab is shown, so drawing it before only costs CPU."""
        pane = self.parent  # the TabPane: the tabs show one pane and hide the others
        return self.is_mounted and isinstance(pane, Widget) and pane.display

    def refresh_view(self) -> None:
        """Redraw from the model; called at most a few times a second."""

    def poll(self) -> None:
        """Called about once a second while visible: re-read lists from the broker if needed."""

    def focus_main(self) -> None:
        """Focus the view's main widget (its table) when the view is shown."""
