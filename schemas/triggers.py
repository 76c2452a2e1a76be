"""Wire types of the Trigger API: requests, stored records and reply envelopes.

Requests forbid unknown fields (a typo is a 400); stored records do not, so that
records written by an older or newer release still decode.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

# --- constraints -----------------------------------------------------------------------------

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
# A NATS subject: dot-separated non-empty tokens without whitespace or control characters; `*` and
# `>` only as whole tokens, `>` only as the last one. Explicit character classes rather than `\s`,
# so Python and the JSON Schema (ECMA) reading of the published document agree.
SUBJECT_PATTERN = r"^(?:(?:\*|[^\x00-\x20\x7f.*>]+)\.)*(?:\*|>|[^\x00-\x20\x7f.*>]+)$"
PATH_PATTERN = r"^/[^\x00-\x20\x7f?#]*$"
VERSION_PATTERN = r"^[A-Za-z0-9_-]+$"
ACCOUNT_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"

# Human wording of each pattern, so a 400 says the rule rather than a regex.
PATTERN_RULES: dict[str, str] = {
    NAME_PATTERN: "1-128 characters of A-Z a-z 0-9 _ -, starting with a letter or digit",
    SUBJECT_PATTERN: "a valid NATS subject (non-empty dot-separated tokens, no whitespace, "
    "'*' and '>' only as whole tokens, '>' only last)",
    PATH_PATTERN: "a path starting with '/', without query, fragment or whitespace",
    VERSION_PATTERN: "a single subject token of A-Z a-z 0-9 _ -",
    ACCOUNT_PATTERN: "1-128 characters of A-Z a-z 0-9 _ -",
}

Name = Annotated[
    str,
    Meta(
        pattern=NAME_PATTERN,
        min_length=1,
        max_length=128,
        description="One NATS subject token: 1-128 of A-Z a-z 0-9 _ -, starting with a letter or digit.",
    ),
]
Subject = Annotated[
    str, Meta(pattern=SUBJECT_PATTERN, max_length=1024, description="A NATS subject; wildcards allowed.")
]
Account = Annotated[str, Meta(pattern=ACCOUNT_PATTERN, description="An account identifier.")]
Text = Annotated[str, Meta(max_length=4096)]
Method = Literal["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
Path = Annotated[str, Meta(pattern=PATH_PATTERN, max_length=2048, description="Exact HTTP path.")]
Version = Annotated[str, Meta(pattern=VERSION_PATTERN, max_length=64)]
Percent = Annotated[int, Meta(ge=0, le=100)]
ExportType = Literal["stream", "service"]
ResponseType = Literal["Singleton", "Stream", "Chunked"]
TriggerType = Literal["gateway", "stream", "subject"]

RESERVED_PATHS = ("/trigger", "/healthz", "/openapi.json", "/docs", "/metrics")


class Base(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Shared base of every wire type."""


class Request(Base, forbid_unknown_fields=True):
    """Shared base of request types: unknown fields are rejected."""


# --- stream triggers -------------------------------------------------------------------------


class TriggerSource(Request):
    """Where the data originates: the exporting side."""

    subject: Subject
    type: ExportType | None = None  # None means "stream"; kept as given in the record
    response_type: ResponseType | None = None
    name: Text | None = None
    description: Text | None = None
    info_url: Annotated[str, Meta(max_length=2048)] | None = None
    advertise: bool | None = None
    allow_trace: bool | None = None

    @property
    def kind(self) -> ExportType:
        """The effective export type (`stream` unless given)."""
        return self.type or "stream"

    def __post_init__(self) -> None:
        if self.info_url is not None:
            parts = urlsplit(self.info_url)
            if not (parts.scheme in ("http", "https") and parts.netloc) or re.search(r"\s", self.info_url):
                raise ValueError("`info_url` must be an absolute http(s) URL")


class TriggerTarget(Request):
    """Where the data is delivered: the importing side."""

    subject: Subject | None = None
    local_subject: Subject | None = None
    account: Account | None = None
    type: ExportType | None = None
    name: Text | None = None
    share: bool | None = None
    allow_trace: bool | None = None


class TriggerRef(Request):
    """The trigger named by the last two tokens of a get, delete or history subject."""

    trigger_type: TriggerType
    name: Name


class StreamTriggerRequest(Request):
    """Body of `create.stream`.

    Order: with one service replica (or in accounts mode) a route delivers each publisher's
    messages in the order published; with several replicas in single-account mode each message
    is carried exactly once, but not in order.
    """

    name: Name
    trigger_type: Literal["stream"]
    source: TriggerSource
    target: TriggerTarget
    collection: Text | None = None
    description: Text | None = None

    def __post_init__(self) -> None:
        if self.target.type is not None and self.target.type != self.source.kind:
            raise ValueError(
                f"target.type ({self.target.type!r}) must equal source.type ({self.source.kind!r})"
                " - at `$.target.type`"
            )


# --- gateway triggers ------------------------------------------------------------------------


class RateLimit(Request):
    """At most `request` requests per `time` milliseconds, per route and sidecar replica."""

    request: Annotated[int, Meta(ge=1)]
    time: Annotated[int, Meta(ge=1, description="Window length in milliseconds.")]


class GatewayMapping(Request):
    """The HTTP endpoint a gateway trigger opens."""

    method: Method
    path: Path
    is_public: bool = False
    limit: RateLimit | None = None
    timeout: Annotated[int, Meta(ge=1, le=300_000, description="Milliseconds.")] = 30_000
    traffic_distribution: dict[Version, Percent] | None = None
    # Response-only fields that the published schema also lists on requests: accepted, ignored.
    subject: Any = None
    gateway: Any = None
    error: Any = None

    def __post_init__(self) -> None:
        path = self.path
        if path == "/trigger" or path.startswith("/trigger/") or path in RESERVED_PATHS:
            raise ValueError(f"`path` {path!r} is reserved by the gateway")
        if self.traffic_distribution is not None:
            if not self.traffic_distribution:
                raise ValueError("`traffic_distribution` must name at least one version")
            total = sum(self.traffic_distribution.values())
            if total != 100:
                raise ValueError(f"`traffic_distribution` percentages must sum to 100, not {total}")


class GatewayTriggerRequest(Request):
    """Body of `create.gateway`."""

    name: Name
    trigger_type: Literal["gateway"]
    gateway_mapping: GatewayMapping
    collection: Text | None = None
    description: Text | None = None


class StoredGatewayMapping(Base):
    """A gateway mapping as stored and returned, with defaults filled in."""

    method: str
    path: str
    is_public: bool
    timeout: int
    limit: RateLimit | None = None
    traffic_distribution: dict[str, int] | None = None


# --- list query ------------------------------------------------------------------------------


class ListQuery(Request):
    """Payload of `list`: the HTTP query parameters as a JSON object."""

    subject_pattern: Subject
    limit: Annotated[int, Meta(ge=1, le=1000)] = 1000
    cursor: Annotated[str, Meta(max_length=1024)] | None = None


# --- stored records (also the reply bodies) --------------------------------------------------


class Record(Base, tag_field="trigger_type"):
    """Fields every stored trigger has. `type` is `created` or `deleted`."""

    name: str
    stream: str
    subject: str
    type: Literal["created", "deleted"]
    created_at: str
    deleted_at: str | None = None
    collection: str | None = None
    description: str | None = None


class StreamTrigger(Record, tag="stream", kw_only=True):
    """A stream trigger as stored and returned."""

    source: TriggerSource
    target: TriggerTarget


class GatewayTrigger(Record, tag="gateway", kw_only=True):
    """A gateway trigger as stored and returned."""

    gateway_mapping: StoredGatewayMapping
    gateway_mapping_subject: str


Trigger = StreamTrigger | GatewayTrigger


# --- replies ---------------------------------------------------------------------------------


class Reply(msgspec.Struct, kw_only=True):
    """Shared base of reply envelopes: every field is always sent, `status_code` included."""


class Metadata(Base):
    """`metadata` of get and list replies."""

    subject: str


class ListBody(Base):
    """Body of a list reply."""

    results: list[Trigger]
    results_total: int
    next_cursor: str | None = None


class HistoryEntry(Base):
    """One revision in a trigger's history."""

    revision: int
    time: str
    type: str
    record: Trigger


class HistoryBody(Base):
    """Body of a history reply."""

    results: list[HistoryEntry]
    results_total: int


class StreamTriggerReply(Reply):
    """201 reply of `create.stream`."""

    body: StreamTrigger
    status_code: int = 201


class GatewayTriggerReply(Reply):
    """201 reply of `create.gateway`."""

    body: GatewayTrigger
    status_code: int = 201


class TriggerReply(Reply):
    """200 reply of `get`."""

    body: Trigger
    metadata: Metadata
    status_code: int = 200


class ListReply(Reply):
    """200 reply of `list`."""

    body: ListBody
    metadata: Metadata
    status_code: int = 200


class HistoryReply(Reply):
    """200 reply of `history`."""

    body: HistoryBody
    status_code: int = 200


class DeleteReply(Reply):
    """200 reply of `delete`: no body."""

    status_code: int = 200


class ErrorReply(Reply):
    """Every error reply."""

    error: str
    status_code: int
