"""Settings from the environment, validated once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# Whole-string patterns (`\A...\Z`: msgspec searches, and `$` would also accept a trailing newline).
_PREFIX_PATTERN = r"\A[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\Z"
_BUCKET_PATTERN = r"\A[A-Za-z0-9_-]+\Z"
_ADDR_PATTERN = r"\A[^\s:]*:[0-9]{1,5}\Z"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the service and the sidecar read from their environment."""

    nats_url: str = "nats://127.0.0.1:4222"
    nats_creds: str | None = None
    prefix: Annotated[str, Meta(pattern=_PREFIX_PATTERN)] = "ms.trigger"
    bucket: Annotated[str, Meta(pattern=_BUCKET_PATTERN)] = "quiva-trigger-config"
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    auth: Literal["jwt", "none"] = "jwt"
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_allow_no_exp: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console", "auto"] = "auto"
    max_in_flight: Annotated[int, Meta(ge=1, le=100_000)] = 256
    routing: Literal["single", "accounts"] = "single"
    operator_seed: str | None = None
    system_creds: str | None = None
    tenants: str = ""  # accounts mode: the accounts stream triggers may route between (comma-separated)
    http_addr: Annotated[str, Meta(pattern=_ADDR_PATTERN)] = "127.0.0.1:8080"
    # Sidecar worker processes sharing TRIGGER_HTTP_ADDR's port (SO_REUSEPORT; service.gateway.workers).
    http_workers: Annotated[int, Meta(ge=1, le=64)] = 1
    request_timeout: Annotated[float, Meta(gt=0, le=600)] = 10.0
    # How long the change-events stream keeps an event (seconds; the stream's duplicate window is
    # 2 minutes, or this when shorter). Applies when the service creates the stream.
    events_max_age: Annotated[float, Meta(ge=1, le=10 * 365 * 86400)] = 7 * 86400.0
    # A private listener serving GET /metrics for Prometheus (`host:port`); none unless set.
    metrics_addr: Annotated[str, Meta(pattern=_ADDR_PATTERN)] | None = None
    # The fraction of successful requests that get a request log line; errors always get one.
    request_log_sample: Annotated[float, Meta(ge=0, le=1)] = 1.0
    # The sidecar's console: the service replicas' metrics listeners (comma-separated `host:port`
    # of their TRIGGER_METRICS_ADDR), whose stream-trigger counters it sums per trigger.
    service_metrics: str = ""
    # Accounts mode: a user of the account durable stream triggers are captured in and delivered
    # from (service.relay); without it durable triggers are refused there.
    relay_creds: str | None = None

    @property
    def service_metrics_addrs(self) -> list[str]:
        """TRIGGER_SERVICE_METRICS as a list of `host:port`."""
        return [a.strip() for a in self.service_metrics.split(",") if a.strip()]

    @property
    def tenant_accounts(self) -> frozenset[str]:
        """TRIGGER_TENANTS as a set; empty means every account but the service's and the system's."""
        return frozenset(a.strip() for a in self.tenants.split(",") if a.strip())

    @property
    def subject_base(self) -> str:
        """Prefix of every trigger subject, with its trailing dot."""
        return self.prefix + "."


ENV_VARS: dict[str, str] = {
    "nats_url": "NATS_URL",
    "nats_creds": "NATS_CREDS",
    "prefix": "TRIGGER_PREFIX",
    "bucket": "TRIGGER_BUCKET",
    "replicas": "TRIGGER_REPLICAS",
    "auth": "TRIGGER_AUTH",
    "jwt_secret": "TRIGGER_JWT_SECRET",
    "jwt_public_key": "TRIGGER_JWT_PUBLIC_KEY",
    "jwt_allow_no_exp": "TRIGGER_JWT_ALLOW_NO_EXP",
    "log_level": "LOG_LEVEL",
    "log_format": "LOG_FORMAT",
    "max_in_flight": "TRIGGER_MAX_IN_FLIGHT",
    "routing": "TRIGGER_ROUTING",
    "operator_seed": "TRIGGER_OPERATOR_SEED",
    "system_creds": "TRIGGER_SYSTEM_CREDS",
    "tenants": "TRIGGER_TENANTS",
    "http_addr": "TRIGGER_HTTP_ADDR",
    "http_workers": "TRIGGER_HTTP_WORKERS",
    "request_timeout": "TRIGGER_REQUEST_TIMEOUT",
    "events_max_age": "TRIGGER_EVENTS_MAX_AGE",
    "metrics_addr": "TRIGGER_METRICS_ADDR",
    "request_log_sample": "TRIGGER_REQUEST_LOG_SAMPLE",
    "service_metrics": "TRIGGER_SERVICE_METRICS",
    "relay_creds": "TRIGGER_RELAY_CREDS",
}
_LOWERCASE = {"auth", "log_level", "log_format", "routing", "jwt_allow_no_exp"}


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the environment variable."""


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `environ` (default `os.environ`); raise ConfigError naming the variable."""
    env = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    for field, var in ENV_VARS.items():
        value = env.get(var)
        if value not in (None, ""):
            raw[field] = value.strip().lower() if field in _LOWERCASE else value.strip()
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        match = re.search(r"`\$\.(\w+)`", str(exc))
        var = ENV_VARS.get(match.group(1), "?") if match else "?"
        rule = str(exc).split(" - at ")[0]
        raise ConfigError(f"{var}: {rule}") from None
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    if settings.auth == "jwt" and not (settings.jwt_secret or settings.jwt_public_key):
        raise ConfigError(
            "TRIGGER_JWT_SECRET or TRIGGER_JWT_PUBLIC_KEY must be set to verify bearer tokens "
            "(or TRIGGER_AUTH=none to turn authentication off for development)"
        )
    if settings.jwt_secret and len(settings.jwt_secret.encode()) < 32:
        raise ConfigError("TRIGGER_JWT_SECRET: must be at least 32 bytes (RFC 7518 for HS256)")
    if settings.jwt_secret and settings.jwt_public_key:
        raise ConfigError("TRIGGER_JWT_SECRET and TRIGGER_JWT_PUBLIC_KEY: set only one of them")
    for field in ("jwt_public_key", "nats_creds", "operator_seed", "system_creds", "relay_creds"):
        path = getattr(settings, field)
        if path and not Path(path).is_file():
            raise ConfigError(f"{ENV_VARS[field]}: no readable file at {path!r}")
    for addr in settings.service_metrics_addrs:
        if not re.fullmatch(_ADDR_PATTERN, addr):
            raise ConfigError(f"TRIGGER_SERVICE_METRICS: {addr!r} is not `host:port`")
    if settings.routing == "accounts":
        missing = [ENV_VARS[f] for f in ("operator_seed", "system_creds") if not getattr(settings, f)]
        if missing:
            raise ConfigError(f"TRIGGER_ROUTING=accounts needs {' and '.join(missing)}")
