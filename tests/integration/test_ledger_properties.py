"""The slot ledger's scripts, driven at random on a real server against a model of upstream.

The machine plays three replicas and an upstream account. Requests are admitted,
answered, refused or lose their answer; upstream jobs end; replicas crash, stall past
their lease, are adopted from, and settle lost creates the way the tracker does. After
every step the ledger must count at least every job running upstream, and never admit
beyond the shared limit or a team's cap.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from gateway.embedded_store import EmbeddedRedis
from gateway.ledger import SlotLedger
from gateway.store import HOLDERS, JOBS, SLOTS
from gateway.store_clients import connect

LIMIT = 2
CAPS = {"capped": 1}
TEAMS = ("alpha", "beta", "capped")
REPLICAS = ("r1", "r2", "r3")


class LedgerMachine(RuleBasedStateMachine):
    """Model: `running` = jobs alive upstream; `requests` = creates still in flight."""

    store_url: str = ""

    requests = Bundle("requests")
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.sync = redis.Redis.from_url(self.store_url, decode_responses=True)
        self.sync.flushall()
        self.client = connect(self.store_url)
        self.ledgers = {
            name: SlotLedger(self.client, limit=LIMIT, team_caps=CAPS, owner=name, lease_s=60)
            for name in REPLICAS
        }
        self.alive = set(REPLICAS)
        self.running: dict[str, str] = {}  # video id -> team, jobs running upstream
        self.lost: dict[str, str | None] = {}  # slot of a lost answer -> its job, if any
        self.in_flight: dict[str, tuple[str, str]] = {}  # slot -> (replica, team)

    def run(self, coro):  # a tiny bridge to the async ledger
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()
        self.sync.close()

    # -- requests ---------------------------------------------------------------------

    @rule(
        target=requests,
        replica=st.sampled_from(REPLICAS),
        team=st.sampled_from(TEAMS),
    )
    def request_arrives(self, replica: str, team: str) -> tuple[str, str, str] | None:
        if replica not in self.alive:
            return None
        slot = f"slot_{uuid.uuid4().hex[:8]}"
        admission = self.run(self.ledgers[replica].try_acquire(slot, team, "create", {}))
        if not admission.admitted:
            self.run(self.ledgers[replica].abandon(slot))
            return None
        self.in_flight[slot] = (replica, team)
        return (replica, slot, team)

    @rule(target=jobs, request=consumes(requests))
    def create_answered(self, request: tuple[str, str, str] | None) -> str | None:
        if request is None or request[0] not in self.alive:
            return None
        replica, slot, team = request
        del self.in_flight[slot]
        video = f"video_{uuid.uuid4().hex[:8]}"
        self.running[video] = team
        self.run(self.ledgers[replica].bind(slot, video, team=team, kind="create"))
        return video

    @rule(request=consumes(requests))
    def create_refused(self, request: tuple[str, str, str] | None) -> None:
        if request is None or request[0] not in self.alive:
            return
        del self.in_flight[request[1]]
        self.run(self.ledgers[request[0]].release(request[1]))

    @rule(target=jobs, request=consumes(requests), job_exists=st.booleans())
    def answer_lost(self, request: tuple[str, str, str] | None, job_exists: bool) -> str | None:
        """A timeout or 5xx: upstream may or may not have started the job."""
        if request is None or request[0] not in self.alive:
            return None
        replica, slot, team = request
        del self.in_flight[slot]
        video = self._maybe_started(slot, team, job_exists)
        self.run(self.ledgers[replica].mark_unknown(slot))
        return video

    # -- upstream and observers -------------------------------------------------------

    @rule(video=consumes(jobs), observer=st.sampled_from(REPLICAS))
    def job_ends_and_is_seen(self, video: str | None, observer: str) -> None:
        if video is None or video not in self.running:
            return
        del self.running[video]
        self.run(self.ledgers[observer].release(video_id=video))
        again = self.run(self.ledgers[observer].release(video_id=video))
        assert again is None, "a job's end must be counted once"
        assert video not in self._counted_videos()

    @rule(replica=st.sampled_from(REPLICAS))
    def tracker_settles_lost_creates(self, replica: str) -> None:
        """What the tracker does for `unknown` slots it owns: bind the job or release."""
        if replica not in self.alive:
            return
        for slot, record in self._slots().items():
            if record["owner"] != replica or record["state"] != "unknown":
                continue
            video = self.lost.pop(slot, None)
            if video is not None and video in self.running:
                self.run(
                    self.ledgers[replica].bind(slot, video, team=record["team"], kind="create")
                )
            else:  # never started, or already over: nothing runs for this slot
                self.run(self.ledgers[replica].release(slot))

    # -- replicas ---------------------------------------------------------------------

    @precondition(lambda self: len(self.alive) > 1)
    @rule(target=jobs, replica=st.sampled_from(REPLICAS), data=st.data())
    def replica_crashes(self, replica: str, data: st.DataObject) -> object:
        """Its creates in flight die with it, each having reached upstream or not."""
        if replica not in self.alive:
            return multiple()
        self.alive.discard(replica)
        self._expire_leases(replica)
        videos = []
        for slot, (owner, team) in list(self.in_flight.items()):
            if owner == replica:
                del self.in_flight[slot]
                video = self._maybe_started(slot, team, data.draw(st.booleans()))
                if video is not None:
                    videos.append(video)
        return multiple(*videos)

    @rule(replica=st.sampled_from(REPLICAS))
    def replica_stalls_past_its_lease(self, replica: str) -> None:
        """It stays alive, but its leases ran out while it was paused."""
        self._expire_leases(replica)

    @rule(adopter=st.sampled_from(REPLICAS))
    def adopt_expired(self, adopter: str) -> None:
        if adopter not in self.alive:
            return
        for slot in self.sync.zrangebyscore(HOLDERS, "-inf", 1):
            self.run(self.ledgers[adopter].adopt(slot))
            record = self._slots().get(slot)
            assert record is not None, "expiry alone must never free a slot"
            assert record["owner"] == adopter
            assert record["state"] != "reserved", "a dead request's slot must become unknown"

    @rule(replica=st.sampled_from(REPLICAS))
    def old_owner_renews(self, replica: str) -> None:
        """A stalled replica waking up must not renew slots another replica adopted."""
        for slot, record in self._slots().items():
            renewed = self.run(self.ledgers[replica].renew(slot))
            assert renewed == (record["owner"] == replica)

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def within_the_shared_limit(self) -> None:
        assert self.sync.zcard(HOLDERS) <= LIMIT

    @invariant()
    def within_team_caps(self) -> None:
        per_team: dict[str, int] = {}
        for record in self._slots().values():
            per_team[record["team"]] = per_team.get(record["team"], 0) + 1
        for team, cap in CAPS.items():
            assert per_team.get(team, 0) <= cap

    @invariant()
    def every_running_job_is_counted(self) -> None:
        counted = self._counted_videos()
        pending = sum(
            1 for record in self._slots().values() if record["state"] in ("unknown", "reserved")
        )
        uncounted = [video for video in self.running if video not in counted]
        # A job whose create answer was lost is counted by its `unknown` slot until found.
        assert len(uncounted) <= pending, f"running upstream but counted by no slot: {uncounted}"
        assert len(self.running) <= LIMIT, "upstream ran more jobs than the shared limit"

    @invariant()
    def every_holder_has_a_record(self) -> None:
        assert set(self.sync.zrange(HOLDERS, 0, -1)) == set(self._slots())

    # -- helpers ----------------------------------------------------------------------

    def _slots(self) -> dict[str, dict[str, object]]:
        return {slot: json.loads(raw) for slot, raw in self.sync.hgetall(SLOTS).items()}

    def _counted_videos(self) -> set[str]:
        holders = set(self.sync.zrange(HOLDERS, 0, -1))
        return {video for video, slot in self.sync.hgetall(JOBS).items() if slot in holders}

    def _maybe_started(self, slot: str, team: str, started: bool) -> str | None:
        video = f"video_{uuid.uuid4().hex[:8]}" if started else None
        if video is not None:
            self.running[video] = team
        self.lost[slot] = video
        return video

    def _expire_leases(self, replica: str) -> None:
        for slot, record in self._slots().items():
            if record["owner"] == replica:
                self.sync.zadd(HOLDERS, {slot: 0}, xx=True)


def test_ledger_keeps_every_running_job_counted(private_store: EmbeddedRedis) -> None:
    LedgerMachine.store_url = private_store.url
    machine_test = LedgerMachine.TestCase
    machine_test.settings = settings(
        max_examples=60,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    machine_test().runTest()
