"""Worker liveness: the broker's heartbeat timeout decides how often a worker must beat.

A worker that beat once per timeout (its own 2 s default against a broker run with
``--heartbeat-timeout 2``) used to be declared lost between two beats: the broker closed its
connection and requeued its leases, and the worker reconnected, every few seconds. The broker
now says its timeout in ``Welcome`` and the worker beats at least three times per timeout.
The same holds for the lease: with ``--lease 2`` every lease of a longer task expired before the
next beat, and the task went to the dead-letter queue without ever finishing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from tq import AsyncClient, Client
from tq.protocol.messages import Welcome

from tests.conftest import BrokerProcess, WorkerProcess, wait_until

StartWorker = Callable[..., WorkerProcess]


def test_welcome_says_the_brokers_heartbeat_timeout_and_lease(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory("--heartbeat-timeout", "1.5", "--lease", "4")

    async def hello() -> Welcome | None:
        async with AsyncClient(broker.url) as c:
            return c.welcome

    welcome = asyncio.run(hello())
    assert welcome is not None
    assert welcome.heartbeat_timeout_ms == 1500
    assert welcome.lease_ms == 4000


def test_an_idle_worker_with_a_slower_heartbeat_stays_connected(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker
) -> None:
    # The worker's own interval (2 s, the default) is longer than the broker's whole timeout.
    broker = broker_factory("--heartbeat-timeout", "1.5")
    worker = start_worker(broker.url)
    time.sleep(5)  # more than three timeouts with nothing to do but heartbeats
    with Client(broker.url) as c:
        workers = c.stats()["workers"]
    assert [w["id"] for w in workers] == [worker.worker_id]
    assert worker.poll() is None
    assert len(broker.events("worker.connected")) == 1, "the worker had to reconnect"
    assert broker.events("worker.lost") == []
    assert "broker_unavailable" not in Path(worker.stderr_path).read_text()


def test_a_silent_worker_is_logged_as_lost_and_its_connection_closed(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory("--heartbeat-timeout", "1")

    async def silent_worker() -> bool:
        """Whether the broker closed the connection of a worker that never heartbeats (a hung
        process would look the same) within 10 s."""
        c = AsyncClient(broker.url, role="worker", client_id="silent-1")
        try:
            conn = await c.connect()
            try:
                await asyncio.wait_for(conn.closed.wait(), 10)
            except TimeoutError:
                return False
            return True
        finally:
            await c.close()

    assert asyncio.run(silent_worker()), "the broker kept the silent worker connected"
    lost = wait_until(lambda: broker.events("worker.lost"), 5, what="worker.lost logged")
    assert lost[0]["worker"] == "silent-1"
    assert lost[0]["heartbeat_timeout_s"] == 1.0


def test_a_task_longer_than_a_short_lease_finishes_on_its_first_attempt(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker
) -> None:
    # The lease (1.5 s) is shorter than the worker's own heartbeat interval (2 s, the default).
    broker = broker_factory("--lease", "1.5")
    start_worker(broker.url)
    with Client(broker.url) as c:
        tid = c.submit("sleep", {"seconds": 4})
        info = c.wait(tid, timeout_s=30)
        counters = c.stats()["counters"]
    assert info.state == "completed", info
    assert info.attempt == 1
    assert counters.get("lease_expired", 0) == 0
