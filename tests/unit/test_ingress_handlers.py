"""Ingress decisions with fake stores: policy resolution, tenants, the order of the checks."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from services.ingress.handlers import (
    Admission,
    Claim,
    DeadLetter,
    Duplicate,
    Forward,
    Limits,
    Reject,
    Source,
    Tenant,
    TenantConfigError,
    idem_key,
    output_records,
    parse_tenants,
    policy_symbol,
    resolve_policy,
    turn_id_for,
)
from services.ingress.settings import IngressSettings
from services.ingress.signing import sign
from shared.avro import AvroCodec

NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
ACME = Tenant("acme", "s3cret", "QUEUE")
GLOBEX = Tenant("globex", "other", "REJECT")


class FakeOwners:
    def __init__(self) -> None:
        self.owners: dict[str, str] = {}

    async def claim(self, tenant_id: str, session_id: str) -> Claim:
        created = session_id not in self.owners
        return Claim(self.owners.setdefault(session_id, tenant_id), created)


class FakeSeen:
    def __init__(self) -> None:
        self.keys: set[str] = set()

    async def seen(self, key: str) -> bool:
        return key in self.keys


class FakeLimiter:
    def __init__(self, tokens: int = 100) -> None:
        self.tokens = tokens

    async def allow(self, tenant_id: str) -> bool:
        self.tokens -= 1
        return self.tokens >= 0


@pytest.fixture
def admission(codec: AvroCodec) -> Admission:
    return Admission(
        codec=codec,
        tenants={"acme": ACME, "globex": GLOBEX},
        limits=Limits(max_record_bytes=2048, max_text_chars=100),
        owners=FakeOwners(),
        seen=FakeSeen(),
        limiter=FakeLimiter(),
        clock=lambda: NOW,
    )


def message(codec: AvroCodec, version: int = 2, **fields: Any) -> bytes:
    datum: dict[str, Any] = {
        "tenant_id": "acme",
        "session_id": "s-1",
        "message_id": "m-1",
        "text": "hello",
        "sent_at": NOW,
    }
    if version == 2:
        datum["concurrency_policy"] = None
    datum.update(fields)
    return codec.encode("UserMessage", datum, version=version)


def signed(value: bytes, secret: str = "s3cret") -> list[tuple[str, bytes]]:
    return [("x-agentbus-signature", sign(secret, value).encode())]


# --------------------------------------------------------------------------- policy


def test_message_policy_wins_over_the_tenant_default() -> None:
    assert resolve_policy("INTERRUPT", ACME) == "INTERRUPT"
    assert resolve_policy("QUEUE", GLOBEX) == "QUEUE"


def test_without_a_message_policy_the_tenant_default_applies() -> None:
    assert resolve_policy(None, ACME) == "QUEUE"
    assert resolve_policy(None, GLOBEX) == "REJECT"


def test_policy_names_map_to_enum_symbols() -> None:
    assert [policy_symbol(p) for p in ("queue", "Reject", " INTERRUPT ")] == ["QUEUE", "REJECT", "INTERRUPT"]
    with pytest.raises(TenantConfigError, match="unknown concurrency policy"):
        policy_symbol("drop")


def test_tenants_parse_plain_secrets_and_per_tenant_defaults() -> None:
    tenants = parse_tenants(
        '{"acme": "s3cret", "globex": {"secret": "other", "default_policy": "interrupt"}}',
        default_policy="reject",
        source="test",
    )
    assert tenants == {
        "acme": Tenant("acme", "s3cret", "REJECT"),
        "globex": Tenant("globex", "other", "INTERRUPT"),
    }
    assert parse_tenants("", default_policy="queue", source="test") == {}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1]",
        '{"a/b": "x"}',
        '{"": "x"}',
        '{"a": ""}',
        '{"a": 1}',
        '{"a": {"secret": "x", "default_policy": "no"}}',
    ],
)
def test_bad_tenant_config_is_refused(text: str) -> None:
    with pytest.raises(TenantConfigError):
        parse_tenants(text, default_policy="queue", source="test")


def test_turn_id_is_deterministic_per_message() -> None:
    assert turn_id_for("acme", "s", "m") == turn_id_for("acme", "s", "m")
    assert turn_id_for("acme", "s", "m") != turn_id_for("acme", "s", "m2")
    assert turn_id_for("acme", "s", "m").startswith("t-") and len(turn_id_for("a", "b", "c")) == 26


# --------------------------------------------------------------------------- admit


async def test_valid_v2_message_is_forwarded_with_its_policy(admission: Admission, codec: AvroCodec) -> None:
    value = message(codec, concurrency_policy="INTERRUPT", metadata={"k": "v"})
    outcome = await admission.admit(value, signed(value), set())
    assert isinstance(outcome, Forward)
    assert outcome.turn == {
        "tenant_id": "acme",
        "session_id": "s-1",
        "message_id": "m-1",
        "turn_id": turn_id_for("acme", "s-1", "m-1"),
        "text": "hello",
        "concurrency_policy": "INTERRUPT",
        "requested_at": NOW,
        "metadata": {"k": "v"},
        "session_created": True,
    }
    assert outcome.idem_key == idem_key("acme", "s-1", "m-1")


async def test_only_the_message_whose_claim_applied_says_it_created_the_session(
    admission: Admission, codec: AvroCodec
) -> None:
    created = []
    for message_id in ("m-1", "m-2"):
        value = message(codec, message_id=message_id)
        outcome = await admission.admit(value, signed(value), set())
        assert isinstance(outcome, Forward)
        created.append(outcome.turn["session_created"])
    assert created == [True, False]


async def test_v1_message_gets_the_tenant_default(admission: Admission, codec: AvroCodec) -> None:
    value = message(codec, version=1, tenant_id="globex")
    outcome = await admission.admit(value, signed(value, "other"), set())
    assert isinstance(outcome, Forward)
    assert outcome.turn["concurrency_policy"] == "REJECT"


async def test_checks_reject_with_reasons(admission: Admission, codec: AvroCodec) -> None:
    async def reason(value: bytes, headers: list[tuple[str, bytes]]) -> str:
        outcome = await admission.admit(value, headers, set())
        assert isinstance(outcome, Reject | DeadLetter), outcome
        return outcome.reason

    ok = message(codec)
    assert await reason(b"x" * 3000, []) == "oversized"
    assert await reason(b"garbage", []) == "bad_magic"
    assert await reason(ok, []) == "unsigned"
    assert await reason(ok, signed(ok, "wrong")) == "forged_signature"
    unknown = message(codec, tenant_id="initech")
    assert await reason(unknown, signed(unknown)) == "unknown_tenant"
    assert await reason(message(codec, text="x" * 101), signed(message(codec, text="x" * 101))) == "too_long"
    assert await reason(message(codec, text="  "), signed(message(codec, text="  "))) == "empty"
    assert await reason(message(codec, message_id=""), signed(message(codec, message_id=""))) == "missing_id"
    # acme claimed s-1 above; globex may not use it.
    foreign = message(codec, tenant_id="globex")
    assert await reason(foreign, signed(foreign, "other")) == "foreign_session"


async def test_duplicates_in_the_store_and_in_the_batch(admission: Admission, codec: AvroCodec) -> None:
    value = message(codec)
    batch: set[str] = set()
    assert isinstance(await admission.admit(value, signed(value), batch), Forward)
    assert isinstance(await admission.admit(value, signed(value), batch), Duplicate)
    assert isinstance(admission.seen, FakeSeen)
    admission.seen.keys.add(idem_key("acme", "s-1", "m-1"))
    assert isinstance(await admission.admit(value, signed(value), set()), Duplicate)


async def test_rate_limit_rejects_once_the_bucket_is_empty(admission: Admission, codec: AvroCodec) -> None:
    limited = dataclasses.replace(admission, limiter=FakeLimiter(tokens=1))
    first, second = message(codec, message_id="a"), message(codec, message_id="b")
    assert isinstance(await limited.admit(first, signed(first), set()), Forward)
    outcome = await limited.admit(second, signed(second), set())
    assert isinstance(outcome, Reject) and outcome.reason == "rate_limited"


def test_output_records(codec: AvroCodec) -> None:
    settings = IngressSettings.from_env({}, topic_prefix="p")
    source = Source("p.ingress", 1, 7, b"k", b"v", [("traceparent", b"00-abc-def-01")])
    (rejected,) = output_records(
        Reject("acme", "s", "m", "too_long"), source, codec=codec, settings=settings, now=NOW
    )
    assert rejected.topic == "p.responses" and rejected.key == b"acme/s"
    assert list(rejected.headers) == [("traceparent", b"00-abc-def-01")]
    datum = codec.decode(rejected.value, expected="AgentResponse").datum
    assert datum["kind"] == "REJECTED" and datum["reason"] == "too_long" and datum["turn_id"] is None
    (dlq,) = output_records(DeadLetter("bad_magic", "no"), source, codec=codec, settings=settings, now=NOW)
    letter = codec.decode(dlq.value, expected="DeadLetter").datum
    assert (letter["source_topic"], letter["source_partition"], letter["source_offset"]) == (
        "p.ingress",
        1,
        7,
    )
    assert letter["value"] == b"v" and letter["reason_code"] == "bad_magic"
    assert output_records(Duplicate("k"), source, codec=codec, settings=settings, now=NOW) == []
