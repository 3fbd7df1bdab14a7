"""Content bytes: small real media files, or deterministic noise of any length, and Range.

Noise lets a benchmark download gigabytes that cost neither memory nor CPU here, and is
the same for a video id on every request, so a download through the gateway can be
compared byte for byte with one taken directly.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

BLOCK = 1 << 20  # noise is made, and streamed, one 1 MiB block at a time
STAMP = 32  # each block starts with its own sha256 stamp, so misplaced blocks show
VARIANTS: dict[str, tuple[str, str]] = {
    "video": ("sample.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
    "spritesheet": ("spritesheet.jpg", "image/jpeg"),
}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII)


class Content(Protocol):
    """A body of known length that can produce any slice of itself in chunks."""

    @property
    def length(self) -> int: ...

    def chunks(self, start: int, stop: int) -> Iterator[bytes]: ...


@dataclass(frozen=True)
class StaticContent:
    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)

    def chunks(self, start: int, stop: int) -> Iterator[bytes]:
        for offset in range(start, stop, BLOCK):
            yield self.data[offset : min(stop, offset + BLOCK)]


class NoiseContent:
    """`length` pseudo-random bytes fixed by the video id; one 1 MiB base block in memory."""

    def __init__(self, video_id: str, length: int) -> None:
        self._seed = hashlib.sha256(video_id.encode()).digest()
        self._base = memoryview(random.Random(self._seed).randbytes(BLOCK))[STAMP:]
        self._length = length

    @property
    def length(self) -> int:
        return self._length

    def block(self, index: int) -> bytes:
        stamp = hashlib.sha256(self._seed + index.to_bytes(8, "big")).digest()
        return b"".join((stamp, self._base))

    def chunks(self, start: int, stop: int) -> Iterator[bytes]:
        stop = min(stop, self._length)
        position = start
        while position < stop:
            index, offset = divmod(position, BLOCK)
            end = min(BLOCK, stop - index * BLOCK)
            block = self.block(index)
            yield block if (offset, end) == (0, BLOCK) else block[offset:end]
            position = index * BLOCK + end


class MediaLibrary:
    """The bundled sample files, read once per app from the package data."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self._files = files

    @classmethod
    def load(cls) -> MediaLibrary:
        folder = resources.files(__package__).joinpath("assets")
        return cls({name: folder.joinpath(name).read_bytes() for name, _ in VARIANTS.values()})

    def content(self, video_id: str, variant: str, noise_bytes: int | None) -> Content:
        """The body for a variant; the video is noise when a noise length is configured."""
        if variant == "video" and noise_bytes is not None:
            return NoiseContent(video_id, noise_bytes)
        return StaticContent(self._files[VARIANTS[variant][0]])


class RangeNotSatisfiable(Exception):
    """The Range header names no byte of the body: answer 416."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    stop: int  # exclusive

    def content_range(self, length: int) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{length}"


def parse_range(header: str | None, length: int) -> ByteRange | None:
    """A single byte range, or None to send the whole body.

    Headers that are malformed or ask for several ranges are ignored, as RFC 9110 allows;
    a well-formed range outside the body raises RangeNotSatisfiable.
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or length == 0:
            raise RangeNotSatisfiable
        return ByteRange(max(0, length - suffix), length)
    start = int(first)
    end = int(last) if last else length - 1
    if last and end < start:
        return None
    if start >= length:
        raise RangeNotSatisfiable
    return ByteRange(start, min(end, length - 1) + 1)
