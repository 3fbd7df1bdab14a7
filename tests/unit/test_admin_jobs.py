"""`/admin/jobs`' list, from slots and queued jobs: running first, then by queue position."""

from __future__ import annotations

from gateway.admin_jobs import JobTerms, QueuedJob, jobs_list, terms_of
from gateway.budgets import Charge
from gateway.ledger import Slot

CHARGE = Charge("sora-2-pro", "1280x720", 8, 300_000, "2026-12-01", "2026-12")


def slot(slot_id: str, started_ms: int, **fields: object) -> Slot:
    values: dict[str, object] = {
        "id": slot_id,
        "team": "alpha",
        "state": "bound",
        "video": f"video_up_{slot_id}",
        "owner": "replica",
        "started_ms": started_ms,
        "kind": "create",
        "want": {"prompt": "0123456789abcdef", "model": "sora-2"},
        "deadline_ms": started_ms + 30_000,
    }
    values.update(fields)
    return Slot(**values)  # type: ignore[arg-type]


def test_a_running_job_shows_its_charge_and_the_clients_id():
    listed = jobs_list([slot("s1", 1_700_000_000_500, gid="video_gw", charge=CHARGE)], [], {})
    assert listed == {
        "object": "list",
        "data": [
            {
                "id": "video_gw",  # the gateway's id of a job that was queued first
                "team": "alpha",
                "kind": "create",
                "state": "running",
                "model": "sora-2-pro",
                "size": "1280x720",
                "seconds": 8,
                "queued_at": None,
                "started_at": 1_700_000_000,
                "queue_position": None,
            }
        ],
    }


def test_without_a_charge_the_request_says_what_it_fixed():
    (entry,) = jobs_list([slot("s1", 1000)], [], {})["data"]
    assert (entry["id"], entry["model"], entry["size"], entry["seconds"]) == (
        "video_up_s1",
        "sora-2",
        None,
        None,
    )
    assert "prompt" not in entry
    assert "0123456789abcdef" not in str(entry)


def test_a_slot_with_no_job_id_yet_is_listed_by_its_slot():
    (entry,) = jobs_list([slot("s9", 1000, video="", state="reserved")], [], {})["data"]
    assert entry["id"] == "s9"


def test_queued_jobs_follow_by_position_and_one_taken_meanwhile_is_running():
    queued = [
        QueuedJob("video_b", "beta", "remix", 2_000_000, JobTerms("sora-2", None, 4)),
        QueuedJob("video_a", "alpha", "create", 3_000_000, JobTerms()),
        QueuedJob("video_c", "alpha", "create", 1_000_000, JobTerms()),
        QueuedJob("video_gone", "alpha", "create", 1_000_000, JobTerms()),
    ]
    positions = {"video_a": 1, "video_b": 2, "video_c": 3, "video_gone": None}
    running = [slot("s2", 5000, gid="video_c"), slot("s1", 4000)]
    data = jobs_list(running, queued, positions)["data"]
    assert [(d["id"], d["state"], d["queue_position"]) for d in data] == [
        ("video_up_s1", "running", None),
        ("video_c", "running", None),
        ("video_a", "queued", 1),
        ("video_b", "queued", 2),
    ]
    assert (data[3]["queued_at"], data[3]["started_at"], data[3]["seconds"]) == (2000, None, 4)


def test_terms_prefer_the_charge_and_read_the_wants_text_seconds():
    assert terms_of({"model": "m", "seconds": 12}, {"model": "x", "size": "720x1280"}) == JobTerms(
        "m", "720x1280", 12
    )
    assert terms_of(None, {"seconds": "8"}) == JobTerms(None, None, 8)
    assert terms_of({}, {"seconds": "a digest, not seconds"}) == JobTerms()
