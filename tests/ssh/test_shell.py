"""The SSH admin shell of a real broker, driven by asyncssh's client: one-shot commands with
admin and read-only keys, refused keys and passwords, an interactive session on a PTY, the host
key across restarts, and the audit log."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tests.conftest import HANDLERS_APP, WorkerProcess, subprocess_env, wait_until
from tests.ssh.conftest import Keys, SshBroker, connect, run, ssh_line

EXIT_REFUSED = 77
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def paused(ssh: SshBroker, queue: str) -> bool:
    with ssh.broker.client() as c:
        return bool(c.stats()["queues"].get(queue, {}).get("paused"))


async def test_admin_runs_one_command_and_gets_its_output_and_exit_code(
    ssh_broker: SshBroker, keys: Keys
) -> None:
    result = await run(ssh_broker.port, keys.admin, "stats -o json")
    assert result.exit_status == 0, result.stderr
    assert json.loads(str(result.stdout))["states"]["pending"] == 0

    missing = await run(ssh_broker.port, keys.admin, "status no-such-task")
    assert missing.exit_status == 1
    assert missing.stderr == "tq: TASK_NOT_FOUND: no task no-such-task\n"

    usage = await run(ssh_broker.port, keys.admin, "list --no-such-option")
    assert usage.exit_status == 2
    assert usage.stderr == "tq: No such option: --no-such-option\n"


async def test_admin_pauses_a_queue_and_the_command_is_logged_with_the_key_comment(
    ssh_broker: SshBroker, keys: Keys
) -> None:
    result = await run(ssh_broker.port, keys.admin, "queue pause q1")
    assert (result.exit_status, result.stdout) == (0, "paused q1\n")
    assert paused(ssh_broker, "q1")

    [line] = ssh_broker.log_events("ssh.command")
    entry = json.loads(line)
    assert entry["key"] == "admin@laptop"
    assert (entry["command"], entry["arguments"]) == ("queue pause", 1)
    assert entry["role"] == "admin"
    assert entry["exit"] == 0
    assert "PRIVATE KEY" not in ssh_broker.log()


async def test_read_only_key_can_look_but_changes_are_refused(
    ssh_broker: SshBroker, keys: Keys
) -> None:
    stats = await run(ssh_broker.port, keys.readonly, "stats")
    assert stats.exit_status == 0, stats.stderr
    assert "tasks by state" in str(stats.stdout)

    for command in ("queue pause q1", "dlq purge --queue q1 --dry-run", "submit echo"):
        refused = await run(ssh_broker.port, keys.readonly, command)
        assert refused.exit_status == EXIT_REFUSED, command
        assert "read-only" in str(refused.stderr)
        assert refused.stdout == ""
    assert not paused(ssh_broker, "q1")
    with ssh_broker.broker.client() as c:
        assert c.stats()["states"]["pending"] == 0

    logged = [json.loads(line) for line in ssh_broker.log_events("ssh.refused")]
    assert logged[0]["command"] == "queue pause"
    assert {e["key"] for e in logged} == {"readonly@laptop"}


async def test_unknown_key_and_passwords_are_refused(ssh_broker: SshBroker, keys: Keys) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await run(ssh_broker.port, keys.stranger, "stats")
    for auth in ("password", "keyboard-interactive"):
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(ssh_broker.port, None, password="hunter2", preferred_auth=auth):
                pass
    assert ssh_broker.log_events("ssh.key_refused")


async def test_shell_runs_only_admin_commands_against_its_own_broker(
    ssh_broker: SshBroker, keys: Keys
) -> None:
    for command in ("bench", "broker", "worker", "up"):
        result = await run(ssh_broker.port, keys.admin, command)
        assert result.exit_status == 2, command
        assert "unknown command" in str(result.stderr)
    for command in ("stats --broker tcp://10.0.0.1:7700", "stats -b tcp://x:1", "stats --broker=x"):
        result = await run(ssh_broker.port, keys.admin, command)
        assert result.exit_status == 2, command
        assert "--broker" in str(result.stderr)
    help_text = await run(ssh_broker.port, keys.readonly, "help")
    assert help_text.exit_status == 0
    assert "queue pause" in str(help_text.stdout)
    assert "admin keys only" in str(help_text.stdout)


async def read_until(process: asyncssh.SSHClientProcess[str], marker: str) -> str:
    seen = ""

    async def read() -> None:
        nonlocal seen
        while marker not in seen:
            chunk = await process.stdout.read(4096)
            assert chunk, f"session closed before {marker!r}; got {seen!r}"
            seen += chunk

    try:
        await asyncio.wait_for(read(), 10)
    except TimeoutError:
        raise AssertionError(f"no {marker!r} in {seen!r}") from None
    return seen


async def test_interactive_session_on_a_pty_prompts_runs_stats_and_completes_commands(
    ssh_broker: SshBroker, keys: Keys
) -> None:
    async with connect(ssh_broker.port, keys.admin) as conn:
        process = await conn.create_process(term_type="xterm", term_size=(120, 40))
        assert "admin shell" in await read_until(process, "tq> ")

        process.stdin.write("stats\r")
        out = await read_until(process, "tq> ")
        assert "tasks by state" in out
        assert "┏" in out  # a rich table, on the terminal
        assert "\r\n" in out

        process.stdin.write("queue pa\t")  # Tab completes the subcommand
        assert "queue pause " in await read_until(process, "pause ")
        process.stdin.write("q2\r")
        assert "paused q2" in await read_until(process, "tq> ")

        process.change_terminal_size(50, 40)  # tables follow the terminal's width
        process.stdin.write("stats\r")
        out = await read_until(process, "tq> ")
        table_lines = [ANSI.sub("", line) for line in out.split("\r\n") if "┃" in line]
        assert table_lines
        assert max(len(line) for line in table_lines) <= 50

        process.stdin.write("status nope\r")  # errors show on the terminal too
        assert "TASK_NOT_FOUND" in await read_until(process, "tq> ")

        process.stdin.write("exit\r")
        await asyncio.wait_for(process.wait_closed(), 10)
    assert paused(ssh_broker, "q2")


async def test_host_key_is_created_once_then_reused(ssh_broker: SshBroker, keys: Keys) -> None:
    key_file = ssh_broker.broker.data_dir / "ssh_host_ed25519_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    async with connect(ssh_broker.port, keys.admin) as conn:
        server_key = conn.get_server_host_key()
        assert server_key is not None
        assert server_key.get_fingerprint() == ssh_broker.fingerprint

    assert ssh_broker.broker.terminate() == 0
    ssh_broker.broker.start()
    again = ssh_line(ssh_broker.broker)
    assert again["fp"] == ssh_broker.fingerprint
    result = await run(int(again["port"]), keys.admin, "stats")
    assert result.exit_status == 0


async def test_explain_and_retry_a_dead_task_through_the_shell(
    ssh_broker: SshBroker, keys: Keys
) -> None:
    with ssh_broker.broker.client() as c:
        c.pause_queue("held")
        held = c.submit("echo", {}, queue="held", priority="high")
    result = await run(ssh_broker.port, keys.readonly, f"explain {held} -o json")
    assert result.exit_status == 0, result.stderr
    why = json.loads(str(result.stdout))
    assert (why["state"], why["paused"], why["attempt"], why["max_attempts"]) == (
        "pending",
        True,
        0,
        4,
    )
    assert "paused" in why["why"]

    table = await run(ssh_broker.port, keys.readonly, f"explain {held}")
    assert "queue resume held" in str(table.stdout)

    refused = await run(ssh_broker.port, keys.readonly, f"retry {held}")
    assert refused.exit_status == EXIT_REFUSED
    not_dead = await run(ssh_broker.port, keys.admin, f"retry {held} -o json")
    assert not_dead.exit_status == 1
    assert json.loads(str(not_dead.stdout)) == {"dry_run": False, "retried": []}
    assert "not in the dead-letter queue" in str(not_dead.stderr)


async def test_explain_says_why_for_dead_failed_and_running_tasks_and_retry_revives_the_dead(
    ssh_broker: SshBroker, keys: Keys, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(ssh_broker.broker.url, "-c", "4", app=HANDLERS_APP)
    with ssh_broker.broker.client() as c:
        dead = c.submit("test.boom", 1, max_retries=0)
        failed = c.submit("test.boom", 2, max_retries=2)
        running = c.submit("test.slow_sync", 30)
        wait_until(lambda: c.status(dead).state == "dead", what="dead")
        wait_until(lambda: c.status(failed).state == "failed", what="failed")
        wait_until(lambda: c.status(running).state == "running", what="running")

    async def explain(task_id: str) -> dict[str, Any]:
        result = await run(ssh_broker.port, keys.readonly, f"explain {task_id} -o json")
        assert result.exit_status == 0, result.stderr
        data: dict[str, Any] = json.loads(str(result.stdout))
        return data

    why = await explain(dead)
    assert (why["state"], why["attempt"], why["max_attempts"]) == ("dead", 1, 1)
    assert why["last_error"] == {"type": "ValueError", "message": "boom: 1"}
    assert f"tq retry {dead}" in why["why"]

    why = await explain(failed)
    assert (why["state"], why["attempt"], why["max_attempts"]) == ("failed", 1, 3)
    # retry base 60 s, jitter [0.5, 1): due 30-60 s after the failure, which was a moment ago
    assert why["retry_at_ms"] > time.time() * 1000 + 20_000
    assert why["last_error"]["type"] == "ValueError"
    assert "retry is due" in why["why"]

    why = await explain(running)
    assert (why["state"], why["worker_id"]) == ("running", worker.worker_id)
    assert why["running_since_ms"] > 0

    revived = await run(ssh_broker.port, keys.admin, f"retry {dead} -o json")
    assert revived.exit_status == 0, revived.stderr
    assert json.loads(str(revived.stdout)) == {"dry_run": False, "retried": [dead]}
    with ssh_broker.broker.client() as c:  # it ran again, and died again
        wait_until(lambda: c.stats()["counters"].get("dead_lettered") == 2, what="second death")
        assert c.status(dead).state == "dead"


def test_ssh_options_are_checked_before_the_broker_starts(tmp_path: Path, keys: Keys) -> None:
    bad = tmp_path / "bad_keys"
    bad.write_text("# comment\nssh-ed25519 not-base64 someone\n")
    cases = [
        (["--ssh-port", "0"], "--ssh-port needs --ssh-authorized-keys"),
        (["--ssh-authorized-keys", str(keys.admin_file)], "need --ssh-port"),
        (["--ssh-port", "0", "--ssh-authorized-keys", str(bad)], f"{bad}:2"),
        (["--ssh-port", "0", "--ssh-authorized-keys", str(tmp_path / "none")], "cannot read"),
    ]
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "tq", "broker", "--data-dir", str(tmp_path / "d"), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=subprocess_env(),
        )
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


async def test_the_audit_log_names_the_command_but_never_a_payload(
    ssh_broker: SshBroker, keys: Keys
) -> None:
    secret = "sk-live-0123456789"
    result = await run(ssh_broker.port, keys.admin, f'submit echo \'{{"api_key": "{secret}"}}\'')
    assert result.exit_status == 0, result.stderr
    refused = await run(ssh_broker.port, keys.readonly, f"submit echo '\"{secret}\"'")
    assert refused.exit_status == EXIT_REFUSED
    [line] = ssh_broker.log_events("ssh.command")
    assert json.loads(line)["command"] == "submit"
    assert secret not in ssh_broker.log()


async def test_user_text_is_neither_markup_nor_terminal_control(
    ssh_broker: SshBroker, keys: Keys
) -> None:
    markup = await run(ssh_broker.port, keys.readonly, "status '[/foo]'")
    assert markup.exit_status == 1
    assert markup.stderr == "tq: TASK_NOT_FOUND: no task [/foo]\n"
    control = await run(ssh_broker.port, keys.readonly, "status 'a\x1b]0;PWN\x07b'")
    assert control.exit_status == 1
    assert "\x1b" not in str(control.stderr)  # the ESC itself never reaches the terminal
    assert "\\x1b]0;PWN\\x07" in str(control.stderr)  # shown escaped instead


async def test_long_waits_are_refused_in_the_shell(ssh_broker: SshBroker, keys: Keys) -> None:
    for command in ("wait some-id --timeout 3600", "submit echo --wait --wait-timeout=600"):
        refused = await run(ssh_broker.port, keys.admin, command)
        assert refused.exit_status != 0, command
        assert "at most 60 s in the shell" in str(refused.stderr)
