"""The egress policy: host rules, private-address refusal, and target parsing (no sockets)."""

from __future__ import annotations

import ipaddress

import pytest

from sidecar.config.loader import load_text
from sidecar.egress.policy import EgressDenied, EgressPolicy, HostRule, address_refusal
from sidecar.egress.target import is_absolute_form, normalize_host, parse_absolute, parse_authority


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.2", "loopback"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("169.254.10.1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fd00::1", "unique-local"),
        ("fd00:ec2::254", "link-local (cloud metadata)"),
        ("::ffff:169.254.169.254", "link-local (cloud metadata) (embedded 169.254.169.254)"),
        ("::ffff:10.0.0.1", "private (embedded 10.0.0.1)"),
        ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata) (embedded 169.254.169.254)"),
        ("2002:7f00:1::", "loopback (embedded 127.0.0.1)"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_refusal(address, why):
    assert address_refusal(ipaddress.ip_address(address)) == why


def test_host_rules_match_exact_suffix_and_ports():
    policy = EgressPolicy(["api.openai.com", "*.anthropic.com", "local.test:8080", "any.test:*"])
    assert policy.allowed_by("api.openai.com", 443)
    assert policy.allowed_by("api.openai.com", 80)
    assert not policy.allowed_by("api.openai.com", 22)  # default ports only
    assert not policy.allowed_by("api.openai.com.evil.test", 443)
    assert policy.allowed_by("api.anthropic.com", 443)
    assert not policy.allowed_by("anthropic.com", 443)  # *.suffix is below the suffix only
    assert not policy.allowed_by("evilanthropic.com", 443)
    assert policy.allowed_by("local.test", 8080) and not policy.allowed_by("local.test", 443)
    assert policy.allowed_by("any.test", 1)
    with pytest.raises(EgressDenied) as denied:
        policy.check_host("evil.test", 443)
    assert denied.value.reason == "host_not_allowed"


def test_host_rule_parsing_normalises():
    assert HostRule.parse("API.OpenAI.com.") == HostRule("api.openai.com", frozenset({80, 443}))
    assert HostRule.parse("[::1]:443") == HostRule("::1", frozenset({443}))
    assert HostRule.parse("::1") == HostRule("::1", frozenset({80, 443}))
    assert HostRule.parse("*.Example.com:*") == HostRule("*.example.com", None)


def test_private_addresses_are_refused_unless_allowed():
    policy = EgressPolicy(["x.test"], allow_addresses=["10.0.0.0/8", "127.0.0.1"])
    policy.check_address("x.test", "10.9.8.7")
    policy.check_address("x.test", "127.0.0.1")
    policy.check_address("x.test", "::ffff:127.0.0.1")
    policy.check_address("x.test", "93.184.216.34")
    with pytest.raises(EgressDenied, match="loopback") as denied:
        policy.check_address("x.test", "127.0.0.2")
    assert denied.value.reason == "private_address"
    with pytest.raises(EgressDenied, match="169.254.169.254"):
        policy.check_address("x.test", "169.254.169.254")
    EgressPolicy([], deny_private=False).check_address("x.test", "169.254.169.254")


def test_policy_from_config_allows_route_and_intercept_hosts_implicitly():
    loaded = load_text(
        """
upstreams: {openai: {url: "https://api.openai.com/v1"}}
routes:
  - {host: api.openai.com, upstreams: [openai]}
egress: {allow: ["*.anthropic.com"]}
intercept: {hosts: [chat.example.com], ca_cert: a.pem, ca_key: b.pem}
"""
    )
    policy = EgressPolicy.from_config(loaded.config)
    assert policy.allowed_by("api.openai.com", 443)
    assert policy.allowed_by("chat.example.com", 443)
    assert policy.allowed_by("x.anthropic.com", 443)
    assert not policy.allowed_by("example.com", 443)
    assert policy.intercepts("chat.example.com") and not policy.intercepts("api.openai.com")
    assert EgressPolicy.from_config(load_text("{}").config).rules == ()  # never an open proxy


def test_egress_allow_addresses_are_validated():
    from sidecar.config.loader import ConfigError

    with pytest.raises(ConfigError, match="allow_addresses"):
        load_text("egress: {allow_addresses: [not-a-network]}")


@pytest.mark.parametrize(
    ("authority", "host", "port"),
    [
        ("api.openai.com:443", "api.openai.com", 443),
        ("API.OpenAI.com.:443", "api.openai.com", 443),
        ("[::1]:8443", "::1", 8443),
        ("[0:0::1]:1", "::1", 1),
        ("127.0.0.1:80", "127.0.0.1", 80),
    ],
)
def test_parse_authority(authority, host, port):
    target = parse_authority(authority)
    assert (target.host, target.port) == (host, port)


@pytest.mark.parametrize(
    "authority",
    ["api.openai.com", ":443", "host:0", "host:65536", "::1:443", "a b:443", "h%41:443", "x:y"],
)
def test_parse_authority_refuses(authority):
    with pytest.raises(ValueError):
        parse_authority(authority)


def test_parse_absolute():
    target, path = parse_absolute("http://user:pw@API.example.com/v1/chat?x=1")
    assert (target.scheme, target.host, target.port, path) == (
        "http",
        "api.example.com",
        80,
        "/v1/chat?x=1",
    )
    target, path = parse_absolute("https://[::1]:8443")
    assert (target.host, target.port, path, target.url) == ("::1", 8443, "/", "https://[::1]:8443")
    for bad in ("ftp://x/", "http:///path", "http://[::1/", "http://h:99999/"):
        with pytest.raises(ValueError):
            parse_absolute(bad)
    assert is_absolute_form("HTTP://x/") and not is_absolute_form("/v1/chat")


def test_normalize_host_refuses_non_hosts():
    for bad in ("", "a..b", "-a.com", "a" * 64 + ".com", "ex ample.com", "exa\u00e9mple.com"):
        with pytest.raises(ValueError):
            normalize_host(bad)
