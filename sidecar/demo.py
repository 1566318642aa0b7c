"""``llm-sidecar demo``: watch a breaker open, fail fast, fall back and close, in under a minute.

Starts three fake LLM upstreams (``primary`` and ``backup`` in OpenAI's shape, ``claude`` in
Anthropic's), a sidecar in front of them (route ``/openai``: primary, falling back to backup;
route ``/anthropic``: claude), and a small traffic generator, then prints the live dashboard's
URL. A script switches the primary's failures on and off (healthy, then failing, then healthy
again, in a loop), so the primary's card goes CLOSED, OPEN (requests fail fast and fall back
to the backup), HALF-OPEN (one trial request), and CLOSED again. ``--manual`` leaves the
switch to you: press Enter to toggle. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
from typing import Any

import aiohttp
import yaml

from sidecar.config.loader import load_text
from sidecar.events import BreakerTransitioned
from sidecar.fakeupstream import FakeUpstream, FakeUpstreamSettings

PROMPT = [{"role": "user", "content": "Say something nice."}]
CHAT: dict[str, object] = {"model": "gpt-4o-mini", "messages": PROMPT}
MESSAGE: dict[str, object] = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": PROMPT}


def demo_config(primary: str, backup: str, claude: str, opts: argparse.Namespace) -> dict[str, Any]:
    """The sidecar config the demo runs (printed with ``--print-config``)."""
    breaker = {"failure_threshold": 3, "reset_timeout_s": opts.reset_timeout}
    return {
        "listen": {"proxy": opts.proxy, "admin": opts.admin},
        "shutdown_grace_s": 1,
        "access_log": {"enabled": False},
        "upstreams": {
            "primary": {"url": primary, "breaker": breaker},
            "backup": {
                "url": backup,
                "breaker": breaker,
                # A concurrency limit in queue mode: its fill moves with the load on the card.
                "limits": {"max_in_flight": 4, "on_limit": "queue"},
            },
            "claude": {"url": claude, "api": "anthropic", "breaker": breaker},
        },
        "routes": [
            {
                "name": "openai",
                "path_prefix": "/openai",
                "upstreams": ["primary", "backup"],
                "retry": {"attempts": 1},
            },
            {"name": "anthropic", "path_prefix": "/anthropic", "upstreams": ["claude"]},
        ],
        "prices": {
            "gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
            "claude-sonnet-4-5": {"input_per_mtok": 3, "output_per_mtok": 15},
        },
    }


def say(start: float, message: str) -> None:
    print(f"[{time.monotonic() - start:5.1f}s] {message}", flush=True)


async def traffic(proxy: str, rate: float, stop: asyncio.Event) -> None:
    """About ``rate`` requests a second: chat (some streamed) on /openai, messages on /anthropic."""
    rng = random.Random(7)
    pending: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> None:
            pick = rng.random()
            body: dict[str, object]
            headers = {"x-tenant-id": rng.choice(["team-a", "team-b"])}
            if pick < 0.15:
                url, body = proxy + "/anthropic/v1/messages", MESSAGE
            elif pick < 0.4:
                url, body = proxy + "/openai/v1/chat/completions", {**CHAT, "stream": True}
                headers |= {"x-fake-chunks": "12", "x-fake-chunk-interval-ms": "25"}
            else:
                url, body = proxy + "/openai/v1/chat/completions", CHAT
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.post(url, json=body, headers=headers) as response:
                    await response.read()

        while not stop.is_set():
            if len(pending) < 100:
                task = asyncio.create_task(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.expovariate(rate))
        for task in list(pending):
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def set_failing(fake: FakeUpstream, failing: bool) -> None:
    fake.settings.error_rate = 1.0 if failing else 0.0


async def scripted(primary: FakeUpstream, opts: argparse.Namespace, start: float) -> None:
    """Healthy for ``--healthy`` s, failing for ``--failing`` s, and again, until stopped."""
    while True:
        await asyncio.sleep(opts.healthy)
        set_failing(primary, True)
        say(start, f"primary: failures ON (every call answers {opts.error_status}).")
        say(start, "  Watch its card: OPEN, fail fast, requests fall back to backup.")
        await asyncio.sleep(opts.failing)
        set_failing(primary, False)
        say(start, "primary: failures OFF. The next half-open trial succeeds and closes it.")


async def manual(primary: FakeUpstream, start: float) -> None:
    """Toggle the primary's failures each time a line arrives on stdin (Enter)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline()))
    try:
        while True:
            if not await lines.get():
                return  # stdin closed
            failing = primary.settings.error_rate == 0.0
            set_failing(primary, failing)
            say(start, f"primary: failures {'ON' if failing else 'OFF'} (Enter toggles)")
    finally:
        loop.remove_reader(sys.stdin.fileno())


async def run(opts: argparse.Namespace) -> None:
    from sidecar.app import Sidecar

    settings = FakeUpstreamSettings(error_status=opts.error_status, latency_ms=opts.latency_ms)
    fakes = [FakeUpstream(FakeUpstreamSettings(**vars(settings))) for _ in range(3)]
    primary = fakes[0]
    primary_url, backup_url, claude_url = [await fake.start() for fake in fakes]
    config = demo_config(primary_url, backup_url, claude_url, opts)
    if opts.print_config:
        print(yaml.safe_dump(config, sort_keys=False))
    sidecar = Sidecar(load_text(yaml.safe_dump(config, sort_keys=False)), None)
    start = time.monotonic()

    def transition(event: BreakerTransitioned) -> None:
        change = f"{event.from_state} -> {event.to_state}".replace("_", "-")
        say(start, f"breaker {event.upstream}: {change} ({event.reason})")

    sidecar.events.subscribe(BreakerTransitioned, transition)
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    try:
        await sidecar.start()
        assert sidecar.admin_address is not None and sidecar.proxy_address is not None
        admin = "http://{}:{}".format(*sidecar.admin_address)
        proxy = "http://{}:{}".format(*sidecar.proxy_address)
        print(
            f"llm-sidecar demo\n"
            f"  dashboard:  {admin}/\n"
            f"  status:     llm-sidecar status --admin {admin}\n"
            f"  metrics:    {admin}/metrics\n"
            f"  proxy:      {proxy}/openai/v1 (primary, falling back to backup), "
            f"{proxy}/anthropic/v1 (claude)\n"
            f"  traffic:    about {opts.rate:g} requests/s\n",
            flush=True,
        )
        if opts.manual:
            say(start, "all upstreams healthy. Press Enter to switch the primary's failures.")
        else:
            say(
                start,
                f"all upstreams healthy. The primary starts failing in {opts.healthy:g}s, "
                f"for {opts.failing:g}s; breakers open after 3 failures and try again after "
                f"{opts.reset_timeout:g}s.",
            )
        tasks.add(asyncio.create_task(traffic(proxy, opts.rate, stop)))
        control = manual(primary, start) if opts.manual else scripted(primary, opts, start)
        tasks.add(asyncio.create_task(control))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), opts.duration)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sidecar.stop()
        for fake in fakes:
            await fake.stop()
        say(start, "demo stopped.")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--admin", default="127.0.0.1:9901", help="admin (dashboard) HOST:PORT")
    parser.add_argument("--proxy", default="127.0.0.1:4000", help="proxy HOST:PORT")
    parser.add_argument("--rate", type=float, default=5.0, help="requests per second")
    parser.add_argument("--healthy", type=float, default=10.0, help="seconds healthy per cycle")
    parser.add_argument("--failing", type=float, default=20.0, help="seconds failing per cycle")
    parser.add_argument(
        "--reset-timeout", type=float, default=8.0, help="breaker open period (seconds)"
    )
    parser.add_argument("--error-status", type=int, default=503, help="status of failures")
    parser.add_argument("--latency-ms", type=float, default=60.0, help="fake upstream latency")
    parser.add_argument("--manual", action="store_true", help="toggle failures with Enter")
    parser.add_argument("--duration", type=float, default=None, help="stop after SECONDS")
    parser.add_argument("--print-config", action="store_true", help="print the sidecar config")
    return parser


def main(opts: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C (or ``--duration``)."""
    from sidecar.cli import _run

    # The demo narrates breaker changes itself; the sidecar's own log would say it twice.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sidecar").setLevel(logging.ERROR)
    try:
        _run(lambda: run(opts))
    except OSError as exc:
        print(
            f"llm-sidecar demo: cannot listen ({exc}); try --admin 127.0.0.1:0 --proxy 127.0.0.1:0",
            file=sys.stderr,
        )
        return 1
    return 0
