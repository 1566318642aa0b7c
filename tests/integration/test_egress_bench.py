"""bench/egress_bench.py keeps working: a quick run on loopback prints both tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench" / "egress_bench.py"


def test_egress_bench_quick_run():
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH.parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| download (upstream -> client) |" in done.stdout
    assert "| HTTPS_PROXY + interception |" in done.stdout
    assert "interception vs base-URL mode" in done.stdout
