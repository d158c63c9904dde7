"""Admin commands as a user runs them: every command in every output format, pause and resume,
dead-letter retry and purge."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.apps.handlers import read_runs
from tests.cli.test_cli import tq
from tests.conftest import HANDLERS_APP, BrokerProcess, WorkerProcess, ok, wait_until

StartWorker = Callable[..., WorkerProcess]


def _dead_task(broker: BrokerProcess, start_worker: StartWorker, runs: Path) -> str:
    """A task that failed its only attempt (and will succeed when retried)."""
    start_worker(broker.url, "-c", "2", app=HANDLERS_APP)
    with broker.client() as c:
        tid = c.submit("test.record", {"file": str(runs), "fail_times": 1}, max_retries=0)
        assert c.wait(tid, timeout_s=10).state == "dead"
    return tid


@pytest.mark.parametrize("fmt", ["table", "json", "yaml"])
def test_every_admin_command_prints_in_every_format(
    broker: BrokerProcess, start_worker: StartWorker, tmp_path: Path, fmt: str
) -> None:
    tid = _dead_task(broker, start_worker, tmp_path / "runs.jsonl")
    commands = [
        ["stats"],
        ["queues"],
        ["workers"],
        ["list", "--state", "dead"],
        ["status", tid],
        ["dlq", "list"],
        ["dlq", "show", tid],
        ["dlq", "retry", tid, "--dry-run"],
        ["dlq", "purge", "--queue", "default", "--dry-run"],
        ["queue", "pause", "other"],
        ["queue", "resume", "other"],
    ]
    for args in commands:
        out = ok(tq(*args, "-o", fmt, broker=broker.url))
        if fmt == "json":
            json.loads(out)
        elif fmt == "yaml":
            yaml.safe_load(out)
        else:
            assert out.strip(), args
    # dry runs changed nothing
    with broker.client() as c:
        assert c.status(tid).state == "dead"


def test_cluster_status_on_a_single_node_says_so(broker: BrokerProcess) -> None:
    data = json.loads(ok(tq("stats", "-o", "json", broker=broker.url)))
    assert data["cluster"] == {"role": "single"}


def test_pause_stops_claims_and_resume_restarts_them(
    broker: BrokerProcess, start_worker: StartWorker
) -> None:
    ok(tq("queue", "pause", "default", broker=broker.url))
    start_worker(broker.url, "-c", "2")
    with broker.client() as c:
        tid = c.submit("echo", {"paused": True})
        queues = json.loads(ok(tq("queues", "-o", "json", broker=broker.url)))
        assert queues["default"]["paused"] is True
        assert c.status(tid).state == "pending"
        with pytest.raises(Exception, match="did not finish"):
            c.wait(tid, timeout_s=1.0)  # a worker is waiting, the queue is paused
        ok(tq("queue", "resume", "default", broker=broker.url))
        assert c.wait(tid, timeout_s=10).result == {"paused": True}
        queues = json.loads(ok(tq("queues", "-o", "json", broker=broker.url)))
        assert queues["default"]["paused"] is False


def test_dlq_retry_brings_a_task_back_and_it_completes(
    broker: BrokerProcess, start_worker: StartWorker, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.jsonl"
    tid = _dead_task(broker, start_worker, runs)
    out = json.loads(ok(tq("dlq", "retry", tid, "-o", "json", broker=broker.url)))
    assert out == {"dry_run": False, "retried": [tid]}
    with broker.client() as c:
        info = c.wait(tid, timeout_s=10)
        assert info.state == "completed"
        assert info.attempt == 1  # attempts were reset by the retry
        assert len(read_runs(runs)) == 2
        assert c.stats()["states"]["dead"] == 0


def test_dlq_purge_by_filter_deletes_and_needs_a_filter(
    broker: BrokerProcess, start_worker: StartWorker, tmp_path: Path
) -> None:
    tid = _dead_task(broker, start_worker, tmp_path / "runs.jsonl")
    refused = tq("dlq", "purge", broker=broker.url)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1
    out = ok(tq("dlq", "purge", "--error-type", "RuntimeError", "-o", "json", broker=broker.url))
    assert json.loads(out)["purged"] == [tid]
    with broker.client() as c:
        wait_until(lambda: c.stats()["states"]["dead"] == 0, timeout=5)
        assert c.dead_letters() == []
