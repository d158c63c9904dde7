"""Shared fixtures: real ``tq broker`` / ``tq worker`` processes on 127.0.0.1, port 0, tmp data.

Nothing here sleeps to wait for something: the broker fixture reads its readiness line
(``tq broker listening on HOST:PORT``) from stdout, and everything else waits for a condition
with :func:`wait_until`, a bounded poll. Every process a test starts is killed in teardown, and
when a test fails the tail of every process log is printed with the report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from tq import Client

# Property tests are judged by their examples, not their speed: on a loaded machine generating
# one example of a big message can exceed Hypothesis's 200 ms deadline or its too_slow health check.
settings.register_profile("tq", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tq")

ROOT = Path(__file__).resolve().parent.parent
HANDLERS_APP = str(ROOT / "tests" / "apps" / "handlers.py")
"""``--app`` value that loads the test handlers (``test.record``, ``test.boom``, ...)."""

READY_RE = re.compile(r"^tq broker listening on (?P<host>\S+):(?P<port>\d+)$")
WORKER_READY_RE = re.compile(r"^tq worker (?P<id>\S+) ready")
START_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 15.0

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes
    (AssertionError naming ``what`` and the last value seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate!r} (last: {value!r})"
            )
        time.sleep(interval)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for tq subprocesses: no ambient TQ_* settings leak in from the shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env["PYTHONUNBUFFERED"] = "1"
    # Each of the suite's hundreds of tq processes would compile tq from source again (~0.1 s
    # a start) in a shell that sets this: let the first one cache the bytecode.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # A small commit journal: dozens of brokers per run each write theirs in full at start
    # (4 MiB, not 64), and the suite's workloads pass through journal checkpoints often.
    env["TQ_JOURNAL_MB"] = "4"
    env.update(extra)
    return env


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The command succeeded: its stdout (else the assertion shows its exit code and output)."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with ``code`` and said why in exactly one line, without a traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tq: "), lines[0]
    return lines[0]


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "<no file>"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


class BrokerProcess:
    """A real ``tq broker`` subprocess.

    ``start()`` returns once the readiness line is printed; ``kill()`` is SIGKILL (a crash),
    ``terminate()`` SIGTERM (a clean stop, returns the exit code); ``restart()`` starts again on
    the same data dir, on the same port by default (``same_port=False``: a fresh one).
    ``command="up"`` runs ``tq up`` (broker and worker in one process) the same way.
    """

    def __init__(
        self,
        workdir: Path,
        *args: str,
        data_dir: Path | None = None,
        command: str = "broker",
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.command = command
        self.env = env or {}
        self.args = list(args)
        self.data_dir = data_dir or workdir / "data"
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        self.logs: list[Path] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs: Any) -> Client:
        return Client(self.url, **kwargs)

    def start(self, port: int = 0) -> BrokerProcess:
        assert not self.running, "broker already running"
        n = self.starts
        self.starts += 1
        out_path = self.workdir / f"{self.command}-{n}.out"
        err_path = self.workdir / f"{self.command}-{n}.err"
        self.logs += [out_path, err_path]
        cmd = [
            sys.executable,
            "-m",
            "tq",
            self.command,
            "--host",
            self.host,
            "--port",
            str(port),
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        err = err_path.open("w")
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=self.workdir,
                env=subprocess_env(**self.env),
            )
        finally:
            err.close()
        self.proc = proc
        ready = threading.Event()
        found: dict[str, int] = {}

        def read_stdout() -> None:
            assert proc.stdout is not None
            with proc.stdout, out_path.open("w") as out:
                for line in proc.stdout:
                    out.write(line)
                    out.flush()
                    m = READY_RE.match(line.strip())
                    if m and not ready.is_set():
                        found["port"] = int(m["port"])
                        ready.set()
            ready.set()  # EOF: the process died before (or after) saying it is ready

        self._reader = threading.Thread(target=read_stdout, name=f"broker-{n}-stdout", daemon=True)
        self._reader.start()
        if not ready.wait(START_TIMEOUT_S) or "port" not in found:
            self._stop(signal.SIGKILL)
            raise RuntimeError(
                f"broker did not become ready (exit {proc.returncode}); stderr:\n{tail(err_path)}"
            )
        self.port = found["port"]
        return self

    def _stop(self, sig: int) -> int:
        proc = self.proc
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            rc = proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            if self._reader is not None:
                self._reader.join(5)
        return rc

    def kill(self) -> int:
        """SIGKILL: the broker dies without any chance to clean up."""
        return self._stop(signal.SIGKILL)

    def terminate(self) -> int:
        """SIGTERM: a clean shutdown; returns the exit code."""
        return self._stop(signal.SIGTERM)

    def restart(self, same_port: bool = True) -> BrokerProcess:
        """Start again on the same data dir (kill first if still running)."""
        if self.running:
            self.kill()
        return self.start(self.port if same_port else 0)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def describe(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{tail(p)}" for p in self.logs)

    def events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log records (stderr, every start so far) whose ``event`` is ``event``."""
        records = [
            json.loads(line)
            for path in self.logs
            if path.suffix == ".err"
            for line in path.read_text().splitlines()
            if line.startswith("{")
        ]
        return [r for r in records if r.get("event") == event]


class WorkerProcess(subprocess.Popen[str]):
    """A ``tq worker`` Popen that knows where its output goes and its worker id."""

    stdout_path: Path
    stderr_path: Path
    worker_id: str = ""

    def describe(self) -> str:
        return "\n".join(
            f"--- {p.name} (pid {self.pid}, rc {self.returncode}) ---\n{tail(p)}"
            for p in (self.stdout_path, self.stderr_path)
        )


# --- failure reporting ---------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None) or getattr(request.node, "rep_setup", None)
    return rep is None or rep.failed


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def broker_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., BrokerProcess]]:
    """``broker_factory("--retry-base", "0.05")``: start a broker with extra arguments."""
    brokers: list[BrokerProcess] = []

    def make(
        *args: str, name: str | None = None, env: dict[str, str] | None = None
    ) -> BrokerProcess:
        workdir = tmp_path / (name or f"broker{len(brokers)}")
        workdir.mkdir()
        b = BrokerProcess(workdir, *args, env=env)
        brokers.append(b)
        return b.start()

    yield make
    if _failed(request):
        for b in brokers:
            print(b.describe())
    for b in brokers:
        b.close()


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A fresh broker with default settings."""
    return broker_factory()


TOKEN = "s3cret"


@pytest.fixture
def broker_with_token(broker_factory: Callable[..., BrokerProcess]) -> str:
    """The URL of a broker started with ``TQ_TOKEN`` set to ``TOKEN``."""
    return broker_factory("--http-port", "-1", env={"TQ_TOKEN": TOKEN}).url


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[Client]:
    with Client(broker.url) as c:
        yield c


def launch_worker(
    url: str, *args: str, logdir: Path, app: str | None = None, wait_ready: bool = True
) -> WorkerProcess:
    """Start ``tq worker --broker url *args [--app app]`` with output in ``logdir``; with
    ``wait_ready`` return once it printed its ready line (its ``worker_id`` is then known)."""
    n = len(list(logdir.glob("worker-*.out")))
    out_path = logdir / f"worker-{n}.out"
    err_path = logdir / f"worker-{n}.err"
    cmd = [sys.executable, "-m", "tq", "worker", "--broker", url, *args]
    if app is not None:
        cmd += ["--app", app]
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = WorkerProcess(
            cmd,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=logdir,
            env=subprocess_env(),
        )
    proc.stdout_path, proc.stderr_path = out_path, err_path
    if wait_ready:

        def ready() -> str | None:
            for line in out_path.read_text().splitlines():
                m = WORKER_READY_RE.match(line)
                if m:
                    return m["id"]
            if proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode}:\n{proc.describe()}")
            return None

        try:
            proc.worker_id = wait_until(ready, START_TIMEOUT_S, what="worker ready line")
        except BaseException:
            stop_worker(proc)
            raise
    return proc


def stop_worker(proc: WorkerProcess) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def start_worker(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., WorkerProcess]]:
    """``start_worker(url, "--burst", "-c", "4", app=HANDLERS_APP)``: a real worker process.

    Its stdout/stderr go to files in ``tmp_path``; the call returns once the worker printed its
    ready line (``wait_ready=False`` to skip that). Teardown SIGKILLs whatever is still running.
    """
    workers: list[WorkerProcess] = []
    logdir = tmp_path / "workers"
    logdir.mkdir()

    def start(
        url: str, *args: str, app: str | None = None, wait_ready: bool = True
    ) -> WorkerProcess:
        proc = launch_worker(url, *args, logdir=logdir, app=app, wait_ready=wait_ready)
        workers.append(proc)
        return proc

    yield start
    if _failed(request):
        for w in workers:
            print(w.describe())
    for w in workers:
        stop_worker(w)
