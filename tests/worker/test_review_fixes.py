"""Worker bugs found in review, each pinned in-process (the same bugs against real processes:
tests/integration/test_worker_review.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from tq.client import encode_payload
from tq.client.values import non_finite
from tq.errors import BadRequest, BrokerUnavailable, PayloadTooLarge, TqError
from tq.model import MAX_PAYLOAD_BYTES, Task
from tq.protocol.messages import LeasedTask, Outcome
from tq.worker import outcomes
from tq.worker.deadlines import Deadlines
from tq.worker.registry import Registry
from tq.worker.runner import Worker
from tq.worker.threads import DaemonThreadPool

FRAME = 16 * 1024 * 1024

# --- the thread pool: one thread reserved per submit ---------------------------------------------


def _wait_free(pool: DaemonThreadPool, n: int) -> None:
    deadline = time.monotonic() + 5
    while pool.free != n:
        assert time.monotonic() < deadline, f"pool.free is {pool.free}, not {n}"
        time.sleep(0.005)


def test_submits_in_a_row_each_get_a_thread_of_their_own() -> None:
    """An idle thread stayed counted as idle until it woke: the submits of one loop iteration
    all saw it, started no thread, and ran one after another on it while their timeouts ran."""
    pool = DaemonThreadPool(8)
    try:
        pool.submit(lambda: None).result(5)
        _wait_free(pool, 8)  # one thread, idle
        together = threading.Barrier(4, timeout=3)
        futures = [pool.submit(together.wait) for _ in range(4)]
        assert pool.free == 4  # reserved at submit, not when a thread wakes up
        for f in futures:
            f.result(5)  # BrokenBarrierError if they did not all run at once
        _wait_free(pool, 8)
    finally:
        pool.shutdown(wait=False)


def test_work_submitted_while_every_thread_is_busy_runs_when_one_is_free() -> None:
    pool = DaemonThreadPool(2)
    release = threading.Event()
    try:
        busy = [pool.submit(release.wait, 5) for _ in range(2)]
        assert pool.free == 0
        queued = [pool.submit(lambda i=i: i) for i in range(3)]
        release.set()
        assert [f.result(5) for f in busy] == [True, True]
        assert [f.result(5) for f in queued] == [0, 1, 2]
        _wait_free(pool, 2)  # every thread idle again, none counted twice
    finally:
        pool.shutdown(wait=False)


# --- a result over the broker's result limit ----------------------------------------------------


def test_a_result_over_the_result_limit_but_within_the_frame_is_result_too_large() -> None:
    big = Outcome("big", 2, True, result=b"y" * (MAX_PAYLOAD_BYTES + 1))
    fitted = outcomes.fit(big, FRAME)
    assert fitted.error is not None
    assert fitted.error.type == "ResultTooLarge"
    assert str(MAX_PAYLOAD_BYTES) in fitted.error.message
    at_limit = Outcome("ok", 3, True, result=b"y" * MAX_PAYLOAD_BYTES)
    assert outcomes.fit(at_limit, FRAME) is at_limit

    small = Outcome("small", 1, True, result=b"1")
    parts = outcomes.prepare([small, big], FRAME)
    flat = [o for part in parts for o in part]
    assert flat[0] is small
    assert flat[1].error is not None
    assert flat[1].error.type == "ResultTooLarge"


class _RefusingClient:
    """Answers every call with ``error``."""

    def __init__(self, error: TqError) -> None:
        self.error = error
        self.calls = 0
        self.welcome = None

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise self.error


@pytest.mark.parametrize(
    ("error", "kept"),
    [
        (PayloadTooLarge("result of t1 exceeds 10485760"), False),
        (BadRequest("a result batch holds at most 10000 outcomes"), False),
        (BrokerUnavailable("connection lost"), True),
    ],
)
async def test_a_report_refused_for_what_it_holds_is_dropped_not_resent(
    error: TqError, kept: bool
) -> None:
    """A refused batch was put back and resent every second, forever, and every result finished
    meanwhile joined it: one bad result stopped every later result of the worker."""
    w = Worker("tcp://127.0.0.1:1")
    client = _RefusingClient(error)
    w._client = client  # type: ignore[assignment]
    batch = [Outcome("t1", 1, True, result=b"1"), Outcome("t2", 2, True, result=b"2")]
    await w._report(batch)
    assert client.calls == 1
    assert w._results == (batch if kept else [])  # only a transient error keeps them


# --- sync handlers: what they raise, raised on the loop ------------------------------------------


async def _run_sync(fn: Callable[[Any], Any], payload: bytes = b"[]") -> Outcome:
    """``fn`` run as the handler of one leased task (timeout 2 s), the way the worker does."""
    handlers = Registry()
    handlers.register("h", fn)
    w = Worker("tcp://127.0.0.1:1", handlers=handlers)
    loop = asyncio.get_running_loop()
    w._loop = loop
    w._deadlines = Deadlines(loop, w._expire)
    w._pool = DaemonThreadPool(2)
    lt = LeasedTask(Task("t1", "h", "default", 1, "running", payload, timeout_s=2.0), 7, 30_000)

    async def execute() -> Outcome:  # awaited from another coroutine, as ``_execute`` does
        return await w._call_handler(lt, 1)

    try:
        return await asyncio.wait_for(execute(), 4)
    finally:
        w._deadlines.close()
        w._pool.shutdown(wait=False)


def _first_item(payload: Any) -> Any:
    return next(iter(payload))


def _closing(payload: Any) -> Any:
    raise GeneratorExit("closing")


def _value_error(payload: Any) -> Any:
    raise ValueError("plain")


async def test_stop_iteration_from_a_sync_handler_fails_the_attempt_at_once() -> None:
    """asyncio cannot set StopIteration on a future: the run waited out its whole timeout and
    was reported as TIMEOUT."""
    started = time.monotonic()
    out = await _run_sync(_first_item)
    assert time.monotonic() - started < 1.5
    assert out.error is not None
    assert out.error.type == "StopIteration"
    assert "_first_item" in out.error.traceback  # the handler's own frames are kept
    assert "next(iter(payload))" in out.error.traceback


async def test_generator_exit_from_a_sync_handler_is_its_own_failure() -> None:
    out = await _run_sync(_closing)
    assert out.error is not None
    assert (out.error.type, out.error.message) == ("GeneratorExit", "closing")
    assert "_closing" in out.error.traceback


async def test_other_sync_handler_exceptions_and_results_are_as_before() -> None:
    out = await _run_sync(_value_error)
    assert out.error is not None
    assert (out.error.type, out.error.message) == ("ValueError", "plain")
    assert "_value_error" in out.error.traceback
    ok = await _run_sync(lambda p: {"got": p}, b'{"a": 1}')
    assert ok.ok
    assert ok.result == b'{"got":{"a":1}}'


# --- results JSON cannot carry -------------------------------------------------------------------


def test_a_self_referencing_value_is_not_serializable_not_a_recursion_error() -> None:
    d: dict[str, Any] = {}
    d["d"] = d
    with pytest.raises(BadRequest, match="not JSON-serializable"):
        encode_payload(d)


@pytest.mark.parametrize("value", [float("nan"), {"a": [1, float("-inf")]}])
def test_a_payload_holding_nan_or_infinity_is_refused_not_sent_as_null(value: Any) -> None:
    """msgspec writes NaN and infinity as null: the handler got null in their place."""
    with pytest.raises(BadRequest, match="holds NaN or infinity"):
        encode_payload(value)


def _self_ref(payload: Any) -> Any:
    d: dict[str, Any] = {}
    d["d"] = d
    return d


async def test_a_self_referencing_result_is_result_not_serializable() -> None:
    out = await _run_sync(_self_ref)
    assert out.error is not None
    assert out.error.type == "ResultNotSerializable"


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        {"a": [1, {"b": float("-inf")}], "c": None},
        [2**70, float("nan")],
    ],
)
def test_non_finite_finds_nan_and_infinity(value: Any) -> None:
    assert non_finite(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        {"a": None, "b": 1.5, "c": "null"},
        b"\xcb\x7f\xf0 bytes that look like a msgpack NaN",
        ["\x7f\U0001f600" + "x" * 202],  # a str header and text that look like one too
        [2**70, None],
    ],
)
def test_non_finite_passes_what_json_can_carry(value: Any) -> None:
    assert not non_finite(value)


async def test_a_result_holding_nan_or_infinity_is_not_completed_with_null() -> None:
    out = await _run_sync(lambda p: {"mean": float("nan"), "max": float("inf")})
    assert out.error is not None
    assert out.error.type == "ResultNotSerializable"
    assert "NaN" in out.error.message
    ok = await _run_sync(lambda p: {"none": None, "x": 0.5})
    assert ok.result == b'{"none":null,"x":0.5}'
