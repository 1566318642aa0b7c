"""Config loading: interpolation, secrets from files, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config.loader import ConfigError, default_config_text, load_default, load_text

GOOD = """
upstreams:
  openai: {url: "https://api.openai.com", headers: {Authorization: "Bearer ${KEY}"}}
routes:
  - {path_prefix: /openai, upstreams: [openai]}
"""


def test_embedded_default_serves_openai_and_anthropic():
    config = load_default().config
    assert {r.path_prefix for r in config.routes} == {"/openai", "/anthropic"}
    assert config.upstreams["openai"].url == "https://api.openai.com"
    assert config.upstreams["anthropic"].url == "https://api.anthropic.com"


def test_top_level_default_yaml_is_the_embedded_one():
    shipped = Path(__file__).parents[3] / "config" / "default.yaml"
    assert shipped.read_text() == default_config_text()


def test_env_interpolation_and_header_names_lowercased():
    config = load_text(GOOD, env={"KEY": "sk-1"}).config
    assert config.upstreams["openai"].headers == {"authorization": "Bearer sk-1"}


def test_env_default_and_file_secret(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    text = f"""
upstreams:
  a: {{url: "${{URL:-http://127.0.0.1:9}}", headers: {{x-api-key: "${{file:{secret}}}"}}}}
routes: [{{path_prefix: /a, upstreams: [a]}}]
"""
    config = load_text(text, env={}).config
    assert config.upstreams["a"].url == "http://127.0.0.1:9"
    assert config.upstreams["a"].headers["x-api-key"] == "sk-from-file"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('upstreams: {openai: {url: "htp:/x"}}', "upstreams.openai.url: not a valid URL: 'htp:/x'"),
        (
            "upstreams: {a: {url: http://x, pool: {max_connections: 0}}}",
            "upstreams.a.pool.max_connections: Input should be greater than or equal to 1: 0",
        ),
        ("listen: {proxy: nope}", "listen.proxy: expected HOST:PORT, got 'nope'"),
        ("colour: blue", "colour: unknown key"),
        ("upstreams: {a: {url: http://x, retries: 3}}", "upstreams.a.retries: unknown key"),
        (
            "routes: [{path_prefix: /a, upstreams: [b]}]",
            "routes[0].upstreams: unknown upstream 'b'",
        ),
        (
            "upstreams: {a: {url: http://x, headers: {k: '${NOPE}'}}}",
            "upstreams.a.headers.k: environment variable NOPE is not set",
        ),
        (
            "upstreams: {a: {url: http://x, headers: {k: '${file:/does/not/exist}'}}}",
            "upstreams.a.headers.k: cannot read secret file '/does/not/exist'",
        ),
        ("routes: [ {", "invalid YAML at line 1"),
        ("- a\n- b", "must be a mapping at the top level"),
        (
            "routes: [{upstreams: [a]}]\nupstreams: {a: {url: http://x}}",
            "routes[0]: a route needs path_prefix or host",
        ),
    ],
)
def test_errors_name_the_key_path_and_value(text, expected):
    with pytest.raises(ConfigError) as caught:
        load_text(text, env={})
    assert expected in str(caught.value)
