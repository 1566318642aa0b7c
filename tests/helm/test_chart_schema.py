"""values.schema.json: every value typed, bad values refused with a message naming the key."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from chartkit import CASES, CHART


@pytest.mark.parametrize("case", CASES)
def test_schema_accepts_the_supported_combinations(chart: Any, case: str) -> None:
    chart.validate_schema(CASES[case])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"app": {"mode": "sidecar"}}, "at '/app/mode': value must be one of 'baseUrl', 'proxy'"),
        ({"sidecar": {"native": "yes"}}, "at '/sidecar/native': got string, want boolean"),
        ({"sidecar": {"ports": {"admin": "9901"}}}, "at '/sidecar/ports/admin': got string"),
        ({"sidecar": {"ports": {"proxy": 70000}}}, "at '/sidecar/ports/proxy': maximum"),
        ({"sidecar": {"nativ": True}}, "additional properties 'nativ' not allowed"),
        ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
        ({"terminationGracePeriodSeconds": "45"}, "at '/terminationGracePeriodSeconds'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
        ({"image": {"digest": "latest"}}, "at '/image/digest'"),
        ({"monitoring": {"kind": "Probe"}}, "at '/monitoring/kind': value must be one of"),
        ({"monitoring": {"interval": "often"}}, "at '/monitoring/interval'"),
        ({"intercept": {"enabled": True}}, "at '/intercept/secretName': minLength"),
        ({"config": {"upstreams": {"mistral": {"timeouts": {}}}}}, "missing property 'url'"),
        ({"config": {"routes": "all"}}, "at '/config/routes': got string, want array"),
        ({"secrets": {"existingSecret": "Not_A_Name"}}, "at '/secrets/existingSecret'"),
        ({"app": {"baseUrls": {"OPENAI_BASE_URL": "openai/v1"}}}, "OPENAI_BASE_URL"),
        ({"sidecar": {"resources": {"limits": {"memory": "lots"}}}}, "/sidecar/resources/limits"),
        ({"grafanaDashboard": {"labels": {"team": 1}}}, "at '/grafanaDashboard/labels/team'"),
        ({"example": {"replicas": -1}}, "at '/example/replicas': minimum"),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(
    chart: Any, helm: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    assert message in str(err.value)
    # helm install/template refuse the same values before rendering anything.
    with pytest.raises(helm.HelmValuesError):
        chart.render(values=values, name="demo")


def test_schema_types_every_default_value() -> None:
    """Each key of values.yaml is declared (so a new value cannot skip the schema)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], sch: dict[str, Any], path: str) -> None:
        for key, value in node.items():
            if path == "config":  # the sidecar's own model validates it (check-config)
                return
            props = sch.get("properties", {})
            sub = props.get(key)
            if sub is None and isinstance(sch.get("additionalProperties"), dict):
                sub = sch["additionalProperties"]
            assert sub is not None, f"{path}.{key} is not in values.schema.json"
            assert sub.get("type") or sub.get("anyOf"), f"{path}.{key} has no type"
            if isinstance(value, dict) and sub.get("type") == "object":
                walk(value, sub, f"{path}.{key}".lstrip("."))

    walk(values, schema, "")
    assert schema["additionalProperties"] is False
