"""Broker logs are structured: JSON lines with `noun.verb` events, and never a payload."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tq import Client

from tests.conftest import READY_RE


def test_broker_logs_json_lines_with_event_names_and_no_payloads(tmp_path: Path) -> None:
    err = tmp_path / "broker.err"
    with err.open("w") as err_fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tq",
                "broker",
                "--port",
                "0",
                "--data-dir",
                str(tmp_path / "data"),
                "--log-format",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=err_fh,
            text=True,
        )
        try:
            assert proc.stdout is not None
            match = READY_RE.match(proc.stdout.readline().strip())
            assert match is not None
            port = int(match["port"])
            secret = "payload-that-must-not-be-logged"
            with Client(f"tcp://127.0.0.1:{port}") as c:
                c.submit("echo", {"secret": secret})
        finally:
            proc.terminate()
            code = proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()
        assert code == 0
    lines = [json.loads(raw) for raw in err.read_text().splitlines() if raw.strip()]
    events = [entry["event"] for entry in lines]
    assert "broker.started" in events
    assert "broker.stopped" in events
    for entry in lines:
        assert re.fullmatch(r"[a-z_]+\.[a-z_]+", entry["event"]), entry
        assert {"ts", "level", "logger"} <= set(entry)
    assert secret not in err.read_text()
