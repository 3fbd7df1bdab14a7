"""Request bodies: read once under the cap, fields parsed, the exact bytes replayed."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable
from typing import Any

import pytest
from starlette.requests import Request

from gateway.body import MAX_PARTS, MAX_TEXT_FIELD_BYTES, SPOOL_IN_MEMORY_BYTES, read_body
from gateway.errors import GatewayError

CAP = 1 << 20
BOUNDARY = "sgw-test-boundary-7c1e"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


class FakeReceive:
    """An ASGI receive that hands out `chunks` and counts how many were taken."""

    def __init__(self, chunks: Iterable[bytes], disconnect: bool = False) -> None:
        self.chunks = list(chunks) or [b""]
        self.disconnect = disconnect
        self.taken = 0

    async def __call__(self) -> dict[str, Any]:
        if self.taken >= len(self.chunks):
            return {"type": "http.disconnect"}
        chunk = self.chunks[self.taken]
        self.taken += 1
        more = self.taken < len(self.chunks) or self.disconnect
        return {"type": "http.request", "body": chunk, "more_body": more}


def make_request(
    chunks: Iterable[bytes],
    content_type: str | None = "application/json",
    *,
    content_length: int | str | None = "auto",
    disconnect: bool = False,
) -> tuple[Request, FakeReceive]:
    chunks = list(chunks)
    headers = []
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    if content_length == "auto":
        content_length = sum(map(len, chunks))
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/videos",
        "raw_path": b"/v1/videos",
        "query_string": b"",
        "headers": headers,
        "http_version": "1.1",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
    }
    receive = FakeReceive(chunks, disconnect)
    return Request(scope, receive), receive


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


async def read(data: bytes, content_type: str | None = "application/json", **kwargs: Any):
    chunk = kwargs.pop("chunk", 8192)
    cap = kwargs.pop("cap", CAP)
    request, _ = make_request(split(data, chunk), content_type, **kwargs)
    return await read_body(request, cap)


async def replayed(body) -> bytes:
    return b"".join([chunk async for chunk in body.raw()])


async def refused(data: bytes, content_type: str | None = "application/json", **kwargs: Any):
    with pytest.raises(GatewayError) as caught:
        await read(data, content_type, **kwargs)
    return caught.value


def part(name: str, value: bytes, filename: str | None = None, ctype: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if ctype:
        head += f"Content-Type: {ctype}\r\n"
    return head.encode() + b"\r\n" + value + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


# -- JSON -----------------------------------------------------------------------------------


async def test_a_json_object_gives_its_fields():
    data = {"prompt": "a fox", "seconds": "8", "video": {"id": "video_1"}, "n": 2}
    body = await read(json.dumps(data).encode())
    assert body.fields == data
    assert body.files == frozenset()
    assert body.size == len(json.dumps(data).encode())
    assert not body.is_multipart


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "application/vnd.x+json"])
async def test_json_content_type_variants_are_accepted(ctype):
    assert (await read(b'{"prompt": "x"}', ctype)).fields == {"prompt": "x"}


@pytest.mark.parametrize("data", [b"[1, 2]", b'"prompt"', b"42", b"null", b"true"])
async def test_json_that_is_not_an_object_is_400(data):
    error = await refused(data)
    assert (error.status, error.code) == (400, "invalid_request")


@pytest.mark.parametrize("data", [b"{", b'{"prompt": }', b"\xff\xfe{}", b"{'a': 1}"])
async def test_malformed_json_is_400(data):
    error = await refused(data)
    assert (error.status, error.code) == (400, "invalid_request")


@pytest.mark.parametrize("ctype", ["text/plain", None, "application/x-www-form-urlencoded"])
async def test_a_body_that_is_neither_json_nor_multipart_is_400(ctype):
    error = await refused(b'{"prompt": "x"}', ctype)
    assert (error.status, error.code) == (400, "invalid_request")


async def test_an_empty_body_has_no_fields():
    body = await read(b"")
    assert body.fields == {}
    assert body.size == 0
    assert await replayed(body) == b""


# -- multipart ------------------------------------------------------------------------------


async def test_multipart_gives_text_fields_and_file_part_names():
    video = os.urandom(5000)
    data = form(
        part("prompt", "a fox in the snow ❄".encode()),
        part("seconds", b"8"),
        part("input_reference", b"\x89PNG\r\n--not-a-boundary\r\n", "ref.png", "image/png"),
        part("video", video, "clip.mp4", "video/mp4"),
    )
    body = await read(data, MULTIPART, chunk=7)
    assert body.fields == {"prompt": "a fox in the snow ❄", "seconds": "8"}
    assert body.files == frozenset({"input_reference", "video"})
    assert body.is_multipart
    assert body.boundary == BOUNDARY.encode()


async def test_multipart_nested_objects_arrive_flattened():
    data = form(part("prompt", b"longer"), part("video[id]", b"video_abc"))
    body = await read(data, MULTIPART)
    assert body.fields == {"prompt": "longer", "video[id]": "video_abc"}
    assert body.files == frozenset()


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 16])
async def test_multipart_parsing_does_not_depend_on_chunk_boundaries(chunk):
    data = form(part("prompt", b"p" * 300), part("f", b"\r\n--x" * 50, "f.bin"))
    body = await read(data, MULTIPART, chunk=chunk)
    assert body.fields == {"prompt": "p" * 300}
    assert body.files == frozenset({"f"})


@pytest.mark.parametrize(
    "data",
    [
        form(part("prompt", b"x"))[:-10],  # no closing boundary
        part("prompt", b"x"),  # closing boundary missing altogether
        form(part("prompt", b"x")).split(b"\r\n\r\n")[0],  # cut inside the headers
    ],
)
async def test_truncated_multipart_is_400(data):
    error = await refused(data, MULTIPART)
    assert (error.status, error.code) == (400, "invalid_request")


async def test_multipart_without_a_boundary_is_400():
    error = await refused(form(part("prompt", b"x")), "multipart/form-data")
    assert (error.status, error.code) == (400, "invalid_request")


async def test_a_part_without_a_name_is_400():
    data = f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{BOUNDARY}--\r\n"
    error = await refused(data.encode(), MULTIPART)
    assert (error.status, error.code) == (400, "invalid_request")


async def test_a_text_field_that_is_not_utf8_is_400_naming_it():
    error = await refused(form(part("prompt", b"\xff\xfe\xfd")), MULTIPART)
    assert (error.status, error.code, error.param) == (400, "invalid_request", "prompt")


async def test_an_oversized_text_field_is_400_naming_it():
    data = form(part("prompt", b"a" * (MAX_TEXT_FIELD_BYTES + 1)))
    error = await refused(data, MULTIPART, cap=4 * MAX_TEXT_FIELD_BYTES)
    assert (error.status, error.code, error.param) == (400, "invalid_request", "prompt")


async def test_too_many_parts_is_400():
    data = form(*(part(f"f{i}", b"v") for i in range(MAX_PARTS + 1)))
    error = await refused(data, MULTIPART)
    assert (error.status, error.code) == (400, "invalid_request")
    body = await read(form(*(part(f"f{i}", b"v") for i in range(MAX_PARTS))), MULTIPART)
    assert len(body.fields) == MAX_PARTS


# -- the cap --------------------------------------------------------------------------------


async def test_a_declared_length_over_the_cap_is_413_before_reading_anything():
    data = b'{"prompt": "' + b"x" * 100 + b'"}'
    request, receive = make_request([data], content_length=len(data))
    with pytest.raises(GatewayError) as caught:
        await read_body(request, len(data) - 1)
    assert (caught.value.status, caught.value.code) == (413, "request_too_large")
    assert receive.taken == 0


async def test_a_body_over_the_cap_without_a_length_is_413_once_it_passes_the_cap():
    cap = 10_000
    chunks = split(b"x" * (5 * cap), 1000)
    request, receive = make_request(chunks, content_length=None)
    with pytest.raises(GatewayError) as caught:
        await read_body(request, cap)
    assert (caught.value.status, caught.value.code) == (413, "request_too_large")
    assert receive.taken == cap // 1000 + 1  # stopped at the first chunk past the cap


async def test_a_body_longer_than_its_declared_length_is_still_capped():
    cap = 10_000
    request, _ = make_request(split(b"x" * (3 * cap), 1000), content_length=10)
    with pytest.raises(GatewayError) as caught:
        await read_body(request, cap)
    assert caught.value.status == 413


async def test_a_body_exactly_at_the_cap_is_accepted():
    data = json.dumps({"prompt": "y" * 1000}).encode()
    body = await read(data, cap=len(data), content_length=None)
    assert body.size == len(data)


async def test_a_multipart_upload_over_the_cap_is_413():
    data = form(part("prompt", b"x"), part("video", os.urandom(50_000), "v.mp4"))
    error = await refused(data, MULTIPART, cap=40_000, content_length=None)
    assert (error.status, error.code) == (413, "request_too_large")


async def test_a_client_that_disconnects_mid_body_is_400():
    request, _ = make_request([b'{"prompt": '], disconnect=True, content_length=100)
    with pytest.raises(GatewayError) as caught:
        await read_body(request, CAP)
    assert (caught.value.status, caught.value.code) == (400, "invalid_request")


# -- replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "ctype"),
    [
        (json.dumps({"prompt": "é ✓", "n": [1, 2]}, ensure_ascii=False).encode(), None),
        (form(part("prompt", b"x"), part("input_reference", os.urandom(70_000), "r.bin")), 1),
        # Bigger than the in-memory spool: replayed from the temporary file.
        (form(part("prompt", b"x"), part("video", os.urandom(3 * SPOOL_IN_MEMORY_BYTES), "v")), 1),
    ],
    ids=["json", "multipart", "multipart-spooled-to-disk"],
)
async def test_raw_replays_the_exact_bytes_received(data, ctype):
    content_type = "application/json" if ctype is None else MULTIPART
    body = await read(data, content_type, chunk=65_537, cap=8 * SPOOL_IN_MEMORY_BYTES)
    try:
        assert body.size == len(data)
        assert await replayed(body) == data
        assert await replayed(body) == data  # and again: a replay can be repeated
    finally:
        body.close()


async def test_a_body_that_stops_arriving_is_refused_with_408() -> None:
    stalled = asyncio.Event()  # never set: the client sent a first chunk, then nothing

    async def receive() -> dict[str, Any]:
        if not hasattr(receive, "sent"):
            receive.sent = True  # type: ignore[attr-defined]
            return {"type": "http.request", "body": b'{"prompt": ', "more_body": True}
        await stalled.wait()
        return {"type": "http.disconnect"}

    request, _ = make_request([b""], content_length=None)
    request = Request(request.scope, receive)
    with pytest.raises(GatewayError) as caught:
        await read_body(request, CAP, timeout_s=0.05)
    assert (caught.value.status, caught.value.code) == (408, "request_timeout")


async def test_a_json_key_given_twice_is_refused() -> None:
    with pytest.raises(GatewayError) as caught:
        await read(b'{"video_id": "video_a", "prompt": "p", "video_id": "video_b"}')
    assert (caught.value.status, caught.value.param) == (400, "video_id")


async def test_a_form_field_given_twice_is_refused() -> None:
    form = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video[id]"\r\n\r\nvideo_a\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video[id]"\r\n\r\nvideo_b\r\n'
        f"--{BOUNDARY}--\r\n"
    ).encode()
    with pytest.raises(GatewayError) as caught:
        await read(form, MULTIPART)
    assert (caught.value.status, caught.value.param) == (400, "video[id]")


async def test_a_json_body_over_a_mebibyte_is_refused_even_under_the_upload_cap() -> None:
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    with pytest.raises(GatewayError) as caught:
        await read(big, cap=8 << 20)
    assert (caught.value.status, caught.value.code) == (413, "request_too_large")


# -- one path per field, whatever the encoding ------------------------------------------------


async def test_json_and_form_name_each_field_by_the_same_path() -> None:
    data = {"prompt": "p", "Video": {"ID": "video_1"}, "style": {}}
    assert (await read(json.dumps(data).encode())).paths == {
        ("prompt",): "prompt",
        ("video", "id"): "Video.ID",
        ("style",): "style",
    }
    sent = form(part("prompt", b"p"), part("Video[ID]", b"video_1"), part("f", b"x", "f.bin"))
    assert (await read(sent, MULTIPART)).paths == {
        ("prompt",): "prompt",
        ("video", "id"): "Video[ID]",
        ("f",): "f",
    }


@pytest.mark.parametrize(
    ("data", "param"),
    [
        (b'{"prompt": "p", "video[id]": "v"}', "video[id]"),
        (b'{"prompt": "p", "video[]": "v"}', "video[]"),
        (b'{"prompt": "p", "video.id": "v"}', "video.id"),
        (b'{"prompt": "p", "": "v"}', ""),
        (b'{"prompt": "p", "a": [{"b c": 1}]}', "b c"),
        (b'{"prompt": "p", "video": {"id": "a"}, "VIDEO": {"id": "b"}}', "VIDEO"),
        (b'{"prompt": "p", "video": {"id": "a", "Id": "b"}}', "Id"),
    ],
    ids=["brackets", "empty-brackets", "dot", "empty", "inside-a-list", "case", "nested-case"],
)
async def test_a_json_key_that_could_alias_another_field_is_refused(data, param) -> None:
    error = await refused(data)
    assert (error.status, error.code, error.param) == (400, "invalid_request", param)


@pytest.mark.parametrize(
    ("names", "param"),
    [
        (["video[id]", "Video[id]"], "Video[id]"),
        (["video[id]", "video"], "video"),
        (["video", "video[id]"], "video[id]"),
        (["video[id]", "video[id][x]"], "video[id][x]"),
        (["video[]"], "video[]"),
        (["video.id"], "video.id"),
        (["video[id"], "video[id"),
    ],
    ids=["case", "leaf-after", "leaf-before", "deeper", "empty-brackets", "dot", "unclosed"],
)
async def test_form_parts_that_could_alias_another_field_are_refused(names, param) -> None:
    sent = form(part("prompt", b"p"), *(part(name, b"video_x") for name in names))
    error = await refused(sent, MULTIPART)
    assert (error.status, error.code, error.param) == (400, "invalid_request", param)
