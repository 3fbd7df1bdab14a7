"""Team keys and policy change without a restart: on SIGHUP, and when the config file changes.

`teams` is applied live (names, keys, caps, allowed models, sizes and lengths,
budgets): that is what a key rotation or a new budget needs, and it is safe to swap
between two requests. Given `apply_policy`, so are `pricing`, `admin` and
`upstream.defaults` (CONTRACT §9: policy reloads like `teams`); they go together
with the teams, since check-config judges a team's models against the prices, and
the admin keys against the teams' keys, of the same file. A changed file that does
not validate is refused with a log line and the config in force stays; changes to
other sections are reported as needing a restart rather than half-applied.
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

from pydantic import ValidationError

from .config import ConfigError, Settings, TeamSettings, load_settings
from .config_problems import described

log = logging.getLogger("gateway.reload")

WATCH_INTERVAL_S = 2.0


def _policy(settings: Settings) -> tuple[object, ...]:
    return settings.pricing, settings.admin, settings.upstream.defaults


class TeamsReloader:
    def __init__(
        self,
        path: str,
        current: Settings,
        apply: Callable[[tuple[TeamSettings, ...]], None],
        apply_policy: Callable[[Settings], None] | None = None,
    ) -> None:
        """`apply` takes the new teams; `apply_policy`, if given, the settings in force
        once a reload changed pricing, admin or upstream.defaults (without it, those
        need a restart)."""
        self.path = Path(path)
        self.current = current
        self.apply = apply
        self.apply_policy = apply_policy
        self._digest = self._read_digest()

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def check(self, *, forced: bool = False, trigger: str = "file") -> bool:
        """Reload if the file changed (or when `forced`); True if anything was applied."""
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
        try:
            live = self._live(fresh)
        except ValidationError as exc:
            # Without apply_policy: the new teams do not fit the prices or admin keys in
            # force (check-config judged them against the file's own).
            log.error(
                "config change refused: its teams need the file's pricing or admin keys, "
                "which take effect only after a restart; the config in force stays",
                extra={"problems": [f"{where}: {what}" for where, what in described(exc)]},
            )
            return False
        if live != fresh:
            log.warning(self._restart_words())
        if live == self.current:
            return False
        policy_changed = _policy(live) != _policy(self.current)
        teams_changed = live.teams != self.current.teams
        if policy_changed and self.apply_policy is not None:
            self.apply_policy(live)
        if teams_changed:
            self.apply(fresh.teams)
        self.current = live
        changed = [
            part for part, did in (("teams", teams_changed), ("policy", policy_changed)) if did
        ]
        log.info(
            " and ".join(changed) + " reloaded",
            extra={"teams": [team.name for team in fresh.teams], "trigger": trigger},
        )
        return True

    def _live(self, fresh: Settings) -> Settings:
        """The settings in force after applying what reloads of `fresh`, in one step
        (each step is validated: a team's new model needs its new price with it)."""
        if self.apply_policy is None:
            return replace(self.current, teams=fresh.teams)
        upstream = replace(self.current.upstream, defaults=fresh.upstream.defaults)
        return replace(
            self.current,
            teams=fresh.teams,
            pricing=fresh.pricing,
            admin=fresh.admin,
            upstream=upstream,
        )

    def _restart_words(self) -> str:
        if self.apply_policy is None:
            return "config changes outside 'teams' take effect only after a restart"
        return (
            "config changes outside 'teams', 'pricing', 'admin' and 'upstream.defaults' "
            "take effect only after a restart"
        )

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
