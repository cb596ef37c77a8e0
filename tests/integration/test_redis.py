"""Redis on the real server: the hot-context compare-and-set on seq."""

from __future__ import annotations

import asyncio
import random

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
