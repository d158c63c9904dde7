"""A task's life against a real broker and real workers: submit, claim, run, retry, finish."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from tq import Client
from tq.errors import InvalidState, TaskNotFound, WaitTimeout
from tq.model import RetryPolicy

from tests.apps.handlers import read_runs
from tests.conftest import HANDLERS_APP, BrokerProcess, WorkerProcess, stop_worker, wait_until

RETRY_BASE_S = 0.05
NO_TASKS = {"pending": 0, "running": 0, "completed": 0, "failed": 0, "dead": 0, "cancelled": 0}

StartWorker = Callable[..., WorkerProcess]


def states(c: Client) -> dict[str, int]:
    return dict(c.stats()["states"])


def wait_exit(proc: WorkerProcess, timeout: float = 60.0) -> int:
    rc = proc.wait(timeout)
    assert rc == 0, proc.describe()
    return rc


def test_submit_runs_and_completes_with_result(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    worker = start_worker(broker.url)
    with Client(broker.url) as c:
        tid = c.submit("echo", {"x": 1}, priority="high")
        info = c.wait(tid, timeout_s=10)
        assert info.state == "completed"
        assert info.result == {"x": 1}
        assert info.error is None

        st = c.status(tid)
        assert st.id == tid
        assert st.name == "echo"
        assert st.queue == "default"
        assert st.priority == "high"
        assert st.state == "completed"
        assert st.attempt == 1
        assert st.result == {"x": 1}
        assert st.worker_id == worker.worker_id
        assert 0 < st.submitted_at_ms <= st.started_at_ms <= st.finished_at_ms
        assert states(c) == NO_TASKS | {"completed": 1}
        assert [t.id for t in c.list("completed")] == [tid]


def test_unknown_task_id_raises_task_not_found(client: Client) -> None:
    with pytest.raises(TaskNotFound):
        client.status("no-such-task")
    with pytest.raises(TaskNotFound):
        client.wait("no-such-task", timeout_s=1)
    with pytest.raises(TaskNotFound):
        client.cancel("no-such-task")
    assert states(client) == NO_TASKS


def test_wait_times_out_while_nobody_runs_the_task(client: Client) -> None:
    tid = client.submit("echo", {"x": 1})
    with pytest.raises(WaitTimeout):
        client.wait(tid, timeout_s=0.3)
    assert client.status(tid).state == "pending"
    assert client.status(tid).attempt == 0


def test_resubmitting_the_same_task_id_is_idempotent(client: Client) -> None:
    first = client.submit("echo", {"n": 1}, task_id="order-42")
    second = client.submit("echo", {"n": 2}, task_id="order-42")
    assert first == second == "order-42"
    assert states(client)["pending"] == 1
    assert client.status("order-42").payload == {"n": 1}  # the first submit wins


def test_priorities_are_served_high_first_then_fifo(
    broker: BrokerProcess, start_worker: StartWorker, tmp_path: Path
) -> None:
    record = tmp_path / "runs.jsonl"
    order = ["low", "normal", "high"] * 3
    with Client(broker.url) as c:
        ids: dict[str, str] = {}
        for i, prio in enumerate(order):
            tag = f"{prio}-{i}"
            ids[tag] = c.submit("test.record", {"file": str(record), "tag": tag}, priority=prio)
        assert c.stats()["queues"]["default"]["pending"] == {"high": 3, "normal": 3, "low": 3}

        wait_exit(start_worker(broker.url, "--concurrency", "1", "--burst", app=HANDLERS_APP))

        ran = [r["tag"] for r in read_runs(record)]
        expected = [
            f"{p}-{i}" for p in ("high", "normal", "low") for i in range(9) if order[i] == p
        ]
        assert ran == expected
        started = [c.status(ids[tag]).started_at_ms for tag in expected]
        assert started == sorted(started)
        assert states(c) == NO_TASKS | {"completed": 9}


def _id_with_growing_backoff(policy: RetryPolicy, retries: int) -> tuple[str, list[int]]:
    """A caller-chosen task id whose (deterministically jittered) retry delays each at least
    double-ish, so "the gaps grow" is a property of the broker, not of jitter luck."""
    for i in range(100_000):
        tid = f"retry-growth-{i}"
        delays = [policy.delay_ms(tid, attempt) for attempt in range(1, retries + 1)]
        if all(b >= 1.8 * a for a, b in itertools.pairwise(delays)):
            return tid, delays
    raise AssertionError("no suitable id")  # pragma: no cover


def test_failing_task_retries_with_growing_backoff_then_dead_letters(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker, tmp_path: Path
) -> None:
    broker = broker_factory("--retry-base", str(RETRY_BASE_S))
    retries = 4
    tid, delays_ms = _id_with_growing_backoff(RetryPolicy(base_s=RETRY_BASE_S), retries)
    record = tmp_path / "runs.jsonl"
    start_worker(broker.url, "--concurrency", "1", app=HANDLERS_APP)
    with Client(broker.url) as c:
        c.submit(
            "test.record", {"file": str(record), "fail": True}, max_retries=retries, task_id=tid
        )
        info = c.wait(tid, timeout_s=20)

        assert info.state == "dead"
        assert info.attempt == retries + 1
        assert info.error is not None
        assert info.error.type == "RuntimeError"
        assert f"recorded failure on run {retries + 1}" in info.error.message
        assert "Traceback" in info.error.traceback

        runs = read_runs(record)
        assert len(runs) == retries + 1
        times = [r["t"] for r in runs]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for gap, delay_ms in zip(gaps, delays_ms, strict=True):
            assert gap >= delay_ms / 1000 - 0.003, (gaps, delays_ms)
            assert gap < delay_ms / 1000 + 2.0, (gaps, delays_ms)
        # Each gap is at least its delay, and the delays grow: the backoff grows. (The gaps
        # themselves are not compared: a scheduling pause longer than the 51 ms between two
        # delays would reorder them on a loaded machine.)
        assert all(b > a for a, b in itertools.pairwise(delays_ms)), delays_ms

        assert tid in [t.id for t in c.list("dead")]
        assert c.list("pending") == []
        stats = c.stats()
        assert stats["states"] == NO_TASKS | {"dead": 1}
        assert stats["counters"]["retried"] == retries
        assert stats["counters"]["dead_lettered"] == 1


def test_task_that_fails_twice_then_succeeds_completes(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker, tmp_path: Path
) -> None:
    broker = broker_factory("--retry-base", str(RETRY_BASE_S))
    record = tmp_path / "runs.jsonl"
    start_worker(broker.url, app=HANDLERS_APP)
    with Client(broker.url) as c:
        tid = c.submit("test.record", {"file": str(record), "fail_times": 2}, max_retries=3)
        info = c.wait(tid, timeout_s=20)
        assert info.state == "completed"
        assert info.attempt == 3
        assert info.result == {"runs": 3, "tag": None}
        assert len(read_runs(record)) == 3


def test_raising_handler_with_no_retries_goes_straight_to_dead(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    start_worker(broker.url, app=HANDLERS_APP)
    with Client(broker.url) as c:
        tid = c.submit("test.boom", {"why": "testing"}, max_retries=0)
        info = c.wait(tid, timeout_s=10)
        assert info.state == "dead"
        assert info.attempt == 1
        assert info.error is not None
        assert info.error.type == "ValueError"
        assert "boom" in info.error.message


def test_task_without_a_handler_dead_letters_with_unknown_task(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    start_worker(broker.url)
    with Client(broker.url) as c:
        tid = c.submit("no.such.handler", {}, max_retries=0)
        info = c.wait(tid, timeout_s=10)
        assert info.state == "dead"
        assert info.error is not None
        assert info.error.type == "UnknownTask"


def test_handler_exceeding_its_timeout_fails_with_timeout(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    start_worker(broker.url)
    with Client(broker.url) as c:
        tid = c.submit("sleep", 30, timeout_s=0.2, max_retries=0)
        info = c.wait(tid, timeout_s=10)
        assert info.state == "dead"
        assert info.error is not None
        assert info.error.type == "TIMEOUT"


def test_sync_handler_past_its_timeout_fails_and_frees_its_slot(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    start_worker(broker.url, "-c", "1", app=HANDLERS_APP)
    with Client(broker.url) as c:
        stuck = c.submit("test.slow_sync", 5, timeout_s=0.3, max_retries=0)
        info = c.wait(stuck, timeout_s=10)
        assert info.state == "dead"
        assert info.error is not None
        assert info.error.type == "TIMEOUT"
        # The thread still sleeps, but the worker's only slot is free again.
        nxt = c.submit("echo", {"after": "timeout"})
        assert c.wait(nxt, timeout_s=3).result == {"after": "timeout"}


def test_cancel_pending_task(
    broker: BrokerProcess, start_worker: StartWorker, tmp_path: Path
) -> None:
    record = tmp_path / "runs.jsonl"
    with Client(broker.url) as c:
        keep = c.submit("echo", "keep")
        tid = c.submit("test.record", {"file": str(record)})
        cancelled = c.cancel(tid)
        assert cancelled.id == tid
        assert cancelled.state == "cancelled"
        assert c.status(tid).state == "cancelled"
        assert c.wait(tid, timeout_s=1).state == "cancelled"  # already final: no waiting
        with pytest.raises(InvalidState):
            c.cancel(tid)
        assert [t.id for t in c.list("cancelled")] == [tid]
        assert [t.id for t in c.list("pending")] == [keep]

        wait_exit(start_worker(broker.url, "--burst", app=HANDLERS_APP))
        assert read_runs(record) == []  # the cancelled task never ran
        assert c.status(tid).state == "cancelled"
        assert c.status(keep).state == "completed"
        assert states(c) == NO_TASKS | {"completed": 1, "cancelled": 1}


def test_cancel_task_waiting_for_its_retry(
    broker: BrokerProcess, start_worker: StartWorker, tmp_path: Path
) -> None:
    record = tmp_path / "runs.jsonl"
    start_worker(broker.url, app=HANDLERS_APP)
    with Client(broker.url) as c:
        # backoff_s=60: after the first failure the task waits in "failed" for a minute.
        tid = c.submit("test.record", {"file": str(record), "fail": True}, backoff_s=60)
        wait_until(lambda: c.status(tid).state == "failed", what="first failure")
        assert c.cancel(tid).state == "cancelled"
        assert c.wait(tid, timeout_s=1).state == "cancelled"
        assert len(read_runs(record)) == 1
        assert states(c) == NO_TASKS | {"cancelled": 1}


def test_cannot_cancel_running_task(broker: BrokerProcess, start_worker: StartWorker) -> None:
    start_worker(broker.url)
    with Client(broker.url) as c:
        tid = c.submit("sleep", 30)
        wait_until(lambda: c.status(tid).state == "running", what="task running")
        with pytest.raises(InvalidState):
            c.cancel(tid)
        assert c.status(tid).state == "running"
        assert [t.id for t in c.list("running")] == [tid]
        assert c.list("pending") == []
        assert states(c) == NO_TASKS | {"running": 1}


def test_batch_of_1000_drained_by_burst_worker(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    n = 1000
    with Client(broker.url) as c:
        ids = c.submit_batch("echo", [{"i": i} for i in range(n)])
        assert len(ids) == n
        assert len(set(ids)) == n
        assert states(c) == NO_TASKS | {"pending": n}

        wait_exit(start_worker(broker.url, "--burst", "--concurrency", "32"))

        assert states(c) == NO_TASKS | {"completed": n}
        done = c.list("completed", limit=n)
        assert sorted(t.result["i"] for t in done) == list(range(n))
        assert c.status(ids[0]).result == {"i": 0}
        assert c.status(ids[-1]).result == {"i": n - 1}
        assert c.stats()["counters"]["completed"] == n


def test_retention_removes_completed_tasks_in_the_background(
    broker_factory: Callable[..., BrokerProcess], start_worker: Callable[..., WorkerProcess]
) -> None:
    broker = broker_factory("--retention", "0.3", "--retention-interval", "0.2")
    start_worker(broker.url, "-c", "2")
    with broker.client() as c:
        tid = c.submit("echo", {"old": True})
        assert c.wait(tid, timeout_s=10).state == "completed"

        def gone() -> bool:
            try:
                c.status(tid)
            except TaskNotFound:
                return True
            return False

        wait_until(gone, timeout=10, what="retention to delete the completed task")
        assert c.stats()["states"]["completed"] == 0


def test_a_burst_worker_waits_for_retries_of_its_queues_but_not_of_paused_ones(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker, tmp_path: Path
) -> None:
    """`--burst` left as soon as nothing was ready: a task failing once was left waiting out
    its backoff, unfinished, when the burst ended."""
    broker = broker_factory()
    with Client(broker.url) as c:
        payload = {"file": str(tmp_path / "runs.jsonl"), "fail_times": 1}
        tid = c.submit("test.record", payload, max_retries=2, backoff_s=1.0)
        worker = start_worker(broker.url, "--burst", app=HANDLERS_APP)
        assert worker.wait(30) == 0, worker.describe()
        info = c.status(tid)
        assert info.state == "completed", info
        assert info.attempt == 2

        # A paused queue's retries cannot be claimed: the burst ends without them.
        first = start_worker(broker.url, "-q", "held", app=HANDLERS_APP)
        held = c.submit(
            "test.record",
            {"file": str(tmp_path / "held.jsonl"), "fail_times": 1},
            queue="held",
            max_retries=2,
            backoff_s=60.0,
        )
        wait_until(lambda: c.status(held).state == "failed", 20, what="the first failure")
        stop_worker(first)
        c.pause_queue("held")
        worker = start_worker(broker.url, "--burst", "-q", "held", app=HANDLERS_APP)
        assert worker.wait(30) == 0, worker.describe()
        assert c.status(held).state == "failed"
