"""A leader that hangs (SIGSTOP: a frozen VM, a long stall) rather than dies: its connections
stay open and nothing on them is answered. The cluster elects another leader within seconds; a
client and a worker connected to the hung one must follow, which they did only when it died."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
from tq import Client

from tests.cluster.conftest import MakeCluster
from tests.conftest import WorkerProcess

pytestmark = pytest.mark.cluster

StartWorker = Callable[..., WorkerProcess]


def test_client_and_worker_leave_a_hung_leader(
    make_cluster: MakeCluster, start_worker: StartWorker
) -> None:
    """The client's submit waited out ``timeout_s`` and raised without trying another node;
    the worker skipped its unanswered heartbeats and stayed, running nothing. Now the submit
    times out, drops the connection and is resent to the new leader, and the worker's heartbeat
    timeout (twice the broker's, 2 s here) makes it reconnect there."""
    cluster = make_cluster(3)
    leader = cluster.wait_stable_leader()
    others = [n for n in cluster.nodes if n is not leader]
    urls = cluster.urls([leader, *others])  # the hung one first, as a connected client has it
    start_worker(urls, "-c", "1")
    with Client(urls, timeout_s=2.0, connect_timeout_s=3.0) as c:
        assert c.wait(c.submit("echo", 0), timeout_s=10).state == "completed"
        pid = leader.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            tid = c.submit("echo", 1)
            assert time.monotonic() - started < 8.0
            assert c.wait(tid, timeout_s=15).state == "completed"
        finally:
            os.kill(pid, signal.SIGCONT)
