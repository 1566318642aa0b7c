"""docs/CONFIG.md documents every config key (its reference is generated from the models)."""

from __future__ import annotations

from pathlib import Path

from sidecar.config.docs import BEGIN, END, reference


def test_config_reference_is_current():
    text = (Path(__file__).parents[3] / "docs" / "CONFIG.md").read_text()
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert generated == reference().strip(), "run: python -m sidecar.config.docs"
