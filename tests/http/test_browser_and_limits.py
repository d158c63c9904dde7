"""What the HTTP face refuses so that a web page cannot drive it, named dead letters beyond
``limit``, and bodies that never arrive: each against a real broker."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from tq import Client
from tq.broker.http import loopback_host
from tq.errors import BadRequest

from tests.conftest import HANDLERS_APP, WorkerProcess
from tests.http.conftest import HOST, Api, HttpBroker, Response

TASKS = "/api/v1/tasks"
PURGE = "/api/v1/dead-letters/purge"
RETRY = "/api/v1/dead-letters/retry"
# What a page on another site can make the operator's browser send without a CORS preflight.
BROWSER = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
StartWorker = Callable[..., WorkerProcess]


@pytest.fixture(scope="module")
def api(shared_broker: HttpBroker) -> Api:
    """One broker for the refusals: none of them may leave a task or a paused queue behind."""
    return shared_broker.api()


def problem(resp: Response, status: int, field: str | None) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body[:500])
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert body["code"] == "BAD_REQUEST"
    assert body.get("field") == field
    return body


def head_and_body(port: int, head: bytes, body: bytes) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=20)
    sock.sendall(head + b"\r\n" + body)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


# --- requests from web pages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw", "headers"),
    [
        # fetch(url, {method: "POST", mode: "no-cors", body: "..."}): text/plain
        (TASKS, b'{"name": "evil"}', {**BROWSER, "Content-Type": "text/plain;charset=UTF-8"}),
        # a form posted by a page, and one as JSON (a CORS request: refused all the same)
        (PURGE, b'{"all": true}', {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}),
        (PURGE, b'{"all": true}', {**BROWSER, "Content-Type": "application/json"}),
        # no body at all: pause and cancel need none
        ("/api/v1/queues/default/pause", None, BROWSER),
        ("/api/v1/queues/default/pause", None, {"Origin": "null"}),  # a sandboxed iframe
        # an older browser that sends no Sec-Fetch-*, and a newer one's request with no Origin
        (TASKS, b'{"name": "evil"}', {"Origin": "http://localhost:3000"}),
        ("/api/v1/queues/default/pause", None, {"Sec-Fetch-Site": "same-site"}),
    ],
)
def test_a_request_from_a_web_page_is_403_and_changes_nothing(
    api: Api, path: str, raw: bytes | None, headers: dict[str, str]
) -> None:
    """Any page open in the operator's browser could submit tasks, pause queues and purge the
    dead letters of a broker on 127.0.0.1 (no token by default): a "simple" POST needs no
    CORS preflight, and the page need not read the answer."""
    resp = api.request("POST", path, raw=raw, headers=headers)
    body = problem(resp, 403, "Origin" if "Origin" in headers else "Sec-Fetch-Site")
    assert "web pages are refused" in body["detail"]
    assert api.states()["pending"] == 0
    assert api.ok("GET", "/api/v1/queues")["queues"] == []  # nothing submitted, nothing paused


def test_reads_from_web_pages_are_refused_but_the_probes_and_the_document_answer(
    api: Api,
) -> None:
    for path in ("/api/v1/stats", f"{TASKS}?state=dead", "/metrics", "/api/v1/no-such"):
        problem(api.request("GET", path, headers=BROWSER), 403, "Origin")
        no_origin = api.request("GET", path, headers={"Sec-Fetch-Site": "cross-site"})
        problem(no_origin, 403, "Sec-Fetch-Site")  # an <img src> or a link followed: no Origin
    # "none": typed into the address bar; "same-origin": the broker's own origin
    for site in ("none", "same-origin"):
        assert api.request("GET", "/api/v1/stats", headers={"Sec-Fetch-Site": site}).status == 200
    # A link to them from a dashboard opens; they change nothing and are open without a token.
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert api.request("GET", path, headers=BROWSER).status == 200, path


# --- Content-Type --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",  # curl -d without -H
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "text/json",
    ],
)
def test_a_body_that_is_not_json_is_415(api: Api, content_type: str) -> None:
    resp = api.post(TASKS, raw=b'{"name": "echo"}', headers={"Content-Type": content_type})
    body = problem(resp, 415, "Content-Type")
    assert "application/json" in body["detail"]
    assert resp.headers["accept-post"] == "application/json"
    assert api.states()["pending"] == 0


def test_a_body_without_a_content_type_is_415_and_an_empty_one_needs_none(
    http_broker: HttpBroker,
) -> None:
    conn = http.client.HTTPConnection(HOST, http_broker.http_port, timeout=10)
    try:
        conn.putrequest("POST", TASKS)
        conn.putheader("Content-Length", "16")
        conn.endheaders(b'{"name": "echo"}')
        resp = conn.getresponse()
        assert resp.status == 415
        assert json.loads(resp.read())["field"] == "Content-Type"
    finally:
        conn.close()
    # pause, resume and cancel take no body: no Content-Type either
    api = http_broker.api()
    assert api.request("POST", "/api/v1/queues/q/pause").status == 200
    assert api.request("POST", "/api/v1/queues/q/resume", raw=b"").status == 200


def test_json_bodies_are_accepted(http_broker: HttpBroker) -> None:
    api = http_broker.api()
    types = ("application/json", "application/json; charset=utf-8", "APPLICATION/JSON")
    for content_type in (*types, "application/merge-patch+json"):
        resp = api.post(TASKS, raw=b'{"name": "echo"}', headers={"Content-Type": content_type})
        assert resp.status == 201, (content_type, resp.body)


# --- Host (DNS rebinding) ------------------------------------------------------------------------


def test_which_host_headers_name_loopback() -> None:
    for ok in ("localhost", "LocalHost:7701", "127.0.0.1", "127.1.2.3:80", "[::1]", "[::1]:7701"):
        assert loopback_host(ok), ok
    for bad in (
        "evil.example",
        "evil.example:7701",
        "localhost.evil.example",
        "127.0.0.1.evil.example",
        "0.0.0.0:7701",
        "10.0.0.1",
        "[::2]",
        "[::1",
        "::1",
        "127.1",
        "localhost:x",
        "localhost:7701:1",
    ):
        assert not loopback_host(bad), bad


def test_a_foreign_host_is_421_on_a_loopback_broker(api: Api) -> None:
    """DNS rebinding: evil.example resolves to the attacker, then to 127.0.0.1, and its page
    is then same-origin with the broker (no Origin on a GET, Sec-Fetch-Site: same-origin) and
    may read the answers. Its requests still say Host: evil.example."""
    rebound = {"Host": f"evil.example:{api.port}", "Sec-Fetch-Site": "same-origin"}
    for path in ("/api/v1/stats", "/healthz"):
        body = problem(api.request("GET", path, headers=rebound), 421, "Host")
        assert "evil.example" in body["detail"]
    resp = api.post(PURGE, {"all": True}, headers=rebound)
    problem(resp, 421, "Host")
    for host in ("localhost", f"localhost:{api.port}", "127.0.0.1:1", f"127.9.9.9:{api.port}"):
        assert api.request("GET", "/api/v1/stats", headers={"Host": host}).status == 200, host


def test_a_request_without_a_host_header_is_answered(http_broker: HttpBroker) -> None:
    """HTTP/1.0 has no Host: nothing to check, and no browser sends such a request."""
    sock = head_and_body(http_broker.http_port, b"GET /api/v1/stats HTTP/1.0\r\n", b"")
    with sock:
        answer = read_until_closed(sock)
    assert answer.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), answer[:200]


def test_a_broker_not_on_loopback_does_not_check_host(
    http_broker_factory: Callable[..., HttpBroker],
) -> None:
    """Bound to every address, the broker is reached by names it cannot know: only the
    browser checks (Origin, Content-Type) apply there."""
    api = http_broker_factory("--host", "0.0.0.0").api()
    assert api.request("GET", "/api/v1/stats", headers={"Host": "tq.example:7701"}).status == 200
    problem(api.request("GET", "/api/v1/stats", headers=BROWSER), 403, "Origin")


# --- named dead letters and limit ----------------------------------------------------------------


def test_every_named_dead_letter_is_selected_whatever_the_limit(
    http_broker: HttpBroker, start_worker: StartWorker
) -> None:
    """``limit`` cut named ids silently: retrying 1,200 ids (limit 1,000 by default) answered
    200 and left 200 dead. It bounds a selection by filters only, on both faces."""
    api = http_broker.api()
    specs = [{"name": "test.boom", "max_retries": 0, "queue": "dl", "payload": i} for i in range(5)]
    ids = api.ok("POST", f"{TASKS}/batch", {"tasks": specs}, status=201)["ids"]
    worker = start_worker(http_broker.url, "--burst", "-q", "dl", app=HANDLERS_APP)
    assert worker.wait(60) == 0, worker.describe()
    assert api.states()["dead"] == 5

    dry = api.ok("POST", RETRY, {"ids": ids, "limit": 2, "dry_run": True})
    assert dry == {"dry_run": True, "ids": ids}
    # a filter still selects at most limit
    assert len(api.ok("POST", RETRY, {"queue": "dl", "limit": 2, "dry_run": True})["ids"]) == 2
    # an id named twice counts once
    assert api.ok("POST", RETRY, {"ids": ids + ids[:1], "limit": 1, "dry_run": True})["ids"] == ids

    assert api.ok("POST", RETRY, {"ids": ids[:3], "limit": 1}) == {"dry_run": False, "ids": ids[:3]}
    assert api.states()["dead"] == 2
    # The TCP protocol's DeadLetters goes through the same selection.
    with Client(http_broker.url) as c:
        assert c.purge_dead(ids[3:], limit=1) == ids[3:]
        with pytest.raises(BadRequest, match="at most 10,000 task ids"):
            c.purge_dead([f"id{i}" for i in range(10_001)], dry_run=True)
    assert api.states()["dead"] == 0


# --- bodies that never arrive --------------------------------------------------------------------


def test_a_half_sent_body_is_408_and_its_connection_closed(
    http_broker_factory: Callable[..., HttpBroker],
) -> None:
    """The keep-alive timeout (--hello-timeout) bounds only the wait for a request head: a body
    that stopped half-way held its connection and its handler for ever. Now it gets
    --hello-timeout plus its length at 256 KiB/s (here 1 + 0.004 s)."""
    broker = http_broker_factory("--hello-timeout", "1")
    head = (
        b"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n"
    )
    t0 = time.monotonic()
    socks = [head_and_body(broker.http_port, head, b'{"name": ') for _ in range(2)]
    try:
        assert broker.api().get("/healthz").status == 200  # others are served meanwhile
        for sock in socks:
            answer = read_until_closed(sock)  # the broker closes it: no lingering
            head_out, _, body = answer.partition(b"\r\n\r\n")
            assert head_out.startswith(b"HTTP/1.1 408"), answer[:300]
            assert b"Connection: close" in head_out
            found = json.loads(body)
            assert found["code"] == "BAD_REQUEST"
            assert found["status"] == 408
            assert "did not arrive within 1.0 s" in found["detail"]
        assert 0.8 < time.monotonic() - t0 < 8
    finally:
        for sock in socks:
            sock.close()
    assert broker.api().states()["pending"] == 0
    assert "http.slow_body_closed" in broker.err_path.read_text()


def test_a_chunked_body_that_never_ends_gets_the_deadline_of_the_largest_body(
    http_broker_factory: Callable[..., HttpBroker],
) -> None:
    """Without a Content-Length the deadline is that of a --max-frame body: here 1 s plus
    64 KiB at 256 KiB/s."""
    broker = http_broker_factory("--hello-timeout", "1", "--max-frame", str(64 * 1024))
    head = (
        b"POST /api/v1/dead-letters/purge HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    )
    t0 = time.monotonic()
    with head_and_body(broker.http_port, head, b'5\r\n{"all\r\n') as sock:
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert 1.1 < time.monotonic() - t0 < 8
