"""The session event log in Cassandra: idempotent appends, reads in ``seq`` order.

Rows live in ``session_events ((tenant_id, session_id, bucket), seq)`` with
``bucket = seq // EVENTS_PER_BUCKET``. Writing the same ``(session, seq)`` twice
overwrites the row with itself (a replayed Kafka record is harmless); since a
session's ``seq`` is contiguous, reading walks buckets until the first empty one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

from cassandra.query import BatchStatement, BatchType

from shared.cassandra import Statements, execute

EVENTS_PER_BUCKET = 1000

_INSERT = (
    "INSERT INTO {ks}.session_events (tenant_id, session_id, bucket, seq, turn_id, event_type, record, "
    "trace_id, occurred_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = (
    "SELECT seq, turn_id, event_type, record, trace_id, occurred_at FROM {ks}.session_events "
    "WHERE tenant_id = ? AND session_id = ? AND bucket = ? AND seq >= ?"
)


def bucket_of(seq: int) -> int:
    return seq // EVENTS_PER_BUCKET


@dataclass(frozen=True)
class StoredEvent:
    """One row of the event log; ``record`` is the SessionEvent exactly as published."""

    tenant_id: str
    session_id: str
    seq: int
    turn_id: str
    event_type: str
    record: bytes
    trace_id: str
    occurred_at: dt.datetime


def _values(e: StoredEvent) -> tuple[object, ...]:
    return (
        e.tenant_id,
        e.session_id,
        bucket_of(e.seq),
        e.seq,
        e.turn_id,
        e.event_type,
        e.record,
        e.trace_id,
        e.occurred_at,
    )


class EventLog:
    """Reads and idempotent batched writes of ``session_events``."""

    def __init__(self, statements: Statements) -> None:
        self._st = statements

    async def append(self, events: Sequence[StoredEvent]) -> None:
        """Write ``events``; one unlogged batch per Cassandra partition (same session and bucket)."""
        key = lambda e: (e.tenant_id, e.session_id, bucket_of(e.seq))  # noqa: E731
        for _, group in groupby(sorted(events, key=key), key=key):
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            self.add_inserts(batch, list(group))
            await execute(self._st.session, batch)

    def add_inserts(self, batch: BatchStatement, events: Sequence[StoredEvent]) -> None:
        """Add the idempotent inserts of ``events`` to ``batch`` (the caller executes it)."""
        insert = self._st.get(_INSERT)
        for e in events:
            batch.add(insert, _values(e))

    def replicas(self, event: StoredEvent) -> frozenset[str] | None:
        """The nodes holding ``event``'s partition (the driver's token map), or ``None`` if unknown."""
        bound = self._st.get(_INSERT).bind(_values(event))
        try:
            hosts = self._st.session.cluster.metadata.get_replicas(self._st.keyspace, bound.routing_key)
        except Exception:  # noqa: BLE001 - no token map (yet): the caller writes alone
            return None
        return frozenset(str(h.host_id or h.endpoint) for h in hosts) or None

    async def read(self, tenant_id: str, session_id: str, *, from_seq: int = 0) -> list[StoredEvent]:
        """Every event of the session with ``seq >= from_seq``, in ``seq`` order."""
        out: list[StoredEvent] = []
        bucket = bucket_of(from_seq)
        while True:
            rows = await self._st.run(_SELECT, (tenant_id, session_id, bucket, from_seq))
            if not rows:
                return out
            out.extend(
                StoredEvent(
                    tenant_id,
                    session_id,
                    r["seq"],
                    r["turn_id"],
                    r["event_type"],
                    r["record"],
                    r["trace_id"],
                    r["occurred_at"].replace(tzinfo=dt.UTC),
                )
                for r in rows
            )
            bucket += 1
