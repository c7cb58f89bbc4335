"""The Grafana dashboard (deploy/grafana/mipos-worker.json): every query uses only metrics the code
exports, and parses as PromQL (issue 23, item 5)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from support.processes import ROOT, RedisServer
from tests.exported_metrics import exported_series, metric_names
from tests.test_alerts import promtool

DASHBOARD = ROOT / "deploy" / "grafana" / "mipos-worker.json"
# What Grafana puts in for its variables, for promtool to parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query."""
    return [(panel["title"], target["expr"]) for panel in panels() for target in panel.get("targets", [])]


def test_every_query_uses_only_metrics_the_code_exports(redis_server: RedisServer, tmp_path: Path) -> None:
    exported = exported_series(redis_server.client, tmp_path)
    unknown = {(title, name) for title, expr in queries() for name in metric_names(expr) - exported}
    assert unknown == set()


def test_every_query_selects_a_metric() -> None:
    assert len(queries()) >= 20
    assert [(title, expr) for title, expr in queries() if not metric_names(expr)] == []


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, as a recording rule, Grafana's variables put in."""
    rules = []
    for n, (_, expr) in enumerate(queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_imports_into_any_grafana_with_a_prometheus() -> None:
    """Its panels query the data source the viewer picks (the datasource variable), ids are unique
    and every panel fits the 24-column grid."""
    dashboard = json.loads(DASHBOARD.read_text())
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${" + variable["name"] + "}", panel["title"]
            assert all(re.fullmatch(r"[A-Z]", target["refId"]) for target in panel["targets"])
