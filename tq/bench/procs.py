"""Real broker and worker processes for benchmarks, started exactly as a user starts them."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO

import psutil

READY = "tq broker listening on "


@dataclass
class BrokerProc:
    """``tq broker`` on 127.0.0.1 with a temp data dir (fsync on, as in production)."""

    data_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="tq-bench-"))
    port: int = 0
    proc: subprocess.Popen[str] | None = None
    started_at: float = 0.0
    own_dir: bool = True
    extra: list[str] = field(default_factory=list)  # more `tq broker` arguments

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tq",
                "broker",
                "--port",
                str(self.port),
                "--data-dir",
                self.data_dir,
                "--log-level",
                "warning",
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.port = _read_port(self.proc.stdout, timeout_s)

    def rss_mb(self) -> float:
        assert self.proc is not None
        return float(psutil.Process(self.proc.pid).memory_info().rss) / 1e6

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def free_raft_ports(n: int) -> list[int]:
    """Raft ports outside the ephemeral range (FACTS.md), checked free on 127.0.0.1."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randint(20_000, 30_000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class ClusterProcs:
    """Three ``tq broker`` processes forming a Raft cluster on loopback."""

    size: int = 3
    nodes: list[BrokerProc] = field(default_factory=list)
    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="tq-bench-cluster-"))

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self) -> None:
        secret = os.path.join(self.root, "secret")
        with open(secret, "w") as fh:
            fh.write(os.urandom(16).hex())
        raft = free_raft_ports(self.size)
        for i, port in enumerate(raft):
            peers = ",".join(f"127.0.0.1:{p}" for p in raft if p != port)
            node = BrokerProc(
                data_dir=os.path.join(self.root, f"n{i}"),
                own_dir=False,
                extra=[
                    "--node-id",
                    f"n{i}",
                    "--raft-port",
                    str(port),
                    "--peers",
                    peers,
                    "--raft-secret-file",
                    secret,
                ],
            )
            node.start()
            self.nodes.append(node)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _read_port(stream: IO[str] | None, timeout_s: float) -> int:
    assert stream is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise RuntimeError("broker exited before it was ready")
        if line.startswith(READY):
            return int(line.strip().rsplit(":", 1)[1])
    raise RuntimeError("broker did not become ready in time")


def start_worker(url: str, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    return subprocess.Popen(
        [sys.executable, "-m", "tq", "worker", "--broker", url, "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
