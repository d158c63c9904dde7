"""/healthz, /readyz, the --http-port flag and a clean stop."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tq import Client

from tests.conftest import READY_RE, BrokerProcess, subprocess_env, wait_until
from tests.http.conftest import HTTP_READY_RE, Api, HttpBroker


def test_healthz_and_readyz_answer_on_a_running_broker(api: Api) -> None:
    assert api.ok("GET", "/healthz") == {"status": "ok"}
    assert api.ok("GET", "/readyz") == {"ready": True, "role": "single", "leader": None}


def test_sigterm_stops_the_broker_cleanly_with_http_on(http_broker: HttpBroker, api: Api) -> None:
    api.ok("POST", "/api/v1/tasks", {"name": "echo"}, status=201)
    assert http_broker.stop() == 0
    assert "Traceback" not in http_broker.err_path.read_text()


def test_http_port_minus_one_turns_http_off(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path, "--http-port", "-1").start()
    try:
        with Client(broker.url) as c:
            c.stats()  # the broker is past its readiness lines
        assert broker.terminate() == 0
    finally:
        broker.close()
    lines = (tmp_path / "broker-0.out").read_text().splitlines()
    assert READY_RE.match(lines[0])
    assert not any(HTTP_READY_RE.match(line) for line in lines)


def test_an_explicit_http_port_that_is_taken_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "tq", "broker", "--port", "0", "--http-port", str(port)]
        cmd += ["--data-dir", str(tmp_path / "data")]
        run = subprocess.run(
            cmd, env=subprocess_env(), capture_output=True, text=True, timeout=30, cwd=tmp_path
        )
    assert run.returncode == 1
    assert f"HTTP port {port}" in run.stderr


def test_the_default_http_port_falls_back_to_a_free_one_when_taken(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        # The test must hold the port itself: held by another process, it may be let go before
        # our broker binds (a `tq up` that stopped meanwhile made this test fail). Other tests'
        # brokers (in parallel runs) take it for a second or two at a time: wait for a gap.
        deadline = time.monotonic() + 20
        while True:
            try:
                blocker.bind(("127.0.0.1", 7701))
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.skip("127.0.0.1:7701 is in use by another process")
                time.sleep(0.05)
        blocker.listen()
        broker = BrokerProcess(tmp_path).start()
        out = tmp_path / "broker-0.out"

        def http_lines() -> list[re.Match[str]]:
            # start() returns at the TCP ready line; the HTTP one follows it (a race under load)
            return [m for line in out.read_text().splitlines() if (m := HTTP_READY_RE.match(line))]

        try:
            with Client(broker.url) as c:
                c.stats()
            http = wait_until(http_lines, what="the HTTP ready line")
        finally:
            broker.close()
    assert len(http) == 1
    assert int(http[0]["port"]) not in (0, 7701)


def test_a_half_sent_request_is_closed_after_the_hello_timeout(
    http_broker_factory: Callable[..., HttpBroker],
) -> None:
    """A request head that never ends used to hold its socket for about an hour (aiohttp's
    default); complete requests on other connections are served meanwhile."""
    broker = http_broker_factory("--hello-timeout", "1")
    slow = socket.create_connection(("127.0.0.1", broker.http_port), timeout=15)
    try:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
        t0 = time.monotonic()
        assert broker.api().get("/healthz").status == 200
        assert slow.recv(1024) == b""  # closed by the broker, nothing answered
        assert 0.5 < time.monotonic() - t0 < 8
    finally:
        slow.close()
