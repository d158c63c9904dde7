"""The exit-code contract of docs/cli.md: a bad option value is a usage error (exit 2, one line),
found before the broker is asked; a failure is exit 1 with one line that says why.

Usage errors are checked against an address where nothing listens: had the command tried the
broker it would exit 1 ("cannot reach a broker"), so exit 2 also shows that nothing was sent."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.test_cli import free_port, tq
from tests.conftest import (
    BrokerProcess,
    WorkerProcess,
    ok,
    one_line_error,
)


@pytest.fixture(scope="module")
def nowhere() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["list", "--state", "bogus"], "--state must be one of pending, running"),
        (["submit", "echo", "--max-retries", "5000"], "--max-retries must be from 0 to 1000"),
        (["submit", "echo", "--max-retries", "-1"], "--max-retries must be from 0 to 1000"),
        (["submit", "echo", "--timeout", "0"], "--timeout must be above 0"),
        (["submit", "echo", "--timeout", "nan"], "--timeout must be above 0"),
        (["submit", "echo", "--timeout", "604801"], "at most 604800"),
        (["submit", "no spaces"], "task name 'no spaces' must be 1-200 of"),
        (["submit", "echo", "--queue", "a/b"], "--queue 'a/b' must be 1-200 of"),
        (["submit", "echo", "--priority", "urgent"], "--priority must be high, normal or low"),
        (["submit", "echo", '{"x": NaN}'], "payload is not valid JSON: NaN is not a JSON number"),
        (["submit", "echo", "[-Infinity]"], "payload is not valid JSON: -Infinity is not a JSON"),
        (["submit", "echo", "[1e400]"], "payload is not valid JSON: 1e400 is out of range"),
        (["submit", "echo", "--backoff", "-1"], "--backoff must be from 0 to 86400 s"),
        (["submit", "echo", "--id", "a b"], "--id 'a b' must be 1-64 of"),
        (["submit", "echo", "--id", "x" * 65], "must be 1-64 of"),
        (["queue", "pause", "a b"], "queue 'a b' must be 1-200 of"),
        (["queue", "resume", ""], "queue '' must be 1-200 of"),
        (["dlq", "list", "--older-than", "-1"], "--older-than must be a number of seconds >= 0"),
        (["dlq", "purge", "--older-than", "nan"], "--older-than must be a number of seconds >= 0"),
        (["cluster", "add", "10.0.0.5:0"], "'10.0.0.5:0' is not host:port"),
        (["cluster", "add", "10.0.0.5:65536"], "'10.0.0.5:65536' is not host:port"),
        (["cluster", "remove", ":7800"], "':7800' is not host:port"),
        (["cluster", "add", "10.0.0.5"], "'10.0.0.5' is not host:port"),
        # typer's own checks: one line too, not its boxed panel under the usage text
        (["stats", "-o", "xml"], "Invalid value for '--output'"),
        (["list", "--limit", "0"], "Invalid value for '--limit'"),
        (["stats", "--no-such-option"], "No such option: --no-such-option"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_a_bad_value_is_a_usage_error_before_the_broker_is_asked(
    nowhere: str, args: list[str], says: str
) -> None:
    line = one_line_error(tq(*args, broker=nowhere), code=2)
    assert says in line


def test_the_cli_limits_are_the_brokers() -> None:
    from tq.broker.tcp import MAX_RETRIES, MAX_TIMEOUT_S
    from tq.cli import main

    assert (main.MAX_RETRIES, main.MAX_TIMEOUT_S) == (MAX_RETRIES, MAX_TIMEOUT_S)


def test_values_at_the_limits_are_accepted(broker: BrokerProcess) -> None:
    out = ok(
        tq(
            "submit", "echo", "--max-retries", "1000", "--timeout", "604800", "--queue",
            "nobody-serves-this", "-o", "json", broker=broker.url,
        )
    )  # fmt: skip
    with broker.client() as c:
        info = c.status(json.loads(out)["id"])
    assert (info.max_retries, info.timeout_s) == (1000, 604800.0)


@pytest.mark.parametrize("peer", ["127.0.0.1:0", "127.0.0.1:70000", ":7801", "127.0.0.1:7²"])
def test_a_bad_peer_is_a_usage_error(tmp_path: Path, peer: str) -> None:
    result = tq(
        "broker", "--port", "0", "--http-port", "-1", "--data-dir", str(tmp_path / "d"),
        "--raft-port", str(free_port()), "--peers", f"127.0.0.1:7802,{peer}",
    )  # fmt: skip
    line = one_line_error(result, code=2)
    assert f"--peers entry {peer!r} is not host:port" in line
    assert not (tmp_path / "d").exists()  # refused before anything was created


@pytest.mark.parametrize("value", ["-1", "10001", "lots"])
def test_a_bad_spin_is_a_usage_error(tmp_path: Path, value: str) -> None:
    result = tq("broker", "--port", "0", "--data-dir", str(tmp_path / "d"), "--spin-us", value)
    assert "Invalid value for '--spin-us'" in one_line_error(result, code=2)
    assert not (tmp_path / "d").exists()


# --- tq cluster status ---------------------------------------------------------------------------


def test_cluster_status_of_a_single_node_is_healthy(broker: BrokerProcess) -> None:
    result = tq("cluster", "status", "-o", "json", broker=broker.url)
    data = json.loads(ok(result))
    assert result.stderr == ""
    assert data["leader"] == broker.url  # a single node is its own leader
    assert [(n["address"], n["role"]) for n in data["nodes"]] == [(broker.url, "single")]
    assert "leader: " + broker.url in ok(tq("cluster", "status", broker=broker.url))


def test_cluster_status_without_a_reachable_node_says_why(nowhere: str) -> None:
    for fmt in ("table", "json"):
        result = tq("cluster", "status", "-o", fmt, broker=nowhere)
        line = one_line_error(result)
        assert re.fullmatch(rf"tq: no leader: {nowhere}: cannot reach a broker at .*", line)
        assert result.stdout.strip()  # the node table (or document) is still printed
    assert json.loads(result.stdout)["leader"] is None


def test_cluster_status_with_a_wrong_token_names_it(broker_with_token: str, nowhere: str) -> None:
    result = tq("cluster", "status", broker=f"{broker_with_token},{nowhere}", TQ_TOKEN="wrong")
    line = one_line_error(result)
    assert line.startswith(f"tq: no leader: {broker_with_token}: UNAUTHENTICATED: ")
    assert f"; {nowhere}: cannot reach a broker" in line
    ok(tq("cluster", "status", broker=broker_with_token, TQ_TOKEN="s3cret"))


# --- named dead letters --------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["retry"], ["dlq", "retry"], ["dlq", "purge"]])
def test_every_form_naming_ids_fails_for_an_id_not_dead(
    broker: BrokerProcess, command: list[str]
) -> None:
    with broker.client() as c:
        pending = c.submit("echo", None, queue="nobody-serves-this")
    result = tq(*command, "no-such-id", pending, broker=broker.url)
    line = one_line_error(result)
    assert line == f"tq: not in the dead-letter queue: no-such-id, {pending}"
    assert result.stdout.split(":")[1].strip().startswith("0")  # "retried: 0" / "purged: 0"
    dry = one_line_error(tq(*command, "no-such-id", "--dry-run", broker=broker.url))
    assert dry == "tq: not in the dead-letter queue: no-such-id"


def test_a_named_dead_letter_outside_the_filters_is_reported(
    broker: BrokerProcess, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(broker.url, "-q", "other")
    with broker.client() as c:
        tid = c.submit("fail", None, max_retries=0, queue="other")
        assert c.wait(tid, timeout_s=20).state == "dead"
    line = one_line_error(tq("dlq", "purge", tid, "--queue", "default", broker=broker.url))
    assert line == f"tq: not in the dead-letter queue or not matching the filters: {tid}"
    assert f"purged: 1\n  {tid}" in ok(
        tq("dlq", "purge", tid, "--queue", "other", broker=broker.url)
    )
