"""Team keys change without a restart: on SIGHUP, and when the config file changes.

Only `teams` is applied live (names, keys, caps): that is what a key rotation needs,
and it is safe to swap between two requests. A changed file that does not validate is
refused with a log line and the config in force stays; changes to other sections are
reported as needing a restart rather than half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .config import ConfigError, Settings, TeamSettings, load_settings

log = logging.getLogger("gateway.reload")

WATCH_INTERVAL_S = 2.0


class TeamsReloader:
    def __init__(
        self,
        path: str,
        current: Settings,
        apply: Callable[[tuple[TeamSettings, ...]], None],
    ) -> None:
        self.path = Path(path)
        self.current = current
        self.apply = apply
        self._digest = self._read_digest()

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def check(self, *, forced: bool = False, trigger: str = "file") -> bool:
        """Reload if the file changed (or when `forced`); True if new teams were applied."""
        digest = self._read_digest()
        if digest is None or (digest == self._digest and not forced):
            return False
        self._digest = digest
        try:
            fresh = load_settings(self.path)
        except ConfigError as exc:
            log.error(
                "config change refused; the config in force stays",
                extra={"problems": exc.problems},
            )
            return False
        if replace(fresh, teams=self.current.teams) != self.current:
            log.warning("config changes outside 'teams' take effect only after a restart")
        if fresh.teams == self.current.teams:
            return False
        self.apply(fresh.teams)
        self.current = replace(self.current, teams=fresh.teams)
        log.info(
            "teams reloaded",
            extra={"teams": [team.name for team in fresh.teams], "trigger": trigger},
        )
        return True

    async def watch(self) -> None:
        """Poll the file, and reload at once on SIGHUP where this process can catch it."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(
                signal.SIGHUP, lambda: self.check(forced=True, trigger="signal")
            )
        try:
            while True:
                await asyncio.sleep(WATCH_INTERVAL_S)
                try:
                    self.check()
                except Exception:  # a bug must not end the watch: log it, poll again
                    log.exception("config reload check failed unexpectedly")
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
