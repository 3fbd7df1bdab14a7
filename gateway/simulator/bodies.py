"""Request bodies as every client sends them: JSON, multipart or url-encoded, one shape.

The SDKs send the same call either as JSON or as multipart (flattening `{"id": ...}` to
`video[id]`), so both are read into flat text fields plus the names of uploaded files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from ..parse import loads_json
from .jobs import DEFAULT_MODEL, MAX_PROMPT_CHARS, SimError

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass
class Body:
    """Text fields (nested objects flattened as `a[b]`) and uploaded files by part name."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)

    def text(self, name: str) -> str | None:
        return self.fields.get(name)

    def prompt(self) -> str:
        prompt = self.fields.get("prompt")
        if prompt is None or not prompt.strip():
            raise SimError(
                400,
                "missing_required_parameter",
                "Missing required parameter: 'prompt'.",
                param="prompt",
            )
        if len(prompt) > MAX_PROMPT_CHARS:
            raise SimError(
                400,
                "string_above_max_length",
                f"'prompt' is longer than {MAX_PROMPT_CHARS} characters.",
                param="prompt",
            )
        return prompt

    def model(self) -> str:
        model = self.fields.get("model", DEFAULT_MODEL)
        if not model.strip():
            raise SimError(400, "invalid_value", "'model' must not be empty.", param="model")
        return model

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.fields.get(name, default)
        if value not in allowed:
            raise SimError(
                400,
                "invalid_value",
                f"Invalid '{name}': {value!r}; expected one of {', '.join(allowed)}.",
                param=name,
            )
        return value

    def required(self, name: str) -> str:
        value = self.fields.get(name)
        if not value:
            raise SimError(
                400,
                "missing_required_parameter",
                f"Missing required parameter: '{name}'.",
                param=name,
            )
        return value


async def read_body(request: Request) -> Body:
    """Read any supported body; an empty one is an empty JSON object."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in FORM_TYPES:
        return await _read_form(request)
    raw = await request.body()
    if not raw.strip():
        return Body()
    try:
        data = loads_json(raw)
    except ValueError as exc:
        raise SimError(
            400, "invalid_json", "We could not parse the JSON body of your request."
        ) from exc
    if not isinstance(data, dict):
        raise SimError(400, "invalid_json", "The JSON body must be an object.")
    body = Body()
    _flatten(data, "", body.fields)
    return body


async def _read_form(request: Request) -> Body:
    body = Body()
    async with request.form() as form:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                body.files[name] = value.size or 0
            else:
                body.fields[name] = value
    return body


def _flatten(data: dict[str, Any], prefix: str, out: dict[str, str]) -> None:
    for key, value in data.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if value is None:
            continue
        if isinstance(value, dict):
            _flatten(value, name, out)
        elif isinstance(value, str):
            out[name] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = str(value)  # curl users write "seconds": 8
        else:
            out[name] = json.dumps(value)  # never one of the allowed values: validation refuses
