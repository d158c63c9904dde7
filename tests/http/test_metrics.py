"""/metrics after a known workload: the counters equal what was done."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HANDLERS_APP, WorkerProcess, wait_until
from tests.http.conftest import Api, HttpBroker

StartWorker = Callable[..., WorkerProcess]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(api: Api) -> Samples:
    resp = api.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    out: Samples = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def labelled(samples: Samples, name: str) -> dict[tuple[str, str], float]:
    """``{(queue, task): value}`` of one counter."""
    return {
        (dict(labels)["queue"], dict(labels)["task"]): value
        for (sample, labels), value in samples.items()
        if sample == name
    }


def test_counters_equal_a_known_workload(
    http_broker: HttpBroker, api: Api, start_worker: StartWorker, tmp_path: Path
) -> None:
    tasks = "/api/v1/tasks"
    # 6 echo tasks complete; one task fails once, is retried and completes (7 completed);
    # 2 tasks fail with no retries left (2 dead); 1 task is cancelled before any worker runs.
    echo = [{"name": "echo", "payload": i} for i in range(6)]
    flaky = {
        "name": "test.record",
        "payload": {"file": str(tmp_path / "runs.jsonl"), "fail_times": 1},
        "max_retries": 1,
    }
    boom = [{"name": "test.boom", "queue": "bad", "max_retries": 0}] * 2
    api.ok("POST", f"{tasks}/batch", {"tasks": [*echo, flaky, *boom]}, status=201)
    api.ok("POST", tasks, {"name": "echo", "id": "to-cancel"}, status=201)
    api.ok("POST", tasks, {"name": "echo", "id": "to-cancel"}, status=201)  # idempotent: no task
    api.ok("POST", f"{tasks}/to-cancel/cancel")

    start_worker(http_broker.url, "-q", "default", "-q", "bad", app=HANDLERS_APP)

    def settled() -> bool:
        states = api.states()
        return (states["completed"], states["dead"], states["cancelled"]) == (7, 2, 1)

    wait_until(settled, timeout=30, what="7 completed, 2 dead, 1 cancelled")
    m = scrape(api)
    d, b, r = ("default", "echo"), ("bad", "test.boom"), ("default", "test.record")
    assert labelled(m, "tq_tasks_submitted_total") == {d: 7, r: 1, b: 2}
    assert labelled(m, "tq_tasks_claimed_total") == {d: 6, r: 2, b: 2}
    assert labelled(m, "tq_tasks_completed_total") == {d: 6, r: 1}
    assert labelled(m, "tq_tasks_failed_total") == {r: 1, b: 2}
    assert labelled(m, "tq_tasks_retried_total") == {r: 1}
    assert labelled(m, "tq_tasks_dead_lettered_total") == {b: 2}
    assert labelled(m, "tq_tasks_cancelled_total") == {d: 1}
    # Run time for every reported attempt (7 completions, 3 failures); queue wait for every
    # first attempt (9: the retried task's second claim is not a first wait).
    assert sum(labelled(m, "tq_task_run_seconds_count").values()) == 10
    assert sum(labelled(m, "tq_task_wait_seconds_count").values()) == 9

    def gauge(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    assert gauge("tq_tasks", state="completed") == 7
    assert gauge("tq_tasks", state="dead") == 2
    assert gauge("tq_tasks", state="cancelled") == 1
    assert gauge("tq_tasks", state="pending") == 0
    assert gauge("tq_queue_depth", queue="default", priority="normal") == 0
    assert gauge("tq_queue_paused", queue="bad") == 0
    assert gauge("tq_workers_connected") == 1
    assert gauge("tq_clients_connected") == 0
    assert gauge("tq_lease_expiries_total") == 0
    assert gauge("tq_workers_lost_total") == 0
    assert gauge("tq_cluster_role", role="single") == 1
    assert gauge("tq_durable_write_commands_count") >= 1
    assert gauge("tq_durable_write_seconds_count") >= 1
    assert gauge("tq_wal_flushes_total") >= 1
    assert ("process_cpu_seconds_total", ()) in m


def test_queue_gauges_show_depth_by_priority_and_pause(api: Api) -> None:
    specs = [{"name": "echo", "queue": "q", "priority": p} for p in ("high", "low", "low")]
    api.ok("POST", "/api/v1/tasks/batch", {"tasks": specs}, status=201)
    api.ok("POST", "/api/v1/queues/q/pause")
    m = scrape(api)
    depth = {
        dict(labels)["priority"]: value
        for (name, labels), value in m.items()
        if name == "tq_queue_depth" and dict(labels)["queue"] == "q"
    }
    assert depth == {"high": 1, "normal": 0, "low": 2}
    assert m[("tq_queue_paused", (("queue", "q"),))] == 1
    assert m[("tq_queue_oldest_pending_age_seconds", (("queue", "q"),))] >= 0


def test_queue_lists_and_gauges_say_how_many_queues_they_leave_out(api: Api) -> None:
    """At most 1,000 queues are listed (and get series): the rest are counted, not hidden."""
    specs = [{"name": "echo", "queue": f"q{i:04d}"} for i in range(1_003)]
    api.ok("POST", "/api/v1/tasks/batch", {"tasks": specs}, status=201)
    listed = api.ok("GET", "/api/v1/queues")
    assert len(listed["queues"]) == 1_000
    assert listed["left_out"] == 3
    m = scrape(api)
    assert m[("tq_queues_left_out", ())] == 3
    assert len({labels for name, labels in m if name == "tq_queue_running"}) == 1_000
