"""The Dockerfile, without a Docker engine: its invariants, hadolint, the build context
that .dockerignore leaves, and its build stage's install steps run in a fresh venv."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from chartkit import CHART, REPO, require_tool

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
OCI_LABELS = {"title", "description", "version", "revision", "licenses", "source"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions per stage; line continuations joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, args = line.partition(" ")
        op = op.upper()
        args = args.strip()
        if op == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert m, line
            base = re.sub(r"\$\{(\w+)\}", lambda g: global_args[g.group(1)], m.group(1))
            stages.append(Stage(base=base, name=m.group(2)))
        elif not stages:
            assert op == "ARG", f"only ARG may precede FROM: {line}"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append((op, args))
    return global_args, stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def test_multi_stage_on_python_slim(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base
    build, final = stages[0], stages[-1]
    assert build.name
    copies = final.all("COPY")
    assert any(c.startswith(f"--from={build.name} ") for c in copies)
    assert not any(o == "ADD" for s in stages for o, _ in s.instructions)
    # The runtime stage installs no system packages: the slim base is all it needs.
    assert not any("apt-get" in r or "pip" in r for r in final.all("RUN"))


def test_runs_as_the_numeric_uid_the_chart_expects(stages: list[Stage]) -> None:
    final = stages[-1]
    users = final.all("USER")
    assert users, "no USER: the image would run as root"
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert m, f"USER {users[-1]} is not numeric: runAsNonRoot cannot verify a name"
    uid, gid = int(m.group(1)), int(m.group(2) or m.group(1))
    assert uid != 0 and gid != 0
    # Nothing runs as root after the switch.
    ops = [o for o, _ in final.instructions]
    assert "RUN" not in ops[ops.index("USER") :]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert (values["sidecar"]["runAsUser"], values["sidecar"]["runAsGroup"]) == (uid, gid)


def test_read_only_root_filesystem_friendly(stages: list[Stage]) -> None:
    env = env_of(stages[-1])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"].startswith("/tmp"), "HOME must be on the mounted tmp dir"
    assert "/opt/llm-sidecar/bin" in env["PATH"].split(":")
    assert not stages[-1].all("VOLUME"), "VOLUME would make runtimes write to the root fs"


def test_entrypoint_ports_healthcheck_labels(stages: list[Stage]) -> None:
    final = stages[-1]
    assert json.loads(final.all("ENTRYPOINT")[-1]) == ["llm-sidecar"]
    cmd = json.loads(final.all("CMD")[-1])
    assert cmd[:2] == ["--config", "/etc/llm-sidecar/config.yaml"]
    exposed = {p.split("/")[0] for args in final.all("EXPOSE") for p in args.split()}
    assert {"4000", "9901"} <= exposed
    (health,) = final.all("HEALTHCHECK")
    exec_form = json.loads(health[health.index("CMD ") + 4 :])
    assert exec_form[0] == "python" and "127.0.0.1:9901/healthz" in exec_form[-1]
    labels = " ".join(final.all("LABEL"))
    found = set(re.findall(r"org\.opencontainers\.image\.(\w+)=", labels))
    assert OCI_LABELS <= found, OCI_LABELS - found


def test_hadolint_is_clean() -> None:
    hadolint = require_tool("hadolint")
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- build context -------------------------------------------------------------------------


def ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus **) as a regex on clean paths."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def build_context(repo: Path) -> list[str]:
    """Files the Docker builder receives: the last matching pattern (on the path or one
    of its parent directories) decides, as in Docker's patternmatcher."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!")).lstrip("/")
        rules.append((negate, ignore_regex(pattern)))
    kept = []
    for path in sorted(p for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts):
        rel = path.relative_to(repo).as_posix()
        parts = rel.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for negate, rx in rules:
            if any(rx.fullmatch(p) for p in prefixes):
                excluded = not negate
        if not excluded:
            kept.append(rel)
    return kept


def test_dockerignore_sends_only_the_package() -> None:
    kept = build_context(REPO)
    assert "pyproject.toml" in kept
    assert "sidecar/__init__.py" in kept or not (REPO / "sidecar" / "__init__.py").exists()
    for rel in kept:
        top = rel.split("/")[0]
        assert top in {"pyproject.toml", "README.md", "LICENSE", "sidecar"}, rel
        assert "__pycache__" not in rel and not rel.endswith(".pyc"), rel
    # Package data the wheel must carry is in the context.
    for rel in ("sidecar/config/default.yaml", "sidecar/py.typed"):
        if (REPO / rel).exists():
            assert rel in kept


def test_build_stage_installs_in_a_fresh_venv(stages: list[Stage], tmp_path: Path) -> None:
    """Run the build stage's COPY/RUN steps as written, with /opt and /src under tmp."""
    if not (REPO / "sidecar" / "cli.py").exists():
        pytest.skip("sidecar/cli.py not written yet: the image has no entry point to install")
    build = stages[0]
    context = tmp_path / "context"
    for rel in build_context(REPO):
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, context / rel)
    prefix = tmp_path / "opt"
    prefix.mkdir()
    workdir = tmp_path / "root"
    env = {
        **os.environ,
        **env_of(build),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)

    def here(text: str) -> str:
        return text.replace("/opt/", f"{prefix}/")

    for op, args in build.instructions:
        if op == "WORKDIR":
            workdir = tmp_path / "root" / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif op == "COPY":
            *sources, dest = shlex.split(args)
            target = workdir / dest
            for source in sources:
                matches = list(context.glob(source))
                assert matches or "*" in source, f"COPY {source}: not in the build context"
                for match in matches:
                    if match.is_dir():
                        shutil.copytree(match, target, dirs_exist_ok=True)
                    else:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(match, target / match.name)
        elif op == "RUN":
            proc = subprocess.run(
                ["/bin/sh", "-ec", here(args)],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, f"RUN {args}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    venv = prefix / "llm-sidecar"
    assert not (venv / "bin" / "pip").exists(), "the runtime venv carries no pip"
    # The installed console script serves the package's own files (default config).
    proc = subprocess.run(
        [str(venv / "bin" / "llm-sidecar"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "check-config" in proc.stdout, proc
    size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file())
    assert size < 150 * 2**20, f"venv is {size / 2**20:.0f} MiB"
