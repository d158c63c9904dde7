"""``tq export`` against a cluster: given every address (a follower first), it reads from the
leader; after the leader is killed it exports the same tasks from the new one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
from tq import Client

from tests.cluster.conftest import MakeCluster
from tests.conftest import WorkerProcess, ok, wait_until
from tests.history.conftest import tq

pytestmark = pytest.mark.cluster


def _rows(path: Path) -> list[tuple[str, int]]:
    with duckdb.connect() as db:
        rows = db.execute(
            f"SELECT state, count(*) FROM read_parquet('{path}') GROUP BY state ORDER BY state"
        ).fetchall()
    return [(str(s), int(n)) for s, n in rows]


def test_export_reads_the_cluster_and_survives_a_leader_change(
    make_cluster: MakeCluster, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    cluster = make_cluster(3)
    leader = cluster.wait_leader()
    followers = [n for n in cluster.nodes if n is not leader]
    urls = ",".join([followers[0].url, leader.url, followers[1].url])
    start_worker(urls, "-c", "16")
    with Client(urls, timeout_s=10.0) as c:
        c.submit_batch("echo", list(range(120)))
        dead = c.submit("fail", None, max_retries=0)
        assert c.wait(dead, timeout_s=20).state == "dead"
        wait_until(lambda: c.stats()["states"]["completed"] == 120, timeout=30)

    first = tmp_path / "first.parquet"
    ok(tq("export", "--out", str(first), "-b", urls, "--quiet", state_dir=tmp_path))
    assert _rows(first) == [("completed", 120), ("dead", 1)]

    cluster.kill(leader)
    cluster.wait_leader(15.0, followers)
    second = tmp_path / "second.parquet"
    ok(tq("export", "--out", str(second), "-b", urls, "--quiet", state_dir=tmp_path))
    assert _rows(second) == _rows(first)
