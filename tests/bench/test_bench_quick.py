"""``tq bench --quick`` runs every scenario at tiny sizes, so the harness itself cannot rot.

Its numbers mean nothing and are not checked: targets live in the benchmark, not in tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCENARIOS = {
    "submit-batch",
    "submit-pipelined",
    "submit-latency-p50",
    "submit-latency-p99",
    "submit-latency-sync-p50",
    "submit-latency-sync-p99",
    "open-loop-p99",
    "end-to-end",
    "dispatch-latency-p99",
    "memory-100k",
    "memory-1m",
    "recovery-1m",
    "cluster-submit-batch",
    "cluster-end-to-end",
    "cluster-failover",
    "export-1m",
    "export-1m-fill",
}


def test_bench_quick_writes_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        # --client-spin-us: the producers poll for their replies this long (AsyncClient spin_us)
        [
            sys.executable,
            "-m",
            "tq",
            "bench",
            "--quick",
            "--json",
            str(out),
            "--client-spin-us",
            "800",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    scenarios = json.loads(out.read_text())["scenarios"]
    assert set(scenarios) >= SCENARIOS
    for name in SCENARIOS:
        figure = scenarios[name]
        assert set(figure) == {"median", "min", "max", "unit"}
        assert figure["min"] <= figure["median"] <= figure["max"]
        assert figure["unit"] in {"tasks/s", "ms", "MB", "s"}
    assert "tq bench (quick" in proc.stdout  # the table is printed too
    assert "producers poll 800 µs for replies" in proc.stdout
    assert json.loads(out.read_text())["client_spin_us"] == 800
    # ... and what the machine is, since the latency figures depend on it
    machine = json.loads(out.read_text())["machine"]
    assert machine["cpus"] == os.cpu_count()
    assert set(machine["cpu_check_ms"]) == {"start", "end"}  # how fast it was, at both ends
    assert "machine: " in proc.stdout


def test_a_scenarios_client_starts_with_the_harness_frozen_out_of_the_collector() -> None:
    """A full collection of the bench process's own objects paused the open-loop client for
    15 ms, which read as the broker's p99: each scenario's client starts after ``gc.freeze``.
    (In a child process: freezing the test process would keep its objects for good.)"""
    code = (
        "import asyncio, gc\n"
        "from tq.bench.runner import _run\n"
        "assert gc.get_freeze_count() == 0\n"
        "_run(asyncio.sleep(0), fast_loop=False)\n"
        "print(gc.get_freeze_count())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert int(out.stdout) > 1000
