"""Typed settings from one YAML file.

The file is the whole configuration: `${VAR}` references are expanded from the
environment (so the upstream token can live outside the file), every field is
checked against the schema in `config_schema.py`, and each problem is reported with
the path of the field that has it, because an operator fixing a config at 3 a.m.
should not have to guess. All problems are collected before anything is raised.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from .config_problems import described, join
from .config_schema import (
    ANY_SIZE,
    AdminSettings,
    LimitsSettings,
    LoggingSettings,
    MetricsSettings,
    QuotaSettings,
    SentinelSettings,
    Settings,
    StoreSettings,
    TeamSettings,
    TrackerSettings,
    UpstreamDefaults,
    UpstreamSettings,
    UsageSettings,
)

__all__ = [
    "ANY_SIZE",
    "AdminSettings",
    "ConfigError",
    "LimitsSettings",
    "LoggingSettings",
    "MetricsSettings",
    "QuotaSettings",
    "SentinelSettings",
    "Settings",
    "StoreSettings",
    "TeamSettings",
    "TrackerSettings",
    "UpstreamDefaults",
    "UpstreamSettings",
    "UsageSettings",
    "load_settings",
    "parse_settings",
    "yaml_problem",
]

log = logging.getLogger("gateway.config")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Validates a plain mapping with the dataclasses' own validator, which pydantic built when
# config_schema was imported: about 25 ms of the ~90 ms pydantic adds to importing this
# module (and to `serve`'s start). This wrapper costs under 1 ms; a validation ~20 us,
# less than the checker it replaced, and small beside PyYAML's ~0.8 ms for the file.
_SCHEMA = TypeAdapter(Settings)


class ConfigError(Exception):
    """The configuration is unusable; `problems` lists each one as 'field: what is wrong'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def report(self) -> str:
        return "\n".join(f"{self.source}: {problem}" for problem in self.problems)


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
    inputs = _Inputs(os.environ if environ is None else environ)
    data = inputs.expand(raw, "")
    inputs.read_token_file(data)
    try:
        settings: Settings | None = _SCHEMA.validate_python(data)
    except ValidationError as exc:
        settings = None
        inputs.add(described(exc))
    # Raised here, not in the except: the ValidationError holds the values, secrets too.
    if settings is None or inputs.problems:
        raise ConfigError(source, inputs.problems)
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


class _Inputs:
    """Where values come from before the schema sees them: `${VAR}` and `token_file`.

    A problem found here is reported under the field it concerns, and the schema's own
    problem with that field (now empty, or missing) is dropped: it would only repeat it.
    """

    def __init__(self, environ: os._Environ[str] | dict[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []
        self._told: set[str] = set()  # fields whose problem is already reported

    def fail(self, where: str, message: str) -> None:
        if where not in self._told:
            self.problems.append(f"{where}: {message}")

    def add(self, problems: list[tuple[str, str]]) -> None:
        for where, message in problems:
            self.fail(where, message)

    def expand(self, value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {k: self.expand(v, join(where, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [self.expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            return _ENV_REF.sub(lambda m: self._env(m.group(1), where), value)
        return value

    def _env(self, name: str, where: str) -> str:
        if name not in self.environ:
            self.fail(where, f"environment variable {name} is not set")
            self._told.add(where)
            return ""
        return self.environ[name]

    def read_token_file(self, raw: dict[str, Any]) -> None:
        """`upstream.token_file` becomes `upstream.token`, read from that file."""
        upstream = raw.get("upstream")
        if not isinstance(upstream, dict) or upstream.get("token_file") is None:
            if isinstance(upstream, dict):
                upstream.pop("token_file", None)
            return
        where = "upstream.token_file"
        if upstream.get("token") is not None:
            self.fail(where, "set either token or token_file, not both")
        token = self._read_secret(upstream.pop("token_file"), where)
        if token is None:
            upstream.pop("token", None)
        else:
            upstream["token"] = token

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
            self._told.add("upstream.token")
            return None
        self._told.add("upstream.token")  # every problem with the value is reported here
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
        elif "\n" in value or "\r" in value:
            self.fail(where, f"{path} holds more than one line; it must hold only the token")
        return value


def _readable_by_others(info: os.stat_result) -> bool:
    mode = info.st_mode
    if mode & stat.S_IROTH:
        return True
    own_groups = {os.getegid(), *os.getgroups()}
    return bool(mode & stat.S_IRGRP) and info.st_gid not in own_groups
