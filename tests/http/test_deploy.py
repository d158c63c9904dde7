"""deploy/: the Grafana dashboard and the Prometheus config use the metric names the broker
exposes, exactly."""

from __future__ import annotations

import json
import re

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from tests.http.conftest import Api

DASHBOARD = ROOT / "deploy" / "grafana" / "tq-dashboard.json"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
CLUSTER_ONLY = {
    "tq_cluster_term",
    "tq_cluster_commit_index",
    "tq_cluster_applied_index",
    "tq_cluster_apply_lag",
    "tq_cluster_has_quorum",
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def exposed_names(api: Api) -> set[str]:
    """Every series name /metrics can carry, including those of families with no sample yet."""
    names: set[str] = set()
    text = api.get("/metrics").body.decode()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def dashboard_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return {name for expr in exprs for name in re.findall(r"\btq_[a-z_]+", expr)}


def test_the_dashboard_uses_only_metrics_the_broker_exposes(api: Api) -> None:
    api.ok("POST", "/api/v1/tasks", {"name": "echo"}, status=201)
    exposed = exposed_names(api)
    used = dashboard_names()
    assert used - exposed == CLUSTER_ONLY  # the cluster ones: tests/http/test_cluster.py
    # ... and it shows every task counter, histogram and gauge the broker has.
    task_metrics = {n for n in exposed if n.startswith(("tq_tasks_", "tq_task_", "tq_queue_"))}
    assert {n for n in task_metrics if not n.endswith(("_sum", "_count"))} <= used | {
        "tq_tasks_expired_total"
    }


def test_the_prometheus_config_scrapes_the_default_http_port() -> None:
    text = PROMETHEUS.read_text()
    assert "metrics_path: /metrics" in text
    assert '"127.0.0.1:7701"' in text
