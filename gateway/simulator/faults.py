"""Fault knobs: misbehaviour a test switches on at runtime to see how the gateway copes."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

COUNTERS = ("fail_next", "rate_limit_next", "create_then_500_next", "create_then_hang_next")


@dataclass
class Faults:
    """Pending faults; each `*_next` counter is used up by one request that it hits."""

    latency_ms: float = 0.0
    fail_next: int = 0
    rate_limit_next: int = 0
    create_then_500_next: int = 0
    create_then_hang_next: int = 0
    _release: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def update(self, values: Mapping[str, Any]) -> None:
        """Set the given knobs (not add to them), all or nothing; raises ValueError(field, why)."""
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if name != "latency_ms" and name not in COUNTERS:
                raise ValueError(name, "unknown fault")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(name, "must be a non-negative number")
            if name in COUNTERS and value != int(value):
                raise ValueError(name, "must be an integer")
            checked[name] = float(value) if name == "latency_ms" else int(value)
        for name, value in checked.items():
            setattr(self, name, value)

    def take(self, name: str) -> bool:
        """Use up one of counter `name`; True if the fault applies to this request."""
        left = getattr(self, name)
        if left <= 0:
            return False
        setattr(self, name, left - 1)
        return True

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
        self.release_hangs()

    def snapshot(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
