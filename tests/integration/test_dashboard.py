"""The live dashboard: /stats, /stats/stream, the page in a real Chromium, `llm-sidecar status`."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import SidecarFactory
from tests.integration.cdp import chromium
from tests.integration.traffic import Rig, every_kind_of_traffic, open_breaker, start_rig, stop_rig

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
async def rig(make_sidecar: SidecarFactory, tmp_path: Path):
    rig = await start_rig(make_sidecar, tmp_path)
    yield rig
    await stop_rig(rig)


async def get_json(url: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200
            return await response.json()


async def test_stats_describe_every_upstream_and_route(rig: Rig):
    await every_kind_of_traffic(rig)
    report = await get_json(rig.admin + "/stats")
    cards = {card["name"]: card for card in report["upstreams"]}
    assert set(cards) == {"primary", "backup", "claude", "dead"}
    primary = cards["primary"]
    assert primary["breaker"]["state"] == "open"
    assert 50 < primary["breaker"]["next_trial_in_s"] <= 60
    assert primary["rejected"] >= 1 and primary["failures"] == 3
    judged = primary["requests"] - primary["rejected"]  # attempts that reached the primary
    assert primary["error_pct"] == round(100 * 3 / judged, 1) and judged > 3
    assert primary["fallbacks"] >= 4 and primary["total"] == primary["requests"]
    backup = cards["backup"]
    assert backup["breaker"]["state"] == "closed" and backup["error_pct"] == 0
    assert backup["latency_ms"]["p50"] is not None and backup["rate_per_s"] > 0
    assert cards["dead"]["failures"] == 1
    assert cards["claude"]["failures"] == 2  # the 429 and the 500; the 400 is the client's
    assert {"active", "idle", "max"} <= set(backup["pool"])
    routes = {route["name"]: route for route in report["routes"]}
    assert routes["openai"]["targets"] == ["primary", "backup"]
    assert routes["none"]["total"] == 1
    assert report["transitions"][0] == {
        **report["transitions"][0],
        "upstream": "primary",
        "from": "closed",
        "to": "open",
    }
    assert report["config"]["hash"]  # the failed reload at the end shows, with its reason:
    assert "invalid YAML" in report["config"]["last_error"]["message"]


async def test_limit_fill_shows_on_the_card(rig: Rig):
    rig.config["upstreams"]["backup"]["limits"] = {"requests": {"per_min": 10}}
    rig.config_path.write_text(yaml.safe_dump(rig.config))
    assert (await rig.sidecar.reload())["ok"]
    async with aiohttp.ClientSession() as session:
        for _ in range(5):  # the route allows 2 a minute: 2 reach the backup's bucket
            url = rig.proxy + "/limited/v1/chat/completions"
            async with session.post(url, json={"model": "m", "messages": []}) as response:
                await response.read()
    cards = {c["name"]: c for c in (await get_json(rig.admin + "/stats"))["upstreams"]}
    fill = {f["limit"]: f["fill"] for f in cards["backup"]["limits"]}
    assert 0.1 <= fill["requests"] <= 0.5, fill  # 2 of 10 taken, refilling at 1 per 6 s
    assert cards["primary"]["limits"] == []


async def test_stats_stream_sends_reports_and_ends_on_shutdown(
    make_sidecar: SidecarFactory, tmp_path: Path
):
    rig = await start_rig(make_sidecar, tmp_path)
    async with aiohttp.ClientSession() as session:
        async with session.get(rig.admin + "/stats/stream?interval=0.2") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            reports = 0
            async for line in response.content:
                if line.startswith(b"data: "):
                    reports += 1
                    if reports == 3:
                        break
            stopping = asyncio.create_task(rig.sidecar.admin.stop())
            rest = await asyncio.wait_for(response.content.read(), 10)  # the stream ends
            await asyncio.wait_for(stopping, 10)
    assert reports == 3 and rest.count(b"data: ") <= 2
    await stop_rig(rig)


async def test_page_is_self_contained(rig: Rig):
    async with aiohttp.ClientSession() as session:
        for path in ("/", "/dashboard"):
            async with session.get(rig.admin + path) as response:
                assert response.status == 200
                assert response.headers["content-type"].startswith("text/html")
                assert "default-src 'none'" in response.headers["content-security-policy"]
                html = await response.text()
    # Nothing is loaded from elsewhere: no src/href, no CSS url() or @import.
    assert not re.search(r"\b(src|href)\s*=|url\(|@import|<link", html, re.IGNORECASE)
    assert "EventSource(" in html and 'fetch("stats"' in html


@pytest.mark.timeout(180)
async def test_live_page_in_chromium_turns_the_card_open(rig: Rig, tmp_path: Path):
    async with chromium(tmp_path / "profile") as page:
        await page.goto(rig.admin + "/")
        cards = "document.querySelectorAll('.card').length"
        assert await page.wait_for(f"{cards} === 4 && {cards}", timeout=30) == 4
        state = "document.querySelector('.card[data-upstream=\"primary\"] [data-role=state]')"
        assert await page.evaluate(f"{state}.textContent") == "CLOSED"
        await page.wait_for("document.getElementById('conn').textContent === 'live'", 30)
        async with aiohttp.ClientSession() as session:
            await open_breaker(rig, session)  # while the page is open: it must update itself
            await session.post(rig.proxy + "/openai/v1/chat/completions", json={"model": "m"})
        await page.wait_for(f"{state}.textContent === 'OPEN'", timeout=30)
        card = "document.querySelector('.card[data-upstream=\"primary\"]')"
        assert await page.evaluate(f"{card}.classList.contains('open')")
        trial = await page.evaluate(f"{card}.querySelector('[data-role=trial]').textContent")
        assert re.fullmatch(r"next half-open trial in \d+\.\d s", trial), trial
        text = await page.evaluate(f"{card}.innerText")
        assert "100.0" in text  # error %
        screenshot = await page.screenshot(tmp_path / "dashboard-breaker-open.png")
    assert screenshot.startswith(PNG) and len(screenshot) > 20_000


async def test_status_command_prints_the_same_as_a_table(rig: Rig):
    async with aiohttp.ClientSession() as session:
        await open_breaker(rig, session)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "status",
        "--admin",
        rig.admin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("llm-sidecar ") and "config " in lines[0]
    assert lines[1].split()[:3] == ["UPSTREAM", "BREAKER", "NEXT"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"primary", "backup", "claude", "dead"}
    assert rows["primary"][1] == "OPEN" and rows["primary"][2].endswith("s")
    assert rows["backup"][1] == "CLOSED"


async def test_status_command_fails_clearly_without_a_sidecar():
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "status",
        "--admin",
        "http://127.0.0.1:9",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1 and b"cannot reach" in err


@pytest.mark.timeout(120)
async def test_demo_shows_a_breaker_open_fail_fast_and_close_again():
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "demo",
        "--admin=127.0.0.1:0",
        "--proxy=127.0.0.1:0",
        "--healthy=2",
        "--failing=5",
        "--reset-timeout=2",
        "--rate=10",
        "--duration=14",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 90)
    text = out.decode()
    assert process.returncode == 0, text + err.decode()
    assert re.search(r"dashboard:\s+http://127\.0\.0\.1:\d+/", text)
    changes = re.findall(r"breaker primary: (\S+ -> \S+)", text)
    assert changes[:2] == ["closed -> open", "open -> half-open"], text
    assert "half-open -> closed" in changes, text  # recovered once the failures stopped
    assert "demo stopped." in text and not err.strip(), err.decode()
