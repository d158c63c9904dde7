"""What the machine under a benchmark is, recorded beside its figures.

Why: on this project's 2-vCPU VMs most of a sequential submit's latency is not tq's code but the
machine. A virtual CPU with nothing to run halts, and waking it again goes through the host; the
guest kernel hides that by polling for a while before it halts (``haltpoll``, on by default in
KVM guests), unless the host turned that off (``haltpoll.guest_halt_poll_ns=0``, as here). With
polling off, the same broker and client measured a p50 of 0.53-0.57 ms; with the kernel default
of 200 us, 0.35 ms, in the same hour (benchmarks/README.md). A disk whose write cache is
volatile and has no FUA turns every durable write into a write plus a flush. A figure read
without these facts misleads, so ``tq bench`` prints them and writes them into its JSON.

Everything here is read from ``/proc`` and ``/sys`` and is best effort: a fact the machine does
not expose is ``None``, never an error. One figure is measured instead: how long a fixed loop of
Python takes, at the start of the run and at its end (``cpu_check``). The VMs here share their
hosts, and on one evening the same loop took from 38 ms to 170 ms; every figure of a run moved
with it, so a run carries how fast its machine was.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from typing import Any

_HALT_POLL = "module/haltpoll/parameters/guest_halt_poll_ns"
_CPUIDLE = "devices/system/cpu/cpuidle/current_driver"


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _block_queue(sys_root: str, path: str) -> tuple[str | None, str | None, str | None]:
    """The block device holding ``path``: its name, write cache mode and FUA support.

    A partition has no ``queue`` of its own; its parent disk's is the one that counts."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None, None, None
    link = os.path.join(sys_root, "dev/block", f"{os.major(dev)}:{os.minor(dev)}")
    if not os.path.exists(link):  # tmpfs, overlay, ...: no block device of its own
        return None, None, None
    node = os.path.realpath(link)
    queue = os.path.join(node, "queue")
    if not os.path.isdir(queue):
        queue = os.path.join(os.path.dirname(node), "queue")
    return (
        os.path.basename(node),
        _read(os.path.join(queue, "write_cache")),
        _read(os.path.join(queue, "fua")),
    )


CPU_CHECK_STEPS = 1_000_000
# The check's two figures differ by more than this factor: the machine changed speed mid-run.
CPU_DRIFT = 1.5


def cpu_check_ms() -> float:
    """The best of five runs of a fixed Python loop, in ms, after 0.1 s of spinning: the
    machine's speed now. A vCPU that was idle runs slow for a while (single runs after a second
    of sleep: 33-62 ms; so measured: 34.5-40.2 ms), and the best skips one preemption."""
    warm_until = time.perf_counter() + 0.1
    while time.perf_counter() < warm_until:
        pass
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        total = 0
        for i in range(CPU_CHECK_STEPS):
            total += i
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 1)


def machine_info(data_path: str | None, sys_root: str = "/sys") -> dict[str, Any]:
    """Facts about this machine that bound the latency figures (see the module docstring).

    ``data_path`` is where the benchmark's brokers keep their data (the disk that is measured;
    None for a broker elsewhere); ``sys_root`` is for tests."""
    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a Linux dependency
        loop = "asyncio"
    device, write_cache, fua = (
        _block_queue(sys_root, data_path) if data_path else (None, None, None)
    )
    halt_poll = _read(os.path.join(sys_root, _HALT_POLL))
    return {
        "cpus": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "event_loop": loop,
        "cpuidle_driver": _read(os.path.join(sys_root, _CPUIDLE)),
        "guest_halt_poll_ns": int(halt_poll) if halt_poll and halt_poll.isdigit() else None,
        "data_device": device,
        "write_cache": write_cache,
        "fua": None if fua is None else fua == "1",
    }


def describe(info: dict[str, Any]) -> list[str]:
    """One line of facts, then one line per condition known to inflate the figures."""
    parts = [f"{info['cpus']} CPUs", info["system"], f"Python {info['python']}", info["event_loop"]]
    if info["cpuidle_driver"]:
        parts.append(f"cpuidle {info['cpuidle_driver']}")
    if info["data_device"]:
        cache = info["write_cache"] or "unknown cache"
        parts.append(
            f"data on {info['data_device']} ({cache}, FUA {'yes' if info['fua'] else 'no'})"
        )
    check = info.get("cpu_check_ms")
    if check:
        parts.append(
            f"CPU check {check['start']:g} ms at start, {check['end']:g} ms at end "
            f"({CPU_CHECK_STEPS:,} Python steps)"
        )
    lines = ["machine: " + ", ".join(parts)]
    if info["cpuidle_driver"] == "haltpoll" and info["guest_halt_poll_ns"] == 0:
        lines.append(
            "note: guest halt polling is off (guest_halt_poll_ns=0): every wake-up of an idle "
            "vCPU goes through the host, which adds to every latency figure "
            "(benchmarks/README.md, 'What bounds the latency figures')"
        )
    if info["write_cache"] == "write back" and info["fua"] is False:
        lines.append(
            "note: the data disk has a volatile write cache and no FUA: each durable write is "
            "a write and then a cache flush"
        )
    if check and max(check.values()) > CPU_DRIFT * min(check.values()):
        lines.append(
            "note: the machine's speed changed during the run (the CPU check above): figures "
            "from its slower part read worse"
        )
    return lines
