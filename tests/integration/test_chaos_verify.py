"""The chaos verifier against the real Kafka and Cassandra, without the services.

Each scenario synthesises a small world on its own topics (a correct one, or one with a
single guarantee broken) and asserts that :func:`verify` fails exactly the broken check.
Scenarios run concurrently; sessions are named by a tenant of the scenario's own, so the
shared keyspace does not leak between them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from shared.avro import default_codec
from shared.cassandra import Statements
from shared.eventlog import EventLog, StoredEvent
from shared.kafka import make_consumer, make_producer
from shared.settings import KafkaSettings
from shared.topics import TOPICS, ensure_topics
from tests.chaos.verify import (
    CASSANDRA_MATCHES_EVENTS,
    DLQ_EXACT,
    ONE_FINAL_RESPONSE,
    PARTITIONS_MOVING,
    SEQ_CONTIGUOUS,
    SIDE_EFFECTS_AT_MOST_ONCE,
    InjectedBadRecord,
    Report,
    SentMessage,
    verify,
)

codec = default_codec()
T0 = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SESSIONS = 6
MESSAGES = 3
EVENTS_PER_TURN = 2
SERVICES = ("ingress", "reasoning", "tool-exec", "checkpoint")

# scenario -> the checks it must fail (empty: the world is correct)
SCENARIOS: dict[str, set[str]] = {
    "correct": set(),
    "dlq_replayed_twice": set(),
    "dlq_allowed_reason": set(),
    "missing_response": {ONE_FINAL_RESPONSE},
    "duplicate_response": {ONE_FINAL_RESPONSE},
    "lost_turn": {ONE_FINAL_RESPONSE},
    "seq_gap": {SEQ_CONTIGUOUS},
    "duplicate_seq": {SEQ_CONTIGUOUS},
    "cassandra_differs": {CASSANDRA_MATCHES_EVENTS},
    "duplicate_notify": {SIDE_EFFECTS_AT_MOST_ONCE},
    "unexpected_dlq": {DLQ_EXACT},
    "missing_dlq": {DLQ_EXACT},
    "dlq_wrong_reason": {DLQ_EXACT},
    "group_lagging": {PARTITIONS_MOVING},
}


@dataclass
class World:
    settings: KafkaSettings
    groups: dict[str, str]
    expected_dlq: list[InjectedBadRecord]
    expected_messages: list[SentMessage]
    allow: tuple[str, ...] = ()
    last: dict[TopicPartition, int] = field(default_factory=dict)


def event(tenant: str, session: str, seq: int, turn: str, message_id: str, *, text: str = "hi") -> bytes:
    if seq % 2 == 0:
        kind, payload = (
            "USER_MESSAGE_ACCEPTED",
            ("agentbus.UserMessageAccepted", {"message_id": message_id, "text": text}),
        )
    else:
        kind, payload = "RESPONSE_SENT", ("agentbus.ResponseSent", {"kind": "FINAL", "text": "ok"})
    return codec.encode(
        "SessionEvent",
        {
            "tenant_id": tenant,
            "session_id": session,
            "seq": seq,
            "turn_id": turn,
            "event_type": kind,
            "payload": payload,
            "trace_id": TRACE,
            "occurred_at": T0,
        },
    )


def response(
    tenant: str, session: str, message_id: str, kind: str = "FINAL", reason: str | None = None
) -> bytes:
    return codec.encode(
        "AgentResponse",
        {
            "tenant_id": tenant,
            "session_id": session,
            "message_id": message_id,
            "turn_id": None if kind == "REJECTED" else f"turn-{message_id}",
            "kind": kind,
            "text": "answer",
            "reason": reason,
            "steps": 1,
            "created_at": T0,
        },
    )


def dead_letter(topic: str, value: bytes, reason_code: str, service: str = "ingress") -> bytes:
    return codec.encode(
        "DeadLetter",
        {
            "source_topic": topic,
            "source_partition": 0,
            "source_offset": 0,
            "value": value,
            "reason_code": reason_code,
            "reason": f"because {reason_code}",
            "service": service,
            "failed_at": T0,
        },
    )


async def build(base: KafkaSettings, statements: Statements, scenario: str) -> World:
    prefix = f"{base.topic_prefix}-{scenario.replace('_', '-')}"
    settings = KafkaSettings.from_env(topic_prefix=prefix, topic_partitions=3)
    await ensure_topics(settings, TOPICS)
    t = settings.topic
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    world = World(
        settings=settings,
        groups={s: f"{prefix}-{s}" for s in SERVICES},
        expected_dlq=[
            InjectedBadRecord(t("ingress"), b"not avro at all", "bad_magic"),
            InjectedBadRecord(t("reasoning.inbox"), b"\xc3\x01\x00", None),
        ],
        expected_messages=[],
    )
    out: list[tuple[str, bytes, bytes]] = []  # topic, key, value
    stored: list[StoredEvent] = []

    def send(topic: str, key: bytes, value: bytes) -> None:
        out.append((t(topic), key, value))

    for s in range(SESSIONS):
        session = f"s{s}"
        key = f"{tenant}/{session}".encode()
        seq = 0
        for m in range(MESSAGES):
            mid = f"m{m}"
            turn = f"turn-{mid}"
            world.expected_messages.append(SentMessage(tenant, session, mid))
            send("ingress", key, codec.encode("UserMessage", _user_message(tenant, session, mid)))
            if s == 0 and m == 2:  # rejected by ingress: a response, no TurnRequested
                send("responses", key, response(tenant, session, mid, "REJECTED", "rate_limited"))
                continue
            if scenario == "lost_turn" and s == 1 and m == 2:  # sent, never answered nor forwarded
                continue
            send("reasoning.inbox", key, codec.encode("TurnRequested", _turn_requested(tenant, session, mid)))
            if s == 1 and m == 1:  # rejected by reasoning after the TurnRequested
                send("responses", key, response(tenant, session, mid, "REJECTED", "turn_in_progress"))
                continue
            if scenario != "missing_response" or (s, m) != (2, 0):
                kind, reason = ("ERROR", "interrupted") if (s, m) == (3, 0) else ("FINAL", None)
                send("responses", key, response(tenant, session, mid, kind, reason))
                if scenario == "duplicate_response" and (s, m) == (2, 0):
                    send("responses", key, response(tenant, session, mid, kind, reason))
            for _ in range(EVENTS_PER_TURN):
                if scenario == "seq_gap" and (s, seq) == (4, 3):
                    seq += 1  # seq 3 never written, in Kafka nor Cassandra
                value = event(tenant, session, seq, turn, mid)
                send("events", key, value)
                if scenario == "duplicate_seq" and (s, seq) == (4, 2):
                    send("events", key, value)  # byte-identical replay: still a violation
                if scenario == "cassandra_differs" and (s, seq) == (5, 2):
                    value = event(tenant, session, seq, turn, mid, text="other")
                stored.append(StoredEvent(tenant, session, seq, turn, "X", value, TRACE, T0))
                seq += 1
        # one irreversible notify per session: a ToolCall, an outbox row, an OK result
        idem = f"{tenant}-{session}-notify"
        send("tool.calls", key, codec.encode("ToolCall", _tool_call(tenant, session, idem)))
        rows = 2 if scenario == "duplicate_notify" and s == 0 else 1
        for _ in range(rows):
            await statements.run(
                "INSERT INTO {ks}.notify_outbox (idempotency_key, notification_id, tenant_id, session_id, "
                "channel, message, sent_at) VALUES (?, ?, ?, ?, 'email', 'hi', ?)",
                (idem, uuid.uuid4(), tenant, session, T0),
            )
        await statements.run(
            "INSERT INTO {ks}.tool_results (idempotency_key, tenant_id, session_id, tool, status) "
            "VALUES (?, ?, ?, 'notify', 'OK')",
            (idem, tenant, session),
        )
    await EventLog(statements).append(stored)

    # injected bad records and their dead letters
    for bad in world.expected_dlq:
        out.append((bad.topic, b"bad", bad.value))
        if scenario == "missing_dlq" and bad.value.startswith(b"\xc3"):
            continue
        reason = bad.expect_reason or "truncated"
        if scenario == "dlq_wrong_reason" and bad.expect_reason:
            reason = "malformed_body"
        copies = 2 if scenario == "dlq_replayed_twice" else 1
        for _ in range(copies):
            send("dlq", b"bad", dead_letter(bad.topic, bad.value, reason))
    if scenario == "unexpected_dlq":
        send("dlq", b"x", dead_letter(t("events"), b"surprise", "handler_error", "checkpoint"))
    if scenario == "dlq_allowed_reason":
        send("dlq", b"x", dead_letter(t("tool.calls"), b"surprise", "handler_error", "tool-exec"))
        world.allow = ("handler_error",)

    producer = make_producer(settings, client_id=f"verify-{scenario}", transactional_id=f"{prefix}-writer")
    await producer.start()
    try:
        await _publish(producer, out, world)
    finally:
        await producer.stop()
    await _commit_groups(world, lag=scenario == "group_lagging")
    return world


async def _publish(producer: AIOKafkaProducer, out: list[tuple[str, bytes, bytes]], world: World) -> None:
    """Publish in a few transactions, like the services do (so partitions end in commit markers)."""
    for chunk in (out[: len(out) // 2], out[len(out) // 2 :]):
        async with producer.transaction():
            futures = [await producer.send(topic, value, key=key) for topic, key, value in chunk]
            for md in await asyncio.gather(*futures):
                tp = TopicPartition(md.topic, md.partition)
                world.last[tp] = max(world.last.get(tp, -1), md.offset)


async def _commit_groups(world: World, *, lag: bool) -> None:
    """Commit each group's offsets: checkpoint like a service (last record + 1, the marker's
    offset), the others with a consumer that read everything and commits its positions."""
    inputs = {
        "ingress": "ingress",
        "reasoning": "reasoning.inbox",
        "tool-exec": "tool.calls",
        "checkpoint": "events",
    }
    for service, group in world.groups.items():
        topic = world.settings.topic(inputs[service])
        tps = [TopicPartition(topic, p) for p in range(3)]
        consumer = make_consumer(world.settings, group_id=group, client_id=f"verify-{service}")
        await consumer.start()
        try:
            consumer.assign(tps)
            if service == "checkpoint":
                await consumer.commit({tp: world.last[tp] + 1 for tp in tps if tp in world.last})
                continue
            ends = await consumer.end_offsets(tps)
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                await consumer.getmany(timeout_ms=500)
            await consumer.commit()
            if lag and service == "reasoning":
                tp = next(tp for tp in tps if tp in world.last)
                await consumer.commit({tp: world.last[tp]})  # the last record is not consumed
        finally:
            await consumer.stop()


def _user_message(tenant: str, session: str, mid: str) -> dict[str, Any]:
    return {"tenant_id": tenant, "session_id": session, "message_id": mid, "text": "hi", "sent_at": T0}


def _turn_requested(tenant: str, session: str, mid: str) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "session_id": session,
        "message_id": mid,
        "turn_id": f"turn-{mid}",
        "text": "hi",
        "concurrency_policy": "QUEUE",
        "requested_at": T0,
    }


def _tool_call(tenant: str, session: str, idem: str) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "session_id": session,
        "turn_id": "turn-m0",
        "call_id": "c1",
        "step": 1,
        "seq": 1,
        "tool": "notify",
        "arguments_json": "{}",
        "idempotency_key": idem,
        "timeout_ms": 1000,
        "deadline": T0,
        "requested_at": T0,
    }


async def run(base: KafkaSettings, statements: Statements, scenario: str) -> Report:
    world = await build(base, statements, scenario)
    return await verify(
        world.settings,
        statements,
        groups=world.groups,
        expected_dlq=world.expected_dlq,
        expected_messages=world.expected_messages,
        allow_unexpected_reasons=world.allow,
        stall_timeout_s=20,
    )


async def test_verify_passes_a_correct_world_and_fails_exactly_the_broken_check(
    topics: KafkaSettings, statements: Statements
) -> None:
    names = list(SCENARIOS)
    reports = dict(
        zip(names, await asyncio.gather(*(run(topics, statements, n) for n in names)), strict=True)
    )

    wrong: list[str] = []
    for name, expected in SCENARIOS.items():
        failed = set(reports[name].failed)
        if failed != expected:
            wrong.append(
                f"{name}: failed {sorted(failed)}, expected {sorted(expected)}\n{reports[name].to_text()}"
            )
    assert not wrong, "\n\n".join(wrong)

    ok = reports["correct"]
    assert ok.ok
    turns = SESSIONS * MESSAGES - 1  # one message rejected by ingress never reached the inbox
    assert ok.totals["sessions"] == SESSIONS
    assert ok.totals["turns"] == turns
    assert ok.totals["responses"] == SESSIONS * MESSAGES
    assert ok.totals["events"] == EVENTS_PER_TURN * (turns - 1)  # reasoning's rejection logs no events here
    assert ok.totals["dlq_records"] == 2
    assert ok.totals["notify_executions"] == SESSIONS
    assert ok.totals["ingress_undecodable"] == 1
    first = ok.check(ONE_FINAL_RESPONSE)
    assert first.info["rejected_after_accept"] == 1
    assert first.info["by_kind"] == {"FINAL": turns - 2, "ERROR": 1, "REJECTED": 2}
    assert ok.check(SIDE_EFFECTS_AT_MOST_ONCE).info["notify_results_ok"] == SESSIONS
    assert ok.check(PARTITIONS_MOVING).counts == {
        "groups": 4,
        "partitions": 12,
        "lagging_partitions": 0,
        "lag": 0,
    }
    assert "verify: OK" in ok.to_text()
    assert ok.to_dict()["ok"] is True

    assert reports["dlq_replayed_twice"].check(DLQ_EXACT).info["duplicates"] == 2
    assert reports["dlq_allowed_reason"].check(DLQ_EXACT).info["allowed_unexpected"] == 1

    def counts(scenario: str, check: str) -> dict[str, int]:
        return reports[scenario].check(check).counts

    def kinds(scenario: str, check: str) -> Collection[str]:
        return {e["kind"] for e in reports[scenario].check(check).examples}

    assert counts("missing_response", ONE_FINAL_RESPONSE)["lost"] == 1
    assert counts("missing_response", ONE_FINAL_RESPONSE)["duplicated"] == 0
    assert counts("duplicate_response", ONE_FINAL_RESPONSE)["duplicated"] == 1
    assert counts("duplicate_response", ONE_FINAL_RESPONSE)["lost"] == 0
    assert counts("lost_turn", ONE_FINAL_RESPONSE)["lost_turn"] == 1
    assert counts("lost_turn", ONE_FINAL_RESPONSE)["lost"] == 0
    assert kinds("seq_gap", SEQ_CONTIGUOUS) == {"gap"}
    assert reports["seq_gap"].check(SEQ_CONTIGUOUS).examples[0]["missing"] == [3]
    assert kinds("duplicate_seq", SEQ_CONTIGUOUS) == {"duplicate_seq"}
    assert reports["duplicate_seq"].check(SEQ_CONTIGUOUS).examples[0]["identical_bytes"] is True
    assert counts("cassandra_differs", CASSANDRA_MATCHES_EVENTS)["record_mismatch"] == 1
    assert counts("duplicate_notify", SIDE_EFFECTS_AT_MOST_ONCE)["duplicate_keys"] == 1
    assert kinds("unexpected_dlq", DLQ_EXACT) == {"unexpected"}
    assert reports["unexpected_dlq"].check(DLQ_EXACT).examples[0]["service"] == "checkpoint"
    assert kinds("missing_dlq", DLQ_EXACT) == {"missing"}
    assert kinds("dlq_wrong_reason", DLQ_EXACT) == {"reason_mismatch"}
    assert counts("group_lagging", PARTITIONS_MOVING)["lagging_partitions"] == 1
    assert counts("group_lagging", PARTITIONS_MOVING)["lag"] == 1
