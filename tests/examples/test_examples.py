"""The examples the README walks through run as written against a real broker and worker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def example_broker(broker_factory: Callable[..., Any], start_worker: Callable[..., Any]) -> Any:
    broker = broker_factory("--retry-base", "0.05")
    start_worker(broker.url, "-c", "8", app=str(EXAMPLES / "handlers.py"))
    return broker


def _run(script: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


def test_producer_submits_a_batch_and_every_task_finishes(example_broker: Any) -> None:
    out = _run("producer.py", example_broker.url)
    assert out.returncode == 0, out.stderr
    assert "submitted 31 tasks" in out.stdout
    assert "not finished" not in out.stdout
    with example_broker.client() as c:
        assert c.stats()["states"]["completed"] >= 21  # 20 adds + the word count at least


def test_workflow_fans_out_then_summarizes(example_broker: Any) -> None:
    out = _run("workflow.py", example_broker.url)
    assert out.returncode == 0, out.stderr
    assert "fan-out:" in out.stdout
    assert "summary:" in out.stdout
