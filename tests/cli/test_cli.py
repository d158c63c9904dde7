"""The ``tq`` command as a user runs it: a subprocess per command, against a real broker and
worker. Output is checked the way a user or a script reads it (text, JSON, YAML, exit codes),
and every error must be one readable line on stderr, never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    BrokerProcess,
    WorkerProcess,
    launch_worker,
    ok,
    one_line_error,
    stop_worker,
    subprocess_env,
    wait_until,
)

_SCRIPT = Path(sys.executable).with_name("tq")
TQ = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tq"]
UNSERVED_QUEUE = "nobody-serves-this"


def tq(
    *args: str, broker: str | None = None, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    cmd = [*TQ, *args]
    if broker is not None:
        cmd += ["--broker", broker]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=subprocess_env(COLUMNS="200", **env),
    )


def free_port() -> int:
    """A port nothing listens on (bound and released just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class System:
    broker: BrokerProcess
    worker: WorkerProcess

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[System]:
    """One broker and one worker for the module: the tests only add tasks and read them back."""
    failed_before = request.session.testsfailed
    workdir = tmp_path_factory.mktemp("cli")
    broker = BrokerProcess(workdir).start()
    try:
        worker = launch_worker(broker.url, "--concurrency", "4", logdir=workdir)
    except BaseException:
        broker.close()
        raise
    yield System(broker, worker)
    if request.session.testsfailed > failed_before:
        print(broker.describe())
        print(worker.describe())
    stop_worker(worker)
    broker.close()


def submit_json(system: System, *args: str) -> dict[str, Any]:
    out = ok(tq("submit", *args, "-o", "json", broker=system.url))
    data: dict[str, Any] = json.loads(out)
    return data


# --- happy paths -------------------------------------------------------------------------------


def test_submit_wait_prints_the_result(system: System) -> None:
    result = tq(
        "submit", "echo", '{"hello": "world"}', "--priority", "high", "--wait", broker=system.url
    )
    assert json.loads(ok(result)) == {"hello": "world"}
    assert result.stdout.strip() == '{"hello": "world"}'
    assert result.stderr == ""


def test_submit_with_an_id_twice_makes_one_task(system: System) -> None:
    first = ok(tq("submit", "echo", "1", "--id", "cli-fixed-id", broker=system.url)).strip()
    again = ok(tq("submit", "echo", "2", "--id", "cli-fixed-id", broker=system.url)).strip()
    assert first == again == "cli-fixed-id"
    waited = json.loads(ok(tq("wait", first, "--timeout", "10", "-o", "json", broker=system.url)))
    assert waited["result"] == 1  # the first submit's payload: the second one was a no-op


def test_submit_backoff_sets_the_first_retry_delay(system: System) -> None:
    tid = ok(tq("submit", "fail", "--backoff", "60", "--max-retries", "1", broker=system.url))
    tid = tid.strip()

    def failed() -> dict[str, Any] | None:
        info: dict[str, Any] = json.loads(ok(tq("status", tid, "-o", "json", broker=system.url)))
        return info if info["state"] == "failed" else None

    info = wait_until(failed, what="first attempt failed")
    # 60 s with jitter (x 0.5-1.0), not the broker's 1 s --retry-base
    assert info["eta_ms"] - info["started_at_ms"] >= 25_000, info
    ok(tq("cancel", tid, broker=system.url))


def test_submit_prints_the_id_and_status_shows_the_task(system: System) -> None:
    tid = ok(tq("submit", "echo", '{"n": 1}', broker=system.url)).strip()
    assert len(tid.splitlines()) == 1
    assert tid
    assert " " not in tid

    waited = json.loads(ok(tq("wait", tid, "--timeout", "10", "-o", "json", broker=system.url)))
    assert waited["state"] == "completed"

    info = json.loads(ok(tq("status", tid, "-o", "json", broker=system.url)))
    assert info["id"] == tid
    assert info["name"] == "echo"
    assert info["state"] == "completed"
    assert info["priority"] == "normal"
    assert info["attempt"] == 1
    assert info["result"] == {"n": 1}
    assert info["payload"] == {"n": 1}
    assert info["error"] is None
    assert info["worker_id"] == system.worker.worker_id

    as_yaml = yaml.safe_load(ok(tq("status", tid, "-o", "yaml", broker=system.url)))
    assert as_yaml == info

    table = ok(tq("status", tid, broker=system.url))
    assert f"task {tid}" in table
    assert "completed" in table


def test_list_completed_as_json_contains_the_task(system: System) -> None:
    done = submit_json(system, "echo", '{"listed": true}', "--priority", "high", "--wait")
    assert done["state"] == "completed"
    tasks = json.loads(ok(tq("list", "--state", "completed", "-o", "json", broker=system.url)))
    assert isinstance(tasks, list)
    mine = [t for t in tasks if t["id"] == done["id"]]
    assert len(mine) == 1
    assert mine[0]["result"] == {"listed": True}
    assert mine[0]["priority"] == "high"
    assert all(t["state"] == "completed" for t in tasks)

    table = ok(tq("list", "--state", "completed", broker=system.url))
    assert "completed tasks" in table
    assert done["id"] in table

    as_yaml = yaml.safe_load(
        ok(tq("list", "--state", "completed", "-o", "yaml", broker=system.url))
    )
    assert done["id"] in [t["id"] for t in as_yaml]


def test_stats_as_table_json_and_yaml(system: System) -> None:
    submit_json(system, "echo", "1", "--wait")
    table = ok(tq("stats", broker=system.url))
    for text in ("tasks by state", "pending", "completed", "queues", "default", "workers: 1"):
        assert text in table, table

    data = json.loads(ok(tq("stats", "-o", "json", broker=system.url)))
    assert set(data["states"]) == {"pending", "running", "completed", "failed", "dead", "cancelled"}
    assert data["states"]["completed"] >= 1
    assert [w["id"] for w in data["workers"]] == [system.worker.worker_id]
    assert "default" in data["queues"]
    assert data["version"]

    as_yaml = yaml.safe_load(ok(tq("stats", "-o", "yaml", broker=system.url)))
    assert set(as_yaml) == set(data)
    assert as_yaml["states"]["completed"] >= data["states"]["completed"]


def test_workers_lists_the_running_worker(system: System) -> None:
    workers = json.loads(ok(tq("workers", "-o", "json", broker=system.url)))
    assert len(workers) == 1
    (w,) = workers
    assert w["id"] == system.worker.worker_id
    assert w["pid"] == system.worker.pid
    assert w["concurrency"] == 4
    assert w["queues"] == ["default"]
    assert w["host"] == socket.gethostname()

    table = ok(tq("workers", broker=system.url))
    assert "workers (1)" in table
    assert system.worker.worker_id in table


def test_broker_address_from_tq_broker_environment(system: System) -> None:
    data = json.loads(ok(tq("stats", "-o", "json", TQ_BROKER=system.url)))
    assert "states" in data


def test_cancel_pending_task(system: System) -> None:
    tid = ok(tq("submit", "echo", "1", "--queue", UNSERVED_QUEUE, broker=system.url)).strip()
    info = json.loads(ok(tq("cancel", tid, "-o", "json", broker=system.url)))
    assert info["state"] == "cancelled"
    line = one_line_error(tq("cancel", tid, broker=system.url))
    assert "INVALID_STATE" in line


def test_submit_wait_of_a_failing_task_exits_1_with_the_error(system: System) -> None:
    result = tq(
        "submit", "fail", '{"message": "on purpose"}', "--max-retries", "0", "--wait",
        broker=system.url,
    )  # fmt: skip
    line = one_line_error(result)
    assert "dead" in line
    assert "RuntimeError: on purpose" in line


# --- errors --------------------------------------------------------------------------------------


def test_no_broker_running_is_one_line_and_exit_1() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    commands = [
        ["stats"],
        ["submit", "echo", "{}"],
        ["status", "some-id"],
        ["list", "--state", "completed"],
        ["workers", "-o", "json"],
    ]
    procs = [
        subprocess.Popen(
            [*TQ, *cmd, "--broker", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=subprocess_env(COLUMNS="200"),
        )
        for cmd in commands
    ]  # all at once: each spends its connect timeout retrying
    results = []
    try:  # every process is reaped before anything is asserted: a failure leaks none of them
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for cmd, result in zip(commands, results, strict=True):
        out = result.stdout
        line = one_line_error(result)
        assert "cannot reach a broker" in line, (cmd, line)
        assert url.removeprefix("tcp://") in line, (cmd, line)
        assert out == "", (cmd, out)


@pytest.mark.parametrize(("value", "why"), [("abc", "whole number"), ("0", "outside 1..4096")])
def test_bad_journal_size_from_environment_is_a_usage_error(
    tmp_path: Path, value: str, why: str
) -> None:
    result = tq("broker", "--port", "0", "--data-dir", str(tmp_path), TQ_JOURNAL_MB=value)
    assert why in one_line_error(result, code=2)
    assert not (tmp_path / "tq-journal").exists()


def test_bad_payload_json_is_a_usage_error() -> None:
    line = one_line_error(tq("submit", "echo", "{not json", broker="tcp://127.0.0.1:1"), code=2)
    assert "not valid JSON" in line


def test_bad_priority_is_a_usage_error() -> None:
    line = one_line_error(
        tq("submit", "echo", "{}", "--priority", "urgent", broker="tcp://127.0.0.1:1"), code=2
    )
    assert "priority" in line


def test_malformed_broker_url_is_a_usage_error() -> None:
    line = one_line_error(tq("stats", broker="ftp://127.0.0.1:7700"), code=2)
    assert "scheme" in line


def test_unknown_task_is_one_line_and_exit_1(system: System) -> None:
    line = one_line_error(tq("status", "no-such-task", broker=system.url))
    assert "TASK_NOT_FOUND" in line


def test_wait_timeout_is_one_line_and_exit_1(system: System) -> None:
    tid = ok(tq("submit", "echo", "1", "--queue", UNSERVED_QUEUE, broker=system.url)).strip()
    line = one_line_error(tq("wait", tid, "--timeout", "0.2", broker=system.url))
    assert "WAIT_TIMEOUT" in line


def test_list_unknown_state_is_a_usage_error(system: System) -> None:
    line = one_line_error(tq("list", "--state", "bogus", broker=system.url), code=2)
    assert "--state must be one of" in line


@pytest.mark.parametrize("conflict", ["port", "data-dir"])
def test_second_broker_on_the_same_port_or_data_dir_is_one_line_and_exit_1(
    system: System, tmp_path: Path, conflict: str
) -> None:
    port = str(system.broker.port) if conflict == "port" else "0"
    data_dir = system.broker.data_dir if conflict == "data-dir" else tmp_path / "d"
    result = tq(
        "broker", "--port", port, "--data-dir", str(data_dir), "--log-level", "warning", timeout=30
    )
    line = one_line_error(result)
    assert ("cannot start broker" if conflict == "port" else "cannot open store") in line
    ok(tq("stats", broker=system.url))  # the running broker is unaffected


# --- tq up -----------------------------------------------------------------------------------


def test_up_runs_broker_and_worker_in_one_process(tmp_path: Path) -> None:
    up = BrokerProcess(tmp_path, command="up").start()
    try:
        result = tq("submit", "echo", '{"up": 1}', "--wait", broker=up.url)
        assert json.loads(ok(result)) == {"up": 1}
        workers = json.loads(ok(tq("workers", "-o", "json", broker=up.url)))
        assert up.proc is not None
        assert [w["pid"] for w in workers] == [up.proc.pid]  # the worker lives in the same process
        assert up.terminate() == 0
    finally:
        up.close()
    up.restart()
    try:
        data = json.loads(ok(tq("stats", "-o", "json", broker=up.url)))
        assert data["states"]["completed"] == 1
    finally:
        up.close()
