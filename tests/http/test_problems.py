"""Every error is application/problem+json (RFC 9457) with tq's stable code."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
from tq import Client
from tq.broker.http import STATUS_BY_CODE, problem_for
from tq.errors import ERRORS_BY_CODE, NotLeader, ShuttingDown, Unauthenticated

from tests.conftest import subprocess_env
from tests.http.conftest import Api, HttpBroker, Response

TASKS = "/api/v1/tasks"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def api(shared_broker: HttpBroker) -> Api:
    return shared_broker.api()


def problem(resp: Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body[:500])
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"urn:tq:error:{code}"
    assert body["title"]
    assert body["detail"]
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "echo", "priority": 7}, "priority"),
        ({"name": "echo", "priority": "urgent"}, "priority"),
        ({"payload": 1}, "name"),
        ({"name": "no spaces"}, "name"),
        ({"name": "echo", "queue": ""}, "queue"),
        ({"name": "echo", "timeout_s": 0}, "timeout_s"),
        ({"name": "echo", "max_retries": 1001}, "max_retries"),
        ({"name": "echo", "id": "x" * 65}, "id"),
        ({"name": "echo", "qeue": "typo"}, "qeue"),
    ],
)
def test_a_bad_task_is_400_naming_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    found = problem(api.post(TASKS, body), 400, "BAD_REQUEST")
    assert found["field"] == field
    assert found["instance"] == TASKS


def test_a_bad_task_in_a_batch_names_its_index(api: Api) -> None:
    tasks = [{"name": "echo"}, {"name": "echo", "queue": "bad queue"}]
    found = problem(api.post(f"{TASKS}/batch", {"tasks": tasks}), 400, "BAD_REQUEST")
    assert found["field"] == "tasks[1].queue"
    problem(api.post(f"{TASKS}/batch", {"tasks": []}), 400, "BAD_REQUEST")


def test_a_body_that_is_not_json_is_400(api: Api) -> None:
    found = problem(api.post(TASKS, raw=b"{not json"), 400, "BAD_REQUEST")
    assert "field" not in found


def test_json_nested_too_deeply_is_400_not_500(api: Api) -> None:
    """msgspec raises RecursionError on such a body: it was a 500 with a traceback."""
    body = b'{"name": "echo", "payload": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    found = problem(api.post(TASKS, raw=body), 400, "BAD_REQUEST")
    assert "nested too deeply" in found["detail"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"state": "sleeping"}, "state"),
        ({"cursor": "bm9wZQ"}, "cursor"),
        ({"since": -1}, "since"),
    ],
)
def test_a_bad_query_parameter_is_400_naming_it(
    api: Api, params: dict[str, Any], field: str
) -> None:
    assert problem(api.get(TASKS, **params), 400, "BAD_REQUEST")["field"] == field


def test_a_cursor_of_another_state_is_refused(api: Api) -> None:
    api.ok("POST", f"{TASKS}/batch", {"tasks": [{"name": "echo"}] * 3}, status=201)
    cursor = api.ok("GET", TASKS, state="pending", limit=1)["next_cursor"]
    found = problem(api.get(TASKS, state="completed", cursor=cursor), 400, "BAD_REQUEST")
    assert found["field"] == "cursor"


def test_unknown_task_and_unknown_route_are_404(api: Api) -> None:
    problem(api.get(f"{TASKS}/no-such-task"), 404, "TASK_NOT_FOUND")
    problem(api.post(f"{TASKS}/no-such-task/cancel"), 404, "TASK_NOT_FOUND")
    problem(api.get("/api/v1/nothing-here"), 404, "UNKNOWN_MESSAGE")
    problem(api.request("DELETE", TASKS), 405, "UNKNOWN_MESSAGE")


def test_a_payload_over_10_mib_is_413(api: Api) -> None:
    body = {"name": "echo", "payload": "x" * (10 * MiB)}
    found = problem(api.post(TASKS, body), 413, "PAYLOAD_TOO_LARGE")
    assert found["field"] == "payload"
    batch = {"tasks": [{"name": "echo"}, body]}
    found = problem(api.post(f"{TASKS}/batch", batch), 413, "PAYLOAD_TOO_LARGE")
    assert found["field"] == "tasks[1].payload"


def test_a_body_over_the_frame_limit_is_413(api: Api) -> None:
    raw = b'{"name": "echo", "payload": "' + b"x" * (13 * MiB) + b'"}'
    problem(api.post(TASKS, raw=raw), 413, "PAYLOAD_TOO_LARGE")


def test_a_bad_path_parameter_is_400(api: Api) -> None:
    assert problem(api.post("/api/v1/queues/a%20b/pause"), 400, "BAD_REQUEST")["field"] == "queue"
    assert problem(api.get(f"{TASKS}/{'x' * 65}"), 400, "BAD_REQUEST")["field"] == "task_id"


def test_not_leader_is_503_with_the_leader_in_body_and_headers() -> None:
    body, headers = problem_for(NotLeader("not the leader", leader="tcp://10.0.0.2:7700"))
    assert body.status == 503
    assert body.code == "NOT_LEADER"
    assert body.leader == "tcp://10.0.0.2:7700"
    assert headers["Tq-Leader"] == "tcp://10.0.0.2:7700"
    assert headers["Retry-After"] == "1"
    body, headers = problem_for(ShuttingDown("draining"))
    assert (body.status, body.code, body.leader) == (503, "SHUTTING_DOWN", None)
    assert "Tq-Leader" not in headers


def test_every_error_code_has_an_http_status() -> None:
    assert set(ERRORS_BY_CODE) <= set(STATUS_BY_CODE)


def test_a_broker_with_a_token_wants_it_on_the_api_but_not_on_health(
    http_broker_factory: Any,
) -> None:
    broker = http_broker_factory(env={"TQ_TOKEN": "s3cret"})
    anonymous = broker.api()
    found = problem(anonymous.get("/api/v1/stats"), 401, "UNAUTHENTICATED")
    assert "detail" in found
    assert anonymous.get("/api/v1/stats").headers["www-authenticate"].startswith("Bearer")
    problem(anonymous.get("/metrics"), 401, "UNAUTHENTICATED")
    problem(broker.api("wrong").get("/api/v1/stats"), 401, "UNAUTHENTICATED")
    assert anonymous.get("/healthz").status == 200
    assert anonymous.get("/readyz").status == 200
    assert anonymous.get("/openapi.json").json()["security"] == [{"bearer": []}]
    assert broker.api("s3cret").get("/api/v1/stats").status == 200


def test_the_bearer_scheme_is_case_insensitive(http_broker_factory: Any) -> None:
    broker = http_broker_factory(env={"TQ_TOKEN": "s3cret"})
    for scheme in ("bearer", "BEARER", "Bearer"):
        request = urllib.request.Request(
            f"http://127.0.0.1:{broker.http_port}/api/v1/stats",
            headers={"Authorization": f"{scheme} s3cret"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, scheme


def test_a_wrong_token_on_tcp_is_said_at_once_and_the_token_is_never_logged(
    http_broker_factory: Any,
) -> None:
    broker = http_broker_factory(env={"TQ_TOKEN": "s3cret-tcp"})
    t0 = time.monotonic()
    with pytest.raises(Unauthenticated):
        Client(broker.url, token="wrong", connect_timeout_s=10).__enter__()
    assert time.monotonic() - t0 < 5, "retried as if the broker were unreachable"
    result = subprocess.run(
        [sys.executable, "-m", "tq", "stats", "--broker", broker.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**subprocess_env(), "TQ_TOKEN": "wrong"},
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("tq: UNAUTHENTICATED")
    assert "is `tq broker` running" not in result.stderr
    with Client(broker.url, token="s3cret-tcp") as c:
        assert "states" in c.stats()
    assert "s3cret-tcp" not in broker.err_path.read_text()


def test_a_client_that_aborts_its_upload_leaves_no_traceback(http_broker: HttpBroker) -> None:
    """Anybody could fill the broker's log with ERROR records and tracebacks by starting big
    uploads and hanging up."""
    import socket

    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", http_broker.http_port))
        # a loopback Host: any other is refused (421) before the body is read
        sock.sendall(
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20000000\r\n\r\n" + b"x" * 1000
        )
        sock.close()
    time.sleep(0.5)
    assert http_broker.api().get("/healthz").status == 200
    log = http_broker.err_path.read_text()
    assert "handler_failed" not in log
    assert "Traceback" not in log
