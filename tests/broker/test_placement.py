"""Where a single node's event loop runs (tq/broker/placement.py): the data disk's interrupt CPUs
read from a sysfs and procfs laid out as Linux lays them out, the choice, and a real ``tq broker``
whose loop thread keeps to what the choice says (or to every CPU with ``--any-cpu``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from tq.broker.placement import choose_cpus, disk_irq_cpus, parse_cpu_list

from tests.conftest import BrokerProcess

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("1\n") == {1}
    assert parse_cpu_list("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert parse_cpu_list("") == set()


def test_choice_leaves_the_loop_alone_unless_some_cpus_are_free_of_the_interrupts() -> None:
    assert choose_cpus({0, 1}, {1}) == {0}
    assert choose_cpus({0, 1, 2, 3}, {0}) == {1, 2, 3}
    assert choose_cpus({0, 1}, {0, 1}) is None  # every CPU takes them: nowhere better to go
    assert choose_cpus({0, 1}, set()) is None  # unknown
    assert choose_cpus({2, 3}, {0}) is None  # the broker may not run where they land anyway


def _fake_machine(root: Path, data: Path, irqs: dict[str, str], effective: bool = True) -> None:
    """sysfs and procfs as on a virtio VM: /sys/dev/block/MAJ:MIN -> the disk's node under its
    PCI function, which lists its MSI interrupts; each interrupt's CPUs under /proc/irq."""
    dev = os.stat(data).st_dev
    pci = root / "sys/devices/pci0000:00/0000:00:02.0"
    disk = pci / "virtio1/block/vda"
    disk.mkdir(parents=True)
    (pci / "msi_irqs").mkdir()
    for irq, cpus in irqs.items():
        (pci / "msi_irqs" / irq).write_text("msix\n")
        irq_dir = root / "proc/irq" / irq
        irq_dir.mkdir(parents=True)
        (irq_dir / "smp_affinity_list").write_text("0-3\n")
        if effective:
            (irq_dir / "effective_affinity_list").write_text(cpus + "\n")
    links = root / "sys/dev/block"
    links.mkdir(parents=True)
    (links / f"{os.major(dev)}:{os.minor(dev)}").symlink_to(disk)


def test_the_disk_interrupts_cpus_are_found_from_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _fake_machine(tmp_path / "m", data, {"35": "1", "36": "1,3"})
    m = tmp_path / "m"
    assert disk_irq_cpus(str(data), str(m / "sys"), str(m / "proc")) == {1, 3}


def test_without_the_effective_cpus_the_allowed_ones_are_taken(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _fake_machine(tmp_path / "m", data, {"36": "1"}, effective=False)
    m = tmp_path / "m"
    assert disk_irq_cpus(str(data), str(m / "sys"), str(m / "proc")) == {0, 1, 2, 3}


def test_a_disk_it_cannot_trace_gives_no_cpus(tmp_path: Path) -> None:
    assert disk_irq_cpus(str(tmp_path), str(tmp_path / "no-sys"), str(tmp_path)) == set()
    assert disk_irq_cpus(str(tmp_path / "missing")) == set()


def _loop_cpus(broker: BrokerProcess) -> set[int]:
    """The CPUs the broker's main thread (its event loop's) may run on."""
    assert broker.proc is not None
    pid = broker.proc.pid
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1])
    raise AssertionError("no Cpus_allowed_list")


def test_a_broker_keeps_its_loop_where_the_choice_says(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    allowed = os.sched_getaffinity(0)
    placed = broker_factory()
    want = choose_cpus(allowed, disk_irq_cpus(str(placed.data_dir))) or allowed
    assert _loop_cpus(placed) == want
    anywhere = broker_factory("--any-cpu")
    assert _loop_cpus(anywhere) == allowed
