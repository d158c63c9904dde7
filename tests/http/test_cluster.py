"""The HTTP face of a 3-node cluster: followers answer 503 NOT_LEADER naming the leader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cluster import harness
from tests.conftest import wait_until
from tests.http.conftest import HTTP_READY_RE, Api
from tests.http.test_deploy import CLUSTER_ONLY, exposed_names
from tests.http.test_metrics import scrape

pytestmark = pytest.mark.cluster


def http_api(node: Any) -> Api:
    out = node.proc.logs[-2]  # the node's stdout file

    def port() -> int | None:
        for line in out.read_text().splitlines():
            if m := HTTP_READY_RE.match(line):
                return int(m["port"])
        return None

    return Api(wait_until(port, what=f"{out}: the http readiness line"))


def test_a_follower_redirects_to_the_leader_and_reports_its_role(tmp_path: Path) -> None:
    cluster = harness.Cluster(
        tmp_path, 3, extra_args=("--heartbeat-timeout", "2", "--http-port", "0")
    )
    try:
        cluster.start()
        leader = cluster.wait_stable_leader()
        follower = next(n for n in cluster.nodes if n is not leader)
        api = http_api(follower)

        submit = api.post("/api/v1/tasks", {"name": "echo"})
        assert submit.status == 503
        assert submit.content_type == "application/problem+json"
        problem = submit.json()
        assert problem["code"] == "NOT_LEADER"
        assert problem["leader"] == leader.url
        assert submit.headers["tq-leader"] == leader.url
        assert submit.headers["retry-after"] == "1"
        assert api.get("/api/v1/tasks/anything").json()["code"] == "NOT_LEADER"

        ready = api.ok("GET", "/readyz")
        assert ready == {"ready": True, "role": "follower", "leader": leader.url}
        view = api.ok("GET", "/api/v1/cluster")
        assert view["role"] == "follower"
        assert view["leader"] == leader.url
        assert api.ok("GET", "/api/v1/stats")["node_id"] == follower.name  # any node answers

        leader_api = http_api(leader)
        task_id = leader_api.ok("POST", "/api/v1/tasks", {"name": "echo"}, status=201)["id"]
        assert leader_api.task(task_id)["state"] == "pending"
        metrics = scrape(leader_api)
        assert metrics[("tq_cluster_role", (("role", "leader"),))] == 1
        assert metrics[("tq_cluster_term", ())] >= 1
        assert metrics[("tq_tasks_submitted_total", (("queue", "default"), ("task", "echo")))] == 1
        assert scrape(api)[("tq_cluster_role", (("role", "follower"),))] == 1
        assert exposed_names(leader_api) >= CLUSTER_ONLY  # what the dashboard's cluster row uses
    finally:
        cluster.close()
