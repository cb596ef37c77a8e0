"""The tool-exec service: the hands. ToolCalls in, ToolResults back to the reasoning inbox.

Each ToolCall runs through :class:`~services.tool_exec.runner.ToolRunner` (idempotency
classes, LWT claims for irreversible tools, timeouts, retries, per-tool limits and
replica slots), concurrently with the other calls of its partition.

Delivery is at-least-once, without Kafka transactions: a call's ToolResult is
published (acknowledged by the in-sync replicas, idempotent producer) before its
offset counts as done, and the partition's watermark (the oldest unfinished call) is
committed every ``AGENTBUS_TOOL_COMMIT_INTERVAL_S`` and when the partition is revoked.
A crash re-runs only calls past the committed watermark; the idempotency store answers
them without repeating side effects (an irreversible call found claimed but
unfinished becomes ``OUTCOME_UNKNOWN``), and reasoning drops a ToolResult that is no
longer pending. Fencing is reasoning's job (it is the single writer of a session);
here a transaction per call would only double the broker's work per agent step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord
from opentelemetry.trace import Span, SpanKind
from prometheus_client import Counter, Gauge

from services.tool_exec.idempotency import ToolResultStore
from services.tool_exec.registry import ToolRegistry
from services.tool_exec.runner import ToolCallRequest, ToolRunner
from services.tool_exec.settings import ToolExecSettings
from shared.avro import AvroCodec, CodecError, default_codec
from shared.cassandra import Statements, connect_when_reachable
from shared.kafka import (
    OffsetWatermark,
    OutRecord,
    make_consumer,
    make_producer,
    poll,
    start_when_reachable,
    stop_quietly,
)
from shared.metrics import LagMonitor, busy_from_gauge
from shared.service import (
    Probes,
    client_id,
    configure_logging,
    dead_letter_record,
    run_service,
    session_key,
)
from shared.telemetry import child_span, consume_span, record_attributes, trace_headers

log = logging.getLogger("agentbus.tool_exec")

CALLS = Counter("agentbus_tool_calls_total", "Tool calls finished", ["tool", "status"])
SLOTS_IN_USE = Gauge("agentbus_tool_slots_in_use", "Tool calls executing or waiting on this replica")


class ToolPartition:
    """The calls of one tool.calls partition in flight, and its commit watermark."""

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.offsets = OffsetWatermark()
        self.tasks: set[asyncio.Task[None]] = set()
        self.committed = -1  # the offset last committed for this partition in this tenure

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class ResultPublisher:
    """The replica's idempotent producer of ToolResults and dead letters.

    A send that fails (after the client's own retries) or times out leaves the producer in
    an unknown state: it is replaced by a new one, never reused, and the records are sent
    again (a duplicate ToolResult is dropped by reasoning).
    """

    def __init__(self, settings: ToolExecSettings, client_id: str) -> None:
        self.settings = settings
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _current(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = make_producer(self.settings, client_id=f"{self.client_id}-results")
                await start_when_reachable(producer, what="tool-exec producer")
                self._producer = producer
            return self._producer

    async def _replace(self, broken: AIOKafkaProducer) -> None:
        async with self._lock:
            if self._producer is broken:
                self._producer = None
        await stop_quietly(broken)

    async def publish(self, records: Sequence[OutRecord]) -> None:
        """Send ``records`` and wait until every one is acknowledged by the in-sync replicas."""
        delay = 0.1
        while True:
            producer = await self._current()
            try:
                sends = [
                    await producer.send(r.topic, r.value, key=r.key, headers=list(r.headers)) for r in records
                ]
                await asyncio.gather(*sends)
                return
            except KafkaError as exc:
                log.warning("publishing %d records failed (%s); re-creating the producer", len(records), exc)
                await self._replace(producer)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def stop(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            await stop_quietly(producer)


class ToolExec(ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs the calls of the partitions it owns; at-least-once towards reasoning.

    A call's ToolResult is published (acknowledged) before its offset counts as done, and
    the partition's watermark is committed every ``commit_interval_s`` and on revocation.
    A crash re-runs only calls whose offsets were not committed: the idempotency store
    answers them without repeating effects, and reasoning drops the duplicate results.
    No Kafka transaction is needed for that (DESIGN.md: reasoning, the single writer of a
    session, is the service whose outputs must be fenced).
    """

    def __init__(
        self,
        settings: ToolExecSettings,
        codec: AvroCodec,
        runner: ToolRunner,
        publisher: ResultPublisher,
        consumer: AIOKafkaConsumer,
    ) -> None:
        self.consumer = consumer
        self.settings = settings
        self.codec = codec
        self.runner = runner
        self.publisher = publisher
        self.partitions: dict[TopicPartition, ToolPartition] = {}

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        for tp in assigned:
            # Revocation dropped any past tenure's state; a part made by submit() since the
            # assignment became visible belongs to this tenure and is kept.
            if tp not in self.partitions:
                self.partitions[tp] = ToolPartition(tp)

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        parts = [self.partitions.pop(tp) for tp in revoked if tp in self.partitions]
        await asyncio.gather(*(p.close() for p in parts))
        await self.commit(parts)  # what finished is not run again by the next owner

    async def commit(self, parts: Iterable[ToolPartition] | None = None) -> None:
        """Commit the watermark of every partition that moved (best effort: a failure only
        means the next owner runs those calls again, idempotently)."""
        chosen = list(self.partitions.values() if parts is None else parts)
        offsets: dict[TopicPartition, int] = {}
        for part in chosen:
            with contextlib.suppress(ValueError):  # nothing was ever added
                point = part.offsets.commit_point()
                if point > part.committed:
                    offsets[part.tp] = point
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (KafkaError, IllegalStateError) as exc:
            log.info("committing tool.calls offsets failed (%s); the calls may run again", exc)
            return
        for part in chosen:
            if part.tp in offsets:
                part.committed = offsets[part.tp]

    @property
    def in_flight(self) -> int:
        return sum(len(p.offsets) for p in self.partitions.values())

    def submit(self, record: ConsumerRecord) -> None:
        tp = TopicPartition(record.topic, record.partition)
        part = self.partitions.get(tp)
        if part is None:
            if tp not in self.consumer.assignment():
                return  # fetched just before the partition was revoked: the new owner runs it
            # aiokafka shows a new assignment before the listener has run.
            part = self.partitions[tp] = ToolPartition(tp)
        part.offsets.add(record.offset)
        task = asyncio.create_task(self._handle(part, record))
        part.tasks.add(task)
        task.add_done_callback(part.tasks.discard)

    async def _handle(self, part: ToolPartition, record: ConsumerRecord) -> None:
        with consume_span("tool.execute", record.headers, attributes=record_attributes(record)) as span:
            SLOTS_IN_USE.inc()
            try:
                outputs = await self._outputs(record, span)
                with child_span("kafka.publish", kind=SpanKind.PRODUCER):
                    await self.publisher.publish(outputs)
                part.offsets.done(record.offset)
            finally:
                SLOTS_IN_USE.dec()

    async def _outputs(self, record: ConsumerRecord, span: Span) -> list[OutRecord]:
        s = self.settings
        try:
            decoded = self.codec.decode(record.value, expected="ToolCall")
        except CodecError as exc:
            return [self._dlq(record, exc.reason_code, str(exc), type(exc).__name__)]
        call = ToolCallRequest.from_record(decoded.datum)
        span.set_attribute("agentbus.tool", call.tool)
        span.set_attribute("agentbus.session", f"{call.tenant_id}/{call.session_id}")
        span.set_attribute("agentbus.turn", call.turn_id)
        span.set_attribute("agentbus.step", call.step)
        delay = 0.2
        while True:
            try:
                view = await self.runner.execute(call)
                break
            except Exception as exc:  # noqa: BLE001 - Cassandra unavailable etc.: try again, never skip
                log.warning(
                    "%s: executing %s failed (%s: %s); retrying",
                    call.call_id,
                    call.tool,
                    type(exc).__name__,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        CALLS.labels(call.tool, str(view.status)).inc()
        span.set_attribute("agentbus.tool.status", str(view.status))
        span.set_attribute("agentbus.tool.replayed", view.replayed)
        value = self.codec.encode("ToolResult", view.as_record(call))
        headers = trace_headers()
        key = session_key(call.tenant_id, call.session_id)
        return [OutRecord(s.topic("reasoning.inbox"), value, key=key, headers=headers)]

    def _dlq(self, record: ConsumerRecord, code: str, reason: str, error_type: str | None) -> OutRecord:
        return dead_letter_record(
            self.codec,
            service=self.settings.service_name,
            dlq_topic=self.settings.topic("dlq"),
            record=record,
            reason_code=code,
            reason=reason,
            error_type=error_type,
        )


async def run_tool_exec(settings: ToolExecSettings, stop: asyncio.Event, probes: Probes) -> None:
    codec = default_codec()
    cluster, session = await connect_when_reachable(settings, stop)
    statements = Statements(session, settings.cassandra_keyspace)
    registry = ToolRegistry.from_entry_points()
    runner = ToolRunner(
        registry, ToolResultStore(statements, settings.cassandra_serial_consistency), settings
    )
    cid = client_id(settings)
    consumer = make_consumer(settings, group_id=settings.group_id, client_id=cid)
    publisher = ResultPublisher(settings, cid)
    service = ToolExec(settings, codec, runner, publisher, consumer)

    async def kafka_ready() -> bool:
        return bool(await consumer.topics())

    async def cassandra_ready() -> bool:
        await statements.run("SELECT release_version FROM system.local")
        return True

    probes.add("kafka", kafka_ready)
    probes.add("cassandra", cassandra_ready)
    consumer.subscribe([settings.topic("tool.calls")], listener=service)
    await start_when_reachable(consumer, stop, what="tool-exec consumer")
    in_use = busy_from_gauge("agentbus_tool_slots_in_use", settings.slots)
    lag_monitor = LagMonitor.of(consumer, settings, busy=in_use)
    lag_monitor.start()
    probes.started = True
    paused = False
    last_commit = time.monotonic()
    try:
        while not stop.is_set():
            if time.monotonic() - last_commit >= settings.commit_interval_s:
                await service.commit()
                last_commit = time.monotonic()
            batches = await poll(consumer, timeout_ms=100, max_records=settings.kafka_max_poll_records)
            for records in batches.values():
                for record in records:
                    service.submit(record)
            # Backpressure: hold fetching while every slot is taken and a backlog waits.
            busy = service.in_flight
            if not paused and busy > settings.slots * 2:
                consumer.pause(*consumer.assignment())
                paused = True
            elif paused and busy <= settings.slots:
                consumer.resume(*consumer.assignment())
                paused = False
        consumer.pause(*consumer.assignment())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(1.0, settings.shutdown_grace_s - 5)):
                tasks = [t for part in service.partitions.values() for t in part.tasks]
                await asyncio.gather(*tasks, return_exceptions=True)
        await service.commit()
    finally:
        await lag_monitor.stop()
        await consumer.stop()  # revokes: finished offsets are committed, the group is left
        await publisher.stop()
        cluster.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        sys.stdout.write("python -m services.tool_exec\n\nSettings (environment):\n")
        sys.stdout.write(ToolExecSettings.describe() + "\n")
        return 0
    settings = ToolExecSettings.from_env()
    configure_logging(settings)
    return asyncio.run(run_service(settings, lambda stop, probes: run_tool_exec(settings, stop, probes)))
