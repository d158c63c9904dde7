"""A replica killed (-9) and restarted while the others go on applies the next entries exactly as
they do; and the leader's timer ticks once per due event, from the applied state.

A restarted node's state machine comes back from its store, then applies what it missed and what
follows. Were lease deadlines or the worker table kept in memory only, the first Tick after the
restart would expire on that node the lease the leader keeps, the worker's result would be
refused there while the leader accepts it, and the replicas would hold different tasks: an
acknowledged result lost on the day that node leads.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tq import Client

from tests.cluster.conftest import MakeCluster
from tests.conftest import HANDLERS_APP, WorkerProcess, wait_until

pytestmark = pytest.mark.cluster

StartWorker = Callable[..., WorkerProcess]
SLOW_S = 8.0  # outlasts the follower's restart and catch-up, and the Tick after it
# Worker heartbeats every 60 s: no heartbeat traffic during a test (see each test for why).
QUIET = ("--heartbeat-timeout", "120", "--retry-base", "0.05")


def test_restarted_follower_keeps_the_leases_the_leader_keeps(
    make_cluster: MakeCluster, start_worker: StartWorker
) -> None:
    # A heartbeat extends the lease on every node, restarted or not, and would hide a lease that
    # came back wrong: the worker heartbeats every 60 s here, i.e. not during the test.
    cluster = make_cluster(3, extra_args=QUIET)
    leader = cluster.wait_stable_leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    urls = cluster.urls()
    start_worker(urls, "-c", "2", "--heartbeat", "60", app=HANDLERS_APP)
    with Client(urls) as client:
        slow = client.submit("test.slow_sync", SLOW_S)
        wait_until(lambda: client.status(slow).state == "running", 15, what="the slow task running")
        cluster.kill(follower)
        cluster.restart(follower)
        cluster.wait_converged()  # the follower caught up, its lease on `slow` recovered

        # A failure whose retry is due within 50 ms: the leader's timer commits a Tick (and
        # another when the retry fails too) while `slow` still runs under its lease.
        failing = client.submit("test.boom", None, max_retries=1, backoff_s=0.05)
        assert client.wait(failing, timeout_s=15).state == "dead"
        assert client.status(slow).state == "running"
        info = client.wait(slow, timeout_s=SLOW_S + 15)
        assert info.state == "completed", info

    # Every node, the restarted one included, holds the same tasks in the same states.
    state = cluster.wait_converged()
    assert state["states"]["completed"] == 1, state
    assert state["states"]["dead"] == 1, state
    assert state["states"]["pending"] == 0, state


def test_retries_fall_due_on_time_one_tick_each(
    make_cluster: MakeCluster, start_worker: StartWorker
) -> None:
    """A retry is due 25-50 ms after its failure here. The leader must arm its timer from the
    state *after* the failure is applied (in a cluster, once committed): armed right after
    the append, it missed the retry until some other command came along (the worker's next
    claim, 10 s later). And one Tick is in flight at a time: the state says a Tick is due until
    that Tick is committed, and re-arming at once filled the log with Ticks meanwhile."""
    cluster = make_cluster(3, extra_args=QUIET)
    urls = cluster.urls()
    start_worker(urls, "-c", "1", "--heartbeat", "60", app=HANDLERS_APP)
    with Client(urls) as client:
        before = cluster.wait_converged()["commit_index"]
        failing = client.submit("test.boom", None, max_retries=2, backoff_s=0.05)
        info = client.wait(failing, timeout_s=15)
        assert (info.state, info.attempt) == ("dead", 3), info
    after = cluster.wait_converged()["commit_index"]
    # a submit, three claims and three reports, two Ticks, parked claims served: a handful
    assert after - before < 40, f"{after - before} log entries for one task retried twice"
