"""Crashes: SIGKILL of the reasoning replica serving a session mid-turn, and a Redis wipe.

The services run as real processes (the project's replica supervisor), so a kill is
a real ``kill -9``: no finally blocks, no leaving the group, an open transaction
left behind.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from infra.local.services import ServiceReplicas
from services.ingress.handlers import turn_id_for
from services.reasoning.main import scan_heads
from services.reasoning.settings import ReasoningSettings
from shared.avro import default_codec
from shared.cassandra import Statements
from shared.eventlog import EventLog
from shared.kafka import make_consumer, make_producer, transactional_id_for
from shared.service import session_key
from shared.settings import KafkaSettings
from tests.integration.agent_stack import Client, wait_for_value


def _owner(sup: ServiceReplicas, partition: int) -> int:
    """The replica number of the reasoning replica that owns inbox ``partition`` (from /metrics)."""
    needle = f'agentbus_reasoning_partition_owned{{partition="{partition}"}} 1.0'
    for replica in sup.running("reasoning"):
        with urllib.request.urlopen(f"http://127.0.0.1:{replica.port}/metrics", timeout=5) as response:
            if needle in response.read().decode():
                return replica.index
    raise AssertionError(f"no reasoning replica owns partition {partition}")


async def test_a_session_survives_sigkill_of_its_reasoning_replica_and_a_redis_wipe(
    service_processes: Callable[..., ServiceReplicas],
    topics: KafkaSettings,
    statements: Statements,
    redis_client,  # type: ignore[no-untyped-def]
    run_id: str,
) -> None:
    replicas = service_processes()
    tenant, session = "acme", f"crash-{run_id}"
    partition = DefaultPartitioner()(session_key(tenant, session), list(range(3)), list(range(3)))
    async with Client(topics) as client:
        first = await client.ask(tenant, session, "what is 2+3*4", within_s=60)
        assert first["kind"] == "FINAL" and "14" in first["text"]

        # Mid-turn: the turn waits on a tool while its reasoning replica is killed.
        mid = await client.send(tenant, session, "wait 2 seconds and then notify ops that failover works")
        await asyncio.sleep(0.8)
        victim = _owner(replicas, partition)
        replicas.kill("reasoning", victim)
        killed_at = time.monotonic()
        reply = await client.reply(mid, within_s=90)
        recovery_s = time.monotonic() - killed_at
        assert reply["kind"] == "FINAL", reply
        assert "notification sent" in reply["text"].lower()
        assert _owner(replicas, partition) != victim

        remembered = await client.ask(tenant, session, "remember that my colour is green", within_s=60)
        assert remembered["kind"] == "FINAL"
        await redis_client.flushall()  # the hot context, decision cache and de-dup keys are gone
        recalled = await client.ask(tenant, session, "what is my colour", within_s=60)
        assert recalled["kind"] == "FINAL" and "green" in recalled["text"], recalled
        again = await client.ask(tenant, session, "notify ops that the wipe is over", within_s=60)
        assert again["kind"] == "FINAL"

    # Exactly one final response per message.
    per_message = Counter(r["message_id"] for r in client.all_responses)
    assert len(per_message) == 5 and set(per_message.values()) == {1}, per_message
    # notify ran exactly once per idempotency key.
    rows = await statements.run(
        "SELECT idempotency_key FROM {ks}.notify_outbox WHERE session_id = ? ALLOW FILTERING", (session,)
    )
    executions = Counter(r["idempotency_key"] for r in rows)
    assert len(executions) == 2 and set(executions.values()) == {1}, executions
    # The log is contiguous, with no duplicate seq, once the checkpoint caught up.
    codec = default_codec()
    async with asyncio.timeout(30):
        while True:
            stored = await EventLog(statements).read(tenant, session)
            events = [codec.decode(e.record, expected="SessionEvent").datum for e in stored]
            if [e["event_type"] for e in events].count("RESPONSE_SENT") == 5:
                break
            await asyncio.sleep(0.3)
    assert [e["seq"] for e in events] == list(range(len(events)))
    print(f"failover: reply {recovery_s:.1f}s after SIGKILL of reasoning-{victim}")


async def test_a_turn_whose_commit_was_fenced_is_answered_while_the_partition_stays_here(
    service_processes: Callable[..., ServiceReplicas], topics: KafkaSettings, run_id: str
) -> None:
    """Another producer starts with the transactional id of a reasoning partition (a replica
    racing a rebalance can do that) while reasoning's consumer keeps the partition: the
    record whose commit is fenced is handled again, not dropped."""
    service_processes(reasoning=1)
    tenant, session = "acme", f"fenced-{run_id}"
    partition = DefaultPartitioner()(session_key(tenant, session), list(range(3)), list(range(3)))
    inbox = TopicPartition(topics.topic("reasoning.inbox"), partition)
    async with Client(topics) as client:
        first = await client.ask(tenant, session, "what is 2+3", within_s=60)
        assert first["kind"] == "FINAL" and "5" in first["text"]
        txn_id = transactional_id_for(f"{topics.topic_prefix}-reasoning", inbox)
        intruder = make_producer(topics, client_id="intruder", transactional_id=txn_id)
        await intruder.start()  # InitProducerId: reasoning's producer of that partition is fenced
        await intruder.stop()
        second = await client.ask(tenant, session, "what is 6*7", within_s=60)
        assert second["kind"] == "FINAL" and "42" in second["text"], second


async def test_a_session_created_record_delivered_before_the_owner_started_is_looked_up(
    service_processes: Callable[..., ServiceReplicas],
    topics: KafkaSettings,
    statements: Statements,
    run_id: str,
) -> None:
    """``session_created`` spares reasoning the look-up of a new session only for a record
    never delivered before. One waiting in the inbox when the owner starts may have been
    handled by an earlier owner, so its session is looked up: here a record marked
    "created" for a session that has a whole turn in Cassandra (and none past the checkpoint
    on the events topic) continues that session instead of starting it again at seq 0."""
    sup = service_processes(reasoning=1)
    tenant, session = "acme", f"created-{run_id}"
    key = session_key(tenant, session)
    partition = DefaultPartitioner()(key, list(range(3)), list(range(3)))
    codec = default_codec()
    log = EventLog(statements)

    async def stored() -> list[dict[str, Any]]:
        return [
            codec.decode(e.record, expected="SessionEvent").datum for e in await log.read(tenant, session)
        ]

    async with Client(topics) as client:
        first = await client.ask(tenant, session, "what is 2+3", within_s=60)
        assert first["kind"] == "FINAL" and "5" in first["text"]

        async def first_turn_checkpointed() -> list[dict[str, Any]]:
            events = await stored()
            answered = "RESPONSE_SENT" in [e["event_type"] for e in events]
            done = answered and await _checkpointed(topics, partition, tenant, session)
            return events if done else []

        # The turn is in Cassandra and the checkpoint's offset is past it: no head scan finds it.
        events = await wait_for_value(first_turn_checkpointed)
        assert events, "the first turn in Cassandra, and no head scan finding it"
        sup.stop("reasoning")
        # Every record of the first turn is behind the group's offset: the injected one is the
        # first record of the session the next owner handles.
        inbox = TopicPartition(topics.topic("reasoning.inbox"), partition)
        group = make_consumer(topics, group_id=f"{topics.topic_prefix}-reasoning", client_id="created-test")
        await group.start()
        try:
            group.assign([inbox])
            await group.seek_to_end(inbox)
            await group.commit({inbox: await group.position(inbox)})
        finally:
            await group.stop()

        message_id = uuid.uuid4().hex
        turn = {
            "tenant_id": tenant,
            "session_id": session,
            "message_id": message_id,
            "turn_id": turn_id_for(tenant, session, message_id),
            "text": "what is 6*7",
            "concurrency_policy": "QUEUE",
            "requested_at": dt.datetime.now(dt.UTC),
            "metadata": {},
            "session_created": True,
        }
        producer = make_producer(topics, client_id="created-test")
        await producer.start()
        try:
            await producer.send_and_wait(
                topics.topic("reasoning.inbox"),
                codec.encode("TurnRequested", turn),
                key=key,
                partition=partition,
            )
        finally:
            await producer.stop()
        await asyncio.to_thread(sup.start, "reasoning", 1)
        second = await client.reply(message_id, within_s=60)
        assert second["kind"] == "FINAL" and "42" in second["text"], second

    async def both_turns() -> list[dict[str, Any]]:
        after = await stored()
        return after if [e["event_type"] for e in after].count("RESPONSE_SENT") == 2 else []

    after = await wait_for_value(both_turns)
    assert after, "both turns in Cassandra"
    assert [e["seq"] for e in after] == list(range(len(after)))
    assert after[: len(events)] == events  # the first turn's events are untouched


async def _checkpointed(topics: KafkaSettings, partition: int, tenant: str, session: str) -> bool:
    """Whether a new owner's head scan of events ``partition`` (past the checkpoint) misses the session."""
    settings = ReasoningSettings.from_env(
        topic_prefix=topics.topic_prefix, checkpoint_group=f"{topics.topic_prefix}-checkpoint"
    )
    heads = await scan_heads(settings, [partition], default_codec())
    return (tenant, session) not in heads[partition]
