"""The checkpoint service: projects ``agentbus.events`` into Cassandra, then commits.

One loop: poll a batch, write it (event log and session index: one Cassandra batch per
group of sessions on the same replicas, groups concurrently; then snapshots), dead-letter
what does not decode, and only then mark the batch's offsets for commit. Offsets are
committed every ``AGENTBUS_CHECKPOINT_COMMIT_INTERVAL_MS``, when the consumer goes idle,
when partitions are revoked and on stop: never past a record that is not written. A
failed write is never skipped: the consumer seeks back to the batch's first offsets and
the same records come again after a backoff; every write is idempotent, so that is
harmless, and so is re-reading up to one interval's worth of written records after a
crash.

Why not faust-streaming: faust acks a record when its agent moves to the next one
and commits acked offsets on a timer (``broker_commit_every``/``_interval``), so "commit
exactly this batch, only after Cassandra said yes, else re-read it" means fighting its
ack model; its tables (RocksDB + changelog topics) are local state we must not keep
(DESIGN rule 4); and its worker brings its own lifecycle and web server next to
``run_service``. A plain aiokafka consumer states the at-least-once contract in 20 lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter, Gauge, Histogram

from services.checkpoint.handlers import (
    SERVICE,
    InRecord,
    Rejected,
    SessionProgress,
    SnapshotGapError,
    decode_batch,
    group_writes,
    session_progress,
    snapshot_points,
    write_sessions,
    write_size,
    write_snapshots,
)
from services.checkpoint.settings import CheckpointSettings
from shared.avro import AvroCodec, default_codec
from shared.cassandra import Statements, connect_when_reachable
from shared.eventlog import EventLog, StoredEvent
from shared.kafka import header, make_consumer, make_producer, poll, start_when_reachable
from shared.metrics import LagMonitor, observe_checkpoint
from shared.service import Probes, client_id, dead_letter_record
from shared.telemetry import mark_error, record_attributes, start_consume_span

log = logging.getLogger(__name__)

T = TypeVar("T")

LAG = Gauge(
    "agentbus_checkpoint_lag_records",
    "Records of agentbus.events not yet checkpointed (end offset - position), per assigned partition",
    ["partition"],
)
EVENTS_WRITTEN = Counter("agentbus_checkpoint_events_written_total", "Events written to the Cassandra log")
SNAPSHOTS_WRITTEN = Counter("agentbus_checkpoint_snapshots_written_total", "Session snapshots written")
SNAPSHOTS_SKIPPED = Counter(
    "agentbus_checkpoint_snapshots_skipped_total", "Snapshots not written because the stored log has a gap"
)
BATCH_SECONDS = Histogram(
    "agentbus_checkpoint_batch_seconds",
    "Time to write one batch to Cassandra and commit it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
BATCH_FAILURES = Counter(
    "agentbus_checkpoint_batch_failures_total", "Batches that failed and will be re-read", ["stage"]
)

BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 10.0


class _Membership(ConsumerRebalanceListener):  # type: ignore[misc]
    """Knows whether the consumer has joined its group (an empty assignment is still joined);
    commits what was written of revoked partitions before they move."""

    def __init__(self) -> None:
        self.joined = False
        self.checkpointer: Checkpointer | None = None

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        if self.checkpointer is not None:
            await self.checkpointer.commit(only=revoked)
        for tp in revoked:
            with contextlib.suppress(KeyError):
                LAG.remove(str(tp.partition))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.joined = True


class BatchFailedError(Exception):
    """A batch could not be written or committed; it will be read again."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.stage = stage


class Checkpointer:
    """Writes one polled batch to Cassandra and the DLQ, then commits its offsets."""

    def __init__(
        self,
        settings: CheckpointSettings,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        statements: Statements,
        codec: AvroCodec,
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self._producer = producer
        self._statements = statements
        self._eventlog = EventLog(statements)
        self._codec = codec
        self._writes = asyncio.Semaphore(max(1, settings.write_concurrency))
        self._written: dict[TopicPartition, int] = {}  # next offset to commit, per partition
        self._last_commit = time.monotonic()

    async def checkpoint(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Project ``batch``; its offsets are committed by :meth:`commit`.

        The records that one reasoning step published (one ``traceparent``) get one span in
        their turn's trace, from the start of the batch until it is written.

        Raises:
            BatchFailedError: a write failed; nothing of the batch is marked for commit.
        """
        size = sum(len(rs) for rs in batch.values())
        steps: dict[bytes, list[ConsumerRecord]] = {}
        for rs in batch.values():
            for r in rs:
                steps.setdefault(bytes(header(r.headers, "traceparent") or b""), []).append(r)
        spans = [
            start_consume_span(
                "checkpoint.append",
                rs[0].headers,
                attributes={
                    **record_attributes(rs[0]),
                    "messaging.batch.message_count": len(rs),
                    "agentbus.batch": size,
                },
            )
            for rs in steps.values()
        ]
        try:
            await self._checkpoint(batch)
        except BaseException as exc:
            for span in spans:
                mark_error(span, exc)
            raise
        finally:
            for span in spans:
                span.end()

    async def _checkpoint(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        records = [_in_record(r) for rs in batch.values() for r in rs]
        decoded = decode_batch(self._codec, records)
        now = dt.datetime.now(dt.UTC)
        by_session: dict[tuple[str, str], list[StoredEvent]] = {}
        for e in decoded.events:
            by_session.setdefault((e.tenant_id, e.session_id), []).append(e)
        progress = session_progress(decoded.events)

        groups = group_writes(
            (
                (sid, self._eventlog.replicas(events[0]), write_size(events))
                for sid, events in by_session.items()
            ),
            self._settings.write_batch_bytes,
        )

        async def write(group: list[tuple[str, str]]) -> None:
            async with self._writes:
                parts = [(by_session[sid], progress[sid]) for sid in group]
                await write_sessions(self._statements, self._eventlog, parts, now)

        # Sessions are independent: each group (same replicas) is one request, and the
        # groups of a batch are written concurrently.
        written = await asyncio.gather(*(write(g) for g in groups), return_exceptions=True)
        _raise_first("events", written)
        EVENTS_WRITTEN.inc(len(decoded.events))
        snapshots = await asyncio.gather(
            *(self._snapshot(p, now) for p in progress.values()), return_exceptions=True
        )
        SNAPSHOTS_WRITTEN.inc(sum(_raise_first("snapshots", snapshots)))
        # Dead letters after the Cassandra writes, so a Cassandra retry does not repeat them.
        try:
            await self._dead_letter(decoded.rejected)
        except KafkaError as exc:
            raise BatchFailedError("dlq", exc) from exc
        for tp, rs in batch.items():
            if rs:
                self._written[tp] = rs[-1].offset + 1
        if decoded.events:
            observe_checkpoint(min(e.occurred_at for e in decoded.events))

    async def commit_due(self, *, idle: bool = False) -> None:
        """Commit what is written once the commit interval has passed, or at once when ``idle``."""
        interval_s = self._settings.commit_interval_ms / 1000
        if self._written and (idle or time.monotonic() - self._last_commit >= interval_s):
            await self.commit()

    async def commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit the written offsets (of ``only``, if given) of partitions still assigned.

        A failed commit is logged, not raised: what it covered is written, and whoever owns
        the partition next re-reads from the last commit and rewrites it idempotently.
        """
        assigned = self._consumer.assignment()
        wanted = set(self._written) if only is None else set(only) & set(self._written)
        offsets = {tp: self._written[tp] for tp in wanted if tp in assigned}
        for tp in wanted:
            self._written.pop(tp, None)
        self._last_commit = time.monotonic()
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            BATCH_FAILURES.labels("commit").inc()
            log.warning("committing checkpoint offsets failed (%s); they will be re-read", exc)
            for tp, offset in offsets.items():
                if tp in self._consumer.assignment():
                    self._written.setdefault(tp, offset)

    async def _snapshot(self, p: SessionProgress, now: dt.datetime) -> int:
        points = snapshot_points(p.first_seq, p.last_seq, self._settings.snapshot_every)
        try:
            return await write_snapshots(
                self._statements, self._eventlog, self._codec, p.tenant_id, p.session_id, points, now
            )
        except SnapshotGapError as exc:
            # Retrying cannot fill a gap in the log; the next snapshot point folds past it.
            SNAPSHOTS_SKIPPED.inc()
            log.error("snapshot skipped: %s", exc)
            return 0

    async def _dead_letter(self, rejected: Sequence[Rejected]) -> None:
        sends = []
        dlq = self._settings.topic("dlq")
        for r in rejected:
            rec = r.record
            log.warning("dead-lettering %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, r.reason_code)
            out = dead_letter_record(
                self._codec,
                service=SERVICE,
                dlq_topic=dlq,
                record=rec,
                reason_code=r.reason_code,
                reason=r.reason,
                error_type=r.error_type,
            )
            sends.append(await self._producer.send(out.topic, out.value, key=out.key))
        if sends:
            await asyncio.gather(*sends)

    def rewind(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Seek every still-assigned partition of ``batch`` back to its first record."""
        assigned = self._consumer.assignment()
        for tp, rs in batch.items():
            if rs and tp in assigned:
                self._consumer.seek(tp, rs[0].offset)

    async def update_lag(self) -> None:
        """Set the lag gauge of every assigned partition whose end offset is known."""
        for tp in self._consumer.assignment():
            end = self._consumer.last_stable_offset(tp)
            if end is None or end < 0:  # read_committed reads up to the LSO; older brokers lack it
                end = self._consumer.highwater(tp)
            if end is None:
                continue  # nothing fetched yet
            try:
                async with asyncio.timeout(1.0):
                    position = await self._consumer.position(tp)
            except (TimeoutError, IllegalStateError):
                continue  # being reset or revoked right now; next loop
            LAG.labels(str(tp.partition)).set(max(0, end - position))


def _raise_first(stage: str, results: Sequence[T | BaseException]) -> list[T]:
    """The results of a ``gather(..., return_exceptions=True)``, or its first failure as a batch failure."""
    out: list[T] = []
    for result in results:
        if isinstance(result, Exception):
            raise BatchFailedError(stage, result) from result
        if isinstance(result, BaseException):
            raise result  # cancellation: not a failure of the batch
        out.append(result)
    return out


def _in_record(r: ConsumerRecord) -> InRecord:
    return InRecord(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()))


async def run_checkpoint(settings: CheckpointSettings, stop: asyncio.Event, probes: Probes) -> None:
    """Consume ``events`` and checkpoint them until ``stop`` is set; then commit and leave the group."""
    codec = default_codec()
    cluster, session = await connect_when_reachable(settings, stop)
    statements = Statements(session, settings.cassandra_keyspace)
    cid = client_id(settings)
    consumer = make_consumer(settings, group_id=settings.group_id, client_id=cid)
    producer = make_producer(settings, client_id=f"{cid}-dlq")
    membership = _Membership()
    consumer.subscribe([settings.topic("events")], listener=membership)

    async def kafka_ready() -> bool:
        return membership.joined or bool(consumer.assignment())

    async def cassandra_ready() -> bool:
        return bool(await statements.run("SELECT now() FROM system.local"))

    probes.add("kafka", kafka_ready)
    probes.add("cassandra", cassandra_ready)
    lag_monitor = LagMonitor.of(consumer, settings)
    try:
        await start_when_reachable(producer, stop, what="checkpoint dead-letter producer")
        await start_when_reachable(consumer, stop, what="checkpoint consumer")
        lag_monitor.start()
        probes.started = True
        checkpointer = Checkpointer(settings, consumer, producer, statements, codec)
        membership.checkpointer = checkpointer
        try:
            await _loop(settings, consumer, checkpointer, stop)
        finally:
            with contextlib.suppress(Exception):
                await checkpointer.commit()
    finally:
        probes.started = False
        await lag_monitor.stop()
        for tp in consumer.assignment():
            with contextlib.suppress(KeyError):
                LAG.remove(str(tp.partition))
        with contextlib.suppress(Exception):
            await consumer.stop()  # leaves the group: its partitions move at once
        with contextlib.suppress(Exception):
            await producer.stop()
        await asyncio.to_thread(cluster.shutdown)


async def _loop(
    settings: CheckpointSettings, consumer: AIOKafkaConsumer, checkpointer: Checkpointer, stop: asyncio.Event
) -> None:
    backoff = BACKOFF_START_S
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        batch = await poll(
            consumer, timeout_ms=settings.batch_linger_ms, max_records=settings.batch_max_events
        )
        batch = {tp: rs for tp, rs in batch.items() if rs}
        # getmany returns as soon as anything is there: under light load that is a batch of one
        # reasoning transaction. Keep gathering for the linger, so a batch is worth its writes
        # (Cassandra batch, index rows, offset commit).
        size, until = _size(batch), loop.time() + settings.batch_linger_ms / 1000
        while batch and size < settings.batch_max_events and (left := until - loop.time()) > 0:
            more = await poll(
                consumer, timeout_ms=int(left * 1000) + 1, max_records=settings.batch_max_events - size
            )
            for tp, rs in more.items():
                if rs:
                    batch.setdefault(tp, []).extend(rs)
                    size += len(rs)
        if batch:
            started = time.perf_counter()
            try:
                await checkpointer.checkpoint(batch)
            except BatchFailedError as exc:
                BATCH_FAILURES.labels(exc.stage).inc()
                log.warning("batch of %d records failed (%s); retrying in %.1fs", _size(batch), exc, backoff)
                checkpointer.rewind(batch)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            backoff = BACKOFF_START_S
            BATCH_SECONDS.observe(time.perf_counter() - started)
        await checkpointer.commit_due(idle=not batch)
        await checkpointer.update_lag()


def _size(batch: dict[TopicPartition, list[ConsumerRecord]]) -> int:
    return sum(len(rs) for rs in batch.values())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.checkpoint``; ``--help`` lists every setting."""
    import sys

    from shared.service import configure_logging, run_service

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write("agentbus checkpoint: agentbus.events -> Cassandra. Settings (environment):\n")
        sys.stdout.write(CheckpointSettings.describe() + "\n")
        return 0
    if args:
        sys.stderr.write(f"unknown arguments {args}; settings come from the environment (see --help)\n")
        return 2
    settings = CheckpointSettings.from_env()
    configure_logging(settings)
    return asyncio.run(run_service(settings, lambda stop, probes: run_checkpoint(settings, stop, probes)))
