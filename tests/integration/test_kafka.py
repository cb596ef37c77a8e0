"""Kafka on the real broker: topics, transactions, read_committed, fencing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import ProducerFenced
from prometheus_client import REGISTRY

from shared.kafka import (
    GroupCommitter,
    OffsetWatermark,
    OutRecord,
    PartitionNotOwnedError,
    PartitionTransactions,
    TransactionAbortedError,
    make_consumer,
    make_producer,
)
from shared.settings import KafkaSettings
from shared.topics import DAY_MS, TOPICS, ensure_topics


async def _drain(consumer: AIOKafkaConsumer, want: int, within_s: float = 15.0) -> list[bytes]:
    values: list[bytes] = []
    deadline = asyncio.get_running_loop().time() + within_s
    while len(values) < want and asyncio.get_running_loop().time() < deadline:
        batches = await consumer.getmany(timeout_ms=300)
        for records in batches.values():
            values.extend(r.value for r in records)
    return values


async def _read_committed(s: KafkaSettings, topics: list[str], want: int, *, client_id: str) -> list[bytes]:
    """What a read_committed reader (no group) finds in ``topics``: up to ``want`` values, 5 s at most."""
    reader = make_consumer(s, group_id=None, client_id=client_id, topics=topics)
    await reader.start()
    try:
        return await _drain(reader, want, within_s=5.0)
    finally:
        await reader.stop()


async def test_topics_are_created_idempotently_with_their_settings(kafka_settings: KafkaSettings) -> None:
    first = await ensure_topics(kafka_settings, TOPICS)
    assert sorted(first) == sorted(f"created {kafka_settings.topic(t.name)}" for t in TOPICS)
    second = await ensure_topics(kafka_settings, TOPICS)
    assert all(line.startswith("ok ") for line in second), second

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([kafka_settings.topic(t.name) for t in TOPICS])
        assert {len(t["partitions"]) for t in described} == {kafka_settings.topic_partitions}
        dlq = kafka_settings.topic("dlq")
        response = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, dlq)])
        configs = {entry[0]: entry[1] for entry in response[0].resources[0][4]}
        assert configs["retention.ms"] == str(90 * DAY_MS)
        assert configs["cleanup.policy"] == "delete"
    finally:
        await admin.close()


async def test_topic_partitions_grow_but_never_shrink(kafka_settings: KafkaSettings) -> None:
    await ensure_topics(kafka_settings, TOPICS)
    grown = KafkaSettings.from_env(topic_prefix=kafka_settings.topic_prefix, topic_partitions=5)
    report = await ensure_topics(grown, TOPICS)
    assert f"grew {grown.topic('events')} from 3 to 5 partitions" in report
    # The broker's metadata cache follows the controller shortly after; wait for it.
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.kafka_bootstrap)
    await admin.start()
    try:
        for _ in range(100):
            (events,) = await admin.describe_topics([grown.topic("events")])
            if len(events["partitions"]) == 5:
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    shrunk = await ensure_topics(kafka_settings, TOPICS)
    assert any(line.startswith(f"kept {grown.topic('events')} at 5") for line in shrunk)


async def test_transaction_commits_output_and_offsets_and_hides_aborted(topics: KafkaSettings) -> None:
    s = topics
    inbox, out = s.topic("reasoning.inbox"), s.topic("events")
    group = f"{s.topic_prefix}-group"

    consumer = make_consumer(s, group_id=group, client_id="test-consumer")
    txns = PartitionTransactions(s, group_id=group, client_id="test", consumer=consumer)
    consumer.subscribe([inbox], listener=txns)
    await consumer.start()
    try:
        # A fresh topic's metadata may still be settling: wait for the whole assignment, so
        # no rebalance revokes the partition (and its producer) mid-test.
        while len(consumer.assignment()) < s.topic_partitions:
            await consumer.getmany(timeout_ms=200)
        for tp in consumer.assignment():
            await txns.producer(tp)  # waits while the listener is still starting it
        assert txns.partitions == consumer.assignment()

        # Input: three records on partition 0 of the inbox.
        plain = make_producer(s, client_id="test-input")
        await plain.start()
        for i in range(3):
            await plain.send_and_wait(inbox, f"in-{i}".encode(), key=b"session-a", partition=0)
        await plain.stop()

        got: list[tuple[TopicPartition, int, bytes]] = []
        while len(got) < 3:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                got.extend((tp, r.offset, r.value) for r in records)
        tp = got[0][0]
        # Record 0 and 1: a committed transaction; record 2: an aborted one.
        await txns.commit(
            tp,
            [OutRecord(out, b"decided-0", key=b"session-a"), OutRecord(out, b"decided-1", key=b"session-a")],
            {tp: got[1][1] + 1},
        )
        producer = await txns.producer(tp)
        await producer.begin_transaction()
        await producer.send_and_wait(out, b"aborted-2", key=b"session-a")
        await producer.send_offsets_to_transaction({tp: got[2][1] + 1}, group)
        await producer.abort_transaction()
        committed = await consumer.committed(tp)
        assert committed == got[1][1] + 1, "only the committed transaction moved the group's offset"
    finally:
        await txns.stop()
        await consumer.stop()

    values = await _read_committed(s, [out], 3, client_id="test-reader")
    assert values == [b"decided-0", b"decided-1"]


def _two_owners(
    s: KafkaSettings, group: str, partition: int
) -> tuple[PartitionTransactions, PartitionTransactions, TopicPartition]:
    """Two replicas' transactions of one group, for one inbox partition that moves between them."""
    group = f"{s.topic_prefix}-{group}"
    old = PartitionTransactions(s, group_id=group, client_id="old-owner")
    new = PartitionTransactions(s, group_id=group, client_id="new-owner")
    return old, new, TopicPartition(s.topic("reasoning.inbox"), partition)


async def test_new_owner_of_a_partition_fences_the_old_one(topics: KafkaSettings) -> None:
    s = topics
    out = s.topic("events")
    old, new, tp = _two_owners(s, "fence", 1)
    await old.on_partitions_assigned([tp])
    await old.commit(tp, [OutRecord(out, b"from-old-before", key=b"k")], {tp: 1})
    # The partition moves (the old owner did not notice: a zombie).
    await new.on_partitions_assigned([tp])
    with pytest.raises(ProducerFenced):
        await old.commit(tp, [OutRecord(out, b"from-zombie", key=b"k")], {tp: 2})
    await new.commit(tp, [OutRecord(out, b"from-new", key=b"k")], {tp: 2})
    await new.stop()
    await old.stop()

    values = await _read_committed(s, [out], 3, client_id="fence-reader")
    assert sorted(values) == [b"from-new", b"from-old-before"]


async def test_group_commit_publishes_each_output_once_and_commits_the_watermark(
    topics: KafkaSettings,
) -> None:
    """200 records of one partition finishing concurrently: far fewer transactions, nothing lost."""
    s = topics
    out = s.topic("events")
    group = f"{s.topic_prefix}-group-commit"
    tp = TopicPartition(s.topic("reasoning.inbox"), 2)
    txns = PartitionTransactions(s, group_id=group, client_id="group-commit")
    await txns.on_partitions_assigned([tp])
    watermark = OffsetWatermark()
    committer = GroupCommitter(txns, tp, watermark, max_batch=64)
    n = 200
    for offset in range(n):
        watermark.add(offset)
    try:

        async def finish(offset: int) -> None:
            await asyncio.sleep(0.001 * (offset % 7))  # finish out of order
            await committer.finish(offset, [OutRecord(out, b"out-%d" % offset, key=b"k", partition=2)])

        await asyncio.gather(*(finish(o) for o in range(n)))
    finally:
        await txns.stop()
    assert committer.records == n
    assert committer.transactions < n / 4, committer.transactions
    assert len(watermark) == 0

    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=[tp])
    finally:
        await admin.close()
    assert committed[tp].offset == n
    values = await _read_committed(s, [out], n + 1, client_id="group-commit-reader")
    assert sorted(values) == sorted(b"out-%d" % o for o in range(n))


async def _stuck_transactions(
    s: KafkaSettings, deadline_ms: int
) -> tuple[PartitionTransactions, TopicPartition]:
    """A partition's producer whose transactions never finish, the way aiokafka's can hang when its
    producer is stopped mid-commit (seen under chaos) or its coordinator stops answering."""
    settings = dataclasses.replace(s, kafka_transaction_deadline_ms=deadline_ms)
    tp = TopicPartition(s.topic("reasoning.inbox"), 1)
    txns = PartitionTransactions(settings, group_id=f"{s.topic_prefix}-stuck", client_id="stuck")
    await txns.on_partitions_assigned([tp])
    producer = await txns.producer(tp)

    async def never(*_: object, **__: object) -> None:
        await asyncio.Event().wait()

    producer.send_offsets_to_transaction = never  # type: ignore[method-assign]
    return txns, tp


async def test_a_commit_stuck_when_its_partition_is_revoked_gives_up_at_once(topics: KafkaSettings) -> None:
    txns, tp = await _stuck_transactions(topics, deadline_ms=60000)
    out = OutRecord(topics.topic("events"), b"never", key=b"k")
    try:
        commit = asyncio.create_task(txns.commit(tp, [out], {tp: 1}))
        await asyncio.sleep(0.3)
        assert not commit.done()
        started = asyncio.get_running_loop().time()
        await txns.on_partitions_revoked([tp])
        with pytest.raises(PartitionNotOwnedError):
            await commit
        assert asyncio.get_running_loop().time() - started < 6  # not the 60 s deadline
    finally:
        await txns.stop()


async def test_a_commit_past_its_deadline_is_abandoned_and_its_producer_replaced(
    topics: KafkaSettings,
) -> None:
    txns, tp = await _stuck_transactions(topics, deadline_ms=1000)
    out = OutRecord(topics.topic("events"), b"after-the-deadline", key=b"k", partition=1)
    try:
        stuck = await txns.producer(tp)
        with pytest.raises(TransactionAbortedError, match="timed out"):
            await txns.commit(tp, [out], {tp: 1})
        fresh = await txns.producer(tp)
        assert fresh is not stuck  # replaced, never reused
        await txns.commit(tp, [out], {tp: 1})  # and the new one works
    finally:
        await txns.stop()
    events = [topics.topic("events")]
    values = await _read_committed(topics, events, 2, client_id="deadline-reader")
    assert values == [b"after-the-deadline"]  # the abandoned transaction never became visible


def _transactions(opened: str, outcome: str) -> float:
    labels = {"opened": opened, "outcome": outcome}
    return REGISTRY.get_sample_value("agentbus_kafka_transactions_total", labels) or 0.0


async def _until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_record_being_handled_opens_its_partitions_transaction_early(topics: KafkaSettings) -> None:
    s = topics
    events, calls = s.topic("events"), s.topic("tool.calls")
    tp = TopicPartition(s.topic("reasoning.inbox"), 2)
    txns = PartitionTransactions(s, group_id=f"{s.topic_prefix}-early", client_id="early")
    await txns.on_partitions_assigned([tp])
    producer = await txns.producer(tp)
    await producer.client._wait_on_metadata(calls)  # as a running service has (its first send)
    begins = 0
    original_begin = producer.begin_transaction

    async def counted_begin() -> None:
        nonlocal begins
        begins += 1
        await original_begin()

    producer.begin_transaction = counted_begin  # type: ignore[method-assign]
    txn = producer._txn_manager
    before = {k: _transactions(*k) for k in (("early", "committed"), ("early", "committed_empty"))}
    try:
        with txns.working(tp, [(events, b"session-e", 2), (calls, b"session-e", None)]):
            # The model is still running: the transaction is open and both partitions are added.
            expected_call_partition = producer._partition(calls, None, None, None, b"session-e", None)
            await _until(lambda: {p.topic for p in txn.txn_partitions} == {events, calls})
            assert TopicPartition(events, 2) in txn.txn_partitions
            assert TopicPartition(calls, expected_call_partition) in txn.txn_partitions
        await txns.commit(
            tp,
            [
                OutRecord(events, b"early-event", key=b"session-e", partition=2),
                OutRecord(calls, b"early-call", key=b"session-e"),
            ],
            {tp: 1},
        )
        assert begins == 0, "the commit took over the transaction opened early"

        # A record that ends up publishing nothing: its early transaction is committed empty
        # within a second, and the partition's next transaction is an ordinary one.
        with txns.working(tp, [(events, b"session-e", 2)]):
            await _until(lambda: bool(txn.txn_partitions))
        await _until(lambda: txn.state.name == "READY", within_s=5.0)
        await txns.commit(tp, [OutRecord(events, b"after-empty", key=b"session-e", partition=2)], {tp: 2})
        assert begins == 1
        assert _transactions("early", "committed") == before["early", "committed"] + 1
        assert _transactions("early", "committed_empty") == before["early", "committed_empty"] + 1
    finally:
        await txns.stop()
    values = await _read_committed(s, [events, calls], 4, client_id="early-reader")
    assert sorted(values) == [b"after-empty", b"early-call", b"early-event"]


async def test_a_zombie_with_a_transaction_opened_early_is_fenced(topics: KafkaSettings) -> None:
    s = topics
    events = s.topic("events")
    old, new, tp = _two_owners(s, "early-fence", 0)
    await old.on_partitions_assigned([tp])
    await new.on_partitions_assigned([tp])  # the partition moved; the old owner did not notice
    try:
        with old.working(tp, [(events, b"k", 0)]):
            await asyncio.sleep(0.3)  # its early AddPartitionsToTxn is refused meanwhile
        with pytest.raises(ProducerFenced):
            await old.commit(tp, [OutRecord(events, b"from-zombie", key=b"k", partition=0)], {tp: 1})
        with new.working(tp, [(events, b"k", 0)]):
            pass
        await new.commit(tp, [OutRecord(events, b"from-new", key=b"k", partition=0)], {tp: 1})
    finally:
        await new.stop()
        await old.stop()
    values = await _read_committed(s, [events], 2, client_id="early-fence-reader")
    assert values == [b"from-new"]
