"""Cluster: the Raft group as the node we are connected to (the leader) sees it: every node with
its role, term, commit and apply index, lag and last contact; a node the leader cannot reach is
shown as down. On a single-node broker it says so."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from tq.tui import humanize
from tq.tui.safe import line, one_line
from tq.tui.theme import tone, toned
from tq.tui.views.base import LiveView
from tq.tui.widgets.table import LiveTable, Row


def _num(value: Any) -> str:
    return "—" if value is None else str(value)


class ClusterView(LiveView):
    def compose(self) -> ComposeResult:
        yield Static(id="cluster-summary")
        yield LiveTable(
            "Node", "Role", "Term", "Commit", "Applied", "Match", "Lag", "Contact", id="nodes"
        )

    def focus_main(self) -> None:
        self.query_one("#nodes", LiveTable).focus()

    def refresh_view(self) -> None:
        m = self.model
        summary = self.query_one("#cluster-summary", Static)
        table = self.query_one("#nodes", LiveTable)
        if m.stats is None:
            summary.update(Text("waiting for the broker…", style="dim"))
            table.replace_rows([])
            return
        c = m.stats.cluster
        if not c or c.get("role") == "single":
            summary.update(
                Text.assemble(
                    ("Single node: ", "bold"),
                    f"broker {one_line(m.stats.node_id or '?')} runs without a Raft cluster; "
                    "there are no peers to show.",
                )
            )
            table.replace_rows([])
            return
        quorum = c.get("has_quorum")
        text = Text.assemble(
            ("leader ", "bold"),
            (one_line(str(c.get("leader") or "none")), f"bold {tone(self.app, 'accent')}"),
            f"  term {one_line(_num(c.get('term')))}  ",
            f"(clients: {one_line(str(c.get('leader_client') or '?'))})  ",
        )
        text.append(
            "quorum" if quorum else "NO QUORUM",
            style=tone(self.app, "success" if quorum else "error"),
        )
        summary.update(text)
        table.replace_rows(self._rows(c))

    def _rows(self, c: dict[str, Any]) -> list[Row]:
        m = self.model
        commit = c.get("commit_index")
        me = str(c.get("raft_address") or c.get("node_id") or "this node")
        role = str(c.get("role") or "?")
        rows: list[Row] = [
            (
                me,
                (
                    line(f"{me} *", style="bold"),
                    toned(self.app, role, "accent" if role == "leader" else "primary"),
                    _num(c.get("term")),
                    _num(commit),
                    _num(c.get("applied_index")),
                    _num(commit) if role == "leader" else "—",
                    "0" if role == "leader" else "—",
                    "self",
                ),
            )
        ]
        for addr, peer in sorted((c.get("peers") or {}).items()):
            up = bool(peer.get("connected"))
            match = peer.get("match_index")
            # numbers only: a broker's odd value is shown as it is, never crashes the view
            numbers = isinstance(match, int) and isinstance(commit, int)
            lag = str(max(0, commit - match)) if numbers else "—"
            heard = peer.get("last_contact_s")  # seconds since the leader last heard from it
            seen = m.peer_contact_ms.get(addr)
            if isinstance(heard, int | float):
                contact = "now" if heard < 1.0 else f"{humanize.age(int(heard * 1000))} ago"
            else:
                contact = (
                    "now" if up else ("never" if seen is None else humanize.since(seen, m.at_ms))
                )
            rows.append(
                (
                    addr,
                    (
                        addr,
                        toned(self.app, "follower", "primary")
                        if up
                        else toned(self.app, "down", "error", bold=True),
                        "—",
                        "—",
                        "—",
                        _num(match),
                        lag,
                        contact,
                    ),
                )
            )
        return rows
