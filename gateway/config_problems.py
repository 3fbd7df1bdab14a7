"""The schema's validation errors in the config's own words: `PATH: field: what is wrong`.

An operator fixing a config at 3 a.m. reads these, so each names the field's path as
the file spells it (`teams[1].key_sha256[0]`) and says what is wrong in the gateway's
words, not pydantic's. A value is quoted only for numbers and choices, and never for a
secret (a field with `repr=False`): a token with a typo is still a credential.
"""

from __future__ import annotations

from types import NoneType, UnionType
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from .config_schema import REFUSED, Problem, Settings

# pydantic's errors for which the type alone says what is wrong.
_PLAIN = {
    "missing": "required",
    "dataclass_type": "expected a mapping",
    "string_type": "expected a string",
}
# Where pydantic's location names a mapping's key, not the value under it.
_KEY = "[key]"
# ... and those that quote the value (never a secret's).
_QUOTING = {"int_type": "expected a whole number", "float_type": "expected a number"}


class _Field(NamedTuple):
    """What the schema says of the value at a path."""

    kind: Any  # its type, without Annotated or `| None`
    metadata: list[Any]  # bounds, validators, its Problem if it has one
    secret: bool


def described(error: ValidationError) -> list[tuple[str, str]]:
    """(path, what is wrong) for each problem the schema found, in its order."""
    errors = error.errors()
    return [_describe(details) for details in errors if not _counts_refused_items(details, errors)]


def _counts_refused_items(error: ErrorDetails, errors: list[ErrorDetails]) -> bool:
    """A list's length error that only counts the items refused already.

    pydantic checks `min_length` against the items that validated, so one bad digest
    in a list of one would also make the list "too short".
    """
    loc = error["loc"]
    return error["type"] == "too_short" and any(
        len(other["loc"]) > len(loc) and other["loc"][: len(loc)] == loc for other in errors
    )


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def path_of(loc: tuple[str | int, ...]) -> str:
    path = ""
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else join(path, part)
    return path


def _describe(error: ErrorDetails) -> tuple[str, str]:
    loc, kind = error["loc"], error["type"]
    if kind == "invalid_key":  # a YAML key that is no string, so no field's name
        return join(path_of(loc[:-1]), str(loc[-1])), "unknown field"
    path = path_of(loc)
    if kind == "unexpected_keyword_argument":
        return path, "unknown field"
    if kind == REFUSED:
        return path, error["msg"]
    if loc and loc[-1] == _KEY:  # a mapping's key (`pricing`'s model) is refused: name it
        path = join(path_of(loc[:-2]), str(loc[-2]))
    field = _field_at(loc)
    problem = next((m.text for m in field.metadata if isinstance(m, Problem)), None)
    return path, problem or _generic(error, field)


def _generic(error: ErrorDetails, field: _Field) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    got = "" if field.secret else f", got {error['input']!r}"
    if kind in _PLAIN:
        return _PLAIN[kind]
    if kind in _QUOTING:
        return _QUOTING[kind] + got
    if kind == "literal_error" and get_origin(field.kind) is Literal:
        return f"expected one of {', '.join(map(str, get_args(field.kind)))}{got}"
    if kind == "finite_number":  # NaN or an infinity: refused as the field's bound words it
        ctx = next(({"ge": m.ge} for m in field.metadata if hasattr(m, "ge")), {"gt": 0})
    if "gt" in ctx:
        return "must be positive" if ctx["gt"] == 0 else f"must be more than {ctx['gt']}"
    if "ge" in ctx:
        return "must be zero or more" if ctx["ge"] == 0 else f"must be at least {ctx['ge']}"
    if "le" in ctx:
        return f"must be at most {ctx['le']}"
    return "is not valid" if field.secret else error["msg"]


def _field_at(loc: tuple[str | int, ...]) -> _Field:
    field = _Field(Settings, [], secret=False)
    try:
        for i, part in enumerate(loc):
            if part != _KEY:
                field = _step(field, part, key=loc[i + 1 : i + 2] == (_KEY,))
    except (AttributeError, IndexError, KeyError):  # not a path of the schema: assume secret
        return _Field(Any, [], secret=True)
    return field


def _step(field: _Field, part: str | int, *, key: bool = False) -> _Field:
    if get_origin(field.kind) is dict:  # a key of a mapping, or the value under it
        kind, metadata = _unwrap(get_args(field.kind)[0 if key else 1])
        return _Field(kind, metadata, field.secret)
    if isinstance(part, str):  # a field of a section
        info = field.kind.__pydantic_fields__[part]
        kind, metadata = _unwrap(info.annotation)
        return _Field(kind, [*_flat(info.metadata), *metadata], secret=not info.repr)
    items = get_args(field.kind)  # an item of a tuple
    kind, metadata = _unwrap(items[0] if items[-1] is Ellipsis else items[part])
    return _Field(kind, metadata, field.secret)


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *more = get_args(annotation)
            metadata += _flat(more)
        elif get_origin(annotation) in (Union, UnionType) and NoneType in get_args(annotation):
            (annotation,) = (kind for kind in get_args(annotation) if kind is not NoneType)
        else:
            return annotation, metadata


def _flat(metadata: list[Any]) -> list[Any]:
    """A `Field(...)` inside an Annotated holds its bounds in its own metadata."""
    return [
        m for item in metadata for m in (item.metadata if isinstance(item, FieldInfo) else [item])
    ]
