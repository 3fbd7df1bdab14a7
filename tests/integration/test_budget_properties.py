"""The budget scripts, driven at random on a real server against a model of the money.

The machine plays three replicas admitting jobs of several teams, each job with a charge
(model, size, seconds, price, and the UTC day and month it was checked on), through the
ledger's acquire; jobs are bound or not, and settled through the ledger's release with
any outcome, sometimes by three replicas at once, sometimes again after they were
settled; the days roll over (a month end among them) while jobs run. After every step,
for every team and every day and month the store holds: spent + reserved never passes
the budget, reserved is exactly what the open jobs reserved, spent and the per-model
figures are exactly what the settled jobs were charged, and each job is counted once
(CONTRACT §9). A completed job is charged here at most its reserved seconds, so spent +
reserved stays within the budget by construction of the scripts, not of the test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.budgets import Charge, Limits, read_totals
from gateway.embedded_store import EmbeddedRedis
from gateway.ledger import SlotLedger
from gateway.store import HOLDERS, USAGE_PREFIX, usage_day_key, usage_month_key
from gateway.store_clients import connect

LIMIT = 4  # the shared slots: enough that budgets, not slots, refuse most jobs
REPLICAS = ("r1", "r2", "r3")
# µUSD. alpha: a day budget of $2; beta: a month budget of $5; gamma: both, tight;
# free: none at all (its jobs are still counted).
LIMITS: dict[str, Limits | None] = {
    "alpha": Limits(day_micro=2_000_000, month_micro=None),
    "beta": Limits(day_micro=None, month_micro=5_000_000),
    "gamma": Limits(day_micro=1_500_000, month_micro=3_000_000),
    "free": None,
}
TEAMS = tuple(LIMITS)
# (model, size) -> µUSD per second; (None, None): a job whose model is not known.
PRICES: dict[tuple[str | None, str | None], int] = {
    ("sora-2", "720x1280"): 100_000,
    ("sora-2", "1280x720"): 100_000,
    ("sora-2-pro", "1280x720"): 300_000,
    ("sora-2-pro", "1792x1024"): 500_000,
    (None, None): 100_000,
}
SECONDS = (4, 8, 12)
FREE_OF_CHARGE = ("failed", "cancelled", "refused", "never_started")
AS_RESERVED = ("deleted", "vanished", "lease_expired")
OUTCOMES = ("completed", *FREE_OF_CHARGE, *AS_RESERVED)
FIRST_DAY = dt.date(2026, 1, 29)  # a few steps before a month ends


@dataclass
class Job:
    team: str
    charge: Charge
    video: str = ""  # upstream's id once bound


@dataclass(frozen=True)
class Settled:
    job: Job
    outcome: str
    charged_s: int

    @property
    def charged(self) -> int:
        return self.charged_s * self.job.charge.price_micro


def charged_seconds(charge: Charge, outcome: str, result_s: int | None) -> int:
    """CONTRACT §9's settlement: a completed job pays its result's seconds (the reserved
    ones when the result says none), a job that never ran or failed nothing, one that
    may have run upstream what it reserved."""
    if outcome == "completed":
        return charge.seconds if result_s is None else result_s
    return charge.seconds if outcome in AS_RESERVED else 0


class BudgetMachine(RuleBasedStateMachine):
    """Model: `open` = admitted jobs not settled; `settled` = each settled job, once."""

    store_url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.sync = redis.Redis.from_url(self.store_url, decode_responses=True)
        self.sync.flushall()
        self.client = connect(self.store_url)
        self.ledgers = {
            name: SlotLedger(self.client, limit=LIMIT, team_caps={}, owner=name, lease_s=60)
            for name in REPLICAS
        }
        self.today = FIRST_DAY
        self.open: dict[str, Job] = {}
        self.settled: dict[str, Settled] = {}
        self.made = 0  # ids are numbered, so a replayed example draws the same jobs

    def run(self, coro):  # a tiny bridge to the async ledger
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()
        self.sync.close()

    # -- admission ----------------------------------------------------------------------

    @rule(
        team=st.sampled_from(TEAMS),
        priced=st.sampled_from(sorted(PRICES, key=str)),
        seconds=st.sampled_from(SECONDS),
        replica=st.sampled_from(REPLICAS),
    )
    def job_arrives(
        self,
        team: str,
        priced: tuple[str | None, str | None],
        seconds: int,
        replica: str,
    ) -> None:
        model, size = priced
        day = self.today.isoformat()
        charge = Charge(model, size, seconds, PRICES[priced], day=day, month=day[:7])
        passed = self._would_pass(team, charge)
        full = len(self.open) >= LIMIT
        slot = self._new_id("slot")
        ledger = self.ledgers[replica]
        admission = self.run(
            ledger.try_acquire(slot, team, "create", {}, charge=charge, limits=LIMITS[team])
        )
        event(f"admission: {admission.reason or 'admitted'}")
        if admission.admitted:
            assert not passed, f"admitted past its {passed} budget: {charge}"
            assert not full, "admitted beyond the shared limit"
            self.open[slot] = Job(team, charge)
            return
        self.run(ledger.abandon(slot))
        if not passed:
            assert admission.reason == "global_limit", f"refused: {admission}"
            assert full, f"refused with free slots: {admission}"
        elif full:  # both refusals apply; either reason is right
            assert admission.reason in ("budget_exceeded", "global_limit"), admission
        else:
            assert admission.reason == "budget_exceeded", admission
        if admission.reason == "budget_exceeded":
            self._check_over(team, charge, passed, admission)

    def _would_pass(self, team: str, charge: Charge) -> set[str]:
        """The periods ('day', 'month') whose budget this charge would pass, by the model."""
        limits = LIMITS[team]
        if limits is None:
            return set()
        passed = set()
        for period, limit in (("day", limits.day_micro), ("month", limits.month_micro)):
            spent, reserved = self._expected(team, charge.day if period == "day" else charge.month)
            if limit is not None and spent + reserved + charge.cost_micro > limit:
                passed.add(period)
        return passed

    def _check_over(self, team: str, charge: Charge, passed: set[str], admission: Any) -> None:
        """The refusal names a budget passed, and what is spent and reserved in it (the
        429's message is built from these)."""
        over = admission.over
        assert over is not None, admission
        assert over.period in passed, (admission, passed)
        limits = LIMITS[team]
        assert limits is not None
        limit = limits.day_micro if over.period == "day" else limits.month_micro
        spent, reserved = self._expected(team, charge.day if over.period == "day" else charge.month)
        assert (over.limit_micro, over.spent_micro, over.reserved_micro) == (
            limit,
            spent,
            reserved,
        ), over

    @precondition(lambda self: any(not job.video for job in self.open.values()))
    @rule(data=st.data(), replica=st.sampled_from(REPLICAS))
    def create_answered(self, data: st.DataObject, replica: str) -> None:
        slot = data.draw(st.sampled_from(sorted(s for s, j in self.open.items() if not j.video)))
        job = self.open[slot]
        job.video = self._new_id("video")
        self.run(self.ledgers[replica].bind(slot, job.video, team=job.team, kind="create"))

    # -- settlement ---------------------------------------------------------------------

    @precondition(lambda self: self.open)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(OUTCOMES),
        replica=st.sampled_from(REPLICAS),
        by_video=st.booleans(),
    )
    def job_ends(self, data: st.DataObject, outcome: str, replica: str, by_video: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(self.open)))
        job = self.open[slot]
        result_s = self._result_seconds(data, job, outcome)
        ledger = self.ledgers[replica]
        if by_video and job.video:
            freed = self.run(ledger.release(video_id=job.video, outcome=outcome, seconds=result_s))
        else:
            freed = self.run(ledger.release(slot, outcome=outcome, seconds=result_s))
        assert freed is not None, "the only release of an open job freed nothing"
        self._settle(slot, outcome, result_s, freed)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), outcomes=st.lists(st.sampled_from(OUTCOMES), min_size=3, max_size=3))
    def three_replicas_see_the_end_at_once(self, data: st.DataObject, outcomes: list[str]) -> None:
        """The same end seen by every replica (and a client's retrieve) at the same
        moment, each with its own idea of the outcome: one of them settles."""
        slot = data.draw(st.sampled_from(sorted(self.open)))
        job = self.open[slot]
        seconds = [self._result_seconds(data, job, outcome) for outcome in outcomes]

        async def race():
            return await asyncio.gather(
                *(
                    self.ledgers[replica].release(slot, outcome=outcome, seconds=result_s)
                    for replica, outcome, result_s in zip(REPLICAS, outcomes, seconds, strict=True)
                )
            )

        freed = self.run(race())
        winners = [i for i, release in enumerate(freed) if release is not None]
        assert len(winners) == 1, f"{len(winners)} releases freed one job: {freed}"
        (winner,) = winners
        self._settle(slot, outcomes[winner], seconds[winner], freed[winner])

    @precondition(lambda self: self.settled)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(OUTCOMES),
        replica=st.sampled_from(REPLICAS),
        seconds=st.sampled_from((None, *SECONDS)),
    )
    def a_settled_job_is_seen_ending_again(
        self, data: st.DataObject, outcome: str, replica: str, seconds: int | None
    ) -> None:
        """A late observer (a tracker, a retrieve, a delete): settles nothing."""
        slot = data.draw(st.sampled_from(sorted(self.settled)))
        video = self.settled[slot].job.video
        ledger = self.ledgers[replica]
        again = self.run(ledger.release(slot, outcome=outcome, seconds=seconds))
        assert again is None, "a settled job was settled again"
        if video:
            again = self.run(ledger.release(video_id=video, outcome=outcome, seconds=seconds))
            assert again is None, "a settled job was settled again by its video id"

    def _result_seconds(self, data: st.DataObject, job: Job, outcome: str) -> int | None:
        """What a completed result says: nothing, or at most the seconds reserved."""
        if outcome != "completed":
            return None
        return data.draw(st.one_of(st.none(), st.integers(1, job.charge.seconds)))

    def _settle(self, slot: str, outcome: str, result_s: int | None, freed: Any) -> None:
        job = self.open.pop(slot)
        event(f"settled: {outcome}{' across days' if job.charge.day != str(self.today) else ''}")
        settled = Settled(job, outcome, charged_seconds(job.charge, outcome, result_s))
        self.settled[slot] = settled
        assert (freed.team, freed.charged_micro, freed.charged_s) == (
            job.team,
            settled.charged,
            settled.charged_s,
        ), (freed, settled)

    # -- the clock ----------------------------------------------------------------------

    @rule(days=st.integers(1, 3))
    def days_roll_over(self, days: int) -> None:
        """Open jobs keep the day they were checked on: they settle there."""
        self.today += dt.timedelta(days=days)

    @rule(team=st.sampled_from(TEAMS), back=st.integers(0, 4))
    def totals_are_read(self, team: str, back: int) -> None:
        """`read_totals`, what the routes and the 429's message read, agrees."""
        day = (self.today - dt.timedelta(days=back)).isoformat()
        totals = self.run(read_totals(self.client, team, day, day[:7]))
        assert (totals.day_spent, totals.day_reserved) == self._expected(team, day)
        assert (totals.month_spent, totals.month_reserved) == self._expected(team, day[:7])

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def within_every_budget(self) -> None:
        for (team, period), fields in self._usage().items():
            limits = LIMITS[team]
            if limits is None:
                continue
            limit = limits.day_micro if len(period) == 10 else limits.month_micro
            if limit is not None:
                used = _int(fields, "spent") + _int(fields, "reserved")
                assert used <= limit, f"{team} {period}: {used} > {limit}"

    @invariant()
    def spent_and_reserved_are_the_jobs_own(self) -> None:
        usage = self._usage()
        expected_keys = {
            (job.team, period)
            for job in [*self.open.values(), *(s.job for s in self.settled.values())]
            for period in (job.charge.day, job.charge.month)
        }
        for team, period in expected_keys | set(usage):
            fields = usage.get((team, period), {})
            got = (_int(fields, "spent"), _int(fields, "reserved"))
            assert got == self._expected(team, period), f"{team} {period}: {fields}"

    @invariant()
    def each_job_counted_once_by_model_and_outcome(self) -> None:
        counted: Counter[tuple[str, str, str, str]] = Counter()
        cost: Counter[tuple[str, str, str]] = Counter()
        seconds: Counter[tuple[str, str, str]] = Counter()
        for (team, period), fields in self._usage().items():
            if len(period) != 10:
                continue
            for name, value in fields.items():
                parts = name.split("|")
                if len(parts) == 3 and parts[1] == "jobs":
                    counted[team, period, parts[0], parts[2]] += int(value)
                elif len(parts) == 2 and parts[1] == "cost":
                    cost[team, period, parts[0]] += int(value)
                elif len(parts) == 2 and parts[1] == "seconds":
                    seconds[team, period, parts[0]] += int(value)
        expected_counts: Counter[tuple[str, str, str, str]] = Counter()
        expected_cost: Counter[tuple[str, str, str]] = Counter()
        expected_seconds: Counter[tuple[str, str, str]] = Counter()
        for settled in self.settled.values():
            charge = settled.job.charge
            where = (settled.job.team, charge.day, charge.model or "unknown")
            expected_counts[(*where, settled.outcome)] += 1
            expected_cost[where] += settled.charged
            expected_seconds[where] += settled.charged_s
        assert +counted == +expected_counts
        assert +cost == +expected_cost
        assert +seconds == +expected_seconds
        assert sum(counted.values()) == len(self.settled)

    @invariant()
    def open_jobs_hold_the_slots(self) -> None:
        assert set(self.sync.zrange(HOLDERS, 0, -1)) == set(self.open)

    @invariant()
    def usage_is_kept_for_a_while_not_for_ever(self) -> None:
        for key in self.sync.scan_iter(match=USAGE_PREFIX + "*"):
            assert self.sync.ttl(key) > 0, f"{key} never expires"

    # -- helpers ------------------------------------------------------------------------

    def _new_id(self, kind: str) -> str:
        self.made += 1
        return f"{kind}_{self.made:05d}"

    def _expected(self, team: str, period: str) -> tuple[int, int]:
        """(spent, reserved) µUSD of `team` in a day or a month, by the model."""

        def of(job: Job) -> bool:
            return job.team == team and period in (job.charge.day, job.charge.month)

        spent = sum(s.charged for s in self.settled.values() if of(s.job))
        reserved = sum(job.charge.cost_micro for job in self.open.values() if of(job))
        return spent, reserved

    def _usage(self) -> dict[tuple[str, str], dict[str, str]]:
        """Every usage hash in the store, by (team, day or month)."""
        found = {}
        for key in self.sync.scan_iter(match=USAGE_PREFIX + "*"):
            team, period = key[len(USAGE_PREFIX) :].rsplit(":", 1)
            assert key in (usage_day_key(team, period), usage_month_key(team, period))
            found[team, period] = self.sync.hgetall(key)
        return found


def _int(fields: dict[str, str], name: str) -> int:
    return int(fields.get(name) or 0)


def test_budgets_hold_and_each_job_is_settled_once(private_store: EmbeddedRedis) -> None:
    BudgetMachine.store_url = private_store.url
    machine_test = BudgetMachine.TestCase
    machine_test.settings = settings(
        max_examples=60,
        stateful_step_count=50,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    machine_test().runTest()
