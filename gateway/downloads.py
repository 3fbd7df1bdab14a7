"""How many downloads this replica relays at once, in all and per team.

A download holds an upstream connection and up to a megabyte of buffers for as long
as its client takes to read it, and a client can simply stop reading. Without a bound
one team's stalled downloads took every pooled upstream connection and pushed a
replica past its memory limit. The budget is per process and needs no store: what it
protects (connections, memory) is the process's own.
"""

from __future__ import annotations

from collections import Counter

from .errors import GatewayError, too_many_downloads

RETRY_AFTER_S = 1


class DownloadBudget:
    def __init__(self, max_total: int, max_per_team: int) -> None:
        self.max_total = max_total
        self.max_per_team = max_per_team
        self._by_team: Counter[str] = Counter()
        self._total = 0

    @property
    def in_use(self) -> int:
        return self._total

    def claim(self, team: str) -> DownloadClaim:
        """One download for `team`, or 429 `too_many_downloads` when a bound is reached."""
        if self._by_team[team] >= self.max_per_team:
            raise _refusal("Your team has too many downloads in progress on this replica.")
        if self._total >= self.max_total:
            raise _refusal("The gateway has too many downloads in progress.")
        self._by_team[team] += 1
        self._total += 1
        return DownloadClaim(self, team)

    def _release(self, team: str) -> None:
        self._total -= 1
        self._by_team[team] -= 1
        if not self._by_team[team]:
            del self._by_team[team]


class DownloadClaim:
    """A claimed download; `release` may be called any number of times, it counts once."""

    def __init__(self, budget: DownloadBudget, team: str) -> None:
        self._budget: DownloadBudget | None = budget
        self._team = team

    def release(self) -> None:
        if self._budget is not None:
            self._budget._release(self._team)
            self._budget = None


def _refusal(message: str) -> GatewayError:
    return too_many_downloads(message, RETRY_AFTER_S)
