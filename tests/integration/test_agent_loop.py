"""The agent loop end to end: all four services, two replicas each, on the real servers."""

from __future__ import annotations

import asyncio
from collections import Counter

from shared.avro import default_codec
from shared.cassandra import Statements
from shared.context import fold
from shared.eventlog import EventLog
from shared.redis import HotContextStore
from shared.settings import CassandraSettings, KafkaSettings
from tests.integration.agent_stack import Client, running_stack


async def _log_when_checkpointed(statements: Statements, tenant: str, session: str, head: int) -> list[dict]:
    codec = default_codec()
    log = EventLog(statements)
    async with asyncio.timeout(30):
        while True:
            stored = await log.read(tenant, session)
            if stored and stored[-1].seq >= head:
                return [codec.decode(e.record, expected="SessionEvent").datum for e in stored]
            await asyncio.sleep(0.2)


async def test_a_multi_turn_conversation_with_tools_completes_and_its_log_folds_back(
    topics: KafkaSettings,
    cassandra_settings: CassandraSettings,
    statements: Statements,
    redis_client,
    run_id: str,
) -> None:  # type: ignore[no-untyped-def]
    session = f"conv-{run_id}"
    async with running_stack(topics, cassandra_settings), Client(topics) as client:
        r1 = await client.ask("acme", session, "what is 2+3*4")
        r2 = await client.ask("acme", session, "remember that my colour is blue")
        r3 = await client.ask("acme", session, "what is my colour")
        r4 = await client.ask("acme", session, "wait 1 seconds and then notify ops that the test ran")
    replies = [r1, r2, r3, r4]
    assert [r["kind"] for r in replies] == ["FINAL"] * 4, replies
    assert "14" in r1["text"]
    assert "blue" in r3["text"]
    assert sum(r["steps"] for r in replies) >= 6  # several model steps: the tools were used

    hot = await HotContextStore(redis_client, ttl_s=60).get("acme", session)
    assert hot is not None
    events = await _log_when_checkpointed(statements, "acme", session, hot.seq)
    assert [e["seq"] for e in events] == list(range(len(events))), "contiguous, no duplicates"
    tools = [e["payload"]["tool"] for e in events if e["event_type"] == "TOOL_CALLED"]
    assert {"calculator", "kv.put", "kv.get", "sleep", "notify"} <= set(tools)
    assert [e["event_type"] for e in events].count("RESPONSE_SENT") == 4
    # The stored log folds back into exactly the context reasoning holds.
    rebuilt = fold("acme", session, events)
    assert rebuilt.to_json() == hot.data


async def test_two_hundred_concurrent_sessions_complete_over_two_replicas_of_each_service(
    topics: KafkaSettings,
    service_processes,
    run_id: str,  # type: ignore[no-untyped-def]
) -> None:
    # Real processes: two of each service, each its own group member.
    service_processes(ingress=2, tool_exec=2, checkpoint=2, reasoning=2)
    async with Client(topics) as client:
        sessions = [(f"many-{run_id}-{i}", i % 7 + 1, i % 5 + 2, i % 3 + 1) for i in range(200)]
        ids = await asyncio.gather(
            *(client.send("acme", s, f"what is {a}+{b}*{c}") for s, a, b, c in sessions)
        )
        replies = await asyncio.gather(*(client.reply(m, within_s=180) for m in ids))
    for (s, a, b, c), reply in zip(sessions, replies, strict=True):
        assert reply["kind"] == "FINAL", (s, reply)
        assert str(a + b * c) in reply["text"], (s, reply["text"])
    assert len({r["message_id"] for r in client.all_responses}) == len(client.all_responses) == 200


async def test_concurrency_policies_queue_reject_and_interrupt(
    topics: KafkaSettings, cassandra_settings: CassandraSettings, statements: Statements, run_id: str
) -> None:
    async with running_stack(topics, cassandra_settings, replicas=1), Client(topics) as client:
        # queue (the default): the second message waits for the running turn, then runs.
        s = f"queue-{run_id}"
        first = await client.send("acme", s, "wait 2 seconds")
        await asyncio.sleep(0.5)
        second = await client.send("acme", s, "what is 6*7", policy="QUEUE")
        r1, r2 = await client.reply(first), await client.reply(second)
        assert (r1["kind"], r2["kind"]) == ("FINAL", "FINAL")
        assert "42" in r2["text"]
        assert r2["created_at"] >= r1["created_at"], "the queued turn ran after the running one"

        # reject: the second message is refused while the turn runs; the first completes.
        s = f"reject-{run_id}"
        first = await client.send("acme", s, "wait 2 seconds")
        await asyncio.sleep(0.5)
        second = await client.send("acme", s, "what is 6*7", policy="REJECT")
        r2 = await client.reply(second)
        assert (r2["kind"], r2["reason"]) == ("REJECTED", "turn_in_progress")
        assert (await client.reply(first))["kind"] == "FINAL"

        # interrupt: the running turn ends with an error, the new one runs.
        s = f"interrupt-{run_id}"
        first = await client.send("acme", s, "wait 3 seconds")
        await asyncio.sleep(0.5)
        second = await client.send("acme", s, "what is 6*7", policy="INTERRUPT")
        r1, r2 = await client.reply(first), await client.reply(second)
        assert (r1["kind"], r1["reason"]) == ("ERROR", "interrupted")
        assert r2["kind"] == "FINAL" and "42" in r2["text"]
    # Exactly one final response per accepted message, whatever the policy.
    per_message: dict[str, int] = {}
    for r in client.all_responses:
        per_message[r["message_id"]] = per_message.get(r["message_id"], 0) + 1
    assert set(per_message.values()) == {1}


async def test_bad_input_ends_in_the_dlq_or_a_rejection_and_every_service_keeps_serving(
    topics: KafkaSettings, cassandra_settings: CassandraSettings, statements: Statements, run_id: str
) -> None:
    from shared.kafka import make_consumer, make_producer
    from shared.service import session_key

    codec = default_codec()
    session = f"bad-{run_id}"
    key = session_key("acme", session)
    good_header = bytes.fromhex("c301") + codec.registry.latest("UserMessage").fingerprint
    async with running_stack(topics, cassandra_settings, replicas=1), Client(topics) as client:
        raw = make_producer(topics, client_id="bad-input")
        await raw.start()
        try:
            # Garbage and an unknown fingerprint at every service's input topic.
            for topic in ("ingress", "reasoning.inbox", "tool.calls", "events"):
                await raw.send_and_wait(topics.topic(topic), b"\x00garbage", key=key)
                await raw.send_and_wait(topics.topic(topic), b"\xc3\x01" + b"\x11" * 8 + b"body", key=key)
            await raw.send_and_wait(topics.topic("ingress"), good_header + b"x" * 70000, key=key)  # oversized
        finally:
            await raw.stop()
        unsigned = await client.send("acme", session, "hello", secret="")
        forged = await client.send("acme", session, "hello", secret="not-the-secret")
        await client.ask("acme", session, "what is 1+1")  # acme now owns the session
        foreign = await client.send("globex", session, "hello")
        assert (await client.reply(unsigned))["reason"] == "unsigned"
        assert (await client.reply(forged))["reason"] == "forged_signature"
        assert (await client.reply(foreign))["reason"] == "foreign_session"
        # ... and the services still serve.
        ok = await client.ask("acme", session, "what is 20+22")
        assert ok["kind"] == "FINAL" and "42" in ok["text"]

    dlq = make_consumer(topics, group_id=None, client_id="dlq-reader", topics=[topics.topic("dlq")])
    await dlq.start()
    letters: list[dict] = []
    try:
        async with asyncio.timeout(20):
            while len(letters) < 9:
                for records in (await dlq.getmany(timeout_ms=300)).values():
                    letters += [codec.decode(r.value, expected="DeadLetter").datum for r in records]
    finally:
        await dlq.stop()
    reasons = Counter((d["service"], d["source_topic"].rsplit(".", 1)[-1], d["reason_code"]) for d in letters)
    for service, topic in (("ingress", "ingress"), ("reasoning", "inbox"), ("tool-exec", "calls"),
                           ("checkpoint", "events")):  # fmt: skip
        assert reasons[(service, topic, "bad_magic")] == 1, reasons
        assert reasons[(service, topic, "unknown_fingerprint")] == 1, reasons
    assert reasons[("ingress", "ingress", "oversized")] == 1
    assert all(d["reason"] and d["value"] is not None for d in letters)
