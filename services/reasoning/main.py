"""The reasoning service: the brains, the only sequencer of a session.

Records of ``agentbus.reasoning.inbox`` arrive per partition. Inside a partition,
records of one session run one at a time, in order; different sessions run
concurrently, so a replica serves other sessions while one waits on Triton, and
no session ever waits on a tool (tool results come back as inbox records).

Each processed record is published in ONE Kafka transaction of its input
partition's producer: the SessionEvents (to the same partition number of
``agentbus.events``), the ToolCalls and the AgentResponses. The group offset, the
partition's watermark (the oldest unfinished record), rides one transaction per
``AGENTBUS_REASONING_OFFSET_COMMIT_S`` (see :class:`shared.kafka.GroupCommitter`),
so a crash redelivers every unfinished record and the finished ones of the last
interval; duplicates are recognised from the session's state (a turn already seen,
a tool result no longer pending).

Where a session's state comes from (DESIGN.md "Sources of truth"): Redis hot
context when it holds the session's head ``seq``, else a rebuild from Cassandra
(latest snapshot + later events), waiting with bounded backoff until the
checkpoint has caught up to the head. The head is known because reasoning writes
each session's events to the events partition with the same number as its inbox
partition: on assignment the new owner reads that events partition from the
checkpoint group's committed offset to its end. That scan, plus each commit made
since, is the only in-memory state that matters, and it is rebuilt from Kafka on
assignment; the states this replica committed are also cached in memory
(:mod:`services.reasoning.cache`), used only at the session's head seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import ConsumerRecord
from opentelemetry.trace import Span, SpanKind
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from services.reasoning.cache import ContextCache
from services.reasoning.settings import ReasoningSettings
from services.reasoning.turns import ModelUnavailableError, Outputs, TurnEngine, tool_specs_from
from services.tool_exec.registry import ToolRegistry
from shared.avro import AvroCodec, CodecError, default_codec
from shared.cassandra import Statements, connect_when_reachable
from shared.context import SessionState, fold
from shared.eventlog import EventLog
from shared.kafka import (
    GroupCommitter,
    OffsetWatermark,
    OutRecord,
    PartitionNotOwnedError,
    PartitionTransactions,
    TransactionAbortedError,
    make_consumer,
    poll,
    start_when_reachable,
)
from shared.metrics import LagMonitor, busy_from_gauge
from shared.ratelimit import TokenBucket
from shared.redis import HotContextStore, WriteBehind, make_redis
from shared.service import (
    STORE_UNAVAILABLE,
    Probes,
    client_id,
    configure_logging,
    dead_letter_record,
    run_service,
    session_key,
)
from shared.telemetry import child_span, consume_span, mark_error, record_attributes, trace_headers
from shared.triton import ModelCallError, TritonModel, make_triton_client

log = logging.getLogger("agentbus.reasoning")

INBOX_RECORDS = ("TurnRequested", "ToolResult", "CancelRequested")

RECORDS = Counter("agentbus_reasoning_records_total", "Inbox records handled", ["outcome"])
STEPS = Counter("agentbus_reasoning_model_steps_total", "Model decisions taken")
MODEL_LATENCY = Histogram(
    "agentbus_model_call_seconds",
    "Latency of one model call",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ORCHESTRATION = Histogram(
    "agentbus_reasoning_step_overhead_seconds",
    "Time to handle one inbox record, excluding the model call",
    buckets=(
        0.0005,
        0.001,
        0.0015,
        0.002,
        0.003,
        0.004,
        0.005,
        0.0075,
        0.01,
        0.015,
        0.02,
        0.03,
        0.05,
        0.1,
        0.25,
        1,
    ),
)
SESSIONS_IN_FLIGHT = Gauge("agentbus_reasoning_sessions_in_flight", "Sessions with records being handled")
BUFFERED = Gauge("agentbus_reasoning_buffered_records", "Fetched records not yet committed")
MODEL_INFLIGHT = Gauge("agentbus_reasoning_model_calls_in_flight", "Model calls in flight")
BUCKET_WAIT = Counter(
    "agentbus_model_bucket_wait_seconds_total", "Time spent waiting for the model token bucket"
)
PAUSED = Gauge("agentbus_reasoning_paused", "1 while the consumer is paused for backpressure")
OWNED = Gauge(
    "agentbus_reasoning_partition_owned", "1 for each inbox partition this replica owns", ["partition"]
)
REBUILDS = Counter("agentbus_reasoning_context_loads_total", "Session context loads", ["source"])


def _why(exc: Exception) -> str:
    return "producer fenced" if isinstance(exc, ProducerFenced) else "outcome unknown"


class RebuildPendingError(RuntimeError):
    """Cassandra has not caught up with the session's head yet; retry later."""


class RedisDecisionCache:
    """``decision:{tenant/session}:{seq}`` -> the model's raw output, kept a day.

    Puts go through the write-behind pipeline: a decision matters only if its step is
    retried, and the retry reads it back long after the pipeline has sent it.
    """

    def __init__(self, client: Any, writer: WriteBehind) -> None:
        self._client = client
        self._writer = writer

    @staticmethod
    def _key(tenant_id: str, session_id: str, seq: int) -> str:
        return f"decision:{{{tenant_id}/{session_id}}}:{seq}"

    async def get(self, tenant_id: str, session_id: str, seq: int) -> str | None:
        try:
            with child_span("redis", attributes={"db.system": "redis", "db.operation": "GET decision"}):
                value = await self._client.get(self._key(tenant_id, session_id, seq))
        except Exception:  # noqa: BLE001 - a cache miss is always safe
            return None
        return value.decode() if isinstance(value, bytes) else value

    async def put(self, tenant_id: str, session_id: str, seq: int, output: str) -> None:
        key = self._key(tenant_id, session_id, seq)
        value = output.encode()

        async def write(pipe: Any) -> None:
            await pipe.set(key, value, ex=86400)

        self._writer.submit(key, write)


@dataclass
class Deps:
    settings: ReasoningSettings
    codec: AvroCodec
    txns: PartitionTransactions
    engine: TurnEngine
    hot: HotContextStore
    eventlog: EventLog
    statements: Statements
    service: str
    cache: ContextCache


class PartitionWorker:
    """The sessions of one inbox partition: per-session order, cross-session concurrency."""

    def __init__(self, deps: Deps, tp: TopicPartition) -> None:
        self.deps = deps
        self.tp = tp
        self.heads: dict[tuple[str, str], int] = {}
        self.offsets = OffsetWatermark()
        self.committer = GroupCommitter(
            deps.txns,
            tp,
            self.offsets,
            max_batch=deps.settings.commit_batch,
            offset_interval_s=deps.settings.offset_commit_interval_s,
        )
        self.events_topic, self.calls_topic = deps.settings.topic("events"), deps.settings.topic("tool.calls")
        self.queues: dict[bytes, deque[ConsumerRecord]] = {}
        self.tasks: dict[bytes, asyncio.Task[None]] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        # Re-learning heads after a transaction of unknown outcome (see _resync).
        self._sync_lock = asyncio.Lock()
        self._failures = 0  # ambiguous commit failures seen
        self._scanned_through = 0  # failures covered by the last scan
        self._last_scan: dict[tuple[str, str], int] = {}
        # Inbox offsets from here on were never delivered to an earlier owner (set when the
        # partition is prepared): their first attempt cannot find a decision already paid for.
        self.first_delivery_from: int | None = None
        self._closing: asyncio.Future[None] | None = None
        OWNED.labels(str(tp.partition)).set(1)

    @property
    def buffered(self) -> int:
        return len(self.offsets)

    def submit(self, record: ConsumerRecord) -> None:
        if self.closed:
            return
        self.offsets.add(record.offset)
        key = record.key or b""
        self.queues.setdefault(key, deque()).append(record)
        if key not in self.tasks:
            self.tasks[key] = asyncio.create_task(self._run_session(key))
            SESSIONS_IN_FLIGHT.inc()

    async def close(self) -> None:
        """Stop the partition's work and settle its offsets; safe to call more than once and
        from two tasks at once (the rebalance listener and a failed preparation can both)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self.closed = True
        with contextlib.suppress(KeyError):
            OWNED.remove(str(self.tp.partition))
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.committer.settle()  # the next owner redelivers less
        await self.committer.close()

    async def drain(self) -> None:
        """Wait for every queued record to finish (graceful stop)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks.values()), return_exceptions=True)

    async def _run_session(self, key: bytes) -> None:
        try:
            await asyncio.shield(self.ready)
            queue = self.queues[key]
            while queue:
                record = queue[0]
                await self._process(record)
                queue.popleft()
        except (ProducerFenced, PartitionNotOwnedError):
            log.warning("%s: partition lost while processing; its records go to the new owner", self.tp)
        finally:
            self.queues.pop(key, None)
            self.tasks.pop(key, None)
            SESSIONS_IN_FLIGHT.dec()

    async def _process(self, record: ConsumerRecord) -> None:
        attempts = 0
        backoff = 0.1
        fresh = self.first_delivery_from is not None and record.offset >= self.first_delivery_from
        tries = 0
        while True:
            tries += 1
            try:
                # A session ingress says it created is taken as new only on the first try of a
                # record never delivered before: a retry may follow a commit that did happen.
                await self._process_once(record, first_attempt=fresh, created_ok=fresh and tries == 1)
                return
            except PartitionNotOwnedError:
                raise
            except (ProducerFenced, TransactionAbortedError) as exc:
                # The commit's outcome is unknown (it may have been published after all), or its
                # producer was fenced. Fenced usually means a new owner has the partition; but the
                # fence can come from a replica racing a rebalance while this consumer keeps the
                # partition, with its position past this record: dropping it would lose it.
                # Either way, learn the session's head again from the events partition and try
                # again: _resync starts the partition's producer again only after proving this
                # consumer is a current member owning it (PartitionNotOwnedError otherwise).
                self._failures += 1
                log.warning("%s@%d: %s (%s); re-reading heads", self.tp, record.offset, _why(exc), exc)
                RECORDS.labels("retried").inc()
                await self._resync(record.key or b"", self._failures)
            except TRANSIENT as exc:
                # Transient: nothing was published; try the same record again.
                log.warning(
                    "%s@%d: transient failure (%s: %s); retrying",
                    self.tp,
                    record.offset,
                    type(exc).__name__,
                    exc,
                )
                RECORDS.labels("retried").inc()
            except Exception as exc:
                attempts += 1
                log.exception("%s@%d: handler failed (attempt %d)", self.tp, record.offset, attempts)
                if attempts >= 3 or _is_cassandra_permanent(exc):
                    await self._dead_letter(
                        record, "handler_error", f"{type(exc).__name__}: {exc}", type(exc).__name__
                    )
                    return
            fresh = False
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    async def _resync(self, key: bytes, ticket: int) -> None:
        """After a transaction of unknown outcome: the session's head as a new owner learns it.

        The partition's producer is started again first (after a membership check), which
        settles the old transaction (committed or aborted); then one scan of the events
        partition from the checkpoint's offset serves every failure registered before it
        began. A session found there gets that head; one not found has all its events in
        Cassandra, so its head comes from the session index on the next load.

        Raises:
            PartitionNotOwnedError: the partition is no longer ours.
        """
        deps = self.deps
        async with self._sync_lock:
            if self._scanned_through < ticket:
                covered = self._failures
                await deps.txns.producer(self.tp)
                scanned = await scan_heads(deps.settings, [self.tp.partition], deps.codec)
                self._last_scan = scanned.get(self.tp.partition, {})
                self._scanned_through = covered
        tenant, _, session = key.decode(errors="replace").partition("/")
        head = self._last_scan.get((tenant, session))
        if head is None:
            self.heads.pop((tenant, session), None)
        else:
            self.heads[(tenant, session)] = head

    async def _dead_letter(
        self, record: ConsumerRecord, code: str, reason: str, error_type: str | None
    ) -> None:
        deps = self.deps
        records = [
            dead_letter_record(
                deps.codec,
                service=deps.service,
                dlq_topic=deps.settings.topic("dlq"),
                record=record,
                reason_code=code,
                reason=reason,
                error_type=error_type,
            )
        ]
        await self.committer.finish(record.offset, records)
        RECORDS.labels(f"dlq_{code}").inc()

    async def _process_once(
        self, record: ConsumerRecord, *, first_attempt: bool = False, created_ok: bool = False
    ) -> None:
        with consume_span("reasoning.handle", record.headers, attributes=record_attributes(record)) as span:
            try:
                await self._handle(record, span, first_attempt=first_attempt, created_ok=created_ok)
            except Exception as exc:
                mark_error(span, exc)
                raise

    async def _handle(
        self, record: ConsumerRecord, span: Span, *, first_attempt: bool = False, created_ok: bool = False
    ) -> None:
        deps = self.deps
        started = time.perf_counter()
        try:
            decoded = deps.codec.decode(record.value, expected=INBOX_RECORDS)
        except CodecError as exc:
            await self._dead_letter(record, exc.reason_code, str(exc), type(exc).__name__)
            return
        datum = decoded.datum
        tenant, session = datum["tenant_id"], datum["session_id"]
        span.set_attribute("agentbus.record", decoded.name)
        span.set_attribute("agentbus.session", f"{tenant}/{session}")
        span.set_attribute("agentbus.turn", datum.get("turn_id") or "")
        if record.key != session_key(tenant, session):
            await self._dead_letter(
                record, "key_mismatch", "record key does not name the record's session", None
            )
            return
        # The partition's transaction opens (AddPartitionsToTxn) while the model runs.
        key = record.key
        targets = ((self.events_topic, key, self.tp.partition), (self.calls_topic, key, None))
        with deps.txns.working(self.tp, targets):
            created = created_ok and bool(datum.get("session_created"))
            state = await self.load_state(tenant, session, created=created)
            t_model = time.perf_counter()
            outputs = await deps.engine.handle(state, decoded.name, datum, first_attempt=first_attempt)
            model_time = time.perf_counter() - t_model if outputs.model_calls else 0.0
        out_records = self._records(record, tenant, session, outputs)
        # The wait for the partition's transaction (shared with other records finishing now).
        with child_span(
            "kafka.publish",
            kind=SpanKind.PRODUCER,
            attributes={"messaging.batch.message_count": len(out_records)},
        ):
            await self.committer.finish(record.offset, out_records)
        if outputs.events:
            # Committed: the state at this seq is final. Cached here and, without holding up
            # this session's next record, written to Redis (compare-and-set on seq).
            self.heads[(tenant, session)] = state.seq
            data = state.to_json()
            deps.cache.put((tenant, session), state.seq, data)
            deps.hot.put_later(tenant, session, state.seq, data)
        STEPS.inc(outputs.model_calls)
        RECORDS.labels(outputs.dropped or "handled").inc()
        log.debug(
            "%s@%d %s -> %s", self.tp, record.offset, decoded.name, outputs.dropped or len(outputs.events)
        )
        ORCHESTRATION.observe(max(0.0, time.perf_counter() - started - model_time))

    def _records(
        self, record: ConsumerRecord, tenant: str, session: str, outputs: Outputs
    ) -> list[OutRecord]:
        s = self.deps.settings
        key = session_key(tenant, session)
        headers = trace_headers()  # this record's span: the turn's trace continues through it
        out = [
            OutRecord(s.topic("events"), e, key=key, headers=headers, partition=self.tp.partition)
            for e in outputs.events
        ]
        out += [OutRecord(s.topic("tool.calls"), c, key=key, headers=headers) for c in outputs.tool_calls]
        out += [OutRecord(s.topic("responses"), r, key=key, headers=headers) for r in outputs.responses]
        return out

    async def load_state(self, tenant: str, session: str, *, created: bool = False) -> SessionState:
        """The session's state at its head: this replica's own commit (memory), the hot context
        (Redis) if current, else rebuilt from Cassandra.

        ``created``: the record is a TurnRequested whose ``session_created`` ingress set (its
        claim of the session id applied), delivered for the first time and tried for the first
        time here: with no head known, the session is new without asking Cassandra.
        """
        deps = self.deps
        head = self.heads.get((tenant, session))
        if head is None and created:
            REBUILDS.labels("created").inc()
            return SessionState(tenant, session)
        if head is None:
            rows = await deps.statements.run(
                "SELECT last_seq FROM {ks}.sessions WHERE tenant_id = ? AND session_id = ?", (tenant, session)
            )
            head = int(rows[0]["last_seq"]) if rows and rows[0]["last_seq"] is not None else -1
            self.heads[(tenant, session)] = head
        if head < 0:
            REBUILDS.labels("new").inc()
            return SessionState(tenant, session)
        cached = deps.cache.get((tenant, session), head)
        if cached is not None:
            REBUILDS.labels("memory").inc()
            return SessionState.from_json(cached)
        try:
            hot = await deps.hot.get(tenant, session)
        except Exception:  # noqa: BLE001 - Redis down or wiped: rebuild
            hot = None
        if hot is not None and hot.seq == head:
            REBUILDS.labels("hot").inc()
            return SessionState.from_json(hot.data)
        return await self._rebuild(tenant, session, head)

    async def _rebuild(self, tenant: str, session: str, head: int) -> SessionState:
        deps = self.deps
        deadline = time.monotonic() + deps.settings.rebuild_wait_s
        delay = 0.05
        while True:
            state = await rebuild_from_cassandra(deps, tenant, session)
            if state.seq >= head:
                REBUILDS.labels("cold").inc()
                return state
            if time.monotonic() > deadline:
                raise RebuildPendingError(f"{tenant}/{session}: Cassandra at seq {state.seq}, head is {head}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def rebuild_from_cassandra(deps: Deps, tenant: str, session: str) -> SessionState:
    """Latest snapshot + every later event, folded."""
    rows = await deps.statements.run(
        "SELECT seq, state FROM {ks}.session_snapshots WHERE tenant_id = ? AND session_id = ? LIMIT 1",
        (tenant, session),
    )
    start = SessionState.from_json(rows[0]["state"]) if rows else None
    from_seq = start.seq + 1 if start is not None else 0
    stored = await deps.eventlog.read(tenant, session, from_seq=from_seq)
    events = [deps.codec.decode(e.record, expected="SessionEvent").datum for e in stored]
    return fold(tenant, session, events, start)


def _is_cassandra_permanent(exc: Exception) -> bool:
    return type(exc).__name__ in {"InvalidRequest", "SyntaxException", "Unauthorized"}


# Failures of a dependency, not of the record: retried for as long as they last, never
# dead-lettered (a Cassandra or Redis restart must not cost a turn).
TRANSIENT: tuple[type[BaseException], ...] = (
    ModelUnavailableError,
    RebuildPendingError,
    TransactionAbortedError,
    KafkaError,
    TimeoutError,
    ConnectionError,
    RedisError,
    *STORE_UNAVAILABLE,
)


class Reasoner(ConsumerRebalanceListener):  # type: ignore[misc]
    """Rebalance listener: opens producers (fencing), scans heads, and owns the partition workers."""

    def __init__(self, deps: Deps, consumer: AIOKafkaConsumer) -> None:
        self.deps = deps
        self.consumer = consumer
        self.workers: dict[TopicPartition, PartitionWorker] = {}
        self._background: set[asyncio.Task[None]] = set()

    def worker(self, tp: TopicPartition) -> PartitionWorker | None:
        """The worker of an owned partition (started on first use), or None if it is not ours.

        A fetch can return records of a partition the group has just taken away; they
        belong to the new owner now, so they are dropped here, not buffered.
        """
        if tp not in self.consumer.assignment():
            return None
        worker = self.workers.get(tp)
        if worker is None or worker.closed:
            worker = PartitionWorker(self.deps, tp)
            self.workers[tp] = worker
            task = asyncio.create_task(self._prepare([worker]))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return worker

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        fresh = []
        for tp in assigned:
            current = self.workers.get(tp)
            if current is None or current.closed:
                worker = PartitionWorker(self.deps, tp)
                self.workers[tp] = worker
                fresh.append(worker)
        if fresh:
            await self._prepare(fresh)

    async def _prepare(self, workers: Sequence[PartitionWorker]) -> None:
        delay = 0.2
        while True:
            live = [w for w in workers if not w.closed]
            if not live:
                return
            try:
                # Starting the producers fences the previous owners and settles their transactions;
                # only then is the events partition's end final enough to scan.
                await asyncio.gather(*(self.deps.txns.producer(w.tp) for w in live))
                heads = await scan_heads(self.deps.settings, [w.tp.partition for w in live], self.deps.codec)
                # The previous owners are fenced: every record one of them could have taken is
                # below the inbox's current end.
                ends = await self.consumer.end_offsets([w.tp for w in live])
            except PartitionNotOwnedError:
                # Revoked meanwhile: forget these workers so a later assignment starts afresh.
                for w in live:
                    if self.workers.get(w.tp) is w:
                        del self.workers[w.tp]
                    await w.close()
                return
            except Exception:
                log.exception("preparing partitions %s failed; retrying", [w.tp.partition for w in live])
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            for w in live:
                w.heads.update(heads.get(w.tp.partition, {}))
                w.first_delivery_from = ends.get(w.tp)
                if not w.ready.done():
                    w.ready.set_result(None)
            return

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        workers = [self.workers.pop(tp) for tp in revoked if tp in self.workers]
        await asyncio.gather(*(w.close() for w in workers))
        await self.deps.txns.on_partitions_revoked(revoked)

    @property
    def buffered(self) -> int:
        return sum(w.buffered for w in self.workers.values())


async def scan_heads(
    settings: ReasoningSettings, partitions: Sequence[int], codec: AvroCodec
) -> dict[int, dict[tuple[str, str], int]]:
    """Each session's last seq in the given events partitions past the checkpoint's committed offset."""
    events = settings.topic("events")
    tps = [TopicPartition(events, p) for p in partitions]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(settings.checkpoint_group, partitions=tps)
    finally:
        await admin.close()
    reader = make_consumer(settings, group_id=None, client_id=f"{settings.service_name}-scan")
    await reader.start()
    heads: dict[int, dict[tuple[str, str], int]] = {p: {} for p in partitions}
    try:
        reader.assign(tps)
        ends = await reader.end_offsets(tps)
        remaining = set()
        for tp in tps:
            meta = committed.get(tp)
            start = meta.offset if meta is not None and meta.offset >= 0 else 0
            if start < ends[tp]:
                reader.seek(tp, start)
                remaining.add(tp)
        while remaining:
            batches = await reader.getmany(*remaining, timeout_ms=500)
            for tp, records in batches.items():
                for r in records:
                    try:
                        datum = codec.decode(r.value, expected="SessionEvent").datum
                    except CodecError:
                        continue
                    key = (datum["tenant_id"], datum["session_id"])
                    bucket = heads[tp.partition]
                    bucket[key] = max(bucket.get(key, -1), int(datum["seq"]))
            for tp in list(remaining):
                if await reader.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await reader.stop()
    return heads


async def run_reasoning(settings: ReasoningSettings, stop: asyncio.Event, probes: Probes) -> None:
    codec = default_codec()
    redis = make_redis(settings)
    cluster, session = await connect_when_reachable(settings, stop)
    statements = Statements(session, settings.cassandra_keyspace)
    triton = make_triton_client(settings)
    model = TritonModel(triton, settings)
    bucket = TokenBucket(
        redis,
        "model",
        rate=settings.model_rate_per_s,
        burst=settings.model_burst,
        lease=settings.model_bucket_lease,
        lease_s=settings.model_bucket_lease_ms / 1000,
    )
    model_slots = asyncio.Semaphore(settings.max_inflight_model_calls)

    async def call_model(prompt: str) -> str:
        async with model_slots:
            MODEL_INFLIGHT.inc()
            try:
                for attempt in range(settings.model_attempts):
                    if not bucket.take_leased():  # a token at hand needs no span
                        with child_span("model.bucket", kind=SpanKind.INTERNAL):
                            BUCKET_WAIT.inc(await bucket.take(max_wait_s=settings.turn_deadline_s))
                    t0 = time.perf_counter()
                    try:
                        return await model.generate(prompt)
                    except ModelCallError as exc:
                        if not exc.transient or attempt + 1 == settings.model_attempts:
                            raise
                        await asyncio.sleep(0.2 * 2**attempt)
                    finally:
                        MODEL_LATENCY.observe(time.perf_counter() - t0)
                raise AssertionError("unreachable")
            finally:
                MODEL_INFLIGHT.dec()

    tools = tool_specs_from(ToolRegistry.from_entry_points().specs())
    writer = WriteBehind(redis)
    engine = TurnEngine(
        settings, codec, call_model, RedisDecisionCache(redis, writer), tools, settings.triton_model
    )
    cid = client_id(settings)
    consumer = make_consumer(settings, group_id=settings.group_id, client_id=cid)
    txns = PartitionTransactions(settings, group_id=settings.group_id, client_id=cid, consumer=consumer)
    deps = Deps(
        settings,
        codec,
        txns,
        engine,
        HotContextStore(redis, ttl_s=settings.hot_context_ttl_s, writer=writer),
        EventLog(statements),
        statements,
        settings.service_name,
        ContextCache(settings.context_cache_mb * 1024 * 1024),
    )
    reasoner = Reasoner(deps, consumer)

    async def kafka_ready() -> bool:
        return bool(await consumer.topics())

    async def redis_ready() -> bool:
        return bool(await redis.ping())

    async def cassandra_ready() -> bool:
        await statements.run("SELECT release_version FROM system.local")
        return True

    probes.add("kafka", kafka_ready)
    probes.add("redis", redis_ready)
    probes.add("cassandra", cassandra_ready)
    probes.add("triton", model.ready)

    inbox = settings.topic("reasoning.inbox")
    consumer.subscribe([inbox], listener=reasoner)
    await start_when_reachable(consumer, stop, what="reasoning consumer")
    await _check_partitioning(consumer, settings)
    in_flight = busy_from_gauge("agentbus_reasoning_model_calls_in_flight", settings.max_inflight_model_calls)
    lag_monitor = LagMonitor.of(consumer, settings, busy=in_flight)
    lag_monitor.start()
    probes.started = True
    paused = False
    high = settings.max_inflight_model_calls * 8
    try:
        while not stop.is_set():
            batches = await poll(consumer, timeout_ms=100, max_records=settings.kafka_max_poll_records)
            for tp, records in batches.items():
                worker = reasoner.worker(tp)
                if worker is None:
                    continue
                for record in records:
                    worker.submit(record)
            buffered = reasoner.buffered
            BUFFERED.set(buffered)
            # Backpressure: stop fetching while too much is buffered (Triton saturated or slow).
            if not paused and buffered > high:
                consumer.pause(*consumer.assignment())
                paused = True
                PAUSED.set(1)
            elif paused and buffered < high // 2:
                consumer.resume(*consumer.assignment())
                paused = False
                PAUSED.set(0)
        log.info("draining in-flight sessions")
        consumer.pause(*consumer.assignment())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(1.0, settings.shutdown_grace_s - 5)):
                await asyncio.gather(*(w.drain() for w in list(reasoner.workers.values())))
    finally:
        await lag_monitor.stop()
        await consumer.stop()  # revokes: workers closed, producers stopped; leaves the group
        await txns.stop()
        await model.close()  # ends the shared stream cleanly before the channel closes
        await triton.close()
        await writer.flush()
        await redis.aclose()
        cluster.shutdown()


async def _check_partitioning(consumer: AIOKafkaConsumer, settings: ReasoningSettings) -> None:
    """Events go to the inbox's partition number, so both topics need the same partition count."""
    inbox_topic, events_topic = settings.topic("reasoning.inbox"), settings.topic("events")
    await consumer._client.force_metadata_update()
    inbox = consumer._client.cluster.partitions_for_topic(inbox_topic)
    events = consumer._client.cluster.partitions_for_topic(events_topic)
    if inbox and events and len(inbox) != len(events):
        raise SystemExit(
            f"{events_topic} has {len(events)} partitions but {inbox_topic} has {len(inbox)}: "
            "reasoning needs them equal"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        sys.stdout.write("python -m services.reasoning\n\nSettings (environment):\n")
        sys.stdout.write(ReasoningSettings.describe() + "\n")
        return 0
    settings = ReasoningSettings.from_env()
    configure_logging(settings)
    return asyncio.run(run_service(settings, lambda stop, probes: run_reasoning(settings, stop, probes)))
