"""The ingress service against the real servers: every input ends forwarded, rejected, dead-lettered
or counted as a duplicate, and the partition keeps moving after bad input."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from services.ingress.handlers import turn_id_for
from services.ingress.main import run_ingress
from services.ingress.settings import IngressSettings
from services.ingress.signing import sign
from shared.avro import AvroCodec, default_codec
from shared.kafka import make_consumer, make_producer, transactional_id_for
from shared.service import Probes, session_key
from shared.settings import CassandraSettings, KafkaSettings

SECRETS = {"acme": "s3cret", "globex": "other"}
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def ingress_settings(
    topics: KafkaSettings, cassandra: CassandraSettings, secrets: dict[str, str], **overrides: Any
) -> IngressSettings:
    return IngressSettings.from_env(
        topic_prefix=topics.topic_prefix,
        topic_partitions=topics.topic_partitions,
        cassandra_keyspace=cassandra.cassandra_keyspace,
        group_id=f"{topics.topic_prefix}-ingress",
        tenant_secrets=json.dumps(secrets),
        max_record_bytes=4096,
        max_text_chars=500,
        retry_backoff_s=0.2,
        **overrides,
    )


@contextlib.asynccontextmanager
async def running_ingress(settings: IngressSettings) -> AsyncIterator[Probes]:
    stop, probes = asyncio.Event(), Probes()
    task = asyncio.create_task(run_ingress(settings, stop, probes))
    try:
        yield probes
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task  # a crash of the service fails the test here


class Client:
    """Produces UserMessages the way an external client does, and reads every output topic."""

    def __init__(self, settings: KafkaSettings, codec: AvroCodec) -> None:
        self.settings = settings
        self.codec = codec
        self.producer: AIOKafkaProducer = make_producer(settings, client_id="test-client")
        self.readers: dict[str, AIOKafkaConsumer] = {
            name: make_consumer(
                settings, group_id=None, client_id=f"test-{name}", topics=[settings.topic(name)]
            )
            for name in ("reasoning.inbox", "responses", "dlq")
        }
        self.seen: dict[str, list[dict[str, Any]]] = {name: [] for name in self.readers}
        self.headers: dict[str, list[dict[str, bytes]]] = {name: [] for name in self.readers}

    async def __aenter__(self) -> Client:
        await self.producer.start()
        for reader in self.readers.values():
            await reader.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()
        for reader in self.readers.values():
            await reader.stop()

    def encode(self, tenant: str, session: str, message_id: str, text: str = "hello", **extra: Any) -> bytes:
        version = extra.pop("version", 2)
        datum = {
            "tenant_id": tenant,
            "session_id": session,
            "message_id": message_id,
            "text": text,
            "sent_at": dt.datetime.now(dt.UTC),
            **extra,
        }
        return self.codec.encode("UserMessage", datum, version=version)

    async def send_raw(
        self, value: bytes, *, key: bytes, secret: str | None = None, signature: str | None = None
    ) -> None:
        headers = [("traceparent", TRACEPARENT)]
        if secret is not None:
            signature = sign(secret, value)
        if signature is not None:
            headers.append(("x-agentbus-signature", signature.encode()))
        await self.producer.send_and_wait(self.settings.topic("ingress"), value, key=key, headers=headers)

    async def send(
        self, tenant: str, session: str, message_id: str, *, secret: str | None = None, **fields: Any
    ) -> None:
        value = self.encode(tenant, session, message_id, **fields)
        await self.send_raw(value, key=session_key(tenant, session), secret=secret or SECRETS.get(tenant))

    async def wait_for(self, topic: str, predicate: Any, within_s: float = 60.0) -> dict[str, Any]:
        """The first record of ``topic`` (decoded) matching ``predicate``, polling all readers."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            for datum in self.seen[topic]:
                if predicate(datum):
                    return datum
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"nothing on {topic} matched within {within_s}s; saw {self.seen[topic]}")
            await self.poll()

    async def poll(self) -> None:
        for name, reader in self.readers.items():
            batches = await reader.getmany(timeout_ms=100)
            for records in batches.values():
                for r in records:
                    self.seen[name].append(self.codec.decode(r.value).datum)
                    self.headers[name].append({k: v for k, v in r.headers})


def by_message(message_id: str) -> Any:
    return lambda d: d.get("message_id") == message_id


async def test_ingress_forwards_rejects_dead_letters_and_keeps_serving(
    topics: KafkaSettings, cassandra_settings: CassandraSettings, statements: object, run_id: str
) -> None:
    settings = ingress_settings(topics, cassandra_settings, SECRETS)
    codec = default_codec()
    s1, s2, s3 = f"s1-{run_id}", f"s2-{run_id}", f"s3-{run_id}"
    async with Client(topics, codec) as client, running_ingress(settings) as probes:
        # Valid v2 message with its own policy; a v1 message (tenant default policy).
        await client.send("acme", s1, "m-v2", concurrency_policy="INTERRUPT", metadata={"lang": "en"})
        await client.send("acme", s2, "m-v1", version=1)
        # Undecodable / oversized records: DLQ with the original bytes.
        garbage = b"this is not avro"
        await client.send_raw(garbage, key=b"acme/x", secret="s3cret")
        unknown_fp = b"\xc3\x01" + os.urandom(8) + b"\x02body"
        await client.send_raw(unknown_fp, key=b"acme/x", secret="s3cret")
        await client.send("acme", s1, "m-huge", text="x" * 5000)
        # Tenant checks.
        await client.send_raw(client.encode("acme", s1, "m-unsigned"), key=session_key("acme", s1))
        await client.send("acme", s1, "m-forged", secret="not-the-secret")
        await client.send("initech", s1, "m-unknown", secret="whatever")
        # Text checks.
        await client.send("acme", s1, "m-long", text="y" * 501)
        await client.send("acme", s1, "m-empty", text="")
        # The same message twice (likely in one batch), and once more after it was committed.
        await client.send("acme", s3, "m-dup")
        await client.send("acme", s3, "m-dup")

        turn = await client.wait_for("reasoning.inbox", by_message("m-v2"))
        # globex's records are keyed globex/s1, another partition: only once acme's claim on s1
        # is committed is the order of the two claims known.
        await client.send("globex", s1, "m-foreign")
        assert turn == {
            "tenant_id": "acme",
            "session_id": s1,
            "message_id": "m-v2",
            "turn_id": turn_id_for("acme", s1, "m-v2"),
            "text": "hello",
            "concurrency_policy": "INTERRUPT",
            "requested_at": turn["requested_at"],
            "metadata": {"lang": "en"},
            "session_created": True,  # s1's first message: its claim applied
        }
        assert turn["turn_id"] == "t-" + hashlib.sha256(f"acme/{s1}/m-v2".encode()).hexdigest()[:24]
        v1 = await client.wait_for("reasoning.inbox", by_message("m-v1"))
        assert v1["concurrency_policy"] == "QUEUE" and v1["metadata"] == {}

        for value, reason in [(garbage, "bad_magic"), (unknown_fp, "unknown_fingerprint")]:
            letter = await client.wait_for("dlq", lambda d, v=value: d["value"] == v)
            assert letter["reason_code"] == reason and letter["service"] == "ingress"
            assert letter["source_topic"] == settings.topic("ingress") and letter["key"] == b"acme/x"
            assert {"key": "traceparent", "value": TRACEPARENT} in letter["headers"]
        huge = await client.wait_for("dlq", lambda d: d["reason_code"] == "oversized")
        assert huge["value"] is not None and len(huge["value"]) > 4096

        for message_id, reason in [
            ("m-unsigned", "unsigned"),
            ("m-forged", "forged_signature"),
            ("m-unknown", "unknown_tenant"),
            ("m-foreign", "foreign_session"),
            ("m-long", "too_long"),
            ("m-empty", "empty"),
        ]:
            response = await client.wait_for("responses", by_message(message_id))
            assert (response["kind"], response["reason"], response["turn_id"]) == ("REJECTED", reason, None)
            assert response["steps"] == 0 and response["text"]

        # Duplicates: after the first forward is committed, send it a third time, then a sentinel
        # on the same session (same partition, so it is handled after the duplicate).
        await client.wait_for("reasoning.inbox", by_message("m-dup"))
        await client.send("acme", s3, "m-dup")
        await client.send("acme", s3, "m-after-dup")
        await client.wait_for("reasoning.inbox", by_message("m-after-dup"))

        # After all the bad input the service still serves, on every session.
        await client.send("acme", s1, "m-last")
        last = await client.wait_for("reasoning.inbox", by_message("m-last"))
        assert last["turn_id"] == turn_id_for("acme", s1, "m-last")
        await client.poll()

        results = await probes.run()
        assert probes.started and results == {"kafka": True, "redis": True, "cassandra": True}

    forwarded = [d["message_id"] for d in client.seen["reasoning.inbox"]]
    assert forwarded.count("m-dup") == 1, forwarded
    # Only the first message of each session created it (its claim applied; later ones hit the
    # owner cache or the claim already made).
    created = {d["message_id"] for d in client.seen["reasoning.inbox"] if d["session_created"]}
    assert created == {"m-v2", "m-v1", "m-dup"}, created
    assert sorted(forwarded) == sorted(["m-v2", "m-v1", "m-dup", "m-after-dup", "m-last"])
    # Every TurnRequested continues the client's trace: the same trace id, whose parent span is
    # the client's or (with a recording tracer provider in this process) ingress's own.
    trace_id = TRACEPARENT.split(b"-")[1]
    assert all(h["traceparent"].split(b"-")[1] == trace_id for h in client.headers["reasoning.inbox"])
    inbox_keys = {(d["tenant_id"], d["session_id"]) for d in client.seen["reasoning.inbox"]}
    assert inbox_keys == {("acme", s1), ("acme", s2), ("acme", s3)}


async def test_tenant_over_its_rate_is_rejected(
    topics: KafkaSettings, cassandra_settings: CassandraSettings, statements: object, run_id: str
) -> None:
    tenant = f"tiny-{run_id}"  # a bucket of its own, whatever other runs did to acme's
    settings = ingress_settings(
        topics, cassandra_settings, {tenant: "t"}, tenant_burst=2, tenant_rate_per_s=0.01
    )
    codec = default_codec()
    async with Client(topics, codec) as client, running_ingress(settings):
        for n in range(4):
            await client.send(tenant, f"s-{run_id}", f"m-{n}", secret="t")
        limited = [await client.wait_for("responses", by_message(f"m-{n}")) for n in (2, 3)]
        assert [(r["kind"], r["reason"]) for r in limited] == [("REJECTED", "rate_limited")] * 2
        for n in (0, 1):
            await client.wait_for("reasoning.inbox", by_message(f"m-{n}"))
        await client.poll()
    assert sorted(d["message_id"] for d in client.seen["reasoning.inbox"]) == ["m-0", "m-1"]


@pytest.fixture(autouse=True)
def _quiet_kafka_logs() -> None:
    import logging

    logging.getLogger("aiokafka").setLevel(logging.ERROR)


async def test_a_message_whose_commit_was_fenced_is_forwarded_once_the_partition_stays_here(
    topics: KafkaSettings, cassandra_settings: CassandraSettings, statements: object, run_id: str
) -> None:
    """The partition's producer is fenced while this consumer keeps the partition (no rebalance
    resets its position): the decided message must be fetched and decided again, not dropped."""
    settings = ingress_settings(topics, cassandra_settings, SECRETS)
    session = f"s-fenced-{run_id}"
    key = session_key("acme", session)
    partitions = list(range(topics.topic_partitions))
    tp = TopicPartition(topics.topic("ingress"), DefaultPartitioner()(key, partitions, partitions))
    codec = default_codec()
    async with Client(topics, codec) as client, running_ingress(settings):
        await client.send("acme", session, "m-before")
        await client.wait_for("reasoning.inbox", by_message("m-before"))
        # Another producer with the partition's transactional id: ingress's own is fenced.
        txn_id = transactional_id_for(settings.group_id, tp)
        intruder = make_producer(topics, client_id="intruder", transactional_id=txn_id)
        await intruder.start()
        await intruder.stop()
        await client.send("acme", session, "m-after-fence")
        await client.wait_for("reasoning.inbox", by_message("m-after-fence"), within_s=30)
        await client.poll()
    forwarded = [d["message_id"] for d in client.seen["reasoning.inbox"] if d["session_id"] == session]
    assert forwarded == ["m-before", "m-after-fence"]
