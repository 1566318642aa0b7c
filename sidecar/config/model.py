"""The typed configuration: every YAML key the sidecar accepts, with its default and its meaning.

These models are the contract with operators. Each field carries its documentation (the
``description``), from which docs/CONFIG.md's reference table is generated
(``python -m sidecar.config.docs``). Models are frozen and reject unknown keys, so a typo in a
ConfigMap is an error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveSeconds = Annotated[float, Field(gt=0)]
FailureKind = Literal["5xx", "429", "timeout", "connect_error"]
RetryOn = Literal["5xx", "429", "500", "502", "503", "504", "timeout", "connect_error", "reset"]
ApiShape = Literal["auto", "openai", "anthropic"]


class Model(BaseModel):
    """Base: frozen (a config is a value) and strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class Listen(Model):
    """Addresses of the two listeners."""

    proxy: str = Field(
        "127.0.0.1:4000",
        description="HOST:PORT of the proxy listener (base-URL and HTTP_PROXY traffic).",
    )
    admin: str = Field(
        "127.0.0.1:9901",
        description="HOST:PORT of the admin listener (health, metrics, dashboard, config).",
    )

    _hp = field_validator("proxy", "admin")(_check_host_port)


class Pool(Model):
    """Upstream connection pool sizing."""

    max_connections: int = Field(100, ge=1, description="Connections open at most (busy + idle).")
    max_idle: int = Field(100, ge=0, description="Idle keep-alive connections kept at most.")
    keepalive_s: PositiveSeconds = Field(
        30, description="An idle connection is closed after this many seconds."
    )
    max_wait_s: PositiveSeconds = Field(
        30, description="How long a request waits for a free connection when the pool is full."
    )


class Timeouts(Model):
    """Per-attempt timeouts towards an upstream."""

    connect_s: PositiveSeconds = Field(5, description="TCP connect plus TLS handshake.")
    first_byte_s: PositiveSeconds = Field(
        120, description="From request sent to response head received."
    )
    idle_s: PositiveSeconds = Field(60, description="Longest gap between two body chunks.")
    total_s: PositiveSeconds = Field(900, description="Whole exchange, first byte to last.")


class Tls(Model):
    """TLS towards an upstream."""

    verify: bool = Field(True, description="Verify the upstream certificate and host name.")
    ca_bundle: str | None = Field(
        None, description="PEM file of CAs to trust instead of the system store."
    )


class Breaker(Model):
    """Circuit breaker of one upstream (see docs/RESILIENCE.md)."""

    enabled: bool = Field(True, description="Turn the breaker off entirely.")
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open it.")
    reset_timeout_s: PositiveSeconds = Field(30, description="Open period before a trial.")
    half_open_max_requests: int = Field(
        1, ge=1, description="Concurrent trial requests admitted while half-open."
    )
    failure_on: tuple[FailureKind, ...] = Field(
        ("5xx", "timeout", "connect_error"),
        description="Outcomes that count as failures: 5xx, 429, timeout, connect_error.",
    )


class RequestRate(Model):
    """A request rate: exactly one of per_s or per_min."""

    per_s: float | None = Field(None, gt=0, description="Requests per second.")
    per_min: float | None = Field(None, gt=0, description="Requests per minute.")
    burst: float | None = Field(
        None, gt=0, description="Bucket size; defaults to one second (per_s) or one minute."
    )

    @model_validator(mode="after")
    def _one_rate(self) -> RequestRate:
        if (self.per_s is None) == (self.per_min is None):
            raise ValueError("set exactly one of per_s or per_min")
        return self

    @property
    def rate_per_s(self) -> float:
        return self.per_s if self.per_s is not None else (self.per_min or 0.0) / 60.0

    @property
    def capacity(self) -> float:
        if self.burst is not None:
            return self.burst
        return self.per_s if self.per_s is not None else (self.per_min or 0.0)


class TokenRate(Model):
    """An LLM-token rate."""

    per_min: float = Field(gt=0, description="LLM tokens (prompt + completion) per minute.")
    burst: float | None = Field(None, gt=0, description="Bucket size; defaults to per_min.")

    @property
    def rate_per_s(self) -> float:
        return self.per_min / 60.0

    @property
    def capacity(self) -> float:
        return self.burst if self.burst is not None else self.per_min


class Limits(Model):
    """A `limits` block: at upstream, route or tenant scope (see docs/LIMITS.md)."""

    requests: RequestRate | None = Field(None, description="Request-rate bucket.")
    tokens: TokenRate | None = Field(None, description="LLM-token bucket.")
    max_in_flight: int | None = Field(None, ge=1, description="Concurrent requests at most.")
    on_limit: Literal["reject", "queue"] = Field(
        "reject", description="reject: 429 at once; queue: wait FIFO up to max_wait_s."
    )
    max_wait_s: PositiveSeconds = Field(10, description="Longest wait in queue mode.")
    max_queue: int = Field(1000, ge=1, description="Waiters at most in queue mode.")


class Upstream(Model):
    """One LLM provider endpoint."""

    url: str = Field(description="Base URL, http:// or https://, with an optional path prefix.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Headers set on every request, replacing the client's value (API keys).",
    )
    api: ApiShape = Field(
        "auto", description="Error shape for sidecar-made replies: openai, anthropic, or auto."
    )
    pool: Pool = Field(default_factory=Pool)  # type: ignore[arg-type]
    timeouts: Timeouts = Field(default_factory=Timeouts)  # type: ignore[arg-type]
    tls: Tls = Field(default_factory=Tls)  # type: ignore[arg-type]
    breaker: Breaker = Field(default_factory=Breaker)  # type: ignore[arg-type]
    limits: Limits | None = Field(None, description="Limits shared by every route to it.")
    pacing: bool = Field(
        True, description="Pace requests when the provider's x-ratelimit-remaining hits zero."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not a valid URL: {value!r}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"not a valid URL: {value!r}") from None
        if parts.query or parts.fragment:
            raise ValueError(f"URL must not have a query or fragment: {value!r}")
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _lower_headers(cls, value: dict[str, str]) -> dict[str, str]:
        return {k.lower(): v for k, v in value.items()}


class Target(Model):
    """A route target: an upstream and, optionally, the model name to send it."""

    name: str = Field(description="Upstream name.")
    model: str | None = Field(None, description="Rewrite the JSON body's `model` to this.")


TargetSpec = str | Target


class Retry(Model):
    """Retries of one route (see docs/RESILIENCE.md)."""

    attempts: int = Field(1, ge=1, le=10, description="Total tries per upstream; 1 = no retry.")
    backoff_s: float = Field(0.25, ge=0, description="Base of the exponential backoff.")
    max_backoff_s: float = Field(10, ge=0, description="Cap of one backoff (and Retry-After).")
    on: tuple[RetryOn, ...] = Field(
        ("429", "502", "503", "504", "connect_error"),
        description="Retryable outcomes: statuses, 5xx, timeout, connect_error, reset.",
    )
    per_try_timeout_s: float | None = Field(
        None, gt=0, description="Deadline of one try up to its response head."
    )
    budget_percent: float = Field(
        20, ge=0, le=100, description="Retries in flight at most, as % of active requests."
    )
    non_idempotent: bool = Field(True, description="Retry POST (safe before any response byte).")


class Stream(Model):
    """Streaming options of a route."""

    include_usage: bool = Field(
        False, description="Ask OpenAI streams for usage and hide it from clients that didn't."
    )
    keepalive_s: float | None = Field(
        None, gt=0, description="Send SSE comments while waiting for a slow first byte."
    )


class Route(Model):
    """Where requests go: matched by path prefix (base-URL mode) and/or host (proxy mode)."""

    name: str | None = Field(None, description="Label in metrics; defaults to the prefix/host.")
    path_prefix: str | None = Field(None, description="Path prefix; stripped before forwarding.")
    host: str | None = Field(None, description="Host (exact or *.suffix) for HTTP_PROXY mode.")
    strip_prefix: bool = Field(True, description="Remove path_prefix before forwarding.")
    upstreams: tuple[TargetSpec, ...] = Field(
        min_length=1, description="Ordered targets: primary first, then fallbacks."
    )
    models: dict[str, tuple[TargetSpec, ...]] = Field(
        default_factory=dict, description="Model-name glob -> its own ordered targets."
    )
    model_aliases: dict[str, str | dict[str, str]] = Field(
        default_factory=dict,
        description="Model name the app uses -> name sent upstream, or per upstream name.",
    )
    api: ApiShape = Field("auto", description="Error shape for sidecar-made replies.")
    retry: Retry = Field(default_factory=Retry)  # type: ignore[arg-type]
    limits: Limits | None = Field(None, description="Limits of this route.")
    stream: Stream = Field(default_factory=Stream)  # type: ignore[arg-type]
    x_should_retry: bool = Field(
        True, description="Send x-should-retry: false when retrying cannot help."
    )

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must start with '/': {value!r}")
        return value.rstrip("/") if value not in (None, "/") else value

    @model_validator(mode="after")
    def _matcher(self) -> Route:
        if self.path_prefix is None and self.host is None:
            raise ValueError("a route needs path_prefix or host")
        return self

    @property
    def label(self) -> str:
        return self.name or self.path_prefix or self.host or "route"


class Budget(Model):
    """Spend limits of a tenant in USD."""

    per_day: float | None = Field(None, ge=0, description="USD per UTC day.")
    per_month: float | None = Field(None, ge=0, description="USD per UTC month.")


class Tenant(Model):
    """Limits and budget of one tenant."""

    limits: Limits | None = None
    budget_usd: Budget | None = None


class Tenants(Model):
    """How tenants are identified and limited (see docs/LIMITS.md)."""

    header: str = Field("x-tenant-id", description="Request header naming the tenant.")
    from_api_key: bool = Field(
        False, description="Without the header, use a hash of the API key as the tenant."
    )
    default: Tenant = Field(default_factory=Tenant, description="Applies to unknown tenants.")
    overrides: dict[str, Tenant] = Field(default_factory=dict, description="Per tenant id.")
    max_label_values: int = Field(
        100, ge=1, description="Tenants beyond this many are reported as `other` in metrics."
    )


class Price(Model):
    """Price of a model in USD per million tokens."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class Accounting(Model):
    """How LLM tokens are estimated before the response is known."""

    chars_per_token: float = Field(4.0, gt=0, description="Prompt estimate: characters per token.")
    default_max_tokens: int = Field(
        1024, ge=0, description="Completion estimate when the request sets no max_tokens."
    )


class Egress(Model):
    """What the proxy may connect to in HTTP_PROXY/HTTPS_PROXY mode (see docs/EGRESS.md)."""

    allow: tuple[str, ...] = Field(
        (),
        description="Allowed hosts: exact or *.suffix, optionally :PORT or :* (default ports "
        "80 and 443). Route and intercept hosts are allowed implicitly.",
    )
    deny_private: bool = Field(
        True, description="Refuse private, loopback, link-local and unique-local addresses."
    )
    allow_addresses: tuple[str, ...] = Field(
        (),
        description="Addresses or CIDRs (e.g. 10.0.0.0/8) allowed even when deny_private "
        "refuses their range.",
    )
    connect_timeout_s: PositiveSeconds = Field(
        10, description="DNS plus TCP connect of a CONNECT tunnel."
    )
    max_tunnels_per_host: int = Field(256, ge=1, description="Open CONNECT tunnels per host.")
    tunnel_idle_s: PositiveSeconds = Field(300, description="Close a silent tunnel after this.")

    @field_validator("allow_addresses")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"not an address or CIDR: {item!r}") from None
        return value


class Intercept(Model):
    """Opt-in TLS interception of chosen hosts (see docs/EGRESS.md)."""

    hosts: tuple[str, ...] = Field((), description="Hosts whose CONNECT tunnels are decrypted.")
    ca_cert: str | None = Field(None, description="PEM CA certificate that signs leaf certs.")
    ca_key: str | None = Field(None, description="PEM private key of that CA.")

    @model_validator(mode="after")
    def _needs_ca(self) -> Intercept:
        if self.hosts and not (self.ca_cert and self.ca_key):
            raise ValueError("intercept.hosts needs ca_cert and ca_key")
        return self


class Audit(Model):
    """Append-only compliance log (see docs/OBSERVABILITY.md)."""

    path: str | None = Field(None, description="JSON-lines file; unset disables the audit log.")
    max_bytes: int = Field(100 * 1024 * 1024, ge=1024, description="Rotate at this size.")
    backups: int = Field(5, ge=0, description="Rotated files kept.")
    include_bodies: bool = Field(False, description="Also record prompts and completions.")


class AccessLog(Model):
    """One JSON line per request on stdout."""

    enabled: bool = Field(True, description="Write the access log.")


class Http(Model):
    """Limits of the HTTP/1.1 proxy listener."""

    max_request_body_bytes: int = Field(
        32 * 1024 * 1024, ge=0, description="Larger request bodies get 413."
    )
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="Larger heads get 431.")
    max_headers: int = Field(100, ge=1, description="More header fields get 431.")
    client_idle_s: PositiveSeconds = Field(
        75, description="Close an idle keep-alive client connection after this."
    )


class Reload(Model):
    """Hot reload of the config file (see docs/CONFIG.md)."""

    watch: bool = Field(True, description="Watch the --config file and reload on change.")
    poll_interval_s: PositiveSeconds = Field(2.0, description="Content-hash poll interval.")
    debounce_s: float = Field(0.2, ge=0, description="Content must be stable this long.")


class Config(Model):
    """The whole sidecar configuration."""

    listen: Listen = Field(default_factory=Listen)  # type: ignore[arg-type]
    shutdown_grace_s: float = Field(30, ge=0, description="Drain period on SIGTERM.")
    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    routes: tuple[Route, ...] = Field(())
    http: Http = Field(default_factory=Http)  # type: ignore[arg-type]
    tenants: Tenants = Field(default_factory=Tenants)  # type: ignore[arg-type]
    prices: dict[str, Price] = Field(default_factory=dict, description="Model -> price.")
    accounting: Accounting = Field(default_factory=Accounting)  # type: ignore[arg-type]
    egress: Egress = Field(default_factory=Egress)  # type: ignore[arg-type]
    intercept: Intercept = Field(default_factory=Intercept)  # type: ignore[arg-type]
    audit: Audit = Field(default_factory=Audit)  # type: ignore[arg-type]
    access_log: AccessLog = Field(default_factory=AccessLog)  # type: ignore[arg-type]
    reload: Reload = Field(default_factory=Reload)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _routes_name_upstreams(self) -> Config:
        for index, route in enumerate(self.routes):
            all_targets = list(route.upstreams)
            for targets in route.models.values():
                all_targets.extend(targets)
            for target in all_targets:
                name = target if isinstance(target, str) else target.name
                if name not in self.upstreams:
                    known = ", ".join(sorted(self.upstreams)) or "none"
                    raise ValueError(
                        f"routes[{index}].upstreams: unknown upstream {name!r} (known: {known})"
                    )
        return self
