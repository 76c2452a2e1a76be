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

# Every pattern matches the whole string: msgspec checks a pattern with `re.search`, under which
# `^...$` also accepts a trailing newline, so they are anchored with `\A` and `\Z` (the OpenAPI
# document carries them as ECMA `^...$`, which is whole-string there: see `ecma_pattern`).
# Characters no subject, path or token may hold, as explicit ranges rather than `\s`, so Python and
# the JSON Schema (ECMA) reading of the published document agree: C0 and C1 control characters,
# DEL, every Unicode space and line or paragraph separator (Python's and ECMA's whitespace), and the
# invisible formatting characters (zero-width, bidirectional controls, BOM).
_UNSAFE = (
    r"\x00-\x20\x7f-\xa0\xad\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f"
    r"\u3000\ufeff"
)
_UNSAFE_CHAR = re.compile(f"[{_UNSAFE}]")
_TOKEN = rf"[^{_UNSAFE}.*>]+"
NAME_PATTERN = r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z"
# A NATS subject: dot-separated non-empty tokens without whitespace or control characters; `*` and
# `>` only as whole tokens, `>` only as the last one.
SUBJECT_PATTERN = rf"\A(?:(?:\*|{_TOKEN})\.)*(?:\*|>|{_TOKEN})\Z"
PATH_PATTERN = rf"\A/[^{_UNSAFE}?#]*\Z"
VERSION_PATTERN = r"\A[A-Za-z0-9_-]{1,64}\Z"
ACCOUNT_PATTERN = r"\A[A-Za-z0-9_-]{1,128}\Z"
CURSOR_PATTERN = r"\A[A-Za-z0-9_-]{1,1024}\Z"  # URL-safe base64 without padding, as list returns it
# Limits of the fields that take any JSON value (accepted and ignored): a RecursionError or a
# megabyte of JSON must never get further than a 400.
MAX_JSON_DEPTH = 32
MAX_JSON_BYTES = 16_384

# Human wording of each pattern, so a 400 says the rule rather than a regex.
PATTERN_RULES: dict[str, str] = {
    NAME_PATTERN: "1-128 characters of A-Z a-z 0-9 _ -, starting with a letter or digit",
    SUBJECT_PATTERN: "a valid NATS subject (non-empty dot-separated tokens, no whitespace or control "
    "characters, '*' and '>' only as whole tokens, '>' only last)",
    PATH_PATTERN: "a path starting with '/', without query, fragment, whitespace or control characters",
    VERSION_PATTERN: "a single subject token of A-Z a-z 0-9 _ -",
    ACCOUNT_PATTERN: "1-128 characters of A-Z a-z 0-9 _ -",
    CURSOR_PATTERN: "a `next_cursor` that a previous page returned",
}


def ecma_pattern(pattern: str) -> str:
    """`pattern` as JSON Schema (ECMA 262) reads it: `^` and `$` for the anchors (whole-string there)."""
    if pattern.startswith(r"\A") and pattern.endswith(r"\Z"):
        return f"^{pattern[2:-2]}$"
    return pattern


def json_depth(value: Any, limit: int) -> int:
    """How deeply lists and dicts nest in `value` (a scalar is 0), counted up to `limit + 1`."""
    deepest, stack = 0, [(value, 0)]
    while stack and deepest <= limit:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest


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

Enabled = Annotated[
    bool,
    Meta(
        description="False keeps the trigger (record, history, route claim) but carries nothing: a stream "
        "route is stopped, a gateway route answers 503."
    ),
]
RevisionNumber = Annotated[
    int,
    Meta(
        ge=1,
        le=2**63 - 1,
        description="The revision the caller read (compare-and-set): the change applies only while the "
        "trigger is still at it, else 409 (412 over HTTP with If-Match). Absent: the latest.",
    ),
]

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
            if not (parts.scheme in ("http", "https") and parts.netloc) or _UNSAFE_CHAR.search(self.info_url):
                raise ValueError(
                    "`info_url` must be an absolute http(s) URL, without whitespace or control characters"
                )


class TriggerTarget(Request):
    """Where the data is delivered: the importing side."""

    subject: Subject | None = None
    local_subject: Subject | None = None
    account: Account | None = None
    type: ExportType | None = None
    name: Text | None = None
    share: bool | None = None
    allow_trace: bool | None = None


DeliveryMode = Literal["direct", "durable"]
ConfirmMode = Literal["reply", "jetstream"]
BackoffPolicy = Literal["exponential", "linear"]
Attempts = Annotated[int, Meta(ge=1, le=100, description="Deliveries tried in all, the first included.")]
BackoffDelay = Annotated[
    int,
    Meta(ge=0, le=86_400_000, description="Milliseconds before the first retry; `exponential` doubles it."),
]
BackoffMax = Annotated[
    int, Meta(ge=0, le=86_400_000, description="The longest pause between two attempts, in milliseconds.")
]
ConfirmTimeout = Annotated[
    int, Meta(ge=1, le=300_000, description="Milliseconds one attempt waits for its confirmation.")
]
Ordered = Annotated[bool, Meta(description="One message in flight per trigger, so D gets them in order.")]
DeadLetterSubject = Annotated[
    str,
    Meta(
        pattern=SUBJECT_PATTERN,
        max_length=1024,
        description="A literal subject: where a message goes, unchanged, after its last failed attempt.",
    ),
]
# The effective values of a durable route's fields that are left out (README "Durable delivery").
DEFAULT_CONFIRM: ConfirmMode = "reply"
DEFAULT_ATTEMPTS = 5
DEFAULT_BACKOFF: BackoffPolicy = "exponential"
DEFAULT_BACKOFF_DELAY_MS = 1_000
DEFAULT_BACKOFF_MAX_MS = 60_000
DEFAULT_TIMEOUT_MS = 5_000
_DURABLE_ONLY = (
    "confirm",
    "attempts",
    "backoff",
    "backoff_delay_ms",
    "backoff_max_ms",
    "timeout_ms",
    "ordered",
    "dead_letter_subject",
)


class Delivery(Request):
    """How a stream trigger's messages reach the target.

    `direct` (the default when `delivery` is absent): core NATS, as published, at most once.
    `durable`: captured in JetStream and delivered at least once, confirmed by a reply (`confirm`
    `reply`: an envelope `status_code` >= 400 or a `Nats-Service-Error` header is a failure) or by
    a JetStream publish acknowledgement (`jetstream`), retried with backoff, then published to
    `dead_letter_subject`. Every other field applies to `durable` only; left out, it is `confirm`
    reply, `attempts` 5, `backoff` exponential from `backoff_delay_ms` 1000 up to `backoff_max_ms`
    60000, `timeout_ms` 5000, not `ordered`, and no dead letter (a message given up on is dropped
    and logged). `durable` needs a `stream` source and single-account mode (400 otherwise).
    """

    mode: DeliveryMode
    confirm: ConfirmMode | None = None
    attempts: Attempts | None = None
    backoff: BackoffPolicy | None = None
    backoff_delay_ms: BackoffDelay | None = None
    backoff_max_ms: BackoffMax | None = None
    timeout_ms: ConfirmTimeout | None = None
    ordered: Ordered | None = None
    dead_letter_subject: DeadLetterSubject | None = None

    @property
    def durable(self) -> bool:
        """True for at-least-once delivery through JetStream."""
        return self.mode == "durable"

    def pause(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 for the first) before the next."""
        delay = self.backoff_delay_ms if self.backoff_delay_ms is not None else DEFAULT_BACKOFF_DELAY_MS
        longest = self.backoff_max_ms if self.backoff_max_ms is not None else DEFAULT_BACKOFF_MAX_MS
        if (self.backoff or DEFAULT_BACKOFF) == "exponential":
            delay *= 2 ** min(attempt - 1, 40)
        else:
            delay *= attempt
        return min(delay, longest) / 1000


def _check_delivery(delivery: Delivery, source: TriggerSource) -> None:
    """The combinations a single field's type cannot rule out (a message naming the field)."""
    if not delivery.durable:
        for field in _DURABLE_ONLY:
            if getattr(delivery, field) is not None:
                raise ValueError(
                    f"`{field}` applies only to `delivery.mode` durable - at `$.delivery.{field}`"
                )
        return
    if source.kind == "service":
        raise ValueError(
            "durable delivery carries one-way messages only: a `service` route has a requester waiting "
            "for the reply - at `$.delivery.mode`"
        )
    delay, longest = delivery.backoff_delay_ms, delivery.backoff_max_ms
    if longest is not None and longest < (delay if delay is not None else DEFAULT_BACKOFF_DELAY_MS):
        raise ValueError(
            f"`backoff_max_ms` ({longest}) must be at least `backoff_delay_ms` "
            f"({delay if delay is not None else DEFAULT_BACKOFF_DELAY_MS}) - at `$.delivery.backoff_max_ms`"
        )
    dead_letter = delivery.dead_letter_subject
    if dead_letter is not None and any(token in ("*", ">") for token in dead_letter.split(".")):
        raise ValueError(
            "`dead_letter_subject` must be a literal subject (no wildcards)"
            " - at `$.delivery.dead_letter_subject`"
        )


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
    enabled: Enabled = True
    delivery: Delivery | None = None

    def __post_init__(self) -> None:
        if self.target.type is not None and self.target.type != self.source.kind:
            raise ValueError(
                f"target.type ({self.target.type!r}) must equal source.type ({self.source.kind!r})"
                " - at `$.target.type`"
            )
        if self.delivery is not None:  # checked here so that the message names the field itself
            _check_delivery(self.delivery, self.source)


# --- gateway triggers ------------------------------------------------------------------------


class RateLimit(Request):
    """At most `request` requests per `time` milliseconds, per route and sidecar replica."""

    request: Annotated[int, Meta(ge=1, le=1_000_000_000)]
    time: Annotated[
        int, Meta(ge=1, le=31_536_000_000, description="Window length in milliseconds (at most a year).")
    ]


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


def _check_any(field: str, value: Any) -> None:
    """Hold a field that takes any JSON to MAX_JSON_DEPTH levels and MAX_JSON_BYTES bytes."""
    if value is None:
        return
    if json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ValueError(
            f"JSON nested deeper than {MAX_JSON_DEPTH} levels (the limit) - at `$.gateway_mapping.{field}`"
        )
    if len(msgspec.json.encode(value)) > MAX_JSON_BYTES:
        raise ValueError(
            f"JSON longer than {MAX_JSON_BYTES} bytes (the limit) - at `$.gateway_mapping.{field}`"
        )


class GatewayTriggerRequest(Request):
    """Body of `create.gateway`."""

    name: Name
    trigger_type: Literal["gateway"]
    gateway_mapping: GatewayMapping
    collection: Text | None = None
    description: Text | None = None
    enabled: Enabled = True

    def __post_init__(self) -> None:
        # Checked here rather than in GatewayMapping, so the message names the field itself: msgspec
        # adds the path of a nested Struct (`$.gateway_mapping`) to what its __post_init__ raises.
        mapping = self.gateway_mapping
        for field in ("subject", "gateway", "error"):
            _check_any(field, getattr(mapping, field))


class StoredGatewayMapping(Base):
    """A gateway mapping as stored and returned, with defaults filled in."""

    method: str
    path: str
    is_public: bool
    timeout: int
    limit: RateLimit | None = None
    traffic_distribution: dict[str, int] | None = None


# --- update and enable/disable ---------------------------------------------------------------


class StreamTriggerUpdate(StreamTriggerRequest):
    """Body of `update.stream.<name>`: a full create body, which replaces the whole configuration
    (`enabled` included: left out, it is true), and optionally the revision it replaces."""

    revision: RevisionNumber | None = None


class GatewayTriggerUpdate(GatewayTriggerRequest):
    """Body of `update.gateway.<name>`: a full create body, which replaces the whole configuration
    (`enabled` included: left out, it is true), and optionally the revision it replaces."""

    revision: RevisionNumber | None = None


class EnabledPatch(Request):
    """Body of `patch.<type>.<name>`: switch a trigger off or on; nothing else changes."""

    enabled: bool
    revision: RevisionNumber | None = None


class UpdateRequest(Base):
    """What `update` is given (not a wire type): the trigger the subject names, its new
    configuration, and the revision it must still be at (from the body, the `Trigger-Revision`
    header or `If-Match`); `if_match` when that came from `If-Match` (a stale one is then 412)."""

    ref: TriggerRef
    body: Any  # StreamTriggerUpdate or GatewayTriggerUpdate, decoded by the subject's type token
    revision: int | None = None
    if_match: bool = False


class PatchRequest(Base):
    """What `patch` is given (not a wire type): as UpdateRequest, with the patch as its body."""

    ref: TriggerRef
    body: EnabledPatch
    revision: int | None = None
    if_match: bool = False


# --- list query ------------------------------------------------------------------------------


Cursor = Annotated[
    str,
    Meta(
        pattern=CURSOR_PATTERN,
        max_length=1024,
        description="The `next_cursor` of the previous page, passed back unchanged to get the next one.",
    ),
]
NextCursor = Annotated[
    str, Meta(description="Present when more follow this page: pass it back as `cursor` for the next one.")
]


EnabledFilter = Annotated[
    bool, Meta(description="Only enabled (true) or only disabled (false) triggers; absent: both.")
]


class ListQuery(Request):
    """Payload of `list`: the HTTP query parameters as a JSON object."""

    subject_pattern: Subject
    limit: Annotated[
        int,
        Meta(
            ge=1,
            le=1000,
            description="At most this many records a page (1-1000); a page also stops before the "
            "record that would take the reply over the NATS server's max payload.",
        ),
    ] = 1000
    cursor: Cursor | None = None
    enabled: EnabledFilter | None = None


class HistoryQuery(Request):
    """Payload of `history`: the HTTP query parameters as a JSON object; every field is optional."""

    limit: Annotated[
        int,
        Meta(
            ge=1,
            le=64,
            description="At most this many revisions a page (1-64; the bucket keeps 64 a trigger); a page "
            "also stops before the revision that would take the reply over the NATS server's max payload.",
        ),
    ] = 64
    cursor: Cursor | None = None


class HistoryRequest(Base):
    """What `history` is given: the trigger named by the subject's last two tokens, and the page
    asked for in the payload (not a wire type of its own)."""

    ref: TriggerRef
    query: HistoryQuery


# --- stored records (also the reply bodies) --------------------------------------------------


StoredRevision = Annotated[
    int, Meta(description="The record's revision in the bucket (in replies; never stored).")
]


class Record(Base, tag_field="trigger_type"):
    """Fields every stored trigger has. `type` is `created`, `updated` or `deleted`.

    `enabled` is left out while it is true (fields at their defaults are). `revision` is never
    stored: replies fill it in with the record's KV revision, the one to send back as `revision`
    (or `If-Match`) for a compare-and-set.
    """

    name: str
    stream: str
    subject: str
    type: Literal["created", "updated", "deleted"]
    created_at: str
    updated_at: str | None = None
    deleted_at: str | None = None
    collection: str | None = None
    description: str | None = None
    enabled: bool = True
    revision: StoredRevision | None = None


class DeliveryStats(Base):
    """A durable route's counts (in replies only, never stored), over all replicas, since the
    trigger was created or last enabled."""

    delivered: Annotated[int, Meta(description="Messages confirmed by the target.")]
    redelivered: Annotated[int, Meta(description="Attempts after the first (retries and takeovers).")]
    pending: Annotated[int, Meta(description="Captured messages not yet confirmed or dead-lettered.")]
    dead_lettered: Annotated[int, Meta(description="Messages given up on after their last attempt.")]


class StreamTrigger(Record, tag="stream", kw_only=True):
    """A stream trigger as stored and returned."""

    source: TriggerSource
    target: TriggerTarget
    delivery: Delivery | None = None
    delivery_stats: DeliveryStats | None = None  # replies of `get` fill it in for a durable route

    @property
    def durable(self) -> bool:
        """True when the route delivers through JetStream (at least once)."""
        return self.delivery is not None and self.delivery.durable


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

    results: Annotated[
        list[Trigger],
        Meta(
            description="One page of the live matches, ordered by subject: at most `limit`, and no more "
            "than fit in one reply within the NATS server's max payload (always at least one)."
        ),
    ]
    results_total: Annotated[int, Meta(description="Every live match, on every page.")]
    next_cursor: NextCursor | None = None


class HistoryEntry(Base):
    """One revision in a trigger's history."""

    revision: int
    time: str
    type: str
    record: Trigger


class HistoryBody(Base):
    """Body of a history reply."""

    results: Annotated[
        list[HistoryEntry],
        Meta(
            description="One page of the stored revisions, oldest first: at most `limit`, and no more "
            "than fit in one reply within the NATS server's max payload (always at least one)."
        ),
    ]
    results_total: Annotated[int, Meta(description="Every stored revision, on every page.")]
    next_cursor: NextCursor | None = None


class StreamTriggerReply(Reply):
    """201 reply of `create.stream`."""

    body: StreamTrigger
    status_code: int = 201


class GatewayTriggerReply(Reply):
    """201 reply of `create.gateway`."""

    body: GatewayTrigger
    status_code: int = 201


class TriggerReply(Reply):
    """200 reply of `get`, `update` and `patch`: the record at its current revision."""

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


class ExistsBody(Base):
    """Body of a create's 409 when a live trigger holds the name: that trigger, and whether its
    configuration equals the request's (`same`: a retried create that had in fact succeeded)."""

    same: bool
    record: Trigger


class ExistsReply(Reply):
    """409 reply of a create whose name a live trigger of the caller's account holds."""

    error: str
    body: ExistsBody
    status_code: int = 409
