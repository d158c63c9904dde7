"""The machine facts ``tq bench`` records beside its figures, read from a fake ``/sys``."""

from __future__ import annotations

import os
from pathlib import Path

from tq.bench.machine import cpu_check_ms, describe, machine_info


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _fake_sys(root: Path, data: Path, *, partition: bool) -> None:
    """A sysfs with halt polling off and ``data``'s device on a write-back disk without FUA."""
    _write(root / "module/haltpoll/parameters/guest_halt_poll_ns", "0")
    _write(root / "devices/system/cpu/cpuidle/current_driver", "haltpoll")
    disk = root / "devices/virtual/block/vda"
    _write(disk / "queue/write_cache", "write back")
    _write(disk / "queue/fua", "0")
    node = disk / "vda1" if partition else disk  # a partition has no queue of its own
    node.mkdir(parents=True, exist_ok=True)
    dev = os.stat(data).st_dev
    link = root / "dev/block" / f"{os.major(dev)}:{os.minor(dev)}"
    link.parent.mkdir(parents=True)
    link.symlink_to(node)


def test_a_disk_without_fua_and_halt_polling_off_are_reported(tmp_path: Path) -> None:
    _fake_sys(tmp_path / "sys", tmp_path, partition=False)
    info = machine_info(str(tmp_path), sys_root=str(tmp_path / "sys"))
    assert info["cpuidle_driver"] == "haltpoll"
    assert info["guest_halt_poll_ns"] == 0
    assert (info["data_device"], info["write_cache"], info["fua"]) == ("vda", "write back", False)
    lines = describe(info)
    assert lines[0].startswith(f"machine: {os.cpu_count()} CPUs")
    assert "data on vda (write back, FUA no)" in lines[0]
    assert any("guest halt polling is off" in line for line in lines[1:])
    assert any("write and then a cache flush" in line for line in lines[1:])


def test_a_partition_reads_its_disks_queue(tmp_path: Path) -> None:
    _fake_sys(tmp_path / "sys", tmp_path, partition=True)
    info = machine_info(str(tmp_path), sys_root=str(tmp_path / "sys"))
    assert (info["data_device"], info["write_cache"], info["fua"]) == ("vda1", "write back", False)


def test_what_the_machine_does_not_expose_is_none_and_no_note(tmp_path: Path) -> None:
    info = machine_info(str(tmp_path), sys_root=str(tmp_path / "empty"))
    assert info["cpuidle_driver"] is None
    assert info["guest_halt_poll_ns"] is None
    assert (info["data_device"], info["write_cache"], info["fua"]) == (None, None, None)
    assert len(describe(info)) == 1  # the facts line only


def test_a_remote_broker_records_no_disk(tmp_path: Path) -> None:
    _fake_sys(tmp_path / "sys", tmp_path, partition=False)
    info = machine_info(None, sys_root=str(tmp_path / "sys"))
    assert info["data_device"] is None
    assert not any("cache flush" in line for line in describe(info))


def test_the_cpu_check_is_reported_and_a_change_of_speed_noted(tmp_path: Path) -> None:
    info = machine_info(None, sys_root=str(tmp_path / "empty"))
    steady = cpu_check_ms()
    assert 0 < steady < 60_000
    info["cpu_check_ms"] = {"start": 38.0, "end": 45.5}
    lines = describe(info)
    assert "CPU check 38 ms at start, 45.5 ms at end (1,000,000 Python steps)" in lines[0]
    assert len(lines) == 1  # within the drift allowed: no note
    info["cpu_check_ms"] = {"start": 38.0, "end": 105.0}
    assert any("speed changed during the run" in line for line in describe(info)[1:])
