"""How exactly do the rate limits hold? Offer 3x a route's limit for 10 s and count admissions.

Runs in one process (uvloop when installed): the fake upstream, a real Sidecar on 127.0.0.1
port 0, and an open-loop client that starts requests on a fixed schedule, whatever the answers,
so refusals do not slow the offered load down. For each mode it prints what was admitted
against what the configuration allows over the run: the bucket's burst plus its rate times the
admission window (first to last request offered; in queue mode plus ``max_wait_s``, the longest
a late request may wait for its turn).

* ``requests``: ``requests: {per_s: R}`` in reject mode; admitted requests vs burst + R x T.
* ``tokens``: ``tokens: {per_min: 60 x K}`` in reject mode, requests reserving far more than
  they use (``max_tokens`` 200, about 11 used); admitted *used* tokens vs burst + K x T. Shows
  that reconciliation refunds reservations: without it, admissions would follow the estimates.
* ``queue``: ``requests: {per_s: R}`` in queue mode (``max_wait_s`` 1); admitted requests vs
  burst + R x T, and the steady-state rate after the first second.

Not a CI test: ``python bench/limits_accuracy.py [--rate 50] [--seconds 10] [--overload 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import yaml
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar
from sidecar.config.loader import load_text
from sidecar.fakeupstream import FakeUpstream

PROMPT = {"model": "bench-model", "messages": [{"role": "user", "content": "hello there"}]}


def config(url: str, limits: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {
            "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
            "access_log": {"enabled": False},
            "upstreams": {"fake": {"url": url, "pacing": False}},
            "routes": [{"path_prefix": "/openai", "upstreams": ["fake"], "limits": limits}],
        }
    )


async def offer(url: str, body: bytes, rate: float, seconds: float) -> list[tuple[float, int, int]]:
    """Start `rate` x `seconds` requests on schedule; (start offset, status, tokens used) each."""
    results: list[tuple[float, int, int]] = []
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(offset: float) -> None:
            headers = {"content-type": "application/json"}
            async with session.post(url, data=body, headers=headers) as response:
                data = await response.read()
            used = 0
            if response.status == 200:
                used = orjson.loads(data)["usage"]["total_tokens"]
            results.append((offset, response.status, used))

        tasks: set[asyncio.Task[None]] = set()
        start = loop.time()
        total = round(rate * seconds)
        for i in range(total):
            due = start + i / rate
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(due - start))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return results


async def run_mode(
    name: str,
    limits: dict[str, Any],
    body: dict[str, Any],
    rate: float,
    seconds: float,
    overload: float,
    allowed: Callable[[list[tuple[float, int, int]]], tuple[float, float, str]],
) -> None:
    fake = FakeUpstream()
    url = await fake.start()
    sidecar = Sidecar(load_text(config(url, limits)), registry=CollectorRegistry())
    await sidecar.start()
    try:
        assert sidecar.proxy_address is not None
        host, port = sidecar.proxy_address
        target = f"http://{host}:{port}/openai/v1/chat/completions"
        started = time.monotonic()
        results = await offer(target, orjson.dumps(body), rate * overload, seconds)
        wall = time.monotonic() - started
    finally:
        await sidecar.stop()
        await fake.stop()
    ok = [r for r in results if r[1] == 200]
    refused = sum(1 for r in results if r[1] == 429)
    other = len(results) - len(ok) - refused
    got, expected, unit = allowed(results)
    steady = [r for r in ok if r[0] >= 1.0]
    steady_rate = (len(steady) if unit == "requests" else sum(r[2] for r in steady)) / (
        seconds - 1.0
    )
    print(
        f"{name:8} offered {len(results)} req ({rate * overload:g}/s) in {wall:.2f}s: "
        f"200={len(ok)} 429={refused} other={other} | admitted {got:g} {unit} vs allowed "
        f"{expected:.1f} -> {100 * (got - expected) / expected:+.2f}% | steady state (1 s..end) "
        f"{steady_rate:.2f} {unit}/s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second allowed")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--overload", type=float, default=3.0, help="offered / allowed")
    parser.add_argument("--mode", choices=["requests", "tokens", "queue", "all"], default="all")
    args = parser.parse_args()
    rate, seconds, overload = args.rate, args.seconds, args.overload
    print(f"limit {rate:g} req/s (burst {rate:g}), offered {overload:g}x for {seconds:g} s")

    def window(results: list[tuple[float, int, int]]) -> float:
        return max(r[0] for r in results)  # the last request's start offset

    def requests(results: list[tuple[float, int, int]]) -> tuple[float, float, str]:
        return sum(1 for r in results if r[1] == 200), rate + rate * window(results), "requests"

    def queued(results: list[tuple[float, int, int]]) -> tuple[float, float, str]:
        admitted = sum(1 for r in results if r[1] == 200)
        return admitted, rate + rate * (window(results) + 1.0), "requests"

    if args.mode in ("requests", "all"):
        limits = {"requests": {"per_s": rate}}
        await run_mode("requests", limits, PROMPT, rate, seconds, overload, requests)
    if args.mode in ("tokens", "all"):
        per_request = 11  # the fake's usage for PROMPT: 11 chars // 4 + 9 words
        tokens_per_s = rate * per_request
        limits = {"tokens": {"per_min": tokens_per_s * 60, "burst": tokens_per_s}}
        body = {**PROMPT, "max_tokens": 200}  # reserves ~207, uses 11

        def tokens(results: list[tuple[float, int, int]]) -> tuple[float, float, str]:
            used = sum(r[2] for r in results if r[1] == 200)
            return used, tokens_per_s + tokens_per_s * window(results), "tokens"

        await run_mode("tokens", limits, body, rate, seconds, overload, tokens)
    if args.mode in ("queue", "all"):
        limits = {"requests": {"per_s": rate}, "on_limit": "queue", "max_wait_s": 1}
        await run_mode("queue", limits, PROMPT, rate, seconds, overload, queued)


if __name__ == "__main__":
    runner_factory: Any = None
    with contextlib.suppress(ImportError):
        import uvloop

        runner_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=runner_factory) as runner:
        runner.run(main())
