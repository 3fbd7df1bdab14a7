"""Fault knobs: misbehaviour a test switches on at runtime to see how the gateway copes."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

COUNTERS = (
    "fail_next",
    "rate_limit_next",
    "create_then_500_next",
    "create_then_hang_next",
    "truncate_next",
    "stall_next",
    "truncate_json_next",
    "garble_json_next",
    "quote_credential_next",
    "other_id_next",
)
# Whole-number knobs that stay on until set back to 0 (not used up).
PATTERNS = ("flap",)


@dataclass
class Faults:
    """Pending faults; each `*_next` counter is used up by one request that it hits.

    - `latency_ms`: every /v1 answer starts this much later.
    - `fail_next`: the next N /v1 requests answer 500 and do nothing.
    - `flap`: /v1 requests alternate N failing (500, nothing done) and N served, from the
      moment it is set until it is set to 0.
    - `rate_limit_next`, `create_then_500_next`, `create_then_hang_next`: job-creating
      requests refused with 429, or created then answered 500, or created then never
      answered (until a reset).
    - `truncate_next`: the next N content downloads send their headers (the whole
      length announced) and half the bytes, then the connection is closed.
    - `stall_next`: the next N content downloads send half the bytes, then nothing more
      until a reset; the connection stays open.
    - `truncate_json_next`: the next N JSON answers on /v1 are cut like `truncate_next`.
    - `garble_json_next`: the next N JSON answers on /v1 are cut to half their bytes
      but framed as complete (the length announced is the half): malformed JSON.
    - `quote_credential_next`: the next N authenticated /v1 requests answer 400 with
      the credential they presented quoted in every field of the error, in the forms a
      careless upstream writes it (plain, URL-encoded, form-encoded, JSON-escaped).
    - `other_id_next`: the next N retrieves answer the asked video's object under the id
      of another video (the newest other one), as a confused upstream or cache would.
    """

    latency_ms: float = 0.0
    fail_next: int = 0
    flap: int = 0
    rate_limit_next: int = 0
    create_then_500_next: int = 0
    create_then_hang_next: int = 0
    truncate_next: int = 0
    stall_next: int = 0
    truncate_json_next: int = 0
    garble_json_next: int = 0
    quote_credential_next: int = 0
    other_id_next: int = 0
    _flap_seen: int = field(default=0, repr=False)
    _release: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def update(self, values: Mapping[str, Any]) -> None:
        """Set the given knobs (not add to them), all or nothing; raises ValueError(field, why)."""
        checked: dict[str, Any] = {}
        whole = COUNTERS + PATTERNS
        for name, value in values.items():
            if name != "latency_ms" and name not in whole:
                raise ValueError(name, "unknown fault")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(name, "must be a non-negative number")
            if name in whole and value != int(value):
                raise ValueError(name, "must be an integer")
            checked[name] = float(value) if name == "latency_ms" else int(value)
        for name, value in checked.items():
            setattr(self, name, value)
        if "flap" in checked:
            self._flap_seen = 0  # a new pattern starts with its failing half

    def take(self, name: str) -> bool:
        """Use up one of counter `name`; True if the fault applies to this request."""
        left = getattr(self, name)
        if left <= 0:
            return False
        setattr(self, name, left - 1)
        return True

    def flapping(self) -> bool:
        """True if `flap` fails this request: N fail, N pass, N fail, ..."""
        if self.flap <= 0:
            return False
        seen = self._flap_seen
        self._flap_seen += 1
        return (seen // self.flap) % 2 == 0

    async def hang(self) -> None:
        """Wait until the next reset or shutdown; cancelling the waiter is harmless."""
        await self._release.wait()

    def release_hangs(self) -> None:
        """Wake every hung request; later hangs wait for the next release."""
        self._release.set()
        self._release = asyncio.Event()

    def clear(self) -> None:
        for f in fields(self):
            if not f.name.startswith("_"):
                setattr(self, f.name, f.default)
        self._flap_seen = 0
        self.release_hangs()

    def snapshot(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
