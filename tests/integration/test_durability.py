"""Crashes and signals: what the broker acknowledged survives, and no task is lost or run twice
when it should not be."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tq import AsyncClient, Client, TaskInfo
from tq.errors import TqError, WaitTimeout

from tests.apps.handlers import read_runs
from tests.conftest import HANDLERS_APP, BrokerProcess, WorkerProcess, wait_until

StartWorker = Callable[..., WorkerProcess]

FAST_DETECTION = ("--heartbeat-timeout", "1")
FAST_HEARTBEAT = ("--heartbeat", "0.3")


def all_pending_ids(url: str, page: int = 1000) -> list[str]:
    """Every pending task id, read page by page with the list cursor."""

    async def go() -> list[str]:
        out: list[str] = []
        async with AsyncClient(url) as c:
            cursor: str | None = None
            while True:
                tasks, cursor = await c.list_page("pending", limit=page, after=cursor)
                out += [t.id for t in tasks]
                if cursor is None:
                    return out

    return asyncio.run(go())


def snapshot(c: Client, ids: list[str]) -> dict[str, tuple[str, int, object]]:
    out = {}
    for tid in ids:
        info: TaskInfo = c.status(tid)
        out[tid] = (info.state, info.attempt, info.result)
    return out


def test_worker_sigkilled_mid_task_is_redelivered_to_another_worker(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker, tmp_path: Path
) -> None:
    broker = broker_factory(*FAST_DETECTION)
    record = tmp_path / "runs.jsonl"
    first = start_worker(broker.url, *FAST_HEARTBEAT, app=HANDLERS_APP)
    with Client(broker.url) as c:
        # The first run blocks for a minute; a redelivered run finishes at once.
        tid = c.submit("test.record", {"file": str(record), "sleep_first": 60})
        wait_until(lambda: len(read_runs(record)) == 1, what="first worker started the task")
        running = c.status(tid)
        assert running.state == "running"
        assert running.worker_id == first.worker_id

        second = start_worker(broker.url, *FAST_HEARTBEAT, app=HANDLERS_APP)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL

        info = c.wait(tid, timeout_s=15)
        assert info.state == "completed"
        assert info.attempt == 2
        assert info.worker_id == second.worker_id
        assert info.result == {"runs": 2, "tag": None}
        runs = read_runs(record)
        assert [r["pid"] for r in runs] == [first.pid, second.pid]
        stats = c.stats()
        assert stats["states"]["completed"] == 1
        assert stats["states"]["running"] == 0
        assert [w["id"] for w in stats["workers"]] == [second.worker_id]


def test_a_frozen_workers_expired_lease_goes_to_another_worker_not_back_to_it(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker
) -> None:
    """With a lease shorter than the heartbeat timeout, an expired lease was handed straight back
    to the claim the frozen worker had parked: attempt 2 went to the frozen worker too, and the
    task was dead-lettered as LeaseExpired while a healthy worker sat idle."""
    broker = broker_factory("--lease", "1", "--heartbeat-timeout", "30")
    frozen = start_worker(broker.url, "-c", "2")  # one slot free: a claim stays parked
    with Client(broker.url) as c:
        tid = c.submit("sleep", 1.0, max_retries=1)
        wait_until(lambda: c.status(tid).state == "running", what="task running")
        time.sleep(0.3)  # the free slot's claim is parked at the broker
        frozen.send_signal(signal.SIGSTOP)
        try:
            healthy = start_worker(broker.url, "-c", "2")
            info = c.wait(tid, timeout_s=20)
            assert info.state == "completed", info
            assert info.attempt == 2
            assert info.worker_id == healthy.worker_id
            workers = [w["id"] for w in c.stats()["workers"]]
            assert frozen.worker_id not in workers  # lost at its lease, not at the timeout
        finally:
            frozen.send_signal(signal.SIGCONT)


def test_acknowledged_submits_survive_broker_sigkill(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    batches = [1000, 1500, 2000, 400]
    singles = 100
    total = sum(batches) + singles
    assert total == 5000
    ids: list[str] = []
    with Client(broker.url) as c:
        for b, size in enumerate(batches):
            ids += c.submit_batch("echo", [{"b": b, "i": i} for i in range(size)])
            for i in range(singles // len(batches)):
                ids.append(c.submit("echo", {"single": i, "after_batch": b}, priority="high"))
    assert len(set(ids)) == total
    # Every id above was acknowledged; crash right now.
    broker.kill()
    broker.restart()

    with Client(broker.url) as c:
        stats = c.stats()
        assert stats["states"]["pending"] == total
        assert stats["queues"]["default"]["pending"] == {
            "high": singles,
            "normal": total - singles,
            "low": 0,
        }
        assert sorted(all_pending_ids(broker.url)) == sorted(ids)
        for tid in ids[:: len(ids) // 50]:  # spot-check records, not just the index
            info = c.status(tid)
            assert info.state == "pending"
            assert info.attempt == 0
            assert info.payload is not None

        worker = start_worker(broker.url, "--burst", "--concurrency", "64")
        assert worker.wait(120) == 0, worker.describe()

        stats = c.stats()
        assert stats["states"]["completed"] == total
        assert stats["states"]["pending"] == 0
        assert c.status(ids[0]).result == {"b": 0, "i": 0}
        assert c.status(ids[-1]).result == {"single": singles // len(batches) - 1, "after_batch": 3}


def test_acknowledged_work_survives_sigkill_across_journal_writes_and_store_syncs(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker
) -> None:
    """Single and batched submits from several connections and a worker reporting results, with
    a 1 MiB journal: small commits go to the journal, big ones (batches of 100) sync the store
    and restart the journal, interleaved; kill -9 in the middle. Every acknowledged submit exists
    afterwards, every result a waiter was told about is still there, and the in-flight submits
    the client retries after the restart are not doubled."""
    broker = broker_factory("--journal-mb", "1", "--heartbeat-timeout", "3")
    worker = start_worker(broker.url, "--concurrency", "32")
    acked: list[str] = []
    completed: set[str] = set()
    stop = False
    pad = "x" * 500

    async def lane(client: AsyncClient, k: int) -> None:
        i = 0
        while not stop:
            if k == 0:
                payloads = [{"k": k, "i": i, "j": j, "pad": pad} for j in range(100)]
                acked.extend(await client.submit_batch("echo", payloads))
            else:
                acked.append(await client.submit("echo", {"k": k, "i": i, "pad": pad}))
            i += 1

    async def waiter(client: AsyncClient) -> None:
        while not stop:
            if len(acked) < 100:
                await asyncio.sleep(0.01)
                continue
            try:
                info = await client.wait(acked[len(acked) // 2], timeout_s=2)
            except TqError:
                continue
            if info.state == "completed":
                completed.add(info.id)

    async def run() -> dict[str, int]:
        nonlocal stop
        async with AsyncClient(broker.url, connect_timeout_s=30) as c:
            jobs = [asyncio.create_task(lane(c, k)) for k in range(4)]
            jobs.append(asyncio.create_task(waiter(c)))
            # ... and a waiter told of a result (under load the worker lags the submits)
            # ... and both kinds of commit made, interleaved (on a loaded machine nearly every
            # tick holds a batch, so the journal's turns can take a while to add up).
            deadline = asyncio.get_running_loop().time() + 60
            counters: dict[str, int] = {}

            def journal_commits() -> int:
                return counters.get("wal_flushes", 0) - counters.get("journal_store_syncs", 0)

            while len(acked) < 8000 or not completed or journal_commits() < 3:
                assert not any(j.done() for j in jobs), [j.exception() for j in jobs if j.done()]
                assert asyncio.get_running_loop().time() < deadline, (len(acked), counters)
                await asyncio.sleep(0.02)
                if len(acked) >= 8000:
                    counters = (await c.stats())["counters"]
            broker.kill()  # submits are in flight: the client retries them after the restart
            broker.restart()
            stop = True  # the lanes' in-flight submits are retried until acknowledged
            await asyncio.gather(*jobs)
            return counters

    counters = asyncio.run(run())
    assert counters["journal_store_syncs"] >= 3, counters
    assert counters["wal_flushes"] - counters["journal_store_syncs"] >= 3, counters  # journal
    assert len(completed) > 0
    worker.kill()
    worker.wait(10)
    with Client(broker.url) as c:
        # Killed before it reconnected to the restarted broker, the worker's leases stay
        # running until its heartbeat timeout: a burst worker started earlier finds nothing to
        # do and leaves them (as a race under load showed).
        wait_until(lambda: c.stats()["states"]["running"] == 0, timeout=30, what="leases requeued")
    assert start_worker(broker.url, "--burst", "--concurrency", "64").wait(120) == 0
    with Client(broker.url) as c:
        stats = c.stats()
        assert stats["states"]["completed"] == len(set(acked)) == len(acked)
        assert stats["states"]["pending"] == 0
        for tid in [*completed, *acked[:: len(acked) // 200]]:
            assert c.status(tid).state == "completed"


def test_journal_size_change_after_sigkill_keeps_everything(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """The journal is read at its old size, replayed, and only then made at the new one."""
    broker = broker_factory("--journal-mb", "2")
    journal = broker.data_dir / "tq-journal"
    assert journal.stat().st_size == 2 * 1024 * 1024
    with Client(broker.url) as c:
        ids = [c.submit("echo", {"i": i}) for i in range(50)]
        ids += c.submit_batch("echo", [{"j": j} for j in range(500)])
    broker.kill()
    broker.args = ["--journal-mb", "3"]
    broker.restart()
    assert journal.stat().st_size == 3 * 1024 * 1024
    with Client(broker.url) as c:
        assert sorted(all_pending_ids(broker.url)) == sorted(ids)
        assert c.stats()["counters"]["submitted"] == 550


def test_broker_sigkill_requeues_running_task_on_restart(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker, tmp_path: Path
) -> None:
    broker = broker_factory(*FAST_DETECTION)
    record = tmp_path / "runs.jsonl"
    worker = start_worker(broker.url, *FAST_HEARTBEAT, app=HANDLERS_APP)
    with Client(broker.url) as c:
        tid = c.submit("test.record", {"file": str(record), "sleep_first": 60})
        wait_until(lambda: len(read_runs(record)) == 1, what="task started")
    broker.kill()
    worker.kill()
    worker.wait(10)
    broker.restart()
    with Client(broker.url) as c:
        wait_until(lambda: c.status(tid).state == "pending", what="running task requeued")
        assert c.stats()["states"]["running"] == 0
        assert start_worker(broker.url, "--burst", app=HANDLERS_APP).wait(30) == 0
        info = c.status(tid)
        assert info.state == "completed"
        assert info.result == {"runs": 2, "tag": None}


def test_worker_sigterm_finishes_running_task_then_exits_zero(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    """Also: the stop logs no error while a claim is parked at the broker (8 slots, one busy).
    It used to: asyncio.run() cancelled the parked claim and logged BrokerUnavailable."""
    worker = start_worker(broker.url, "--grace", "10")
    with Client(broker.url) as c:
        tid = c.submit("sleep", 3.0)  # long enough to be running still when the signal lands
        wait_until(lambda: c.status(tid).state == "running", what="task running")
        worker.send_signal(signal.SIGTERM)
        signalled = time.time()
        assert worker.wait(15) == 0, worker.describe()

        # No waiting here: the result must be in before the worker left.
        info = c.status(tid)
        assert info.state == "completed", info
        assert info.attempt == 1  # finished by its first worker, not redelivered
        assert info.result == 3.0
        assert info.worker_id == worker.worker_id
        assert info.finished_at_ms >= info.started_at_ms + 2900
        assert info.finished_at_ms / 1000 >= signalled - 0.05
        assert c.stats()["states"]["completed"] == 1
    stderr = worker.stderr_path.read_text()
    assert "Traceback" not in stderr, stderr
    assert " ERROR " not in stderr, stderr


def test_worker_sigterm_does_not_claim_new_work(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    worker = start_worker(broker.url, "--grace", "10", "--concurrency", "1")
    with Client(broker.url) as c:
        first = c.submit("sleep", 3.0)  # still running when the signal lands, on a slow machine too
        wait_until(lambda: c.status(first).state == "running", what="first task running")
        second = c.submit("echo", "later")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, worker.describe()
        assert c.status(first).state == "completed"
        assert c.status(second).state == "pending"
        assert c.status(second).attempt == 0


def test_worker_sigterm_past_grace_hands_the_task_back_without_counting_the_attempt(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    worker = start_worker(broker.url, "--grace", "0.5")
    with Client(broker.url) as c:
        # On its last attempt: a graceful stop must not dead-letter it (nor use up an attempt).
        tid = c.submit("sleep", 60, max_retries=0)
        wait_until(lambda: c.status(tid).state == "running", what="task running")
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, worker.describe()
        assert time.monotonic() - t0 < 5
        info = wait_until(
            lambda: (i := c.status(tid)).state == "pending" and i, what="task requeued"
        )
        assert info.attempt == 0  # handed back: the cut-short run is not counted


def test_worker_sigterm_past_grace_with_blocking_handler_leaves_within_grace(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    """--grace bounds how long a SIGTERMed worker stays, even if a sync handler blocks."""
    worker = start_worker(broker.url, "--grace", "0.2", app=HANDLERS_APP)
    with Client(broker.url) as c:
        tid = c.submit("test.slow_sync", 3.5)
        wait_until(lambda: c.status(tid).state == "running", what="task running")
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        elapsed = time.monotonic() - t0
        # grace 0.2 s + up to 1 s for cancelled tasks to unwind + process exit
        assert elapsed < 2.8, f"worker took {elapsed:.1f}s to leave with --grace 0.2"


def test_broker_sigterm_exits_zero_and_restart_keeps_everything(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker
) -> None:
    broker = broker_factory()
    with Client(broker.url) as c:
        done = c.submit_batch("echo", [{"i": i} for i in range(20)])
        dead = c.submit("fail", {"message": "nope"}, max_retries=0)
        assert start_worker(broker.url, "--burst").wait(30) == 0
        assert c.status(dead).state == "dead"
        pending = c.submit_batch("echo", [{"p": i} for i in range(30)], priority="low")
        cancelled = c.submit("echo", "x")
        c.cancel(cancelled)
        before_stats = c.stats()
        ids = [*done, dead, *pending, cancelled]
        before = snapshot(c, ids)

    assert broker.terminate() == 0
    assert "Traceback" not in broker.logs[-1].read_text()
    broker.restart()

    with Client(broker.url) as c:
        after_stats = c.stats()
        assert after_stats["states"] == before_stats["states"]
        assert after_stats["states"] == {
            "pending": 30,
            "running": 0,
            "completed": 20,
            "failed": 0,
            "dead": 1,
            "cancelled": 1,
        }
        assert after_stats["queues"]["default"]["pending"] == {"high": 0, "normal": 0, "low": 30}
        assert snapshot(c, ids) == before
        for key in ("submitted", "completed", "dead_lettered", "cancelled"):
            assert after_stats["counters"][key] == before_stats["counters"][key], key
        # Still a working broker: the pending ones run now.
        assert start_worker(broker.url, "--burst").wait(30) == 0
        assert c.stats()["states"]["completed"] == 50


def test_client_reconnects_to_restarted_broker(broker: BrokerProcess) -> None:
    with Client(broker.url) as c:
        before = c.submit("echo", 1)
        broker.kill()
        broker.restart()
        after = c.submit("echo", 2)  # the same client object, a new connection
        assert {t.id for t in c.list("pending")} == {before, after}


def test_a_wait_across_a_broker_restart_keeps_its_timeout(broker: BrokerProcess) -> None:
    """A wait resent after a reconnect asks for what is left of its timeout, not all of it
    again (it took 8.2 s for a 6 s timeout across a restart)."""
    with Client(broker.url) as c:
        tid = c.submit("echo", 1)  # no worker: it stays pending, the wait must time out

        restarted: list[float] = []

        def restart_soon() -> None:
            time.sleep(1.0)
            broker.kill()
            broker.restart()
            restarted.append(time.monotonic() - t0)

        bounce = threading.Thread(target=restart_soon)
        t0 = time.monotonic()
        bounce.start()
        try:
            with pytest.raises(WaitTimeout):
                c.wait(tid, timeout_s=3.0)
            elapsed = time.monotonic() - t0
        finally:
            bounce.join()
    # The resend goes out once the broker is back (``restarted[0]`` s in) and asks for what is
    # left; the old one asked for 3 s again, so it could not end before restarted[0] + 3.
    due = max(3.0, restarted[0])
    assert 2.9 <= elapsed < due + 0.9, f"a 3 s wait took {elapsed:.1f} s ({restarted[0]:.1f} s)"


def test_a_second_sigterm_cuts_the_grace_short(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    """As with Celery's second Ctrl-C: the first signal waits out ``--grace`` for running tasks,
    a second one hands them back at once."""
    worker = start_worker(broker.url, "--grace", "60")
    with Client(broker.url) as c:
        tid = c.submit("sleep", 60)
        wait_until(lambda: c.status(tid).state == "running", what="task running")
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert worker.poll() is None, "the first SIGTERM must wait for the running task"
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, worker.describe()
        assert time.monotonic() - t0 < 5
        info = wait_until(
            lambda: (i := c.status(tid)).state == "pending" and i, what="task handed back"
        )
        assert info.attempt == 0
