"""``StatusBar``: the top line: where we are connected, the broker's version and uptime, and, when
the link is down, a plain "disconnected — reconnecting" with the attempt and the error."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tq.tui import humanize
from tq.tui.data import LiveModel
from tq.tui.safe import one_line


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; background: $panel; color: $foreground; padding: 0 1; }
    StatusBar.-down { background: $error; color: $text; text-style: bold; }
    StatusBar.-connecting { background: $warning; color: $text; }
    """

    def __init__(self, url: str) -> None:
        super().__init__(id="status-bar")
        self.url = url
        self.text = ""  # what the bar says, as plain text

    def _say(self, text: Text) -> None:
        self.text = text.plain
        self.update(text)

    def show(self, model: LiveModel) -> None:
        conn = model.connection
        stats = model.stats
        self.set_class(not conn.connected and conn.ever_connected, "-down")
        self.set_class(not conn.connected and not conn.ever_connected, "-connecting")
        text = Text()
        text.append("tq top ", style="bold")
        if conn.connected:
            text.append("● live ", style="bold")
        elif conn.ever_connected:
            text.append("✖ disconnected — reconnecting")
            if conn.connecting:
                text.append(f" (attempt {conn.attempt}, trying now…)")
            else:
                text.append(f" (attempt {conn.attempt}, next in {conn.retry_in_s:.1f}s)")
            if conn.error:
                text.append(f": {one_line(conn.error)}")
            self._say(text)
            return
        else:
            text.append(f"connecting to {one_line(self.url)}…")
            if conn.attempt:
                text.append(f" (attempt {conn.attempt}: {one_line(conn.error)})")
            self._say(text)
            return
        text.append(one_line(self.url))
        if stats is not None:
            text.append(f"  node {one_line(stats.node_id or '?')}")
            role = stats.cluster.get("role")
            if role and role != "single":
                text.append(f" ({one_line(str(role))})")
            text.append(
                f"  v{one_line(stats.version)}  up {humanize.age(int(stats.uptime_s * 1000))}"
            )
            text.append(f"  {len(stats.workers)} workers")
        self._say(text)
