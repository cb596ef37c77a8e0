"""Redis adapter: client factory and the hot-context store with compare-and-set on ``seq``.

Redis is a cache (DESIGN.md, "Sources of truth"): it may be stale, evicted or wiped
at any moment. Every hot-context entry carries the ``seq`` it reflects, and a write
only lands when it is newer than what Redis holds, so a slow or fenced replica can
never move a session's context backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.settings import RedisSettings
from shared.telemetry import child_span

__all__ = ["HotContext", "HotContextStore", "WriteBehind", "context_key", "make_redis"]

log = logging.getLogger(__name__)

WRITE_BEHIND = Counter(
    "agentbus_redis_write_behind_total",
    "Cache writes handed to the background writer, by outcome",
    ["outcome"],  # written | coalesced | dropped | failed
)


def make_redis(settings: RedisSettings) -> aioredis.Redis:
    """An asyncio client with timeouts and a bounded retry on connection errors.

    The pool blocks (up to the socket timeout) when all connections are busy instead of
    failing, so a burst of concurrent sessions queues for a connection.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_s * 5,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        decode_responses=False,
    )
    return aioredis.Redis(connection_pool=pool)


def context_key(tenant_id: str, session_id: str) -> str:
    """``ctx:{tenant}/{session}``: braces keep a session's keys in one Redis Cluster slot."""
    return f"ctx:{{{tenant_id}/{session_id}}}"


# KEYS[1] = context key; ARGV = seq, payload, ttl seconds. Writes only a strictly newer seq.
_CAS_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'seq')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return {0, current}
end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {1, ARGV[1]}
"""


@dataclass(frozen=True)
class HotContext:
    seq: int
    data: bytes


class HotContextStore:
    """``ctx:{session}`` hashes of (seq, data) with a TTL, written by compare-and-set."""

    def __init__(self, client: aioredis.Redis, *, ttl_s: int, writer: WriteBehind | None = None) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._cas = client.register_script(_CAS_SCRIPT)
        self._writer = writer
        if writer is not None:
            writer.uses_script(_CAS_SCRIPT)

    def put_later(self, tenant_id: str, session_id: str, seq: int, data: bytes) -> None:
        """:meth:`put_if_newer` through the background writer (without one: not written).

        Later puts of one session coalesce into the newest; the compare-and-set still holds.
        """
        if self._writer is None:
            return
        key = context_key(tenant_id, session_id)

        sha = self._cas.sha

        async def write(pipe: Pipeline) -> None:
            # EVALSHA itself, not the Script object: a Script in a pipeline makes redis-py
            # send SCRIPT EXISTS first, a second round trip per flush (the writer reloads
            # the script if Redis lost it).
            pipe.evalsha(sha, 1, key, seq, data, self._ttl_s)

        self._writer.submit(key, write)

    async def put_if_newer(self, tenant_id: str, session_id: str, seq: int, data: bytes) -> bool:
        """Store ``data`` as the context at ``seq`` unless Redis already holds ``seq`` or newer.

        Returns True when written, False when a newer (or equal) context is there: the
        caller is a stale writer and must not overwrite it.
        """
        with child_span("redis", attributes={"db.system": "redis", "db.operation": "EVALSHA ctx-cas"}):
            written, _current = await self._cas(
                keys=[context_key(tenant_id, session_id)], args=[seq, data, self._ttl_s]
            )
        return bool(int(written))

    async def get(self, tenant_id: str, session_id: str) -> HotContext | None:
        """The cached context, or None when missing (evicted, expired, wiped)."""
        with child_span("redis", attributes={"db.system": "redis", "db.operation": "HMGET ctx"}):
            seq, data = await self._client.hmget(context_key(tenant_id, session_id), ["seq", "data"])
        if seq is None or data is None:
            return None
        return HotContext(int(seq), data if isinstance(data, bytes) else data.encode())


WriteOp = Callable[[Pipeline], Awaitable[object]]


class WriteBehind:
    """Cache writes that must not hold up the caller, sent in pipelines by one background task.

    Only for writes that may be lost (Redis is a cache): each pending write is keyed, a
    newer write of the same key replaces one not yet sent (a session's hot context moves
    forward, only its newest state matters), and everything pending when the writer wakes
    goes in one pipeline, one round trip. At most ``max_pending`` keys wait; beyond that a
    write is dropped and counted. :meth:`flush` waits for what is pending (shutdown).
    """

    def __init__(self, client: aioredis.Redis, *, max_pending: int = 100_000) -> None:
        self._client = client
        self._max_pending = max_pending
        self._pending: dict[str, WriteOp] = {}
        self._task: asyncio.Task[None] | None = None
        self._scripts: list[str] = []

    def uses_script(self, script: str) -> None:
        """Ops call ``EVALSHA`` of ``script``: load it again when Redis answers NOSCRIPT (a
        restart or a flush lost it), and send the failed writes once more."""
        if script not in self._scripts:
            self._scripts.append(script)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, key: str, op: WriteOp) -> None:
        if key in self._pending:
            WRITE_BEHIND.labels("coalesced").inc()
        elif len(self._pending) >= self._max_pending:
            WRITE_BEHIND.labels("dropped").inc()
            return
        self._pending[key] = op
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        reloaded = False
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for op in batch.values():
                        await op(pipe)
                    results = await pipe.execute(raise_on_error=False)
                if not reloaded and self._scripts and any(isinstance(r, NoScriptError) for r in results):
                    # Redis lost the scripts: load them and send this batch once more (a newer
                    # write of a key, submitted meanwhile, still wins).
                    reloaded = True
                    for script in self._scripts:
                        await self._client.script_load(script)
                    self._pending = {**batch, **self._pending}
                    continue
            except Exception as exc:  # noqa: BLE001 - a cache write lost; readers rebuild
                WRITE_BEHIND.labels("failed").inc(len(batch))
                log.warning("write-behind of %d cache entries failed: %s", len(batch), exc)
                continue
            failed = sum(1 for r in results if isinstance(r, Exception))
            WRITE_BEHIND.labels("written").inc(len(batch) - failed)
            if failed:
                WRITE_BEHIND.labels("failed").inc(failed)

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (at most ``timeout_s``) until nothing is pending."""
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
