"""Replies bounded by bytes, through a real broker: a client refuses a frame over its limit and
drops the whole connection, so a reply bounded only by a count of tasks, rows or queues could
make a claim, ``tq dlq list``, ``tq export`` or ``tq stats`` fail for good on legitimate data.

A broker run with ``--max-frame 65536`` pages lists and exports at half that (32 KiB), so a few
tasks show what took tens of megabytes before."""

from __future__ import annotations

from collections.abc import Callable

from tq import AsyncClient
from tq.model import ErrorInfo
from tq.protocol.messages import (
    Ack,
    ClaimTask,
    DeadLetters,
    Leased,
    Outcome,
    ResultBatch,
    TaskListReply,
    TaskSpec,
)

from tests.conftest import BrokerProcess

SMALL_FRAME = ("--max-frame", str(64 * 1024))


async def _dead(url: str, ids: list[str], payload: bytes, error: ErrorInfo) -> None:
    """Submit ``ids`` and fail each once through a raw worker connection: dead letters."""
    async with AsyncClient(url) as producer:
        for task_id in ids:
            spec = TaskSpec(task_id, "job", payload, max_retries=0)
            await producer.submit_specs([spec])
    worker = AsyncClient(
        url,
        role="worker",
        client_id="raw-worker",
        hello_extra={"concurrency": len(ids), "queues": ["default"]},
    )
    async with worker:
        leased: list[Outcome] = []
        while len(leased) < len(ids):
            reply = await worker.call(
                lambda rid: ClaimTask(rid, ["default"], len(ids), 0), Leased, retry=False
            )
            leased += [Outcome(lt.task.id, lt.token, False, error=error) for lt in reply.tasks]
        ack = await worker.call(lambda rid: ResultBatch(rid, leased), Ack, retry=False)
        assert sorted(ack.ids) == sorted(ids)


async def test_a_claim_of_big_tasks_leases_only_what_fits_in_a_frame(
    broker: BrokerProcess,
) -> None:
    """Eight free slots and three 5 MiB tasks: the claim stops at half a default frame (two
    tasks) instead of one reply of every ready task, which past a client's frame limit made the
    worker drop the connection and every task lose an attempt without running."""
    big = b'"' + b"x" * (5 * 1024 * 1024) + b'"'
    async with AsyncClient(broker.url) as producer:
        for i in range(3):  # one a request: two would be over the broker's frame limit
            await producer.submit_specs([TaskSpec(f"big-{i}", "echo", big)])
    worker = AsyncClient(
        broker.url,
        role="worker",
        client_id="big-worker",
        hello_extra={"concurrency": 8, "queues": ["default"]},
    )
    async with worker:
        first = await worker.call(lambda rid: ClaimTask(rid, ["default"], 8, 0), Leased)
        second = await worker.call(lambda rid: ClaimTask(rid, ["default"], 8, 0), Leased)
    assert [lt.task.id for lt in first.tasks] == ["big-0", "big-1"]
    assert [lt.task.id for lt in second.tasks] == ["big-2"]
    assert all(lt.task.payload == big for lt in first.tasks + second.tasks)


async def test_dlq_list_leaves_payloads_out_and_pages_by_bytes(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory(*SMALL_FRAME)
    ids = [f"dead-{i}" for i in range(4)]
    await _dead(broker.url, ids, b'"' + b"p" * 30_000 + b'"', ErrorInfo("Boom", "m", "t" * 12_000))
    async with AsyncClient(broker.url) as c:
        page = await c.call(lambda rid: DeadLetters(rid, "list", limit=100), TaskListReply)
        # ~12.3 KB a task with its traceback: the third reaches 32 KiB, and the page ends there
        assert [t.id for t in page.tasks] == ids[:3]
        assert page.next == "dead-2"
        assert all(t.payload == b"" for t in page.tasks)
        assert all(t.error == ErrorInfo("Boom", "m", "t" * 12_000) for t in page.tasks)
        assert len(await c.dead_letters(limit=2)) == 2
        # the next page goes on after the cursor, and the client follows it to its limit
        rest = await c.call(
            lambda rid: DeadLetters(rid, "list", limit=100, after="dead-2"), TaskListReply
        )
        assert ([t.id for t in rest.tasks], rest.next) == (ids[3:], None)
        assert [t.id for t in await c.dead_letters(limit=100)] == ids
        assert (await c.status("dead-0")).payload == "p" * 30_000  # status shows it whole


async def test_export_pages_end_at_a_byte_budget(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """Export rows carry the error message (up to 8 KiB from a worker): 5,000 of them made a
    page over the client's frame limit."""
    broker = broker_factory(*SMALL_FRAME)
    ids = [f"long-{i}" for i in range(6)]
    await _dead(broker.url, ids, b"1", ErrorInfo("BigError", "m" * 8192))
    async with AsyncClient(broker.url) as c:
        pages = [[r.id for r in page] async for page in c.export(states=["dead"])]
    # ~8.3 KB a row: the fourth reaches 32 KiB
    assert pages == [ids[:4], ids[4:]]


async def test_stats_list_at_most_1000_queues_and_say_how_many_more(
    broker: BrokerProcess,
) -> None:
    """140,000 queues made a 45 MB stats reply that no client could read, until a restart."""
    specs = [TaskSpec(f"t{i:04d}", "echo", b"1", f"q{i:04d}") for i in range(1_100)]
    async with AsyncClient(broker.url) as c:
        await c.submit_specs(specs)
        await c.cancel("t0000")  # an emptied queue is not listed at all
        stats = await c.stats()
    assert len(stats["queues"]) == 1_000
    assert "q0000" not in stats["queues"]
    assert stats["counters"]["queues_left_out"] == 99
