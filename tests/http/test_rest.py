"""REST round trips against a real broker and real workers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.apps.handlers import read_runs
from tests.conftest import HANDLERS_APP, WorkerProcess, wait_until
from tests.http.conftest import Api, HttpBroker

StartWorker = Callable[..., WorkerProcess]
TASKS = "/api/v1/tasks"


def run_burst(start_worker: StartWorker, broker: HttpBroker, *queues: str) -> None:
    """A burst worker (test handlers) that serves ``queues`` until they are empty, then exits."""
    args = ["--burst"] + [a for q in queues for a in ("-q", q)]
    worker = start_worker(broker.url, *args, app=HANDLERS_APP)
    assert worker.wait(60) == 0, worker.describe()


def test_submitted_task_completes_and_get_shows_its_result(
    http_broker: HttpBroker, api: Api, start_worker: StartWorker
) -> None:
    resp = api.post(TASKS, {"name": "echo", "payload": {"x": 1}, "priority": "high"})
    assert resp.status == 201, resp.body
    task_id = resp.json()["id"]
    assert resp.headers["location"] == f"{TASKS}/{task_id}"
    assert api.task(task_id)["state"] == "pending"

    run_burst(start_worker, http_broker)

    task = api.task(task_id)
    assert task["state"] == "completed"
    assert task["result"] == {"x": 1}
    assert task["result_encoding"] == "json"
    assert task["payload"] == {"x": 1}
    assert task["priority"] == "high"
    assert task["attempt"] == 1
    assert task["error"] is None
    assert 0 < task["submitted_at_ms"] <= task["started_at_ms"] <= task["finished_at_ms"]


def test_submit_with_an_existing_id_is_idempotent(api: Api) -> None:
    first = api.ok("POST", TASKS, {"name": "echo", "id": "job-1", "payload": 1}, status=201)
    again = api.ok("POST", TASKS, {"name": "echo", "id": "job-1", "payload": 2}, status=201)
    assert first == again == {"id": "job-1"}
    assert api.task("job-1")["payload"] == 1
    assert api.states()["pending"] == 1


def test_batch_submit_returns_ids_in_order_and_list_pages_with_a_cursor(api: Api) -> None:
    tasks = [{"name": "echo", "queue": "pages", "payload": i} for i in range(25)]
    ids = api.ok("POST", f"{TASKS}/batch", {"tasks": tasks}, status=201)["ids"]
    assert len(ids) == 25
    assert [api.task(i)["payload"] for i in ids[:3]] == [0, 1, 2]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = api.ok("GET", TASKS, state="pending", queue="pages", limit=10, cursor=cursor)
        seen += [t["id"] for t in page["tasks"]]
        assert all(t["payload"] is None for t in page["tasks"])  # lists leave payloads out
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == ids  # submission order within one priority


def test_list_without_a_state_walks_every_state(api: Api) -> None:
    ids = api.ok("POST", f"{TASKS}/batch", {"tasks": [{"name": "echo"}] * 5}, status=201)["ids"]
    api.ok("POST", f"{TASKS}/{ids[0]}/cancel")
    api.ok("POST", f"{TASKS}/{ids[1]}/cancel")
    seen: dict[str, str] = {}
    cursor = None
    while True:
        page = api.ok("GET", TASKS, limit=2, cursor=cursor)
        seen |= {t["id"]: t["state"] for t in page["tasks"]}
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == {i: "cancelled" if i in ids[:2] else "pending" for i in ids}


def test_list_filters_by_submit_time(api: Api) -> None:
    first = api.ok("POST", TASKS, {"name": "echo"}, status=201)["id"]
    t0 = api.task(first)["submitted_at_ms"]
    second = wait_until(
        lambda: (
            (tid := api.ok("POST", TASKS, {"name": "echo"}, status=201)["id"])
            and api.task(tid)["submitted_at_ms"] > t0
            and tid
        ),
        what="a task submitted in a later millisecond",
    )
    before = api.ok("GET", TASKS, state="pending", until=t0 + 1)["tasks"]
    assert [t["id"] for t in before] == [first]
    after = api.ok("GET", TASKS, state="pending", since=t0 + 1)["tasks"]
    assert second in [t["id"] for t in after]
    assert first not in [t["id"] for t in after]


def test_cancel_a_pending_task_then_cancelling_again_conflicts(api: Api) -> None:
    task_id = api.ok("POST", TASKS, {"name": "echo"}, status=201)["id"]
    cancelled = api.ok("POST", f"{TASKS}/{task_id}/cancel")
    assert cancelled["state"] == "cancelled"
    again = api.post(f"{TASKS}/{task_id}/cancel")
    assert again.status == 409
    assert again.content_type == "application/problem+json"
    assert again.json()["code"] == "INVALID_STATE"


def test_cancel_of_a_running_task_is_invalid_state(
    http_broker: HttpBroker, api: Api, start_worker: StartWorker, tmp_path: Path
) -> None:
    marks = tmp_path / "runs.jsonl"
    payload = {"file": str(marks), "seconds": 60}
    task_id = api.ok("POST", TASKS, {"name": "test.long_sleep", "payload": payload}, status=201)[
        "id"
    ]
    start_worker(http_broker.url, app=HANDLERS_APP)
    wait_until(lambda: read_runs(marks), what="the task to start")
    assert api.task(task_id)["state"] == "running"
    resp = api.post(f"{TASKS}/{task_id}/cancel")
    assert resp.status == 409
    body = resp.json()
    assert body["code"] == "INVALID_STATE"
    assert body["status"] == 409
    assert "running" in body["detail"]


def test_pause_stops_claims_and_resume_restarts_them(
    http_broker: HttpBroker, api: Api, start_worker: StartWorker
) -> None:
    assert api.ok("POST", "/api/v1/queues/slow/pause") == {"queue": "slow", "paused": True}
    task_id = api.ok("POST", TASKS, {"name": "echo", "queue": "slow", "payload": 7}, status=201)[
        "id"
    ]
    queues = {q["name"]: q for q in api.ok("GET", "/api/v1/queues")["queues"]}
    assert queues["slow"]["paused"] is True
    assert queues["slow"]["depth"] == 1
    assert queues["slow"]["pending"] == {"high": 0, "normal": 1, "low": 0}

    run_burst(start_worker, http_broker, "slow")  # finds nothing to claim and exits
    assert api.task(task_id)["state"] == "pending"

    assert api.ok("POST", "/api/v1/queues/slow/resume") == {"queue": "slow", "paused": False}
    run_burst(start_worker, http_broker, "slow")
    assert api.task(task_id)["state"] == "completed"
    assert api.task(task_id)["result"] == 7


def test_dead_letter_retry_brings_a_task_back_and_it_completes(
    http_broker: HttpBroker, api: Api, start_worker: StartWorker, tmp_path: Path
) -> None:
    payload = {"file": str(tmp_path / "runs.jsonl"), "fail_times": 1}
    spec = {"name": "test.record", "payload": payload, "max_retries": 0, "queue": "dlq"}
    task_id = api.ok("POST", TASKS, spec, status=201)["id"]
    run_burst(start_worker, http_broker, "dlq")
    dead = api.ok("GET", "/api/v1/dead-letters", queue="dlq")["tasks"]
    assert [t["id"] for t in dead] == [task_id]
    assert dead[0]["error"]["type"] == "RuntimeError"

    dry = api.ok("POST", "/api/v1/dead-letters/retry", {"queue": "dlq", "dry_run": True})
    assert dry == {"dry_run": True, "ids": [task_id]}
    assert api.task(task_id)["state"] == "dead"  # a dry run changes nothing

    done = api.ok("POST", "/api/v1/dead-letters/retry", {"ids": [task_id]})
    assert done == {"dry_run": False, "ids": [task_id]}
    assert api.task(task_id)["state"] == "pending"
    run_burst(start_worker, http_broker, "dlq")
    task = api.task(task_id)
    assert task["state"] == "completed"
    assert task["result"] == {"runs": 2, "tag": None}


def test_dead_letter_purge_deletes_and_dry_run_changes_nothing(
    http_broker: HttpBroker, api: Api, start_worker: StartWorker
) -> None:
    specs = [{"name": "test.boom", "max_retries": 0, "queue": "bad", "payload": i} for i in (1, 2)]
    ids = api.ok("POST", f"{TASKS}/batch", {"tasks": specs}, status=201)["ids"]
    run_burst(start_worker, http_broker, "bad")
    assert api.states()["dead"] == 2

    refused = api.post("/api/v1/dead-letters/purge", {})
    assert refused.status == 400
    assert refused.json()["field"] == "ids"

    dry = api.ok(
        "POST", "/api/v1/dead-letters/purge", {"error_type": "ValueError", "dry_run": True}
    )
    assert sorted(dry["ids"]) == sorted(ids)
    assert api.states()["dead"] == 2

    purged = api.ok("POST", "/api/v1/dead-letters/purge", {"ids": [ids[0]]})
    assert purged == {"dry_run": False, "ids": [ids[0]]}
    assert api.get(f"{TASKS}/{ids[0]}").status == 404
    purged = api.ok("POST", "/api/v1/dead-letters/purge", {"queue": "bad"})
    assert purged["ids"] == [ids[1]]
    assert api.states()["dead"] == 0


def test_workers_stats_and_cluster_describe_the_broker(
    http_broker: HttpBroker, api: Api, start_worker: StartWorker
) -> None:
    worker = start_worker(http_broker.url, "-c", "3", "-q", "default", "-q", "other")
    workers = wait_until(lambda: api.ok("GET", "/api/v1/workers")["workers"], what="a worker")
    assert [w["id"] for w in workers] == [worker.worker_id]
    assert workers[0]["concurrency"] == 3
    assert workers[0]["queues"] == ["default", "other"]

    stats = api.ok("GET", "/api/v1/stats")
    assert set(stats["states"]) == {
        "pending",
        "running",
        "completed",
        "failed",
        "dead",
        "cancelled",
    }
    assert stats["node_id"] == "single"

    cluster = api.ok("GET", "/api/v1/cluster")
    assert cluster["role"] == "single"
    assert cluster["leader"] is None
