"""shared.metrics without servers: the scaling signal, the lag monitor over a fake consumer, buckets."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from prometheus_client import REGISTRY

from shared import metrics
from shared.metrics import LagMonitor, MeteredLimiter, scaling_signal
from shared.ratelimit import TokenBucket

TOPIC = "t.inbox"


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def _lag(service: str, partition: int) -> float | None:
    return _value(
        "agentbus_consumer_lag_records", service=service, group="g", topic=TOPIC, partition=str(partition)
    )


class FakeConsumer:
    """The parts of AIOKafkaConsumer LagMonitor reads, with aiokafka's behaviour when revoked."""

    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()
        self.lso: dict[TopicPartition, int | None] = {}
        self.hw: dict[TopicPartition, int | None] = {}
        self.polled: dict[TopicPartition, int | None] = {}
        self.positions: dict[TopicPartition, int] = {}
        self.ends: dict[TopicPartition, int] = {}
        self.end_offset_calls: list[list[TopicPartition]] = []
        self.broker_down = False

    def assign(
        self, partition: int, *, position: int, lso: int | None, polled_ago_s: float | None = 0.1
    ) -> None:
        tp = TopicPartition(TOPIC, partition)
        self.assigned.add(tp)
        self.positions[tp] = position
        self.lso[tp] = lso
        self.hw[tp] = lso
        self.polled[tp] = None if polled_ago_s is None else int((time.time() - polled_ago_s) * 1000)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def _check(self, tp: TopicPartition) -> None:
        assert tp in self.assigned, "Partition is not assigned"  # what aiokafka does

    def highwater(self, tp: TopicPartition) -> int | None:
        self._check(tp)
        return self.hw[tp]

    def last_stable_offset(self, tp: TopicPartition) -> int | None:
        self._check(tp)
        return self.lso[tp]

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        self._check(tp)
        return self.polled[tp]

    async def position(self, tp: TopicPartition) -> int:
        self._check(tp)
        return self.positions[tp]

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.end_offset_calls.append(sorted(tps))
        if self.broker_down:
            raise KafkaConnectionError("broker down")
        return {tp: self.ends[tp] for tp in tps}


def test_scaling_signal_is_the_larger_ratio() -> None:
    assert scaling_signal(500, 1000, 48, 64) == 0.75
    assert scaling_signal(3000, 1000, 10, 64) == 3.0
    assert scaling_signal(0, 1000) == 0.0
    assert scaling_signal(10, 0, 5, 0) == 0.0  # a target or capacity of 0 counts nothing
    assert scaling_signal(0, 1000, 128, 64) == 2.0  # a backlog of work on the replica itself


async def test_lag_is_end_minus_position_and_feeds_the_signal() -> None:
    consumer = FakeConsumer()
    consumer.assign(0, position=90, lso=100)
    consumer.assign(1, position=5, lso=5)
    monitor = LagMonitor(consumer, service="svc-a", group="g", lag_target=20, busy=lambda: (1, 4))
    signal = await monitor.sample()
    assert monitor.lag == {(TOPIC, 0): 10, (TOPIC, 1): 0}
    assert (_lag("svc-a", 0), _lag("svc-a", 1)) == (10.0, 0.0)
    assert signal == 0.5 == _value("agentbus_scaling_signal", service="svc-a")
    assert _value("agentbus_scaling_busy", service="svc-a") == 1.0
    assert _value("agentbus_scaling_capacity", service="svc-a") == 4.0
    assert consumer.end_offset_calls == []  # fresh fetch data: no broker round trip


async def test_read_uncommitted_falls_back_to_the_highwater() -> None:
    consumer = FakeConsumer()
    consumer.assign(0, position=3, lso=-1)
    consumer.hw[TopicPartition(TOPIC, 0)] = 8
    monitor = LagMonitor(consumer, service="svc-hw", group="g")
    await monitor.sample()
    assert monitor.lag == {(TOPIC, 0): 5}


async def test_stale_or_unfetched_partitions_ask_the_broker_once() -> None:
    consumer = FakeConsumer()
    consumer.assign(0, position=10, lso=12, polled_ago_s=60)  # paused for a minute
    consumer.assign(1, position=0, lso=None, polled_ago_s=None)  # never fetched
    consumer.assign(2, position=4, lso=4)
    consumer.ends = {TopicPartition(TOPIC, 0): 500, TopicPartition(TOPIC, 1): 7}
    monitor = LagMonitor(consumer, service="svc-b", group="g", interval_s=1)
    await monitor.sample()
    assert consumer.end_offset_calls == [[TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]]
    assert monitor.lag == {(TOPIC, 0): 490, (TOPIC, 1): 7, (TOPIC, 2): 0}
    assert monitor.lag_total == 497


async def test_revoked_partitions_lose_their_labels() -> None:
    consumer = FakeConsumer()
    consumer.assign(0, position=0, lso=3)
    consumer.assign(1, position=0, lso=4)
    monitor = LagMonitor(consumer, service="svc-c", group="g")
    await monitor.sample()
    assert _lag("svc-c", 1) == 4.0
    consumer.assigned.discard(TopicPartition(TOPIC, 1))
    await monitor.sample()
    assert _lag("svc-c", 1) is None and _lag("svc-c", 0) == 3.0
    await monitor.stop()
    assert _lag("svc-c", 0) is None


async def test_a_broker_outage_keeps_the_last_values_and_never_raises() -> None:
    consumer = FakeConsumer()
    consumer.assign(0, position=1, lso=9)
    monitor = LagMonitor(consumer, service="svc-d", group="g")
    await monitor.sample()
    consumer.polled[TopicPartition(TOPIC, 0)] = None  # no fetch since: must ask the broker
    consumer.broker_down = True
    errors = _value("agentbus_lag_monitor_errors_total", service="svc-d") or 0.0

    def broken_busy() -> tuple[float, float]:
        raise RuntimeError("boom")

    monitor._busy = broken_busy
    assert await monitor.sample() == 0.008
    assert monitor.lag == {(TOPIC, 0): 8}
    assert _value("agentbus_lag_monitor_errors_total", service="svc-d") == errors + 2


async def test_a_consumer_that_blows_up_does_not_stop_the_task() -> None:
    class Broken(FakeConsumer):
        def assignment(self) -> Any:
            raise RuntimeError("consumer closed")

    monitor = LagMonitor(Broken(), service="svc-e", group="g", interval_s=0.01)
    monitor.start()
    await asyncio.sleep(0.05)
    assert monitor._task is not None and not monitor._task.done()
    await monitor.stop()
    assert monitor._task is None


async def test_a_position_that_never_comes_is_skipped() -> None:
    class Resetting(FakeConsumer):
        async def position(self, tp: TopicPartition) -> int:
            await asyncio.sleep(10)
            return 0

    consumer = Resetting()
    consumer.assign(0, position=0, lso=5)
    monitor = LagMonitor(consumer, service="svc-f", group="g", request_timeout_s=0.05)
    async with monitor:
        await asyncio.sleep(0.15)
    assert monitor.lag == {}


def test_busy_from_gauge_reads_this_process_registry() -> None:
    metrics.SCALING_BUSY.labels("svc-g").set(3)
    busy = metrics.busy_from_gauge("agentbus_scaling_busy", 8, {"service": "svc-g"})
    assert busy() == (3.0, 8)
    assert metrics.busy_from_gauge("agentbus_no_such_gauge", 8)() == (0.0, 8)


def test_checkpoint_lag_is_the_age_of_the_event() -> None:
    now = dt.datetime(2025, 5, 1, 12, 0, 10, tzinfo=dt.UTC)
    written = dt.datetime(2025, 5, 1, 12, 0, 7, 500000, tzinfo=dt.UTC)
    assert metrics.observe_checkpoint(written, now=now) == 2.5
    assert _value("agentbus_checkpoint_lag_seconds") == 2.5
    assert _value("agentbus_checkpoint_last_event_timestamp_seconds") == now.timestamp() - 2.5
    # Naive is UTC; an event from the future (clock skew) is not negative lag.
    naive = dt.datetime(2025, 5, 1, 12, 0, 11)  # noqa: DTZ001 - on purpose
    assert metrics.observe_checkpoint(naive, now=now) == 0.0


def test_bucket_saturation_refills_and_is_full_while_waiting() -> None:
    metrics.observe_bucket("b1", tokens=25, rate=0.0, burst=100, granted=True)
    assert _value("agentbus_token_bucket_saturation", bucket="b1") == 0.75
    with metrics.bucket_waiting("b1"):
        assert _value("agentbus_token_bucket_saturation", bucket="b1") == 1.0
    metrics.observe_bucket("b2", tokens=0, rate=1e9, burst=10, granted=False)
    assert _value("agentbus_token_bucket_saturation", bucket="b2") == 0.0  # refilled since
    assert _value("agentbus_token_bucket_takes_total", bucket="b2", result="denied") == 1.0


async def test_metered_limiter_counts_refusals() -> None:
    answers = iter([True, False, True, False])

    class Limiter:
        async def allow(self, tenant_id: str) -> bool:
            return next(answers)

    limiter = MeteredLimiter(Limiter(), bucket="tenant-test")
    assert [await limiter.allow("t") for _ in range(4)] == [True, False, True, False]
    assert _value("agentbus_token_bucket_saturation", bucket="tenant-test") == 0.5
    assert _value("agentbus_token_bucket_takes_total", bucket="tenant-test", result="granted") == 2.0
    limiter._window_s = 0.0
    await asyncio.sleep(0.01)
    assert limiter.saturation() == 0.0


class FakeRedis:
    """register_script() of a Redis client whose script answers are given in advance."""

    def __init__(self, replies: list[list[Any]]) -> None:
        self.replies = iter(replies)
        self.calls: list[dict[str, Any]] = []

    def register_script(self, _: str) -> Any:
        async def run(*, keys: list[str], args: list[Any]) -> list[Any]:
            self.calls.append({"keys": keys, "args": args})
            return next(self.replies)

        return run


async def test_token_bucket_reports_tokens_left_and_waits() -> None:
    redis = FakeRedis([[1, 0, b"39.5"], [0, 20, b"0.2"], [1, 0, b"0"]])
    bucket = TokenBucket(redis, "model-test", rate=40.0, burst=40)  # type: ignore[arg-type]
    assert await bucket.try_take() == (True, 0.0)
    assert _value("agentbus_token_bucket_saturation", bucket="model-test") == pytest.approx(
        1 - 39.5 / 40, abs=0.01
    )
    assert await bucket.take() == pytest.approx(0.02, abs=0.015)  # waited for the refill
    assert redis.calls[0]["keys"] == ["bucket:model-test"]
    assert _value("agentbus_token_bucket_takes_total", bucket="model-test", result="denied") == 1.0
    assert _value("agentbus_token_bucket_takes_total", bucket="model-test", result="granted") == 2.0
