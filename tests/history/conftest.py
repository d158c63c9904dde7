"""A known workload, run once for the package by a real broker and worker, and its exports.

The workload (24 finished tasks, every finished state, two served queues):

- ``default``: 10 ``echo`` (normal priority), 4 ``sleep`` of 50 ms (high);
- ``reports``: 5 ``echo`` (low), 2 ``fail`` without retries (dead after 1 attempt), 1 ``fail``
  with 2 retries (dead after 3 attempts), 1 ``fail`` whose retry is an hour away (``failed``);
- ``parked`` (no worker serves it): 1 ``echo``, cancelled before it ran.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tq import Client

from tests.conftest import (
    BrokerProcess,
    launch_worker,
    ok,
    stop_worker,
    subprocess_env,
    wait_until,
)

_SCRIPT = Path(sys.executable).with_name("tq")
TQ = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tq"]

EXPORT_COLUMNS = [
    "id",
    "name",
    "queue",
    "priority",
    "state",
    "attempts",
    "worker",
    "submitted_at",
    "started_at",
    "finished_at",
    "wait_ms",
    "run_ms",
    "error_type",
    "error_message",
    "payload_bytes",
    "result_bytes",
]
TOTAL = 24
BY_STATE = {"completed": 19, "dead": 3, "failed": 1, "cancelled": 1}
BY_QUEUE = {"default": 14, "reports": 9, "parked": 1}
BY_NAME = {"echo": 16, "sleep": 4, "fail": 4}
SLEEP_MS = 50


@dataclass(frozen=True)
class Workload:
    url: str
    worker_id: str
    state_dir: Path  # XDG_STATE_HOME for the tq commands of these tests
    exports: dict[str, Path]  # format -> export of the whole workload


def tq(*args: str, state_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``tq *args`` as a user would, with its own state directory (the latest export)."""
    return subprocess.run(
        [*TQ, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=subprocess_env(COLUMNS="200", XDG_STATE_HOME=str(state_dir)),
        check=False,
    )


def _run_workload(url: str) -> None:
    with Client(url) as c:
        final = [c.submit("echo", {"i": i}) for i in range(10)]
        nap = {"seconds": SLEEP_MS / 1000}
        final += [c.submit("sleep", nap, priority="high") for _ in range(4)]
        final += [c.submit("echo", {"i": i}, queue="reports", priority="low") for i in range(5)]
        final += [
            c.submit("fail", {"message": "boom"}, queue="reports", max_retries=0) for _ in range(2)
        ]
        final.append(
            c.submit("fail", {"message": "boom"}, queue="reports", max_retries=2, backoff_s=0.01)
        )
        later = c.submit(
            "fail", {"message": "try later"}, queue="reports", max_retries=1, backoff_s=3600
        )
        c.cancel(c.submit("echo", None, queue="parked"))
        for tid in final:
            assert c.wait(tid, timeout_s=30).state in ("completed", "dead")
        wait_until(lambda: c.status(later).state == "failed", what="a retry is scheduled")
        assert {k: v for k, v in c.stats()["states"].items() if v} == BY_STATE


@pytest.fixture(scope="package")
def workload(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Workload]:
    failed_before = request.session.testsfailed
    workdir = tmp_path_factory.mktemp("history")
    broker = BrokerProcess(workdir).start()
    worker = None
    try:
        worker = launch_worker(
            broker.url, "-q", "default", "-q", "reports", "-c", "8", logdir=workdir
        )
        _run_workload(broker.url)
        state_dir = workdir / "state"
        exports: dict[str, Path] = {}
        for fmt in ("parquet", "duckdb", "csv"):
            path = workdir / f"all.{fmt}"
            ok(tq("export", "-b", broker.url, "--out", str(path), state_dir=state_dir))
            exports[fmt] = path
        yield Workload(broker.url, worker.worker_id, state_dir, exports)
    finally:
        if request.session.testsfailed > failed_before:
            print(broker.describe())
            if worker is not None:
                print(worker.describe())
        if worker is not None:
            stop_worker(worker)
        broker.close()
