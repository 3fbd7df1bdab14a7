"""The embedded store's files: its append-only file holds every prompt and who owns what.

A real server started the way `serve` starts it (persistent), in a directory that
already exists with a loose mode, as an earlier version would have left it.
"""

from __future__ import annotations

import stat
from pathlib import Path

import redis

from gateway.embedded_store import EmbeddedRedis
from support.processes import wait_until


def test_the_embedded_stores_directory_and_files_are_for_its_user_only(tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    with EmbeddedRedis(data_dir, persistent=True) as store:
        client = redis.Redis.from_url(store.url)
        try:
            client.set("gw:video:video_1", "a prompt worth keeping private")
            client.bgrewriteaof()  # a rewrite makes fresh files too
            wait_until(
                lambda: (
                    client.info("persistence")["aof_rewrite_in_progress"] == 0
                    and client.info("persistence")["aof_rewrite_scheduled"] == 0
                ),
                10,
                "the AOF rewrite finished",
            )
        finally:
            client.close()
        files = [path for path in data_dir.rglob("*") if path.is_file()]
        assert any("aof" in path.name for path in files), files
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        for path in [data_dir, *data_dir.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o077 == 0, f"{path.relative_to(tmp_path)} is {oct(mode)}"
