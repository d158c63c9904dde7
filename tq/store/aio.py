"""Linux native AIO for the commit journal: start a durable write now, wait for it later, from
the same thread.

Why: on an idle single node a commit costs the journal's ``O_DIRECT | O_DSYNC`` write plus the
state machine's apply. Started before the apply and waited for after it, the write runs while
the apply does, and the commit costs the longer of the two instead of their sum. A writer thread
cannot do this here: handing it the write and getting the answer back costs two thread wake-ups,
about as long as the write itself on this VM (benchmarks/README.md).

Why by hand: the Python AIO packages (caio, aiofile) are built around completion callbacks run
by an asyncio loop or their own threads; the journal needs the plain "submit, then block until
done" of the kernel interface, which is four syscalls and two structs. Where they are missing
(another architecture, a kernel without AIO, ``fs.aio-max-nr`` exhausted) ``Aio.create`` returns
None and the journal writes synchronously, as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

from tq.spin import Backoff, poll_until

# (io_setup, io_destroy, io_getevents, io_submit) by architecture; others write synchronously.
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_PWRITE = 1


class _Iocb(ctypes.Structure):
    """``struct iocb`` (linux/aio_abi.h), little-endian layout."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("key", ctypes.c_uint32),
        ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16),
        ("reqprio", ctypes.c_int16),
        ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("resfd", ctypes.c_uint32),
    ]


class _Event(ctypes.Structure):
    """``struct io_event``."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Timespec(ctypes.Structure):
    """``struct timespec``."""

    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class Aio:
    """One write in flight at a time: ``submit`` it, then ``wait`` for its result."""

    def __init__(self, libc: ctypes.CDLL, numbers: tuple[int, int, int, int]) -> None:
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._ctx = ctypes.c_ulong(0)
        self._iocb = _Iocb()
        self._iocbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._event = _Event()
        self._zero = _Timespec(0, 0)
        self._backoff = Backoff()
        self.spins = 0  # waits that polled first
        self._busy = False
        if self._syscall(self._setup, ctypes.c_long(1), ctypes.byref(self._ctx)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_setup: {os.strerror(err)}")

    @classmethod
    def create(cls) -> Aio | None:
        """An AIO context, or None where there is none to have (see the module docstring)."""
        numbers = _SYSCALLS.get(platform.machine())
        if not sys.platform.startswith("linux") or numbers is None:
            return None
        try:
            return cls(ctypes.CDLL(None, use_errno=True), numbers)
        except (OSError, AttributeError):
            return None

    def submit(self, fd: int, address: int, nbytes: int, offset: int) -> None:
        """Start writing ``nbytes`` from memory at ``address`` to ``fd`` at ``offset``. The
        memory must stay as it is until ``wait`` returns."""
        if self._busy:
            raise RuntimeError("a write is already in flight")
        cb = self._iocb
        cb.opcode = _IOCB_CMD_PWRITE
        cb.fildes = fd
        cb.buf = address
        cb.nbytes = nbytes
        cb.offset = offset
        cb.rw_flags = 0  # the file's own O_DSYNC makes the write durable
        while True:
            n = self._syscall(self._submit, self._ctx, ctypes.c_long(1), self._iocbs)
            if n == 1:
                self._busy = True
                return
            err = ctypes.get_errno() if n < 0 else errno.EAGAIN
            if err != errno.EINTR:
                raise OSError(err, f"io_submit: {os.strerror(err)}")

    def wait(self, spin_ns: int = 0) -> int:
        """Block until the write is done; returns how many bytes it wrote (raises on failure).
        The GIL is released meanwhile (ctypes releases it around every foreign call).

        With ``spin_ns``, first poll for the completion that long (yielding the CPU between
        polls) before sleeping for it: a sleeping vCPU here takes tens of µs to wake for the
        disk's interrupt (tq/spin.py), and the write usually ends within ~150 µs. Polls that
        run out back off (``Backoff``), so a slower disk costs few of them."""
        if not self._busy:
            raise RuntimeError("no write in flight")
        if spin_ns > 0:
            got = [0]  # what the last poll returned: 1 done, negative an error

            def ended() -> bool:
                got[0] = self._getevent(self._zero)
                return got[0] != 0

            # A disk slower than the budget makes the polls back off.
            if poll_until(ended, spin_ns, self._backoff) is not None:
                self.spins += 1
                if got[0] == 1:
                    return self._done()
        while True:
            n = self._getevent(None)
            if n == 1:
                return self._done()
            err = ctypes.get_errno() if n < 0 else errno.EIO
            if err != errno.EINTR:
                self._busy = False
                raise OSError(err, f"io_getevents: {os.strerror(err)}")

    def _getevent(self, timeout: _Timespec | None) -> int:
        """io_getevents for our one write: 1 when it is done, 0 if not yet (with a zero
        ``timeout``), negative on error (see errno)."""
        return int(
            self._syscall(
                self._getevents,
                self._ctx,
                ctypes.c_long(1),
                ctypes.c_long(1),
                ctypes.byref(self._event),
                None if timeout is None else ctypes.byref(timeout),
            )
        )

    def _done(self) -> int:
        self._busy = False
        res = int(self._event.res)
        if res < 0:
            raise OSError(-res, f"journal write: {os.strerror(-res)}")
        return res

    @property
    def busy(self) -> bool:
        return self._busy

    def close(self) -> None:
        """Wait for a write still in flight (its memory is about to go), then free the context."""
        if self._busy:
            try:
                self.wait()
            except OSError:
                pass  # whoever submitted it has failed already, or is about to
        if self._ctx.value:
            self._syscall(self._destroy, self._ctx)
            self._ctx = ctypes.c_ulong(0)
