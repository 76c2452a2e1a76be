"""Property-based run of schemathesis: the served /openapi.json against the running sidecar.

Every operation of the document gets generated requests, valid ones and invalid ones; every reply
must be no 5xx and must conform to the document (status, content type, headers, schema).
"""

from __future__ import annotations

import asyncio

import aiohttp
import hypothesis
import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from schemas.openapi import document
from tests import http_fixtures
from tests.support import token

gateway_url, http = http_fixtures.gateway_url, http_fixtures.http

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
DOCUMENT = document()
# Negative cases need something to break: parameters or a body.
CASES = [
    (f"{method.upper()} {path}", mode)
    for path, item in DOCUMENT["paths"].items()
    for method, operation in item.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or "parameters" in operation or "requestBody" in operation
]
SETTINGS = hypothesis.settings(
    max_examples=25,
    deadline=None,  # a request crosses HTTP, NATS and KV: its time says nothing about the property
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
async def test_served_document_holds_for_generated_requests(
    http: aiohttp.ClientSession, gateway_url: str, label: str, mode: GenerationMode
) -> None:
    """No 5xx, and every response conforms to the served document."""
    async with http.get(f"{gateway_url}/openapi.json") as response:
        served = await response.json()
    operation = schemathesis.openapi.from_dict(served).find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served document"
    strategy = operation.as_strategy(generation_mode=mode)
    headers = {"Authorization": f"Bearer {token()}"}

    def run() -> None:
        with requests.Session() as session:

            @SETTINGS
            @hypothesis.given(case=strategy)
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(base_url=gateway_url, session=session, headers=headers, checks=CHECKS)

            check()

    # requests is synchronous: run it in a thread while this event loop serves the sidecar.
    await asyncio.to_thread(run)
