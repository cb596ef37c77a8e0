"""Redis and Cassandra behind the protocols of ``handlers.py``.

Redis is a cache (DESIGN.md): the owner cache may be lost at any time and Cassandra's
``session_owners`` is asked again; idempotency keys and token buckets live only in
Redis, and losing them costs a duplicate TurnRequested (reasoning drops it, the
message is already in the session's log) or a moment without a rate limit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import redis.asyncio as aioredis

from shared.cassandra import Statements
from shared.ratelimit import BucketScript
from shared.telemetry import child_span

from .handlers import Claim, bucket_key, owner_key

CLAIM_SESSION = (
    "INSERT INTO {ks}.session_owners (session_id, tenant_id, created_at) VALUES (?, ?, ?) IF NOT EXISTS"
)


class SessionOwnership:
    """``session_owners`` in Cassandra (the truth, claimed by LWT) with a Redis cache of the owner."""

    def __init__(self, redis: aioredis.Redis, statements: Statements, *, cache_ttl_s: int) -> None:
        self._redis = redis
        self._statements = statements
        self._ttl_s = cache_ttl_s

    def prepare(self) -> None:
        """Prepare the claim statement (blocking: call it from a thread at start-up)."""
        self._statements.get(CLAIM_SESSION)

    async def claim(self, tenant_id: str, session_id: str) -> Claim:
        with child_span("redis", attributes={"db.system": "redis", "db.operation": "GET owner"}):
            cached = await self._redis.get(owner_key(session_id))
        if cached is not None:
            return Claim(cached.decode() if isinstance(cached, bytes) else str(cached))
        (row,) = await self._statements.run(CLAIM_SESSION, [session_id, tenant_id, dt.datetime.now(dt.UTC)])
        # Not applied: the row already there comes back, with the tenant that owns it. A claim
        # retried after an ambiguous timeout finds its own row, so retrying is safe (and says
        # "not created": only one claim of a session id ever applies).
        created = bool(row["[applied]"])
        owner = tenant_id if created else str(row["tenant_id"])
        # An owner never changes, so caching the answer (ours or another's) is always right.
        await self._redis.set(owner_key(session_id), owner, ex=self._ttl_s)
        return Claim(owner, created)


class RedisSeenMessages:
    """``idem:*`` keys: set only after the transaction that forwarded the message committed."""

    def __init__(self, redis: aioredis.Redis, *, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    async def seen(self, key: str) -> bool:
        with child_span("redis", attributes={"db.system": "redis", "db.operation": "EXISTS idem"}):
            return bool(await self._redis.exists(key))

    async def remember(self, keys: Iterable[str]) -> None:
        """Mark ``keys`` forwarded (SET NX EX); call only once their transaction committed."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, b"1", nx=True, ex=self._ttl_s)
            await pipe.execute()


class RedisTokenBucket:
    """One token bucket per tenant in ``bucket:tenant:{tenant}``, shared by every replica."""

    def __init__(self, redis: aioredis.Redis, *, rate_per_s: float, burst: int) -> None:
        self._script = BucketScript(redis)  # the same script as the model bucket (shared.ratelimit)
        self._rate = rate_per_s
        self._burst = burst

    async def allow(self, tenant_id: str) -> bool:
        with child_span("redis", attributes={"db.system": "redis", "db.operation": "EVALSHA tenant-bucket"}):
            granted, _, _ = await self._script.take(
                bucket_key(tenant_id), rate=self._rate, burst=self._burst, cost=1, least=1
            )
        return granted >= 1
