"""A lost create's job is recognised by every field its request fixed, never by prompt alone."""

from __future__ import annotations

import json

from gateway.ledger import MAX_WANT_BYTES
from gateway.matching import MAX_VALUE_CHARS, could_be, fingerprint, pick, wanted

STARTED_MS = 1_700_000_000_000
T = STARTED_MS // 1000


def job(video_id: str, **fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": video_id,
        "status": "queued",
        "created_at": T,
        "model": "sora-2",
        "size": "720x1280",
        "seconds": "4",
        "prompt": "same prompt",
        "remixed_from_video_id": None,
    }
    return {**base, **fields}


def create_want(**fields: object) -> dict[str, str]:
    return wanted("create", {"prompt": "same prompt", **fields}, None, "{}")


def test_a_create_fixes_the_fields_it_sends_and_no_prompt_in_clear():
    want = create_want(model="sora-2-pro", size="1280x720", seconds=8)
    assert want == {
        "prompt": fingerprint("same prompt"),
        "model": "sora-2-pro",
        "size": "1280x720",
        "seconds": "8",
        "source": "",
    }
    assert "same prompt" not in json.dumps(want)


def test_two_teams_with_the_same_prompt_get_each_its_own_job():
    """The swap of issue 11: the listing holds both jobs, same prompt, same second."""
    alpha = create_want(model="sora-2", size="720x1280", seconds="4")
    beta = create_want(model="sora-2-pro", size="1280x720", seconds="8")
    jobs = [
        job("video_beta", model="sora-2-pro", size="1280x720", seconds="8"),
        job("video_alpha"),
    ]  # newest first, as upstream lists them; one created_at second for both
    assert pick(alpha, STARTED_MS, jobs)["id"] == "video_alpha"
    assert pick(beta, STARTED_MS, jobs)["id"] == "video_beta"


def test_a_job_whose_echo_contradicts_the_request_is_never_taken():
    want = create_want(model="sora-2", size="720x1280", seconds="4")
    for contradiction in (
        {"prompt": "another prompt"},
        {"model": "sora-2-pro"},
        {"size": "1280x720"},
        {"seconds": "8"},
        {"remixed_from_video_id": "video_src"},  # a remix is not this create's job
    ):
        assert pick(want, STARTED_MS, [job("video_x", **contradiction)]) is None, contradiction


def test_an_omitted_field_matches_whatever_upstream_chose():
    want = create_want()
    assert could_be(want, job("video_x", model="sora-2-pro", size="1792x1024", seconds="12"))


def test_a_dated_model_snapshot_is_the_model_asked_for_but_another_model_is_not():
    want = create_want(model="sora-2")
    assert could_be(want, job("video_x", model="sora-2-2025-10-06"))
    assert not could_be(want, job("video_x", model="sora-2-pro"))


def test_seconds_as_a_number_or_a_string_are_the_same():
    assert could_be(create_want(seconds=8), job("video_x", seconds=8))
    assert could_be(create_want(seconds="8"), job("video_x", seconds=8))


def test_a_remix_fixes_its_source_and_inherits_the_sources_fields():
    source = json.dumps(
        {"id": "video_src", "model": "sora-2-pro", "size": "1280x720", "seconds": "8"}
    )
    want = wanted("remix", {"prompt": "same prompt"}, "video_src", source)
    assert want["source"] == "video_src"
    assert want["size"] == "1280x720"
    remix = job(
        "video_r",
        model="sora-2-pro",
        size="1280x720",
        seconds="8",
        remixed_from_video_id="video_src",
    )
    assert could_be(want, remix)
    assert not could_be(want, {**remix, "remixed_from_video_id": "video_other"})
    assert not could_be(want, {**remix, "remixed_from_video_id": None})
    assert not could_be(want, {**remix, "size": "720x1280"})


def test_an_extension_does_not_fix_the_stitched_seconds():
    source = json.dumps({"id": "video_src", "model": "sora-2", "size": "720x1280", "seconds": "8"})
    want = wanted("extension", {"prompt": "same prompt", "seconds": "4"}, "video_src", source)
    assert "seconds" not in want
    assert "source" not in want
    assert could_be(want, job("video_e", seconds="12"))


def test_without_an_echoed_prompt_only_a_running_job_that_agrees_is_taken():
    want = create_want(size="1280x720")
    quiet = {k: v for k, v in job("video_q", size="1280x720").items() if k != "prompt"}
    assert pick(want, STARTED_MS, [quiet])["id"] == "video_q"
    assert pick(want, STARTED_MS, [{**quiet, "size": "720x1280"}]) is None
    assert pick(want, STARTED_MS, [{**quiet, "status": "completed"}]) is None


def test_a_job_echoing_the_prompt_is_preferred_and_too_old_a_job_is_not_taken():
    want = create_want()
    quiet = {k: v for k, v in job("video_q", created_at=T - 5).items() if k != "prompt"}
    assert pick(want, STARTED_MS, [quiet, job("video_p")])["id"] == "video_p"
    assert pick(want, STARTED_MS, [job("video_old", created_at=T - 3600)]) is None


def test_every_value_kept_for_the_ledger_is_bounded_and_still_matches_only_itself():
    """A source's upstream answer is not checked like a request: a megabyte `model` or
    `size` in it must not reach the slot record, yet must still tell jobs apart."""
    huge = "m" * 1_000_000
    source = json.dumps({"id": "video_src", "model": huge, "size": "é" * 100, "seconds": 9e99})
    for kind in ("remix", "edit", "extension"):
        want = wanted(kind, {"prompt": "p" * 32_000}, "video_src", source)
        assert all(len(value) <= MAX_VALUE_CHARS and value.isascii() for value in want.values())
        assert len(json.dumps(want)) < MAX_WANT_BYTES, kind
        echo = job("video_x", prompt="p" * 32_000, model=huge, size="é" * 100)
        echo.pop("seconds")
        echo["remixed_from_video_id"] = "video_src" if kind == "remix" else None
        assert could_be(want, echo), kind
        assert not could_be(want, {**echo, "model": huge + "n"}), kind
        assert not could_be(want, {**echo, "size": "è" * 100}), kind


def test_an_edit_or_remix_by_id_fixes_the_fields_its_request_sent():
    """Finding (a): the request's own fields win over the source's; an extension's
    `seconds` is the length added, and a field the route does not take is left open."""
    source = json.dumps({"id": "video_src", "model": "sora-2", "size": "720x1280", "seconds": "4"})
    edit = wanted("edit", {"prompt": "same prompt", "seconds": "8"}, "video_src", source)
    assert edit["seconds"] == "8"
    assert could_be(edit, job("video_e", seconds="8"))
    assert not could_be(edit, job("video_e", seconds="4"))
    upload = wanted("edit", {"prompt": "same prompt", "seconds": "12"}, None, "{}")
    assert upload["seconds"] == "12"
    extension = wanted("extension", {"prompt": "same prompt", "seconds": "8"}, "video_src", source)
    assert "seconds" not in extension
    # A remix takes only a prompt: a size it sends may or may not be used upstream.
    remix = wanted("remix", {"prompt": "same prompt", "size": "1280x720"}, "video_src", source)
    assert "size" not in remix
    assert remix["model"] == "sora-2"
    same = wanted("remix", {"prompt": "same prompt", "size": "720x1280"}, "video_src", source)
    assert same["size"] == "720x1280"


def test_seconds_with_a_leading_zero_are_the_same_seconds():
    """Finding (c): "08" passes the syntax check, and upstream echoes 8."""
    want = create_want(seconds="08")
    assert want["seconds"] == "8"
    assert could_be(want, job("video_x", seconds=8))
    assert could_be(want, job("video_x", seconds="8"))
    assert not could_be(want, job("video_x", seconds="80"))
    assert not could_be(want, job("video_x", seconds="9" * 5000))  # no int() of it


def test_a_slot_that_does_not_know_its_prompt_is_never_handed_a_job():
    """Finding (b): a record re-created by bind has no `want`; it contradicts nothing,
    so any unclaimed job (another team's, say) would otherwise be taken."""
    quiet = {k: v for k, v in job("video_q").items() if k != "prompt"}
    assert pick({}, STARTED_MS, [job("video_p")]) is None
    assert pick({}, STARTED_MS, [quiet]) is None
    assert pick({"size": "720x1280"}, STARTED_MS, [quiet, job("video_p")]) is None


def test_without_an_echoed_prompt_only_an_unambiguous_job_is_taken():
    """Finding (b): on an upstream that does not echo prompts, a job goes to a slot only
    if it echoes every other field the request fixed, is the only one that fits, and
    no other team's pending slot could be its request."""
    want = create_want(model="sora-2", size="720x1280")
    quiet = {k: v for k, v in job("video_q").items() if k != "prompt"}
    other = {**quiet, "id": "video_r"}
    assert pick(want, STARTED_MS, [quiet])["id"] == "video_q"
    assert pick(want, STARTED_MS, [quiet, other]) is None  # two could be it
    assert pick(want, STARTED_MS, [{k: v for k, v in quiet.items() if k != "size"}]) is None
    rival = create_want()  # another team's lost create, with nothing but a prompt
    assert pick(want, STARTED_MS, [quiet], [rival]) is None
    unlike = create_want(size="1280x720")  # a rival whose request it cannot be
    assert pick(want, STARTED_MS, [quiet], [unlike])["id"] == "video_q"
    # A job that echoes the prompt is evidence enough: rivals do not matter then.
    assert pick(want, STARTED_MS, [job("video_p")], [rival])["id"] == "video_p"
