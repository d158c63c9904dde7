"""The blocking ``Client`` runs its event loop in the calling threads (tq/client/sync.py,
``_Driver``): no thread of its own, threads sharing one client all get answers at once, the loop
passes from a thread whose call ended to one whose call is still open, a call from inside a
running event loop still works, and a connection the broker dropped between calls is replaced by
the next call. Against a real broker process."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tq import Client

from tests.conftest import BrokerProcess, wait_until


def _in_thread(fn: object) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a thread; what it returned or raised ends up in the list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())  # type: ignore[operator]
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_the_client_starts_no_thread_of_its_own(broker: BrokerProcess) -> None:
    before = {t.ident for t in threading.enumerate()}
    with Client(broker.url) as c:
        tid = c.submit("echo", 1)
        assert c.status(tid).state == "pending"
        assert {t.ident for t in threading.enumerate()} == before
    assert {t.ident for t in threading.enumerate()} == before


def test_threads_sharing_a_client_all_get_their_answers(broker: BrokerProcess) -> None:
    with Client(broker.url) as c, ThreadPoolExecutor(8) as pool:

        def work(n: int) -> list[str]:
            ids = [c.submit("echo", {"thread": n, "i": i}) for i in range(25)]
            assert all(c.status(tid).state == "pending" for tid in ids)
            return ids

        ids = [tid for batch in pool.map(work, range(8)) for tid in batch]
        assert len(set(ids)) == 200
        assert c.stats()["states"]["pending"] == 200


def test_a_thread_blocked_in_a_long_call_does_not_hold_up_the_others(
    broker: BrokerProcess,
) -> None:
    """A ``wait`` parked at the broker for a long time, in the thread that runs the loop: the
    other threads' requests ride along on it and are answered at once."""
    with Client(broker.url, timeout_s=30.0) as c:
        parked = c.submit("sleep", 100)  # no worker: it stays pending
        waiter, result = _in_thread(lambda: c.wait(parked, timeout_s=30))
        wait_until(lambda: c.stats()["counters"]["waits"] == 1, what="the wait parked")
        started = time.monotonic()
        submitted = [c.submit("echo", i) for i in range(20)]
        assert time.monotonic() - started < 5.0
        assert len(set(submitted)) == 20
        assert waiter.is_alive()  # still waiting: the submits did not end it
        c.cancel(parked)
        waiter.join(10)
        assert not waiter.is_alive()
        assert getattr(result[0], "state", None) == "cancelled", result


def test_the_loop_passes_to_a_thread_whose_call_is_still_open(broker: BrokerProcess) -> None:
    """Two threads each waiting: the one that runs the loop is answered first and leaves; the
    other's request must still be answered, with no other call on this client to run the loop
    for it (the cancels come through a second client)."""
    with Client(broker.url, timeout_s=30.0) as c, Client(broker.url) as other:
        first, second = c.submit("sleep", 100), c.submit("sleep", 100)
        a, a_result = _in_thread(lambda: c.wait(first, timeout_s=30))
        wait_until(lambda: other.stats()["counters"]["waits"] == 1, what="the first wait parked")
        b, b_result = _in_thread(lambda: c.wait(second, timeout_s=30))
        wait_until(lambda: other.stats()["counters"]["waits"] == 2, what="the second wait parked")
        other.cancel(first)
        a.join(10)
        assert not a.is_alive()
        assert getattr(a_result[0], "state", None) == "cancelled", a_result
        other.cancel(second)
        b.join(10)
        assert not b.is_alive(), "the second waiter was left without anyone running the loop"
        assert getattr(b_result[0], "state", None) == "cancelled", b_result


async def test_a_call_from_inside_a_running_event_loop_works(broker: BrokerProcess) -> None:
    """This thread's loop is running (this test is a coroutine): the client's own loop cannot
    run here as well, so the call goes through a helper thread."""
    with Client(broker.url) as c:
        tid = c.submit("echo", 1)
        assert c.status(tid).state == "pending"


def test_a_connection_dropped_between_calls_is_replaced_by_the_next_call(
    broker: BrokerProcess,
) -> None:
    """Nothing runs the loop between calls, so nothing sees the broker go away then: the next
    call finds the connection closed, connects again and is answered."""
    with Client(broker.url, timeout_s=10.0) as c:
        before = c.submit("echo", 1)
        broker.kill()
        broker.restart()
        after = c.submit("echo", 2)
        assert c.status(before).state == "pending"
        assert c.status(after).state == "pending"


def test_a_request_not_safe_to_repeat_goes_on_a_new_connection_after_a_restart(
    broker: BrokerProcess,
) -> None:
    """A cancel is not resent after a lost connection (it may have been applied). The broker
    restarted between two calls, and nobody ran the loop meanwhile to see its connection close:
    the cancel must not be sent on the dead connection (and fail), but on a new one."""
    with Client(broker.url, timeout_s=10.0) as c:
        tid = c.submit("echo", 1)
        broker.kill()
        broker.restart()
        assert c.cancel(tid).state == "cancelled"
