"""tq/spin.py: polls only while the input it waits for comes within its budget, ends at once
when input is there, and gives up after its budget."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from tq.spin import Spinner


def test_input_already_there_ends_the_spin_at_once() -> None:
    a, b = socket.socketpair()
    spinner = Spinner(1_000_000)  # a second: only input can end it quickly
    try:
        spinner.add(a.fileno(), a)
        b.send(b"x")
        t0 = time.monotonic()
        assert spinner.spin()
        assert time.monotonic() - t0 < 0.5
        assert (spinner.spins, spinner.hits) == (1, 1)
    finally:
        spinner.close()
        a.close()
        b.close()


def test_silence_spends_the_budget_then_polling_stops_until_a_wait_ends_within_it() -> None:
    a, b = socket.socketpair()
    spinner = Spinner(2000)
    try:
        spinner.add(a.fileno(), a)
        assert not spinner.spin()  # nothing came within 2 ms
        assert (spinner.spins, spinner.hits) == (1, 0)
        assert not spinner.worth
        assert not spinner.spin()  # not worth it: returns without polling
        assert spinner.spins == 1
        spinner.waiting()
        spinner.arrived()  # this wait ended at once: polling is worth it again
        assert spinner.worth
        b.send(b"x")
        assert spinner.spin()
        assert (spinner.spins, spinner.hits) == (2, 1)
        spinner.waiting()
        time.sleep(0.01)
        spinner.arrived()  # 10 ms: longer than the budget
        assert not spinner.worth
    finally:
        spinner.close()
        a.close()
        b.close()


def test_an_arrival_without_a_wait_changes_nothing() -> None:
    spinner = Spinner(100)
    spinner.worth = False
    spinner.arrived()
    assert not spinner.worth
    spinner.close()


def test_a_zero_budget_never_polls() -> None:
    a, b = socket.socketpair()
    spinner = Spinner(0)
    try:
        assert not spinner.enabled
        spinner.add(a.fileno(), a)
        b.send(b"x")
        spinner.waiting()
        spinner.arrived()
        assert not spinner.spin()
        assert spinner.spins == 0
        spinner.discard(a.fileno(), a)
    finally:
        a.close()
        b.close()


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="spin budget must be >= 0"):
        Spinner(-1)


def test_descriptors_come_and_go_as_connections_do() -> None:
    """A closed socket leaves the set by itself (discarding it after is harmless); adding a
    number twice points it at the newer socket; a closed spinner polls nothing."""
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
        assert spinner.spin()
        spinner.close()
        assert not spinner.enabled
        assert not spinner.spin()
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
        assert spinner.spin()
        assert time.monotonic() - t0 < 0.5
    finally:
        spinner.close()
        for s_ in (old_peer, new, new_peer):
            s_.close()


def test_the_spin_yields_the_cpu_between_polls() -> None:
    """Another thread on a busy CPU still runs while a spinner polls: ``sched_yield`` between
    polls, and the poll itself releases the GIL."""
    a, b = socket.socketpair()
    spinner = Spinner(2_000_000)  # two seconds
    try:
        spinner.add(a.fileno(), a)
        sender = threading.Timer(0.05, lambda: b.send(b"x"))
        sender.start()
        t0 = time.monotonic()
        assert spinner.spin()  # the sender thread got to run
        assert time.monotonic() - t0 < 1.5
        sender.join()
    finally:
        spinner.close()
        a.close()
        b.close()
