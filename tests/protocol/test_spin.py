"""tq/spin.py: a spinner polls until input is there or its budget is spent, backs off after
polls that found nothing, and a pace says whether one peer answers within the budget."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from tq.spin import Backoff, Pace, Spinner


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two connected sockets: the spinner polls the first, the test writes to the second."""
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_input_already_there_ends_the_spin_at_once(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    spinner = Spinner(1_000_000)  # a second: only input can end it quickly
    spinner.add(a.fileno(), a)
    b.send(b"x")
    t0 = time.monotonic()
    assert spinner.spin() is True
    assert time.monotonic() - t0 < 0.5
    assert (spinner.spins, spinner.hits) == (1, 1)
    spinner.close()


def test_silence_spends_about_the_budget_then_polls_back_off(
    pair: tuple[socket.socket, ...],
) -> None:
    a, b = pair
    spinner = Spinner(20_000)  # 20 ms
    try:
        spinner.add(a.fileno(), a)
        t0 = time.monotonic()
        assert spinner.spin() is False
        took = time.monotonic() - t0
        assert 0.019 < took < 0.5, took  # the budget, not much more (a loaded CPU adds some)
        assert spinner.spin() is None  # backing off: one poll skipped
        assert spinner.spins == 1
        b.send(b"x")
        assert spinner.spin() is True  # polls again, and a hit resets the back-off
        assert spinner.spin() is True
        assert (spinner.spins, spinner.hits) == (3, 2)
    finally:
        spinner.close()


def test_backoff_skips_twice_as_many_polls_after_each_miss_up_to_63() -> None:
    backoff = Backoff()

    def skipped_after_miss() -> int:
        backoff.miss()
        n = 0
        while not backoff.allow():
            n += 1
        return n

    assert [skipped_after_miss() for _ in range(8)] == [1, 3, 7, 15, 31, 63, 63, 63]
    backoff.hit()
    assert skipped_after_miss() == 1


def test_a_pace_is_quick_while_the_peer_answers_within_the_budget() -> None:
    pace = Pace(1_000_000)  # 1 ms
    assert pace.quick  # at first: try
    pace.waiting(10_000_000)
    pace.arrived(10_500_000)
    assert pace.quick
    pace.waiting(20_000_000)
    pace.arrived(25_000_000)  # 5 ms
    assert not pace.quick
    pace.arrived(25_000_001)  # no wait open: changes nothing
    assert not pace.quick
    pace.waiting(30_000_000)
    pace.arrived(30_100_000)
    assert pace.quick
    pace.missed()
    assert not pace.quick


def test_a_zero_budget_never_polls(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    spinner = Spinner(0)
    assert not spinner.enabled
    spinner.add(a.fileno(), a)
    b.send(b"x")
    assert spinner.spin() is None
    assert spinner.spins == 0
    spinner.discard(a.fileno(), a)


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="spin budget must be >= 0"):
        Spinner(-1)


def test_descriptors_come_and_go_as_connections_do() -> None:
    """A closed socket leaves the set by itself (discarding it after is harmless); adding one
    twice is harmless; a closed spinner polls nothing."""
    spinner = Spinner(1000)
    a, b = socket.socketpair()
    fd = a.fileno()
    spinner.add(fd, a)
    spinner.add(fd, a)
    a.close()
    spinner.discard(fd, a)
    spinner.discard(fd, a)
    c, d = socket.socketpair()
    try:
        spinner.add(c.fileno(), c)
        d.send(b"x")
        assert spinner.spin() is True
        spinner.close()
        assert not spinner.enabled
        assert spinner.spin() is None
        spinner.add(c.fileno(), c)  # after close: ignored
        spinner.discard(c.fileno(), c)
    finally:
        b.close()
        c.close()
        d.close()


def test_a_connection_lost_late_does_not_unregister_the_socket_that_reused_its_number() -> None:
    """The event loop closes a socket, accepts a new one on the same number, and only then
    reports the first connection lost: its discard must leave the new socket polled."""
    spinner = Spinner(1_000_000)
    old, old_peer = socket.socketpair()
    fd = old.fileno()
    old_owner, new_owner = object(), object()
    spinner.add(fd, old_owner)
    old.close()
    new, new_peer = socket.socketpair()
    try:
        if new.fileno() != fd:  # make it take the number, as an accept would
            moved = new
            new = socket.socket(fileno=os.dup2(moved.fileno(), fd))
            moved.close()
        spinner.add(fd, new_owner)
        spinner.discard(fd, old_owner)  # the late connection_lost of the old one
        new_peer.send(b"x")
        t0 = time.monotonic()
        assert spinner.spin() is True
        assert time.monotonic() - t0 < 0.5
    finally:
        spinner.close()
        for s_ in (old_peer, new, new_peer):
            s_.close()


def test_the_spin_yields_the_cpu_between_polls(pair: tuple[socket.socket, ...]) -> None:
    """Another thread on a busy CPU still runs while a spinner polls: ``sched_yield`` between
    polls, and the poll itself releases the GIL."""
    a, b = pair
    spinner = Spinner(2_000_000)  # two seconds
    try:
        spinner.add(a.fileno(), a)
        sender = threading.Timer(0.05, lambda: b.send(b"x"))
        sender.start()
        t0 = time.monotonic()
        assert spinner.spin() is True  # the sender thread got to run
        assert time.monotonic() - t0 < 1.5
        sender.join()
    finally:
        spinner.close()
