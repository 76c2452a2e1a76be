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
from service.routing import OPERATIONS
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


def test_document_covers_every_operation_with_schemas_errors_and_security() -> None:
    """Every route of the table: its request, its success reply, the error envelope; bearer security."""
    schemas = DOCUMENT["components"]["schemas"]
    for op in OPERATIONS:
        operation = DOCUMENT["paths"][op.http_path][op.http_method.lower()]
        assert operation["x-nats-subject"] == f"ms.trigger.{op.subject}"
        success = operation["responses"][str(op.success)]["content"]["application/json"]["schema"]
        assert success == {"$ref": f"#/components/schemas/{op.reply.__name__}"}
        for code in ("400", "401", "413", "500", "503", "504"):
            assert code in operation["responses"], (op.name, code)
        if op.http_method == "POST":
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert body == {"$ref": f"#/components/schemas/{op.request.__name__}"}
        assert "security" not in operation, "the document-wide bearer requirement applies"
    assert DOCUMENT["security"] == [{"bearerAuth": []}]
    assert DOCUMENT["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    error = DOCUMENT["components"]["responses"]["BadRequest"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorReply"}
    assert set(schemas["ErrorReply"]["required"]) == {"error", "status_code"}
    assert set(_refs(DOCUMENT)) <= {
        f"#/components/{kind}/{name}"
        for kind in ("schemas", "responses")
        for name in DOCUMENT["components"][kind]
    }


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        return [ref for key, value in node.items() for ref in ([value] if key == "$ref" else _refs(value))]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_document_has_update_and_patch_with_if_match_etag_and_412() -> None:
    """PUT and PATCH on a trigger: their bodies, `If-Match`, the `ETag` of every reply with one
    record, 409 and 412; a create's 409 may carry the live trigger."""
    item = DOCUMENT["paths"]["/trigger/triggers/{type}/{name}"]
    put, patch, get = item["put"], item["patch"], item["get"]
    assert put["x-nats-subject"] == "ms.trigger.update.*.*"
    assert patch["x-nats-subject"] == "ms.trigger.patch.*.*"
    assert put["requestBody"]["content"]["application/json"]["schema"] == {
        "anyOf": [
            {"$ref": "#/components/schemas/StreamTriggerUpdate"},
            {"$ref": "#/components/schemas/GatewayTriggerUpdate"},
        ]
    }
    assert patch["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EnabledPatch"
    }
    for operation in (put, patch):
        assert {"404", "409", "412"} <= set(operation["responses"])
        assert any(p["name"] == "If-Match" and p["in"] == "header" for p in operation["parameters"])
    for operation in (put, patch, get):
        assert operation["responses"]["200"]["headers"]["ETag"]["required"] is True
    schemas = DOCUMENT["components"]["schemas"]
    assert "revision" in schemas["StreamTriggerUpdate"]["properties"]
    assert "enabled" in schemas["StreamTriggerRequest"]["properties"]
    assert {"revision", "enabled", "updated_at"} <= set(schemas["StreamTrigger"]["properties"])
    conflict = DOCUMENT["paths"]["/trigger/stream"]["post"]["responses"]["409"]
    assert {"$ref": "#/components/schemas/ExistsReply"} in conflict["content"]["application/json"]["schema"][
        "anyOf"
    ]
    list_parameters = {p["name"]: p for p in DOCUMENT["paths"]["/trigger/triggers"]["get"]["parameters"]}
    assert list_parameters["enabled"]["schema"]["type"] == "boolean"
