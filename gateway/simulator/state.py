"""Everything one simulator app owns, in one object kept on `app.state.sim`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .creates import CreateLog
from .faults import Faults
from .jobs import JobBook, SimulatorSettings
from .media import MediaLibrary
from .traffic import Traffic


class SimulatorState:
    """Settings, jobs, faults and traffic of one simulated upstream account."""

    def __init__(self, settings: SimulatorSettings, clock: Callable[[], float] = time.time) -> None:
        self.initial = replace(settings)
        self.settings = replace(settings)
        self.jobs = JobBook(self.settings, clock)
        self.faults = Faults()
        self.traffic = Traffic()
        self.creates = CreateLog()
        self.media = MediaLibrary.load()

    def configure(self, values: Mapping[str, Any]) -> None:
        """Apply a settings update (all or nothing; ValueError as `update` raises it)."""
        self.settings.update(values)
        self.jobs.follow_scale()
        if "seed" in values:
            self.jobs.reseed()

    def reset(self) -> None:
        """Back to the start: no jobs, no faults, zero counters, the startup settings.

        The simulated clock keeps running (at the startup scale from now on)."""
        self.settings.copy_from(self.initial)
        self.jobs.follow_scale()
        self.jobs.clear()
        self.faults.clear()
        self.traffic.clear()
        self.creates.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "max_concurrency": self.jobs.max_concurrency,
            "limit_hits": self.jobs.limit_hits,
            "running": self.jobs.running_count(),
            "jobs_created": self.jobs.jobs_created,
            "requests": self.traffic.requests,
            "auth_rejected": self.traffic.auth_rejected,
            "content_bytes_sent": self.traffic.content_bytes_sent,
            "credentials_seen": self.traffic.credentials(),
        }
