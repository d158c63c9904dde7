"""Busy-polling for input that is about to arrive, instead of sleeping in the kernel for it.

Why: on these VMs an idle vCPU halts at once (``haltpoll.guest_halt_poll_ns=0``), and waking it
goes through the host: two processes bouncing a small message over loopback take ~100 µs a
round trip when both sleep in ``epoll_wait``, ~30 µs when the receiver polls
(benchmarks/README.md, "Why a wake-up costs so much here"). A sequential client pays that
wake-up on every request. So, like Linux's ``SO_BUSY_POLL``, Go's spinning scheduler threads
and glibc's adaptive mutexes, a ``Spinner`` polls for a bounded time before the event loop goes
to sleep, and only while the input it waits for has been arriving within that time: a peer
that pauses longer costs nothing, and a busy peer's data is already there, so the poll returns
at once. Between polls it yields the CPU, so on two cores the kernel's own workers (the disk's
completion, the loopback softirq) and the peer still run when they need to.

Why by hand: no library does this for an asyncio loop (uvloop does not expose libuv's idle
handles, and the loop's own epoll descriptor is private); it is one ``epoll`` of our sockets.
"""

from __future__ import annotations

import os
import select
import time


class Spinner:
    """Polls the descriptors it is given, for at most ``budget_us`` per ``spin``.

    ``waiting`` marks when a wait begins (a reply has left, the next request is expected);
    ``arrived`` marks when it ends; ``spin`` polls only if the last wait ended within the budget.
    """

    def __init__(self, budget_us: int) -> None:
        if budget_us < 0:
            raise ValueError(f"spin budget must be >= 0 µs, not {budget_us}")
        self.budget_ns = budget_us * 1000
        self._epoll = select.epoll() if budget_us else None
        self._owners: dict[int, object] = {}  # fd -> who added it (see discard)
        self._since = 0  # monotonic ns when the current wait began; 0: none is open
        # The last wait ended within the budget (at first: try). Unpolled, a wait takes longer
        # by the wake-up a poll saves, so one that ends just over the budget unpolled would
        # never be polled if this started False.
        self.worth = True
        self.spins = 0  # spins that polled
        self.hits = 0  # ... and saw input before the budget ran out

    @property
    def enabled(self) -> bool:
        return self._epoll is not None

    def add(self, fd: int, owner: object) -> None:
        """Poll ``fd`` (a socket ``owner`` reads from) too."""
        if self._epoll is None or fd < 0:
            return
        self._owners[fd] = owner
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            # A closed socket leaves the set by itself, so this is a reused number whose old
            # registration outlived it (a dup elsewhere): point it at the new one.
            self._epoll.modify(fd, select.EPOLLIN)

    def discard(self, fd: int, owner: object) -> None:
        """Stop polling ``fd`` if ``owner`` still has it. The event loop closes a socket before
        it reports the connection lost, so by then the number may be a new connection's."""
        if self._epoll is None or fd < 0 or self._owners.get(fd) is not owner:
            return
        del self._owners[fd]
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # closed already, which removed it

    def waiting(self) -> None:
        if self._epoll is not None:
            self._since = time.monotonic_ns()

    def arrived(self) -> None:
        if self._since:
            self.worth = time.monotonic_ns() - self._since <= self.budget_ns
            self._since = 0

    def spin(self) -> bool:
        """Poll until a descriptor is readable (True) or the budget is spent (False). Returns
        at once, False, when disabled or when the last wait outlasted the budget."""
        epoll = self._epoll
        if epoll is None or not self.worth:
            return False
        self.spins += 1
        poll = epoll.poll
        end = time.monotonic_ns() + self.budget_ns
        while True:
            if poll(0):
                self.hits += 1
                return True
            if time.monotonic_ns() >= end:
                self.worth = False  # until a wait ends within the budget again
                return False
            os.sched_yield()

    def close(self) -> None:
        self._owners.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
