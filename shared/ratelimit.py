"""A token bucket in Redis, shared by every replica (one Lua script, atomic).

``bucket:{name}`` is a hash of (tokens, updated_ms). A caller takes ``cost`` tokens
or learns how long to wait. N replicas calling the same bucket together respect
one rate: this is how the model's rate limit holds across reasoning replicas.

Every take reports the tokens left to :func:`shared.metrics.observe_bucket`, so
``agentbus_token_bucket_saturation{bucket=name}`` shows how close the limit is to biting
(1 while a caller of :meth:`TokenBucket.take` waits for a refill).
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from shared.metrics import bucket_waiting, observe_bucket

# KEYS[1] bucket; ARGV: rate per s, burst, cost, now ms. Returns {granted 0/1, wait ms, tokens left}
# (tokens as a string: Redis would truncate a Lua number to an integer).
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1]) or burst
local updated = tonumber(state[2]) or now
if now > updated then
  tokens = math.min(burst, tokens + (now - updated) * rate / 1000.0)
  updated = now
end
local granted = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  granted = 1
else
  wait = math.ceil((cost - tokens) * 1000.0 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(updated))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000.0 / rate) + 60000)
return {granted, wait, tostring(tokens)}
"""


class TokenBucket:
    """``bucket:{name}`` with ``rate`` tokens per second and room for ``burst``."""

    def __init__(self, client: aioredis.Redis, name: str, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.name = name
        self._key = f"bucket:{name}"
        self._rate = rate
        self._burst = burst
        self._script = client.register_script(_TAKE)

    async def try_take(self, cost: int = 1) -> tuple[bool, float]:
        """Take ``cost`` tokens if there are enough; else (False, seconds to wait)."""
        reply = await self._script(
            keys=[self._key], args=[self._rate, self._burst, cost, int(time.time() * 1000)]
        )
        granted, wait_ms = bool(int(reply[0])), int(reply[1])
        observe_bucket(self.name, tokens=float(reply[2]), rate=self._rate, burst=self._burst, granted=granted)
        return granted, wait_ms / 1000

    async def take(self, cost: int = 1, *, max_wait_s: float = 30.0) -> float:
        """Wait until ``cost`` tokens are granted; returns the seconds waited.

        Raises:
            TimeoutError: not granted within ``max_wait_s``.
        """
        waited = 0.0
        while True:
            granted, wait_s = await self.try_take(cost)
            if granted:
                return waited
            if waited + wait_s > max_wait_s:
                raise TimeoutError(f"{self._key}: no token within {max_wait_s}s")
            with bucket_waiting(self.name):
                await asyncio.sleep(wait_s)
            waited += wait_s
