"""Kafka clients with every safety option set explicitly, and the transactional
consume -> produce -> commit helper that makes a service's output exactly-once.

aiokafka's defaults are unsafe for agentbus (acks=1, no idempotence, auto-commit,
read_uncommitted); nothing here relies on them.

Fencing (DESIGN.md, "Sequencing and single writer"): aiokafka commits transactional
offsets with ``TxnOffsetCommit`` v0, which does not check the consumer-group
generation. So :class:`PartitionTransactions` keeps **one transactional producer per
input partition**, its ``transactional_id`` derived from (group, topic, partition).
The next owner of a partition initialises the same id, which bumps the producer
epoch and fences the previous owner: its next send or commit fails with
``ProducerFenced`` and nothing it decides after losing the partition is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiokafka.producer.sender as _aiokafka_sender
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError, KafkaTimeoutError, ProducerFenced
from aiokafka.producer.transaction_manager import TransactionState
from prometheus_client import Counter as MetricCounter
from prometheus_client import Histogram

from shared.settings import KafkaSettings

log = logging.getLogger(__name__)

TRANSACTIONS = MetricCounter(
    "agentbus_kafka_transactions_total",
    "Transactions of PartitionTransactions, by how they were opened and how they ended",
    ["opened", "outcome"],  # early | at_commit; committed | committed_empty | aborted | failed
)
TRANSACTION_SECONDS = Histogram(
    "agentbus_kafka_transaction_seconds",
    "From a transaction's start (or take-over, when opened early) to its commit",
    buckets=(0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 4.096),
)

__all__ = [
    "GroupCommitter",
    "OffsetWatermark",
    "OutRecord",
    "PartitionNotOwnedError",
    "PartitionTransactions",
    "TopicPartition",
    "TransactionAbortedError",
    "header",
    "make_consumer",
    "make_producer",
    "producer_options",
    "transactional_id_for",
    "tune_transaction_retry",
]


def producer_options(settings: KafkaSettings, client_id: str) -> dict[str, object]:
    """Options of every agentbus producer: acknowledged by all in-sync replicas, idempotent."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": None if settings.kafka_compression == "none" else settings.kafka_compression,
        "linger_ms": settings.kafka_linger_ms,
        "max_batch_size": settings.kafka_max_batch_bytes,
        "max_request_size": settings.kafka_max_request_bytes,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "retry_backoff_ms": settings.kafka_retry_backoff_ms,
        "metadata_max_age_ms": 60000,
    }


def tune_transaction_retry(settings: KafkaSettings) -> None:
    """Shorten aiokafka's wait when a transaction starts before the previous one has settled.

    The broker answers EndTxn before it has written the commit markers, and refuses the
    next AddPartitionsToTxn of that producer (CONCURRENT_TRANSACTIONS) until they are
    written, a few milliseconds later. aiokafka (like the Java client) then waits a fixed
    20 ms, the module constant ``BACKOFF_OVERRIDE``, which made back-to-back transactions of
    one partition cost 25 ms where 6 ms suffice (measured on the local broker). The constant
    is process-wide; a renamed constant in a later aiokafka fails here, not silently.
    """
    if not hasattr(_aiokafka_sender, "BACKOFF_OVERRIDE"):
        raise RuntimeError("aiokafka.producer.sender.BACKOFF_OVERRIDE is gone; see tune_transaction_retry")
    _aiokafka_sender.BACKOFF_OVERRIDE = settings.kafka_txn_retry_backoff_ms / 1000


def make_producer(
    settings: KafkaSettings, *, client_id: str, transactional_id: str | None = None
) -> AIOKafkaProducer:
    """A producer (not started); with ``transactional_id``, start() fences older epochs of that id."""
    options = producer_options(settings, client_id)
    if transactional_id is not None:
        tune_transaction_retry(settings)
        options["transactional_id"] = transactional_id
        options["transaction_timeout_ms"] = settings.kafka_transaction_timeout_ms
    return AIOKafkaProducer(**options)


def make_consumer(
    settings: KafkaSettings,
    *,
    group_id: str | None,
    client_id: str,
    topics: Sequence[str] = (),
    auto_offset_reset: str = "earliest",
) -> AIOKafkaConsumer:
    """A consumer (not started): manual commits only, sees committed transactions only."""
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=client_id,
        group_id=group_id,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset=auto_offset_reset,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        max_poll_records=settings.kafka_max_poll_records,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        max_partition_fetch_bytes=settings.kafka_max_request_bytes,
        metadata_max_age_ms=60000,
        check_crcs=True,
    )


def header(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    """The value of a Kafka record's first header called ``name``, or None."""
    for key, value in headers or ():
        if key == name and value is not None:
            return value
    return None


def transactional_id_for(group_id: str, tp: TopicPartition) -> str:
    """The transactional id owned by whoever owns input partition ``tp`` in ``group_id``."""
    return f"{group_id}|{tp.topic}|{tp.partition}"


@dataclass(frozen=True)
class OutRecord:
    """One record to publish inside a transaction."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = field(default_factory=tuple)
    partition: int | None = None


Offsets = Mapping[TopicPartition, int] | Callable[[], Mapping[TopicPartition, int]]


class PartitionNotOwnedError(KeyError):
    """The input partition is not assigned to this consumer (revoked, or never ours)."""


class TransactionAbortedError(RuntimeError):
    """A transaction did not commit; nothing of it is visible to read_committed readers."""


class PartitionTransactions(ConsumerRebalanceListener):  # type: ignore[misc]
    """One transactional producer per assigned input partition; commits output and offsets atomically.

    Register it as the consumer's rebalance listener (``consumer.subscribe(topics,
    listener=txns)``) and pass that ``consumer``: it starts a producer for every
    partition assigned (fencing the previous owner) and stops the producers of revoked
    partitions.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        group_id: str,
        client_id: str,
        consumer: AIOKafkaConsumer | None = None,
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self._group_id = group_id
        self._client_id = client_id
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        # aiokafka shows a new assignment before the listener's coroutine finishes, so a
        # record can arrive while its partition's producer is still starting: commit waits.
        self._opening: dict[TopicPartition, asyncio.Future[None]] = {}
        self._locks: dict[TopicPartition, asyncio.Lock] = {}
        self._closed: dict[TopicPartition, asyncio.Future[None]] = {}
        self._assigned: set[TopicPartition] = set()  # by the listener (used without a consumer)
        self._deadline_s = settings.kafka_transaction_deadline_ms / 1000
        # Opening transactions early (see working()): the records of each input partition being
        # handled, the output partitions they will write, and the transactions opened early.
        self._handling: Counter[TopicPartition] = Counter()
        self._targets: dict[TopicPartition, Counter[TopicPartition]] = {}
        self._early: dict[TopicPartition, tuple[AIOKafkaProducer, asyncio.TimerHandle]] = {}
        self._early_check_s = min(1.0, settings.kafka_transaction_timeout_ms / 4000)

    @property
    def partitions(self) -> frozenset[TopicPartition]:
        """Partitions whose producer is started and ready to commit."""
        return frozenset(self._producers)

    async def producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        """The started transactional producer of ``tp``.

        Raises:
            PartitionNotOwnedError: ``tp`` is not (or no longer) assigned here.
            KafkaError: its producer failed to start (InitProducerId refused or timed out).
        """
        consumer = self._consumer
        owned = tp in consumer.assignment() if consumer is not None else tp in self._assigned
        if tp not in self._producers and tp not in self._opening and owned:
            # Assigned, but the listener has not run yet, or the producer was dropped after a
            # fencing or an ambiguous error. Starting a producer fences whoever holds the
            # transactional id, so first prove this consumer is still a member of the current
            # generation: a zombie (stopped past its session timeout) still lists its old
            # assignment and must not take the partition back from its new owner.
            if consumer is not None:
                await self._confirm_member(tp)
            await self._open(tp)
        opening = self._opening.get(tp)
        if opening is not None:
            await asyncio.shield(opening)
        try:
            return self._producers[tp]
        except KeyError:
            raise PartitionNotOwnedError(tp) from None

    async def _confirm_member(self, tp: TopicPartition) -> None:
        """An offset commit of ``tp``'s committed offset (no change), which the group coordinator
        refuses to a member of an old generation.

        Raises:
            PartitionNotOwnedError: the coordinator refused (this consumer is not a current
                member, or a rebalance is in progress), or ``tp`` is not assigned here.
        """
        consumer = self._consumer
        assert consumer is not None
        try:
            committed = await consumer.committed(tp)
            if committed is None:
                committed = (await consumer.beginning_offsets([tp]))[tp]
            await consumer.commit({tp: committed})
        except (KafkaError, IllegalStateError, AssertionError) as exc:
            log.warning("not (or no longer) a member owning %s (%s): its producer is not started", tp, exc)
            raise PartitionNotOwnedError(tp) from exc

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        # Called by aiokafka right after this member joined the new generation: no check needed.
        assigned = list(assigned)
        self._assigned.update(assigned)
        await asyncio.gather(*(self._open(tp) for tp in assigned))

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        self._assigned.difference_update(revoked)
        await asyncio.gather(*(self._close(tp) for tp in revoked))

    async def _open(self, tp: TopicPartition) -> None:
        if tp in self._producers or tp in self._opening:
            return
        opening: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._opening[tp] = opening
        producer = make_producer(
            self._settings,
            client_id=f"{self._client_id}-{tp.topic}-{tp.partition}",
            transactional_id=transactional_id_for(self._group_id, tp),
        )
        try:
            # InitProducerId: bumps the epoch, fencing the previous owner. Bounded: a start that
            # hangs would hold the rebalance listener, and with it the whole consumer.
            async with asyncio.timeout(self._deadline_s):
                await producer.start()
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                exc = KafkaTimeoutError(f"starting the producer of {tp} took over {self._deadline_s:.0f}s")
            await producer.stop()
            opening.set_exception(exc)
            opening.exception()  # retrieved here; waiters re-raise it
            raise
        else:
            self._producers[tp] = producer
            self._closed[tp] = asyncio.get_running_loop().create_future()
            self._locks[tp] = asyncio.Lock()  # per producer: an abandoned transaction keeps the old one
            opening.set_result(None)
        finally:
            self._opening.pop(tp, None)

    async def _close(self, tp: TopicPartition) -> None:
        producer = self._producers.pop(tp, None)
        early = self._early.pop(tp, None)
        if early is not None:
            early[1].cancel()
        closed = self._closed.pop(tp, None)
        if closed is not None and not closed.done():
            closed.set_result(None)  # a commit still waiting on this producer gives up now
        if producer is not None:
            await stop_quietly(producer)

    @contextlib.contextmanager
    def working(
        self, tp: TopicPartition, targets: Iterable[tuple[str, bytes | None, int | None]]
    ) -> Iterator[None]:
        """A record of ``tp`` being handled, whose outputs will go to ``targets``: (topic, key, partition).

        While a record is being handled, the next transaction of its partition is opened
        early: begun, and the output partitions added. AddPartitionsToTxn (and the coordinator's
        CONCURRENT_TRANSACTIONS answers while the previous transaction's markers are still
        being written) then happens during the model call instead of after it, and the
        record's commit is one Produce and one EndTxn. An early transaction whose records
        published nothing is committed empty within a second (see :meth:`_check_early`).
        Best effort: no producer, a transaction in flight or a producer in error opens
        nothing, and the commit begins its transaction as before.
        """
        producer = self._producers.get(tp)
        wanted = _output_partitions(producer, targets) if producer is not None else []
        targets_of = self._targets.setdefault(tp, Counter())
        targets_of.update(wanted)
        self._handling[tp] += 1
        self._open_early(tp)
        try:
            yield
        finally:
            self._handling[tp] -= 1
            targets_of.subtract(wanted)
            if self._handling[tp] <= 0:
                del self._handling[tp]
                self._targets.pop(tp, None)

    def _open_early(self, tp: TopicPartition) -> None:
        producer, lock = self._producers.get(tp), self._locks.get(tp)
        if producer is None or lock is None or lock.locked() or not self._handling[tp]:
            return
        txn = producer._txn_manager
        early = self._early.get(tp)
        if early is None or early[0] is not producer:
            if txn is None or txn.state is not TransactionState.READY or not txn.has_pid():
                return
            txn.begin_transaction()
            self._arm_early_check(tp, producer)
        elif not txn.is_in_transaction():
            return  # failed meanwhile: the commit reports it
        for out, n in self._targets.get(tp, Counter()).items():
            if n > 0:
                txn.maybe_add_partition_to_txn(out)

    def _arm_early_check(self, tp: TopicPartition, producer: AIOKafkaProducer) -> None:
        timer = asyncio.get_running_loop().call_later(self._early_check_s, self._check_early, tp, producer)
        self._early[tp] = (producer, timer)

    def _check_early(self, tp: TopicPartition, producer: AIOKafkaProducer) -> None:
        """An early transaction nobody committed: end it once no record of ``tp`` is being handled."""
        early = self._early.get(tp)
        if early is None or early[0] is not producer:
            return
        lock = self._locks.get(tp)
        if self._handling[tp] or lock is None or lock.locked():
            self._arm_early_check(tp, producer)
            return
        # An empty commit (nothing was published in it); errors go the way of any commit's.
        task = asyncio.create_task(self.commit(tp, [], None))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def commit(
        self,
        tp: TopicPartition,
        records: Sequence[OutRecord],
        next_offsets: Offsets | None,
    ) -> None:
        """Publish ``records`` and commit ``next_offsets`` for this group in one transaction.

        ``next_offsets`` None: the transaction publishes ``records`` only (the group's offsets
        stay as they are; see :class:`GroupCommitter`).

        The transaction has a deadline (``kafka_transaction_deadline_ms``) and gives up as soon
        as the partition's producer is closed (the partition was revoked meanwhile): aiokafka
        can wait forever on a transaction whose producer stopped or whose coordinator
        answers no more, and a caller must never hang on it.

        Raises:
            ProducerFenced: another replica owns ``tp`` now; drop the work, do not retry.
            TransactionAbortedError: the transaction was aborted or its outcome is unknown (its
                producer is replaced); the input will be redelivered or may be retried.
            PartitionNotOwnedError: ``tp`` is not (or no longer) assigned to this consumer.
        """
        producer = await self.producer(tp)
        closed = self._closed.get(tp)
        lock = self._locks.get(tp)
        if closed is None or lock is None or self._producers.get(tp) is not producer:
            raise PartitionNotOwnedError(tp)
        sends: list[asyncio.Future[object]] = []
        # The lock of this very producer (captured now: the task runs later, maybe after a
        # replacement, and must not take its successor's lock).
        body = asyncio.create_task(self._transaction(tp, producer, lock, records, next_offsets, sends))
        try:
            done, _ = await asyncio.wait(
                {body, closed}, timeout=self._deadline_s, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # the caller is cancelled: so is its transaction
            await _abandon(body)
            raise
        if body in done:
            try:
                body.result()
                return
            except ProducerFenced:
                _retrieve(sends)
                log.warning("producer for %s fenced: another replica owns the partition", tp)
                await self._close(tp)
                raise
            except KafkaError as exc:
                _retrieve(sends)
                # An ambiguous outcome (lost connection...): the producer's state is unknown, so it
                # is replaced rather than reused.
                await self._replace(tp, producer, f"aborted ({exc})")
                raise TransactionAbortedError(str(exc)) from exc
        await _abandon(body)
        _retrieve(sends)
        if closed.done():
            raise PartitionNotOwnedError(tp)
        await self._replace(tp, producer, f"still unfinished after {self._deadline_s:.0f}s")
        raise TransactionAbortedError(f"transaction on {tp} timed out")

    async def _replace(self, tp: TopicPartition, producer: AIOKafkaProducer, why: str) -> None:
        """Drop a producer whose last transaction has an unknown outcome (never reuse it).

        Its successor is started lazily by :meth:`producer`, after a membership check: a zombie
        whose commit failed must not fence the partition's real owner by starting a new producer.
        """
        log.warning("transaction on %s %s; its producer is replaced", tp, why)
        if self._producers.get(tp) is not producer:
            raise PartitionNotOwnedError(tp)  # closed or replaced meanwhile
        await self._close(tp)

    async def _transaction(
        self,
        tp: TopicPartition,
        producer: AIOKafkaProducer,
        lock: asyncio.Lock,
        records: Sequence[OutRecord],
        next_offsets: Offsets | None,
        sends: list[asyncio.Future[object]],
    ) -> None:
        async with lock:
            started = asyncio.get_running_loop().time()
            opened = "early" if await self._begin(tp, producer) else "at_commit"
            try:
                for r in records:
                    sent = await producer.send(
                        r.topic, r.value, key=r.key, headers=list(r.headers), partition=r.partition
                    )
                    sends.append(sent)
                # A callable is evaluated under the partition's lock, so concurrent sessions of one
                # partition commit a watermark that never moves backwards.
                if next_offsets is not None:
                    offsets = next_offsets() if callable(next_offsets) else next_offsets
                    await producer.send_offsets_to_transaction(dict(offsets), self._group_id)
                if sends:
                    await asyncio.gather(*sends)
            except BaseException:
                # As aiokafka's own transaction context: abort unless the producer is dead.
                if producer._txn_manager.is_fatal_error():
                    TRANSACTIONS.labels(opened, "failed").inc()
                else:
                    TRANSACTIONS.labels(opened, "aborted").inc()
                    await producer.abort_transaction()
                raise
            await producer.commit_transaction()
            TRANSACTIONS.labels(opened, "committed" if records or next_offsets else "committed_empty").inc()
            TRANSACTION_SECONDS.observe(asyncio.get_running_loop().time() - started)
        self._open_early(tp)  # records still being handled: their transaction opens now

    async def _begin(self, tp: TopicPartition, producer: AIOKafkaProducer) -> bool:
        """Begin the transaction, or take over the one opened early for ``producer`` (True)."""
        early = self._early.get(tp)
        if early is None or early[0] is not producer:
            await producer.begin_transaction()
            return False
        del self._early[tp]
        early[1].cancel()
        txn = producer._txn_manager
        if txn.is_in_transaction():
            return True
        # Its AddPartitionsToTxn failed: fenced (fatal), or an error that needs an abort first.
        waiter = txn.wait_for_transaction_end()
        error = waiter.exception() if waiter is not None and waiter.done() else None
        abortable = txn.state is TransactionState.ABORTABLE_ERROR
        TRANSACTIONS.labels("early", "aborted" if abortable else "failed").inc()
        if abortable:
            await producer.abort_transaction()
        raise error if isinstance(error, BaseException) else KafkaError(f"transaction in state {txn.state}")

    async def stop(self) -> None:
        await asyncio.gather(*(self._close(tp) for tp in list(self._producers)))


def _output_partitions(
    producer: AIOKafkaProducer, targets: Iterable[tuple[str, bytes | None, int | None]]
) -> list[TopicPartition]:
    """The partitions ``producer.send`` would pick for (topic, key, partition); unknown ones left out."""
    out = []
    for topic, key, partition in targets:
        if partition is None:
            try:
                partition = producer._partition(topic, None, None, None, key, None)
            except Exception:  # noqa: BLE001 - no metadata for the topic yet: its send adds it later
                continue
        out.append(TopicPartition(topic, partition))
    return out


async def _abandon(task: asyncio.Task[None]) -> None:
    """Cancel a transaction's task and wait a little for it to unwind.

    Cancelling interrupts its current await, but aiokafka's transaction context then aborts,
    and that abort can wait forever too (a stopped producer): it is cancelled again, a few
    times, and then left behind. It holds only its own producer's lock (each producer gets
    a fresh one), so nothing else waits on it.
    """
    for _ in range(3):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if done:
            with contextlib.suppress(BaseException):
                task.result()
            return
    log.warning("a cancelled transaction would not unwind; left behind")


def _retrieve(futures: Sequence[asyncio.Future[object]]) -> None:
    """Mark failed send futures as seen: the transaction's error already tells what happened."""
    for future in futures:
        if future.done():
            if not future.cancelled():
                future.exception()
        else:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())


class OffsetWatermark:
    """Offsets of one partition handed out but not finished, and the offset safe to commit.

    Records of a partition may finish out of order (sessions run concurrently); the
    group may only commit up to the oldest unfinished one, or a crash would lose it.
    """

    def __init__(self) -> None:
        self._inflight: set[int] = set()
        self._next: int | None = None

    def __len__(self) -> int:
        return len(self._inflight)

    def add(self, offset: int) -> None:
        self._inflight.add(offset)
        self._next = offset + 1 if self._next is None else max(self._next, offset + 1)

    def commit_point(self, finishing: int | Collection[int] | None = None) -> int:
        """The offset to commit once ``finishing`` (one offset or several) is done.

        That is the oldest other unfinished offset, or the next offset after everything added.
        """
        if finishing is None:
            skip: Collection[int] = ()
        elif isinstance(finishing, int):
            skip = (finishing,)
        else:
            skip = finishing
        low = min((o for o in self._inflight if o not in skip), default=self._next)
        if low is None:
            raise ValueError("no offset was ever added")
        return low

    def done(self, offset: int) -> None:
        self._inflight.discard(offset)


class GroupCommitter:
    """Group commit for one input partition: many finished records, one transaction.

    Records of a partition finish concurrently (different sessions, different tool calls).
    Each finished record's outputs must be published atomically with the partition's new
    watermark. Committing one transaction per record caps a partition at one record per
    transaction round trip (five requests to the broker) and makes a redelivered backlog
    crawl. Here a finished record joins a queue; one flusher per partition commits
    everything queued in one transaction, and while that transaction is in flight the
    next batch gathers. Alone, a record waits for exactly one transaction as before; under
    load a transaction carries up to ``max_batch`` records.

    The committed offset is the watermark with the whole batch finished, so a batch never
    commits past a record that is still running, and nothing is marked done unless its
    transaction committed. A failed transaction fails every record of its batch with the
    same exception :meth:`PartitionTransactions.commit` raises; nothing of it was published.

    With ``offset_interval_s`` > 0 the group's offset rides along only once per interval
    (and in a transaction of its own when the partition has gone quiet): the other
    transactions publish outputs only. That saves two of the transaction's four requests
    to the coordinators (AddOffsetsToTxn, TxnOffsetCommit) and the marker on
    ``__consumer_offsets``. It is sound only for a consumer that recognises a redelivered
    record from the state its outputs produced (reasoning does: a turn already seen, a
    tool result no longer pending): after a crash, up to one interval of finished records
    is redelivered and dropped as duplicates, as records finished past the watermark
    always were. A record with nothing to publish is then finished at once.
    """

    def __init__(
        self,
        txns: PartitionTransactions,
        tp: TopicPartition,
        watermark: OffsetWatermark,
        *,
        max_batch: int = 500,
        offset_interval_s: float = 0.0,
    ) -> None:
        self.txns = txns
        self.tp = tp
        self.watermark = watermark
        self.max_batch = max(1, max_batch)
        self.offset_interval_s = max(0.0, offset_interval_s)
        self._queue: list[tuple[int, Sequence[OutRecord], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._offsets_due = 0.0  # loop time from which the next transaction carries the offset
        self._committed = -1  # the highest offset committed through this committer
        self._settler: asyncio.TimerHandle | None = None
        self.transactions = 0  # committed; with ``records`` it gives the mean batch size
        self.records = 0

    async def finish(self, offset: int, records: Sequence[OutRecord]) -> None:
        """Publish ``records`` and mark ``offset`` finished, in one committed transaction.

        Raises:
            ProducerFenced, PartitionNotOwnedError, TransactionAbortedError: as
                :meth:`PartitionTransactions.commit`; the record is not finished.
        """
        if not records and self.offset_interval_s > 0:
            # Nothing to publish and the offset may wait: finished now, committed later.
            self.watermark.done(offset)
            self.records += 1
            self._settle_later()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((offset, records, future))
        self._start_flusher()
        # Shielded: a caller cancelled while its batch commits must not cancel the others' commit.
        await asyncio.shield(future)

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    def _settle_later(self) -> None:
        """Make sure the offset is committed within the interval even if nothing else comes."""
        if self._settler is None:
            self._settler = asyncio.get_running_loop().call_later(self.offset_interval_s, self._settle)

    def _settle(self) -> None:
        self._settler = None
        self._start_flusher()  # an empty queue commits the offset alone (see _flush)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue or self._settle_due():
            batch = self._queue[: self.max_batch]
            del self._queue[: len(batch)]
            offsets = [offset for offset, _, _ in batch]
            out = [r for _, records, _ in batch for r in records]
            with_offset = self.offset_interval_s <= 0 or loop.time() >= self._offsets_due or not out
            committed: list[int] = []
            try:
                await self.txns.commit(
                    self.tp, out, self._next_offsets(offsets, committed) if with_offset else None
                )
            except BaseException as exc:
                # Cancelled by close() (or the loop going away): the partition is going away, and
                # that is what callers hear.
                error = exc if isinstance(exc, Exception) else PartitionNotOwnedError(self.tp)
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                        future.exception()  # seen here: a cancelled caller must not log it as lost
                if not isinstance(exc, Exception):
                    raise
                if not batch:
                    # An offset-only commit failed (the partition going away, a broker restart):
                    # try again an interval later, not in a tight loop; close() stops it.
                    log.warning("%s: committing the offset failed (%s); retrying later", self.tp, exc)
                    self._settle_later()
                continue
            self.transactions += 1
            self.records += len(batch)
            if committed:
                self._committed = max(self._committed, committed[0])
                self._offsets_due = loop.time() + self.offset_interval_s
            elif self.offset_interval_s > 0:
                self._settle_later()
            for offset, _, future in batch:
                self.watermark.done(offset)
                if not future.done():
                    future.set_result(None)

    def _settle_due(self) -> bool:
        """Whether finished records wait for their offset to be committed (interval mode)."""
        if self.offset_interval_s <= 0 or self._settler is not None:
            return False
        try:
            return self.watermark.commit_point() > self._committed
        except ValueError:  # nothing ever added
            return False

    def _next_offsets(self, finishing: Sequence[int], committed: list[int]) -> Offsets:
        # Evaluated under the partition's commit lock, when the transaction is about to commit:
        # never below what this committer committed before (an offset-only commit can overtake
        # a batch whose records are not marked done yet).
        def offsets() -> Mapping[TopicPartition, int]:
            point = max(self._committed, self.watermark.commit_point(finishing))
            committed[:] = [point]
            return {self.tp: point}

        return offsets

    async def settle(self, within_s: float = 2.0) -> None:
        """Commit the offset of every finished record now (before giving the partition up).

        Best effort: a failure (fenced, not owned, timed out) only means more redelivery.
        """
        if self._settler is not None:
            self._settler.cancel()
            self._settler = None
        if self.offset_interval_s <= 0 or not self._settle_due():
            return
        self._start_flusher()
        flusher = self._flusher
        if flusher is not None:
            try:
                await asyncio.wait_for(asyncio.shield(flusher), within_s)
            except asyncio.CancelledError:
                # The flusher was cancelled (a close() of the same partition running alongside,
                # e.g. the rebalance listener and a failed preparation both closing it): nothing
                # more to settle. Only a cancellation of this task itself goes on up.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception:  # noqa: BLE001 - best effort, see above
                pass

    async def close(self) -> None:
        """Stop flushing; records still queued fail with :class:`PartitionNotOwnedError`."""
        if self._settler is not None:
            self._settler.cancel()
            self._settler = None
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await flusher
        queued, self._queue = self._queue, []
        for _, _, future in queued:
            if not future.done():
                future.set_exception(PartitionNotOwnedError(self.tp))
                future.exception()


async def poll(
    consumer: AIOKafkaConsumer, *, timeout_ms: int, max_records: int | None = None
) -> dict[TopicPartition, list[Any]]:
    """``consumer.getmany`` that survives a broker restart: an error is logged and reads as no records.

    aiokafka reconnects by itself; a service loop must not die because one fetch failed.
    """
    try:
        batches: dict[TopicPartition, list[Any]] = await consumer.getmany(
            timeout_ms=timeout_ms, max_records=max_records
        )
        return batches
    except KafkaError as exc:
        log.warning("fetch failed (%s: %s); retrying", type(exc).__name__, exc)
        await asyncio.sleep(0.5)
        return {}


async def stop_quietly(client: Any, within_s: float = 5.0) -> None:
    """Stop a producer or consumer, giving up after ``within_s``.

    After a broker restart a producer's sender can die ("Unexpected error during batch
    delivery") and ``stop()`` then waits on batches it will never deliver; the client is
    abandoned instead (a transactional one is fenced by its successor anyway).
    """
    try:
        await asyncio.wait_for(client.stop(), within_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        log.warning("abandoning a Kafka client that would not stop cleanly: %r", exc)


async def start_when_reachable(
    client: Any, stop: asyncio.Event | None = None, *, what: str = "kafka"
) -> None:
    """``client.start()`` retried with backoff while the broker is unreachable (a restart, a deploy).

    A service started while Kafka is down waits for it instead of exiting.
    Raises:
        asyncio.CancelledError: ``stop`` was set before the broker answered.
    """
    delay = 0.5
    while True:
        try:
            await client.start()
            return
        except KafkaError as exc:
            log.warning("%s: broker unreachable (%s); retrying in %.1fs", what, exc, delay)
        if stop is not None and stop.is_set():
            raise asyncio.CancelledError("stopped before the broker answered")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
