"""The store clients of one replica: one per kind of work, each with its own bounded pool.

Sharing one pool let any route starve the others: ~300 keep-alive clients on `/readyz`
held every connection and every create failed. Here admission never shares a
connection with what an unauthenticated caller can trigger:

- `ledger`: admission's slot scripts (acquire, bind, a refused create's release);
- `tracker`: the tracker's slot scripts (renew, adopt, bind, release): however many
  creates wait, the slots their waiting is for are still freed on time;
- `registry`: video and character records (every command safe to send twice);
- `ops`: the readiness check and `/metrics`' quota read, both at most one at a time;
- `pubsub`: the one connection the release listener keeps subscribed.

Every pool waits briefly for a free connection (`store.POOL_WAIT_S`) before StoreBusy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from redis.asyncio import Redis

from .config import SentinelSettings
from .store import connect, connect_sentinel

# Admission runs short scripts; each team's first waiters re-check at one release.
LEDGER_POOL = 64
# One tick at a time, its parallel polls bounded (tracker.MAX_PARALLEL_POLLS) and each
# followed by a renew or a release.
TRACKER_POOL = 16
# Retrieves and lists batch their reads (batching.py), so fewer connections carry them.
REGISTRY_POOL = 64
# One readiness check and one shared metrics read, never more.
OPS_POOL = 2


@dataclass(frozen=True)
class StoreClients:
    ledger: Redis
    tracker: Redis
    registry: Redis
    ops: Redis
    pubsub: Redis

    @classmethod
    def open(cls, url: str | None, sentinel: SentinelSettings | None) -> StoreClients:
        """Clients for `url`, or for the primary that `sentinel` names."""

        def client(size: int, *, retry_once: bool = False) -> Redis:
            if url is not None:
                return connect(url, max_connections=size, retry_once=retry_once)
            assert sentinel is not None
            return connect_sentinel(sentinel, max_connections=size, retry_once=retry_once)

        return cls(
            # A repeated slot acquire could take two slots: never retried.
            ledger=client(LEDGER_POOL),
            tracker=client(TRACKER_POOL),
            # Every registry command is a read or an idempotent write: it may be sent twice.
            registry=client(REGISTRY_POOL, retry_once=True),
            # PING and reads: a restart's first failed command is simply sent again.
            ops=client(OPS_POOL, retry_once=True),
            pubsub=client(1),
        )

    async def aclose(self) -> None:
        await asyncio.gather(
            self.ledger.aclose(),
            self.tracker.aclose(),
            self.registry.aclose(),
            self.ops.aclose(),
            self.pubsub.aclose(),
        )
