"""Rebuild the truth of a finished run from Kafka and Cassandra, and check the guarantees.

One linear reader per topic (``read_committed``, no consumer group) reads every partition
from the beginning to the end offsets taken when :func:`verify` starts, so the verdict is
about what had been committed by then; run it once the services are quiescent.

The checks (DESIGN.md, "Guarantees to prove with tests"):

1. ``one_final_response``: every distinct (tenant, session, message_id) that appears as a
   TurnRequested on the inbox or has any AgentResponse gets exactly one AgentResponse
   (FINAL, ERROR or REJECTED; reasoning may reject ``turn_in_progress`` after a TurnRequested).
2. ``side_effects_at_most_once``: one ``notify_outbox`` row per idempotency key.
3. ``seq_contiguous``: each session's seqs on the events topic are exactly 0..n-1, once each.
4. ``cassandra_matches_events``: ``EventLog.read`` returns the same seqs, byte-identical records.
5. ``dlq_exact``: the DLQ holds exactly the injected bad records, each with a reason.
6. ``partitions_moving``: every given consumer group has consumed every record of its input.

Memory stays modest at ~50k events: per session a dict seq -> sha256 of the value(s).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.avro import AvroCodec, CodecError, default_codec
from shared.cassandra import Statements
from shared.eventlog import EventLog
from shared.kafka import make_consumer
from shared.settings import KafkaSettings

__all__ = [
    "CHECKS",
    "GROUP_INPUT_TOPICS",
    "CheckResult",
    "InjectedBadRecord",
    "MessageRef",
    "Report",
    "SentMessage",
    "VerifyError",
    "verify",
]

ONE_FINAL_RESPONSE = "one_final_response"
SIDE_EFFECTS_AT_MOST_ONCE = "side_effects_at_most_once"
SEQ_CONTIGUOUS = "seq_contiguous"
CASSANDRA_MATCHES_EVENTS = "cassandra_matches_events"
DLQ_EXACT = "dlq_exact"
PARTITIONS_MOVING = "partitions_moving"
CHECKS = (
    ONE_FINAL_RESPONSE,
    SIDE_EFFECTS_AT_MOST_ONCE,
    SEQ_CONTIGUOUS,
    CASSANDRA_MATCHES_EVENTS,
    DLQ_EXACT,
    PARTITIONS_MOVING,
)

GROUP_INPUT_TOPICS: Mapping[str, str] = {
    "ingress": "ingress",
    "reasoning": "reasoning.inbox",
    "tool-exec": "tool.calls",
    "tool_exec": "tool.calls",
    "checkpoint": "events",
}
"""Service name (as a key of ``groups``) -> the logical topic its consumer group reads."""

MAX_EXAMPLES = 10
BATCH = 5000
CASSANDRA_CONCURRENCY = 16

SessionKey = tuple[str, str]
MessageKey = tuple[str, str, str]


class VerifyError(RuntimeError):
    """The verifier itself could not finish (a topic stopped advancing before its end offset)."""


@dataclass(frozen=True)
class InjectedBadRecord:
    """A record the workload wrote on purpose that must end in the DLQ.

    ``topic`` is the full topic name; ``expect_reason`` the DeadLetter ``reason_code``
    expected, or None for any (non-empty) reason.
    """

    topic: str
    value: bytes
    expect_reason: str | None = None


class MessageRef(Protocol):
    """Anything naming a message the workload sent and believes valid."""

    @property
    def tenant_id(self) -> str: ...
    @property
    def session_id(self) -> str: ...
    @property
    def message_id(self) -> str: ...


@dataclass(frozen=True)
class SentMessage:
    tenant_id: str
    session_id: str
    message_id: str


@dataclass
class CheckResult:
    name: str
    ok: bool
    counts: dict[str, int]
    examples: list[dict[str, Any]] = field(default_factory=list)
    """Up to ten violations, each with a ``kind`` (the counter it was counted in)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Informational numbers that do not decide ``ok``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "counts": dict(self.counts),
            "examples": [dict(e) for e in self.examples],
            "info": dict(self.info),
        }


@dataclass
class Report:
    checks: list[CheckResult]
    totals: dict[str, int]
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "totals": dict(self.totals),
            "elapsed_s": round(self.elapsed_s, 3),
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_text(self) -> str:
        lines = [
            f"verify: {'OK' if self.ok else 'FAILED (' + ', '.join(self.failed) + ')'} "
            f"in {self.elapsed_s:.1f}s",
            "totals: " + ", ".join(f"{k}={v}" for k, v in self.totals.items()),
        ]
        for c in self.checks:
            lines.append(f"[{'ok' if c.ok else 'FAIL'}] {c.name}: " + _kv(c.counts))
            if c.info:
                lines.append("       info: " + _kv(c.info))
            for e in c.examples:
                rest = {k: v for k, v in e.items() if k != "kind"}
                lines.append(f"       - {e.get('kind', '?')}: {_kv(rest)}")
        return "\n".join(lines)


def _kv(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in d.items())


def _short(v: Any, limit: int = 120) -> str:
    text = v.hex() if isinstance(v, bytes) else str(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Examples:
    """Up to MAX_EXAMPLES per kind, handed out round-robin so every kind shows."""

    def __init__(self) -> None:
        self._by_kind: dict[str, list[dict[str, Any]]] = {}

    def add(self, kind: str, **fields: Any) -> None:
        bucket = self._by_kind.setdefault(kind, [])
        if len(bucket) < MAX_EXAMPLES:
            bucket.append({"kind": kind, **fields})

    def take(self, n: int = MAX_EXAMPLES) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        lists = [list(v) for v in self._by_kind.values()]
        i = 0
        while len(out) < n and any(i < len(lst) for lst in lists):
            for lst in lists:
                if i < len(lst) and len(out) < n:
                    out.append(lst[i])
            i += 1
        return out


def _sha(value: bytes | None) -> bytes:
    return hashlib.sha256(value or b"").digest()


# ------------------------------------------------------------------------ reading


class _Offsets:
    """Offsets of every data record read, per partition (for the consumer-lag check)."""

    def __init__(self) -> None:
        self.by_partition: dict[int, list[int]] = defaultdict(list)
        self.partitions: list[int] = []

    def lag(self, partition: int, committed: int) -> int:
        """Records at or past ``committed`` (what a group at ``committed`` has not consumed)."""
        offsets = self.by_partition.get(partition, [])
        return len(offsets) - bisect_left(offsets, max(committed, 0))


async def _partitions(kafka: KafkaSettings, topics: list[str]) -> dict[str, list[int]]:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.kafka_bootstrap, request_timeout_ms=kafka.kafka_request_timeout_ms
    )
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    out = {d["topic"]: sorted(p["partition"] for p in d["partitions"]) for d in described}
    bad = [t for t in topics if not out.get(t)]
    if bad:
        raise VerifyError(f"topics without partitions (do they exist?): {bad}")
    return out


async def _read_topic(
    kafka: KafkaSettings,
    topic: str,
    partitions: list[int],
    on_record: Callable[[Any], None],
    *,
    stall_timeout_s: float,
) -> _Offsets:
    """Feed every committed record of ``topic`` up to the end offsets taken now to ``on_record``."""
    consumer: AIOKafkaConsumer = make_consumer(kafka, group_id=None, client_id=f"chaos-verify-{topic}")
    await consumer.start()
    offsets = _Offsets()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        offsets.partitions = [tp.partition for tp in tps]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)  # read_committed: the last stable offsets
        remaining = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        last_progress = time.monotonic()
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000, max_records=BATCH)
            for tp, records in batches.items():
                for r in records:
                    if r.offset >= ends[tp]:
                        break
                    offsets.by_partition[tp.partition].append(r.offset)
                    on_record(r)
                if records:
                    last_progress = time.monotonic()
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
            if remaining and time.monotonic() - last_progress > stall_timeout_s:
                stuck = {f"{tp.partition}": (await consumer.position(tp), ends[tp]) for tp in remaining}
                raise VerifyError(f"{topic}: no progress for {stall_timeout_s}s; (position, end): {stuck}")
    finally:
        await consumer.stop()
    return offsets


# ------------------------------------------------------------------------ the state


@dataclass
class _World:
    injected: set[tuple[str, bytes | None]]
    ingress_records: int = 0
    ingress_undecodable: int = 0
    ingress_injected: int = 0
    accepted: set[MessageKey] = field(default_factory=set)
    turn_requests: int = 0
    inbox_counts: Counter[str] = field(default_factory=Counter)
    responses: dict[MessageKey, list[tuple[str, str | None]]] = field(default_factory=dict)
    responses_without_id: int = 0
    deltas: int = 0
    responses_undecodable: int = 0
    # events: (tenant, session) -> seq -> [sha256 of each value carrying that seq, in offset order]
    events: dict[SessionKey, dict[int, list[bytes]]] = field(default_factory=dict)
    events_total: int = 0
    events_undecodable: list[tuple[int, int]] = field(default_factory=list)
    events_injected: int = 0
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    dlq_undecodable: int = 0
    notify_calls: set[str] = field(default_factory=set)
    tool_calls: int = 0
    sessions: set[SessionKey] = field(default_factory=set)


async def verify(
    kafka: KafkaSettings,
    statements: Statements,
    *,
    groups: Mapping[str, str],
    expected_dlq: Collection[InjectedBadRecord],
    expected_messages: Collection[MessageRef] | None = None,
    allow_unexpected_reasons: Collection[str] = (),
    stall_timeout_s: float = 60.0,
    codec: AvroCodec | None = None,
) -> Report:
    """Read the run's topics and Cassandra tables once and check the guarantees.

    ``groups`` maps a service (``ingress``, ``reasoning``, ``tool-exec``, ``checkpoint``) to
    the consumer group id whose lag is checked on that service's input topic.

    Raises:
        VerifyError: a topic stopped advancing before its end offset (or does not exist).
        ValueError: an unknown service name in ``groups``.
    """
    started = time.monotonic()
    unknown = [s for s in groups if s not in GROUP_INPUT_TOPICS]
    if unknown:
        raise ValueError(f"unknown services in groups: {unknown}; known: {sorted(GROUP_INPUT_TOPICS)}")
    codec = codec or default_codec()
    w = _World(injected={(b.topic, b.value) for b in expected_dlq})
    t = kafka.topic

    def on_ingress(r: Any) -> None:
        w.ingress_records += 1
        if (r.topic, r.value) in w.injected:
            w.ingress_injected += 1
        try:
            codec.decode(r.value, "UserMessage")
        except CodecError:
            w.ingress_undecodable += 1

    def on_inbox(r: Any) -> None:
        if (r.topic, r.value) in w.injected:
            return  # an injected bad record: the DLQ check accounts for it
        try:
            d = codec.decode(r.value, ("TurnRequested", "ToolResult", "CancelRequested"))
        except CodecError:
            w.inbox_counts["undecodable"] += 1
            return
        w.inbox_counts[d.name] += 1
        datum = d.datum
        w.sessions.add((datum["tenant_id"], datum["session_id"]))
        if d.name == "TurnRequested":
            w.turn_requests += 1
            w.accepted.add((datum["tenant_id"], datum["session_id"], datum["message_id"]))

    def on_response(r: Any) -> None:
        try:
            d = codec.decode(r.value, ("AgentResponse", "AgentResponseDelta"))
        except CodecError:
            w.responses_undecodable += 1
            return
        if d.name != "AgentResponse":
            w.deltas += 1
            return
        datum = d.datum
        w.sessions.add((datum["tenant_id"], datum["session_id"]))
        if not datum["message_id"]:
            w.responses_without_id += 1  # e.g. ingress rejecting missing_id: nothing to pair it with
            return
        key = (datum["tenant_id"], datum["session_id"], datum["message_id"])
        w.responses.setdefault(key, []).append((datum["kind"], datum.get("reason")))

    def on_event(r: Any) -> None:
        if (r.topic, r.value) in w.injected:
            w.events_injected += 1  # decodable or not, the DLQ check accounts for it
            return
        try:
            d = codec.decode(r.value, "SessionEvent")
        except CodecError:
            w.events_undecodable.append((r.partition, r.offset))
            return
        w.events_total += 1
        datum = d.datum
        session = (datum["tenant_id"], datum["session_id"])
        w.sessions.add(session)
        w.events.setdefault(session, {}).setdefault(int(datum["seq"]), []).append(_sha(r.value))

    def on_dlq(r: Any) -> None:
        try:
            d = codec.decode(r.value, "DeadLetter")
        except CodecError:
            w.dlq_undecodable += 1
            return
        x = d.datum
        w.dead_letters.append(
            {
                "source_topic": x["source_topic"],
                "value": x.get("value"),
                "reason_code": x["reason_code"],
                "reason": x["reason"],
                "service": x["service"],
                "source": f"{x['source_partition']}@{x['source_offset']}",
            }
        )

    def on_tool_call(r: Any) -> None:
        try:
            d = codec.decode(r.value, "ToolCall")
        except CodecError:
            return
        w.tool_calls += 1
        if d.datum["tool"] == "notify":
            w.notify_calls.add(d.datum["idempotency_key"])

    readers: dict[str, Callable[[Any], None]] = {
        "ingress": on_ingress,
        "reasoning.inbox": on_inbox,
        "responses": on_response,
        "events": on_event,
        "dlq": on_dlq,
        "tool.calls": on_tool_call,
    }
    partitions = await _partitions(kafka, [t(name) for name in readers])
    offsets: dict[str, _Offsets] = {}
    for name, handler in readers.items():
        offsets[name] = await _read_topic(
            kafka, t(name), partitions[t(name)], handler, stall_timeout_s=stall_timeout_s
        )

    checks = [
        _check_responses(w, expected_messages),
        await _check_side_effects(w, statements),
        _check_seq(w),
        await _check_cassandra(w, statements),
        _check_dlq(w, expected_dlq, allow_unexpected_reasons),
        await _check_groups(kafka, groups, offsets),
    ]
    totals = {
        "sessions": len(w.sessions),
        "turns": len(w.accepted),
        "responses": sum(len(v) for v in w.responses.values()) + w.responses_without_id,
        "events": w.events_total,
        "dlq_records": len(w.dead_letters),
        "notify_executions": checks[1].counts["executions"],
        "ingress_records": w.ingress_records,
        "ingress_undecodable": w.ingress_undecodable,
        "tool_calls": w.tool_calls,
    }
    return Report(checks=checks, totals=totals, elapsed_s=time.monotonic() - started)


# ------------------------------------------------------------------------ the checks


def _check_responses(w: _World, expected: Collection[MessageRef] | None) -> CheckResult:
    ex = _Examples()
    lost = duplicated = expected_lost = 0
    kinds: Counter[str] = Counter()
    error_reasons: Counter[str] = Counter()
    rejected_after_accept = 0
    for key in w.accepted | w.responses.keys():
        got = w.responses.get(key, [])
        for kind, reason in got:
            kinds[kind] += 1
            if kind != "FINAL":
                error_reasons[f"{kind}:{reason}"] += 1
        if not got:
            lost += 1
            ex.add("lost", tenant=key[0], session=key[1], message_id=key[2])
        elif len(got) > 1:
            duplicated += 1
            ex.add(
                "duplicated", tenant=key[0], session=key[1], message_id=key[2], responses=[k for k, _ in got]
            )
        if key in w.accepted and any(k == "REJECTED" for k, _ in got):
            rejected_after_accept += 1
    if expected is not None:
        for m in expected:
            key = (m.tenant_id, m.session_id, m.message_id)
            if key not in w.responses:
                expected_lost += 1
                ex.add("lost_turn", tenant=key[0], session=key[1], message_id=key[2])
    counts = {
        "messages": len(w.accepted | w.responses.keys()),
        "accepted": len(w.accepted),
        "lost": lost,
        "duplicated": duplicated,
        "lost_turn": expected_lost,
    }
    info: dict[str, Any] = {
        "turn_requests": w.turn_requests,
        "duplicate_turn_requests": w.turn_requests - len(w.accepted),
        "inbox": dict(w.inbox_counts),
        "by_kind": dict(kinds),
        "rejected_after_accept": rejected_after_accept,
        "responses_without_message_id": w.responses_without_id,
        "deltas": w.deltas,
        "undecodable": w.responses_undecodable,
    }
    if expected is not None:
        info["expected_messages"] = len(expected)
    if error_reasons:
        info["not_final"] = dict(error_reasons.most_common(12))
    return CheckResult(ONE_FINAL_RESPONSE, lost == duplicated == expected_lost == 0, counts, ex.take(), info)


async def _check_side_effects(w: _World, statements: Statements) -> CheckResult:
    ex = _Examples()
    rows = await statements.run("SELECT idempotency_key, tenant_id, session_id FROM {ks}.notify_outbox")
    per_key: Counter[str] = Counter()
    out_of_scope = 0
    for r in rows:
        if (r["tenant_id"], r["session_id"]) not in w.sessions and r["idempotency_key"] not in w.notify_calls:
            out_of_scope += 1  # another run's row in a shared keyspace
            continue
        per_key[r["idempotency_key"]] += 1
    dup_keys = {k: n for k, n in per_key.items() if n > 1}
    for k, n in list(dup_keys.items()):
        ex.add("duplicate_execution", idempotency_key=k, executions=n)
    results = await statements.run("SELECT idempotency_key, tool, status FROM {ks}.tool_results")
    ok_keys = {
        r["idempotency_key"]
        for r in results
        if r["tool"] == "notify"
        and r["status"] == "OK"
        and r["idempotency_key"] in per_key.keys() | w.notify_calls
    }
    executions = sum(per_key.values())
    counts = {
        "executions": executions,
        "keys": len(per_key),
        "duplicate_keys": len(dup_keys),
        "extra_executions": executions - len(per_key),
    }
    info = {
        "notify_calls_on_topic": len(w.notify_calls),
        "notify_results_ok": len(ok_keys),
        "executed_without_ok_result": len(per_key.keys() - ok_keys),
        "ok_result_without_execution": len(ok_keys - per_key.keys()),
        "out_of_scope_rows": out_of_scope,
    }
    return CheckResult(SIDE_EFFECTS_AT_MOST_ONCE, not dup_keys, counts, ex.take(), info)


def _check_seq(w: _World) -> CheckResult:
    ex = _Examples()
    gaps = dups = bad_sessions = 0
    for (tenant, session), seqs in w.events.items():
        n = len(seqs)
        top = max(seqs)
        missing = n != top + 1 or min(seqs) != 0
        duplicated = {s: len(v) for s, v in seqs.items() if len(v) > 1}
        if missing:
            gaps += 1
            absent = [s for s in range(top + 1) if s not in seqs][:5]
            ex.add("gap", tenant=tenant, session=session, seqs=n, max_seq=top, missing=absent)
        if duplicated:
            dups += 1
            first = sorted(duplicated)[:5]
            identical = all(len(set(seqs[s])) == 1 for s in first)
            ex.add("duplicate_seq", tenant=tenant, session=session, seqs=first, identical_bytes=identical)
        bad_sessions += missing or bool(duplicated)
    for partition, offset in w.events_undecodable:
        ex.add("undecodable_event", partition=partition, offset=offset)
    counts = {
        "sessions": len(w.events),
        "events": w.events_total,
        "sessions_with_gap": gaps,
        "sessions_with_duplicate_seq": dups,
        "undecodable_events": len(w.events_undecodable),
    }
    info = {"injected_bad_events": w.events_injected}
    ok = bad_sessions == 0 and not w.events_undecodable
    return CheckResult(SEQ_CONTIGUOUS, ok, counts, ex.take(), info)


async def _check_cassandra(w: _World, statements: Statements) -> CheckResult:
    ex = _Examples()
    log = EventLog(statements)
    sem = asyncio.Semaphore(CASSANDRA_CONCURRENCY)
    counts = dict.fromkeys(("rows", "sessions_differing", "missing_rows", "extra_rows", "record_mismatch"), 0)
    counts["sessions"] = len(w.events)

    async def one(key: SessionKey, seqs: dict[int, list[bytes]]) -> None:
        async with sem:
            rows = await log.read(*key)
        counts["rows"] += len(rows)
        stored = {r.seq: _sha(r.record) for r in rows}
        missing = sorted(seqs.keys() - stored.keys())
        extra = sorted(stored.keys() - seqs.keys())
        differ = sorted(s for s in stored.keys() & seqs.keys() if stored[s] != seqs[s][-1])
        counts["missing_rows"] += len(missing)
        counts["extra_rows"] += len(extra)
        counts["record_mismatch"] += len(differ)
        if missing or extra or differ:
            counts["sessions_differing"] += 1
            ex.add(
                "differs",
                tenant=key[0],
                session=key[1],
                missing=missing[:5],
                extra=extra[:5],
                record_mismatch=differ[:5],
            )

    await asyncio.gather(*(one(k, v) for k, v in w.events.items()))
    return CheckResult(CASSANDRA_MATCHES_EVENTS, counts["sessions_differing"] == 0, counts, ex.take())


def _check_dlq(
    w: _World, expected: Collection[InjectedBadRecord], allow_unexpected_reasons: Collection[str]
) -> CheckResult:
    ex = _Examples()
    by_key: dict[tuple[str, bytes | None], list[dict[str, Any]]] = defaultdict(list)
    for dl in w.dead_letters:
        by_key[(dl["source_topic"], dl["value"])].append(dl)
    wanted: Counter[tuple[str, bytes | None]] = Counter((b.topic, b.value) for b in expected)
    reasons: dict[tuple[str, bytes | None], str | None] = {
        (b.topic, b.value): b.expect_reason for b in expected
    }
    missing = mismatch = unexpected = allowed = empty = duplicates = 0
    for key, n in wanted.items():
        got = by_key.get(key, [])
        if len(got) < n:
            missing += n - len(got)
            ex.add("missing", topic=key[0], value=(key[1] or b"")[:32], expect_reason=reasons[key])
        duplicates += max(0, len(got) - n)
        want = reasons[key]
        for dl in got:
            if want is not None and dl["reason_code"] != want:
                mismatch += 1
                ex.add(
                    "reason_mismatch", topic=key[0], expected=want, got=dl["reason_code"], reason=dl["reason"]
                )
    for key, dls in by_key.items():
        if key in wanted:
            continue
        for dl in dls:
            if dl["reason_code"] in allow_unexpected_reasons:
                allowed += 1
                continue
            unexpected += 1
            ex.add(
                "unexpected",
                topic=key[0],
                service=dl["service"],
                reason_code=dl["reason_code"],
                reason=dl["reason"],
                source=dl["source"],
            )
    for dl in w.dead_letters:
        if not dl["reason_code"] or not dl["reason"]:
            empty += 1
            ex.add("empty_reason", topic=dl["source_topic"], service=dl["service"], source=dl["source"])
    counts = {
        "dead_letters": len(w.dead_letters),
        "injected": sum(wanted.values()),
        "missing": missing,
        "unexpected": unexpected,
        "reason_mismatch": mismatch,
        "empty_reason": empty,
        "undecodable": w.dlq_undecodable,
    }
    info = {
        "duplicates": duplicates,
        "allowed_unexpected": allowed,
        "by_reason": dict(Counter(dl["reason_code"] for dl in w.dead_letters)),
    }
    ok = missing == unexpected == mismatch == empty == w.dlq_undecodable == 0
    return CheckResult(DLQ_EXACT, ok, counts, ex.take(), info)


async def _check_groups(
    kafka: KafkaSettings, groups: Mapping[str, str], offsets: Mapping[str, _Offsets]
) -> CheckResult:
    """A group is caught up on a partition when no committed record lies at or past its offset.

    Comparing with the record offsets read (rather than the end offset) accounts for
    transaction markers: a service commits ``last record + 1``, which is the marker's offset.
    """
    ex = _Examples()
    lagging = 0
    total_lag = 0
    checked = 0
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.kafka_bootstrap, request_timeout_ms=kafka.kafka_request_timeout_ms
    )
    await admin.start()
    try:
        for service, group in groups.items():
            logical = GROUP_INPUT_TOPICS[service]
            topic = kafka.topic(logical)
            read = offsets[logical]
            tps = [TopicPartition(topic, p) for p in read.partitions]
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
            for tp in tps:
                checked += 1
                meta = committed.get(tp)
                at = meta.offset if meta is not None else -1
                lag = read.lag(tp.partition, at)
                if lag:
                    lagging += 1
                    total_lag += lag
                    last = read.by_partition[tp.partition][-1]
                    ex.add(
                        "lagging",
                        service=service,
                        group=group,
                        partition=tp.partition,
                        committed=at,
                        last_record=last,
                        lag=lag,
                    )
    finally:
        await admin.close()
    counts = {"groups": len(groups), "partitions": checked, "lagging_partitions": lagging, "lag": total_lag}
    return CheckResult(PARTITIONS_MOVING, lagging == 0, counts, ex.take())
