"""The config the chart renders into its ConfigMap passes `llm-sidecar check-config`.

The chart's file paths (API keys, interception CA) are pointed at real files in a temp
dir, so check-config sees what the sidecar sees in the pod.
"""

from __future__ import annotations

import datetime
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import REPO, RenderFn

# Proxy mode as docs/KUBERNETES.md shows it: routes by host, egress allow-list.
PROXY_CONFIG = {
    "upstreams": {
        "openai": {"url": "https://api.openai.com"},
        "anthropic": {"url": "https://api.anthropic.com"},
    },
    "routes": [
        {"host": "api.openai.com", "upstreams": ["openai"]},
        {"host": "api.anthropic.com", "upstreams": ["anthropic"]},
    ],
    "egress": {"allow": ["api.openai.com", "api.anthropic.com"], "deny_private": True},
}


def sidecar_cli_missing() -> bool:
    try:
        return importlib.util.find_spec("sidecar.__main__") is None
    except ImportError:
        return True


pytestmark = pytest.mark.skipif(
    sidecar_cli_missing(), reason="the sidecar package has no __main__ (check-config) yet"
)


def write_ca(directory: Path) -> None:
    """A throwaway CA (cert + key) like the intercept Secret would hold."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm-sidecar test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "secrets": {"secrets": {"existingSecret": "llm-keys"}},
    "audit": {
        "config": {
            "audit": {
                "path": "/var/log/llm-sidecar/audit.jsonl",
                "max_bytes": 104857600,
                "backups": 3,
            }
        }
    },
    # docs/KUBERNETES.md, "Change a limit and watch it apply".
    "limit": {"config": {"upstreams": {"openai": {"limits": {"requests": {"per_min": 2}}}}}},
    "proxy-intercept": {
        "app": {"mode": "proxy"},
        "intercept": {"enabled": True, "secretName": "llm-ca"},
        "secrets": {"existingSecret": "llm-keys"},
        "config": PROXY_CONFIG,
    },
}


@pytest.mark.parametrize("case", CASES)
def test_rendered_config_passes_check_config(case: str, render: RenderFn, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "openai-api-key").write_text("sk-test-openai\n")
    (keys / "anthropic-api-key").write_text("sk-ant-test\n")
    ca = tmp_path / "ca"
    write_ca(ca)

    values = {
        **CASES[case],
        "secrets": {**CASES[case].get("secrets", {}), "mountPath": str(keys)},
        "intercept": {**CASES[case].get("intercept", {}), "mountPath": str(ca)},
    }
    text = rendered_config(render, values)
    if case == "proxy-intercept":
        assert yaml.safe_load(text)["routes"] == PROXY_CONFIG["routes"]
    proc = check_config(tmp_path, text)
    assert proc.returncode == 0, f"check-config refused the chart's config:\n{text}\n{proc}"
    # The summary must not echo the API keys it read.
    assert "sk-test-openai" not in proc.stdout + proc.stderr


def test_check_config_refuses_an_unknown_key(render: RenderFn, tmp_path: Path) -> None:
    """The check above can fail: a typo in values.config is caught, naming the key."""
    bad = {"config": {"upstreams": {"openai": {"url": "https://api.openai.com", "tiemouts": {}}}}}
    proc = check_config(tmp_path, rendered_config(render, bad))
    assert proc.returncode == 1
    assert "tiemouts" in proc.stdout + proc.stderr


def rendered_config(render: RenderFn, values: dict[str, Any]) -> str:
    r = render(values)
    (cm,) = [d for d in r.of_kind("ConfigMap") if "config.yaml" in d.get("data", {})]
    return str(cm["data"]["config.yaml"])


def check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
