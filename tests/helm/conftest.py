"""Fixtures for the Helm chart tests: real Helm (helm-python-sdk) renders, offline."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from chartkit import CHART, EXAMPLE_PARENT, Rendered, RenderFn, parse_manifests, require_module


@pytest.fixture(scope="session")
def helm() -> ModuleType:
    return require_module("helm_python")


@pytest.fixture(scope="session")
def chart(helm: ModuleType) -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: Any) -> RenderFn:
    """Render the chart offline with the given values (merged over values.yaml)."""

    def _render(
        values: dict[str, Any] | None = None, *, name: str = "demo", namespace: str = "apps"
    ) -> Rendered:
        out = chart.render(values=values or {}, name=name, namespace=namespace, is_install=True)
        return parse_manifests(out)

    return _render


@pytest.fixture(scope="session")
def parent_dir(helm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """helm/examples/my-app with its llm-sidecar dependency built, as a user would."""
    root = tmp_path_factory.mktemp("parent") / "helm"
    shutil.copytree(CHART, root / "llm-sidecar")
    shutil.copytree(EXAMPLE_PARENT, root / "examples" / "my-app")
    helm.dependency_build(root / "examples" / "my-app")
    return root / "examples" / "my-app"


@pytest.fixture(scope="session")
def parent_chart(helm: ModuleType, parent_dir: Path) -> Iterator[Any]:
    with helm.Chart.load(parent_dir) as loaded:
        yield loaded
