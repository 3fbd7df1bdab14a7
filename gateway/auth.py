"""Team keys: recognised by their SHA-256 digest, never held or compared in clear.

The config stores only digests, so a leaked config file leaks no key. Lookup is one
dict access on the digest of the presented key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.datastructures import Headers

from .config import TeamSettings
from .errors import invalid_api_key

KEY_PREFIX = "sgw-"
ADMIN_KEY_PREFIX = "sgw-admin-"


@dataclass(frozen=True)
class Team:
    name: str
    max_in_flight: int | None = None
    # The team's config entry: what it may ask for and spend (policy, budgets).
    settings: TeamSettings | None = field(default=None, compare=False, repr=False)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh team key: 256 random bits, prefixed so a leaked one is easy to grep for."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_admin_key() -> str:
    """A fresh admin key: as a team key, with a prefix that says what it opens."""
    return ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)


def presented_key(headers: Headers) -> str | None:
    """The key a client sent: `Authorization: Bearer` wins over `api-key`, as the contract says."""
    authorization = headers.get("authorization", "").strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    api_key = headers.get("api-key")
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


def bearer_matches(headers: Headers, expected: str) -> bool:
    """`Authorization: Bearer <expected>`, compared in constant time, as bytes: the
    header may hold any byte, and comparing non-ASCII str raises instead of refusing."""
    presented = headers.get("authorization", "").encode("latin-1")  # as it arrived
    return hmac.compare_digest(presented, f"Bearer {expected}".encode())


class TeamDirectory:
    """Maps key digests to teams; `update` swaps the whole map at once (key rotation)."""

    def __init__(self, teams: Iterable[TeamSettings]) -> None:
        self._by_digest: dict[str, Team] = {}
        self._settings: tuple[TeamSettings, ...] = ()
        self.update(teams)

    def settings(self) -> list[TeamSettings]:
        """Every team's config entry, as last loaded."""
        return list(self._settings)

    def update(self, teams: Iterable[TeamSettings]) -> None:
        teams = tuple(teams)
        self._settings = teams
        by_digest = {}
        for entry in teams:
            team = Team(entry.name, entry.max_in_flight, entry)
            for digest in entry.key_sha256:
                by_digest[digest] = team
        self._by_digest = by_digest

    def authenticate(self, headers: Headers) -> Team:
        key = presented_key(headers)
        team = self._by_digest.get(key_digest(key)) if key else None
        if team is None:
            raise invalid_api_key(
                "Missing or unknown API key. Send your team key as 'Authorization: Bearer <key>'."
            )
        return team


class AdminKeys:
    """The keys of the `/admin` routes (`admin.key_sha256`), held as digests like team
    keys; none configured: every admin request is refused."""

    def __init__(self, digests: Iterable[str]) -> None:
        self._digests = frozenset(digests)

    def update(self, digests: Iterable[str]) -> None:
        """A reloaded config's admin keys, swapped at once."""
        self._digests = frozenset(digests)

    def authenticate(self, headers: Headers) -> None:
        key = presented_key(headers)
        if key is None or key_digest(key) not in self._digests:
            raise invalid_api_key(
                "This route needs an admin key (admin.key_sha256) as 'Authorization: Bearer "
                "<key>'; a team key is not one."
            )
