"""Worker bugs found in review, against real ``tq broker`` and ``tq worker`` processes (the
same bugs in-process: tests/worker/test_review_fixes.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tq import AsyncClient, Client
from tq.errors import PayloadTooLarge
from tq.model import MAX_PAYLOAD_BYTES
from tq.protocol.messages import Ack, ClaimTask, Leased, Outcome, ResultBatch

from tests.apps.review_handlers import most_at_once, read_events
from tests.conftest import (
    HANDLERS_APP,
    ROOT,
    BrokerProcess,
    WorkerProcess,
    one_line_error,
    subprocess_env,
    wait_until,
)

REVIEW_APP = str(ROOT / "tests" / "apps" / "review_handlers.py")

StartWorker = Callable[..., WorkerProcess]


# --- 1. a result between the broker's result limit (10 MiB) and its frame limit (16 MiB) --------


def test_a_result_over_10_mib_fails_result_too_large_and_later_results_complete(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    """The worker fitted results to the frame limit only; the broker refused the whole batch,
    the worker resent it every second with every later result in it: none was ever recorded."""
    start_worker(broker.url, "-c", "4", app=REVIEW_APP)
    with Client(broker.url) as c:
        big = c.submit("review.big_result", {"n": 11 * 1024 * 1024}, max_retries=0)
        info = c.wait(big, timeout_s=10)
        assert info.state == "dead", info
        assert info.error is not None
        assert info.error.type == "ResultTooLarge"
        later = [c.submit("echo", {"i": i}) for i in range(5)]
        assert [c.wait(t, timeout_s=10).state for t in later] == ["completed"] * 5


async def test_the_broker_refuses_only_the_result_over_the_limit_not_its_batch(
    broker: BrokerProcess,
) -> None:
    async with AsyncClient(broker.url) as producer:
        small, big = await producer.submit("echo", 1), await producer.submit("echo", 2)
    worker = AsyncClient(
        broker.url,
        role="worker",
        client_id="raw-worker",
        hello_extra={"concurrency": 2, "queues": ["default"]},
    )
    async with worker:
        leased = await worker.call(
            lambda rid: ClaimTask(rid, ["default"], 2, 0), Leased, retry=False
        )
        tokens = {lt.task.id: lt.token for lt in leased.tasks}
        assert set(tokens) == {small, big}
        batch = [
            Outcome(small, tokens[small], True, result=b'"fine"'),
            Outcome(big, tokens[big], True, result=b'"' + b"y" * MAX_PAYLOAD_BYTES + b'"'),
        ]
        ack = await worker.call(lambda rid: ResultBatch(rid, batch), Ack, retry=False)
        assert ack.ids == [small]
        assert ack.rejected == [(big, PayloadTooLarge.code)]
        # Only the big one: alone in its batch, it gets the same answer.
        alone = await worker.call(lambda rid: ResultBatch(rid, batch[1:]), Ack, retry=False)
        assert (alone.ids, alone.rejected) == ([], [(big, PayloadTooLarge.code)])
    with Client(broker.url) as c:
        assert c.status(small).state == "completed"
        assert c.status(small).result == "fine"


# --- 2. sync handlers claimed together run at once ----------------------------------------------


def test_sync_handlers_claimed_together_each_get_a_thread(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    """Four 1 s sync tasks on a -c 4 worker whose pool had one idle thread ran one after the
    other: three of them failed TIMEOUT (1.5 s) without having run that long."""
    start_worker(broker.url, "-c", "4", app=HANDLERS_APP)
    with Client(broker.url) as c:
        assert c.wait(c.submit("test.slow_sync", 0), timeout_s=10).state == "completed"
        ids = c.submit_batch("test.slow_sync", [1.0] * 4, max_retries=0, timeout_s=1.5)
        infos = [c.wait(t, timeout_s=10) for t in ids]
    assert [(i.state, i.error) for i in infos] == [("completed", None)] * 4


# --- 3. what a sync handler raises --------------------------------------------------------------


def test_stop_iteration_and_generator_exit_from_sync_handlers_are_their_own_failures(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    """StopIteration waited out the whole timeout (TIMEOUT); GeneratorExit was INTERNAL."""
    start_worker(broker.url, app=REVIEW_APP)
    with Client(broker.url) as c:
        stop = c.submit("review.stop_iteration", [], max_retries=0, timeout_s=30)
        closing = c.submit("review.generator_exit", None, max_retries=0, timeout_s=30)
        first = c.wait(closing, timeout_s=5)
        assert first.error is not None
        assert (first.error.type, first.error.message) == ("GeneratorExit", "closing")
        assert "review_handlers.py" in first.error.traceback
        second = c.wait(stop, timeout_s=5)  # not its timeout of 30 s
        assert second.error is not None
        assert second.error.type == "StopIteration"
        assert "next(iter(payload or []))" in second.error.traceback


# --- 4. --burst and a task submitted while another runs -----------------------------------------


def test_a_burst_worker_runs_a_task_submitted_while_another_ran(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    with Client(broker.url) as c:
        first = c.submit("sleep", 1.0)
        worker = start_worker(broker.url, "-c", "2", "--burst")
        wait_until(lambda: c.status(first).state == "running", what="the first task to start")
        second = c.submit("echo", {"x": 1})
        assert worker.wait(20) == 0, worker.describe()
        assert c.status(first).state == "completed"
        assert c.status(second).state == "completed"


# --- 5. a broker started afresh on the same address hands out the same tokens --------------------


def test_runs_from_a_former_broker_count_and_are_cancelled_whatever_their_tokens(
    broker: BrokerProcess, start_worker: StartWorker, tmp_path: Path
) -> None:
    """Keyed by fencing token, a lease from the fresh broker overwrote a run from the old one
    with the same token: that run no longer counted against -c, nor was listed in heartbeats,
    so it was never cancelled as lease-lost (three runs at once on a -c 2 worker)."""
    events = str(tmp_path / "events.jsonl")
    start_worker(broker.url, "-c", "2", "--heartbeat", "0.2", app=REVIEW_APP)
    with Client(broker.url) as c:
        c.submit("review.track", {"file": events, "k": "old", "s": 30})
    wait_until(lambda: read_events(events), what="the first broker's task to start")
    broker.kill()
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    fresh = BrokerProcess(workdir)  # a new data dir: its tokens start at 1 again
    try:
        fresh.start(port=broker.port)
        with Client(fresh.url) as c:
            new = [
                c.submit("review.track", {"file": events, "k": f"new{i}", "s": 0.5}) for i in (0, 1)
            ]
            assert [c.wait(t, timeout_s=15).state for t in new] == ["completed"] * 2
    finally:
        fresh.close()
    seen = read_events(events)
    assert ("old", "cancelled") in seen, seen
    assert most_at_once(seen) <= 2, seen


# --- 6. a worker the broker will not have -------------------------------------------------------


def _tq_worker(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tq", "worker", "--broker", url, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=subprocess_env(**env),
        check=False,
    )


def test_an_invalid_queue_name_is_a_usage_error(broker: BrokerProcess) -> None:
    """It was sent in the hello, refused, and retried forever ("cannot reach a broker")."""
    line = one_line_error(_tq_worker(broker.url, "--burst", "-q", "bad queue!"), code=2)
    assert line == "tq: --queue 'bad queue!' must be 1-200 of A-Za-z0-9_.:-"
    too_many = [arg for i in range(101) for arg in ("-q", f"q{i}")]
    line = one_line_error(_tq_worker(broker.url, "--burst", *too_many), code=2)
    assert "at most 100 queues" in line


def test_a_worker_with_a_wrong_token_says_so_and_exits_1(broker_with_token: str) -> None:
    """UNAUTHENTICATED was retried forever, as if the broker could not be reached."""
    line = one_line_error(_tq_worker(broker_with_token, "--burst", TQ_TOKEN="wrong"), code=1)
    assert line.startswith("tq: UNAUTHENTICATED: ")
    assert _tq_worker(broker_with_token, "--burst", TQ_TOKEN="s3cret").returncode == 0


# --- 7. results JSON cannot carry ---------------------------------------------------------------


def test_results_json_cannot_carry_are_result_not_serializable(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    """A self-referencing result was INTERNAL ('maximum recursion depth exceeded'); NaN and
    infinity completed the task with null in their place."""
    start_worker(broker.url, app=REVIEW_APP)
    with Client(broker.url) as c:
        for name in ("review.self_ref", "review.non_finite"):
            info = c.wait(c.submit(name, None, max_retries=0), timeout_s=10)
            assert info.error is not None, (name, info)
            assert info.error.type == "ResultNotSerializable", (name, info.error)
        info = c.wait(c.submit("review.nulls", None), timeout_s=10)
        assert info.state == "completed"
        assert info.result == {"none": None, "x": 1.5, "text": "null"}
