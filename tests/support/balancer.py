"""What a load balancer in front of the replicas gives an SDK client: its requests go to
a home replica and, when that one refuses the connection (killed, not up again yet), to
the next one that takes it. Nothing was sent on a refused connection, so moving it is
safe even for a create; a request cut mid-way is left to the SDK's own retries.

Every answer's status is counted before the SDK sees it, so a test can tell that no
client ever got a 429, even one the SDK would have retried quietly.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import httpx2
from openai import AsyncOpenAI

LIMITS = httpx2.Limits(max_connections=200, max_keepalive_connections=100)


@dataclass
class Answers:
    """What the clients received: statuses by route kind, and when creates were answered."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    created: list[float] = field(default_factory=list)  # monotonic times of 200s to creates
    moved: int = 0  # requests sent to another replica than their home

    def count(self, status: int) -> int:
        return sum(n for (_, code), n in self.statuses.items() if code == status)


class Failover(httpx2.AsyncBaseTransport):
    """Sends to `ports[home]` first, then the others in turn, on a refused connection."""

    def __init__(self, ports: list[int], home: int, answers: Answers) -> None:
        self._ports = ports
        self._home = home
        self._answers = answers
        self._inner = httpx2.AsyncHTTPTransport(limits=LIMITS)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        refused: httpx2.ConnectError | None = None
        for step in range(len(self._ports)):
            port = self._ports[(self._home + step) % len(self._ports)]
            request.url = request.url.copy_with(port=port)
            request.headers["host"] = f"{request.url.host}:{port}"
            try:
                response = await self._inner.handle_async_request(request)
            except httpx2.ConnectError as exc:
                refused = exc
                continue
            self._answers.moved += step > 0
            self._note(request, response)
            return response
        assert refused is not None
        raise refused

    def _note(self, request: httpx2.Request, response: httpx2.Response) -> None:
        create = request.method == "POST" and request.url.path == "/v1/videos"
        self._answers.statuses["create" if create else request.method, response.status_code] += 1
        if create and response.status_code == 200:
            self._answers.created.append(time.monotonic())

    async def aclose(self) -> None:
        await self._inner.aclose()


def sdk_client(
    ports: list[int], home: int, key: str, answers: Answers, *, timeout: float = 60.0
) -> AsyncOpenAI:
    """The async SDK with its default retries, through a `Failover` from `home`."""
    transport = Failover(ports, home, answers)
    return AsyncOpenAI(
        base_url=f"http://127.0.0.1:{ports[home]}/v1",
        api_key=key,
        timeout=timeout,
        http_client=httpx2.AsyncClient(transport=transport, timeout=timeout),
    )
