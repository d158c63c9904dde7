"""``tq top``: the live dashboard (the Textual app lives in :mod:`tq.tui`, imported lazily)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""

    @app.command()
    def top(
        broker: str | None = typer.Option(
            None, "--broker", "-b", help="tcp://host:port[,...] (env TQ_BROKER)"
        ),
        interval: float = typer.Option(
            0.5, "--interval", "-i", min=0.1, max=60.0, help="seconds between stats snapshots"
        ),
        light: bool = typer.Option(False, "--light", help="start with the light theme"),
    ) -> None:
        """Live dashboard: queues, workers, tasks, dead letters and the cluster (? for keys)."""
        from tq.cli.output import fail
        from tq.client import AsyncClient
        from tq.config import broker_url_from_env
        from tq.errors import TqError
        from tq.tui import TopApp

        try:
            url = broker_url_from_env(broker)
            client = AsyncClient(url, connect_timeout_s=2.0, timeout_s=10.0)
        except (TqError, ValueError) as exc:
            fail(str(exc), 2)
        TopApp(
            client,
            url=url,
            interval_s=interval,
            theme="textual-light" if light else None,
        ).run()
