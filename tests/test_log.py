"""Log lines as written in JSON: a request's fields on every line logged while it is served, and the
hot request line shaped as structlog writes the others."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator

import pytest

from service import log


class _Stderr:
    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def isatty(self) -> bool:
        return False


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Stderr]:
    stderr = _Stderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    log.configure("info", "json")
    yield stderr
    monkeypatch.undo()
    log.configure("warning", "json")  # as the suite runs (tests/conftest.py)


def _written(stderr: _Stderr) -> list[dict[str, object]]:
    log._hot.writer.flush()  # type: ignore[union-attr]
    return [json.loads(line) for line in stderr.buffer.getvalue().splitlines()]


def test_a_line_logged_while_a_request_is_served_carries_its_fields(lines: _Stderr) -> None:
    logger = log.get("test")
    token = log.bind_request(subject="ms.trigger.get.stream.x", request_id="r-1", trace_id="t" * 32)
    logger.warning("inside", detail=1)
    log.unbind_request(token)
    logger.warning("after")
    inside, after = _written(lines)
    assert inside["subject"] == "ms.trigger.get.stream.x"
    assert (inside["request_id"], inside["trace_id"], inside["detail"]) == ("r-1", "t" * 32, 1)
    assert "request_id" not in after


def test_the_hot_line_has_the_shape_of_every_other_line(lines: _Stderr) -> None:
    log.get("routing").info("request", operation="get", status=200)
    log.hot("routing", "request")(operation="get", status=200)
    plain, hot = _written(lines)
    assert plain.keys() == hot.keys()
    assert {k: v for k, v in plain.items() if k != "timestamp"} == {
        k: v for k, v in hot.items() if k != "timestamp"
    }
    assert str(hot["timestamp"]).endswith("Z")
