"""Command line: ``llm-sidecar [--config PATH] [--log-level LEVEL]`` and its subcommands."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from sidecar.config.loader import ConfigError, LoadedConfig, load_default, load_file

log = logging.getLogger("sidecar")


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run on uvloop when available (``asyncio.Runner`` loop factory, not the deprecated
    ``uvloop.install``)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format='{"ts": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", '
        '"msg": "%(message)s"}',
        stream=sys.stderr,
    )


def _load(path: str | None) -> LoadedConfig:
    return load_file(path) if path else load_default()


def summary(loaded: LoadedConfig) -> str:
    config = loaded.config
    lines = [
        f"config OK: {loaded.source} (hash {loaded.text_hash})",
        f"  listen: proxy {config.listen.proxy}, admin {config.listen.admin}",
        f"  upstreams ({len(config.upstreams)}):",
    ]
    for name, upstream in config.upstreams.items():
        lines.append(f"    {name}: {upstream.url}")
    lines.append(f"  routes ({len(config.routes)}):")
    for route in config.routes:
        match = route.path_prefix or ""
        if route.host:
            match += f" host={route.host}"
        targets = [t if isinstance(t, str) else t.name for t in route.upstreams]
        lines.append(f"    {match.strip()} -> {' -> '.join(targets)}")
    return "\n".join(lines)


def _tune_gc() -> None:
    """Freeze start-up objects out of the cyclic GC's reach and collect less often.

    Requests free themselves by reference counting (``Exchange.close`` breaks their cycles),
    so the GC's generation-0 passes over long-lived config, modules and metrics were pure cost.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    path = args.config or os.environ.get("LLM_SIDECAR_CONFIG")
    try:
        loaded = _load(path)
    except ConfigError as exc:
        print(f"llm-sidecar: invalid config: {exc}", file=sys.stderr)
        return 1

    async def main() -> None:
        from sidecar.app import Sidecar

        sidecar = Sidecar(loaded, path)
        _tune_gc()
        await sidecar.serve()

    try:
        _run(main)
    except OSError as exc:
        print(f"llm-sidecar: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        loaded = load_file(args.path)
    except ConfigError as exc:
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 1
    print(summary(loaded))
    return 0


def cmd_fake_upstream(args: argparse.Namespace, rest: list[str]) -> int:
    from sidecar import fakeupstream

    return fakeupstream.main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-sidecar", description="Per-pod egress proxy for LLM API traffic."
    )
    parser.add_argument("--config", help="YAML config file (default: the embedded default)")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LLM_SIDECAR_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check-config", help="validate a config file and print a summary")
    check.add_argument("path")
    gen_ca = sub.add_parser("gen-ca", help="create a CA key pair for TLS interception")
    gen_ca.add_argument("directory", help="where to write ca.pem and ca-key.pem")
    gen_ca.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    gen_ca.add_argument("--force", action="store_true", help="replace existing files")
    sub.add_parser(
        "fake-upstream", help="run the fake LLM upstream (tests, benchmarks, demo)", add_help=False
    )
    status = sub.add_parser("status", help="print a running sidecar's upstreams as a table")
    status.add_argument(
        "--admin",
        default=os.environ.get("LLM_SIDECAR_ADMIN", "http://127.0.0.1:9901"),
        help="admin URL of the sidecar (default http://127.0.0.1:9901, or $LLM_SIDECAR_ADMIN)",
    )
    status.add_argument("--json", action="store_true", help="print the raw GET /stats report")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    from sidecar import demo

    demo.build_parser(
        sub.add_parser(
            "demo", help="watch a breaker open, fail fast, fall back and close (fake upstreams)"
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "fake-upstream" in argv:
        index = argv.index("fake-upstream")
        args = parser.parse_args(argv[: index + 1])
        return cmd_fake_upstream(args, argv[index + 1 :])
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return cmd_check_config(args)
    if args.command == "status":
        from sidecar.admin.stats import status_command

        return status_command(args.admin, as_json=args.json, watch=args.watch)
    if args.command == "demo":
        from sidecar import demo

        return demo.main(args)
    if args.command == "gen-ca":
        from sidecar.egress.ca import gen_ca_command

        return gen_ca_command(args.directory, days=args.days, force=args.force)
    return cmd_serve(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
