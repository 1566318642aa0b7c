"""Redact secrets from a config before showing it (admin ``GET /config``, logs)."""

from __future__ import annotations

from typing import Any

SECRET_WORDS = ("key", "token", "secret", "password", "authorization", "cookie")
REDACTED = "<redacted>"


def redacted(value: Any, key: str = "", under_headers: bool = False) -> Any:
    """A copy with every header value and every secret-looking key's value replaced."""
    if isinstance(value, dict):
        return {k: redacted(v, str(k), under_headers or k == "headers") for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key, under_headers) for v in value]
    if value is None:
        return None
    lowered = key.lower()
    if under_headers or any(word in lowered for word in SECRET_WORDS):
        return REDACTED
    return value
