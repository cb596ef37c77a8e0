"""The artifact store (cold tier): large tool outputs live here; only a pointer travels on the bus."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from shared.cassandra import Statements

__all__ = ["ArtifactRef", "ArtifactStore"]


@dataclass(frozen=True)
class ArtifactRef:
    """The ``ArtifactRef`` record of ``schemas/ToolResult``: what the context holds instead of the data."""

    artifact_id: str
    content_type: str
    size_bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ArtifactStore:
    """The ``artifacts`` table. Artifacts are immutable: every put makes a new id."""

    def __init__(self, statements: Statements) -> None:
        self.statements = statements

    async def put(self, data: bytes, *, tenant_id: str, session_id: str, content_type: str) -> ArtifactRef:
        ref = ArtifactRef(uuid.uuid4().hex, content_type, len(data), hashlib.sha256(data).hexdigest())
        await self.statements.run(
            "INSERT INTO {ks}.artifacts (artifact_id, tenant_id, session_id, content_type, size_bytes,"
            " sha256, data, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ref.artifact_id,
                tenant_id,
                session_id,
                content_type,
                ref.size_bytes,
                ref.sha256,
                data,
                dt.datetime.now(dt.UTC),
            ),
        )
        return ref

    async def ref(self, artifact_id: str) -> ArtifactRef | None:
        """The pointer of a stored artifact (without reading its data)."""
        rows = await self.statements.run(
            "SELECT content_type, size_bytes, sha256 FROM {ks}.artifacts WHERE artifact_id = ?",
            (artifact_id,),
        )
        if not rows:
            return None
        row = rows[0]
        return ArtifactRef(artifact_id, row["content_type"], row["size_bytes"], row["sha256"])

    async def get(self, artifact_id: str, *, tenant_id: str) -> tuple[ArtifactRef, bytes] | None:
        """Pointer and data of an artifact of ``tenant_id`` (another tenant's artifact reads as missing)."""
        rows = await self.statements.run(
            "SELECT tenant_id, content_type, size_bytes, sha256, data FROM {ks}.artifacts"
            " WHERE artifact_id = ?",
            (artifact_id,),
        )
        if not rows or rows[0]["tenant_id"] != tenant_id:
            return None
        row = rows[0]
        ref = ArtifactRef(artifact_id, row["content_type"], row["size_bytes"], row["sha256"])
        return ref, bytes(row["data"])
