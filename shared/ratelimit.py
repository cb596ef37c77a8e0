"""A token bucket in Redis, shared by every replica (one Lua script, atomic).

``bucket:{name}`` is a hash of (tokens, updated_ms). A caller takes ``cost`` tokens
or learns how long to wait. N replicas calling the same bucket together respect
one rate: this is how the model's rate limit holds across reasoning replicas.

Every take reports the tokens left to :func:`shared.metrics.observe_bucket`, so
``agentbus_token_bucket_saturation{bucket=name}`` shows how close the limit is to biting
(1 while a caller of :meth:`TokenBucket.take` waits for a refill).

Callers of :meth:`TokenBucket.take` in one process share round trips: while one call to
Redis is in flight the others queue, and the next call asks for all of them at once
(granting as many as the bucket holds, oldest first). Under load a replica then pays one
script call per batch of model calls instead of one per call; the shared limit is the same.

A bucket may also keep a short **lease**: while the shared bucket is at least half full
(the limit is not biting), a script call asks for up to ``lease`` tokens more than its
callers need, never more than ``rate * lease_s`` (what the bucket refills meanwhile), and
the next callers within ``lease_s`` take those without a round trip. Tokens are still taken
from the one shared bucket before they are used, so N replicas together never exceed the
rate; an unused lease expires after ``lease_s`` and is lost (only when the bucket had
room to spare). Under contention no lease is taken, and the bucket is exact as before.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from shared.metrics import bucket_waiting, observe_bucket

# KEYS[1] bucket; ARGV: rate per s, burst, cost, least. Takes as many whole tokens as it holds
# up to ``cost``, or none if that is below ``least``. Returns {tokens granted, wait ms for
# ``least``, tokens left} (tokens left as a string: Redis would truncate a Lua number). Time is
# Redis's own clock, so replicas with skewed clocks share one bucket fairly.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local least = tonumber(ARGV[4]) or cost
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1]) or burst
local updated = tonumber(state[2]) or now
if now > updated then
  tokens = math.min(burst, tokens + (now - updated) * rate / 1000.0)
  updated = now
end
local granted = math.min(cost, math.floor(tokens))
local wait = 0
if granted >= least then
  tokens = tokens - granted
else
  granted = 0
  wait = math.ceil((least - tokens) * 1000.0 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(updated))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000.0 / rate) + 60000)
return {granted, wait, tostring(tokens)}
"""


class BucketScript:
    """The bucket script registered on one Redis client; it takes from any bucket key.

    :class:`TokenBucket` is one named bucket built on it; ingress keeps one bucket per tenant.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._script = client.register_script(_TAKE)

    async def take(
        self, key: str, *, rate: float, burst: int, cost: int, least: int
    ) -> tuple[int, float, float]:
        """Take up to ``cost`` tokens of ``key`` (none if fewer than ``least`` are there).

        Returns (tokens granted, seconds until ``least`` would be there, tokens left).
        """
        reply = await self._script(keys=[key], args=[rate, burst, cost, least])
        return int(reply[0]), int(reply[1]) / 1000, float(reply[2])


@dataclass(eq=False)  # one caller's take: compared (queue removal) by identity, not by value
class _Want:
    cost: int
    future: asyncio.Future[float]
    queued_at: float
    deadline: float
    asked: int = field(default=0)  # script calls made while it waited


class TokenBucket:
    """``bucket:{name}`` with ``rate`` tokens per second and room for ``burst``."""

    def __init__(
        self,
        client: aioredis.Redis,
        name: str,
        *,
        rate: float,
        burst: int,
        lease: int = 0,
        lease_s: float = 0.1,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        if lease < 0 or lease_s < 0:
            raise ValueError("a token bucket's lease and lease_s must be >= 0")
        self.name = name
        self._key = f"bucket:{name}"
        self._rate = rate
        self._burst = burst
        self._lease = min(lease, int(rate * lease_s))  # no more than refills within the lease
        self._lease_s = lease_s
        self._spare = 0  # leased tokens not handed out yet
        self._spare_until = 0.0  # loop time when they expire
        self._left = float(burst)  # tokens the shared bucket held at the last call
        self._script = BucketScript(client)
        self._queue: list[_Want] = []
        self._server: asyncio.Task[None] | None = None
        self.script_calls = 0

    async def _call(self, cost: int, least: int) -> tuple[int, float]:
        self.script_calls += 1
        granted, wait_s, left = await self._script.take(
            self._key, rate=self._rate, burst=self._burst, cost=cost, least=least
        )
        self._left = left
        observe_bucket(self.name, tokens=left, rate=self._rate, burst=self._burst, granted=granted >= least)
        return granted, wait_s

    def _from_lease(self, cost: int, now: float) -> bool:
        if self._spare >= cost and now < self._spare_until:
            self._spare -= cost
            return True
        return False

    async def try_take(self, cost: int = 1) -> tuple[bool, float]:
        """Take ``cost`` tokens if there are enough; else (False, seconds to wait)."""
        granted, wait_s = await self._call(cost, cost)
        return granted >= cost, wait_s

    def take_leased(self, cost: int = 1) -> bool:
        """Take ``cost`` tokens from this replica's lease if it holds them (no wait, no Redis)."""
        return not self._queue and self._from_lease(cost, asyncio.get_running_loop().time())

    async def take(self, cost: int = 1, *, max_wait_s: float = 30.0) -> float:
        """Wait until ``cost`` tokens are granted; returns the seconds waited for a refill.

        Raises:
            TimeoutError: not granted within ``max_wait_s``.
            ValueError: ``cost`` is above the bucket's burst (it could never be granted).
            redis.RedisError: Redis failed (for every caller queued with this one).
        """
        if cost > self._burst:
            raise ValueError(f"{self._key}: cost {cost} is above the burst {self._burst}")
        if self.take_leased(cost):
            return 0.0
        loop = asyncio.get_running_loop()
        want = _Want(cost, loop.create_future(), loop.time(), loop.time() + max_wait_s)
        self._queue.append(want)
        if self._server is None or self._server.done():
            self._server = loop.create_task(self._serve())
        return await want.future

    async def _serve(self) -> None:
        """Grant the queued takes, oldest first, one script call for as many as fit in a burst."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            live: list[_Want] = []
            for want in self._queue:
                if want.future.done():
                    continue  # its caller was cancelled
                if now > want.deadline:
                    want.future.set_exception(TimeoutError(f"{self._key}: no token within the deadline"))
                    continue
                live.append(want)
            while live and self._from_lease(live[0].cost, now):
                live.pop(0).future.set_result(0.0)
            self._queue = live
            if not live:
                return
            batch, total = [], 0
            for want in live:
                if total + want.cost > self._burst:
                    break
                batch.append(want)
                total += want.cost
            extra = self._lease if self._left >= self._burst / 2 else 0
            try:
                granted, wait_s = await self._call(min(self._burst, total + extra), batch[0].cost)
            except BaseException as exc:
                for want in batch:
                    if not want.future.done():
                        want.future.set_exception(exc)
                        want.future.exception()  # retrieved: its caller may be gone
                self._queue = [w for w in self._queue if w not in batch]
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            done = loop.time()
            for want in batch:
                want.asked += 1
            for want in batch:
                if want.cost > granted:
                    break  # oldest first: later (smaller) ones wait their turn too
                granted -= want.cost
                if not want.future.done():
                    want.future.set_result(0.0 if want.asked == 1 else done - want.queued_at)
                self._queue.remove(want)
            if granted > 0:  # a lease (or the share of a caller cancelled meanwhile)
                kept = self._spare if done < self._spare_until else 0
                self._spare, self._spare_until = kept + granted, done + self._lease_s
            if wait_s > 0 and self._queue:
                with bucket_waiting(self.name):
                    await asyncio.sleep(min(wait_s, max(0.0, min(w.deadline for w in self._queue) - done)))
