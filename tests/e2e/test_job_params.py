"""A malformed `size` or `seconds` is refused before it waits for a slot (CONTRACT §9).

With both shared slots held by long jobs, a job-creating request would wait up to
`quota.wait_s` (20 s here) for one; a malformed one must be answered at once instead,
with nothing sent upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from support.api import assert_error, create, multipart
from support.simulator import UpstreamWatch, sim_config, sim_control

# Far below the 20 s a request would wait for a slot: an answer within it did not wait.
ANSWER_WITHIN_S = 5.0
CLIP = ("clip.mp4", b"\x00\x00\x00\x18ftypmp42", "video/mp4")


@pytest.fixture
def both_slots_busy(stack: Any) -> Iterator[Any]:
    before = sim_control(stack).get("/_sim/config").json()
    sim_config(stack, queue_s=0, run_s=60)
    with stack.client("alpha") as client:
        jobs = [create(client, f"a very long take {n}")["id"] for n in range(2)]
        try:
            yield stack
        finally:
            for video_id in jobs:  # a delete frees a running job's slot at once
                client.delete(f"/v1/videos/{video_id}")
            keys = ("queue_s", "run_s")
            sim_config(stack, **{key: before[key] for key in keys})


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/videos", {"json": {"prompt": "tiny", "size": "10x10x"}}, "size"),
        ("/v1/videos", multipart({"prompt": "tiny", "size": "10x"}), "size"),
        ("/v1/videos", {"json": {"prompt": "long", "seconds": 601}}, "seconds"),
        ("/v1/videos", multipart({"prompt": "none", "seconds": "0"}), "seconds"),
        (
            "/v1/videos/extensions",
            multipart({"prompt": "more", "seconds": "4.5"}, {"video": CLIP}),
            "seconds",
        ),
    ],
    ids=["json size", "form size", "json seconds", "form seconds", "extension seconds"],
)
def test_a_malformed_size_or_seconds_is_refused_at_once_with_both_slots_busy(
    both_slots_busy, path, body, param
):
    watch = UpstreamWatch(both_slots_busy)
    with both_slots_busy.client("beta", timeout=ANSWER_WITHIN_S) as client:
        reply = client.post(path, **body)
    assert_error(reply, 400, "invalid_request", param)
    # The tracker polls the two long jobs meanwhile: GETs only, and no job made.
    sent = [(r["method"], r["path"]) for r in watch.new_requests()]
    assert [s for s in sent if s[0] != "GET"] == [], sent
    assert both_slots_busy.sim_stats()["jobs_created"] == watch.jobs_before


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/videos", {"json": {"prompt": "big", "model": "m" * 500_000}}),
        ("/v1/videos", multipart({"prompt": "big", "model": "m" * 200_000})),
        ("/v1/videos", {"json": {"prompt": "odd", "model": "sora 2"}}),
        ("/v1/videos", {"json": {"prompt": "odd", "model": 2}}),
        ("/v1/videos/extensions", multipart({"prompt": "odd", "model": "sóra"}, {"video": CLIP})),
    ],
    ids=["json long", "form long", "space", "number", "extension non-ascii"],
)
def test_a_long_or_odd_model_is_refused_at_once_with_both_slots_busy(both_slots_busy, path, body):
    """A model is kept in the slot ledger with what the request fixed, and re-sent on
    every retry of a wait: a megabyte one must never get that far."""
    watch = UpstreamWatch(both_slots_busy)
    with both_slots_busy.client("beta", timeout=ANSWER_WITHIN_S) as client:
        reply = client.post(path, **body)
    assert_error(reply, 400, "invalid_request", "model")
    sent = [(r["method"], r["path"]) for r in watch.new_requests()]
    assert [s for s in sent if s[0] != "GET"] == [], sent
    assert both_slots_busy.sim_stats()["jobs_created"] == watch.jobs_before
