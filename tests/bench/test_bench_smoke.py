"""Smoke test of the benchmark (bench/run.py --quick): it starts, measures and reports.

Not a performance test: the numbers are not checked, only that every stage of the bench ran
against a real sidecar and wrote its JSON and table, so the one-command bench keeps working.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None or shutil.which("taskset") is None,
    reason="the bench needs wrk and taskset",
)


@pytest.mark.timeout(60)
def test_quick_bench_runs_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--targets",
            "direct,floor,sidecar",
            "--no-plot",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    sidecar = results["targets"]["sidecar"]
    for conns in ("1", "8"):
        run = sidecar["wrk"][conns]
        assert run["requests"] > 100 and run["errors"] == 0, run
    assert sidecar["stream"]["streams_complete"] == 1
    assert sidecar["stream"]["boundaries_ok"] is True
    assert sidecar["open"]["streams_complete"] == sidecar["open"]["streams"]
    assert sidecar["rss_start_mb"] > 0
    assert sidecar["metrics_requests_total"] and sidecar["access_log_lines"] > 100
    floor = results["targets"]["floor"]["wrk"]["8"]
    assert floor["requests"] > 100 and floor["errors"] == 0, floor
    assert "| sidecar | 1 |" in (tmp_path / "latest.md").read_text()
