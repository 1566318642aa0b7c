"""Start the sidecar for the benchmark, with two bench-only switches.

  python bench/launch_sidecar.py [--no-metrics] --config FILE      serve, like ``llm-sidecar``
  python bench/launch_sidecar.py --stages FILE                      print the pipeline as JSON

The config has no switch for the Prometheus subscriber (it is always on), so ``--no-metrics``
replaces ``Metrics._on_request`` with a no-op before the sidecar is built: that is the only way
to show what metrics cost per request. ``--stages`` lists the stage classes each tier would run
for the config, so a result says which policies were really in the path (a config key for a
policy whose stage is not wired yet costs nothing and must not be reported as measured).
"""

from __future__ import annotations

import sys
from typing import Any


def _no_metrics() -> None:
    from sidecar.metrics import Metrics

    if not hasattr(Metrics, "_on_request"):
        sys.exit("launch_sidecar: sidecar.metrics.Metrics._on_request is gone; update the bench")

    def skip(self: Any, event: Any) -> None:
        return None

    Metrics._on_request = skip  # type: ignore[method-assign]


def stages(path: str) -> dict[str, Any]:
    from sidecar.config.loader import load_file
    from sidecar.pipeline import route_stages, upstream_stages
    from sidecar.runtime import build_snapshot
    from sidecar.upstream.resolver import Resolver

    snapshot = build_snapshot(load_file(path), None, Resolver())
    return {
        "route": {r.label: [type(s).__name__ for s in route_stages(r)] for r in snapshot.routes},
        "upstream": {
            name: [type(s).__name__ for s in upstream_stages(u)]
            for name, u in snapshot.upstreams.items()
        },
    }


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--stages"]:
        import json

        print(json.dumps(stages(argv[1])))
        return 0
    if argv[:1] == ["--no-metrics"]:
        _no_metrics()
        argv = argv[1:]
    from sidecar.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
