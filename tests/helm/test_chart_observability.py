"""The starter alerts and dashboard the chart ships: valid PromQL on real metric names."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import CHART, RenderFn, require_tool

# The metrics the sidecar exports: the tables of docs/METRICS.md (which
# tests/integration/test_metrics.py keeps equal to /metrics); histograms add _bucket/_sum/_count.
_ROW = re.compile(r"\|\s*`(llm_sidecar_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram)\s*\|(.*)")
_ROWS = [
    _ROW.match(line) for line in (CHART.parents[1] / "docs" / "METRICS.md").read_text().splitlines()
]
_LIVE = [m for m in _ROWS if m is not None and "reserved" not in m.group(3).lower()]
METRICS = {m.group(1) for m in _LIVE}
HISTOGRAMS = {m.group(1) for m in _LIVE if m.group(2) == "histogram"}
KNOWN = METRICS | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}

# Grafana's variables, replaced by literals so promtool can parse the queries.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bllm_sidecar_[a-z_]+\b", expr))


def promtool_check(tmp_path: Path, groups: list[dict[str, Any]]) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    promtool = require_tool("promtool")
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def rule_groups(render: RenderFn) -> list[dict[str, Any]]:
    r = render({"prometheusRule": {"enabled": True}})
    return list(r.one("PrometheusRule")["spec"]["groups"])


@pytest.fixture(scope="module")
def dashboards(render: RenderFn) -> dict[str, dict[str, Any]]:
    r = render({"grafanaDashboard": {"enabled": True}})
    cm = r.one("ConfigMap", "-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    return {name: json.loads(text) for name, text in cm["data"].items()}


def test_rendered_rules_are_the_rules_file(rule_groups: list[dict[str, Any]]) -> None:
    shipped = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule_groups == shipped["groups"]


def test_alert_rules_pass_promtool(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    promtool_check(tmp_path, rule_groups)


def test_alerts_cover_breaker_errors_and_reloads(rule_groups: list[dict[str, Any]]) -> None:
    rules = [r for g in rule_groups for r in g["rules"]]
    for rule in rules:
        used = metric_names(rule["expr"])
        assert used and used <= KNOWN, f"{rule['alert']} uses unknown metrics {used - KNOWN}"
        assert rule["labels"]["severity"] and rule["annotations"]["summary"]
    by_metric = {m: r for r in rules for m in metric_names(r["expr"])}
    breaker = by_metric["llm_sidecar_circuit_state"]
    assert "== 2" in breaker["expr"] and breaker["for"] == "5m"
    assert 'code=~"5.."' in by_metric["llm_sidecar_requests_total"]["expr"]
    assert 'result="error"' in by_metric["llm_sidecar_config_reloads_total"]["expr"]


def test_dashboards_parse_and_use_known_metrics(
    tmp_path: Path, dashboards: dict[str, dict[str, Any]]
) -> None:
    assert "llm-sidecar.json" in dashboards
    shipped = {p.name for p in (CHART / "dashboards").glob("*.json")}
    assert set(dashboards) == shipped
    recording = []
    for name, dash in dashboards.items():
        assert dash["uid"] and dash["title"] and dash["panels"], name
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                used = metric_names(expr)
                assert used <= KNOWN, f"{name}/{panel['title']}: unknown {used - KNOWN}"
                for var, literal in GRAFANA_VARS.items():
                    expr = expr.replace(var, literal)
                expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
                recording.append({"record": f"dashboard:panel{len(recording)}", "expr": expr})
    # promtool parses every panel query as the expression of a recording rule.
    promtool_check(tmp_path, [{"name": "dashboard-queries", "rules": recording}])


def test_starter_dashboard_has_breaker_rate_and_latency(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    panels = dashboards["llm-sidecar.json"]["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert any("llm_sidecar_circuit_state" in e and "upstream" in e for e in exprs)
    assert any("llm_sidecar_requests_total" in e and "by (code)" in e for e in exprs)
    assert any(
        "histogram_quantile(0.99" in e and "llm_sidecar_request_duration_seconds_bucket" in e
        for e in exprs
    )
