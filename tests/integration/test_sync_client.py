"""The blocking ``Client`` runs its event loop in the calling threads (tq/client/sync.py,
``_Driver``): no thread of its own for calls from other threads than the main one, threads
sharing one client all get answers at once, the loop passes from a thread whose call ended to one
whose call is still open, the main thread runs the loop too with Ctrl-C deferred (a Ctrl-C, or a
storm of them, cancels the call from inside the loop), the main thread under a Ctrl-C handler of
its own and threads with a running event loop hand their calls to a helper (Ctrl-C there
withdraws a wait, and one such call does not queue behind another), and a connection the broker
dropped between calls is replaced by the next call. Against a real broker process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from tq import Client

from tests.conftest import BrokerProcess, wait_until


class Interrupted(Exception):
    """Raised by a signal handler, as Ctrl-C raises KeyboardInterrupt in the main thread."""


@pytest.fixture
def alarm() -> Iterator[Callable[[float], object]]:
    """``alarm(s)``: in ``s`` seconds the main thread is interrupted (``Interrupted``)."""

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def ctrl_c() -> Iterator[Callable[[float, int], threading.Thread]]:
    """``ctrl_c(after_s, times)``: from ``after_s`` on, a thread sends the main thread a real
    SIGINT ``times`` times, 2 ms apart, each only while a handler other than Python's own is in
    place (the one a client call swaps in, or a test's): one landing outside a call would be a
    real KeyboardInterrupt in the test run. A long GIL switch interval keeps the check and the
    send together: the main thread cannot restore the handler in between. Join the returned
    thread once the interrupted call has returned, before any other call: a storm going on
    into the next call swaps in a handler again, and that call raises KeyboardInterrupt outside
    ``pytest.raises`` (an xdist worker went down so)."""
    senders: list[threading.Thread] = []

    def send(after_s: float, times: int) -> None:
        time.sleep(after_s)
        for _ in range(times):
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                return
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            time.sleep(0.002)

    def start(after_s: float, times: int) -> threading.Thread:
        sender = threading.Thread(target=send, args=(after_s, times), daemon=True)
        sender.start()
        senders.append(sender)
        return sender

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        yield start
    finally:
        for sender in senders:
            sender.join(5)
        sys.setswitchinterval(switch)


def _interrupted_beside_a_driver(
    c: Client,
    other: Client,
    theirs: str,
    mine: str,
    interrupt: Callable[[], object],
    raised: type[BaseException],
) -> None:
    """Another thread runs ``c``'s loop in its wait for ``theirs`` while the main thread, in
    its wait for ``mine``, is interrupted: only the main thread's wait is withdrawn."""
    driver, result = _in_thread(lambda: c.wait(theirs, timeout_s=30))
    wait_until(lambda: other.stats()["counters"]["waits"] == 1, what="their wait parked")
    sender = interrupt()
    with pytest.raises(raised):
        c.wait(mine, timeout_s=3600)
    if isinstance(sender, threading.Thread):
        sender.join(5)
    # Theirs only (theirs still open shows below: their wait hears the cancel).
    wait_until(lambda: other.stats()["counters"]["waits"] == 1, 5, what="my wait withdrawn")
    other.cancel(theirs)
    driver.join(10)
    assert getattr(result[0], "state", None) == "cancelled", result


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a thread; what it returned or raised ends up in the list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_thread_other_than_the_main_one_runs_the_loop_itself(broker: BrokerProcess) -> None:
    """No thread of its own: calls from a thread that is not the main one (a web server's
    request handlers) run the client's loop themselves, with no wake-up of another thread."""
    seen: list[set[int | None]] = []

    def calls() -> str:
        before = {t.ident for t in threading.enumerate()}
        with Client(broker.url) as c:
            tid = c.submit("echo", 1)
            state = c.status(tid).state
            seen.append({t.ident for t in threading.enumerate()} - before)
        return state

    thread, out = _in_thread(calls)
    thread.join(10)
    assert out == ["pending"]
    assert seen == [set()]


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


def test_ctrl_c_in_the_main_thread_withdraws_its_wait_whoever_runs_the_loop(
    broker: BrokerProcess, alarm: Callable[[float], object]
) -> None:
    """With a handler of the program's own on a signal (SIGALRM here, raising as Ctrl-C does),
    the main thread hands its calls over: what the handler raises lands in its wait, never in
    the loop's code (it stopped a connection's request timeouts for good once). Interrupted
    while another thread runs the loop (its own long wait), then while nobody does: either way
    its wait is withdrawn at the broker, the other thread's stays, and the client goes on
    working."""
    with Client(broker.url, timeout_s=30.0) as c, Client(broker.url) as other:
        theirs, mine = c.submit("sleep", 100), c.submit("sleep", 100)
        _interrupted_beside_a_driver(c, other, theirs, mine, lambda: alarm(0.3), Interrupted)
        alarm(0.3)
        with pytest.raises(Interrupted):
            c.wait(mine, timeout_s=3600)
        wait_until(lambda: other.stats()["counters"]["waits"] == 0, 5, what="the wait withdrawn")
        assert c.status(mine).state == "pending"
        assert c._driver._helper is not None  # handed over


def test_calls_from_threads_with_running_loops_do_not_queue_behind_each_other(
    broker: BrokerProcess,
) -> None:
    """Two threads, each inside its own running event loop: a cancel from one must reach the
    broker while the other's wait for that task is still open, and end it."""
    out: dict[str, object] = {}
    with Client(broker.url, timeout_s=10.0) as c, Client(broker.url) as other:
        tid = c.submit("sleep", 100)

        async def waiter() -> None:
            out["wait"] = c.wait(tid, timeout_s=6).state

        async def canceller() -> None:
            wait_until(lambda: other.stats()["counters"]["waits"] == 1, what="the wait parked")
            started = time.monotonic()
            out["cancel"] = c.cancel(tid).state
            out["cancel_s"] = time.monotonic() - started

        threads = [
            threading.Thread(target=lambda f=f: asyncio.run(f())) for f in (waiter, canceller)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
    assert out["wait"] == "cancelled", out
    assert out["cancel"] == "cancelled", out
    assert isinstance(out["cancel_s"], float), out
    assert out["cancel_s"] < 3.0, out


def test_ctrl_c_in_a_call_from_inside_a_running_loop_withdraws_its_wait(
    broker: BrokerProcess, alarm: Callable[[float], object]
) -> None:
    with Client(broker.url, timeout_s=30.0) as c:
        tid = c.submit("sleep", 100)

        async def main() -> None:
            alarm(0.3)
            c.wait(tid, timeout_s=3600)

        with pytest.raises(Interrupted):
            asyncio.run(main())
        wait_until(lambda: c.stats()["counters"]["waits"] == 0, 5, what="the wait withdrawn")
        assert c.status(tid).state == "pending"


def test_ctrl_c_in_the_main_thread_cancels_its_call_from_inside_the_loop(
    broker: BrokerProcess, ctrl_c: Callable[[float, int], threading.Thread]
) -> None:
    """The main thread runs the loop itself (no helper thread), with Python's Ctrl-C handler
    swapped for one that raises nothing. A real Ctrl-C, then a storm of them, cancels the call
    from inside the loop and raises KeyboardInterrupt once it has ended: the wait is withdrawn,
    Python's handler is back, and a thread sharing the client is not held up (a Ctrl-C landing
    inside the driver's lock left it held, before). Then the same while another thread runs
    the loop: only the main thread's wait goes."""
    with Client(broker.url, timeout_s=30.0) as c, Client(broker.url) as other:
        theirs, mine = c.submit("sleep", 100), c.submit("sleep", 100)
        for times in (1, 25):
            sender = ctrl_c(0.3, times)
            with pytest.raises(KeyboardInterrupt):
                c.wait(mine, timeout_s=3600)
            sender.join(5)
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            wait_until(lambda: other.stats()["counters"]["waits"] == 0, 5, what="wait withdrawn")
            thread, result = _in_thread(lambda: c.submit("echo", 1))
            thread.join(10)
            assert len(result) == 1
            assert isinstance(result[0], str), result
        assert c._driver._helper is None  # the main thread drove every call itself

        _interrupted_beside_a_driver(
            c, other, theirs, mine, lambda: ctrl_c(0.3, 1), KeyboardInterrupt
        )
        assert c.status(mine).state == "pending"


def test_under_a_ctrl_c_handler_of_its_own_the_main_thread_hands_its_calls_over(
    broker: BrokerProcess, ctrl_c: Callable[[float, int], threading.Thread]
) -> None:
    """A program with its own SIGINT handler (a server's) keeps it: the main thread's calls go
    to the helper thread, and what the handler raises ends the call, its wait withdrawn. A
    handler on another signal a program may catch (SIGTERM) sends them there too."""

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        with Client(broker.url) as c:
            tid = c.submit("sleep", 100)
            sender = ctrl_c(0.3, 1)
            with pytest.raises(Interrupted):
                c.wait(tid, timeout_s=3600)
            sender.join(5)
            assert signal.getsignal(signal.SIGINT) is interrupt
            assert c._driver._helper is not None
            wait_until(lambda: c.stats()["counters"]["waits"] == 0, 5, what="the wait withdrawn")
    finally:
        signal.signal(signal.SIGINT, previous)
    # Any signal: a handler may raise, or call a client, which would wait for the loop the main
    # thread is inside (a SIGWINCH handler calling stats() hung a process for good, in review).
    previous = signal.signal(signal.SIGWINCH, lambda signum, frame: None)
    try:
        with Client(broker.url) as c:
            c.submit("echo", 1)
            assert c._driver._helper is not None
        signal.signal(signal.SIGWINCH, previous)
        with Client(broker.url) as c:
            c.submit("echo", 1)
            assert c._driver._helper is None
    finally:
        signal.signal(signal.SIGWINCH, previous)


class _CountingCondition(threading.Condition):
    """Counts the waits that ended by timing out rather than by a notify."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts = 0

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        if not woken:
            self.timeouts += 1
        return woken


def test_a_follower_of_the_main_thread_is_woken_when_its_answer_comes(
    broker: BrokerProcess,
) -> None:
    """While the main thread runs the loop (its own long wait), another thread's calls ride
    along and it is woken as each answer comes: not left to its 50 ms poll."""
    with Client(broker.url) as c, Client(broker.url) as other:
        cond = c._driver._cond = _CountingCondition()
        tid = c.submit("sleep", 100)

        def follow() -> int:
            wait_until(lambda: other.stats()["counters"]["waits"] == 1, what="the wait parked")
            for i in range(20):
                c.submit("echo", i)
            other.cancel(tid)
            return cond.timeouts

        thread, result = _in_thread(follow)
        assert c.wait(tid, timeout_s=30).state == "cancelled"
        thread.join(10)
        assert c._driver._helper is None  # the main thread drove
        assert len(result) == 1
        assert isinstance(result[0], int), result
        assert result[0] <= 5, f"{result[0]} of 20 calls were found done by polling"


def test_a_child_forked_during_a_main_thread_call_gets_pythons_ctrl_c_handler(
    broker: BrokerProcess,
) -> None:
    """The handler a call swaps in is the call's: a child another thread forks meanwhile (as
    multiprocessing does) gets Python's own back, so Ctrl-C stops it."""
    with Client(broker.url) as c, Client(broker.url) as other:
        tid = c.submit("sleep", 100)

        def fork_child() -> int:
            wait_until(lambda: other.stats()["counters"]["waits"] == 1, what="the wait parked")
            pid = os.fork()
            if pid == 0:  # the child: report, never return into the test run
                os._exit(0 if signal.getsignal(signal.SIGINT) is signal.default_int_handler else 3)
            other.cancel(tid)
            return os.waitpid(pid, 0)[1]

        thread, result = _in_thread(fork_child)
        assert c.wait(tid, timeout_s=30).state == "cancelled"
        thread.join(10)
        assert result == [0], "the child kept the call's Ctrl-C handler"
