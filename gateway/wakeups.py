"""Which of this replica's waiters a released slot wakes.

Waking every local waiter at each release made each of them run the acquire script at
once, so one release cost as many store calls as there were waiters, and a flood of
waiting creates filled the ledger's pool at every release. A freed slot goes to the
earliest waiter among the teams' first waiters (see `ledger.ACQUIRE_SCRIPT`), and one
team takes at most `limit` slots, so only each team's first `limit` local waiters can
be the one admitted: they are woken, the rest keep their periodic re-check
(`quota.RECHECK_S`), which also covers the rare waiter a wake-up misses.
"""

from __future__ import annotations

import asyncio
import itertools


class Wakeups:
    def __init__(self) -> None:
        # team -> slot id -> its wake-up, in local arrival order (dicts keep insertion).
        self._teams: dict[str, dict[str, asyncio.Event]] = {}

    def join(self, team: str, slot_id: str) -> asyncio.Event:
        """The waiter's own wake-up; clear it before each check so none is missed."""
        event = asyncio.Event()
        self._teams.setdefault(team, {})[slot_id] = event
        return event

    def leave(self, team: str, slot_id: str) -> None:
        waiters = self._teams.get(team)
        if waiters is not None:
            waiters.pop(slot_id, None)
            if not waiters:
                del self._teams[team]

    def wake(self, per_team: int) -> int:
        """Wake the first `per_team` waiters of each team; how many were woken."""
        woken = 0
        for waiters in self._teams.values():
            for event in itertools.islice(waiters.values(), per_team):
                event.set()
                woken += 1
        return woken
