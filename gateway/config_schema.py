"""The configuration's schema: each field's type, default, bounds and choices, once.

Pydantic dataclasses rather than BaseModels: the settings stay frozen dataclasses that
code builds positionally (`TeamSettings("research", (digest,))`) and copies with
`dataclasses.replace` (the reload compares configs that way). Scalars are strict: YAML
already types numbers and strings, so `"5"` for a count or `true` for a number is a
mistake to report, never to coerce. A rule pydantic cannot state (a URL's form, a line
break in a secret, a rule across fields) raises a `REFUSED` error in the operator's
words; `config_problems.py` words pydantic's own errors the same way. A rule across
fields runs once those fields are valid, so it never reasons from a refused value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass as plain_dataclass
from dataclasses import is_dataclass
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from .params import MAX_SECONDS, MODEL_SYNTAX, SECONDS_TEXT, SIZE_SYNTAX
from .parse import whole_number
from .pools import API_CONNECTIONS
from .scrub import redact_url, url_secret

# The error type of every problem a validator here words itself.
REFUSED = "config"

# Unknown fields are errors (a typo must not silently mean the default); a
# ValidationError raised where code builds settings never prints their values.
SECTION = ConfigDict(extra="forbid", hide_input_in_errors=True)

Loc = tuple[str | int, ...]


@plain_dataclass(frozen=True)
class Problem:
    """How a missing or ill-formed value of a field is reported, in the operator's words.

    It replaces pydantic's own errors for the field (missing, wrong type, a failed
    bound); what the field's validators refuse keeps its own words.
    """

    text: str


def _refusal(text: str) -> PydanticCustomError:
    """A problem in the operator's words (passed as context: the text may hold braces)."""
    return PydanticCustomError(REFUSED, "{text}", {"text": text})


def _refused_at(problems: Iterable[tuple[Loc, str]]) -> ValidationError:
    """Problems a rule over a whole section found, each under the field it names."""
    return ValidationError.from_exception_data(
        "config", [{"type": _refusal(text), "loc": loc, "input": None} for loc, text in problems]
    )


def _null_sections_as_empty(cls: type, data: Any) -> Any:
    """YAML reads a section with nothing under it (`metrics:` and a comment) as null.

    Only a mapping from the file is rewritten: code building settings passes arguments
    instead, and there `sentinel=None` means no Sentinel.
    """
    if not isinstance(data, dict):
        return data
    fields = getattr(cls, "__pydantic_fields__", {})
    return {
        key: {}
        if value is None and key in fields and _is_section(fields[key].annotation)
        else value
        for key, value in data.items()
    }


def _is_section(annotation: Any) -> bool:
    return any(is_dataclass(kind) for kind in (annotation, *get_args(annotation)))


# -- value checks pydantic has no word for ---------------------------------------------------


def _stripped(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _one_line(value: str) -> str:
    # Sent as a header value: a line break would end the header, or be refused on every
    # call. A second line is most likely something else pasted in.
    if "\n" in value or "\r" in value:
        raise _refusal("must be one line (it holds a line break)")
    return value


def _as_tuple(value: Any) -> Any:
    """A YAML list as the tuple the settings hold; anything else is left to be refused."""
    return tuple(value) if isinstance(value, list) else value


def _one_or_more(value: Any) -> Any:
    """A single digest may be written without the list around it."""
    return [value] if isinstance(value, str) else value


def _http_url(url: str) -> str:
    if not re.match(r"^https?://[^/\s]+", url):
        raise _refusal(f"expected an http(s) URL, got {redact_url(url)!r}")
    return url.rstrip("/")


def _not_reserved(name: str) -> str:
    if name == "anonymous":
        raise _refusal("'anonymous' is reserved for unauthenticated requests")
    return name


def _digest(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _host_port(entry: Any) -> Any:
    """`host:port` from the file; a pair built in code is taken as it is."""
    if isinstance(entry, tuple):
        return entry
    host, _, port_text = str(entry).rpartition(":")
    port = whole_number(port_text)
    if not host or port is None:
        raise _refusal(f"expected host:port, got {entry!r}")
    return (host, port)


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


def _seconds_text(value: Any) -> Any:
    """`seconds: 4` as the `"4"` upstream's objects carry; anything else is left to be refused."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _within_max_seconds(text: str) -> str:
    if not 1 <= int(text) <= MAX_SECONDS:
        raise _refusal(_SECONDS_WORDS)
    return text


_SECONDS_WORDS = f"expected a whole number of seconds from 1 to {MAX_SECONDS}, such as 4"


def _below_api_pool(calls: int) -> int:
    if calls >= API_CONNECTIONS:
        raise _refusal(f"must be less than the api pool's {API_CONNECTIONS} connections")
    return calls


# -- field types ------------------------------------------------------------------------------

_Item = TypeVar("_Item")
# A YAML list, held as a tuple. Strict: a YAML set (`!!set`) is no list.
NonEmpty = Annotated[tuple[_Item, ...], Strict(), Field(min_length=1), BeforeValidator(_as_tuple)]
Seconds = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
MAX_QUEUE_S = 7 * 86400.0
SecondsOrZero = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=1)]
# Surrounding spaces dropped (an editor's or a shell's), then one line, not empty.
SecretLine = Annotated[
    StrictStr, Field(min_length=1), AfterValidator(_one_line), BeforeValidator(_stripped)
]
UpstreamToken = Annotated[SecretLine, Problem("required (usually token: ${SORA_UPSTREAM_TOKEN})")]
BearerToken = Annotated[SecretLine, Problem("expected a non-empty string")]
OptionalSecret = Annotated[StrictStr | None, BeforeValidator(_empty_is_none)]
HttpUrl = Annotated[StrictStr, Field(min_length=1), AfterValidator(_http_url), Problem("required")]
RedisUrl = Annotated[
    StrictStr,
    Field(pattern=r"^(redis|rediss|unix)://"),
    Problem("expected a redis://, rediss:// or unix:// URL"),
]
HostPort = Annotated[tuple[StrictStr, StrictInt], BeforeValidator(_host_port)]
TeamName = Annotated[
    StrictStr,
    Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"),
    AfterValidator(_not_reserved),
    Problem("expected 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"),
]
# The job parameters of `upstream.defaults`, with the syntax a request's must have (params.py).
ModelName = Annotated[
    StrictStr,
    Field(pattern=f"^{MODEL_SYNTAX.pattern}$"),
    Problem("expected a model name: 1 to 128 letters, digits and . _ : / -"),
]
VideoSize = Annotated[
    StrictStr,
    Field(pattern=f"^{SIZE_SYNTAX.pattern}$"),
    Problem("expected WIDTHxHEIGHT, such as 1280x720"),
]
VideoSeconds = Annotated[
    StrictStr,
    Field(pattern=f"^{SECONDS_TEXT.pattern}$"),
    AfterValidator(_within_max_seconds),
    BeforeValidator(_seconds_text),
    Problem(_SECONDS_WORDS),
]
# A team's share of slot time when teams compete: any positive number, 1 by default.
Weight = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
KeyDigest = Annotated[
    StrictStr,
    Field(pattern=r"^[0-9a-f]{64}$"),
    BeforeValidator(_digest),
    Problem("expected 64 hex characters"),
]
# CONTRACT §9's policy and budgets. A price is USD per second of video; a budget USD.
# Both positive and finite: a price of 0 or NaN would make every job free, silently.
Price = Annotated[
    StrictFloat,
    Field(gt=0, allow_inf_nan=False),
    Problem("expected a positive number of USD per second of video, such as 0.10"),
]
Budget = Annotated[
    StrictFloat, Field(gt=0, allow_inf_nan=False), Problem("expected a positive number of USD")
]
ANY_SIZE = "*"  # a pricing entry for every size of a model
PricedSize = Annotated[
    StrictStr,
    Field(pattern=rf"^({SIZE_SYNTAX.pattern}|\*)$"),
    Problem('expected WIDTHxHEIGHT, such as 1280x720, or "*" for any size'),
]
ModelPrices = Annotated[
    dict[PricedSize, Price],
    Field(min_length=1),
    Problem('expected a mapping of size (or "*") to USD per second, such as {"*": 0.10}'),
]
Pricing = Annotated[
    dict[ModelName, ModelPrices],
    Problem('expected a mapping of model to its prices, such as {sora-2: {"*": 0.10}}'),
]
AllowedModels = Annotated[NonEmpty[ModelName], Problem("expected a list of one or more models")]
AllowedSizes = Annotated[
    NonEmpty[VideoSize], Problem("expected a list of one or more sizes, such as [1280x720]")
]
MaxJobSeconds = Annotated[StrictInt, Field(ge=1, le=MAX_SECONDS)]


# -- the sections ------------------------------------------------------------------------------


@dataclass(frozen=True, config=SECTION)
class UpstreamDefaults:
    """What upstream assumes for a field a create leaves out.

    A queued job's video object is the gateway's until upstream takes the job, and it
    shows these; none is assumed here, since only the operator knows the upstream.
    """

    model: ModelName | None = None
    size: VideoSize | None = None
    seconds: VideoSeconds | None = None  # a string, as upstream's objects carry it


@dataclass(frozen=True, config=SECTION)
class UpstreamSettings:
    base_url: HttpUrl
    token: UpstreamToken = Field(repr=False)
    auth_header: Literal["authorization", "api-key"] = "authorization"
    remix_route: Literal["path", "body"] = "path"
    timeout_s: Seconds = 60.0
    defaults: UpstreamDefaults = UpstreamDefaults()

    @model_validator(mode="before")
    @classmethod
    def _null_sections(cls, data: Any) -> Any:
        return _null_sections_as_empty(cls, data)

    @model_validator(mode="after")
    def _credentials_fit_the_header(self) -> UpstreamSettings:
        if self.auth_header == "authorization" and url_secret(self.base_url):
            # The HTTP client would send them as Basic auth, in the header the token needs.
            text = (
                "credentials in the URL cannot be sent with auth_header: authorization; "
                "remove them (the token is the credential)"
            )
            raise _refused_at([(("base_url",), text)])
        return self


@dataclass(frozen=True, config=SECTION)
class SentinelSettings:
    master_name: Annotated[StrictStr, Field(min_length=1), Problem("required")]
    hosts: Annotated[NonEmpty[HostPort], Problem("expected a list of host:port")]
    password: OptionalSecret = Field(default=None, repr=False)  # the Redis servers'
    sentinel_password: OptionalSecret = Field(default=None, repr=False)


@dataclass(frozen=True, config=SECTION)
class StoreSettings:
    redis_url: RedisUrl | None = Field(default=None, repr=False)  # may carry a password
    data_dir: Annotated[StrictStr, Field(min_length=1), Problem("expected a directory path")] = (
        ".sora-gateway/store"
    )
    sentinel: SentinelSettings | None = None

    @property
    def embedded(self) -> bool:
        """No shared store is configured: the gateway starts its own."""
        return self.redis_url is None and self.sentinel is None

    @model_validator(mode="before")
    @classmethod
    def _null_sections(cls, data: Any) -> Any:
        return _null_sections_as_empty(cls, data)

    @model_validator(mode="after")
    def _one_kind_of_store(self) -> StoreSettings:
        if self.sentinel is not None and self.redis_url is not None:
            raise _refusal("set either redis_url or sentinel, not both")
        return self


@dataclass(frozen=True, config=SECTION)
class QuotaSettings:
    max_in_flight: Count = 2
    wait_s: SecondsOrZero = 20.0
    max_job_s: Seconds = 3600.0
    # CONTRACT §8. `queue`: a job that gets no slot now is stored and answered at once;
    # `wait`: the request waits up to wait_s, then 429, as before the queue.
    when_full: Literal["queue", "wait"] = "queue"
    max_queued: Count = 500  # queued jobs, all teams together; beyond: 429 queue_full
    # A job queued longer fails with queue_timeout; at most a week, the life of a queued
    # job's record (registry.UNSETTLED_TTL_S).
    max_queue_s: Seconds = 86400.0
    # A larger request body (an upload) is not stored in Redis: it waits as in `wait`.
    max_queued_body_bytes: Count = 8_388_608
    fair_window_s: Seconds = 3600.0  # how far back slot time counts for the fair share

    @model_validator(mode="after")
    def _queue_outlived_by_its_records(self) -> QuotaSettings:
        if self.max_queue_s > MAX_QUEUE_S:
            raise _refused_at([(("max_queue_s",), f"must be at most {MAX_QUEUE_S:g} (a week)")])
        return self


@dataclass(frozen=True, config=SECTION)
class TrackerSettings:
    poll_interval_s: Seconds = 5.0
    lease_s: Seconds = 30.0

    @model_validator(mode="after")
    def _lease_outlasts_two_polls(self) -> TrackerSettings:
        # A live replica renews once per poll: a shorter lease would let others adopt
        # its jobs while it is healthy.
        if self.lease_s < 2 * self.poll_interval_s:
            raise _refused_at([(("lease_s",), "must be at least twice tracker.poll_interval_s")])
        return self


@dataclass(frozen=True, config=SECTION)
class LimitsSettings:
    max_body_bytes: Count = 52_428_800
    # A request body must arrive within this long: a slow upload cannot hold a
    # connection (or the slot it would take) forever.
    body_timeout_s: Seconds = 60.0
    # A download whose client accepts no byte for this long is cut off: a reader that
    # stopped cannot hold a connection and an upstream stream forever.
    client_idle_timeout_s: Seconds = 120.0
    # Downloads relayed at once by one replica, and by one team on one replica. Each
    # holds an upstream connection of its own pool and up to 1 MiB of buffers while
    # its client is slower than upstream; beyond either bound a download is 429.
    max_downloads: Count = 128
    max_team_downloads: Count = 32
    # Calls one team may have on this replica's api upstream pool at once (retrieves,
    # deletes, creates, characters), waiting or not; beyond it: 429. Less than the
    # pool's 128 connections, so one team's slow calls leave the others room.
    max_team_upstream_calls: Annotated[Count, AfterValidator(_below_api_pool)] = 112

    @model_validator(mode="after")
    def _team_share_within_the_whole(self) -> LimitsSettings:
        if self.max_team_downloads > self.max_downloads:
            raise _refused_at([(("max_team_downloads",), "must be at most limits.max_downloads")])
        return self


@dataclass(frozen=True, config=SECTION)
class LoggingSettings:
    level: Literal["info", "debug", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


@dataclass(frozen=True, config=SECTION)
class MetricsSettings:
    # When set, /metrics answers only `Authorization: Bearer <token>`.
    bearer_token: BearerToken | None = Field(default=None, repr=False)


@dataclass(frozen=True, config=SECTION)
class TeamSettings:
    name: TeamName
    key_sha256: Annotated[
        NonEmpty[KeyDigest],
        BeforeValidator(_one_or_more),
        Problem("expected a list of SHA-256 hex digests"),
    ]
    max_in_flight: Count | None = None
    weight: Weight = 1.0
    max_queued: Count | None = None  # this team's queued jobs; beyond: 429 team_queue_full
    # CONTRACT §9. None: every model in `pricing` (any, if pricing is empty); any size;
    # any length; no budget of that period.
    models: AllowedModels | None = None
    sizes: AllowedSizes | None = None
    max_seconds: MaxJobSeconds | None = None  # an extension: the seconds it adds
    budget_usd_per_day: Budget | None = None  # UTC days
    budget_usd_per_month: Budget | None = None  # UTC months


def _distinct(teams: tuple[TeamSettings, ...]) -> tuple[TeamSettings, ...]:
    """Each team name and each key digest once over all teams: a key names one team."""
    problems: list[tuple[Loc, str]] = []
    names: set[str] = set()
    digests: set[str] = set()
    for i, team in enumerate(teams):
        if team.name in names:
            problems.append(((i, "name"), f"duplicate team name {team.name!r}"))
        names.add(team.name)
        for j, digest in enumerate(team.key_sha256):
            if digest in digests:
                problems.append(((i, "key_sha256", j), "this key digest is already used"))
            digests.add(digest)
    if problems:
        raise _refused_at(problems)
    return teams


Team = Annotated[TeamSettings, Problem("expected a mapping with name and key_sha256")]


@dataclass(frozen=True, config=SECTION)
class AdminSettings:
    """Keys of the /admin routes, as SHA-256 digests; none: those routes answer 401."""

    key_sha256: Annotated[
        tuple[KeyDigest, ...],
        Strict(),
        BeforeValidator(_as_tuple),
        BeforeValidator(_one_or_more),
        Problem("expected a list of SHA-256 hex digests"),
    ] = ()


@dataclass(frozen=True, config=SECTION)
class UsageSettings:
    retention_days: Count = 400  # how long a team's daily usage is kept


@dataclass(frozen=True, config=SECTION)
class Settings:
    upstream: UpstreamSettings
    teams: Annotated[
        NonEmpty[Team], AfterValidator(_distinct), Problem("at least one team is required")
    ]
    store: StoreSettings = StoreSettings()
    quota: QuotaSettings = QuotaSettings()
    tracker: TrackerSettings = TrackerSettings()
    limits: LimitsSettings = LimitsSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    # CONTRACT §9: USD per second of video, model -> size (or "*") -> price. Empty: no
    # job costs anything, and no budget can be set.
    pricing: Pricing = Field(default_factory=dict)
    admin: AdminSettings = AdminSettings()
    usage: UsageSettings = UsageSettings()

    @model_validator(mode="before")
    @classmethod
    def _null_sections(cls, data: Any) -> Any:
        data = _null_sections_as_empty(cls, data)
        if isinstance(data, dict) and "pricing" in data and data["pricing"] is None:
            return {**data, "pricing": {}}  # `pricing:` with only comments under it
        return data

    @model_validator(mode="after")
    def _policy_fits_pricing_and_keys(self) -> Settings:
        problems = [*_unpriced_or_unchargeable(self.teams, self.pricing)]
        problems += _admin_keys_of_teams(self.admin.key_sha256, self.teams)
        if problems:
            raise _refused_at(problems)
        return self


def _unpriced_or_unchargeable(
    teams: tuple[TeamSettings, ...], pricing: dict[str, dict[str, float]]
) -> Iterable[tuple[Loc, str]]:
    """With prices, every model a team may use has one (else its jobs could not be
    charged); without, no budget (nothing would ever be charged against it)."""
    for i, team in enumerate(teams):
        for j, model in enumerate(team.models or ()):
            if pricing and model not in pricing:
                yield ("teams", i, "models", j), f"{model!r} has no price in pricing"
        for period in ("budget_usd_per_day", "budget_usd_per_month"):
            if not pricing and getattr(team, period) is not None:
                yield ("teams", i, period), "a budget needs prices, and pricing is empty"


def _admin_keys_of_teams(
    digests: tuple[str, ...], teams: tuple[TeamSettings, ...]
) -> Iterable[tuple[Loc, str]]:
    """An admin key is never also a team key: a key names one caller, and a team's
    key holder must not read every team's usage."""
    owners = {digest: team.name for team in teams for digest in team.key_sha256}
    for j, digest in enumerate(digests):
        if digest in owners:
            yield (
                ("admin", "key_sha256", j),
                (
                    f"this key digest is a key of team {owners[digest]!r}; an admin key must be "
                    "its own"
                ),
            )
