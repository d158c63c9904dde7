"""Workers: every worker the broker knows, its slots, tasks done, CPU, memory and heartbeat age.
A worker that missed its heartbeats is shown as silent, one that left (or was declared lost) as
gone for two minutes after it disappeared."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from tq.protocol.messages import WorkerInfo
from tq.tui import humanize
from tq.tui.theme import tone, toned
from tq.tui.views.base import LiveView
from tq.tui.widgets.table import LiveTable, Row

STATUS_TONES = {"ok": "success", "busy": "accent", "silent": "warning", "gone": "error"}


class WorkersView(LiveView):
    def compose(self) -> ComposeResult:
        yield Static(id="workers-summary")
        yield LiveTable(
            "Status",
            "Worker",
            "Slots",
            "Done",
            "CPU",
            "Mem",
            "Beat",
            "Host",
            "PID",
            "Queues",
            id="workers-table",
        )

    def focus_main(self) -> None:
        self.query_one("#workers-table", LiveTable).focus()

    def refresh_view(self) -> None:
        m = self.model
        workers = m.stats.workers if m.stats is not None else []
        rows: list[Row] = [self._row(w, m.worker_status(w)) for w in workers]
        rows += [self._row(g.info, "gone", g.gone_at_ms) for g in m.gone.values()]
        self.query_one("#workers-table", LiveTable).replace_rows(rows)
        slots = sum(w.concurrency for w in workers)
        busy = sum(w.running for w in workers)
        summary = Text(f"{len(workers)} workers  {busy}/{slots} slots busy")
        silent = sum(1 for w in workers if m.worker_status(w) == "silent")
        if silent:
            summary.append(f"  {silent} silent", style=f"bold {tone(self.app, 'warning')}")
        if m.gone:
            summary.append(f"  {len(m.gone)} gone", style=f"bold {tone(self.app, 'error')}")
        self.query_one("#workers-summary", Static).update(summary)

    def _row(self, w: WorkerInfo, status: str, gone_at_ms: int = 0) -> Row:
        m = self.model
        label = toned(self.app, status, STATUS_TONES[status], bold=status in ("silent", "gone"))
        beat = humanize.since(w.last_heartbeat_ms, gone_at_ms or m.at_ms)
        if gone_at_ms:
            beat = f"gone {humanize.since(gone_at_ms, m.at_ms)}"
        return (
            w.id,
            (
                label,
                w.id,
                f"{w.running}/{w.concurrency}",
                str(w.done),
                f"{w.cpu_percent:.0f}%",
                humanize.size(w.rss_bytes) if w.rss_bytes else "—",
                beat,
                w.host,
                str(w.pid),
                ",".join(w.queues),
            ),
        )
