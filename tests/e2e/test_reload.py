"""Key rotation without a restart: SIGHUP or a changed file swaps the teams in place."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from gateway.auth import key_digest, new_key
from support.processes import Process, start_gateway, wait_until, write_config
from support.stack import Stack, gateway_config


def status_with(gateway: Process, key: str) -> int:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.get(gateway.url + "/v1/videos", headers=headers, timeout=5).status_code


@pytest.fixture
def rotating(session_stack: Stack, workdir: Path):
    old, new = new_key(), new_key()
    config = gateway_config(
        session_stack.simulator.url, session_stack.store.url, session_stack.token, {}
    )
    config["teams"] = [{"name": "rotating", "key_sha256": [key_digest(old)]}]
    gateway = start_gateway(workdir, config)
    path = Path(gateway.args[gateway.args.index("--config") + 1])
    yield gateway, path, config, old, new
    gateway.stop()


def rewrite(path: Path, config: dict, *digests: str) -> None:
    config["teams"] = [{"name": "rotating", "key_sha256": list(digests)}]
    write_config(path, config)


def test_sighup_rotates_a_key_with_an_overlap(rotating) -> None:
    gateway, path, config, old, new = rotating
    assert status_with(gateway, new) == 401

    rewrite(path, config, key_digest(old), key_digest(new))
    gateway.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: status_with(gateway, new) == 200, 10, "the new key is accepted")
    assert status_with(gateway, old) == 200, "both keys work during the overlap"
    # The signal did it, not the file watcher that would have caught up seconds later.
    assert '"trigger": "signal"' in gateway.log()

    rewrite(path, config, key_digest(new))
    gateway.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: status_with(gateway, old) == 401, 10, "the old key is refused")
    assert status_with(gateway, new) == 200
    assert gateway.popen.poll() is None, "SIGHUP must not stop the gateway"


def test_a_changed_file_is_picked_up_without_a_signal(rotating) -> None:
    gateway, path, config, old, new = rotating
    rewrite(path, config, key_digest(new))
    wait_until(lambda: status_with(gateway, new) == 200, 10, "the file change is applied")
    assert status_with(gateway, old) == 401
    assert '"trigger": "file"' in gateway.log()


def test_an_invalid_file_changes_nothing(rotating) -> None:
    gateway, path, config, old, new = rotating
    config["teams"] = [{"name": "rotating", "key_sha256": ["not-a-digest", key_digest(new)]}]
    write_config(path, config)
    gateway.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: "config change refused" in gateway.log(), 10, "the refusal is logged")
    assert status_with(gateway, old) == 200, "the config in force stays"
    assert status_with(gateway, new) == 401
    assert "teams[0].key_sha256[0]" in gateway.log(), "the log names the bad field"
