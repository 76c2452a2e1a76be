"""The oldest nats-server this project runs on, and the check both processes make at connect."""

from __future__ import annotations

import re

MINIMUM = (2, 12, 0)
MINIMUM_TEXT = ".".join(map(str, MINIMUM))
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


class ServerTooOld(Exception):
    """The nats-server is older than MINIMUM (or its version cannot be read)."""


def parse(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version string such as "2.15.1" or "nats-server: v2.15.1"."""
    found = _VERSION.search(text)
    return (int(found[1]), int(found[2]), int(found[3])) if found else None


def require(version: str, where: str) -> None:
    """Raise ServerTooOld unless `version` is at least MINIMUM; `where` names the server in the message."""
    parsed = parse(version)
    if parsed is None or parsed < MINIMUM:
        raise ServerTooOld(
            f"{where} runs nats-server {version or 'of unknown version'}; "
            f"the Trigger Service needs nats-server {MINIMUM_TEXT} or later"
        )
