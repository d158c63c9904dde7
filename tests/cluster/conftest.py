"""Fixtures of the Raft-cluster suite: ``make_cluster`` (a started :class:`Cluster`) and the
``history`` every fault test records into. On failure the tail of every node's log, the proxy's
event log and the client history are printed with the report."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import Cluster
from tests.cluster.history import History
from tests.conftest import _failed

MakeCluster = Callable[..., Cluster]


@pytest.fixture
def history(request: pytest.FixtureRequest) -> Iterator[History]:
    h = History()
    yield h
    if _failed(request):
        print("===== client history =====\n" + h.describe())


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakeCluster]:
    """``make_cluster(3, proxy=True)``: create and start a cluster, wait for a leader that
    stays the leader for a second (a link that comes up late can cause a second election)."""
    clusters: list[Cluster] = []

    def make(size: int = 3, *, wait_leader: bool = True, **kwargs: Any) -> Cluster:
        root = tmp_path / f"cluster{len(clusters)}"
        root.mkdir()
        c = Cluster(root, size, **kwargs)
        clusters.append(c)
        c.start()
        if wait_leader:
            c.wait_stable_leader()
        return c

    yield make
    if _failed(request):
        for c in clusters:
            print(c.describe())
    for c in clusters:
        c.close()


@pytest.fixture
def record_file(tmp_path: Path) -> Path:
    """Where the workers' ``cluster.mark`` handler appends the id of every run."""
    return tmp_path / "executed.txt"
