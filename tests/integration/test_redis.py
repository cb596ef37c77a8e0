"""Redis on the real server: the hot-context compare-and-set on seq."""

from __future__ import annotations

import asyncio
import random

import pytest

from shared.redis import HotContextStore, context_key


async def test_compare_and_set_rejects_a_stale_writer(redis_client, run_id: str) -> None:  # type: ignore[no-untyped-def]
    store = HotContextStore(redis_client, ttl_s=60)
    assert await store.put_if_newer("t1", run_id, 5, b"ctx@5")
    assert not await store.put_if_newer("t1", run_id, 4, b"ctx@4 from a zombie")
    assert not await store.put_if_newer("t1", run_id, 5, b"ctx@5 again")
    got = await store.get("t1", run_id)
    assert got is not None and (got.seq, got.data) == (5, b"ctx@5")
    assert await store.put_if_newer("t1", run_id, 6, b"ctx@6")
    got = await store.get("t1", run_id)
    assert got is not None and got.seq == 6
    ttl = await redis_client.ttl(context_key("t1", run_id))
    assert 0 < ttl <= 60


async def test_concurrent_writers_leave_the_newest_seq(redis_client, run_id: str) -> None:  # type: ignore[no-untyped-def]
    store = HotContextStore(redis_client, ttl_s=60)
    seqs = list(range(200))
    random.Random(7).shuffle(seqs)
    results = await asyncio.gather(*(store.put_if_newer("t1", run_id, s, f"ctx@{s}".encode()) for s in seqs))
    got = await store.get("t1", run_id)
    assert got is not None and (got.seq, got.data) == (199, b"ctx@199")
    assert sum(results) >= 1


async def test_a_wiped_context_reads_as_missing(redis_client, run_id: str) -> None:  # type: ignore[no-untyped-def]
    store = HotContextStore(redis_client, ttl_s=60)
    await store.put_if_newer("t1", run_id, 3, b"x")
    await redis_client.delete(context_key("t1", run_id))
    assert await store.get("t1", run_id) is None
    assert await store.put_if_newer("t1", run_id, 1, b"rebuilt")  # after a wipe, any seq is newer


async def test_write_behind_pipelines_coalesces_and_keeps_the_compare_and_set(
    redis_client, run_id: str
) -> None:  # type: ignore[no-untyped-def]
    from shared.redis import WRITE_BEHIND, WriteBehind

    writer = WriteBehind(redis_client)
    store = HotContextStore(redis_client, ttl_s=60, writer=writer)
    assert await store.put_if_newer("t1", run_id, 10, b"ctx@10")  # already newer in Redis
    coalesced = WRITE_BEHIND.labels("coalesced")._value.get()
    # Submitted in one loop turn: one pipeline, and a session's later puts replace earlier ones.
    for seq in (7, 8, 9):
        store.put_later("t1", run_id, seq, f"ctx@{seq}".encode())
    for seq in range(20):
        store.put_later("t2", f"{run_id}-{seq}", seq, b"x")
    assert writer.pending == 21
    assert WRITE_BEHIND.labels("coalesced")._value.get() - coalesced == 2
    await writer.flush()
    assert writer.pending == 0
    held = await store.get("t1", run_id)
    assert held is not None and (held.seq, held.data) == (10, b"ctx@10")  # a stale write stays out
    assert all([await store.get("t2", f"{run_id}-{seq}") for seq in range(20)])
    store.put_later("t1", run_id, 11, b"ctx@11")
    await writer.flush()
    held = await store.get("t1", run_id)
    assert held is not None and (held.seq, held.data) == (11, b"ctx@11")


async def test_write_behind_sends_one_round_trip_and_reloads_a_lost_script(redis_client, run_id: str) -> None:  # type: ignore[no-untyped-def]
    from shared.redis import WriteBehind

    async def script_checks() -> int:
        stats = await redis_client.info("commandstats")
        return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))

    writer = WriteBehind(redis_client)
    store = HotContextStore(redis_client, ttl_s=60, writer=writer)
    await redis_client.script_load(_cas_script())
    before = await script_checks()
    store.put_later("t1", run_id, 1, b"ctx@1")
    await writer.flush()
    assert await script_checks() == before  # EVALSHA straight in the pipeline, no SCRIPT EXISTS
    # Redis lost its scripts (a restart, SCRIPT FLUSH): the writer loads it and writes again.
    await redis_client.script_flush()
    store.put_later("t1", run_id, 2, b"ctx@2")
    await writer.flush()
    held = await store.get("t1", run_id)
    assert held is not None and (held.seq, held.data) == (2, b"ctx@2")


def _cas_script() -> str:
    from shared.redis import _CAS_SCRIPT

    return _CAS_SCRIPT


async def test_write_behind_survives_redis_errors_and_bounds_what_waits(run_id: str) -> None:
    from shared.redis import WRITE_BEHIND, WriteBehind, make_redis
    from shared.settings import RedisSettings

    dead = make_redis(RedisSettings.from_env({"AGENTBUS_REDIS_URL": "redis://127.0.0.1:1/0"}))
    writer = WriteBehind(dead, max_pending=3)
    store = HotContextStore(dead, ttl_s=60, writer=writer)
    failed = WRITE_BEHIND.labels("failed")._value.get()
    dropped = WRITE_BEHIND.labels("dropped")._value.get()
    for seq in range(5):
        store.put_later("t1", f"{run_id}-{seq}", seq, b"x")
    assert writer.pending == 3 and WRITE_BEHIND.labels("dropped")._value.get() - dropped == 2
    await writer.flush(timeout_s=30)
    assert writer.pending == 0
    assert WRITE_BEHIND.labels("failed")._value.get() - failed == 3  # logged and counted, not raised
    await dead.aclose()


async def _evalsha_calls(redis_client) -> int:  # type: ignore[no-untyped-def]
    stats = await redis_client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_concurrent_takes_share_script_calls_and_the_rate_still_holds(
    redis_client, run_id: str
) -> None:  # type: ignore[no-untyped-def]
    from shared.ratelimit import TokenBucket

    roomy = TokenBucket(redis_client, f"roomy-{run_id}", rate=1e6, burst=1000)
    before = await _evalsha_calls(redis_client)
    waited = await asyncio.gather(*(roomy.take() for _ in range(200)))
    calls = await _evalsha_calls(redis_client) - before
    assert waited == [0.0] * 200
    # One script call per queued batch, not per take (Redis may count a NOSCRIPT try as well).
    assert roomy.script_calls == 1 and calls <= 2, (roomy.script_calls, calls)

    # 5 in the burst, then 20 per second: 15 takes need about (15 - 5) / 20 = 0.5 s, and no
    # other bucket user (another replica) can get more than the rate allows.
    tight = TokenBucket(redis_client, f"tight-{run_id}", rate=20.0, burst=5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    granted_at: list[float] = []

    async def take() -> None:
        await tight.take(max_wait_s=5)
        granted_at.append(loop.time() - t0)

    await asyncio.gather(*(take() for _ in range(15)))
    assert 0.4 <= max(granted_at) <= 1.5, granted_at
    assert sum(1 for t in granted_at if t < 0.1) <= 7  # the burst (plus a refill's worth)
    with pytest.raises(TimeoutError):
        await tight.take(max_wait_s=0.0)  # the bucket is empty: no token by now
    with pytest.raises(ValueError):
        await tight.take(6)  # above the burst: could never be granted


async def test_a_lease_saves_round_trips_while_the_bucket_has_room_and_never_passes_the_rate(
    redis_client, run_id: str
) -> None:  # type: ignore[no-untyped-def]
    from shared.ratelimit import TokenBucket

    # Room to spare: one script call serves a run of takes one after another.
    roomy = TokenBucket(redis_client, f"lease-roomy-{run_id}", rate=1e4, burst=100, lease=16, lease_s=1.0)
    for _ in range(30):
        assert await roomy.take() == 0.0
    assert roomy.script_calls == 2, roomy.script_calls  # 1 + 16 leased, twice
    assert roomy.take_leased()  # 4 of the second lease left: taken at hand, no call
    assert roomy.script_calls == 2
    plain = TokenBucket(redis_client, f"lease-plain-{run_id}", rate=1e4, burst=100)
    for _ in range(34):
        await plain.take()
    assert plain.script_calls == 34
    assert not plain.take_leased()  # no lease: every take asks Redis

    # A lease lapses: tokens taken ahead are not used after lease_s.
    lapsing = TokenBucket(redis_client, f"lease-lapse-{run_id}", rate=1e4, burst=100, lease=16, lease_s=0.05)
    await lapsing.take()
    await asyncio.sleep(0.1)
    await lapsing.take()
    assert lapsing.script_calls == 2

    # Two replicas with leases on one tight bucket: together never above burst + rate * t.
    name = f"lease-tight-{run_id}"
    replicas = [TokenBucket(redis_client, name, rate=20.0, burst=10, lease=5, lease_s=0.25) for _ in range(2)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    granted_at: list[float] = []

    async def take(bucket: TokenBucket) -> None:
        await bucket.take(max_wait_s=5)
        granted_at.append(loop.time() - t0)

    await asyncio.gather(*(take(replicas[i % 2]) for i in range(30)))
    granted_at.sort()
    for k, t in enumerate(granted_at, start=1):
        assert k <= 10 + 20.0 * t + 1, (k, t, granted_at)  # burst + refill (+1 for rounding)
    assert granted_at[-1] >= 0.9  # (30 - 10) / 20 = 1 s: the rate held
