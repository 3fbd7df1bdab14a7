"""Config (CONTRACT §4) and the config-related commands (§5): defaults, every error named."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import logging
import math
import re
import textwrap
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from gateway.__main__ import main
from gateway.config import (
    ConfigError,
    LimitsSettings,
    QuotaSettings,
    SentinelSettings,
    Settings,
    StoreSettings,
    TeamSettings,
    UpstreamDefaults,
    UpstreamSettings,
    load_settings,
    parse_settings,
)
from gateway.reload import TeamsReloader
from gateway.simulator.jobs import DEFAULT_MODEL, DEFAULT_SECONDS, DEFAULT_SIZE, VIDEO_SIZES

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "gateway.example.yaml"
TOKEN = "sk-upstream-DO-NOT-PRINT-7f3a9c"
D1, D2, D3 = "a" * 64, "b" * 64, "c" * 64


def minimal(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstream": {"base_url": "https://api.example.com/v1", "token": TOKEN},
        "teams": [{"name": "marketing", "key_sha256": [D1]}],
    }
    config.update(overrides)
    return config


def parse(config: dict[str, Any] | str, environ: dict[str, str] | None = None):
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    return parse_settings(text, source="test.yaml", environ=environ or {})


def problems(config: dict[str, Any] | str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(config, environ)
    error = caught.value
    assert error.problems, "a ConfigError must list its problems"
    assert TOKEN not in str(error)
    assert TOKEN not in error.report()
    # The report names the file with every problem.
    assert error.report() == "\n".join(f"test.yaml: {p}" for p in error.problems)
    return error.problems


# -- the example file -----------------------------------------------------------------------


def test_the_example_config_validates_with_the_token_variable_set(monkeypatch):
    monkeypatch.setenv("SORA_UPSTREAM_TOKEN", TOKEN)
    settings = load_settings(EXAMPLE)
    assert settings.upstream.token == TOKEN
    assert settings.upstream.base_url == "https://api.example.com/v1"
    assert [team.name for team in settings.teams] == ["marketing", "research"]
    assert settings.teams[0].max_in_flight == 1
    assert settings.teams[1].max_in_flight is None
    assert (settings.teams[0].weight, settings.teams[1].weight) == (1.0, 2.0)
    assert (settings.teams[0].max_queued, settings.teams[1].max_queued) == (100, None)
    # Commented out: no model, size or length is assumed for an unknown upstream.
    assert settings.upstream.defaults == UpstreamDefaults()


def test_the_example_config_without_the_variable_names_it(monkeypatch):
    monkeypatch.delenv("SORA_UPSTREAM_TOKEN", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_settings(EXAMPLE)
    assert caught.value.problems == [
        "upstream.token: environment variable SORA_UPSTREAM_TOKEN is not set"
    ]
    assert str(EXAMPLE) in caught.value.report()


def test_env_references_are_expanded_anywhere_in_a_string():
    config = minimal()
    config["upstream"]["base_url"] = "https://${HOST}/v1"
    config["upstream"]["token"] = "${TOK}"
    config["teams"][0]["key_sha256"] = ["${DIGEST}"]
    settings = parse(config, {"HOST": "sora.example.net", "TOK": TOKEN, "DIGEST": D2})
    assert settings.upstream.base_url == "https://sora.example.net/v1"
    assert settings.upstream.token == TOKEN
    assert settings.teams[0].key_sha256 == (D2,)


def test_every_unset_variable_is_named_with_its_field():
    config = minimal()
    config["upstream"]["token"] = "${NOPE_TOKEN}"
    config["teams"][0]["key_sha256"] = ["${NOPE_DIGEST}"]
    found = problems(config)
    assert "upstream.token: environment variable NOPE_TOKEN is not set" in found
    assert "teams[0].key_sha256[0]: environment variable NOPE_DIGEST is not set" in found
    # One message per missing variable, not a second "required" for the same field.
    assert len([p for p in found if p.startswith("upstream.token")]) == 1


# -- defaults -------------------------------------------------------------------------------


def test_every_section_4_default():
    settings = parse(minimal())
    assert settings.upstream.auth_header == "authorization"
    assert settings.upstream.remix_route == "path"
    assert settings.upstream.timeout_s == 60
    assert settings.store.redis_url is None  # the embedded store is started
    assert settings.quota.max_in_flight == 2
    assert settings.quota.wait_s == 20
    assert settings.quota.max_job_s == 3600
    assert settings.tracker.poll_interval_s == 5
    assert settings.tracker.lease_s == 30
    assert settings.limits.max_body_bytes == 52428800
    assert settings.limits.max_team_upstream_calls == 112
    assert settings.teams[0].max_in_flight is None


def test_every_queue_default_of_section_8():
    settings = parse(minimal())
    assert settings.quota.when_full == "queue"
    assert settings.quota.max_queued == 500
    assert settings.quota.max_queue_s == 86400
    assert settings.quota.max_queued_body_bytes == 8388608
    assert settings.quota.fair_window_s == 3600
    assert settings.teams[0].weight == 1.0
    assert isinstance(settings.teams[0].weight, float)
    assert settings.teams[0].max_queued is None
    # No model name, size or length is assumed in code: only the config says them.
    assert settings.upstream.defaults == UpstreamDefaults(None, None, None)


def test_queue_settings_are_taken():
    quota = {
        "when_full": "wait",
        "max_queued": 7,
        "max_queue_s": 90.5,
        "max_queued_body_bytes": 1024,
        "fair_window_s": 60,
    }
    config = minimal(quota=quota)
    config["teams"][0].update(weight=2.5, max_queued=3)
    config["teams"].append({"name": "research", "key_sha256": [D2], "weight": 3})
    settings = parse(config)
    assert settings.quota == QuotaSettings(
        when_full="wait",
        max_queued=7,
        max_queue_s=90.5,
        max_queued_body_bytes=1024,
        fair_window_s=60.0,
    )
    assert (settings.teams[0].weight, settings.teams[0].max_queued) == (2.5, 3)
    assert settings.teams[1].weight == 3.0
    assert isinstance(settings.teams[1].weight, float)


@pytest.mark.parametrize(
    ("defaults", "expected"),
    [
        ({"model": "sora-2", "size": "720x1280", "seconds": "4"}, ("sora-2", "720x1280", "4")),
        # YAML's 12 is the "12" upstream's objects carry.
        ({"seconds": 12}, (None, None, "12")),
        ({"model": "org/sora-2-pro:2025-10-06"}, ("org/sora-2-pro:2025-10-06", None, None)),
        ({"size": "1792x1024", "seconds": 600}, (None, "1792x1024", "600")),
        ({}, (None, None, None)),
    ],
)
def test_upstream_defaults_are_taken(defaults, expected):
    config = minimal()
    config["upstream"]["defaults"] = defaults
    found = parse(config).upstream.defaults
    assert (found.model, found.size, found.seconds) == expected


def test_an_empty_defaults_section_means_none_assumed():
    text = yaml.safe_dump(minimal()).replace("upstream:\n", "upstream:\n  defaults:\n")
    assert parse(text).upstream.defaults == UpstreamDefaults()


def test_the_demo_and_compose_configs_default_to_the_simulator_s_own_job_fields():
    # A queued job's object must say what the simulator will make of the omitted fields.
    simulator = UpstreamDefaults(DEFAULT_MODEL, DEFAULT_SIZE, DEFAULT_SECONDS)
    demo = parse(
        (REPO / "gateway" / "demo.yaml").read_text(),
        {"SORA_DEMO_SIM_PORT": "8081", "SORA_UPSTREAM_TOKEN": TOKEN, "SORA_DEMO_KEY_SHA256": D1},
    )
    assert demo.upstream.defaults == simulator
    assert demo.quota.when_full == "queue"
    compose = parse(
        (REPO / "deploy" / "compose" / "gateway.yaml").read_text(),
        {"SORA_SIMULATOR_TOKEN": TOKEN, "SORA_TEAM_KEY_SHA256": D1},
    )
    assert compose.upstream.defaults == simulator


def test_explicit_values_are_taken():
    config = minimal(
        store={"redis_url": "redis://10.0.0.5:6380/2"},
        quota={"max_in_flight": 5, "wait_s": 0, "max_job_s": 60},
        tracker={"poll_interval_s": 0.5, "lease_s": 10},
        limits={"max_body_bytes": 1024},
    )
    config["upstream"].update(auth_header="api-key", remix_route="body", timeout_s=2.5)
    config["teams"].append({"name": "research", "key_sha256": [D2, D3], "max_in_flight": 1})
    settings = parse(config)
    assert settings.upstream.auth_header == "api-key"
    assert settings.upstream.remix_route == "body"
    assert settings.upstream.timeout_s == 2.5
    assert settings.store.redis_url == "redis://10.0.0.5:6380/2"
    assert (settings.quota.max_in_flight, settings.quota.wait_s) == (5, 0)
    assert settings.quota.max_job_s == 60
    assert (settings.tracker.poll_interval_s, settings.tracker.lease_s) == (0.5, 10)
    assert settings.limits.max_body_bytes == 1024
    assert settings.teams[1].key_sha256 == (D2, D3)
    assert settings.teams[1].max_in_flight == 1


def test_digests_are_normalised_and_a_single_string_is_accepted():
    config = minimal()
    config["teams"][0]["key_sha256"] = " " + "AB" * 32 + " "
    assert parse(config).teams[0].key_sha256 == ("ab" * 32,)


# -- required fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.pop("upstream"), "upstream: required"),
        (lambda c: c["upstream"].pop("base_url"), "upstream.base_url: required"),
        (lambda c: c["upstream"].update(base_url=""), "upstream.base_url: required"),
        (lambda c: c["upstream"].pop("token"), "upstream.token: required"),
        (lambda c: c["upstream"].update(token="   "), "upstream.token: required"),
        (lambda c: c.pop("teams"), "teams: at least one team is required"),
        (lambda c: c.update(teams=[]), "teams: at least one team is required"),
    ],
)
def test_missing_required_fields_are_named(mutate, expected):
    config = minimal()
    mutate(config)
    assert any(p.startswith(expected) for p in problems(config)), expected


def test_an_empty_or_non_mapping_file_is_refused():
    assert problems("") == ["the file must be a YAML mapping"]
    assert problems("- a\n- b\n") == ["the file must be a YAML mapping"]
    assert problems("upstream: [\n")[0].startswith("not valid YAML")


# -- each kind of error names its field path ------------------------------------------------


def with_team(index: int, **team: Any) -> dict[str, Any]:
    config = minimal()
    while len(config["teams"]) <= index:
        n = len(config["teams"])
        config["teams"].append({"name": f"team{n}", "key_sha256": [f"{n:064x}"]})
    config["teams"][index] = team
    return config


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            with_team(1, name="research", key_sha256=["abc"]),
            "teams[1].key_sha256[0]: expected 64 hex characters",
        ),
        (
            with_team(1, name="research", key_sha256=[D2, "z" * 64]),
            "teams[1].key_sha256[1]: expected 64 hex characters",
        ),
        (
            with_team(0, name="research", key_sha256=[]),
            "teams[0].key_sha256: expected a list of SHA-256 hex digests",
        ),
        (with_team(0, name="research"), "teams[0].key_sha256: expected a list"),
        (with_team(0, key_sha256=[D1]), "teams[0].name: expected 1-63 letters"),
        (with_team(0, name="has space", key_sha256=[D1]), "teams[0].name: expected 1-63"),
        (with_team(0, name="-dash", key_sha256=[D1]), "teams[0].name: expected 1-63"),
        (with_team(0, name="x" * 64, key_sha256=[D1]), "teams[0].name: expected 1-63"),
        (with_team(0, name="anonymous", key_sha256=[D1]), "teams[0].name: 'anonymous'"),
        (
            with_team(1, name="r", key_sha256=[D2], max_in_flight=0),
            "teams[1].max_in_flight: must be at least 1",
        ),
        (
            with_team(1, name="r", key_sha256=[D2], max_in_flight="two"),
            "teams[1].max_in_flight: expected a whole number",
        ),
        (minimal(teams=["marketing"]), "teams[0]: expected a mapping"),
        (minimal(teams={"marketing": D1}), "teams: at least one team is required"),
        (minimal(quota={"max_in_flight": 0}), "quota.max_in_flight: must be at least 1"),
        (minimal(quota={"max_in_flight": 1.5}), "quota.max_in_flight: expected a whole number"),
        (minimal(quota={"max_in_flight": True}), "quota.max_in_flight: expected a whole number"),
        (minimal(quota={"wait_s": -1}), "quota.wait_s: must be zero or more"),
        (minimal(quota={"wait_s": "20s"}), "quota.wait_s: expected a number"),
        (minimal(quota={"max_job_s": 0}), "quota.max_job_s: must be positive"),
        (minimal(tracker={"poll_interval_s": 0}), "tracker.poll_interval_s: must be positive"),
        (minimal(tracker={"lease_s": -5}), "tracker.lease_s: must be positive"),
        (minimal(limits={"max_body_bytes": 0}), "limits.max_body_bytes: must be at least 1"),
        (minimal(limits={"max_body_bytes": "50MB"}), "limits.max_body_bytes: expected a whole"),
        (
            minimal(limits={"max_team_upstream_calls": 128}),
            "limits.max_team_upstream_calls: must be less than the api pool's 128",
        ),
        (minimal(limits={"max_team_upstream_calls": 0}), "limits.max_team_upstream_calls: must be"),
        (minimal(store={"redis_url": "http://redis:6379"}), "store.redis_url: expected a redis"),
        (minimal(store={"data_dir": ""}), "store.data_dir: expected a directory path"),
        (minimal(quota={"when_full": "reject"}), "quota.when_full: expected one of queue, wait"),
        (minimal(quota={"when_full": True}), "quota.when_full: expected one of queue, wait"),
        (minimal(quota={"max_queued": 0}), "quota.max_queued: must be at least 1"),
        (minimal(quota={"max_queued": "500"}), "quota.max_queued: expected a whole number"),
        (minimal(quota={"max_queue_s": 0}), "quota.max_queue_s: must be positive"),
        (
            minimal(quota={"max_queue_s": 8 * 86400}),
            "quota.max_queue_s: must be at most 604800 (a week)",
        ),
        (minimal(quota={"max_queue_s": "1d"}), "quota.max_queue_s: expected a number"),
        (
            minimal(quota={"max_queued_body_bytes": 0}),
            "quota.max_queued_body_bytes: must be at least 1",
        ),
        (
            minimal(quota={"max_queued_body_bytes": "8MB"}),
            "quota.max_queued_body_bytes: expected a whole number",
        ),
        (minimal(quota={"fair_window_s": -1}), "quota.fair_window_s: must be positive"),
        (minimal(quota={"fair_window_s": "1h"}), "quota.fair_window_s: expected a number"),
        (
            with_team(1, name="r", key_sha256=[D2], weight=0),
            "teams[1].weight: must be positive",
        ),
        (
            with_team(1, name="r", key_sha256=[D2], weight=-2),
            "teams[1].weight: must be positive",
        ),
        (
            with_team(1, name="r", key_sha256=[D2], weight=math.nan),
            "teams[1].weight: must be positive",
        ),
        (
            with_team(1, name="r", key_sha256=[D2], weight=math.inf),
            "teams[1].weight: must be positive",
        ),
        (
            with_team(1, name="r", key_sha256=[D2], weight="2"),
            "teams[1].weight: expected a number, got '2'",
        ),
        (
            with_team(1, name="r", key_sha256=[D2], weight=True),
            "teams[1].weight: expected a number, got True",
        ),
        (
            with_team(1, name="r", key_sha256=[D2], max_queued=0),
            "teams[1].max_queued: must be at least 1",
        ),
        (
            with_team(1, name="r", key_sha256=[D2], max_queued=2.5),
            "teams[1].max_queued: expected a whole number, got 2.5",
        ),
        (minimal(quota=[1, 2]), "quota: expected a mapping"),
        (minimal(upstream="https://api.example.com/v1"), "upstream: expected a mapping"),
    ],
)
def test_each_error_names_its_field_path(config, expected):
    found = problems(config)
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("base_url", "api.example.com/v1", "upstream.base_url: expected an http(s) URL"),
        ("base_url", "ftp://api.example.com", "upstream.base_url: expected an http(s) URL"),
        ("timeout_s", 0, "upstream.timeout_s: must be positive"),
        ("timeout_s", "60", "upstream.timeout_s: expected a number"),
    ],
)
def test_upstream_field_errors(field, value, expected):
    config = minimal()
    config["upstream"][field] = value
    found = problems(config)
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    "where",
    [
        "upstream.timeout_s",
        "quota.wait_s",
        "quota.max_job_s",
        "quota.max_queue_s",
        "quota.fair_window_s",
        "tracker.poll_interval_s",
    ],
)
def test_nan_is_not_a_number_of_seconds(where):
    section, key = where.split(".")
    text = yaml.safe_dump(minimal()) + f"{section}:\n  {key}: .nan\n"
    if section == "upstream":
        text = yaml.safe_dump(minimal()).replace("upstream:\n", f"upstream:\n  {key}: .nan\n")
    found = problems(text)
    assert any(p.startswith(f"{where}: ") for p in found), found


MODEL_WORDS = "expected a model name: 1 to 128 letters, digits and . _ : / -"
SIZE_WORDS = "expected WIDTHxHEIGHT, such as 1280x720"
SECONDS_WORDS = "expected a whole number of seconds from 1 to 600, such as 4"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("model", "", MODEL_WORDS),
        ("model", "sora 2", MODEL_WORDS),
        ("model", "-sora", MODEL_WORDS),
        ("model", "m" * 129, MODEL_WORDS),
        ("model", 2, MODEL_WORDS),
        ("size", "720X1280", SIZE_WORDS),
        ("size", "720x1280 ", SIZE_WORDS),
        ("size", "7x1280", SIZE_WORDS),
        ("size", "720x1280\n", SIZE_WORDS),
        ("size", 720, SIZE_WORDS),
        ("seconds", 0, SECONDS_WORDS),
        ("seconds", "0", SECONDS_WORDS),
        ("seconds", 601, SECONDS_WORDS),
        ("seconds", "4.5", SECONDS_WORDS),
        ("seconds", 4.0, SECONDS_WORDS),
        ("seconds", -4, SECONDS_WORDS),
        ("seconds", True, SECONDS_WORDS),
        ("seconds", "4s", SECONDS_WORDS),
        ("seconds", "", SECONDS_WORDS),
    ],
)
def test_bad_upstream_defaults_name_the_field_and_the_form(field, value, expected):
    config = minimal()
    config["upstream"]["defaults"] = {field: value}
    assert problems(config) == [f"upstream.defaults.{field}: {expected}"]


def test_unknown_defaults_and_a_defaults_that_is_no_mapping_are_named():
    config = minimal()
    config["upstream"]["defaults"] = {"modle": "sora-2"}
    assert problems(config) == ["upstream.defaults.modle: unknown field"]
    config["upstream"]["defaults"] = "sora-2"
    assert problems(config) == ["upstream.defaults: expected a mapping"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("auth_header", "bearer"), ("auth_header", "Authorization"), ("remix_route", "query")],
)
def test_bad_enum_values_name_the_field_and_the_choices(field, value):
    config = minimal()
    config["upstream"][field] = value
    (found,) = problems(config)
    options = {"auth_header": "authorization, api-key", "remix_route": "path, body"}[field]
    assert found == f"upstream.{field}: expected one of {options}, got {value!r}"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(extra=1), "extra: unknown field"),
        (lambda c: c["upstream"].update(tokne="x"), "upstream.tokne: unknown field"),
        (lambda c: c.update(quota={"max_inflight": 2}), "quota.max_inflight: unknown field"),
        (lambda c: c.update(tracker={"lease": 3}), "tracker.lease: unknown field"),
        (lambda c: c.update(limits={"max_body": 3}), "limits.max_body: unknown field"),
        (lambda c: c.update(store={"url": "redis://x"}), "store.url: unknown field"),
        (lambda c: c["teams"][0].update(keys=[D2]), "teams[0].keys: unknown field"),
    ],
)
def test_unknown_fields_are_named(mutate, expected):
    config = minimal()
    mutate(config)
    assert expected in problems(config)


def test_duplicate_team_names_and_keys_are_refused():
    config = minimal()
    config["teams"] = [
        {"name": "marketing", "key_sha256": [D1]},
        {"name": "marketing", "key_sha256": [D2]},
        {"name": "research", "key_sha256": [D3, D1.upper()]},
        {"name": "sales", "key_sha256": [D2[:63] + "c", D2[:63] + "c"]},
    ]
    found = problems(config)
    assert "teams[1].name: duplicate team name 'marketing'" in found
    assert "teams[2].key_sha256[1]: this key digest is already used" in found
    assert "teams[3].key_sha256[1]: this key digest is already used" in found
    assert len(found) == 3


def test_all_problems_are_reported_at_once():
    config = minimal(extra=True, quota={"max_in_flight": 0})
    config["upstream"]["auth_header"] = "x"
    config["teams"][0]["key_sha256"] = ["nope"]
    found = problems(config)
    assert {p.split(":")[0] for p in found} == {
        "extra",
        "quota.max_in_flight",
        "upstream.auth_header",
        "teams[0].key_sha256[0]",
    }


def test_the_token_value_never_appears_in_errors_or_repr(monkeypatch):
    config = minimal(quota={"max_in_flight": "x"}, extra=1)
    config["teams"][0]["key_sha256"] = ["bad"]
    problems(config)  # asserts the token is absent from the message and the report
    # Nor when it came from the environment.
    config["upstream"]["token"] = "${SORA_UPSTREAM_TOKEN}"
    problems(config, {"SORA_UPSTREAM_TOKEN": TOKEN})
    settings = parse(minimal())
    assert TOKEN not in repr(settings)
    assert TOKEN not in repr(settings.upstream)


def test_an_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "missing.yaml")
    assert caught.value.problems[0].startswith("cannot read file")
    assert str(tmp_path / "missing.yaml") in caught.value.report()


# -- the commands ---------------------------------------------------------------------------


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_check_config_accepts_a_good_file(tmp_path, capsys):
    path = write(tmp_path, minimal())
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert str(path) in out
    assert "OK" in out
    assert TOKEN not in out + err


def test_check_config_refuses_a_bad_file_naming_path_and_field(tmp_path, capsys):
    config = minimal()
    config["teams"].append({"name": "research", "key_sha256": ["123"]})
    path = write(tmp_path, config)
    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"{path}: teams[1].key_sha256[0]: expected 64 hex characters" in err
    assert TOKEN not in out + err


def test_check_config_names_an_unset_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SORA_UPSTREAM_TOKEN", raising=False)
    assert main(["check-config", str(EXAMPLE)]) == 1
    err = capsys.readouterr().err
    assert str(EXAMPLE) in err
    assert "SORA_UPSTREAM_TOKEN" in err


def test_check_config_of_a_missing_file_fails(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 1
    assert str(tmp_path / "nope.yaml") in capsys.readouterr().err


def test_new_key_prints_the_key_then_the_entry_with_its_digest(capsys):
    assert main(["new-key", "marketing"]) == 0
    out = capsys.readouterr().out
    first, *rest = out.splitlines()
    key = first.strip()
    assert key
    assert " " not in key
    assert len(key) >= 32
    entry = "\n".join(rest)
    assert "key_sha256" in rest[0] or "key_sha256" in rest[1]
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert digest in entry
    assert key not in entry  # the key is printed once; the config gets only its digest
    # The entry is pasteable as printed: under `teams:` it is a valid team.
    text = textwrap.dedent(
        """\
        upstream:
          base_url: https://api.example.com/v1
          token: t
        teams:
        """
    )
    settings = parse(text + entry + "\n")
    assert settings.teams[0].name == "marketing"
    assert settings.teams[0].key_sha256 == (digest,)


def test_new_key_makes_a_fresh_key_each_time(capsys):
    main(["new-key", "a"])
    main(["new-key", "a"])
    lines = capsys.readouterr().out.splitlines()
    keys = lines[0::2]
    assert len(keys) == 2
    assert keys[0] != keys[1]


# -- secrets from files, Sentinel, logging, metrics -------------------------------------------


def test_the_token_can_come_from_a_mounted_file(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(f"  {TOKEN}\n")
    config = minimal(upstream={"base_url": "https://api.example.com/v1", "token_file": str(secret)})
    assert parse(config).upstream.token == TOKEN


def test_a_missing_token_file_is_named_once(tmp_path):
    missing = tmp_path / "nope"
    config = minimal(upstream={"base_url": "https://x/v1", "token_file": str(missing)})
    found = problems(config)
    assert found == [f"upstream.token_file: cannot read {missing}: No such file or directory"]


def test_token_and_token_file_together_are_refused(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(TOKEN)
    config = minimal(
        upstream={"base_url": "https://x/v1", "token": TOKEN, "token_file": str(secret)}
    )
    assert "upstream.token_file: set either token or token_file, not both" in problems(config)


def test_sentinel_settings_are_parsed():
    config = minimal(
        store={"sentinel": {"master_name": "main", "hosts": ["s1:26379", "10.0.0.2:26380"]}}
    )
    store = parse(config).store
    assert store.sentinel is not None
    assert not store.embedded
    assert store.sentinel.master_name == "main"
    assert store.sentinel.hosts == (("s1", 26379), ("10.0.0.2", 26380))


@pytest.mark.parametrize(
    ("sentinel", "expected"),
    [
        ({"hosts": ["s1:1"]}, "store.sentinel.master_name: required"),
        ({"master_name": "m"}, "store.sentinel.hosts: expected a list of host:port"),
        ({"master_name": "m", "hosts": ["s1"]}, "store.sentinel.hosts[0]: expected host:port"),
    ],
)
def test_bad_sentinel_settings_name_their_field(sentinel, expected):
    assert any(p.startswith(expected) for p in problems(minimal(store={"sentinel": sentinel})))


def test_redis_url_and_sentinel_are_exclusive():
    store = {"redis_url": "redis://x:6379/0", "sentinel": {"master_name": "m", "hosts": ["s:1"]}}
    assert "store: set either redis_url or sentinel, not both" in problems(minimal(store=store))


def test_logging_and_metrics_sections():
    settings = parse(minimal(logging={"level": "debug", "format": "text"}))
    assert (settings.logging.level, settings.logging.format) == ("debug", "text")
    assert parse(minimal()).logging.format == "json"
    assert parse(minimal(metrics={"bearer_token": "m"})).metrics.bearer_token == "m"
    assert "logging.format: expected one of json, text, got 'xml'" in problems(
        minimal(logging={"format": "xml"})
    )


def test_a_lease_shorter_than_two_polls_is_refused():
    found = problems(minimal(tracker={"poll_interval_s": 5, "lease_s": 8}))
    assert found == ["tracker.lease_s: must be at least twice tracker.poll_interval_s"]


# -- nothing the file holds is echoed; secrets in files are one line, kept private ----------


@pytest.mark.parametrize(
    "line",
    [
        f"  token: *{TOKEN}",  # an alias YAML cannot resolve
        f"  token: &{TOKEN} a\n  timeout_s: &{TOKEN} 5",  # an anchor given twice
        f"  token: !{TOKEN} x",  # an unknown tag
        f"  token: @{TOKEN}",  # a character that starts no token
        f'  token: "\\q{TOKEN}"',  # a bad escape
        f"  token: {TOKEN}\x07",  # a character YAML does not allow
    ],
)
def test_a_yaml_error_reports_its_position_and_kind_never_the_text(line, tmp_path, capsys):
    text = f"upstream:\n  base_url: https://api.example.com/v1\n{line}\nteams: []\n"
    found = problems(text)
    assert len(found) == 1
    assert re.match(r"not valid YAML at line [34], column \d+: \w", found[0])
    for fragment in (TOKEN, TOKEN[:6], TOKEN[-6:]):
        assert fragment not in found[0]
    # check-config prints the same, and only that.
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert err.strip() == f"{path}: {found[0]}"
    assert out == ""


def test_a_yaml_error_in_a_reload_is_logged_without_the_text(tmp_path, caplog):
    path = write(tmp_path, minimal())
    reloader = TeamsReloader(str(path), load_settings(path), lambda teams: None)
    path.write_text(path.read_text().replace(f"token: {TOKEN}", f"token: *{TOKEN}"))
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert reloader.check() is False
    [record] = [r for r in caplog.records if r.name == "gateway.reload"]
    logged = repr(record.__dict__)
    assert "not valid YAML at line" in logged
    assert TOKEN not in logged
    assert TOKEN[:6] not in logged


def test_deeply_nested_yaml_is_a_config_error():
    assert problems("[" * 5000) == ["not valid YAML: nested too deeply"]


def test_a_sentinel_port_of_non_ascii_digits_is_a_config_error():
    found = problems(minimal(store={"sentinel": {"master_name": "m", "hosts": ["s1:\u00b2"]}}))
    assert found == ["store.sentinel.hosts[0]: expected host:port, got 's1:\u00b2'"]


USERINFO_URL = f"https://ops:{TOKEN}@api.example.com/v1"


def test_credentials_in_base_url_are_never_printed(tmp_path, capsys):
    # api-key mode: the URL's credentials may go to a proxy in front of upstream.
    config = minimal(upstream={"base_url": USERINFO_URL, "token": "t", "auth_header": "api-key"})
    assert main(["check-config", str(write(tmp_path, config))]) == 0
    out, err = capsys.readouterr()
    assert "upstream https://***@api.example.com/v1" in out
    assert TOKEN not in out + err
    assert "ops" not in out + err
    # Nor in the error for a URL that is not http(s).
    bad = problems(minimal(upstream={"base_url": f"ftp://ops:{TOKEN}@x/v1", "token": "t"}))
    assert bad == ["upstream.base_url: expected an http(s) URL, got 'ftp://***@x/v1'"]


def test_credentials_in_base_url_cannot_go_with_the_authorization_header():
    """The HTTP client would send them as Basic auth, in the header the token needs."""
    found = problems(minimal(upstream={"base_url": USERINFO_URL, "token": "t"}))
    assert found == [
        "upstream.base_url: credentials in the URL cannot be sent with auth_header: "
        "authorization; remove them (the token is the credential)"
    ]


def token_file(tmp_path: Path, text: str, mode: int = 0o600) -> dict[str, Any]:
    secret = tmp_path / "token"
    secret.write_text(text, newline="")
    secret.chmod(mode)
    return minimal(upstream={"base_url": "https://x/v1", "token_file": str(secret)})


@pytest.mark.parametrize("ending", ["", "\n", "\r\n"])
def test_a_token_file_may_end_with_one_line_break(tmp_path, ending):
    assert parse(token_file(tmp_path, TOKEN + ending)).upstream.token == TOKEN


@pytest.mark.parametrize("text", [f"{TOKEN}\nsecond", f"{TOKEN}\n\n", f"a\r{TOKEN}"])
def test_a_token_file_of_more_than_one_line_is_refused(tmp_path, text):
    found = problems(token_file(tmp_path, text))
    secret = tmp_path / "token"
    assert found == [
        f"upstream.token_file: {secret} holds more than one line; it must hold only the token"
    ]


def test_an_inline_token_with_a_line_break_is_refused():
    found = problems(minimal(upstream={"base_url": "https://x/v1", "token": f"{TOKEN}\nx"}))
    assert found == ["upstream.token: must be one line (it holds a line break)"]
    found = problems(minimal(metrics={"bearer_token": "a\nb"}))
    assert found == ["metrics.bearer_token: must be one line (it holds a line break)"]


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o400, False), (0o644, True)])
def test_a_token_file_others_can_read_is_warned_about(tmp_path, caplog, mode, warned):
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        assert parse(token_file(tmp_path, TOKEN, mode)).upstream.token == TOKEN
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.config"]
    if warned:
        assert warnings == [
            f"upstream.token_file: {tmp_path / 'token'} can be read by other users "
            f"(mode {oct(mode)}); chmod 600 it"
        ]
        assert TOKEN not in warnings[0]
    else:
        assert warnings == []


# -- one schema: the documented defaults are the schema's, every problem in its words ---------

README = REPO / "README.md"


def schema_fields(kind: type = Settings, prefix: str = "") -> dict[str, FieldInfo]:
    """Every field of the schema by its documented path (`teams[].name`), sections opened."""
    found: dict[str, FieldInfo] = {}
    hints = typing.get_type_hints(kind)
    for name, info in kind.__pydantic_fields__.items():  # type: ignore[attr-defined]
        hint, path = hints[name], f"{prefix}{name}"
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(args[0]):
            found.update(schema_fields(args[0], f"{path}[]."))
        elif section := next((t for t in (hint, *args) if dataclasses.is_dataclass(t)), None):
            found.update(schema_fields(section, f"{path}."))
        else:
            found[path] = info
    return found


def readme_defaults() -> dict[str, str]:
    """The README's configuration table: each field's path and what it says of its default."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("| field | default | meaning |") + 2
    rows: dict[str, str] = {}
    for line in itertools.takewhile(lambda row: row.startswith("|"), lines[start:]):
        names_cell, default_cell = (cell.strip() for cell in line.strip("|").split("|")[:2])
        # `store.sentinel.master_name`, `.hosts` names store.sentinel.hosts too.
        first, *more = re.findall(r"`([^`]+)`", names_cell)
        parent = first.rsplit(".", 1)[0]
        names = [first, *(parent + name if name.startswith(".") else name for name in more)]
        defaults = re.findall(r"`([^`]+)`", default_cell) or [default_cell]
        if len(defaults) == 1:
            defaults *= len(names)
        rows.update(zip(names, defaults, strict=True))
    return rows


def test_every_default_in_the_readme_table_is_the_schema_s():
    documented = readme_defaults()
    fields = schema_fields()
    # Read before the schema sees the file (it becomes upstream.token), so not a field of it.
    assert documented.pop("upstream.token_file") == "none"
    assert sorted(documented) == sorted(fields), "the table lists each field, and only those"
    for path, info in fields.items():
        words = documented[path]
        if words == "required":
            assert info.is_required(), path
        elif words == "none":  # optional: no value (or an empty list or mapping), or a field
            # of the optional Sentinel section
            assert default_of(info) in (None, (), {}) or path.startswith("store.sentinel."), path
        else:
            assert not info.is_required(), path
            assert yaml.safe_load(words) == info.default, path


def default_of(info: FieldInfo) -> Any:
    return info.get_default(call_default_factory=True)


def test_the_example_config_lists_each_default_as_the_schema_has_it():
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    # An empty default (no prices, no admin keys) is shown as a commented-out example.
    defaults = {
        path: default_of(info)
        for path, info in schema_fields().items()
        if not info.is_required() and default_of(info) not in (None, (), {})
    }
    assert {"upstream.timeout_s", "store.data_dir", "logging.format"} <= defaults.keys()
    assert {"quota.when_full", "teams[].weight", "usage.retention_days"} <= defaults.keys()
    for path, default in defaults.items():
        section, key = path.split(".")
        # A team's field is shown on the first team.
        value = example["teams"][0][key] if section == "teams[]" else example[section][key]
        assert value == default, path
        assert type(value) in (type(default), int), path


def test_settings_built_in_code_take_positions_and_stay_frozen_tuples():
    team = TeamSettings("research", (D2,), 2)
    assert (team.name, team.key_sha256, team.max_in_flight) == ("research", (D2,), 2)
    assert (team.weight, team.max_queued) == (1.0, None)
    weighted = TeamSettings("research", (D2,), None, 3, 10)
    assert (weighted.weight, weighted.max_queued) == (3.0, 10)
    assert isinstance(weighted.weight, float)
    upstream = UpstreamSettings("https://api.example.com/v1/", TOKEN, timeout_s=5)
    assert upstream.base_url == "https://api.example.com/v1"
    assert upstream.timeout_s == 5.0
    assert isinstance(upstream.timeout_s, float)
    sentinel = SentinelSettings("main", (("s1", 26379),))
    assert sentinel.hosts == (("s1", 26379),)
    assert not StoreSettings(sentinel=sentinel).embedded
    assert StoreSettings(sentinel=None).embedded  # None from code is no Sentinel
    settings = Settings(upstream, (team,))
    assert settings.quota == QuotaSettings()
    assert settings.limits == LimitsSettings()
    assert dataclasses.replace(settings, teams=(team,)) == settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.upstream.token = "other"  # type: ignore[misc]
    assert TOKEN not in repr(settings)


def test_settings_built_in_code_obey_the_schema_without_printing_a_secret():
    with pytest.raises(ValidationError) as caught:
        UpstreamSettings("ftp://api.example.com", TOKEN)
    assert TOKEN not in str(caught.value)
    with pytest.raises(ValidationError):
        TeamSettings("research", ("not a digest",))
    with pytest.raises(ValidationError):
        Settings(UpstreamSettings("https://x/v1", TOKEN), ())
    with pytest.raises(ValidationError):
        TeamSettings("research", (D2,), weight=True)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        UpstreamDefaults(size="large")


@pytest.mark.parametrize(
    ("where", "value", "expected"),
    [
        ("quota.max_in_flight", "'5'", "expected a whole number, got '5'"),
        ("quota.max_in_flight", "2.0", "expected a whole number, got 2.0"),
        ("limits.max_downloads", "true", "expected a whole number, got True"),
        ("quota.wait_s", "false", "expected a number, got False"),
        ("quota.wait_s", "null", "expected a number, got None"),
        ("quota.wait_s", "'20'", "expected a number, got '20'"),
        ("quota.wait_s", ".inf", "must be zero or more"),
        ("quota.wait_s", ".nan", "must be zero or more"),
        ("quota.max_job_s", ".inf", "must be positive"),
        ("tracker.lease_s", "-.inf", "must be positive"),
        ("logging.level", "INFO", "expected one of info, debug, warning, error, got 'INFO'"),
        ("quota.when_full", "Queue", "expected one of queue, wait, got 'Queue'"),
        ("quota.max_queued", "true", "expected a whole number, got True"),
        ("quota.fair_window_s", ".inf", "must be positive"),
        ("limits.max_team_downloads", "129", "must be at most limits.max_downloads"),
        ("store.data_dir", "null", "expected a directory path"),
        ("store.redis_url", "''", "expected a redis://, rediss:// or unix:// URL"),
        ("metrics.bearer_token", "'  '", "expected a non-empty string"),
        ("metrics.bearer_token", "5", "expected a non-empty string"),
    ],
)
def test_no_value_is_coerced_and_each_refusal_is_worded(where, value, expected):
    section, key = where.split(".")
    assert problems(yaml.safe_dump(minimal()) + f"{section}:\n  {key}: {value}\n") == [
        f"{where}: {expected}"
    ]


def test_an_empty_section_means_its_defaults_but_an_empty_sentinel_is_no_sentinel():
    text = yaml.safe_dump(minimal()) + "quota:\nmetrics:\n  # bearer_token: x\n"
    settings = parse(text)
    assert settings.quota == QuotaSettings()
    assert settings.metrics.bearer_token is None
    assert sorted(problems(minimal(store={"sentinel": None}))) == [
        "store.sentinel.hosts: expected a list of host:port",
        "store.sentinel.master_name: required",
    ]


def test_a_sentinel_problem_names_the_sentinel_s_whole_path():
    sentinel = {"master_name": "m", "hosts": ["s:1"], "port": 1}
    assert problems(minimal(store={"sentinel": sentinel})) == ["store.sentinel.port: unknown field"]
    assert problems(minimal(store={"sentinel": "s:1"})) == ["store.sentinel: expected a mapping"]


def test_a_key_that_is_no_string_is_an_unknown_field():
    assert problems(yaml.safe_dump(minimal()) + "quota: {1: 2}\n") == ["quota.1: unknown field"]


BAD_VALUES = [None, True, 0, -1, 1.5, math.nan, "", " ", "x", [], [1], {}, {"k": 1}, {1: 2}]
SECRETS = [TOKEN, f"{TOKEN}\nx", [TOKEN], {TOKEN: TOKEN}, 7]


@pytest.mark.parametrize("path", sorted(schema_fields()))
def test_every_field_words_each_bad_value_in_the_config_s_own_terms(path):
    """No pydantic phrasing reaches an operator, each problem names a path, no secret leaks."""
    secret = not schema_fields()[path].repr
    for value in BAD_VALUES + SECRETS:
        config = minimal(store={"sentinel": {"master_name": "m", "hosts": ["s:1"]}})
        where: Any = config
        *parents, key = path.replace("[]", ".0").split(".")
        for part in parents:
            where = where[int(part)] if part.isdigit() else where.setdefault(part, {})
        where[key] = value
        try:
            parse(config)
        except ConfigError as error:
            for problem in error.problems:
                # A mapping's keys are path parts too: `pricing.sora-2.*`.
                assert re.match(r"^[a-z_]+(\[\d+\]|\.[A-Za-z_0-9*:/-]+)*: [a-z'(]", problem), (
                    problem
                )
                for words in ("Input should", "Field required", "Value error", "type="):
                    assert words not in problem, problem
                if secret:
                    assert TOKEN not in problem, problem


# -- CONTRACT §9: pricing, per-team policy and budgets, admin keys, usage -----------------------

PRICING = {
    "sora-2": {"*": 0.10},
    "sora-2-pro": {"720x1280": 0.30, "1280x720": 0.30, "1024x1792": 0.50, "1792x1024": 0.50},
}


def priced(**team: Any) -> dict[str, Any]:
    config = minimal(pricing=copy.deepcopy(PRICING))
    config["teams"][0].update(team)
    return config


def test_every_policy_default_of_section_9():
    settings = parse(minimal())
    assert settings.pricing == {}
    assert settings.admin.key_sha256 == ()
    assert settings.usage.retention_days == 400
    team = settings.teams[0]
    assert (team.models, team.sizes, team.max_seconds) == (None, None, None)
    assert (team.budget_usd_per_day, team.budget_usd_per_month) == (None, None)


def test_the_contract_s_policy_example_is_taken():
    config = priced(
        models=["sora-2"],
        sizes=["1280x720"],
        max_seconds=12,
        budget_usd_per_day=50,
        budget_usd_per_month=900.5,
    )
    config.update(admin={"key_sha256": [D3.upper()]}, usage={"retention_days": 30})
    settings = parse(config)
    assert settings.pricing == PRICING
    team = settings.teams[0]
    assert (team.models, team.sizes, team.max_seconds) == (("sora-2",), ("1280x720",), 12)
    assert (team.budget_usd_per_day, team.budget_usd_per_month) == (50.0, 900.5)
    assert isinstance(team.budget_usd_per_day, float)
    assert settings.admin.key_sha256 == (D3,)  # normalised like a team's
    assert settings.usage.retention_days == 30
    # A whole-dollar price is a number like any other.
    assert parse(minimal(pricing={"sora-2": {"*": 1}})).pricing == {"sora-2": {"*": 1.0}}


def test_empty_pricing_and_admin_sections_mean_none():
    text = yaml.safe_dump(minimal()) + "pricing:\n  # sora-2: {'*': 0.10}\nadmin:\n"
    settings = parse(text)
    assert (settings.pricing, settings.admin.key_sha256) == ({}, ())
    assert parse(minimal(admin={"key_sha256": D3})).admin.key_sha256 == (D3,)


PRICE_WORDS = "expected a positive number of USD per second of video, such as 0.10"


@pytest.mark.parametrize(
    ("pricing", "expected"),
    [
        ({"sora-2": {"*": 0}}, f"pricing.sora-2.*: {PRICE_WORDS}"),
        ({"sora-2": {"*": -0.1}}, f"pricing.sora-2.*: {PRICE_WORDS}"),
        ({"sora-2": {"*": math.nan}}, f"pricing.sora-2.*: {PRICE_WORDS}"),
        ({"sora-2": {"*": math.inf}}, f"pricing.sora-2.*: {PRICE_WORDS}"),
        ({"sora-2": {"*": "0.10"}}, f"pricing.sora-2.*: {PRICE_WORDS}"),
        ({"sora-2": {"*": True}}, f"pricing.sora-2.*: {PRICE_WORDS}"),
        ({"sora-2": {"*": None}}, f"pricing.sora-2.*: {PRICE_WORDS}"),
        (
            {"sora-2": {"1280X720": 0.1}},
            'pricing.sora-2.1280X720: expected WIDTHxHEIGHT, such as 1280x720, or "*" for any size',
        ),
        ({"sora 2": {"*": 0.1}}, f"pricing.sora 2: {MODEL_WORDS}"),
        (
            {"sora-2": {}},
            'pricing.sora-2: expected a mapping of size (or "*") to USD per second, '
            'such as {"*": 0.10}',
        ),
        (
            {"sora-2": 0.10},
            'pricing.sora-2: expected a mapping of size (or "*") to USD per second, '
            'such as {"*": 0.10}',
        ),
        (
            ["sora-2"],
            'pricing: expected a mapping of model to its prices, such as {sora-2: {"*": 0.10}}',
        ),
    ],
)
def test_a_price_that_is_not_a_positive_finite_number_is_refused(pricing, expected):
    assert problems(minimal(pricing=pricing)) == [expected]


def test_a_team_s_allowed_model_without_a_price_is_refused():
    assert problems(priced(models=["sora-2", "sora-3"])) == [
        "teams[0].models[1]: 'sora-3' has no price in pricing"
    ]
    # Without prices any model may be listed: nothing is charged.
    assert parse(minimal(teams=[{"name": "m", "key_sha256": [D1], "models": ["sora-3"]}]))


@pytest.mark.parametrize("period", ["budget_usd_per_day", "budget_usd_per_month"])
def test_a_budget_without_prices_is_refused_since_nothing_could_be_charged(
    period, tmp_path, capsys
):
    config = minimal()
    config["teams"][0][period] = 2
    assert problems(config) == [f"teams[0].{period}: a budget needs prices, and pricing is empty"]
    assert parse(priced(**{period: 2})).teams[0] is not None
    path = write(tmp_path, config)
    assert main(["check-config", str(path)]) == 1
    assert f"{path}: teams[0].{period}: a budget needs prices" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("budget_usd_per_day", 0, "expected a positive number of USD"),
        ("budget_usd_per_month", -5, "expected a positive number of USD"),
        ("budget_usd_per_day", math.inf, "expected a positive number of USD"),
        ("budget_usd_per_day", "50", "expected a positive number of USD"),
        ("max_seconds", 0, "must be at least 1"),
        ("max_seconds", 601, "must be at most 600"),
        ("max_seconds", "8", "expected a whole number, got '8'"),
        ("max_seconds", 8.5, "expected a whole number, got 8.5"),
        ("models", [], "expected a list of one or more models"),
        ("models", "sora-2", "expected a list of one or more models"),
        ("sizes", [], "expected a list of one or more sizes, such as [1280x720]"),
        ("sizes", ["big"], None),
    ],
)
def test_bad_team_policy_fields_are_named(field, value, expected):
    found = problems(priced(**{field: value}))
    if expected is None:  # an item's own words
        assert found == [f"teams[0].{field}[0]: {SIZE_WORDS}"]
    else:
        assert found == [f"teams[0].{field}: {expected}"]


def test_an_admin_key_that_is_also_a_team_key_is_refused():
    config = minimal(admin={"key_sha256": [D3, D1]})
    config["teams"].append({"name": "research", "key_sha256": [D2]})
    assert problems(config) == [
        "admin.key_sha256[1]: this key digest is a key of team 'marketing'; an admin key must "
        "be its own"
    ]
    assert problems(minimal(admin={"key_sha256": ["xyz"]})) == [
        "admin.key_sha256[0]: expected 64 hex characters"
    ]
    assert problems(minimal(usage={"retention_days": 0})) == [
        "usage.retention_days: must be at least 1"
    ]


def test_the_demo_and_compose_configs_price_every_job_the_simulator_makes():
    environ = {"SORA_DEMO_SIM_PORT": "8081", "SORA_UPSTREAM_TOKEN": TOKEN}
    demo = parse(
        (REPO / "gateway" / "demo.yaml").read_text(), {**environ, "SORA_DEMO_KEY_SHA256": D1}
    )
    compose = parse(
        (REPO / "deploy" / "compose" / "gateway.yaml").read_text(),
        {"SORA_SIMULATOR_TOKEN": TOKEN, "SORA_TEAM_KEY_SHA256": D1},
    )
    for settings in (demo, compose):
        assert settings.pricing == PRICING
        for model in ("sora-2", "sora-2-pro"):
            for size in VIDEO_SIZES:
                prices = settings.pricing[model]
                assert size in prices or "*" in prices, (model, size)


def test_reload_carries_a_team_s_new_policy_fields(tmp_path):
    path = write(tmp_path, priced())
    applied: list[tuple[TeamSettings, ...]] = []
    reloader = TeamsReloader(str(path), load_settings(path), applied.append)
    path.write_text(yaml.safe_dump(priced(models=["sora-2"], max_seconds=8, budget_usd_per_day=2)))
    assert reloader.check() is True
    [(team,)] = applied
    assert (team.models, team.max_seconds, team.budget_usd_per_day) == (("sora-2",), 8, 2.0)
    assert reloader.current.teams == (team,)


def test_reload_applies_pricing_admin_and_defaults_with_the_teams_given_apply_policy(
    tmp_path, caplog
):
    path = write(tmp_path, priced())
    applied: list[Any] = []
    reloader = TeamsReloader(
        str(path), load_settings(path), applied.append, apply_policy=applied.append
    )
    config = priced(models=["sora-3"])
    config["pricing"] = {**PRICING, "sora-3": {"*": 0.2}}
    config["admin"] = {"key_sha256": [D3]}
    config["upstream"]["defaults"] = {"model": "sora-3", "seconds": 4}
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO, logger="gateway.reload"):
        assert reloader.check() is True
    policy, teams = applied  # the prices first, so the team's new model has its price
    assert policy.pricing["sora-3"] == {"*": 0.2}
    assert policy.admin.key_sha256 == (D3,)
    assert policy.upstream.defaults == UpstreamDefaults("sora-3", None, "4")
    assert policy.teams == teams
    assert teams[0].models == ("sora-3",)
    assert reloader.current == policy
    assert [r.getMessage() for r in caplog.records] == ["teams and policy reloaded"]
    # Only prices changed: only the policy is applied.
    config["pricing"]["sora-3"] = {"*": 0.25}
    path.write_text(yaml.safe_dump(config))
    assert reloader.check() is True
    assert len(applied) == 3
    assert applied[-1].pricing["sora-3"] == {"*": 0.25}


def test_without_apply_policy_a_price_change_waits_for_a_restart(tmp_path, caplog):
    path = write(tmp_path, priced())
    applied: list[Any] = []
    reloader = TeamsReloader(str(path), load_settings(path), applied.append)
    config = priced()
    config["pricing"]["sora-2"] = {"*": 0.2}
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO, logger="gateway.reload"):
        assert reloader.check() is False
    assert applied == []
    assert reloader.current.pricing == PRICING
    assert "take effect only after a restart" in caplog.records[-1].getMessage()


def test_without_apply_policy_teams_that_need_the_new_prices_are_refused_not_half_applied(
    tmp_path, caplog
):
    path = write(tmp_path, priced())
    applied: list[Any] = []
    reloader = TeamsReloader(str(path), load_settings(path), applied.append)
    config = priced(models=["sora-3"])
    config["pricing"]["sora-3"] = {"*": 0.2}
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO, logger="gateway.reload"):
        assert reloader.check() is False
    assert applied == []
    assert reloader.current.teams[0].models is None
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "take effect only after a restart" in record.getMessage()
    assert record.problems == ["teams[0].models[0]: 'sora-3' has no price in pricing"]
