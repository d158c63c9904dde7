"""Files that hold task payloads or keys are kept from other local users (found by a security
review: a new data dir was 0755 with a 0644 journal, a refreshed export fell back to 0644, and an
authorized_keys file anyone could write was accepted)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncssh
from tq import Client

from tests.conftest import BrokerProcess, one_line_error, subprocess_env


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_dir_and_its_journal_are_owner_only(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory()
    assert mode(broker.data_dir) == 0o700
    assert mode(broker.data_dir / "tq-journal") & 0o077 == 0


def test_refreshing_an_export_keeps_the_files_mode(broker: BrokerProcess, tmp_path: Path) -> None:
    with Client(broker.url) as c:
        c.submit("echo", 1)  # nothing finished: an empty export is still a file
    out = tmp_path / "tasks.csv"

    def export() -> None:
        result = subprocess.run(
            [sys.executable, "-m", "tq", "export", "--out", str(out), "--broker", broker.url],
            capture_output=True,
            text=True,
            timeout=60,
            env=subprocess_env(),
            check=False,
        )
        assert result.returncode == 0, result.stderr

    export()
    os.chmod(out, 0o600)
    export()
    assert mode(out) == 0o600


def _broker_with_keys(tmp_path: Path, keys: Path) -> subprocess.CompletedProcess[str]:
    data = str(tmp_path / "d")
    ssh = ["--ssh-port", "0", "--ssh-authorized-keys", str(keys)]
    return subprocess.run(
        [sys.executable, "-m", "tq", "broker", "--port", "0", "--data-dir", data, *ssh],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        check=False,
    )


def test_an_authorized_keys_file_others_can_write_is_refused(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519", comment="admin@laptop")
    keys = tmp_path / "admins"
    keys.write_bytes(key.export_public_key())
    os.chmod(keys, 0o666)
    line = one_line_error(_broker_with_keys(tmp_path, keys), code=2)
    assert "can be written by other users" in line


def test_a_host_key_others_can_read_is_refused(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519", comment="admin@laptop")
    keys = tmp_path / "admins"
    keys.write_bytes(key.export_public_key())
    os.chmod(keys, 0o644)
    data = tmp_path / "d"
    data.mkdir()
    host = data / "ssh_host_ed25519_key"
    host.write_bytes(key.export_private_key())
    os.chmod(host, 0o644)
    result = _broker_with_keys(tmp_path, keys)
    assert result.returncode != 0
    assert "can be read by other users" in result.stderr
