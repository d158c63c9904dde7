"""A real broker with its SSH admin shell on (port 0), test keys, and an asyncssh client."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tests.conftest import BrokerProcess, wait_until

SSH_READY_RE = re.compile(
    r"^tq ssh listening on (?P<host>\S+):(?P<port>\d+) \(host key (?P<fp>\S+)\)$"
)


@dataclass(frozen=True)
class Keys:
    """Private key files (``admin``, ``readonly``, ``stranger``) and the two authorized files."""

    admin: Path
    readonly: Path
    stranger: Path
    admin_file: Path
    readonly_file: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    made = {}
    for name in ("admin", "readonly", "stranger"):
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"{name}@laptop")
        path = tmp_path / f"{name}_key"
        key.write_private_key(path)
        made[name] = (path, key.export_public_key().decode())
    admin_file = tmp_path / "authorized_keys"
    admin_file.write_text("# tq admins\n" + made["admin"][1])
    readonly_file = tmp_path / "readonly_keys"
    readonly_file.write_text(f'from="127.0.0.1" {made["readonly"][1]}')
    paths = (made["admin"][0], made["readonly"][0], made["stranger"][0])
    return Keys(*paths, admin_file, readonly_file)


@dataclass
class SshBroker:
    broker: BrokerProcess
    port: int
    fingerprint: str

    def log(self) -> str:
        """Everything the broker logged (stderr: JSON lines) and printed."""
        return "".join(p.read_text() for p in self.broker.logs if p.exists())

    def log_events(self, event: str) -> list[str]:
        """Lines of the broker's log that carry ``event``."""
        return [line for line in self.log().splitlines() if f'"event": "{event}"' in line]


def ssh_line(broker: BrokerProcess) -> re.Match[str]:
    """The ``tq ssh listening ...`` line of the broker's latest start (printed before it is
    ready, so it is in the file by now)."""
    out = broker.logs[-2]

    def find() -> re.Match[str] | None:
        for line in out.read_text().splitlines():
            if m := SSH_READY_RE.match(line):
                return m
        return None

    return wait_until(find, 5, what="the ssh listening line")


@pytest.fixture
def ssh_broker(broker_factory: Callable[..., BrokerProcess], keys: Keys) -> SshBroker:
    b = broker_factory(
        "--http-port",
        "-1",
        "--retry-base",
        "60",  # a failed task waits for its retry long enough to be explained
        "--ssh-port",
        "0",
        "--ssh-authorized-keys",
        str(keys.admin_file),
        "--ssh-readonly-keys",
        str(keys.readonly_file),
    )
    m = ssh_line(b)
    return SshBroker(b, int(m["port"]), m["fp"])


def connect(port: int, key: Path | None, **kwargs: Any) -> Any:
    """An asyncssh client connection (``async with``), with no ssh config, agent or
    known_hosts of the machine running the tests."""
    return asyncssh.connect(
        "127.0.0.1",
        port,
        username="admin",
        client_keys=[str(key)] if key else None,
        known_hosts=None,
        agent_path=None,
        config=None,
        **kwargs,
    )


async def run(port: int, key: Path, command: str) -> asyncssh.SSHCompletedProcess:
    """``ssh -p PORT admin@127.0.0.1 COMMAND``: one command, its output and exit code."""
    async with connect(port, key) as conn:
        return await conn.run(command, check=False)
