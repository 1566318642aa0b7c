"""Benchmark llm-sidecar against direct, a minimal aiohttp proxy and nginx, in one command.

    python bench/run.py                  # full run, ~3 minutes on 2 cores
    python bench/run.py --soak 300       # also a 5-minute RSS soak of the sidecar
    python bench/run.py --profile 10     # also a 10 s py-spy profile of the sidecar under wrk
    python bench/run.py --quick          # a few seconds, for the smoke test

Every process it starts (fake upstream, proxies, wrk, stream client) is bounded in time and
stopped by PID at the end. Layout on a machine with >= 2 cores: the proxy under test on core 0,
wrk, the stream client and the upstream on core 1, so the proxy owns one core and the load
side never competes with it. Writes ``latest.json``, ``latest.md`` and ``latest.png`` to
``bench/results/`` (or ``--out``); ``--update-docs`` puts the tables into docs/PERFORMANCE.md.
See docs/PERFORMANCE.md for what each number means and why the setup is what it is.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
PATH = "/v1/chat/completions"
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# Policy switches of the sidecar config: "default" has all of them, "off" none.
POLICIES = ("breaker", "limits", "metrics", "access_log")
POLICY_CONFIGS = [("off", set()), *((f"+{p}", {p}) for p in POLICIES), ("all", set(POLICIES))]
TARGET_ORDER = ("direct", "nginx", "floor", "minimal", "sidecar-off", "sidecar")
T = TypeVar("T")


# A SCHED_IDLE busy loop runs only when nothing else wants the core, so it costs the proxy
# nothing but keeps the vCPU from halting (waking a halted vCPU takes ms on some hypervisors).
SPINNER = "import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile 1: pass"


# --- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


class Processes:
    """Every child started, stopped by PID (SIGTERM, then SIGKILL) no matter what."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.env = env  # PYTHONPATH to a checked-out --ref, or None for the working tree
        self.procs: list[Proc] = []

    def start(
        self, name: str, argv: list[str], core: int | None, stdout: Path | None = None
    ) -> Proc:
        if core is not None:
            argv = ["taskset", "-c", str(core), *argv]  # taskset execs: the PID is the program's
        log = self.tmp / f"{name}.log"
        out = open(stdout or log, "wb")  # noqa: SIM115 - handed to the child
        err = out if stdout is None else open(log, "wb")  # noqa: SIM115
        popen = subprocess.Popen(
            argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT, env=self.env
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def post(port: int, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", PATH, CHAT, {"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_ready(port: int, proc: Proc | None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-2000:]}")
        try:
            status = post(port, 1.0)
            if status == 200:
                return
            last = status
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready after {timeout}s: {last}")


# --- /proc sampling ----------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[float, float]:
    """(CPU seconds user+system, RSS MB) of one process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    rss_mb = int(fields[21]) * PAGE_KB / 1024
    return cpu, rss_mb


class Sampler:
    """Samples (time, CPU s, RSS MB) of a PID every ``every`` seconds in a thread."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, IndexError, ValueError):
                cpu, rss = proc_stat(self.pid)
                self.samples.append((time.monotonic(), cpu, rss))
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_rss(self, t0: float = 0, t1: float = float("inf")) -> float:
        return max((s[2] for s in self.samples if t0 <= s[0] <= t1), default=float("nan"))

    def cpu_between(self, t0: float, t1: float) -> tuple[float, float]:
        """CPU seconds used and wall seconds between the samples nearest t0 and t1."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return float("nan"), float("nan")
        return inside[-1][1] - inside[0][1], inside[-1][0] - inside[0][0]


def machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds of all cores, stolen seconds) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
    return busy / TICK, (v[7] if len(v) > 7 else 0) / TICK


class Accounting:
    """CPU of the whole machine during a load point minus what the bench's own processes used.

    The rest ("foreign") is someone else's load on a shared machine: a point with more than
    ``FOREIGN_LIMIT`` % of a core is flagged, since its numbers are not the proxy's alone.
    ``steal`` is time the hypervisor gave our vCPUs to another guest.
    """

    def __init__(self, ps: Processes) -> None:
        self.ps = ps
        self.foreign_pct = 0.0
        self.steal_pct = 0.0

    def _ours(self) -> float:
        total = 0.0
        for proc in self.ps.procs:
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += proc_stat(proc.pid)[0]
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def __enter__(self) -> Accounting:
        self._t0 = time.monotonic()
        self._m0, self._s0 = machine_cpu()
        self._o0 = self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t0
        machine, steal = machine_cpu()
        foreign = (machine - self._m0) - (self._ours() - self._o0)
        self.foreign_pct = max(0.0, 100 * foreign / wall) if wall else 0.0
        self.steal_pct = 100 * (steal - self._s0) / wall if wall else 0.0

    @property
    def contended(self) -> bool:
        return self.foreign_pct > FOREIGN_LIMIT


FOREIGN_LIMIT = 10.0


def wait_quiet(ps: Processes, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) for others' CPU load to drop; return the last level seen."""
    deadline = time.monotonic() + max_wait
    while True:
        with Accounting(ps) as acc:
            time.sleep(0.5)
        if not acc.contended or time.monotonic() >= deadline:
            if acc.contended:
                print(
                    f"  warning: others use {acc.foreign_pct:.0f}% of a core; measuring anyway",
                    flush=True,
                )
            return acc.foreign_pct
        print(
            f"  waiting for a quiet machine: others use {acc.foreign_pct:.0f}% of a core",
            flush=True,
        )


def quiet_point(ps: Processes, s: Settings, fn: Callable[[], T]) -> tuple[T, Accounting]:
    """Run one measurement; if others loaded the machine meanwhile, retry and keep the least
    disturbed attempt (up to ``s.retries`` retries)."""
    best: tuple[T, Accounting] | None = None
    for _ in range(1 + s.retries):
        wait_quiet(ps, s.wait_quiet)
        with Accounting(ps) as acc:
            result = fn()
        if best is None or acc.foreign_pct < best[1].foreign_pct:
            best = (result, acc)
        if not acc.contended:
            break
    assert best is not None
    return best


# --- load generators ---------------------------------------------------------------------------
def run_wrk(port: int, conns: int, duration: float, core: int | None) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "5s"]
    argv += ["-s", str(BENCH / "wrk_chat.lua"), f"http://127.0.0.1:{port}{PATH}"]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    raw = json.loads(line[len("WRKJSON ") :])
    lat = {k: v / 1000 for k, v in raw["lat_us"].items()}  # ms
    errors = sum(raw["errors"].values())
    return {
        "conns": conns,
        "requests": raw["requests"],
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": lat["p50"],
        "p90_ms": lat["p90"],
        "p99_ms": lat["p99"],
        "p999_ms": lat["p999"],
        "mean_ms": lat["mean"],
        "errors": errors,
        "error_detail": raw["errors"],
    }


def run_streamclient(args: list[str], core: int | None, timeout: float) -> dict[str, Any]:
    argv = [PY, str(BENCH / "streamclient.py"), *args]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"stream client failed: {out.stderr[-1500:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- targets -----------------------------------------------------------------------------------
@dataclass
class Settings:
    duration: float
    concurrency: list[int]
    warmup: float
    ttfb_requests: int
    stream_streams: int
    stream_chunks: int
    stream_interval_ms: float
    open_streams: int
    open_chunks: int
    open_interval_ms: float
    policy_duration: float
    proxy_core: int | None
    load_core: int | None
    wait_quiet: float
    awake: bool
    retries: int = 2
    policy_rounds: int = 2


@dataclass
class Target:
    name: str
    port: int
    proc: Proc | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def sidecar_config(tmp: Path, name: str, upstream_port: int, policies: set[str]) -> Path:
    upstream: dict[str, Any] = {
        "url": f"http://127.0.0.1:{upstream_port}",
        "api": "openai",
        # 1,000 open streams need 1,000 upstream connections; the default pool is 100.
        "pool": {"max_connections": 2048, "max_idle": 256},
        "breaker": {"enabled": "breaker" in policies},
    }
    if "limits" in policies:
        # Not binding: far above anything one core can do.
        upstream["limits"] = {"requests": {"per_s": 1_000_000}}
    config = {
        "listen": {"proxy": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}"},
        "shutdown_grace_s": 1,
        "upstreams": {"bench": upstream},
        "routes": [{"path_prefix": "/v1", "strip_prefix": False, "upstreams": ["bench"]}],
        "access_log": {"enabled": "access_log" in policies},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_sidecar(
    ps: Processes, s: Settings, name: str, upstream_port: int, policies: set[str]
) -> Target:
    path = sidecar_config(ps.tmp, name, upstream_port, policies)
    config = yaml.safe_load(path.read_text())
    port = int(config["listen"]["proxy"].rsplit(":", 1)[1])
    argv = [PY, str(BENCH / "launch_sidecar.py")]
    if "metrics" not in policies:
        argv.append("--no-metrics")
    argv += ["--config", str(path), "--log-level", "warning"]
    # stdout is the access log: to a file, as a pod's stdout goes to a file on the node.
    access_log = ps.tmp / f"{name}.access.log"
    proc = ps.start(name, argv, s.proxy_core, stdout=access_log)
    wait_ready(port, proc)
    target = Target(name, port, proc)
    target.extra["policies"] = sorted(policies)
    target.extra["config"] = config
    target.extra["access_log_path"] = str(access_log)
    target.extra["admin_port"] = int(config["listen"]["admin"].rsplit(":", 1)[1])
    out = subprocess.run(
        [PY, str(BENCH / "launch_sidecar.py"), "--stages", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
        env=ps.env,
    )
    try:
        target.extra["stages"] = json.loads(out.stdout)
    except ValueError:
        target.extra["stages"] = {"error": out.stderr[-500:]}
    return target


def start_floor(ps: Processes, s: Settings, upstream_port: int) -> Target:
    port = free_port()
    argv = [PY, str(BENCH / "floor_proxy.py"), str(port), str(upstream_port)]
    proc = ps.start("floor", argv, s.proxy_core)
    wait_ready(port, proc)
    target = Target("floor", port, proc)
    target.notes.append("non-streaming only: the floor relays Content-Length bodies")
    return target


def start_minimal(ps: Processes, s: Settings, upstream_port: int) -> Target:
    port = free_port()
    argv = [PY, str(BENCH / "minimal_proxy.py"), str(port), f"http://127.0.0.1:{upstream_port}"]
    proc = ps.start("minimal", argv, s.proxy_core)
    wait_ready(port, proc)
    return Target("minimal", port, proc)


NGINX_CONF = """
worker_processes 1;
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  upstream bench {{ server 127.0.0.1:{upstream}; keepalive 256; keepalive_requests 10000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def find_nginx(install: bool) -> tuple[str | None, str]:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found or not install:
        return (
            found,
            "" if found else "nginx not installed (apt-get install nginx, or --install-nginx)",
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=300, check=False)
    out = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "nginx-light"], env=env, timeout=600, check=False
    )
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    return found, "" if found else f"nginx install failed (apt-get exit {out.returncode})"


def start_nginx(ps: Processes, s: Settings, binary: str, upstream_port: int) -> Target:
    port = free_port()
    conf = ps.tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=ps.tmp, upstream=upstream_port, port=port))
    proc = ps.start("nginx", [binary, "-p", str(ps.tmp), "-c", str(conf)], s.proxy_core)
    wait_ready(port, proc)
    return Target("nginx", port, proc)


# --- measuring one target ----------------------------------------------------------------------
def _flag(acc: Accounting) -> str:
    return f"  [others used {acc.foreign_pct:.0f}% of a core]" if acc.contended else ""


def measure(
    ps: Processes, target: Target, s: Settings, streaming: bool, open_streams: bool
) -> dict[str, Any]:
    """Non-streaming at each concurrency, then streaming latency, then N open streams."""
    result: dict[str, Any] = {"notes": target.notes, **target.extra}
    pid = target.proc.pid if target.proc is not None else None
    sampler = Sampler(pid) if pid is not None else None
    with sampler or contextlib.nullcontext():
        if pid is not None:
            time.sleep(0.3)
            result["rss_start_mb"] = proc_stat(pid)[1]
        if s.warmup:
            run_wrk(target.port, max(s.concurrency), s.warmup, s.load_core)
        result["wrk"] = {}
        for conns in s.concurrency:

            def point(conns: int = conns) -> dict[str, Any]:
                t0 = time.monotonic()
                run = run_wrk(target.port, conns, s.duration, s.load_core)
                t1 = time.monotonic()
                if sampler is not None:
                    cpu, wall = sampler.cpu_between(t0, t1)
                    run["cpu_pct"] = 100 * cpu / wall if wall else float("nan")
                    run["cpu_s_per_1k"] = 1000 * cpu / run["requests"] if run["requests"] else None
                    run["rss_peak_mb"] = sampler.peak_rss(t0, t1)
                return run

            run, acc = quiet_point(ps, s, point)
            run["foreign_cpu_pct"], run["steal_pct"] = acc.foreign_pct, acc.steal_pct
            result["wrk"][str(conns)] = run
            print(
                f"  {target.name:16} c={conns:<3} {run['rps']:9.0f} req/s  "
                f"p50 {run['p50_ms']:.3f} ms  p99 {run['p99_ms']:.3f} ms  "
                f"errors {run['errors']}{_flag(acc)}",
                flush=True,
            )
        if pid is not None:
            time.sleep(1.0)
            result["rss_idle_after_load_mb"] = proc_stat(pid)[1]
        port = str(target.port)
        if streaming:
            args = ["latency", "--port", port, "--ttfb-requests", str(s.ttfb_requests)]
            args += ["--streams", str(s.stream_streams), "--chunks", str(s.stream_chunks)]
            args += ["--interval-ms", str(s.stream_interval_ms)]
            stream, acc = quiet_point(
                ps, s, lambda: run_streamclient(args, s.load_core, timeout=120)
            )
            stream["foreign_cpu_pct"] = acc.foreign_pct
            result["stream"] = stream
            print(
                f"  {target.name:16} SSE: TTFB p50 {stream['ttfb_us']['p50']:.0f} us, chunk "
                f"delay p50 {stream['chunk_delay_us']['p50']:.0f} us, "
                f"boundaries ok {stream['boundaries_ok']}{_flag(acc)}",
                flush=True,
            )
        if open_streams and sampler is not None:
            args = ["open", "--port", port, "--streams", str(s.open_streams)]
            args += ["--chunks", str(s.open_chunks), "--interval-ms", str(s.open_interval_ms)]
            span = s.open_chunks * s.open_interval_ms / 1000
            opened, acc = quiet_point(
                ps, s, lambda: run_streamclient(args, s.load_core, timeout=span + 90)
            )
            opened["foreign_cpu_pct"] = acc.foreign_pct
            t0, t1 = opened["all_open"], opened["first_done"] or opened["ended"]
            cpu, wall = sampler.cpu_between(t0, t1)
            opened["proxy_cpu_pct"] = 100 * cpu / wall if wall else float("nan")
            opened["proxy_rss_peak_mb"] = sampler.peak_rss(opened["started"], opened["ended"])
            result["open"] = opened
            print(
                f"  {target.name:16} {s.open_streams} open streams: "
                f"{opened['streams_complete']} complete, RSS peak "
                f"{opened['proxy_rss_peak_mb']:.1f} MB, CPU {opened['proxy_cpu_pct']:.0f}%"
                f"{_flag(acc)}",
                flush=True,
            )
    if pid is not None:
        result["rss_end_mb"] = proc_stat(pid)[1]
    return result


def scrape_requests(admin_port: int) -> float | None:
    """Sum of llm_sidecar_requests_total, to prove metrics were on (or off)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("llm_sidecar_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def check_observability(target: Target, result: dict[str, Any]) -> None:
    """Record how many access-log lines and metric counts the run produced."""
    if "admin_port" not in target.extra:
        return
    result["metrics_requests_total"] = scrape_requests(target.extra["admin_port"])
    with contextlib.suppress(OSError):
        path = Path(target.extra["access_log_path"])
        with path.open("rb") as f:
            result["access_log_lines"] = sum(1 for _ in f)


# --- soak and profile --------------------------------------------------------------------------
def soak(ps: Processes, s: Settings, upstream_port: int, seconds: float) -> dict[str, Any]:
    target = start_sidecar(ps, s, "soak", upstream_port, set(POLICIES))
    assert target.proc is not None
    print(f"soak: {seconds:.0f} s at 64 connections (default policies)", flush=True)
    with Sampler(target.proc.pid, every=1.0) as sampler:
        run = run_wrk(target.port, 64, seconds, s.load_core)
    ps.stop(target.proc)
    points = sampler.samples[len(sampler.samples) // 10 :]  # skip the first 10 %: warm-up
    xs = [(p[0] - points[0][0]) / 60 for p in points]
    ys = [p[2] for p in points]
    slope = statistics.linear_regression(xs, ys).slope if len(points) > 2 else float("nan")
    return {
        "seconds": seconds,
        "rps": run["rps"],
        "errors": run["errors"],
        "rss_first_mb": ys[0] if ys else None,
        "rss_last_mb": ys[-1] if ys else None,
        "rss_max_mb": max(ys) if ys else None,
        "slope_mb_per_min": slope,
        "samples": [(round(x, 3), round(y, 2)) for x, y in zip(xs, ys, strict=True)],
    }


def profile(
    ps: Processes, s: Settings, upstream_port: int, seconds: float, out: Path
) -> dict[str, Any]:
    """py-spy record of the sidecar (default policies) under wrk at 64 connections."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    target = start_sidecar(ps, s, "profile", upstream_port, set(POLICIES))
    assert target.proc is not None
    run_wrk(target.port, 64, 1, s.load_core)
    raw = out / "profile.collapsed"
    svg = out / "profile.svg"
    spies = [
        ps.start(
            "py-spy-raw",
            [
                pyspy,
                "record",
                "-r",
                "250",
                "-d",
                str(int(seconds)),
                "-f",
                "raw",
                "-o",
                str(raw),
                "-p",
                str(target.proc.pid),
            ],
            None,
        ),
        ps.start(
            "py-spy-svg",
            [
                pyspy,
                "record",
                "-r",
                "100",
                "-d",
                str(int(seconds)),
                "-o",
                str(svg),
                "-p",
                str(target.proc.pid),
            ],
            None,
        ),
    ]
    time.sleep(1.0)
    run_wrk(target.port, 64, seconds, s.load_core)
    for spy in spies:
        spy.popen.wait(seconds + 30)
        ps.stop(spy)
    ps.stop(target.proc)
    return {"collapsed": str(raw), "svg": str(svg), "hot": hot_spots(raw)}


def hot_spots(path: Path, top: int = 25) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive share of samples per function from py-spy's collapsed stacks."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            n = int(count)
            total += n
            frames = [re.sub(r" \((.*?):\d+\)$", r" (\1)", f) for f in stack.split(";")]
            self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
            for frame in set(frames):
                incl_n[frame] = incl_n.get(frame, 0) + n
    if not total:
        return {"self": [], "inclusive": []}

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [(name, round(100 * n / total, 1)) for name, n in ranked]

    return {"self": share(self_n), "inclusive": share(incl_n)}


# --- report ------------------------------------------------------------------------------------
def _get(d: dict[str, Any], *keys: Any) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _f(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return format(value, fmt)


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each issue target: measured value, threshold, met or missed (None when not measured)."""
    t = results["targets"]
    c_hi = str(max(results["settings"]["concurrency"]))
    c_lo = str(min(results["settings"]["concurrency"]))
    rows: list[dict[str, Any]] = []

    def add(name: str, value: Any, limit: str, ok: bool | None, note: str = "") -> None:
        rows.append(
            {"target": name, "measured": value, "threshold": limit, "met": ok, "note": note}
        )

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if a is not None and b else None

    side = t.get("sidecar", {})
    rps = _get(side, "wrk", c_hi, "rps")
    r = ratio(rps, _get(t, "minimal", "wrk", c_hi, "rps"))
    add(
        f"req/s at {c_hi} conns vs minimal aiohttp proxy",
        None if r is None else f"{r:.2f}x",
        ">= 4x",
        None if r is None else r >= 4,
    )
    r = ratio(rps, _get(t, "nginx", "wrk", c_hi, "rps"))
    add(
        f"req/s at {c_hi} conns vs nginx",
        None if r is None else f"{100 * r:.0f}%",
        ">= 40%",
        None if r is None else r >= 0.4,
    )
    floor = _get(t, "floor", "wrk", c_hi, "rps")
    for name in ("sidecar-off", "sidecar"):
        r = ratio(_get(t, name, "wrk", c_hi, "rps"), floor)
        if r is not None:  # context, not a target: what the transport alone allows
            add(f"{name} req/s at {c_hi} conns vs the floor proxy", f"{100 * r:.0f}%", "-", None)
    a, b = _get(side, "wrk", c_lo, "p50_ms"), _get(t, "direct", "wrk", c_lo, "p50_ms")
    d = None if a is None or b is None else a - b
    add(
        f"added p50 at concurrency {c_lo}",
        None if d is None else f"{d:.3f} ms",
        "<= 0.15 ms",
        None if d is None else d <= 0.15,
    )
    r = ratio(_get(side, "wrk", c_hi, "p99_ms"), _get(t, "nginx", "wrk", c_hi, "p99_ms"))
    add(
        f"p99 at {c_hi} conns vs nginx p99",
        None if r is None else f"{r:.2f}x",
        "<= 2x",
        None if r is None else r <= 2,
    )
    a, b = _get(side, "stream", "ttfb_us", "p50"), _get(t, "direct", "stream", "ttfb_us", "p50")
    d = None if a is None or b is None else (a - b) / 1000
    add(
        "streaming: added TTFB (p50)",
        None if d is None else f"{d:.3f} ms",
        "<= 0.5 ms",
        None if d is None else d <= 0.5,
    )
    a = _get(side, "stream", "chunk_delay_us", "p50")
    b = _get(t, "direct", "stream", "chunk_delay_us", "p50")
    d = None if a is None or b is None else (a - b) / 1000
    add(
        "streaming: added delay per chunk (median)",
        None if d is None else f"{d:.3f} ms",
        "<= 0.2 ms",
        None if d is None else d <= 0.2,
    )
    ok = _get(side, "stream", "boundaries_ok")
    pe, pd = (
        _get(side, "stream", "pacing_jitter_us", "p50"),
        _get(t, "direct", "stream", "pacing_jitter_us", "p50"),
    )
    paced = None if pe is None or pd is None else pe - pd <= 200
    add(
        "streaming: chunk boundaries and pacing preserved",
        None
        if ok is None
        else f"boundaries {ok}, pacing jitter p50 {_f(pe, '.0f')} us (direct {_f(pd, '.0f')} us)",
        "one event per chunk; pacing within +0.2 ms",
        None if ok is None or paced is None else bool(ok and paced),
    )
    idle = _get(side, "rss_start_mb")
    after = _get(side, "rss_idle_after_load_mb")
    add(
        "RSS idle",
        None if idle is None else f"{idle:.1f} MB (after load {_f(after, '.1f')} MB)",
        "<= 60 MB",
        None if idle is None else max(idle, after or 0) <= 60,
    )
    peak = _get(side, "open", "proxy_rss_peak_mb")
    n = _get(side, "open", "streams_complete")
    streams = results["settings"]["open_streams"]
    add(
        f"RSS with {streams} open streams",
        None if peak is None else f"{peak:.1f} MB ({n}/{streams} complete)",
        "<= 150 MB",
        None if peak is None else peak <= 150 and n == streams,
    )
    slope = _get(results, "soak", "slope_mb_per_min")
    add(
        "RSS growth over the soak",
        None if slope is None else f"{slope:+.3f} MB/min over {results['soak']['seconds']:.0f} s",
        "no growth (abs(slope) < 0.1 MB/min)",
        None if slope is None else abs(slope) < 0.1,
        "" if slope is not None else "run with --soak 300",
    )
    counted = _get(results, "policy_instructions", "cost_pct") or {}
    for row in results.get("policy_cost", []):
        if row["policy"] in ("off", "all"):
            continue
        cost = row["cost_pct"]
        clock = f"{cost:.1f}% of req/s ({row['cpu_cost_pct']:+.1f}% CPU/req)"
        instr = counted.get(row["config"])
        if instr is None:
            add(
                f"cost of {row['policy']} (not binding)",
                clock,
                "<= 10%",
                cost <= 10,
                row.get("note", ""),
            )
        else:  # the repeatable measure decides; the wall clock is shown beside it
            add(
                f"cost of {row['policy']} (not binding)",
                f"{instr:.1f}% of instructions/request (wall clock: {clock})",
                "<= 10%",
                instr <= 10,
                row.get("note", ""),
            )
    return rows


def markdown(results: dict[str, Any]) -> str:
    t = results["targets"]
    s = results["settings"]
    lines = []
    names = [n for n in TARGET_ORDER if n in t]
    if names:
        lines += [
            "**Non-streaming chat completions** (wrk, 1 thread, "
            f"{s['duration']:g} s per point; overhead = through-proxy minus direct)",
            "",
            "| target | conns | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms | CPU s/1k req |"
            " RSS peak MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in names:
            for conns in s["concurrency"]:
                run = _get(t, name, "wrk", str(conns))
                if run is None:
                    continue
                base = _get(t, "direct", "wrk", str(conns))
                dp50 = run["p50_ms"] - base["p50_ms"] if base and name != "direct" else None
                dp99 = run["p99_ms"] - base["p99_ms"] if base and name != "direct" else None
                lines.append(
                    f"| {name} | {conns} | {run['rps']:,.0f} | {run['p50_ms']:.3f} | "
                    f"{run['p99_ms']:.3f} | {_f(dp50)} | {_f(dp99)} | "
                    f"{_f(run.get('cpu_s_per_1k'))} | {_f(run.get('rss_peak_mb'), '.1f')} |"
                )
        lines += [
            "",
            f"**Streaming** (SSE, {s['stream_chunks']} chunks "
            f"{s['stream_interval_ms']:g} ms apart, concurrency 1; TTFB over "
            f"{s['ttfb_requests']} short streams; open streams: {s['open_streams']} at once, "
            f"{s['open_chunks']} chunks {s['open_interval_ms']:g} ms apart)",
            "",
            "| target | TTFB p50 µs | +TTFB µs | chunk delay p50 µs | +chunk µs | "
            "chunk delay p99 µs | one event per chunk | pacing jitter p50 µs | "
            "open streams complete | RSS MB | CPU % |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        d_ttfb = _get(t, "direct", "stream", "ttfb_us", "p50")
        d_chunk = _get(t, "direct", "stream", "chunk_delay_us", "p50")
        for name in names:
            st = _get(t, name, "stream")
            if st is None:
                continue
            op = _get(t, name, "open") or {}
            ttfb, chunk = st["ttfb_us"]["p50"], st["chunk_delay_us"]["p50"]
            dt = ttfb - d_ttfb if d_ttfb is not None and name != "direct" else None
            dc = chunk - d_chunk if d_chunk is not None and name != "direct" else None
            done = f"{op['streams_complete']}/{op['streams']}" if op else "–"
            lines.append(
                f"| {name} | {ttfb:.0f} | {_f(dt, '.0f')} | {chunk:.0f} | {_f(dc, '.0f')} | "
                f"{st['chunk_delay_us']['p99']:.0f} | {st['boundaries_ok']} | "
                f"{st['pacing_jitter_us']['p50']:.0f} | {done} | "
                f"{_f(op.get('proxy_rss_peak_mb'), '.1f')} | "
                f"{_f(op.get('proxy_cpu_pct'), '.0f')} |"
            )
        lines += [
            "",
            "**Memory (RSS MB)**",
            "",
            "| target | at start | peak under load | idle after load | with open streams |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in names:
            if name == "direct":
                continue
            peak = max(
                (r.get("rss_peak_mb") or 0 for r in t[name].get("wrk", {}).values()), default=None
            )
            lines.append(
                f"| {name} | {_f(t[name].get('rss_start_mb'), '.1f')} | {_f(peak, '.1f')} | "
                f"{_f(t[name].get('rss_idle_after_load_mb'), '.1f')} | "
                f"{_f(_get(t, name, 'open', 'proxy_rss_peak_mb'), '.1f')} |"
            )
    if results.get("policy_cost"):
        rows = results["policy_cost"]
        same = len({row["stages"] for row in rows}) == 1
        lines += [
            "",
            f"**Cost of each policy** (sidecar, {max(s['concurrency'])} connections, best of "
            f"{s['policy_rounds']} interleaved {s['policy_duration']:g} s rounds; 'off' plus one "
            "policy; cost = 1 - req/s / off's req/s)",
            "",
            "| config | " + ("" if same else "stages | ") + "event subscribers | req/s | p99 ms "
            "| CPU s/1k req | cost (req/s) | cost (CPU/req) |",
            "|---|" + ("" if same else "---|") + "---|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['config']} | "
                + ("" if same else f"{row['stages']} | ")
                + f"{row['subscribers']} | {row['rps']:,.0f} | {row['p99_ms']:.3f} | "
                f"{_f(row.get('cpu_s_per_1k'))} | {row['cost_pct']:+.1f}% | "
                f"{row['cpu_cost_pct']:+.1f}% |"
            )
        if same:
            lines += ["", f"Stages in the pipeline in every config: {rows[0]['stages']}."]
    counted = results.get("policy_instructions") or {}
    if counted.get("instructions_per_request"):
        lines += [
            "",
            f"**Cost of each policy in instructions** (callgrind, {counted['requests']:,} "
            "sequential requests per config after a warm-up; repeatable to ~0.1 %, so this "
            "decides the per-policy targets; see bench/instructions.py)",
            "",
            "| config | instructions per request | cost |",
            "|---|---:|---:|",
        ]
        for name, per_request in counted["instructions_per_request"].items():
            lines.append(f"| {name} | {per_request:,} | {counted['cost_pct'][name]:+.1f}% |")
    elif counted.get("skipped"):
        lines += ["", f"Instruction counts skipped: {counted['skipped']}."]
    lines += [
        "",
        "**Targets**",
        "",
        "| target | measured | threshold | result |",
        "|---|---|---|---|",
    ]
    for row in results["evaluation"]:
        if row["met"] is None and not t:
            continue  # a soak- or profile-only run: only its own rows
        verdict = {True: "met", False: "**missed**", None: "not measured"}[row["met"]]
        if row["threshold"] == "-":
            verdict = "context"
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(
            f"| {row['target']} | {_f(row['measured'], '')} | {row['threshold']} | "
            f"{verdict}{note} |"
        )
    if results.get("soak"):
        so = results["soak"]
        lines += [
            "",
            f"Soak: {so['seconds']:.0f} s at 64 connections, {so['rps']:,.0f} req/s, "
            f"RSS {so['rss_first_mb']:.1f} → {so['rss_last_mb']:.1f} MB "
            f"(max {so['rss_max_mb']:.1f}), slope {so['slope_mb_per_min']:+.3f} MB/min.",
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install matplotlib): no plot"
    t = results["targets"]
    s = results["settings"]
    names = [n for n in TARGET_ORDER if n in t]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(s["concurrency"]))]
        ys = [_get(t, name, "wrk", str(c), "rps") or 0 for c in s["concurrency"]]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(s["concurrency"]))])
    ax.set_xticklabels([f"{c} conns" for c in s["concurrency"]])
    ax.set_ylabel("req/s")
    ax.set_title("Throughput, non-streaming")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for name in names:
        p50 = [_get(t, name, "wrk", str(c), "p50_ms") for c in s["concurrency"]]
        p99 = [_get(t, name, "wrk", str(c), "p99_ms") for c in s["concurrency"]]
        (line,) = ax.plot(s["concurrency"], p50, marker="o", label=f"{name} p50")
        ax.plot(
            s["concurrency"], p99, marker="x", ls="--", color=line.get_color(), label=f"{name} p99"
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("connections")
    ax.set_ylabel("latency ms")
    ax.set_title("Latency (p50 solid, p99 dashed)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1][0]
    stream_names = [n for n in names if _get(t, n, "stream")]
    ttfb = [_get(t, n, "stream", "ttfb_us", "p50") for n in stream_names]
    chunk = [_get(t, n, "stream", "chunk_delay_us", "p50") for n in stream_names]
    xs = list(range(len(stream_names)))
    ax.bar([x - 0.2 for x in xs], ttfb, 0.4, label="TTFB p50")
    ax.bar([x + 0.2 for x in xs], chunk, 0.4, label="chunk delay p50")
    ax.set_xticks(xs)
    ax.set_xticklabels(stream_names)
    ax.set_ylabel("µs")
    ax.set_title(f"Streaming, {s['stream_chunks']} SSE chunks, concurrency 1")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    if results.get("policy_cost"):
        rows = results["policy_cost"]
        ax.barh([r["config"] for r in rows], [r["rps"] for r in rows], color="tab:purple")
        ax.set_xlabel(f"req/s at {max(s['concurrency'])} conns")
        ax.set_title("Sidecar: 'off' plus one policy")
        ax.invert_yaxis()
    else:
        mem = [n for n in names if n != "direct"]
        ax.bar(mem, [t[n].get("rss_start_mb") or 0 for n in mem], label="RSS at start")
        ax.bar(
            mem,
            [_get(t, n, "open", "proxy_rss_peak_mb") or 0 for n in mem],
            alpha=0.4,
            label="RSS with open streams",
        )
        ax.set_ylabel("MB")
        ax.set_title("Memory")
        ax.legend(fontsize=8)
    machine = results["machine"]
    fig.suptitle(
        f"llm-sidecar bench {results['started'][:16]} — {machine['cpu']} "
        f"({machine['cores']} cores), commit {machine['commit']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def machine_info(nginx: str | None, ref: str | None) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "unknown"
        return (out.stdout + out.stderr).strip().splitlines()[0] if out.stdout + out.stderr else ""

    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", ref or "HEAD"])
    dirty = "" if ref else version(["git", "-C", str(ROOT), "status", "--porcelain", "sidecar"])
    import httptools
    import uvloop

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "os": version(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,
        "httptools": httptools.__version__,
        "wrk": version(["wrk", "-v"]).split(" [")[0],
        "nginx": version([nginx, "-v"]) if nginx else None,
        "commit": commit + ("+dirty" if dirty else ""),
    }


def update_docs(
    md: str, png: Path | None, command: str, machine: dict[str, Any], started: str, block: str
) -> None:
    doc = ROOT / "docs" / "PERFORMANCE.md"
    text = doc.read_text()
    begin, end = f"<!-- BEGIN {block} -->", f"<!-- END {block} -->"
    if begin not in text or end not in text:
        print(f"note: {doc} has no {begin} block; not updated")
        return
    plot = f"\n\n![benchmark plot]({os.path.relpath(png, doc.parent)})" if png else ""
    head = (
        f"Run {started[:16]} UTC with `{command}` on {machine['cpu']}, {machine['cores']} "
        f"cores, {machine['mem_gb']} GB, {machine['os']}, kernel {machine['kernel']}, "
        f"Python {machine['python']}, uvloop {machine['uvloop']}, httptools "
        f"{machine['httptools']}, {machine['wrk']}, {machine['nginx'] or 'no nginx'}; "
        f"commit {machine['commit']}.{plot}\n\n"
    )
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1]
    doc.write_text(f"{before}{begin}\n{head}{md}{end}{after}")


# --- main --------------------------------------------------------------------------------------
def settings_from(args: argparse.Namespace) -> Settings:
    cores = sorted(os.sched_getaffinity(0))
    pin = len(cores) >= 2 and not args.no_pin and shutil.which("taskset") is not None
    common: dict[str, Any] = {
        "proxy_core": cores[0] if pin else None,
        "load_core": cores[1] if pin else None,
        "wait_quiet": args.wait_quiet,
        "awake": args.awake,
    }
    if args.quick:
        return Settings(
            duration=1,
            concurrency=[1, 8],
            warmup=1,
            ttfb_requests=20,
            stream_streams=1,
            stream_chunks=10,
            stream_interval_ms=5,
            open_streams=20,
            open_chunks=10,
            open_interval_ms=20,
            policy_duration=1,
            retries=0,  # the smoke test checks that it works, not the numbers
            **{**common, "wait_quiet": 0},
        )
    return Settings(
        duration=args.duration,
        concurrency=[1, 16, 64],
        warmup=1,
        ttfb_requests=300,
        stream_streams=8,
        stream_chunks=100,
        stream_interval_ms=5,
        open_streams=args.open_streams,
        open_chunks=100,
        open_interval_ms=50,
        policy_duration=args.policy_duration,
        policy_rounds=args.policy_rounds,
        **common,
    )


def checkout(ref: str | None, tmp: Path) -> dict[str, str] | None:
    """Extract ``sidecar/`` at ``ref`` (no change to the repo) and return an env that uses it."""
    if not ref:
        return None
    dest = tmp / "ref"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "sidecar"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return {**os.environ, "PYTHONPATH": str(dest)}


@contextlib.contextmanager
def running(ps: Processes) -> Iterator[None]:
    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        ps.stop_all()
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk point")
    parser.add_argument(
        "--policy-duration", type=float, default=4.0, help="seconds per policy-cost point"
    )
    parser.add_argument("--open-streams", type=int, default=1000)
    parser.add_argument(
        "--policy-rounds", type=int, default=3, help="interleaved rounds per policy-cost config"
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGET_ORDER),
        help="comma-separated subset",
    )
    parser.add_argument("--no-policies", action="store_true", help="skip the per-policy runs")
    parser.add_argument(
        "--instructions",
        type=int,
        default=1000,
        metavar="N",
        help="per-policy cost also in instructions per request under callgrind, over N "
        "requests per config (0: skip; needs valgrind)",
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also soak the sidecar at 64 connections and report RSS slope",
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also record a py-spy profile of the sidecar under wrk",
    )
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument(
        "--awake",
        action="store_true",
        help="keep every core busy with a SCHED_IDLE spinner, so an idle vCPU's wake-up "
        "latency (a VM artifact) does not count as proxy latency",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=15,
        metavar="SECONDS",
        help="before each target, wait up to this long for others' CPU load to go",
    )
    parser.add_argument(
        "--install-nginx",
        action="store_true",
        help="apt-get install nginx-light when nginx is missing",
    )
    parser.add_argument(
        "--ref",
        help="benchmark the sidecar package of this git commit (git archive into a temp dir) "
        "instead of the working tree",
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="write the tables and plot link into docs/PERFORMANCE.md",
    )
    parser.add_argument(
        "--docs-block",
        default="BENCH RESULTS",
        help="name of the <!-- BEGIN/END NAME --> block that --update-docs replaces",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: re-render tables, plot and docs from a saved latest.json",
    )
    args = parser.parse_args(argv)
    if args.render:
        return render(json.loads(args.render.read_text()), args)
    if shutil.which("wrk") is None:
        print("bench needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    s = settings_from(args)
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    if s.load_core is not None:
        os.sched_setaffinity(0, {s.load_core})  # this process and its samplers stay off core 0
    nginx, nginx_note = (None, "") if "nginx" not in wanted else find_nginx(args.install_nginx)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/run.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results: dict[str, Any] = {
        "command": command,
        "started": started,
        "machine": machine_info(nginx, args.ref),
        "settings": {**s.__dict__},
        "pinning": f"proxy on core {s.proxy_core}; wrk, stream client, upstream on core "
        f"{s.load_core}"
        if s.proxy_core is not None
        else "not pinned",
        "targets": {},
        "notes": [],
    }
    if nginx_note:
        results["notes"].append(nginx_note)
    t_begin = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="llm-sidecar-bench-") as tmpdir,
        running(ps := Processes(Path(tmpdir), checkout(args.ref, Path(tmpdir)))),
    ):
        up_port = free_port()
        upstream = ps.start(
            "upstream", [PY, str(BENCH / "upstream.py"), "--port", str(up_port)], s.load_core
        )
        wait_ready(up_port, upstream)
        if s.awake:
            for core in sorted(os.sched_getaffinity(0) | {s.proxy_core or 0}):
                ps.start(f"spinner-{core}", [PY, "-c", SPINNER], core)
        print(f"bench: {results['pinning']}; {s.duration:g} s per point", flush=True)
        for name in wanted:
            if name == "nginx" and nginx is None:
                print(f"  nginx: skipped: {nginx_note}", flush=True)
                continue
            if name == "direct":
                target = Target("direct", up_port)
            elif name == "nginx":
                assert nginx is not None
                target = start_nginx(ps, s, nginx, up_port)
            elif name == "minimal":
                target = start_minimal(ps, s, up_port)
            elif name == "floor":
                target = start_floor(ps, s, up_port)
            elif name == "sidecar":
                target = start_sidecar(ps, s, name, up_port, set(POLICIES))
            elif name == "sidecar-off":
                target = start_sidecar(ps, s, name, up_port, set())
            else:
                print(f"  unknown target {name!r}", file=sys.stderr)
                continue
            streams = name != "floor"
            result = measure(
                ps, target, s, streaming=streams, open_streams=streams and name != "direct"
            )
            check_observability(target, result)
            results["targets"][name] = result
            if target.proc is not None:
                ps.stop(target.proc)
        if not args.no_policies and not args.quick and "sidecar" in wanted:
            results["policy_cost"] = policy_runs(ps, s, up_port)
            if args.instructions:
                results["policy_instructions"] = instruction_runs(ps, up_port, args.instructions)
        if args.soak:
            results["soak"] = soak(ps, s, up_port, args.soak)
        if args.profile:
            results["profile"] = profile(ps, s, up_port, args.profile, args.out)
    results["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    return render(results, args)


def render(results: dict[str, Any], args: argparse.Namespace) -> int:
    """Evaluate the targets, print and write the tables, the plot, the JSON and the docs."""
    command, started = results["command"], results["started"]
    args.out.mkdir(parents=True, exist_ok=True)
    results["evaluation"] = evaluate(results)
    md = markdown(results)
    print("\n" + md)
    png = args.out / "latest.png"
    if not args.no_plot:
        note = plot(results, png)
        if note:
            results["notes"].append(note)
            print(f"note: {note}")
    (args.out / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / "latest.md").write_text(md)
    if args.update_docs:
        has_plot = png.exists() and not args.no_plot and bool(results["targets"])
        update_docs(
            md, png if has_plot else None, command, results["machine"], started, args.docs_block
        )
    print(
        f"wrote {args.out}/latest.json, latest.md"
        + ("" if args.no_plot else ", latest.png")
        + f" in {results['elapsed_s']:.0f} s"
    )
    return 0


def policy_runs(ps: Processes, s: Settings, up_port: int) -> list[dict[str, Any]]:
    """'off' and 'off + one policy' at the highest concurrency: each policy's own cost.

    All configs run side by side (idle ones cost nothing) and are measured in interleaved
    rounds; each keeps its best round, so drift and others' load bias no config in particular.
    """
    conns = max(s.concurrency)
    configs = POLICY_CONFIGS
    print(
        f"policy cost at {conns} connections, {s.policy_rounds} interleaved rounds of "
        f"{s.policy_duration:g} s",
        flush=True,
    )
    targets = []
    for _name, enabled in configs:
        target = start_sidecar(ps, s, f"policy{len(targets)}", up_port, enabled)
        run_wrk(target.port, conns, 1, s.load_core)
        targets.append(target)
    best: dict[str, dict[str, Any]] = {}
    cpu_1k: dict[str, float] = {}  # least CPU per request over the rounds: robust to others' load
    for _ in range(s.policy_rounds):
        for (name, _enabled), target in zip(configs, targets, strict=True):
            assert target.proc is not None
            pid = target.proc.pid

            def point(port: int = target.port, pid: int = pid) -> dict[str, Any]:
                cpu0 = proc_stat(pid)[0]
                run = run_wrk(port, conns, s.policy_duration, s.load_core)
                cpu = proc_stat(pid)[0] - cpu0
                run["cpu_s_per_1k"] = 1000 * cpu / run["requests"] if run["requests"] else None
                return run

            run, acc = quiet_point(ps, s, point)
            run["foreign_cpu_pct"] = acc.foreign_pct
            cpu_1k[name] = min(cpu_1k.get(name, float("inf")), run["cpu_s_per_1k"] or float("inf"))
            if name not in best or run["rps"] > best[name]["rps"]:
                best[name] = run
            print(
                f"  {name:12} {run['rps']:9.0f} req/s  p99 {run['p99_ms']:.3f} ms{_flag(acc)}",
                flush=True,
            )
    rows: list[dict[str, Any]] = []
    extra = {"metrics": "metrics subscriber", "access_log": "access log"}
    for (name, enabled), target in zip(configs, targets, strict=True):
        stages = target.extra.get("stages", {})
        in_path = [
            *sum(stages.get("route", {}).values(), []),
            *sum(stages.get("upstream", {}).values(), []),
        ]
        run = best[name]
        row = {
            "policy": name.lstrip("+"),
            "config": name,
            "enabled": sorted(enabled),
            "stages": ", ".join(in_path) or "none",
            "subscribers": ", ".join(extra[p] for p in sorted(enabled) if p in extra) or "none",
            "rps": run["rps"],
            "p99_ms": run["p99_ms"],
            "errors": run["errors"],
            "cpu_s_per_1k": cpu_1k[name],
            "foreign_cpu_pct": run["foreign_cpu_pct"],
        }
        if name == "+limits" and not any("Limit" in st for st in in_path):
            row["note"] = "limits configured but no limit stage in the pipeline yet"
        rows.append(row)
        assert target.proc is not None
        ps.stop(target.proc)
    base = rows[0]["rps"]
    for row in rows:
        row["cost_pct"] = 100 * (1 - row["rps"] / base) if base else float("nan")
        row["cpu_cost_pct"] = 100 * (row["cpu_s_per_1k"] / rows[0]["cpu_s_per_1k"] - 1)
    return rows


def instruction_runs(ps: Processes, up_port: int, requests: int) -> dict[str, Any]:
    """Each policy config's instructions per request under callgrind (bench/instructions.py)."""
    import instructions

    why_not = instructions.available()
    if why_not:
        return {"skipped": why_not}
    print(f"policy cost in instructions: callgrind, {requests} requests per config", flush=True)
    configs = []
    for name, enabled in POLICY_CONFIGS:
        path = sidecar_config(ps.tmp, f"callgrind-{name.lstrip('+')}", up_port, enabled)
        port = int(yaml.safe_load(path.read_text())["listen"]["proxy"].rsplit(":", 1)[1])
        argv = [PY, str(BENCH / "launch_sidecar.py")]
        if "metrics" not in enabled:
            argv.append("--no-metrics")
        configs.append((name, [*argv, "--config", str(path), "--log-level", "warning"], port))
    result = instructions.policy_costs(configs, PATH, requests, env=ps.env)
    for name, per_request in result["instructions_per_request"].items():
        print(
            f"  {name:12} {per_request:9,} instructions/request  {result['cost_pct'][name]:+.1f}%"
        )
    return result


if __name__ == "__main__":
    sys.exit(main())
