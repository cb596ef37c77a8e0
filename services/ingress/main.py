"""The ingress service: consume agentbus.ingress, decide each record, publish atomically.

Every record ends in exactly one of: a TurnRequested on the inbox, a REJECTED
AgentResponse, a DeadLetter, or a counted duplicate drop. The outputs of a batch of
one partition and that partition's next offset are committed in one Kafka
transaction (:class:`shared.kafka.PartitionTransactions`), so a crash either
publishes all of a batch's decisions with its offset or none of them (and the
records are redelivered). Idempotency keys are written to Redis only after that
commit: written earlier, an aborted transaction would make the redelivered message
look like a duplicate and it would be lost.

When Redis or Cassandra fail, the partition stops at the record that could not be
decided (what was decided before it is committed), seeks back to it and retries
after a backoff: a valid message is never refused because a dependency is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError, ProducerFenced
from cassandra import DriverException
from prometheus_client import Counter

from shared.avro import AvroCodec, default_codec
from shared.cassandra import Statements, connect_when_reachable, execute
from shared.kafka import (
    OutRecord,
    PartitionNotOwnedError,
    PartitionTransactions,
    TopicPartition,
    TransactionAbortedError,
    make_consumer,
    poll,
    start_when_reachable,
)
from shared.metrics import LagMonitor, MeteredLimiter
from shared.redis import make_redis
from shared.service import STORE_UNAVAILABLE, Probes, client_id
from shared.telemetry import consume_span, mark_error, record_attributes, trace_headers

from .adapters import RedisSeenMessages, RedisTokenBucket, SessionOwnership
from .handlers import (
    Admission,
    DeadLetter,
    Forward,
    Limits,
    Outcome,
    Source,
    load_tenants,
    outcome_name,
    output_records,
    policy_symbol,
)
from .settings import IngressSettings

log = logging.getLogger(__name__)

RECORDS = Counter(
    "agentbus_ingress_records_total",
    "Ingress records by outcome (forwarded, rejected, dead_lettered, duplicate) and reason",
    ["outcome", "reason"],
)
RETRIES = Counter(
    "agentbus_ingress_retries_total",
    "Partition batches retried (dependency down, transaction aborted)",
    ["cause"],
)
IDEM_WRITE_FAILURES = Counter(
    "agentbus_ingress_idempotency_write_failures_total",
    "Forwarded messages whose idempotency key could not be written to Redis after commit",
)

# A dependency that is down or slow: retry the record, never reject or dead-letter it for this.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *STORE_UNAVAILABLE,
    DriverException,
    OSError,
    TimeoutError,
)


class IngressLoop:
    """Decides and commits the batches of the partitions this replica owns."""

    def __init__(
        self,
        settings: IngressSettings,
        *,
        consumer: AIOKafkaConsumer,
        txns: PartitionTransactions,
        admission: Admission,
        seen: RedisSeenMessages,
        codec: AvroCodec,
        stop: asyncio.Event,
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self._txns = txns
        self._admission = admission
        self._seen = seen
        self._codec = codec
        self._stop = stop

    async def run(self) -> None:
        """Poll and handle batches until ``stop`` is set; the batch in hand is finished first."""
        while not self._stop.is_set():
            batches = await poll(self._consumer, timeout_ms=300)
            # Partitions are independent (each has its own transactional producer): their batches
            # are decided and committed concurrently, so one partition's commit does not hold up
            # the turns of another. Within a partition, batches stay in order (one per poll).
            await asyncio.gather(*(self.handle_batch(tp, records) for tp, records in batches.items()))

    async def _decide(
        self, tp: TopicPartition, record: ConsumerRecord[Any, Any], forwarded: set[str]
    ) -> tuple[Outcome, list[OutRecord]] | None:
        """One message's outcome and records (made in its span: they carry its trace context).

        None when a dependency is down (the batch stops there).
        """
        with consume_span("ingress.admit", record.headers, attributes=record_attributes(record)) as span:
            try:
                outcome = await self._admission.admit(record.value, list(record.headers), forwarded)
            except TRANSIENT_ERRORS as exc:
                log.warning("%s@%d: dependency unavailable (%r); will retry", tp, record.offset, exc)
                mark_error(span, exc)
                return None
            except Exception as exc:  # a bug on one record must not stop the partition
                log.exception("%s@%d: handler error; dead-lettering the record", tp, record.offset)
                outcome = DeadLetter("handler_error", f"{type(exc).__name__}: {exc}", type(exc).__name__)
            span.set_attribute("agentbus.outcome", outcome_name(outcome))
            if outcome.reason:
                span.set_attribute("agentbus.reason", outcome.reason)
            return outcome, self._outputs(record, outcome)

    async def handle_batch(self, tp: TopicPartition, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """Decide ``records`` (one partition, in order); commit outputs + next offset in one transaction."""
        forwarded: set[str] = set()
        decided: list[tuple[int, Outcome]] = []
        outputs: list[OutRecord] = []
        failed_at: int | None = None
        # Messages are keyed by their session, as the TurnRequested they become: the transaction
        # opens (AddPartitionsToTxn for those inbox partitions) while the batch is decided.
        inbox = self._settings.topic("reasoning.inbox")
        targets = {(inbox, record.key, None) for record in records if record.key is not None}
        with self._txns.working(tp, targets):
            for record in records:
                done = await self._decide(tp, record, forwarded)
                if done is None:
                    failed_at = record.offset
                    break
                outcome, out = done
                outputs.extend(out)
                decided.append((record.offset, outcome))

        if decided:
            try:
                await self._txns.commit(tp, outputs, {tp: decided[-1][0] + 1})
            except (ProducerFenced, PartitionNotOwnedError):
                # Another replica owns the partition now and redelivers these records from the
                # committed offset. But this consumer's position is already past them: if the
                # partition is (still, or again) assigned here without a rebalance resetting that
                # position, it must fetch them again, or they would never be decided by anyone.
                log.warning("%s: lost the partition; dropping %d decided records", tp, len(decided))
                await self._retry_from(tp, decided[0][0])
                return
            except (TransactionAbortedError, KafkaError) as exc:
                log.warning("%s: transaction aborted (%s); retrying from offset %d", tp, exc, decided[0][0])
                RETRIES.labels("transaction_aborted").inc()
                await self._retry_from(tp, decided[0][0])
                return
            for _, outcome in decided:
                RECORDS.labels(outcome_name(outcome), outcome.reason).inc()
            await self._remember([o.idem_key for _, o in decided if isinstance(o, Forward)])
        if failed_at is not None:
            RETRIES.labels("dependency_unavailable").inc()
            await self._retry_from(tp, failed_at)

    def _outputs(self, record: ConsumerRecord[Any, Any], outcome: Outcome) -> list[OutRecord]:
        source = Source(
            record.topic, record.partition, record.offset, record.key, record.value, list(record.headers)
        )
        now = dt.datetime.now(dt.UTC)
        s = self._settings
        return output_records(outcome, source, codec=self._codec, settings=s, now=now, trace=trace_headers())

    async def _remember(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            await self._seen.remember(keys)
        except TRANSIENT_ERRORS as exc:
            # Already forwarded and committed; a repeat would now pass ingress, and reasoning,
            # which finds the message_id in the session's log, drops it.
            IDEM_WRITE_FAILURES.inc(len(keys))
            log.warning("could not remember %d forwarded message ids (%r)", len(keys), exc)

    async def _retry_from(self, tp: TopicPartition, offset: int) -> None:
        """Re-fetch ``tp`` from ``offset`` after a backoff (cut short by stop)."""
        if tp in self._consumer.assignment():
            self._consumer.seek(tp, offset)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self._settings.retry_backoff_s)


def _check(settings: IngressSettings) -> None:
    """Refuse settings that cannot work, at start-up rather than on the first record."""
    policy_symbol(settings.default_policy)
    if settings.tenant_rate_per_s <= 0 or settings.tenant_burst < 1:
        raise ValueError("AGENTBUS_TENANT_RATE_PER_S must be > 0 and AGENTBUS_TENANT_BURST >= 1")


async def run_ingress(settings: IngressSettings, stop: asyncio.Event, probes: Probes) -> None:
    """Run the ingress service until ``stop`` is set, then finish the batch in hand and leave the group.

    Raises:
        TenantConfigError: the tenant secrets are not valid.
        ValueError: another setting is not valid.
    """
    _check(settings)
    tenants = load_tenants(settings)
    if not tenants:
        log.warning("no tenants configured: every message will be rejected as unknown_tenant")
    codec = default_codec()
    cid = client_id(settings)
    redis = make_redis(settings)
    cluster, session = await connect_when_reachable(settings, stop)
    try:
        statements = Statements(session, settings.cassandra_keyspace)
        owners = SessionOwnership(redis, statements, cache_ttl_s=settings.owner_cache_ttl_s)
        await asyncio.to_thread(owners.prepare)
        seen = RedisSeenMessages(redis, ttl_s=settings.dedup_ttl_s)
        admission = Admission(
            codec=codec,
            tenants=tenants,
            limits=Limits(settings.max_record_bytes, settings.max_text_chars),
            owners=owners,
            seen=seen,
            limiter=MeteredLimiter(
                RedisTokenBucket(redis, rate_per_s=settings.tenant_rate_per_s, burst=settings.tenant_burst),
                bucket="tenant",
            ),
        )
        consumer = make_consumer(settings, group_id=settings.group_id, client_id=cid)
        txns = PartitionTransactions(settings, group_id=settings.group_id, client_id=cid, consumer=consumer)
        consumer.subscribe([settings.topic("ingress")], listener=txns)

        async def kafka_ready() -> bool:
            return bool(await consumer.topics())

        async def redis_ready() -> bool:
            return bool(await redis.ping())

        async def cassandra_ready() -> bool:
            return bool(await execute(session, "SELECT release_version FROM system.local"))

        probes.add("kafka", kafka_ready)
        probes.add("redis", redis_ready)
        probes.add("cassandra", cassandra_ready)
        await start_when_reachable(consumer, stop, what="ingress consumer")
        lag_monitor = LagMonitor.of(consumer, settings)
        lag_monitor.start()
        try:
            probes.started = True
            log.info("ingress consuming %s as group %s", settings.topic("ingress"), settings.group_id)
            loop = IngressLoop(
                settings, consumer=consumer, txns=txns, admission=admission, seen=seen, codec=codec, stop=stop
            )
            await loop.run()
        finally:
            probes.started = False
            await lag_monitor.stop()
            await consumer.stop()  # leaves the group, so the partitions move at once
            await txns.stop()
    finally:
        await redis.aclose()
        await asyncio.to_thread(cluster.shutdown)
