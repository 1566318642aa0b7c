"""Audit trail and access log through a real sidecar: content, redaction, rotation, disk full."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Sidecar
from sidecar.fakeupstream import FakeUpstream
from tests.conftest import SidecarFactory, admin_url, base_config, proxy_url, wait_for

SECRETS = {
    "authorization": "Bearer sk-live-0123456789abcdef0123",
    "x-api-key": "sk-ant-api03-secretsecretsecret",
    "api-key": "azure-key-5f4dcc3b5aa765d61d83",
    "cookie": "session=cookie-secret-value-42",
}
QUERY_SECRET = "AIzaSyA-query-secret-key-0000000000000"
PROMPT = "the quarterly numbers are confidential"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}


def audit_config(fake: FakeUpstream, tmp_path: Path, **audit: Any) -> dict[str, Any]:
    config = base_config(fake.url)
    config["access_log"] = {"enabled": True}
    config["audit"] = {"path": str(tmp_path / "audit.log"), **audit}
    config["prices"] = {"gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}
    return config


def capture_access_log(sidecar: Sidecar) -> io.BytesIO:
    stream = io.BytesIO()
    sidecar.access_log._stream = stream
    return stream


async def post(url: str, body: Any, **headers: str) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers=headers) as response:
            return response.status, response.headers["x-request-id"], await response.read()


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def metric(sidecar: Sidecar, name: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url(sidecar) + "/metrics") as response:
            text = await response.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


async def test_one_record_per_request_with_who_what_when_and_no_secrets(
    make_sidecar: SidecarFactory, fake: FakeUpstream, tmp_path: Path
):
    sidecar = await make_sidecar(audit_config(fake, tmp_path))
    access = capture_access_log(sidecar)
    url = proxy_url(sidecar) + f"/openai/v1/chat/completions?key={QUERY_SECRET}"
    headers = {**SECRETS, "x-tenant-id": "team-a"}
    status, plain_id, _ = await post(url, CHAT, **headers)
    assert status == 200
    stream = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, stream_id, body = await post(url, stream, **headers)
    assert status == 200 and b"[DONE]" in body
    status, failed_id, _ = await post(url, CHAT, **{**headers, "x-fake-status": "503"})
    assert status == 503
    path = tmp_path / "audit.log"
    await wait_for(lambda: len(lines(path)) == 3, message="three audit records")
    records = {record["request_id"]: record for record in lines(path)}
    assert set(records) == {plain_id, stream_id, failed_id}
    plain = records[plain_id]
    assert plain["tenant"] == "team-a" and plain["route"] == "/openai"
    assert plain["upstream"] == "fake" and plain["model"] == "gpt-4o-mini"
    assert plain["method"] == "POST" and plain["path"] == "/openai/v1/chat/completions"
    assert plain["status"] == 200 and plain["outcome"] == "success" and plain["attempts"] == 1
    assert plain["tokens"]["prompt"] > 0 and plain["tokens"]["completion"] > 0
    assert plain["cost_usd"] > 0 and plain["duration_ms"] > 0 and plain["ts"].endswith("Z")
    assert records[stream_id]["tokens"]["completion"] > 0
    assert records[failed_id]["outcome"] == "error" and records[failed_id]["status"] == 503
    assert "request_body" not in plain and "response_body" not in plain
    sidecar.access_log.flush()
    access_lines = [orjson.loads(line) for line in access.getvalue().splitlines()]
    by_id = {line["request_id"]: line for line in access_lines}
    assert set(by_id) == {plain_id, stream_id, failed_id}
    streamed = by_id[stream_id]
    for field in ("tenant", "route", "upstream", "model", "status", "attempts", "breaker"):
        assert field in streamed
    assert streamed["tenant"] == "team-a" and streamed["breaker"] == "closed"
    assert streamed["ttft_ms"] > 0 and streamed["upstream_ms"] > 0
    assert streamed["overhead_ms"] >= 0 and streamed["bytes_out"] == len(body)
    assert streamed["tokens"]["total"] == sum(
        streamed["tokens"][k] for k in ("prompt", "completion")
    )
    assert by_id[plain_id]["ttft_ms"] is None  # not a stream
    everything = path.read_bytes() + access.getvalue()
    for secret in [*SECRETS.values(), QUERY_SECRET, PROMPT, "cookie-secret"]:
        assert secret.encode() not in everything, secret
    assert fake.last_request is not None  # the upstream still got what it needed
    assert fake.last_request.headers["authorization"] == SECRETS["authorization"]


async def test_bodies_only_with_include_bodies_and_secrets_still_masked(
    make_sidecar: SidecarFactory, fake: FakeUpstream, tmp_path: Path
):
    sidecar = await make_sidecar(audit_config(fake, tmp_path, include_bodies=True))
    body = {**CHAT, "user": "alice", "api_key": "sk-proj-in-body-0123456789"}
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    _, plain_id, _ = await post(url, body, **SECRETS)
    _, stream_id, _ = await post(url, {**body, "stream": True}, **SECRETS)
    path = tmp_path / "audit.log"
    await wait_for(lambda: len(lines(path)) == 2, message="two audit records")
    records = {record["request_id"]: record for record in lines(path)}
    plain = records[plain_id]
    sent = plain["request_body"]["json"]
    assert sent["messages"][0]["content"] == PROMPT and sent["api_key"] == "<redacted>"
    answer = plain["response_body"]["json"]["choices"][0]["message"]["content"]
    assert answer.startswith("This is a fake reply")
    streamed = records[stream_id]["response_body"]["text"]
    assert streamed.startswith("data: ") and "[DONE]" in streamed
    text = path.read_text()
    for secret in [*SECRETS.values(), "sk-proj-in-body"]:
        assert secret not in text, secret


async def test_a_full_disk_is_counted_and_the_proxy_keeps_serving(
    make_sidecar: SidecarFactory, fake: FakeUpstream, tmp_path: Path
):
    (tmp_path / "audit.log").symlink_to("/dev/full")  # every write: ENOSPC
    sidecar = await make_sidecar(audit_config(fake, tmp_path))
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    for _ in range(5):
        status, _, _ = await post(url, CHAT)
        assert status == 200
    await wait_for(lambda: sidecar.audit.lost == 5, message="five records lost")
    assert await metric(sidecar, "llm_sidecar_audit_write_errors_total") >= 1
    assert await metric(sidecar, "llm_sidecar_audit_dropped_records_total") == 5
    assert await metric(sidecar, "llm_sidecar_audit_records_total") == 0
    status, _, _ = await post(url, CHAT)
    assert status == 200


async def test_rotation_by_size_keeps_whole_records(
    make_sidecar: SidecarFactory, fake: FakeUpstream, tmp_path: Path
):
    sidecar = await make_sidecar(audit_config(fake, tmp_path, max_bytes=2048, backups=2))
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        for _ in range(40):
            async with session.post(url, json=CHAT) as response:
                assert response.status == 200
    await wait_for(lambda: sidecar.audit.written == 40, message="40 records written")
    names = sorted(os.listdir(tmp_path / "."))
    names = [n for n in names if n.startswith("audit.log")]
    assert names == ["audit.log", "audit.log.1", "audit.log.2"]
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert 0 < len(data) <= 2048 and data.endswith(b"\n")
        assert all(orjson.loads(line)["outcome"] == "success" for line in data.splitlines())
    assert await metric(sidecar, "llm_sidecar_audit_records_total") == 40


async def test_a_reload_turns_the_audit_on(
    make_sidecar: SidecarFactory, fake: FakeUpstream, tmp_path: Path
):
    config = base_config(fake.url)
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    sidecar = await make_sidecar(config, str(config_path))
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    assert (await post(url, CHAT))[0] == 200
    config["audit"] = {"path": str(tmp_path / "audit.log")}
    config_path.write_text(yaml.safe_dump(config))
    assert (await sidecar.reload())["ok"]
    _, request_id, _ = await post(url, CHAT)
    await wait_for(lambda: len(lines(tmp_path / "audit.log")) == 1, message="one record")
    assert lines(tmp_path / "audit.log")[0]["request_id"] == request_id


@pytest.mark.parametrize("status", [429, 400])
async def test_outcomes_of_refusals_and_client_errors(
    make_sidecar: SidecarFactory, fake: FakeUpstream, tmp_path: Path, status: int
):
    sidecar = await make_sidecar(audit_config(fake, tmp_path))
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    await post(url, CHAT, **{"x-fake-status": str(status)})
    await wait_for(lambda: len(lines(tmp_path / "audit.log")) == 1, message="one record")
    record = lines(tmp_path / "audit.log")[0]
    assert record["outcome"] == ("error" if status == 429 else "client_error")
