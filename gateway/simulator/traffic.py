"""What reached the simulated upstream, so tests can assert what the gateway sent.

Credentials are kept only as fingerprints: `/_sim/*` needs no credential, so whatever it
shows anyone can read, and a simulator may be handed a real token by mistake. A test
compares `fingerprint(token)` instead of the token.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Any

LOG_CAPACITY = 1000
CREDENTIALS_CAPACITY = 1000
# Request headers that carry a credential: logged as fingerprints, never in clear.
CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "proxy-authorization"})


def fingerprint(credential: str) -> str:
    """`sha256:` and 16 hex digits of the credential's SHA-256: tells credentials apart
    without showing one."""
    return "sha256:" + hashlib.sha256(credential.encode()).hexdigest()[:16]


def redacted_header(value: str) -> str:
    """`Bearer <fingerprint>` for a scheme and credential, else the fingerprint alone."""
    scheme, space, credential = value.strip().partition(" ")
    if space and credential.strip():
        return f"{scheme} {fingerprint(credential.strip())}"
    return fingerprint(value.strip())


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
        shown = {
            name: redacted_header(value) if name in CREDENTIAL_HEADERS else value
            for name, value in headers.items()
        }
        self._log.append({"method": method, "path": path, "query": query, "headers": shown})

    def saw_credential(self, value: str) -> None:
        """Remember a distinct credential's fingerprint, in first-seen order (bounded)."""
        key = fingerprint(value)
        if key not in self._credentials and len(self._credentials) < CREDENTIALS_CAPACITY:
            self._credentials[key] = None

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
