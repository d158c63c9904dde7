"""What the SSH server refuses beyond unknown keys: authorized_keys options it would not honour
(they were accepted and ignored: a `command="stats"` admin key could pause queues) and
subsystems (any but sftp got the interactive shell, fed the subsystem's protocol as lines)."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest
from tq.cli.sshd import read_keys

from tests.ssh.conftest import Keys, SshBroker, connect


def _public(comment: str = "ops@laptop") -> str:
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    return key.export_public_key().decode().strip()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ('restrict,command="stats"', "restrict"),
        ('command="stats"', "command"),
        ('from="127.0.0.1",no-pty', "no-pty"),
        ("cert-authority", "cert-authority"),
        ('environment="A=1"', "environment"),
    ],
)
def test_options_other_than_from_are_refused_by_line(
    tmp_path: Path, options: str, named: str
) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text(f"# admins\n{_public()}\n{options} {_public()}\n")
    with pytest.raises(ValueError, match=f"authorized_keys:3: option {named} is not supported"):
        read_keys(str(path), admin=True)


def test_from_is_honoured_with_commas_inside_its_quotes(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text(f'from="127.0.0.1,::1" {_public("a@b")}\nFROM="10.0.0.0/8" {_public()}\n')
    keys = read_keys(str(path), admin=False)
    assert [k.comment for k in keys] == ["a@b", "ops@laptop"]


async def test_a_subsystem_request_gets_no_shell(ssh_broker: SshBroker, keys: Keys) -> None:
    async with connect(ssh_broker.port, keys.admin) as conn:
        for name in ("foo", "netconf"):
            process = await conn.create_process(subsystem=name)
            result = await process.wait(check=False)
            assert result.exit_status == 2
            assert result.stderr == f"tq: subsystem {name} is not supported\n"
            assert "admin shell" not in str(result.stdout)
        # The connection still runs commands.
        done = await conn.run("stats -o json", check=False)
        assert done.exit_status == 0, done.stderr
