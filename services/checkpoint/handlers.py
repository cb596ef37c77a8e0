"""What the checkpoint service does with one batch of ``agentbus.events`` records.

A batch is projected to Cassandra in three idempotent steps, in this order:

1. the event log (:meth:`EventLog.append`, primary key ``(session, seq)``);
2. the session index (``sessions``), where ``last_seq`` only moves forward (seq-based
   write timestamps); 1 and 2 go to Cassandra as one unlogged batch per session;
3. snapshots, written at every seq ``s`` with ``(s + 1) % snapshot_every == 0``
   (the snapshot at ``s`` holds the fold of events ``0..s``, i.e. the first
   ``snapshot_every``, ``2 * snapshot_every``... events of the session).

Replaying a record rewrites the same rows with the same values, so redelivery
after a crash (or a new consumer group reading from the start) is harmless.
Records that are not a decodable ``SessionEvent`` become DeadLetters.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cassandra.query import BatchStatement, BatchType

from shared.avro import AvroCodec, CodecError
from shared.cassandra import Statements, execute
from shared.context import SessionState, fold_event
from shared.eventlog import EventLog, StoredEvent

log = logging.getLogger(__name__)

SERVICE = "checkpoint"
IDLE_EVENT_TYPES = frozenset({"RESPONSE_SENT", "TURN_CANCELLED"})

# The index row moves forward without Paxos: every cell is written with the write
# timestamp SEQ_TIMESTAMP_BASE + seq, so a write about an older seq (a replay, a late batch)
# loses to a newer one cell by cell, and a replay of the same seq writes the same values.
# The base (2**60 microseconds, year ~38,000) puts these writes above any wall-clock
# timestamp, so rows written by earlier versions (with LWTs) are overtaken too; a DELETE
# of an index row therefore needs USING TIMESTAMP above the base as well.
SEQ_TIMESTAMP_BASE = 1 << 60
_ADVANCE_SESSION = (
    "UPDATE {ks}.sessions USING TIMESTAMP ? SET last_seq = ?, last_turn_id = ?, status = ?, updated_at = ? "
    "WHERE tenant_id = ? AND session_id = ?"
)
_CREATE_SESSION = (
    "UPDATE {ks}.sessions USING TIMESTAMP ? SET created_at = ? WHERE tenant_id = ? AND session_id = ?"
)
_LATEST_SNAPSHOT_BEFORE = (
    "SELECT seq, state FROM {ks}.session_snapshots WHERE tenant_id = ? AND session_id = ? AND seq < ? LIMIT 1"
)
_INSERT_SNAPSHOT = (
    "INSERT INTO {ks}.session_snapshots (tenant_id, session_id, seq, state, summary, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

SessionId = tuple[str, str]


@dataclass(frozen=True)
class InRecord:
    """The parts of a consumed Kafka record the checkpoint needs (decoupled from aiokafka)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


@dataclass(frozen=True)
class Rejected:
    """A record that is not a usable SessionEvent, with the dead-letter reason."""

    record: InRecord
    reason_code: str
    reason: str
    error_type: str


@dataclass
class DecodedBatch:
    """A batch split into events to store and records to dead-letter."""

    events: list[StoredEvent] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass(frozen=True)
class SessionProgress:
    """Where one session stands after a batch: the newest event seen and the batch's seq range."""

    tenant_id: str
    session_id: str
    first_seq: int
    last_seq: int
    last_turn_id: str
    status: str  # "idle" after a response or a cancellation, else "running"
    last_at: dt.datetime | None = None  # occurred_at of the newest event
    first_at: dt.datetime | None = None  # occurred_at of seq 0, when the batch holds it


def decode_batch(codec: AvroCodec, records: Iterable[InRecord]) -> DecodedBatch:
    """Decode every record as a SessionEvent; a ``CodecError`` or a negative seq rejects it."""
    out = DecodedBatch()
    for record in records:
        try:
            datum = codec.decode(record.value, expected="SessionEvent").datum
        except CodecError as exc:
            out.rejected.append(Rejected(record, exc.reason_code, str(exc), type(exc).__name__))
            continue
        if datum["seq"] < 0:
            out.rejected.append(
                Rejected(record, "invalid_seq", f"seq {datum['seq']} is negative", "ValueError")
            )
            continue
        assert record.value is not None  # decode rejects None
        out.events.append(
            StoredEvent(
                tenant_id=datum["tenant_id"],
                session_id=datum["session_id"],
                seq=int(datum["seq"]),
                turn_id=datum["turn_id"],
                event_type=datum["event_type"],
                record=bytes(record.value),
                trace_id=datum["trace_id"],
                occurred_at=datum["occurred_at"],
            )
        )
    return out


def session_progress(events: Iterable[StoredEvent]) -> dict[SessionId, SessionProgress]:
    """Per session in the batch: its seq range, and turn and status of its newest event."""
    lows: dict[SessionId, int] = {}
    newest: dict[SessionId, StoredEvent] = {}
    created: dict[SessionId, dt.datetime] = {}
    for e in events:
        sid = (e.tenant_id, e.session_id)
        lows[sid] = min(e.seq, lows.get(sid, e.seq))
        if sid not in newest or e.seq > newest[sid].seq:
            newest[sid] = e
        if e.seq == 0:
            created[sid] = e.occurred_at
    return {
        sid: SessionProgress(
            tenant_id=sid[0],
            session_id=sid[1],
            first_seq=lows[sid],
            last_seq=e.seq,
            last_turn_id=e.turn_id,
            status="idle" if e.event_type in IDLE_EVENT_TYPES else "running",
            last_at=e.occurred_at,
            first_at=created.get(sid),
        )
        for sid, e in newest.items()
    }


def snapshot_points(first_seq: int, last_seq: int, every: int) -> list[int]:
    """The seqs in ``first_seq..last_seq`` at which a snapshot is due: ``every - 1``, ``2 * every - 1``...

    >>> snapshot_points(95, 104, 100)
    [99]
    """
    if every <= 0 or last_seq < first_seq:
        return []
    first_point = ((first_seq + 1 + every - 1) // every) * every - 1  # smallest k*every-1 >= first_seq
    return list(range(max(first_point, every - 1), last_seq + 1, every))


def add_session_advance(
    batch: BatchStatement, statements: Statements, progress: SessionProgress, now: dt.datetime
) -> None:
    """Add the upsert of the session's index row to ``batch``; ``last_seq`` only moves forward
    (see ``_ADVANCE_SESSION``).

    ``updated_at`` is the newest event's ``occurred_at`` and ``created_at`` the first event's,
    so writing the same batch again leaves the row exactly as it was; ``now`` stands in
    for an event without a time.
    """
    p = progress
    stamp = SEQ_TIMESTAMP_BASE + p.last_seq
    values = (p.last_seq, p.last_turn_id, p.status, p.last_at or now)
    batch.add(statements.get(_ADVANCE_SESSION), (stamp, *values, p.tenant_id, p.session_id))
    if p.first_seq == 0:
        created = (SEQ_TIMESTAMP_BASE, p.first_at or now, p.tenant_id, p.session_id)
        batch.add(statements.get(_CREATE_SESSION), created)


async def advance_session(statements: Statements, progress: SessionProgress, now: dt.datetime) -> None:
    """Move the session's index row forward (:func:`add_session_advance`, on its own).

    Raises whatever the Cassandra driver raises (the caller retries the batch).
    """
    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
    add_session_advance(batch, statements, progress, now)
    await execute(statements.session, batch)


async def write_sessions(
    statements: Statements,
    eventlog: EventLog,
    sessions: Sequence[tuple[Sequence[StoredEvent], SessionProgress]],
    now: dt.datetime,
) -> None:
    """Some sessions' part of a batch in one request: each one's events, then its index row.

    One unlogged batch, so the checkpoint pays one Cassandra round trip for a group of
    sessions (see :func:`group_writes`) instead of two per session. An unlogged batch is
    not atomic: if it fails half-way, an index row may be ahead of its log until the
    retried batch lands, which a reader already tolerates (the reasoning service waits
    for the log to reach the head it was told).

    Raises whatever the Cassandra driver raises (the caller retries the batch).
    """
    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
    for events, progress in sessions:
        eventlog.add_inserts(batch, events)
        add_session_advance(batch, statements, progress, now)
    await execute(statements.session, batch)


ROW_OVERHEAD_BYTES = 100  # keys, seq, types, trace id and timestamp of one event row, roughly


def group_writes(
    sessions: Iterable[tuple[SessionId, frozenset[str] | None, int]], max_bytes: int
) -> list[list[SessionId]]:
    """Sessions to write together: those whose log partitions live on the same replicas, up to
    ``max_bytes`` of rows per request (a bigger session goes alone).

    Grouping by replica set is what token-aware writers do (the Spark Cassandra Connector's
    ``batch.grouping.key=replica_set``): the coordinator applies the whole batch to its
    own replicas, without fanning it out. A session whose replicas are unknown (``None``)
    is written alone.

    >>> group_writes([(("t", "a"), frozenset("x"), 10), (("t", "b"), frozenset("x"), 10),
    ...               (("t", "c"), frozenset("y"), 10), (("t", "d"), None, 1)], max_bytes=15)
    [[('t', 'a')], [('t', 'b')], [('t', 'c')], [('t', 'd')]]
    >>> group_writes([(("t", "a"), frozenset("x"), 10), (("t", "b"), frozenset("x"), 10)], 20)
    [[('t', 'a'), ('t', 'b')]]
    """
    groups: list[list[SessionId]] = []
    open_groups: dict[frozenset[str], tuple[list[SessionId], int]] = {}
    for sid, replicas, size in sessions:
        if replicas is None:
            groups.append([sid])
            continue
        current = open_groups.get(replicas)
        if current is not None and current[1] + size <= max_bytes:
            current[0].append(sid)
            open_groups[replicas] = (current[0], current[1] + size)
            continue
        group = [sid]
        groups.append(group)
        open_groups[replicas] = (group, size)
    return groups


def write_size(events: Iterable[StoredEvent]) -> int:
    """Roughly the bytes ``events`` add to a Cassandra batch."""
    return sum(len(e.record) + ROW_OVERHEAD_BYTES for e in events)


class SnapshotGapError(RuntimeError):
    """The stored log of a session is not contiguous up to a snapshot point."""


async def write_snapshots(
    statements: Statements,
    eventlog: EventLog,
    codec: AvroCodec,
    tenant_id: str,
    session_id: str,
    points: Sequence[int],
    now: dt.datetime,
) -> int:
    """Write a snapshot at each seq of ``points`` (ascending): the latest snapshot + the stored log, folded.

    Returns the number of snapshots written.

    Raises:
        SnapshotGapError: the stored log misses an event at or before a point (not retryable:
            the record never reached the log, e.g. it was dead-lettered).
        Whatever the Cassandra driver raises (retryable).
    """
    if not points:
        return 0
    state = await latest_snapshot_before(statements, tenant_id, session_id, points[0])
    stored = await eventlog.read(tenant_id, session_id, from_seq=state.seq + 1)
    written = 0
    pending = list(points)
    for e in stored:
        if e.seq > pending[-1]:
            break
        try:
            fold_event(state, _decode_stored(codec, e))
        except ValueError as exc:  # a gap: the fold wants contiguous seqs
            raise SnapshotGapError(str(exc)) from exc
        if e.seq == pending[0]:
            await statements.run(
                _INSERT_SNAPSHOT, (tenant_id, session_id, e.seq, state.to_json(), state.summary, now)
            )
            written += 1
            pending.pop(0)
            if not pending:
                return written
    raise SnapshotGapError(
        f"session {tenant_id}/{session_id}: stored log ends at seq {state.seq}, snapshot due at {pending[0]}"
    )


async def latest_snapshot_before(
    statements: Statements, tenant_id: str, session_id: str, seq: int
) -> SessionState:
    """The newest snapshot of the session older than ``seq``, or an empty session."""
    rows = await statements.run(_LATEST_SNAPSHOT_BEFORE, (tenant_id, session_id, seq))
    if not rows:
        return SessionState(tenant_id, session_id)
    return SessionState.from_json(rows[0]["state"])


def _decode_stored(codec: AvroCodec, event: StoredEvent) -> dict[str, Any]:
    return codec.decode(event.record, expected="SessionEvent").datum
