"""Typed settings from one YAML file.

The file is the whole configuration: `${VAR}` references are expanded from the
environment (so the upstream token can live outside the file), every field is
checked, and each problem is reported with the path of the field that has it,
because an operator fixing a config at 3 a.m. should not have to guess.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .parse import whole_number
from .pools import API_CONNECTIONS
from .scrub import redact_url, url_secret

log = logging.getLogger("gateway.config")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TEAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConfigError(Exception):
    """The configuration is unusable; `problems` lists each one as 'field: what is wrong'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def report(self) -> str:
        return "\n".join(f"{self.source}: {problem}" for problem in self.problems)


@dataclass(frozen=True)
class UpstreamSettings:
    base_url: str
    token: str = field(repr=False)
    auth_header: str = "authorization"
    remix_route: str = "path"
    timeout_s: float = 60.0


@dataclass(frozen=True)
class SentinelSettings:
    master_name: str
    hosts: tuple[tuple[str, int], ...]
    password: str | None = field(default=None, repr=False)  # the Redis servers'
    sentinel_password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class StoreSettings:
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    data_dir: str = ".sora-gateway/store"
    sentinel: SentinelSettings | None = None

    @property
    def embedded(self) -> bool:
        """No shared store is configured: the gateway starts its own."""
        return self.redis_url is None and self.sentinel is None


@dataclass(frozen=True)
class QuotaSettings:
    max_in_flight: int = 2
    wait_s: float = 20.0
    max_job_s: float = 3600.0


@dataclass(frozen=True)
class TrackerSettings:
    poll_interval_s: float = 5.0
    lease_s: float = 30.0


@dataclass(frozen=True)
class LimitsSettings:
    max_body_bytes: int = 52_428_800
    # A request body must arrive within this long: a slow upload cannot hold a
    # connection (or the slot it would take) forever.
    body_timeout_s: float = 60.0
    # A download whose client accepts no byte for this long is cut off: a reader that
    # stopped cannot hold a connection and an upstream stream forever.
    client_idle_timeout_s: float = 120.0
    # Downloads relayed at once by one replica, and by one team on one replica. Each
    # holds an upstream connection of its own pool and up to 1 MiB of buffers while
    # its client is slower than upstream; beyond either bound a download is 429.
    max_downloads: int = 128
    max_team_downloads: int = 32
    # Calls one team may have on this replica's api upstream pool at once (retrieves,
    # deletes, creates, characters), waiting or not; beyond it: 429. Less than the
    # pool's 128 connections, so one team's slow calls leave the others room.
    max_team_upstream_calls: int = 112


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class MetricsSettings:
    # When set, /metrics answers only `Authorization: Bearer <token>`.
    bearer_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TeamSettings:
    name: str
    key_sha256: tuple[str, ...]
    max_in_flight: int | None = None


@dataclass(frozen=True)
class Settings:
    upstream: UpstreamSettings
    teams: tuple[TeamSettings, ...]
    store: StoreSettings = StoreSettings()
    quota: QuotaSettings = QuotaSettings()
    tracker: TrackerSettings = TrackerSettings()
    limits: LimitsSettings = LimitsSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read, expand and validate the YAML file at `path`."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read file: {exc.strerror}"]) from exc
    return parse_settings(text, source=source)


def parse_settings(
    text: str, source: str = "<config>", environ: dict[str, str] | None = None
) -> Settings:
    """Validate YAML text; all problems are collected before raising."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [yaml_problem(exc, text)]) from None
    except RecursionError:
        raise ConfigError(source, ["not valid YAML: nested too deeply"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the file must be a YAML mapping"])
    checker = _Checker(os.environ if environ is None else environ)
    expanded = checker.expand(raw, "")
    settings = checker.settings(expanded)
    if checker.problems:
        raise ConfigError(source, checker.problems)
    assert settings is not None
    return settings


# What each PyYAML error means, in words that hold no document text: PyYAML's own
# messages quote what they found ("found undefined alias 'sk-...'"), and a value that
# starts with *, & or ! (YAML's alias, anchor and tag marks) may well be the token.
_YAML_PROBLEMS = (
    (yaml.reader.ReaderError, "a character YAML does not allow"),
    (yaml.scanner.ScannerError, "a character or escape YAML cannot read here"),
    (yaml.parser.ParserError, "the structure is broken (check the indentation)"),
    (
        yaml.composer.ComposerError,
        "an alias or anchor (a value starting with * or &; quote such a value)",
    ),
    (
        yaml.constructor.ConstructorError,
        "a tag this loader does not accept (a value starting with !; quote such a value)",
    ),
)


def yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """Where the YAML is broken and what kind of break it is; never what it found."""
    description = next(
        (words for kind, words in _YAML_PROBLEMS if isinstance(exc, kind)), "a syntax error"
    )
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        line, column = mark.line + 1, mark.column + 1
    elif isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
    else:
        return f"not valid YAML: {description}"
    return f"not valid YAML at line {line}, column {column}: {description}"


class _Checker:
    """Walks the raw mapping, collecting problems instead of stopping at the first."""

    def __init__(self, environ: os._Environ[str] | dict[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []
        self._unset: set[str] = set()  # fields already reported for a missing variable

    def fail(self, where: str, message: str) -> None:
        if where not in self._unset:
            self.problems.append(f"{where}: {message}")

    def expand(self, value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {k: self.expand(v, _join(where, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [self.expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            return _ENV_REF.sub(lambda m: self._env(m.group(1), where), value)
        return value

    def _env(self, name: str, where: str) -> str:
        if name not in self.environ:
            self.fail(where, f"environment variable {name} is not set")
            self._unset.add(where)
            return ""
        return self.environ[name]

    def section(self, raw: dict[str, Any], name: str, known: set[str]) -> dict[str, Any]:
        value = raw.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(name, "expected a mapping")
            return {}
        for key in value.keys() - known:
            self.fail(_join(name, str(key)), "unknown field")
        return value

    def number(
        self, sec: dict[str, Any], where: str, key: str, default: float, *, allow_zero: bool = False
    ) -> float:
        value = sec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(_join(where, key), f"expected a number, got {value!r}")
            return default
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            self.fail(
                _join(where, key), "must be zero or more" if allow_zero else "must be positive"
            )
            return default
        return float(value)

    def integer(self, sec: dict[str, Any], where: str, key: str, default: int) -> int:
        value = sec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(_join(where, key), f"expected a whole number, got {value!r}")
            return default
        if value < 1:
            self.fail(_join(where, key), "must be at least 1")
            return default
        return value

    def choice(self, sec: dict[str, Any], where: str, key: str, options: tuple[str, ...]) -> str:
        value = sec.get(key, options[0])
        if value not in options:
            self.fail(_join(where, key), f"expected one of {', '.join(options)}, got {value!r}")
            return options[0]
        return value

    def settings(self, raw: dict[str, Any]) -> Settings | None:
        sections = {
            "upstream",
            "store",
            "quota",
            "tracker",
            "limits",
            "logging",
            "metrics",
            "teams",
        }
        for key in raw.keys() - sections:
            self.fail(str(key), "unknown field")
        upstream = self.upstream(raw)
        store = self.store(raw)
        quota_sec = self.section(raw, "quota", {"max_in_flight", "wait_s", "max_job_s"})
        quota = QuotaSettings(
            max_in_flight=self.integer(quota_sec, "quota", "max_in_flight", 2),
            wait_s=self.number(quota_sec, "quota", "wait_s", 20.0, allow_zero=True),
            max_job_s=self.number(quota_sec, "quota", "max_job_s", 3600.0),
        )
        tracker_sec = self.section(raw, "tracker", {"poll_interval_s", "lease_s"})
        tracker = TrackerSettings(
            poll_interval_s=self.number(tracker_sec, "tracker", "poll_interval_s", 5.0),
            lease_s=self.number(tracker_sec, "tracker", "lease_s", 30.0),
        )
        if tracker.lease_s < 2 * tracker.poll_interval_s:
            # A live replica renews once per poll: a shorter lease would let others
            # adopt its jobs while it is healthy.
            self.fail("tracker.lease_s", "must be at least twice tracker.poll_interval_s")
        limits_sec = self.section(
            raw,
            "limits",
            {
                "max_body_bytes",
                "body_timeout_s",
                "client_idle_timeout_s",
                "max_downloads",
                "max_team_downloads",
                "max_team_upstream_calls",
            },
        )
        limits = LimitsSettings(
            max_body_bytes=self.integer(limits_sec, "limits", "max_body_bytes", 52_428_800),
            body_timeout_s=self.number(limits_sec, "limits", "body_timeout_s", 60.0),
            client_idle_timeout_s=self.number(limits_sec, "limits", "client_idle_timeout_s", 120.0),
            max_downloads=self.integer(limits_sec, "limits", "max_downloads", 128),
            max_team_downloads=self.integer(limits_sec, "limits", "max_team_downloads", 32),
            max_team_upstream_calls=self.integer(
                limits_sec, "limits", "max_team_upstream_calls", 112
            ),
        )
        if limits.max_team_downloads > limits.max_downloads:
            self.fail("limits.max_team_downloads", "must be at most limits.max_downloads")
        if limits.max_team_upstream_calls >= API_CONNECTIONS:
            self.fail(
                "limits.max_team_upstream_calls",
                f"must be less than the api pool's {API_CONNECTIONS} connections",
            )
        logging_sec = self.section(raw, "logging", {"level", "format"})
        logging = LoggingSettings(
            level=self.choice(
                logging_sec, "logging", "level", ("info", "debug", "warning", "error")
            ),
            format=self.choice(logging_sec, "logging", "format", ("json", "text")),
        )
        metrics_sec = self.section(raw, "metrics", {"bearer_token"})
        bearer = metrics_sec.get("bearer_token")
        if bearer is not None and (not isinstance(bearer, str) or not bearer.strip()):
            self.fail("metrics.bearer_token", "expected a non-empty string")
            bearer = None
        elif bearer is not None and not _one_line(bearer.strip()):
            self.fail("metrics.bearer_token", "must be one line (it holds a line break)")
            bearer = None
        teams = self.teams(raw.get("teams"))
        if upstream is None:
            return None
        return Settings(
            upstream,
            teams,
            store,
            quota,
            tracker,
            limits,
            logging,
            MetricsSettings(bearer_token=bearer.strip() if bearer else None),
        )

    def upstream(self, raw: dict[str, Any]) -> UpstreamSettings | None:
        if "upstream" not in raw:
            self.fail("upstream", "required")
            return None
        sec = self.section(
            raw,
            "upstream",
            {"base_url", "token", "token_file", "auth_header", "remix_route", "timeout_s"},
        )
        auth_header = self.choice(sec, "upstream", "auth_header", ("authorization", "api-key"))
        base_url = sec.get("base_url")
        if not isinstance(base_url, str) or not base_url:
            self.fail("upstream.base_url", "required")
            base_url = ""
        elif not re.match(r"^https?://[^/\s]+", base_url):
            self.fail("upstream.base_url", f"expected an http(s) URL, got {redact_url(base_url)!r}")
        elif auth_header == "authorization" and url_secret(base_url):
            # The HTTP client would send them as Basic auth, in the header the token needs.
            self.fail(
                "upstream.base_url",
                "credentials in the URL cannot be sent with auth_header: authorization; "
                "remove them (the token is the credential)",
            )
        token = sec.get("token")
        token_file = sec.get("token_file")
        if token_file is not None:
            if token is not None:
                self.fail("upstream.token_file", "set either token or token_file, not both")
            token = self._read_secret(token_file, "upstream.token_file")
        if not isinstance(token, str) or not token.strip():
            # Never echo the value: it may be a real credential with a typo.
            self.fail("upstream.token", "required (usually token: ${SORA_UPSTREAM_TOKEN})")
            token = ""
        elif not _one_line(token.strip()):
            # Sent as a header value: a line break would end the header, or be refused
            # on every call. A second line is most likely something else pasted in.
            self.fail("upstream.token", "must be one line (it holds a line break)")
        return UpstreamSettings(
            base_url=base_url.rstrip("/"),
            token=token.strip(),
            auth_header=auth_header,
            remix_route=self.choice(sec, "upstream", "remix_route", ("path", "body")),
            timeout_s=self.number(sec, "upstream", "timeout_s", 60.0),
        )

    def _read_secret(self, path: Any, where: str) -> str | None:
        """A secret mounted as a file (Docker and Kubernetes secrets).

        One line: the single line break an editor or `echo` leaves at the end is
        dropped, any other is refused. A file others may read is accepted (a mounted
        secret's mode is the orchestrator's) but warned about: world-readable, or
        group-readable by a group the gateway is not in (Kubernetes' `fsGroup` makes a
        secret readable through the pod's own group, which is fine).
        """
        if not isinstance(path, str) or not path:
            self.fail(where, "expected a file path")
            return None
        try:
            with open(path, encoding="utf-8", newline="") as file:
                info = os.fstat(file.fileno())
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            self.fail(where, f"cannot read {path}: {reason}")
            self._unset.add("upstream.token")
            return None
        self._unset.add("upstream.token")  # every problem with the value is reported here
        if _readable_by_others(info):
            log.warning(
                "%s: %s can be read by other users (mode %s); chmod 600 it",
                where,
                path,
                oct(stat.S_IMODE(info.st_mode)),
            )
        value = text.removesuffix("\n").removesuffix("\r").strip(" \t")
        if not value.strip():
            self.fail(where, f"{path} is empty")
        elif not _one_line(value):
            self.fail(where, f"{path} holds more than one line; it must hold only the token")
        return value

    def store(self, raw: dict[str, Any]) -> StoreSettings:
        sec = self.section(raw, "store", {"redis_url", "data_dir", "sentinel"})
        url = sec.get("redis_url")
        if url is not None and (
            not isinstance(url, str) or not re.match(r"^(redis|rediss|unix)://", url)
        ):
            self.fail("store.redis_url", "expected a redis://, rediss:// or unix:// URL")
            url = None
        data_dir = sec.get("data_dir", StoreSettings.data_dir)
        if not isinstance(data_dir, str) or not data_dir:
            self.fail("store.data_dir", "expected a directory path")
            data_dir = StoreSettings.data_dir
        sentinel = self.sentinel(sec) if "sentinel" in sec else None
        if sentinel is not None and url:
            self.fail("store", "set either redis_url or sentinel, not both")
        return StoreSettings(redis_url=url or None, data_dir=data_dir, sentinel=sentinel)

    def sentinel(self, store: dict[str, Any]) -> SentinelSettings | None:
        sec = self.section(
            store, "sentinel", {"master_name", "hosts", "password", "sentinel_password"}
        )
        where = "store.sentinel"
        name = sec.get("master_name")
        if not isinstance(name, str) or not name:
            self.fail(f"{where}.master_name", "required")
        hosts: list[tuple[str, int]] = []
        raw_hosts = sec.get("hosts")
        if not isinstance(raw_hosts, list) or not raw_hosts:
            self.fail(f"{where}.hosts", "expected a list of host:port")
            raw_hosts = []
        for i, entry in enumerate(raw_hosts):
            host, _, port_text = str(entry).rpartition(":")
            port = whole_number(port_text)
            if not host or port is None:
                self.fail(f"{where}.hosts[{i}]", f"expected host:port, got {entry!r}")
                continue
            hosts.append((host, port))
        secrets = {}
        for key in ("password", "sentinel_password"):
            value = sec.get(key)
            if value is not None and not isinstance(value, str):
                self.fail(f"{where}.{key}", "expected a string")
                value = None
            secrets[key] = value or None
        if not isinstance(name, str) or not name or not hosts:
            return None
        return SentinelSettings(name, tuple(hosts), **secrets)

    def teams(self, raw: Any) -> tuple[TeamSettings, ...]:
        if not isinstance(raw, list) or not raw:
            self.fail("teams", "at least one team is required")
            return ()
        teams: list[TeamSettings] = []
        names: set[str] = set()
        digests: set[str] = set()
        for i, entry in enumerate(raw):
            where = f"teams[{i}]"
            if not isinstance(entry, dict):
                self.fail(where, "expected a mapping with name and key_sha256")
                continue
            for key in entry.keys() - {"name", "key_sha256", "max_in_flight"}:
                self.fail(_join(where, str(key)), "unknown field")
            name = entry.get("name")
            if not isinstance(name, str) or not _TEAM_NAME.fullmatch(name):
                self.fail(
                    f"{where}.name",
                    "expected 1-63 letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit",
                )
                name = f"team{i}"
            elif name == "anonymous":
                self.fail(f"{where}.name", "'anonymous' is reserved for unauthenticated requests")
            elif name in names:
                self.fail(f"{where}.name", f"duplicate team name {name!r}")
            names.add(name)
            keys = entry.get("key_sha256")
            if isinstance(keys, str):
                keys = [keys]
            if not isinstance(keys, list) or not keys:
                self.fail(f"{where}.key_sha256", "expected a list of SHA-256 hex digests")
                keys = []
            clean: list[str] = []
            for j, digest in enumerate(keys):
                kwhere = f"{where}.key_sha256[{j}]"
                if not isinstance(digest, str) or not _HEX64.fullmatch(digest.strip().lower()):
                    self.fail(kwhere, "expected 64 hex characters")
                    continue
                digest = digest.strip().lower()
                if digest in digests:
                    self.fail(kwhere, "this key digest is already used")
                digests.add(digest)
                clean.append(digest)
            cap = entry.get("max_in_flight")
            if cap is not None:
                cap = self.integer(entry, where, "max_in_flight", 1)
            teams.append(TeamSettings(name=name, key_sha256=tuple(clean), max_in_flight=cap))
        return tuple(teams)


def _readable_by_others(info: os.stat_result) -> bool:
    mode = info.st_mode
    if mode & stat.S_IROTH:
        return True
    own_groups = {os.getegid(), *os.getgroups()}
    return bool(mode & stat.S_IRGRP) and info.st_gid not in own_groups


def _one_line(value: str) -> bool:
    return "\n" not in value and "\r" not in value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
