"""The examples the README walks through run as written against a real broker and worker."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.cli.test_cli import free_port
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def example_broker(broker_factory: Callable[..., Any], start_worker: Callable[..., Any]) -> Any:
    broker = broker_factory("--retry-base", "0.05")
    start_worker(broker.url, "-c", "8", app=str(EXAMPLES / "handlers.py"))
    return broker


def _run(script: str, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), url],
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


def _final_states(stdout: str) -> dict[str, int]:
    found = re.search(r"^final states: (\{.*?\});", stdout, flags=re.MULTILINE)
    assert found, stdout
    states: dict[str, int] = ast.literal_eval(found[1])
    return states


def test_producer_submits_a_batch_and_every_task_finishes(example_broker: Any) -> None:
    out = _run("producer.py", example_broker.url)
    assert "submitted 31 tasks" in out.stdout
    # A flaky task fails each attempt with p = 0.3: about one run in 13 has one end dead (4
    # failures), and the producer then exits 1 (test_producer_exits_1_when_a_task_ends_dead).
    states = _final_states(out.stdout)
    assert sum(states.values()) == 31
    assert out.returncode == (0 if states == {"completed": 31} else 1), (states, out.stderr)
    assert "not finished" not in out.stdout
    with example_broker.client() as c:
        assert c.stats()["states"]["completed"] >= 21  # 20 adds + the word count at least


def test_workflow_fans_out_then_summarizes(example_broker: Any) -> None:
    out = _run("workflow.py", example_broker.url)
    assert out.returncode == 0, out.stderr
    assert "fan-out:" in out.stdout
    assert "summary:" in out.stdout


ALWAYS_DOWN = """
from tq import task


@task
def flaky(payload):
    raise ConnectionError(f"upstream for item {payload.get('item')} did not answer")
"""


def test_producer_exits_1_when_a_task_ends_dead(
    broker_factory: Callable[..., Any], start_worker: Callable[..., Any], tmp_path: Path
) -> None:
    broker = broker_factory("--retry-base", "0.01")
    always_down = tmp_path / "always_down.py"  # loaded after handlers.py: its flaky wins
    always_down.write_text(ALWAYS_DOWN)
    start_worker(
        broker.url, "-c", "8", "--app", str(EXAMPLES / "handlers.py"), app=str(always_down)
    )
    out = _run("producer.py", broker.url)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert _final_states(out.stdout) == {"completed": 21, "dead": 10}
    dead = [line for line in out.stdout.splitlines() if "dead after 4 attempts" in line]
    assert len(dead) == 10
    assert "ConnectionError: upstream for item" in dead[0]


@pytest.mark.parametrize("script", ["producer.py", "workflow.py"])
@pytest.mark.parametrize("address", ["nonsense", "ftp://127.0.0.1:7700"])
def test_a_bad_address_is_one_line_and_exit_2(script: str, address: str) -> None:
    out = _run(script, address)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    [line] = out.stderr.splitlines()  # one line, no traceback
    assert line.startswith(f"{script.removesuffix('.py')}: "), line
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("script", ["producer.py", "workflow.py"])
def test_no_broker_is_one_line_and_exit_2(script: str) -> None:
    out = _run(script, f"tcp://127.0.0.1:{free_port()}", TQ_CONNECT_TIMEOUT="1")
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.splitlines()
    assert "UNAVAILABLE" in line
