"""The OpenAPI document of the HTTP sidecar, generated from the wire types and the operation table."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from schemas import triggers as t
from service import __version__
from service.routing import OPERATIONS, REQUEST_ID_HEADER, Operation

_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"{(\w+)}")
# Path parameters of the HTTP routes, and the TriggerRef field each one becomes.
_PATH_FIELDS = {"type": "trigger_type", "name": "name"}


# --- the sidecar's own replies ---------------------------------------------------------------


class HealthBody(t.Base, kw_only=True):
    """Body of a healthy `/healthz` reply: the Trigger Service instance that answered the PING."""

    status: Literal["ok"]
    service_id: str
    service_version: str


class HealthReply(t.Reply):
    """200 reply of `/healthz`."""

    body: HealthBody
    status_code: int = 200


# --- error responses -------------------------------------------------------------------------

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "Invalid request: the error names the field and the rule."),
    401: ("Unauthorized", "Missing, malformed, badly signed or expired bearer token, or too narrow a scope."),
    404: ("NotFound", "No such trigger in the caller's account (or it was deleted)."),
    409: (
        "Conflict",
        "An active trigger of this type and name (a create's 409 then carries it, and whether it is "
        "configured as asked), or this gateway route, already exists; or the `revision` sent is not "
        "the trigger's current one.",
    ),
    412: ("PreconditionFailed", "The `If-Match` revision is not the trigger's current one: read it again."),
    413: ("PayloadTooLarge", "The request body is over 1 MiB or over the NATS server's max payload."),
    500: ("InternalError", "Unexpected failure; the details are in the logs, never in the reply."),
    503: ("Unavailable", "The Trigger Service or its KV store is not reachable."),
    504: ("GatewayTimeout", "The Trigger Service did not answer within the request timeout."),
}


def _errors_of(op: Operation) -> list[int]:
    """The error statuses an operation can answer."""
    codes = [400, 401, 413, 500, 503, 504]
    if op.names_trigger:  # it names one trigger, which may not exist
        codes.append(404)
    if op.success == 201 or op.conditional:  # names must be unique; a revision may be stale
        codes.append(409)
    if op.conditional:  # a stale If-Match
        codes.append(412)
    return sorted(codes)


# --- the document ----------------------------------------------------------------------------


def document(prefix: str = "ms.trigger", operations: Sequence[Operation] = OPERATIONS) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every static route, for a service on subject prefix `prefix`."""
    bodies = {b for op in operations if not op.from_subject and op.http_method != "GET" for b in op.bodies}
    queries = {op.request for op in operations if not op.from_subject and op.http_method == "GET"}
    types: set[type[msgspec.Struct]] = {*bodies, *queries, t.TriggerRef, t.ErrorReply, t.ExistsReply}
    types.add(HealthReply)
    types.update(op.reply for op in operations)
    _, components = msgspec.json.schema_components(sorted(types, key=_ref), ref_template=_REF)
    schemas: dict[str, Any] = _ecma(components)
    # Path and query parameters are described one by one, not as a schema of their own.
    ref_fields = schemas.pop(t.TriggerRef.__name__)["properties"]
    query_schemas = {cls: schemas.pop(cls.__name__) for cls in queries}

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        item: dict[str, Any] = {
            "operationId": op.name,
            "summary": op.summary,
            "description": f"Forwarded as a NATS request to `{prefix}.{op.subject}`.",
            "x-nats-subject": f"{prefix}.{op.subject}",
            "responses": {
                str(op.success): _response(f"{op.summary}: success.", {"$ref": _ref(op.reply)}, etag=op.etag),
                **{
                    str(code): {"$ref": f"#/components/responses/{_ERRORS[code][0]}"}
                    for code in _errors_of(op)
                },
            },
        }
        if op.success == 201:  # a create's 409 may carry the live trigger
            item["responses"]["409"] = _response(
                _ERRORS[409][1], {"anyOf": [{"$ref": _ref(t.ErrorReply)}, {"$ref": _ref(t.ExistsReply)}]}
            )
        names = _PATH_PARAM.findall(op.http_path)
        parameters = [_parameter("path", name, ref_fields[_PATH_FIELDS[name]], True) for name in names]
        if op.request in queries:
            query = query_schemas[op.request]
            required = set(query.get("required", ()))
            parameters += [
                _parameter("query", field, _not_null(schema), field in required)
                for field, schema in query["properties"].items()
            ]
        if op.conditional:
            parameters.append(_IF_MATCH)
        if parameters:
            item["parameters"] = parameters
        if not op.from_subject and op.http_method != "GET":
            refs = [{"$ref": _ref(body)} for body in op.bodies]
            item["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}},
            }
        paths.setdefault(op.http_path, {})[op.http_method.lower()] = item

    paths["/healthz"] = {
        "get": {
            "operationId": "health",
            "summary": "Health of the sidecar: connected to NATS and the Trigger Service answers a PING",
            "security": [],
            "responses": {
                "200": _response("Healthy.", {"$ref": _ref(HealthReply)}),
                "503": {"$ref": "#/components/responses/Unavailable"},
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics of the sidecar: the caller's account's gateway triggers and the "
            "sidecar's own series (text format)",
            "responses": {
                "200": {
                    "description": "The Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "401": {"$ref": "#/components/responses/Unauthorized"},
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": {"200": _response("The OpenAPI document.", {"type": "object"})},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Trigger Service",
            "version": __version__,
            "description": "Create, read, list, update, disable, enable and delete triggers. Every reply "
            "is a JSON envelope whose `status_code` equals the HTTP status.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                name: _response(text, {"$ref": _ref(t.ErrorReply)}) for name, text in _ERRORS.values()
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{"bearerAuth": []}],
    }


def _ecma(node: Any) -> Any:
    """`node` with every `pattern` as JSON Schema (ECMA 262) reads it (see `triggers.ecma_pattern`)."""
    if isinstance(node, dict):
        return {
            key: t.ecma_pattern(value) if key == "pattern" and isinstance(value, str) else _ecma(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_ecma(value) for value in node]
    return node


def _ref(cls: type) -> str:
    return _REF.format(name=cls.__name__)


_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": 'Compare-and-set: the trigger\'s revision as its ETag gave it (`"7"`, or `7`); a stale '
    "one is 412 and changes nothing. `*` or absent: the change applies to the latest revision.",
    "schema": {"type": "string"},
}


def _response(description: str, schema: dict[str, Any], *, etag: bool = False) -> dict[str, Any]:
    headers: dict[str, Any] = {
        REQUEST_ID_HEADER: {
            "description": "The request id: the caller's own, else a new one.",
            "schema": {"type": "string"},
        }
    }
    if etag:
        headers["ETag"] = {
            "description": 'The record\'s revision as an entity tag (`"7"`): send it back as `If-Match`.',
            "required": True,
            "schema": {"type": "string"},
        }
    return {
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": schema}},
    }


def _parameter(where: str, name: str, schema: dict[str, Any], required: bool) -> dict[str, Any]:
    parameter = {"name": name, "in": where, "required": required, "schema": schema}
    if "description" in schema:
        parameter["description"] = schema["description"]
    return parameter


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter is absent rather than null: drop the null branch of an optional field."""
    branches = [branch for branch in schema.get("anyOf", ()) if branch != {"type": "null"}]
    if len(branches) == 1:
        extra = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
        return {**branches[0], **extra}
    return schema
