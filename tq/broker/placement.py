"""Where a single node's event loop runs: off the CPUs that take its data disk's interrupts.

Each durable write ends in the disk's interrupt and the kernel's block work on the CPU the
interrupt is delivered to. A broker loop on that CPU is interrupted and preempted there in the
middle of the apply it overlaps with the write: measured here, the apply took 130-190 µs instead
of 59-86 µs, longer than the write it hides behind, and the sequential submit p50 was ~10% worse
(benchmarks/README.md). An unpinned broker stays on one CPU for a whole run, so which one it
landed on decided a run's figure. Seastar's perftune and DPDK separate interrupt CPUs from
worker CPUs for the same reason.

Only the loop's thread moves (``sched_setaffinity`` of the calling thread): RocksDB's background
threads, started when the store opened, keep every CPU. Nothing moves when the interrupts'
CPUs cannot be read (not Linux, no sysfs, a disk without MSI interrupts), when they cover every
CPU the broker may use, or when the broker may use none of them.
"""

from __future__ import annotations

import os

SYS = "/sys"
PROC = "/proc"


def parse_cpu_list(text: str) -> set[int]:
    """``0-2,5`` (the kernel's CPU list format) -> {0, 1, 2, 5}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def disk_irq_cpus(path: str, sys_root: str = SYS, proc_root: str = PROC) -> set[int]:
    """The CPUs the interrupts of the disk holding ``path`` are delivered to (empty if unknown).

    The device is found from the file system's device number (``/sys/dev/block/MAJ:MIN``), then
    up its sysfs path to the PCI function that owns its MSI interrupts (``msi_irqs``); each
    interrupt's CPUs are in ``/proc/irq/N/effective_affinity_list`` (``smp_affinity_list`` where
    the kernel does not say which CPU it chose)."""
    try:
        dev = os.stat(path).st_dev
        node = os.path.realpath(
            os.path.join(sys_root, "dev", "block", f"{os.major(dev)}:{os.minor(dev)}")
        )
        top = os.path.realpath(os.path.join(sys_root, "devices"))
        while node.startswith(top + os.sep) and not os.path.isdir(os.path.join(node, "msi_irqs")):
            node = os.path.dirname(node)
        irqs = os.listdir(os.path.join(node, "msi_irqs"))
    except (OSError, ValueError):
        return set()
    cpus: set[int] = set()
    for irq in irqs:
        for name in ("effective_affinity_list", "smp_affinity_list"):
            try:
                with open(os.path.join(proc_root, "irq", irq, name)) as f:
                    cpus |= parse_cpu_list(f.read())
                break
            except (OSError, ValueError):
                continue
    return cpus


def choose_cpus(allowed: set[int], irq_cpus: set[int]) -> set[int] | None:
    """The CPUs the loop should keep to, or None to leave it where it may run."""
    rest = allowed - irq_cpus
    if not rest or rest == allowed:
        return None
    return rest


def place_loop_thread(data_dir: str) -> set[int] | None:
    """Keep the calling thread (the event loop's) off the data disk's interrupt CPUs; returns
    the CPUs it now keeps to, or None if it was left alone."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    cpus = choose_cpus(allowed, disk_irq_cpus(data_dir))
    if cpus is None:
        return None
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        return None
    return cpus
