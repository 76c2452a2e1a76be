"""The subjects a durable stream trigger's messages take through the relay account in accounts
mode (TRIGGER_RELAY_CREDS: an account of the service's, with JetStream, between the tenants).

The source account exports S; the relay account imports it as `captured`, where the trigger's
capture stream stores it. Deliveries are requests on `delivered`, a service import of D from the
target account (which exports D as a service to the relay account), so the target's reply, or its
stream's acknowledgement, comes back through that import. A dead letter is published on `dead`,
which the relay account exports and the source account imports as its dead-letter subject. The
tenants' JWTs say exactly who may send what to whom.

The relay is not the service's own account: pushing that account's JWT (which exports the
Trigger API) drops the replies of the API requests in flight, which is what a relay's JWT
changes with every durable trigger.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PREFIX = "trigger-relay"


def incarnation_digest(bucket: str, key: str, created_at: str) -> str:
    """A name-safe digest of one incarnation of a trigger (a delete and a new create: a new one)."""
    return hashlib.sha256(f"{bucket}\n{key}\n{created_at}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Relay:
    """Where one durable trigger's messages are captured, delivered and dead-lettered in the
    service's account (each keeps the wildcards of the subject it stands for, token by token)."""

    captured: str
    delivered: str
    dead: str


def relay_of(bucket: str, key: str, created_at: str, source: str, destination: str) -> Relay:
    """The relay subjects of the trigger at `key` routing `source` to `destination`."""
    base = f"{PREFIX}.{incarnation_digest(bucket, key, created_at)}"
    return Relay(f"{base}.in.{source}", f"{base}.out.{destination}", f"{base}.dead")
