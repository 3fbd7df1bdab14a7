"""`sora-gateway new-key --admin`: a key once, then the `admin:` line to paste."""

from __future__ import annotations

import textwrap

import pytest

from gateway.__main__ import main
from gateway.auth import ADMIN_KEY_PREFIX, key_digest
from gateway.config import parse_settings

CONFIG = textwrap.dedent(
    """\
    upstream: {base_url: "https://api.example.com/v1", token: t}
    teams: [{name: a, key_sha256: ["%s"]}]
    """
) % ("a" * 64)


def test_new_key_admin_prints_the_key_then_a_pasteable_admin_line(capsys):
    assert main(["new-key", "--admin"]) == 0
    key, line = capsys.readouterr().out.splitlines()
    assert key.startswith(ADMIN_KEY_PREFIX)
    assert key not in line  # the config gets only the digest
    settings = parse_settings(CONFIG + line + "\n", environ={})
    assert settings.admin.key_sha256 == (key_digest(key),)


@pytest.mark.parametrize("argv", [["new-key"], ["new-key", "team", "--admin"]])
def test_new_key_takes_a_team_or_admin_not_both_nor_neither(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "--admin" in capsys.readouterr().err
