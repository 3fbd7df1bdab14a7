"""The gateway's own OpenAPI document, generated from its route table.

Each handler carries its request description (`@operation`) next to its code; the
document walks the routes the app actually serves, so it cannot drift from them. It
serves fuzzing (every route, every documented input) and anyone wiring a client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.routing import BaseRoute, Route

F = TypeVar("F", bound=Callable[..., Any])

ID_PATTERN = "^[A-Za-z0-9_-]{1,128}$"
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR_STATUSES = ("400", "401", "404", "405", "413", "429", "502", "503", "504")


@dataclass(frozen=True)
class Operation:
    """What a route takes: a JSON and/or multipart body, query parameters, its answer."""

    summary: str
    json_body: dict[str, Any] | None = None
    form_body: dict[str, Any] | None = None
    query: dict[str, dict[str, Any]] = field(default_factory=dict)
    answer: str = "application/json"  # or a binary content type


def operation(summary: str, **details: Any) -> Callable[[F], F]:
    """Attach an Operation to a handler."""

    def attach(handler: F) -> F:
        handler.__openapi__ = Operation(summary, **details)  # type: ignore[attr-defined]
        return handler

    return attach


def obj(required: Iterable[str] = (), **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


def text(max_length: int | None = None) -> dict[str, Any]:
    return {"type": "string"} if max_length is None else {"type": "string", "maxLength": max_length}


FILE = {"type": "string", "format": "binary"}
VIDEO_ID = {"type": "string", "pattern": ID_PATTERN}


def openapi_document(routes: Iterable[BaseRoute], version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        described: Operation | None = getattr(route.endpoint, "__openapi__", None)
        if described is None:
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            paths.setdefault(route.path, {})[method.lower()] = _operation(route, described)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sora-gateway",
            "version": version,
            "description": "A team's view of the shared OpenAI-compatible Videos API.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "api-key"},
            },
            "schemas": {"Error": ERROR},
        },
    }


def _operation(route: Route, described: Operation) -> dict[str, Any]:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": VIDEO_ID}
        for name in route.param_convertors
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in described.query.items()
    ]
    answer = (
        {"application/json": {"schema": {"type": "object"}}}
        if described.answer == "application/json"
        else {described.answer: {"schema": FILE}}
    )
    result: dict[str, Any] = {
        "summary": described.summary,
        "operationId": route.name,
        "parameters": parameters,
        "responses": {
            "200": {"description": "upstream's answer, as it was", "content": answer},
            **{
                status: {
                    "description": "an error, in the OpenAI envelope",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
                for status in ERROR_STATUSES
            },
        },
    }
    if route.path.startswith("/v1"):
        result["security"] = [{"bearer": []}, {"apiKey": []}]
    elif route.path.startswith("/admin"):
        result["security"] = [{"bearer": []}]  # an admin key (admin.key_sha256)
    content: dict[str, Any] = {}
    if described.json_body is not None:
        content["application/json"] = {"schema": described.json_body}
    if described.form_body is not None:
        content["multipart/form-data"] = {"schema": described.form_body}
    if content:
        result["requestBody"] = {"required": True, "content": content}
    return result
