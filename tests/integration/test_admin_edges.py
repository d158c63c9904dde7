"""Edges of the admin surface found by a review that fed the broker and the CLI odd values;
before the fixes a NaN stalled other clients' replies, a closed connection left its waits
behind, a filter was ignored for named ids, a bulk purge stopped at 1,000 without saying so,
and bad option values gave tracebacks."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from tq import AsyncClient, Client
from tq.errors import BadRequest
from tq.protocol.messages import Ack, Heartbeat, TaskSpec, WaitTask

from tests.cli.test_cli import tq
from tests.conftest import BrokerProcess, WorkerProcess, one_line_error, wait_until

StartWorker = Callable[..., WorkerProcess]


def test_a_nan_age_is_a_bad_request_and_other_replies_still_arrive(broker: BrokerProcess) -> None:
    async def go() -> None:
        async with AsyncClient(broker.url) as a, AsyncClient(broker.url) as b:
            tid = await a.submit("echo", 1)
            big = [TaskSpec(f"big-{i}", "echo", b"x" * 1000) for i in range(5_000)]
            # A big write in flight, so the NaN request's reply waits for it, beside a status.
            results = await asyncio.gather(
                a.submit_specs(big),
                b.dead_letters(older_than_s=math.nan),
                b.status(tid),
                return_exceptions=True,
            )
            assert isinstance(results[1], BadRequest), results[1]
            assert not isinstance(results[2], BaseException), results[2]
            assert results[2].id == tid

    asyncio.run(go())


def test_a_closed_connection_leaves_no_wait_behind(broker: BrokerProcess) -> None:
    async def go() -> None:
        async with AsyncClient(broker.url) as c:
            tid = await c.submit("echo", 1)  # no worker: pending
        gone = AsyncClient(broker.url)
        conn = await gone.connect()
        for _ in range(500):  # a day each; the connection then closes without waiting
            conn.send(conn.next_rid(), WaitTask(conn.next_rid(), tid, 86_400_000))
        async with AsyncClient(broker.url) as c:
            deadline = asyncio.get_running_loop().time() + 10
            while (waits := (await c.stats())["counters"]["waits"]) < 500:
                assert asyncio.get_running_loop().time() < deadline, f"{waits} waits registered"
                await asyncio.sleep(0.02)
            assert waits == 500
        await gone.close()

    asyncio.run(go())
    with Client(broker.url) as c:
        wait_until(lambda: c.stats()["counters"]["waits"] == 0, what="waits dropped")


def _dead(c: Client, n: int, queue: str = "default") -> list[str]:
    return [c.submit("fail", None, max_retries=0, queue=queue) for _ in range(n)]


def test_a_filter_applies_to_named_dead_letters_too(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    start_worker(broker.url, "-q", "default", "-q", "other")
    with Client(broker.url) as c:
        (tid,) = _dead(c, 1, queue="other")
        assert c.wait(tid, timeout_s=20).state == "dead"
        result = tq("dlq", "purge", tid, "--queue", "default", broker=broker.url)
        assert "purged: 0" in result.stdout
        assert c.status(tid).state == "dead"  # still there: it is in "other"


def test_a_bulk_purge_by_filter_takes_every_match(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    start_worker(broker.url, "-c", "64")
    with Client(broker.url) as c:
        ids = c.submit_batch("fail", [None] * 1_200, max_retries=0)
        wait_until(lambda: c.stats()["states"]["dead"] == 1_200, 60, what="1,200 dead")
    result = tq("dlq", "purge", "--queue", "default", "-o", "json", broker=broker.url)
    assert result.returncode == 0, result.stderr
    with Client(broker.url) as c:
        assert c.stats()["states"]["dead"] == 0
    assert len(ids) == 1_200


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_bad_wait_timeout_is_refused_before_anything_is_submitted(
    broker: BrokerProcess, value: str
) -> None:
    result = tq("submit", "echo", "1", "--wait", "--wait-timeout", value, broker=broker.url)
    line = one_line_error(result, code=2)
    assert "--wait-timeout" in line
    with Client(broker.url) as c:
        assert c.stats()["states"]["pending"] == 0
    assert "--timeout" in one_line_error(tq("wait", "x", "--timeout", value, broker=broker.url), 2)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--lease", "nan"),
        ("--heartbeat-timeout", "inf"),
        ("--retention-interval", "0"),
        ("--max-frame", "0"),
        ("--retry-base", "-1"),
        ("--hello-timeout", "0"),
        ("--raft-compaction-entries", "5"),
    ],
)
def test_bad_broker_options_are_one_line_and_exit_2(
    tmp_path: Path, option: str, value: str
) -> None:
    result = tq("broker", "--port", "0", "--data-dir", str(tmp_path), option, value, timeout=30)
    line = one_line_error(result, code=2)
    assert option in line


def test_a_heartbeat_with_nan_metrics_still_extends_and_stores_no_nan(
    broker: BrokerProcess,
) -> None:
    async def go() -> list[dict[str, object]]:
        w = AsyncClient(broker.url, role="worker", client_id="odd-1")
        try:
            await w.call(lambda rid: Heartbeat(rid, [], math.nan, 5), Ack)
            async with AsyncClient(broker.url) as c:
                workers: list[dict[str, object]] = (await c.stats())["workers"]
                return workers
        finally:
            await w.close()

    (odd,) = [w for w in asyncio.run(go()) if w["id"] == "odd-1"]
    assert odd["cpu_percent"] == 0.0  # not NaN: `tq workers -o json` must stay valid JSON


def test_a_data_dir_that_cannot_be_created_is_named_not_blamed_on_the_port(tmp_path: Path) -> None:
    """Startup I/O errors (a full disk, a file in the way) read as a bind failure of the port,
    without the path."""
    in_the_way = tmp_path / "data"
    in_the_way.write_text("not a directory")
    result = tq("broker", "--port", "0", "--http-port", "-1", "--data-dir", str(in_the_way))
    line = one_line_error(result, code=1)
    assert str(in_the_way) in line
    assert "cannot start broker on" not in line
