"""``tq top`` on a cluster: it watches the leader, and after the leader is killed it says so and
comes back on its own, on the new leader (AsyncClient follows NOT_LEADER to it)."""

from __future__ import annotations

import asyncio

import pytest
from tq.client import AsyncClient
from tq.tui.views.cluster import ClusterView
from tq.tui.widgets.table import LiveTable

from tests.cluster.conftest import MakeCluster
from tests.tui.conftest import app_of, status_text, top, until

pytestmark = pytest.mark.cluster


async def test_top_follows_the_new_leader_after_the_leader_is_killed(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(3)
    leader = cluster.wait_leader()
    async with top(cluster.urls()) as pilot:
        app = app_of(pilot)
        assert app.model.stats is not None
        assert app.model.stats.cluster["role"] == "leader"
        assert app.model.stats.node_id == leader.name
        await pilot.press("5")
        view = app.query_one(ClusterView)
        nodes = view.query_one("#nodes", LiveTable)
        await until(pilot, lambda: len(nodes.row_keys()) == 3, what="three nodes listed")

        await asyncio.to_thread(cluster.kill, leader)
        survivors = [n for n in cluster.nodes if n is not leader]
        new = await asyncio.to_thread(cluster.wait_leader, 15.0, survivors)

        def on_new_leader() -> bool:
            stats = app.model.stats
            return (
                "● live" in status_text(pilot)
                and stats is not None
                and stats.node_id == new.name
                and stats.cluster.get("role") == "leader"
            )

        await until(pilot, on_new_leader, within_s=20, what="live again, on the new leader")
        # the old leader is shown as down from the new leader's side
        await until(
            pilot,
            lambda: any("down" in " ".join(nodes.row_text(k)) for k in nodes.row_keys()),
            within_s=10,
            what="the killed node shown as down",
        )
        async with AsyncClient(cluster.urls()) as c:  # and the data is live, not a stale view
            await c.submit("echo", {}, queue="after-failover")
        await until(
            pilot,
            lambda: app.model.stats is not None and "after-failover" in app.model.stats.queues,
            what="fresh data from the new leader",
        )
