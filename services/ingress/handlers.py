"""What becomes of one record of agentbus.ingress: forwarded, rejected, dead-lettered or a duplicate.

:meth:`Admission.admit` applies the checks of DESIGN.md in order and returns an
:data:`Outcome`; :func:`output_records` turns an outcome into the records to publish.
Neither publishes nor commits anything: ``main.py`` puts every record's outputs and
its offset in one Kafka transaction. The dependencies that touch Redis and Cassandra
come in through small protocols (``adapters.py`` has the real ones), so the decisions
are tested with fakes.

Order of the checks (the first that fails decides):

1. size (``oversized`` -> DLQ, the value is not decoded);
2. decode as UserMessage (a ``CodecError`` -> DLQ with its ``reason_code``);
3. tenant signature (``unsigned`` / ``unknown_tenant`` / ``forged_signature`` -> REJECTED);
4. ids present (``missing_id`` -> REJECTED);
5. session ownership (``foreign_session`` -> REJECTED);
6. text (``too_long`` / ``empty`` -> REJECTED);
7. de-duplication on ``message_id`` (-> :class:`Duplicate`, counted, no output);
8. per-tenant rate limit (``rate_limited`` -> REJECTED);
9. concurrency policy resolved, ``TurnRequested`` forwarded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.avro import AvroCodec, CodecError
from shared.kafka import OutRecord, header
from shared.service import dead_letter, session_key

from .settings import IngressSettings
from .signing import SIGNATURE_HEADER, signature_matches

TRACEPARENT_HEADER = "traceparent"

POLICIES: Mapping[str, str] = {"queue": "QUEUE", "reject": "REJECT", "interrupt": "INTERRUPT"}
"""Configured policy name -> ``ConcurrencyPolicy`` symbol."""

REJECTION_TEXT: Mapping[str, str] = {
    "unsigned": "The message carries no x-agentbus-signature header.",
    "unknown_tenant": "The tenant is not known to this deployment.",
    "forged_signature": "The message signature does not match the tenant's secret.",
    "missing_id": "The message has an empty session_id or message_id.",
    "foreign_session": "The session belongs to another tenant.",
    "too_long": "The message text is longer than allowed.",
    "empty": "The message text is empty.",
    "rate_limited": "The tenant sends messages faster than its rate limit; retry later.",
}
"""Reason code of a REJECTED response -> the human text it carries."""


# --------------------------------------------------------------------------- tenants


class TenantConfigError(ValueError):
    """The tenant secrets (file or inline JSON) are not valid."""


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    secret: str
    default_policy: str
    """``ConcurrencyPolicy`` symbol used when a message does not choose one."""


def policy_symbol(name: str) -> str:
    """``queue``/``reject``/``interrupt`` (any case) -> ``QUEUE``/``REJECT``/``INTERRUPT``.

    Raises:
        TenantConfigError: not one of the three policies.
    """
    try:
        return POLICIES[name.strip().lower()]
    except KeyError:
        known = ", ".join(POLICIES)
        raise TenantConfigError(f"unknown concurrency policy {name!r}; one of {known}") from None


def parse_tenants(text: str, *, default_policy: str, source: str) -> dict[str, Tenant]:
    """Tenants from JSON ``{tenant_id: secret}`` or ``{tenant_id: {"secret": s, "default_policy": p}}``.

    Raises:
        TenantConfigError: not JSON, or a tenant id / secret / policy that is not valid.
    """
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TenantConfigError(f"{source}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise TenantConfigError(f"{source}: expected an object {{tenant_id: secret}}")
    fallback = policy_symbol(default_policy)
    tenants: dict[str, Tenant] = {}
    for tenant_id, entry in raw.items():
        # '/' separates tenant and session in every key: a tenant id holding one could alias another's.
        if not tenant_id or "/" in tenant_id:
            raise TenantConfigError(f"{source}: tenant id {tenant_id!r} is empty or contains '/'")
        if isinstance(entry, str):
            secret, policy = entry, fallback
        elif isinstance(entry, dict) and isinstance(entry.get("secret"), str):
            secret = entry["secret"]
            policy = policy_symbol(str(entry["default_policy"])) if "default_policy" in entry else fallback
        else:
            raise TenantConfigError(f"{source}: tenant {tenant_id!r} needs a secret string")
        if not secret:
            raise TenantConfigError(f"{source}: tenant {tenant_id!r} has an empty secret")
        tenants[tenant_id] = Tenant(tenant_id, secret, policy)
    return tenants


def load_tenants(settings: IngressSettings) -> dict[str, Tenant]:
    """The tenants of the secrets file, then of the inline JSON (which wins for a tenant in both).

    Raises:
        TenantConfigError: unreadable file or invalid JSON.
    """
    tenants: dict[str, Tenant] = {}
    if settings.tenant_secrets_file:
        try:
            text = Path(settings.tenant_secrets_file).read_text()
        except OSError as exc:
            raise TenantConfigError(f"AGENTBUS_TENANT_SECRETS_FILE: {exc}") from None
        tenants.update(
            parse_tenants(text, default_policy=settings.default_policy, source=settings.tenant_secrets_file)
        )
    tenants.update(
        parse_tenants(
            settings.tenant_secrets, default_policy=settings.default_policy, source="AGENTBUS_TENANT_SECRETS"
        )
    )
    return tenants


# --------------------------------------------------------------------------- names


def resolve_policy(message_policy: str | None, tenant: Tenant) -> str:
    """The message's own policy (UserMessage v2) or, when it has none, the tenant's default."""
    return message_policy if message_policy is not None else tenant.default_policy


def turn_id_for(tenant_id: str, session_id: str, message_id: str) -> str:
    """Deterministic, so a redelivered message maps to the same turn."""
    return "t-" + hashlib.sha256(f"{tenant_id}/{session_id}/{message_id}".encode()).hexdigest()[:24]


def idem_key(tenant_id: str, session_id: str, message_id: str) -> str:
    """``idem:{tenant/session}:message_id``; the braces are a Redis Cluster hash tag (as ``ctx:``)."""
    return f"idem:{{{tenant_id}/{session_id}}}:{message_id}"


def owner_key(session_id: str) -> str:
    return f"owner:{session_id}"


def bucket_key(tenant_id: str) -> str:
    return f"bucket:tenant:{tenant_id}"


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Forward:
    """Accepted: publish ``turn`` (a TurnRequested datum); remember ``idem_key`` once committed."""

    turn: Mapping[str, Any]
    idem_key: str

    @property
    def reason(self) -> str:
        return "accepted"


@dataclass(frozen=True)
class Reject:
    """Not accepted: answer the client with a REJECTED AgentResponse."""

    tenant_id: str
    session_id: str
    message_id: str
    reason: str

    @property
    def text(self) -> str:
        return REJECTION_TEXT.get(self.reason, self.reason)


@dataclass(frozen=True)
class DeadLetter:
    """Unreadable (or a handler bug): the original record goes to the DLQ."""

    reason: str
    """The DLQ ``reason_code``."""
    detail: str
    error_type: str | None = None


@dataclass(frozen=True)
class Duplicate:
    """A message_id already forwarded: no output, the offset is committed and the drop counted."""

    idem_key: str

    @property
    def reason(self) -> str:
        return "duplicate"


Outcome = Forward | Reject | DeadLetter | Duplicate


def outcome_name(outcome: Outcome) -> str:
    """The metrics label of an outcome."""
    names: dict[type, str] = {
        Forward: "forwarded",
        Reject: "rejected",
        DeadLetter: "dead_lettered",
        Duplicate: "duplicate",
    }
    return names[type(outcome)]


# --------------------------------------------------------------------------- dependencies


@dataclass(frozen=True)
class Claim:
    """Who owns a session id, and whether this very claim created the session."""

    owner: str
    created: bool = False
    """The claim applied now (not answered from the cache, not found already made)."""


class SessionOwners(Protocol):
    async def claim(self, tenant_id: str, session_id: str) -> Claim:
        """Claim ``session_id`` for ``tenant_id`` unless already owned; return the owning tenant."""


class SeenMessages(Protocol):
    async def seen(self, key: str) -> bool:
        """True when the message of ``key`` was already forwarded."""


class RateLimiter(Protocol):
    async def allow(self, tenant_id: str) -> bool:
        """Take one token from the tenant's bucket; False when it is empty."""


@dataclass(frozen=True)
class Limits:
    max_record_bytes: int
    max_text_chars: int


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Admission:
    """The ingress checks with their dependencies; :meth:`admit` decides one record."""

    codec: AvroCodec
    tenants: Mapping[str, Tenant]
    limits: Limits
    owners: SessionOwners
    seen: SeenMessages
    limiter: RateLimiter
    clock: Callable[[], dt.datetime] = _utcnow

    async def admit(
        self, value: bytes | None, headers: Sequence[tuple[str, bytes]], forwarded: set[str]
    ) -> Outcome:
        """Decide one record. ``forwarded`` holds the idem keys forwarded earlier in the same
        (not yet committed) batch, so a repeat inside a batch is a duplicate too; a Forward's
        key is added to it.

        Raises whatever the dependencies raise (Redis, Cassandra): the caller retries the record.
        """
        if value is not None and len(value) > self.limits.max_record_bytes:
            return DeadLetter(
                "oversized", f"value is {len(value)} bytes, more than {self.limits.max_record_bytes}"
            )
        try:
            message = self.codec.decode(value, expected="UserMessage").datum
        except CodecError as exc:
            return DeadLetter(exc.reason_code, str(exc), type(exc).__name__)

        tenant_id, session_id, message_id = message["tenant_id"], message["session_id"], message["message_id"]

        def reject(reason: str) -> Reject:
            return Reject(tenant_id, session_id, message_id, reason)

        signature = header(headers, SIGNATURE_HEADER)
        if signature is None:
            return reject("unsigned")
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            return reject("unknown_tenant")
        assert value is not None  # decoded, so not None
        if not signature_matches(tenant.secret, value, signature):
            return reject("forged_signature")
        if not session_id or not message_id:
            return reject("missing_id")
        key = idem_key(tenant_id, session_id, message_id)
        # Both lookups only read (a claim that applies is idempotent): asked at once, one round
        # trip instead of two; the checks still decide in the documented order.
        claim, repeated = await asyncio.gather(
            self.owners.claim(tenant_id, session_id), self._seen(key, forwarded)
        )
        if claim.owner != tenant_id:
            return reject("foreign_session")
        text: str = message["text"]
        if len(text) > self.limits.max_text_chars:
            return reject("too_long")
        if not text.strip():
            return reject("empty")
        if repeated:
            return Duplicate(key)
        if not await self.limiter.allow(tenant_id):
            return reject("rate_limited")
        forwarded.add(key)
        return Forward(
            {
                "tenant_id": tenant_id,
                "session_id": session_id,
                "message_id": message_id,
                "turn_id": turn_id_for(tenant_id, session_id, message_id),
                "text": text,
                "concurrency_policy": resolve_policy(message.get("concurrency_policy"), tenant),
                "requested_at": self.clock(),
                "metadata": dict(message.get("metadata") or {}),
                "session_created": claim.created,
            },
            key,
        )

    async def _seen(self, key: str, forwarded: set[str]) -> bool:
        return key in forwarded or await self.seen.seen(key)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Source:
    """Where a record came from (what a DeadLetter must carry)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


def output_records(
    outcome: Outcome,
    source: Source,
    *,
    codec: AvroCodec,
    settings: IngressSettings,
    now: dt.datetime,
    trace: Sequence[tuple[str, bytes]] | None = None,
) -> list[OutRecord]:
    """What to publish for ``outcome`` (nothing for a duplicate).

    ``trace``: the trace headers for the outputs (the ingress span's context); without it
    the source's ``traceparent`` is carried over.
    """
    if trace is not None:
        trace_headers: tuple[tuple[str, bytes], ...] = tuple(trace)
    else:
        carried = header(source.headers, TRACEPARENT_HEADER)
        trace_headers = ((TRACEPARENT_HEADER, carried),) if carried is not None else ()
    match outcome:
        case Forward(turn=turn):
            return [
                OutRecord(
                    settings.topic("reasoning.inbox"),
                    codec.encode("TurnRequested", turn),
                    session_key(turn["tenant_id"], turn["session_id"]),
                    trace_headers,
                )
            ]
        case Reject():
            response = {
                "tenant_id": outcome.tenant_id,
                "session_id": outcome.session_id,
                "message_id": outcome.message_id,
                "turn_id": None,
                "kind": "REJECTED",
                "text": outcome.text,
                "reason": outcome.reason,
                "steps": 0,
                "created_at": now,
            }
            return [
                OutRecord(
                    settings.topic("responses"),
                    codec.encode("AgentResponse", response),
                    session_key(outcome.tenant_id, outcome.session_id),
                    trace_headers,
                )
            ]
        case DeadLetter():
            value = dead_letter(
                codec,
                service=settings.service_name,
                topic=source.topic,
                partition=source.partition,
                offset=source.offset,
                key=source.key,
                value=source.value,
                headers=source.headers,
                reason_code=outcome.reason,
                reason=outcome.detail,
                error_type=outcome.error_type,
            )
            return [OutRecord(settings.topic("dlq"), value, source.key, trace_headers)]
        case Duplicate():
            return []
