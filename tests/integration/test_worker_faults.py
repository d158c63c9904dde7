"""Whatever a handler does, it costs only its own task: the worker stays up, its slots and
threads come back, and every other task it holds carries on. Found by a review that made
handlers misbehave on purpose; before the fixes each of these kept a task ``running`` forever,
killed the worker, re-ran a task without end, or made the worker lose its connection (and all
its leases) once a second. Handlers: tests/apps/faulty.py."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from tq import AsyncClient, Client
from tq.errors import BadRequest, BrokerUnavailable, FrameTooLarge, WaitTimeout

from tests.conftest import ROOT, BrokerProcess, WorkerProcess, wait_until

StartWorker = Callable[..., WorkerProcess]
FAULTY_APP = str(ROOT / "tests" / "apps" / "faulty.py")


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("name", "error_type", "message"),
    [
        ("faulty.base_exception", "Fatal", "below Exception"),
        ("faulty.unprintable", "Unprintable", "Unprintable()"),
        ("faulty.sys_exit", "SystemExit", "2"),
        ("faulty.async_sys_exit", "SystemExit", "3"),
        ("faulty.keyboard_interrupt", "KeyboardInterrupt", ""),
        ("faulty.cancelled", "CancelledError", ""),
        ("faulty.own_timeout", "TimeoutError", "the handler's own call timed out"),
        ("faulty.unserializable", "ResultNotSerializable", "the handler's result"),
    ],
)
def test_a_misbehaving_handler_fails_its_own_task_only(
    broker: BrokerProcess, start_worker: StartWorker, name: str, error_type: str, message: str
) -> None:
    worker = start_worker(broker.url, "-c", "2", app=FAULTY_APP)
    with Client(broker.url) as c:
        bad = c.submit(name, None, max_retries=0)
        info = c.wait(bad, timeout_s=20)
        assert info.state == "dead", info
        assert info.attempt == 1  # reported once, not re-run
        assert info.error is not None
        assert info.error.type == error_type
        assert message in info.error.message
        if error_type not in {"ResultNotSerializable"}:
            assert info.error.traceback, "the traceback is kept"
        # The worker is alive and its slot came back: the next task runs.
        assert c.wait(c.submit("faulty.quick", {"n": 1}), timeout_s=20).result == {"n": 1}
    assert worker.poll() is None


def test_a_result_or_error_over_the_frame_limit_fails_that_task_only(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker
) -> None:
    broker = broker_factory("--max-frame", "65536")
    start_worker(broker.url, "-c", "4", app=FAULTY_APP)
    with Client(broker.url) as c:
        slow = c.submit("sleep", {"seconds": 2})  # runs beside them on the same connection
        big = c.submit("faulty.big_result", {"bytes": 200_000}, max_retries=0)
        err = c.submit("faulty.big_error", {"bytes": 200_000}, max_retries=0)
        big_info = c.wait(big, timeout_s=20)
        err_info = c.wait(err, timeout_s=20)
        slow_info = c.wait(slow, timeout_s=20)
    assert big_info.state == "dead"
    assert big_info.error is not None
    assert big_info.error.type == "ResultTooLarge"
    assert "frame limit of 65536" in big_info.error.message
    # A huge error message is cut, not refused: the error itself is reported.
    assert err_info.state == "dead"
    assert err_info.error is not None
    assert err_info.error.type == "ValueError"
    assert "more chars]" in err_info.error.message
    assert (slow_info.state, slow_info.attempt) == ("completed", 1)
    assert len(broker.events("worker.connected")) == 1, "the worker lost its connection"


def test_handler_threads_stuck_past_their_timeout_delay_sync_tasks_instead_of_failing_them(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    # -c 1: two handler threads. Two blocking handlers time out after 0.5 s and keep both
    # threads for 3 s; a sync task claimed meanwhile would wait for a thread while its own
    # timeout runs, and die of TIMEOUT without ever starting.
    start_worker(broker.url, "-c", "1", app=FAULTY_APP)
    with Client(broker.url) as c:
        stuck = [
            c.submit("faulty.hang", {"seconds": 3}, max_retries=0, timeout_s=0.5) for _ in range(2)
        ]
        for tid in stuck:
            info = c.wait(tid, timeout_s=20)
            assert info.error is not None
            assert info.error.type == "TIMEOUT"
        quick = c.submit("faulty.quick", "after", max_retries=0, timeout_s=1)
        info = c.wait(quick, timeout_s=20)
    assert (info.state, info.attempt, info.result) == ("completed", 1, "after")


@pytest.mark.parametrize("name", ["faulty.wrapped_async", "faulty.async_callable"])
def test_async_handlers_behind_decorators_or_in_objects_are_awaited(
    broker: BrokerProcess, start_worker: StartWorker, name: str
) -> None:
    start_worker(broker.url, app=FAULTY_APP)
    with Client(broker.url) as c:
        info = c.wait(c.submit(name, 7, max_retries=0), timeout_s=20)
    assert info.state == "completed", info
    assert info.result in ({"awaited": 7}, {"called": 7})


def test_an_oversized_request_fails_alone_and_the_connection_stays(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory("--max-frame", "65536")

    async def go() -> None:
        async with AsyncClient(broker.url) as c:
            tid = await c.submit("sleep", {"seconds": 1})  # no worker: it stays pending
            waiting = asyncio.ensure_future(c.wait(tid, timeout_s=1.5))
            with pytest.raises(FrameTooLarge, match="over the broker's frame limit of 65536"):
                await c.submit("echo", "z" * 100_000)
            # The request in flight beside it ran its course: its own timeout, not a lost
            # connection.
            with pytest.raises(WaitTimeout):
                await waiting
            assert c.connected
            assert await c.submit("echo", "small")

    asyncio.run(go())


def test_a_failed_client_leaves_no_thread_behind() -> None:
    before = threading.active_count()
    url = f"tcp://127.0.0.1:{unused_port()}"  # nothing listens there
    for _ in range(5):
        with pytest.raises(BrokerUnavailable), Client(url, connect_timeout_s=0.2):
            pass
    with pytest.raises((ValueError, BadRequest)):
        Client("nonsense://here")
    assert threading.active_count() == before


def test_closing_a_client_twice_is_harmless(broker: BrokerProcess) -> None:
    c = Client(broker.url)
    with c:
        c.submit("echo", 1)
    c.close()  # a second time


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"priority": 0.5}, "priority"),
        ({"priority": True}, "priority"),
        ({"payload": "\ud800"}, "JSON"),
        ({"task_id": ""}, "id"),
    ],
)
def test_bad_submit_arguments_are_bad_requests(
    broker: BrokerProcess, kwargs: dict[str, object], match: str
) -> None:
    payload = kwargs.pop("payload", None)
    with Client(broker.url) as c, pytest.raises(BadRequest, match=match):
        c.submit("echo", payload, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout_s", [float("inf"), float("nan"), -1.0])
def test_bad_wait_timeouts_are_bad_requests(broker: BrokerProcess, timeout_s: float) -> None:
    with Client(broker.url) as c:
        tid = c.submit("echo", 1)
        with pytest.raises(BadRequest, match="timeout_s"):
            c.wait(tid, timeout_s=timeout_s)


def test_a_run_times_out_by_its_own_deadline_when_a_new_broker_reuses_its_token(
    tmp_path: Path, start_worker: StartWorker
) -> None:
    """Lease tokens are unique per broker only. The worker kept deadlines by token: after its
    broker was replaced by a fresh one on the same address (tokens from 1 again), the old run's
    6 s deadline cancelled the new run, whose timeout was 60 s, and the old run never timed
    out."""
    first = BrokerProcess(tmp_path / "a", "--lease", "120", "--heartbeat-timeout", "120")
    (tmp_path / "a").mkdir()
    first.start()
    port = first.port
    second: BrokerProcess | None = None
    try:
        start_worker(first.url, "-c", "4")
        with first.client() as c:
            old = c.submit("sleep", 100, timeout_s=1.5, max_retries=0)
            wait_until(lambda: c.status(old).state == "running", what="the old run started")
        first.kill()
        (tmp_path / "b").mkdir()
        second = BrokerProcess(tmp_path / "b").start(port)  # a fresh store: token 1 again
        with second.client() as c:
            new = c.submit("sleep", 3, timeout_s=60, max_retries=0)
            info = c.wait(new, timeout_s=30)
        assert info.state == "completed", info.error
    finally:
        first.close()
        if second is not None:
            second.close()
