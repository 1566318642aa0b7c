"""/metrics after traffic of every kind: valid for promtool, documented, exemplars, bounded labels."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.genai import MAX_MODELS
from tests.conftest import SidecarFactory, admin_url, base_config, proxy_url
from tests.integration.traffic import (
    CHAT,
    Rig,
    every_kind_of_traffic,
    require_tool,
    start_rig,
    stop_rig,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture
async def rig(make_sidecar: SidecarFactory, tmp_path: Path):
    rig = await start_rig(make_sidecar, tmp_path)
    yield rig
    await stop_rig(rig)


async def scrape(admin: str, accept: str | None = None) -> tuple[str, str]:
    headers = {"accept": accept} if accept else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(admin + "/metrics", headers=headers) as response:
            assert response.status == 200
            return response.headers["content-type"], await response.text()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for have, v in found.get(name, []) if labels.items() <= have.items())


def families(text: str) -> set[str]:
    """Family names as exposed (counters with their _total), from the # TYPE lines."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(
                name + "_total" if kind == "counter" and not name.endswith("_total") else name
            )
    return names


def documented() -> dict[str, str]:
    """Metric name -> its row in docs/METRICS.md tables (first column, in backquotes)."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        match = re.match(
            r"\|\s*`((?:llm_sidecar|gen_ai)_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram)\s*\|",
            line,
        )
        if match:
            rows[match.group(1)] = line
    return rows


async def test_promtool_accepts_metrics_after_every_kind_of_traffic(rig: Rig):
    promtool = require_tool("promtool")
    await every_kind_of_traffic(rig)
    _, text = await scrape(rig.admin)
    check = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    found = samples(text)
    # The traffic left its mark on every part of the metric set.
    assert value(found, "llm_sidecar_requests_total", route="openai", code="200") >= 5
    assert value(found, "llm_sidecar_requests_total", route="none", code="404") == 1
    assert value(found, "llm_sidecar_requests_total", route="dead", code="502") == 1
    assert value(found, "llm_sidecar_time_to_first_token_seconds_count", route="openai") >= 1
    assert value(found, "llm_sidecar_time_to_first_token_seconds_count", route="anthropic") == 1
    assert value(found, "llm_sidecar_overhead_seconds_count", route="openai") >= 5
    assert value(found, "llm_sidecar_upstream_attempts_total", upstream="primary", outcome="5xx")
    assert value(found, "llm_sidecar_upstream_attempts_total", outcome="circuit_open") >= 1
    assert value(found, "llm_sidecar_upstream_attempts_total", outcome="connect_error") == 1
    assert value(found, "llm_sidecar_upstream_attempts_total", upstream="claude", outcome="429")
    assert value(found, "llm_sidecar_circuit_state", upstream="primary") == 2
    assert value(found, "llm_sidecar_circuit_state", upstream="backup") == 0
    assert value(found, "llm_sidecar_circuit_transitions_total", upstream="primary") == 1
    assert value(found, "llm_sidecar_circuit_rejections_total", upstream="primary") >= 1
    assert value(found, "llm_sidecar_fallbacks_total", from_upstream="primary") >= 4
    assert value(found, "llm_sidecar_proxy_errors_total", kind="no_route") == 1
    assert value(found, "llm_sidecar_client_disconnects_total", route="openai") == 1
    assert value(found, "llm_sidecar_config_reloads_total", result="success") == 2
    assert value(found, "llm_sidecar_config_reloads_total", result="error") == 1
    assert value(found, "llm_sidecar_upstream_connections", upstream="claude", state="idle") >= 1
    assert value(found, "llm_sidecar_build_info") == 1
    assert value(
        found, "gen_ai_server_request_duration_seconds_count", gen_ai_operation_name="chat"
    )
    assert value(
        found,
        "gen_ai_server_request_duration_seconds_count",
        gen_ai_provider_name="anthropic",
        error_type="429",
    )
    assert value(found, "gen_ai_server_time_to_first_token_seconds_count") >= 2
    assert value(
        found, "gen_ai_server_request_duration_seconds_count", gen_ai_operation_name="embeddings"
    )


async def test_every_exported_metric_is_documented_and_every_documented_one_exported(rig: Rig):
    await every_kind_of_traffic(rig)
    _, text = await scrape(rig.admin)
    exported = {n for n in families(text) if n.startswith(("llm_sidecar_", "gen_ai_"))}
    docs = documented()
    assert exported - set(docs) == set(), "exported but not in docs/METRICS.md"
    promised = {name for name, row in docs.items() if "reserved" not in row.lower()}
    assert promised - exported == set(), "documented in docs/METRICS.md but not exported"


async def test_openmetrics_with_the_request_id_as_exemplar(rig: Rig):
    async with aiohttp.ClientSession() as session:
        url = rig.proxy + "/openai/v1/chat/completions"
        async with session.post(url, json={**CHAT, "stream": True}) as response:
            await response.read()
            request_id = response.headers["x-request-id"]
    content_type, text = await scrape(rig.admin, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    exemplar = f'# {{request_id="{request_id}"}}'
    for series in (
        "llm_sidecar_requests_total{",
        "llm_sidecar_request_duration_seconds_bucket{",
        "llm_sidecar_time_to_first_token_seconds_bucket{",
    ):
        assert any(line.startswith(series) and exemplar in line for line in text.splitlines()), (
            series
        )
    # The classic text format (what a default Prometheus scrape gets) has no exemplars.
    content_type, text = await scrape(rig.admin)
    assert content_type.startswith("text/plain") and "# {" not in text


async def test_label_values_are_bounded(make_sidecar: SidecarFactory, fake):
    sidecar = await make_sidecar(base_config(fake.url))
    async with aiohttp.ClientSession() as session:
        for i in range(MAX_MODELS + 30):
            body = {"model": f"model-{i}", "messages": [{"role": "user", "content": "x"}]}
            url = proxy_url(sidecar) + "/openai/v1/chat/completions"
            async with session.post(url, json=body) as response:
                assert response.status == 200
        for i in range(30):  # made-up paths: no route, and no new label values
            async with session.get(proxy_url(sidecar) + f"/random-{i}") as response:
                assert response.status == 404
    _, text = await scrape(admin_url(sidecar))
    found = samples(text)
    models = {
        labels["gen_ai_request_model"]
        for labels, _ in found["gen_ai_server_request_duration_seconds_count"]
    }
    assert len(models) == MAX_MODELS + 1 and "other" in models and "model-0" in models
    routes = {labels["route"] for labels, _ in found["llm_sidecar_requests_total"]}
    assert routes == {"/openai", "none"}
    for name, series in found.items():
        # A histogram has one series per bucket (`le`) of each label set: bound the label sets.
        label_sets = {
            frozenset((k, v) for k, v in labels.items() if k != "le") for labels, _ in series
        }
        assert len(label_sets) < 1000, f"{name} has {len(label_sets)} label sets"
