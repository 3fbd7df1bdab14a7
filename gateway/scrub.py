"""Secrets out of text that came from elsewhere, before a client or a log sees it.

Upstream's error answers are relayed to clients, and an upstream may quote what it was
sent: the token as given, percent-encoded (it was in a URL or a form), or JSON-escaped
(it was in a JSON string). One scrubber knows every form of every secret and replaces
each with `***`, so no caller has to remember which encodings exist. Percent-escapes
match in either case (`%2F` and `%2f`), since upstreams differ in how they write them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, urlsplit

MASK = "***"


def encoded_forms(secret: str) -> set[str]:
    """The ways `secret` can appear in text: plain, URL-encoded, JSON-escaped."""
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),  # the default keeps "/", as in a path
        quote_plus(secret, safe=""),
        quote_plus(secret),
        json.dumps(secret)[1:-1],  # ASCII-only escapes, as most encoders write them
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret).replace("/", "\\/")[1:-1],  # some encoders escape "/"
    }
    return {form for form in forms if form}


class Scrubber:
    """Replaces every encoded form of the given secrets with `***`."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms |= encoded_forms(secret)
        # Longest first, so a form is never half-replaced by a shorter one it contains.
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = (
            re.compile("|".join(map(re.escape, ordered)), re.IGNORECASE) if ordered else None
        )

    def __call__(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern is not None else text


def url_secret(url: str) -> str | None:
    """The credential embedded in a URL's userinfo: the password of `user:pass@`, or the
    whole userinfo when there is no password (`https://TOKEN@host`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return parts.password or parts.username or None


def redact_url(url: str) -> str:
    """The URL with any userinfo replaced by `***`: safe to print or log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{MASK}@{host}").geturl()
