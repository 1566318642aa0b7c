"""Every PromQL expression we ship, evaluated by a real Prometheus scraping a real sidecar.

Prometheus (Debian ``prometheus``) runs on loopback with a free port and its own temporary
storage, scrapes the sidecar's admin port every second (OpenMetrics, exemplars on), loads
``helm/llm-sidecar/files/alerts.yaml`` as its rule file, and is killed at the end. The test
fails if a dashboard query or an alert rule errors, or names a metric the sidecar does not
export.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import SidecarFactory, free_port
from tests.integration.traffic import (
    CHAT,
    Rig,
    every_kind_of_traffic,
    require_tool,
    start_rig,
    stop_rig,
)

CHART = Path(__file__).resolve().parents[2] / "helm" / "llm-sidecar"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
# Grafana's variables, as a dashboard on this one sidecar would fill them in.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$namespace": ".*",
    "$pod": ".*",
}
METRIC = re.compile(r"\b(?:llm_sidecar|gen_ai)_[a-z0-9_]+\b")
PROMETHEUS_DEADLINE_S = 90.0


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every query in a dashboard: panels, annotations, variables."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            found.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):  # label_values(metric{...}, label): check the metric
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query["query"])
            if inner:
                found.append((f"variable ${variable['name']}", f"count({inner.group(1)})"))
    return found


def fill(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert not re.search(r"\$(?!\d)\{?\w", expr), f"unknown Grafana variable in {expr}"
    return expr


def exported(text: str) -> set[str]:
    """Every series name /metrics can produce (counters' _total, histograms' suffixes)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            if kind == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            elif kind == "histogram":
                names.update({name + s for s in ("_bucket", "_sum", "_count")})
            else:
                names.add(name)
    return names


@pytest.fixture
async def rig(make_sidecar: SidecarFactory, tmp_path: Path) -> AsyncIterator[Rig]:
    rig = await start_rig(make_sidecar, tmp_path)
    yield rig
    await stop_rig(rig)


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    """A Prometheus on a free loopback port scraping ``target``; its URL. Killed on exit."""
    binary = require_tool("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "llm-sidecar", "static_configs": [{"targets": [target]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--enable-feature=exemplar-storage",
        "--log.level=warn",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def api(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params) as response:
        body = await response.json(content_type=None)
        assert response.status == 200 and body["status"] == "success", (url, params, body)
        return body["data"]


async def until(check: Any, message: str) -> Any:
    """Poll the async ``check`` until it returns something truthy (Prometheus is slow to start
    on a busy machine: a generous deadline)."""
    deadline = time.monotonic() + PROMETHEUS_DEADLINE_S
    while True:
        with contextlib.suppress(aiohttp.ClientError, AssertionError):
            result = await check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.25)


async def keep_traffic_flowing(rig: Rig, stop: asyncio.Event) -> None:
    """A request every 100 ms while Prometheus scrapes, so rates and quantiles have values."""
    url = rig.proxy + "/openai/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            async with session.post(url, json=body, headers={"x-tenant-id": "team-a"}) as r:
                await r.read()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


@pytest.mark.timeout(240)
async def test_dashboard_queries_and_alert_rules_on_a_real_prometheus(rig: Rig, tmp_path: Path):
    promtool = require_tool("promtool")
    check = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    await every_kind_of_traffic(rig)
    async with aiohttp.ClientSession() as session:
        async with session.get(rig.admin + "/metrics") as response:
            names = exported(await response.text())
    host, port = rig.sidecar.admin_address or ("", 0)
    stop = asyncio.Event()
    traffic = asyncio.create_task(keep_traffic_flowing(rig, stop))
    try:
        async with prometheus(tmp_path, f"{host}:{port}") as prom, aiohttp.ClientSession() as s:
            query = prom + "/api/v1/query"

            async def scraped_enough() -> bool:
                data = await api(s, query, query='count_over_time(up{job="llm-sidecar"}[5m])')
                return bool(data["result"]) and float(data["result"][0]["value"][1]) >= 5

            await until(scraped_enough, "five scrapes of the sidecar")
            up = await api(s, query, query='up{job="llm-sidecar"}')
            assert up["result"][0]["value"][1] == "1"

            results: dict[str, list[Any]] = {}
            for dashboard_path in DASHBOARDS:
                dashboard = json.loads(dashboard_path.read_text())
                for where, expr in queries(dashboard):
                    unknown = set(METRIC.findall(expr)) - names
                    assert not unknown, f"{dashboard_path.name} {where}: not exported {unknown}"
                    data = await api(s, query, query=fill(expr))  # an error fails here
                    results[where] = data["result"]
            # The panels a newcomer looks at first show the traffic they just sent.
            for where in (
                "panel 'Circuit breaker state per upstream' A",
                "panel 'Requests per second by status code' A",
                "panel 'Upstream attempts by outcome' A",
                "panel 'Request latency (p50, p90, p99) by route' C",
                "panel 'Time to first token (p50, p90, p99) by route' C",
                "panel 'Sidecar overhead (p50, p99)' B",
                "panel 'Open breakers' A",
                "variable $pod",
            ):
                assert results[where], f"{where} returned nothing"
            assert float(results["panel 'Open breakers' A"][0]["value"][1]) == 1

            async def rules_evaluated() -> list[dict[str, Any]]:
                groups = (await api(s, prom + "/api/v1/rules"))["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                done = all(not r["lastEvaluation"].startswith("0001") for r in rules)
                return rules if rules and done else []

            rules = await until(rules_evaluated, "every alert rule evaluated")
            shipped = yaml.safe_load(ALERTS.read_text())
            assert len(rules) == sum(len(g["rules"]) for g in shipped["groups"])
            for rule in rules:
                assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
                unknown = set(METRIC.findall(rule["query"])) - names
                assert not unknown, f"alert {rule['name']}: not exported {unknown}"

            async def exemplars() -> list[Any]:
                now = time.time()
                data = await api(
                    s,
                    prom + "/api/v1/query_exemplars",
                    query="llm_sidecar_request_duration_seconds_bucket",
                    start=str(now - 300),
                    end=str(now + 60),
                )
                return [e for series in data for e in series["exemplars"]]

            found = await until(exemplars, "exemplars scraped over OpenMetrics")
            assert all(len(e["labels"]["request_id"]) == 24 for e in found)
    finally:
        stop.set()
        await traffic
