"""Transport failures towards an upstream, classified once for breakers, retries and replies."""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal["connect_error", "timeout", "reset", "protocol", "pool_exhausted"]

# How each kind is answered to the client (a key of sidecar.replies.KINDS).
REPLY_KIND: dict[str, str] = {
    "connect_error": "upstream_connect",
    "timeout": "upstream_timeout",
    "reset": "upstream_reset",
    "protocol": "upstream_protocol",
    "pool_exhausted": "pool_exhausted",
}


class UpstreamError(Exception):
    """An upstream exchange failed in transport.

    ``kind`` is what breakers and retries judge by; ``response_started`` tells whether any
    response byte had been received (a request may only be replayed safely before that).
    """

    def __init__(self, kind: ErrorKind, message: str, *, response_started: bool = False) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.response_started = response_started
