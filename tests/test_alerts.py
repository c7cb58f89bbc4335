"""The alerting rules (deploy/prometheus/alerts.yml): promtool's unit tests pass, every rule has a
case where it fires and one where it stays silent, and every rule uses only metrics the code
exports (issue 23, item 5)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.processes import ROOT, RedisServer
from tests.exported_metrics import exported_series, metric_names

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: run scripts/install-system-packages --test "
                    "(Debian's prometheus package)")
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_rules_are_valid() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtools_unit_tests_of_the_rules_pass() -> None:
    result = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert {"MiposDeadLettersRising", "MiposBreakerOpen", "MiposOrdersWaitTooLong", "MiposOutboxBacklog",
            "MiposNoWorkerHeartbeat", "MiposOrdersUnacknowledged"} <= alerts
    firing: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert (firing | silent) - alerts == set(), "tests of alerts that do not exist"
    assert alerts - firing == set(), "alerts never seen firing"
    assert alerts - silent == set(), "alerts never seen silent"


def test_the_rules_use_only_metrics_the_code_exports(redis_server: RedisServer, tmp_path: Path) -> None:
    exported = exported_series(redis_server.client, tmp_path)
    used = {name for rule in rules() for name in metric_names(rule["expr"])}
    assert len(used) >= 8
    assert used - exported == set()


# -- the helpers these tests rely on --------------------------------------------------------------


def test_metric_names_are_read_out_of_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y",z=~"b|c"}[5m])))'
            ' / on() clamp_min(b offset 10m, 1e-3) > 0 or vector(0) unless absent(c == 1)'
            ' and max without (instance) (d:e[$__rate_interval]) > bool 2')
    assert metric_names(expr) == {"a_bucket", "b", "c", "d:e"}


def test_the_exported_names_come_from_the_code(redis_server: RedisServer, tmp_path: Path) -> None:
    exported = exported_series(redis_server.client, tmp_path)
    assert {"mipos_attempts_total", "mipos_order_latency_seconds_bucket", "mipos_queue_depth",
            "mipos_redis_failovers_total", "mipos_outbox_backlog", "mipos_outbox_published_total",
            "flower_worker_online"} <= exported
    assert "mipos_attempts" not in exported and "mipos_queue_depth_total" not in exported
