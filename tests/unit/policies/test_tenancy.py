"""Who is asking: tenant ids from a header, an API key hash, or the default."""

from __future__ import annotations

from sidecar.http.message import Headers
from sidecar.policies.tenancy import api_key, identify


def test_the_header_names_the_tenant() -> None:
    assert identify(Headers([("x-tenant-id", " acme ")]), "x-tenant-id", True) == "acme"
    assert identify(Headers([("x-team", "blue")]), "x-team", False) == "blue"


def test_without_the_header_the_default_tenant() -> None:
    headers = Headers([("authorization", "Bearer sk-1")])
    assert identify(headers, "x-tenant-id", False) == "default"
    assert identify(Headers([("x-tenant-id", "  ")]), "x-tenant-id", False) == "default"


def test_api_key_hash_names_the_tenant_and_hides_the_key() -> None:
    one = identify(Headers([("authorization", "Bearer sk-1")]), "x-tenant-id", True)
    again = identify(Headers([("x-api-key", "sk-1")]), "x-tenant-id", True)
    other = identify(Headers([("api-key", "sk-2")]), "x-tenant-id", True)
    assert one == again != other
    assert one.startswith("key-") and "sk-1" not in one and len(one) == 20


def test_overlong_or_unprintable_ids_are_replaced_by_a_hash() -> None:
    long = identify(Headers([("x-tenant-id", "a" * 500)]), "x-tenant-id", False)
    control = identify(Headers([("x-tenant-id", "a\x00b")]), "x-tenant-id", False)
    assert long.startswith("h-") and len(long) == 18
    assert control.startswith("h-") and control != long


def test_api_key_forms() -> None:
    assert api_key(Headers([("authorization", "Bearer  sk-9 ")])) == "sk-9"
    assert api_key(Headers([("authorization", "Basic abc")])) == "Basic abc"
    assert api_key(Headers([("authorization", "Bearer")])) is None
    assert api_key(Headers()) is None
