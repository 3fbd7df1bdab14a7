"""Request bodies: read once under a size cap, spooled, parsed for the fields we check.

The gateway must validate a body (prompt present, source video allowed) before it
spends a slot, so it cannot stream the client's bytes straight upstream. It spools
them instead (memory up to a small threshold, then a temporary file), extracts only
the text fields it needs while the bytes arrive, and later replays the untouched
bytes to upstream. File parts are never held in memory.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from .errors import invalid_request, request_timeout, request_too_large
from .parse import loads_json, whole_number

if TYPE_CHECKING:  # python-multipart defines it for type checkers only
    from python_multipart.multipart import MultipartCallbacks

SPOOL_IN_MEMORY_BYTES = 1 << 20
REPLAY_CHUNK_BYTES = 1 << 16
MAX_TEXT_FIELD_BYTES = 1 << 18  # a 32,000-character prompt in 4-byte UTF-8, with room
MAX_PARTS = 64
MAX_JSON_BYTES = 1 << 20  # the largest create is a 32,000-character prompt and a few fields
# A key is a plain word: no brackets or dots, so no JSON key can alias a nested field the
# way upstreams that flatten bodies read them (`video[id]`, `video.id`, `video[]`).
KEY = re.compile(r"[A-Za-z0-9_]+")
# A form part name is a key, or a nested one flattened as SDKs send it: `video[id]`.
FORM_NAME = re.compile(r"([A-Za-z0-9_]+)((?:\[[A-Za-z0-9_]+\])*)")
FORM_SEGMENT = re.compile(r"\[([A-Za-z0-9_]+)\]")

Path = tuple[str, ...]


@dataclass
class RequestBody:
    """A request body held for replay, plus the fields the gateway inspects.

    `fields` is the JSON object, or the text parts of a multipart form keyed by their
    part names (nested objects arrive flattened as `video[id]`). `files` names the
    file parts. `raw` replays the exact bytes the client sent.

    `paths` names every field once, however it was encoded: `{"video": {"id": ...}}`
    and a part `video[id]` are both `("video", "id")`, in lower case. Reading a body
    refuses one in which two fields share a path, or a field is also a prefix of
    another (`video` and `video[id]`): whichever of them an upstream reads, it would
    not be known to be the one the gateway checked. So the raw bytes can be replayed.
    """

    content_type: str
    size: int
    fields: dict[str, Any] = field(default_factory=dict)
    files: frozenset[str] = frozenset()
    paths: dict[Path, str] = field(default_factory=dict)  # path -> the name as sent
    _spool: Any = None

    @property
    def is_multipart(self) -> bool:
        return self.content_type.lower().startswith("multipart/form-data")

    @property
    def boundary(self) -> bytes:
        _, params = parse_options_header(self.content_type)
        return params[b"boundary"]

    async def raw(self) -> AsyncIterator[bytes]:
        self._spool.seek(0)
        while chunk := self._spool.read(REPLAY_CHUNK_BYTES):
            yield chunk

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()


async def read_body(request: Request, max_bytes: int, timeout_s: float = 60.0) -> RequestBody:
    """Read the whole body (at most `max_bytes`), spooling it and parsing its fields.

    Refuses with 413 as soon as the declared or received size passes the cap, with 408
    when the body has not fully arrived after `timeout_s`, and with 400 when it is not
    a JSON object or a well-formed multipart form.
    """
    declared = whole_number(request.headers.get("content-length", ""))
    if declared is not None and declared > max_bytes:
        raise request_too_large(max_bytes)
    content_type = request.headers.get("content-type", "")
    mime = content_type.split(";", 1)[0].strip().lower()
    form = _FormFields(content_type) if mime == "multipart/form-data" else None
    # Closed by RequestBody.close() once the body has been replayed, or below on failure.
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)  # noqa: SIM115
    try:
        size = await _spool_stream(request, spool, form, max_bytes, timeout_s)
        body = RequestBody(content_type=content_type, size=size, _spool=spool)
        if form is not None:
            body.fields, body.files = form.finish()
            body.paths = form.paths
        elif size > MAX_JSON_BYTES:
            # Uploads come as multipart; a JSON body is a few fields and is parsed whole.
            raise request_too_large(MAX_JSON_BYTES)
        elif size:
            body.fields = _json_object(spool, mime)
            body.paths = dict(_json_paths(body.fields))
        return body
    except BaseException:
        spool.close()
        raise


async def _spool_stream(
    request: Request, spool: Any, form: _FormFields | None, max_bytes: int, timeout_s: float
) -> int:
    """Copy the body into `spool` (and the form parser) as it arrives; its size."""
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise request_too_large(max_bytes)
                spool.write(chunk)
                if form is not None:
                    form.feed(chunk)
    except ClientDisconnect as exc:
        raise invalid_request("The client closed the connection mid-body.") from exc
    except TimeoutError as exc:
        raise request_timeout(timeout_s) from exc
    return size


def _json_object(spool: Any, mime: str) -> dict[str, Any]:
    if mime != "application/json" and not mime.endswith("+json"):
        raise invalid_request(
            "Send the body as application/json or multipart/form-data.", param=None
        )
    spool.seek(0)
    try:
        value = loads_json(spool.read(), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid_request(f"The body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise invalid_request("The JSON body must be an object.")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are plain words, unique even ignoring case: with a
    repeated key (`video` and `Video` to a case-blind parser), the value the gateway
    checks and the one upstream reads could differ."""
    found: dict[str, Any] = {}
    seen: set[str] = set()
    for key, value in pairs:
        if not KEY.fullmatch(key):
            raise invalid_request(
                f"The field name {key!r} is not a plain word (letters, digits, '_'); "
                "send nested fields as JSON objects.",
                key,
            )
        if key.lower() in seen:
            raise invalid_request(f"The field {key!r} is given twice.", key)
        seen.add(key.lower())
        found[key] = value
    return found


def _json_paths(value: dict[str, Any], keys: Path = ()) -> Iterator[tuple[Path, str]]:
    """Each field of a JSON object by path, objects descended into (see `RequestBody`),
    with its name as sent, dotted: `video.id`."""
    for key, item in value.items():
        if isinstance(item, dict) and item:
            yield from _json_paths(item, (*keys, key))
        else:
            sent = (*keys, key)
            yield tuple(k.lower() for k in sent), ".".join(sent)


def _form_path(name: str) -> Path:
    """The path of a part name, `video[id]` -> ("video", "id"); 400 for any other shape."""
    match = FORM_NAME.fullmatch(name)
    if match is None:
        raise invalid_request(
            f"The field name {name!r} is not a plain word or a nested one like 'video[id]'.",
            name,
        )
    head, rest = match.groups()
    return (head.lower(), *(segment.lower() for segment in FORM_SEGMENT.findall(rest)))


class _FormFields:
    """Collects the text parts of a multipart form as it streams past; skips file data."""

    def __init__(self, content_type: str) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise invalid_request("The multipart body has no boundary in its Content-Type.")
        self.fields: dict[str, str] = {}
        self.files: set[str] = set()
        self.paths: dict[Path, str] = {}
        self._prefixes: set[Path] = set()
        self._parts = 0
        self._ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._is_file = False
        self._data = bytearray()
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except FormParserError as exc:
            # A boundary the parser cannot use (longer than its 256 bytes; RFC 2046
            # allows 70) is the client's mistake, like any other malformed body.
            raise invalid_request("The multipart boundary in the Content-Type is invalid.") from exc

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise invalid_request("The multipart body is malformed.") from exc

    def finish(self) -> tuple[dict[str, str], frozenset[str]]:
        try:
            self._parser.finalize()
        except FormParserError as exc:
            raise invalid_request("The multipart body is malformed.") from exc
        if not self._ended:
            raise invalid_request("The multipart body is truncated (no closing boundary).")
        return self.fields, frozenset(self.files)

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise invalid_request(f"The multipart body has more than {MAX_PARTS} parts.")
        self._disposition = b""
        self._name = None
        self._is_file = False
        self._data = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise invalid_request("A multipart part has no name in its Content-Disposition.")
        self._name = name.decode("utf-8", "replace")
        self._is_file = b"filename" in options

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            return
        self._data += data[start:end]
        if len(self._data) > MAX_TEXT_FIELD_BYTES:
            raise invalid_request(
                f"The text field is longer than {MAX_TEXT_FIELD_BYTES} bytes.", param=self._name
            )

    def _part_end(self) -> None:
        assert self._name is not None
        self._claim(self._name)
        if self._is_file:
            self.files.add(self._name)
            return
        try:
            self.fields[self._name] = self._data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise invalid_request("A text field is not valid UTF-8.", param=self._name) from exc

    def _claim(self, name: str) -> None:
        """Refuse a part whose path another part has, or is inside, or contains.

        The gateway checks one value and forwards the raw bytes: with two parts for one
        field (`video[id]` twice, `Video[id]` and `video[id]`, `video` and `video[id]`)
        upstream might read the other one.
        """
        path = _form_path(name)
        inside = any(path[:n] in self.paths for n in range(1, len(path)))
        if path in self.paths or path in self._prefixes or inside:
            raise invalid_request(f"The field {name!r} is given twice.", name)
        self.paths[path] = name
        self._prefixes.update(path[:n] for n in range(1, len(path)))

    def _end(self) -> None:
        self._ended = True
