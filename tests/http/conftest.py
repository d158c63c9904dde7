"""Fixtures for the HTTP face: real ``tq broker`` processes with ``--port 0 --http-port 0``.

:class:`HttpBroker` starts one and returns once both readiness lines are printed
(``tq broker listening on HOST:PORT`` then ``tq http listening on HOST:PORT``); :class:`Api` is a
small JSON client over ``http.client`` (one connection per request, nothing to leak).
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import READY_RE, START_TIMEOUT_S, _failed, subprocess_env, tail

HTTP_READY_RE = re.compile(r"^tq http listening on (?P<host>\S+):(?P<port>\d+)$")
HOST = "127.0.0.1"


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip()

    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """``api.get("/api/v1/tasks", state="pending")``, ``api.post("/api/v1/tasks", {...})``."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.base = f"http://{HOST}:{port}"
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Response:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        if self.token is not None:
            hdrs["Authorization"] = f"Bearer {self.token}"
        hdrs.update(headers or {})
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **params: Any) -> Response:
        query = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path + ("?" + urllib.parse.urlencode(query) if query else ""))

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Response:
        return self.request("POST", path, body, **kwargs)

    def ok(self, method: str, path: str, body: Any = None, status: int = 200, **params: Any) -> Any:
        """The JSON body of a request that must answer ``status``."""
        resp = self.get(path, **params) if method == "GET" else self.post(path, body)
        assert resp.status == status, (resp.status, resp.body[:2000])
        return resp.json()

    def task(self, task_id: str) -> dict[str, Any]:
        return dict(self.ok("GET", f"/api/v1/tasks/{task_id}"))

    def states(self) -> dict[str, int]:
        return dict(self.ok("GET", "/api/v1/stats")["states"])


class HttpBroker:
    """A real ``tq broker --port 0 --http-port 0`` with its HTTP API."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.args = list(args)
        self.env = env or {}
        self.port = 0
        self.http_port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.out_path = workdir / "broker.out"
        self.err_path = workdir / "broker.err"
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"tcp://{HOST}:{self.port}"

    def api(self, token: str | None = None) -> Api:
        return Api(self.http_port, token)

    def start(self) -> HttpBroker:
        cmd = [sys.executable, "-m", "tq", "broker", "--host", HOST, "--port", "0"]
        cmd += ["--http-port", "0", "--data-dir", str(self.workdir / "data"), *self.args]
        with self.err_path.open("w") as err:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=self.workdir,
                env=subprocess_env(**self.env),
            )
        self.proc = proc
        ready = threading.Event()
        found: dict[str, int] = {}

        def read_stdout() -> None:
            assert proc.stdout is not None
            with proc.stdout, self.out_path.open("w") as out:
                for line in proc.stdout:
                    out.write(line)
                    out.flush()
                    if m := READY_RE.match(line.strip()):
                        found["tcp"] = int(m["port"])
                    elif m := HTTP_READY_RE.match(line.strip()):
                        found["http"] = int(m["port"])
                        ready.set()
            ready.set()

        self._reader = threading.Thread(target=read_stdout, name="http-broker-stdout", daemon=True)
        self._reader.start()
        if not ready.wait(START_TIMEOUT_S) or "http" not in found or "tcp" not in found:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"broker did not become ready; stderr:\n{tail(self.err_path)}")
        self.port, self.http_port = found["tcp"], found["http"]
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        proc = self.proc
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if self._reader is not None:
                self._reader.join(5)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop(signal.SIGKILL)

    def describe(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{tail(p)}" for p in (self.out_path, self.err_path))


BrokerFactory = Callable[..., HttpBroker]


@pytest.fixture
def http_broker_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerFactory]:
    """``http_broker_factory("--retry-base", "0.05", env={...})``: start a broker."""
    brokers: list[HttpBroker] = []

    def make(*args: str, env: dict[str, str] | None = None) -> HttpBroker:
        workdir = tmp_path / f"http-broker{len(brokers)}"
        workdir.mkdir()
        broker = HttpBroker(workdir, *args, env=env)
        brokers.append(broker)
        return broker.start()

    yield make
    if _failed(request):
        for b in brokers:
            print(b.describe())
    for b in brokers:
        b.close()


@pytest.fixture
def http_broker(http_broker_factory: BrokerFactory) -> HttpBroker:
    """A fresh broker whose retries come fast (``--retry-base 0.05``)."""
    return http_broker_factory("--retry-base", "0.05")


@pytest.fixture
def api(http_broker: HttpBroker) -> Api:
    return http_broker.api()


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpBroker]:
    """One broker for a module of tests that do not depend on each other's tasks."""
    workdir = tmp_path_factory.mktemp("shared-http-broker")
    broker = HttpBroker(workdir, "--max-frame", str(12 * 1024 * 1024)).start()
    try:
        yield broker
    finally:
        broker.close()
