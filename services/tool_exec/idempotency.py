"""Idempotency of tool calls: the key, and the ``tool_results`` store.

The key of a call is ``sha256`` over the canonical JSON of
``[tenant_id, session_id, step, tool, args]`` (sorted keys, no spaces, UTF-8), so the
same call decided twice — a redelivered record, a retried reasoning step — has the same
key, and a reordering of the arguments object does not change it.

:class:`ToolResultStore` keeps one row per key. Irreversible tools *claim* the row with a
lightweight transaction (``INSERT ... IF NOT EXISTS``) before running and complete it
with another (``UPDATE ... IF status = 'CLAIMED' AND claimed_by = ?``); rows of that key
are read at serial consistency so a reader sees every committed transaction. Read-only
and idempotent-write results are recorded with a plain write.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cassandra.query import BoundStatement

from shared.cassandra import Statements, consistency, execute

__all__ = [
    "CLAIMED",
    "ClaimOutcome",
    "StoredResult",
    "ToolResultStore",
    "ToolStatus",
    "canonical_json",
    "idempotency_key",
]

CLAIMED = "CLAIMED"  # the tool_results status of a claimed call without a result yet


class ToolStatus(StrEnum):
    """How a call ended; the ``ToolStatus`` enum of ``schemas/ToolResult/v1.avsc``."""

    OK = "OK"
    ERROR = "ERROR"
    TIMEOUT = "TIMEOUT"
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
    REJECTED = "REJECTED"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace and raw UTF-8: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def idempotency_key(tenant_id: str, session_id: str, step: int, tool: str, args: Any) -> str:
    """Lower-case hex sha256 of ``canonical_json([tenant_id, session_id, step, tool, args])``."""
    return hashlib.sha256(canonical_json([tenant_id, session_id, step, tool, args]).encode()).hexdigest()


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """The driver reads timestamps as naive UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class StoredResult:
    """One ``tool_results`` row."""

    idempotency_key: str
    tenant_id: str | None
    session_id: str | None
    tool: str | None
    status: str | None  # CLAIMED or a ToolStatus value
    claimed_by: str | None
    claimed_at: dt.datetime | None
    completed_at: dt.datetime | None
    output: str | None
    artifact_id: str | None
    error: str | None
    attempts: int

    @property
    def completed(self) -> bool:
        return self.status is not None and self.status != CLAIMED

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StoredResult:
        return cls(
            idempotency_key=row["idempotency_key"],
            tenant_id=row.get("tenant_id"),
            session_id=row.get("session_id"),
            tool=row.get("tool"),
            status=row.get("status"),
            claimed_by=row.get("claimed_by"),
            claimed_at=_utc(row.get("claimed_at")),
            completed_at=_utc(row.get("completed_at")),
            output=row.get("output"),
            artifact_id=row.get("artifact_id"),
            error=row.get("error"),
            attempts=row.get("attempts") or 0,
        )


@dataclass(frozen=True)
class ClaimOutcome:
    """``won``: this caller holds the claim; else ``existing`` is the row that was there."""

    won: bool
    existing: StoredResult | None = None


_COLUMNS = (
    "idempotency_key, tenant_id, session_id, tool, status, claimed_by, claimed_at, completed_at,"
    " output, artifact_id, error, attempts"
)


class ToolResultStore:
    """The ``tool_results`` table: tool-exec's idempotency store."""

    def __init__(self, statements: Statements, serial_consistency: str = "LOCAL_SERIAL") -> None:
        self.statements = statements
        self._serial = consistency(serial_consistency)

    async def get(self, key: str, *, serial: bool = False) -> StoredResult | None:
        """The row of ``key``; ``serial=True`` reads through Paxos (sees every committed LWT)."""
        cql = f"SELECT {_COLUMNS} FROM {{ks}}.tool_results WHERE idempotency_key = ?"
        if serial:
            bound: BoundStatement = self.statements.get(cql).bind([key])
            bound.consistency_level = self._serial
            rows = await execute(self.statements.session, bound)
        else:
            rows = await self.statements.run(cql, (key,))
        return StoredResult.from_row(rows[0]) if rows else None

    async def claim(
        self,
        key: str,
        *,
        tenant_id: str,
        session_id: str,
        tool: str,
        claimed_by: str,
        now: dt.datetime | None = None,
    ) -> ClaimOutcome:
        """Claim ``key`` with ``INSERT ... IF NOT EXISTS``; only one caller ever wins."""
        rows = await self.statements.run(
            "INSERT INTO {ks}.tool_results (idempotency_key, tenant_id, session_id, tool, status,"
            " claimed_by, claimed_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, 0) IF NOT EXISTS",
            (key, tenant_id, session_id, tool, CLAIMED, claimed_by, now or dt.datetime.now(dt.UTC)),
        )
        row = rows[0]
        if row["[applied]"]:
            return ClaimOutcome(True)
        return ClaimOutcome(False, StoredResult.from_row(row))

    async def complete(
        self,
        key: str,
        *,
        status: ToolStatus,
        claimed_by: str,
        output: str | None = None,
        artifact_id: str | None = None,
        error: str | None = None,
        attempts: int = 1,
        now: dt.datetime | None = None,
    ) -> bool:
        """Record the result of a claimed call; False if the row is no longer this caller's claim."""
        rows = await self.statements.run(
            "UPDATE {ks}.tool_results SET status = ?, completed_at = ?, output = ?, artifact_id = ?,"
            " error = ?, attempts = ? WHERE idempotency_key = ? IF status = ? AND claimed_by = ?",
            (
                str(status),
                now or dt.datetime.now(dt.UTC),
                output,
                artifact_id,
                error,
                attempts,
                key,
                CLAIMED,
                claimed_by,
            ),
        )
        return bool(rows[0]["[applied]"])

    async def record(
        self,
        key: str,
        *,
        tenant_id: str,
        session_id: str,
        tool: str,
        status: ToolStatus,
        claimed_by: str,
        started_at: dt.datetime,
        finished_at: dt.datetime,
        output: str | None = None,
        artifact_id: str | None = None,
        error: str | None = None,
        attempts: int = 1,
    ) -> None:
        """Write the result of a read-only or idempotent-write call (a plain upsert, no claim)."""
        await self.statements.run(
            f"INSERT INTO {{ks}}.tool_results ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                tenant_id,
                session_id,
                tool,
                str(status),
                claimed_by,
                started_at,
                finished_at,
                output,
                artifact_id,
                error,
                attempts,
            ),
        )
