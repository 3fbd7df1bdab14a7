"""What reached the simulated upstream, so tests can assert what the gateway sent."""

from __future__ import annotations

from collections import deque
from typing import Any

LOG_CAPACITY = 1000
CREDENTIALS_CAPACITY = 1000


class Traffic:
    """Counters and a bounded log of /v1 requests; memory stays flat on long runs."""

    def __init__(self, capacity: int = LOG_CAPACITY) -> None:
        self.requests = 0
        self.auth_rejected = 0
        self.content_bytes_sent = 0  # content bytes the server has taken to send
        self._log: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._credentials: dict[str, None] = {}

    def record(self, method: str, path: str, query: str, headers: dict[str, str]) -> None:
        self.requests += 1
        self._log.append({"method": method, "path": path, "query": query, "headers": headers})

    def saw_credential(self, value: str) -> None:
        """Remember a distinct credential, in first-seen order (bounded)."""
        if value not in self._credentials and len(self._credentials) < CREDENTIALS_CAPACITY:
            self._credentials[value] = None

    def credentials(self) -> list[str]:
        return list(self._credentials)

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` requests, oldest first."""
        if limit <= 0:
            return []
        return list(self._log)[-limit:]

    def clear(self) -> None:
        self.requests = 0
        self.auth_rejected = 0
        self.content_bytes_sent = 0
        self._log.clear()
        self._credentials.clear()
