"""What agentctl does, as importable functions (``agentctl.cli`` only parses arguments).

- :class:`AgentClient` sends signed ``UserMessage``s to ``<prefix>.ingress`` and follows
  ``<prefix>.responses`` until the ``AgentResponse`` of that message (``send``);
- :func:`read_history` / :func:`format_event` / :func:`history_lines` read and render a
  session's event log from Cassandra (``history``);
- :func:`list_sessions` reads a tenant's session index (``sessions``);
- :func:`tail` decodes and prints the records of any topic (``tail``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared.avro import AvroCodec, CodecError, default_codec
from shared.cassandra import Statements
from shared.context import SessionState, fold
from shared.eventlog import EventLog
from shared.kafka import make_consumer, make_producer
from shared.service import session_key
from shared.settings import KafkaSettings, Settings, setting

__all__ = [
    "EXIT_CODES",
    "EXIT_TIMEOUT",
    "POLICIES",
    "TOPIC_CHOICES",
    "AgentClient",
    "AgentctlSettings",
    "SendResult",
    "build_user_message",
    "format_event",
    "format_record",
    "format_state",
    "history_lines",
    "list_sessions",
    "new_traceparent",
    "read_history",
    "sign_value",
    "tail",
]

SIGNATURE_HEADER = "x-agentbus-signature"
POLICIES = ("queue", "reject", "interrupt")
TOPIC_CHOICES = ("responses", "events", "dlq", "tool.calls", "reasoning.inbox", "ingress")
EXIT_CODES = {"FINAL": 0, "ERROR": 1, "REJECTED": 2}
EXIT_TIMEOUT = 3


@dataclass(frozen=True)
class AgentctlSettings(Settings):
    """Who agentctl speaks for; command-line flags override these."""

    tenant: str = setting("AGENTBUS_TENANT", "", "Tenant agentctl acts for (send, history, sessions)")
    tenant_secret: str = setting(
        "AGENTBUS_TENANT_SECRET", "", "The tenant's secret: agentctl signs ingress records with it"
    )
    timeout_s: float = setting("AGENTBUS_AGENTCTL_TIMEOUT_S", 60.0, "How long `send` waits for the response")


# --------------------------------------------------------------------------- send


def new_traceparent() -> tuple[str, str]:
    """A W3C ``traceparent`` with a random trace id (sampled), and that trace id."""
    trace_id = secrets.token_hex(16)
    span_id = secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id


def sign_value(secret: str, value: bytes) -> str:
    """The tenant signature of a record value (hex HMAC-SHA256), as ingress checks it."""
    from services.ingress.signing import sign  # lazily: the ingress service owns the scheme

    return sign(secret, value)


def build_user_message(
    tenant: str,
    session: str,
    text: str,
    *,
    message_id: str | None = None,
    policy: str | None = None,
    metadata: dict[str, str] | None = None,
    sent_at: dt.datetime | None = None,
) -> dict[str, Any]:
    """A ``UserMessage`` datum (newest schema version); ``policy`` is queue, reject, interrupt or None."""
    if policy is not None and policy.lower() not in POLICIES:
        raise ValueError(f"unknown concurrency policy {policy!r}; one of {', '.join(POLICIES)}")
    return {
        "tenant_id": tenant,
        "session_id": session,
        "message_id": message_id or uuid.uuid4().hex,
        "text": text,
        "sent_at": sent_at or dt.datetime.now(dt.UTC),
        "concurrency_policy": policy.upper() if policy else None,
        "metadata": dict(metadata or {}),
    }


@dataclass
class SendResult:
    """How a message ended: its response (or a timeout), streamed deltas and timings."""

    message_id: str
    trace_id: str
    kind: str  # FINAL, ERROR, REJECTED, or TIMEOUT
    text: str = ""
    reason: str | None = None
    steps: int = 0
    turn_id: str | None = None
    deltas: list[str] = field(default_factory=list)
    latency_s: float = 0.0  # produce acknowledged -> response read
    first_delta_s: float | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.kind, EXIT_TIMEOUT if self.kind == "TIMEOUT" else 1)


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic`` (waits for its metadata)."""
    partitions = await consumer._client._wait_on_metadata(topic)
    return [TopicPartition(topic, p) for p in sorted(partitions)]


class AgentClient:
    """A client of one tenant: signed sends to ingress, responses followed on ``responses``.

    The responses consumer is positioned at the end of every partition when the client
    starts, before anything is produced, so no response can slip past; one client may send
    many messages in turn (``async with AgentClient(...) as client``).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        tenant: str,
        secret: str | None,
        codec: AvroCodec | None = None,
        client_id: str | None = None,
    ) -> None:
        self.kafka = kafka
        self.tenant = tenant
        self.secret = secret or None
        self.codec = codec or default_codec()
        self.client_id = client_id or f"agentctl-{os.getpid()}"
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = make_consumer(self.kafka, group_id=None, client_id=f"{self.client_id}-responses")
        await consumer.start()
        self._consumer = consumer
        tps = await topic_partitions(consumer, self.kafka.topic("responses"))
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, before anything is produced
            await consumer.position(tp)
        producer = make_producer(self.kafka, client_id=f"{self.client_id}-ingress")
        await producer.start()
        self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def __aenter__(self) -> AgentClient:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def encode(self, datum: dict[str, Any], traceparent: str) -> tuple[bytes, list[tuple[str, bytes]]]:
        """The record value and headers of a UserMessage: signed when the client has a secret."""
        value = self.codec.encode("UserMessage", datum)
        headers = [("traceparent", traceparent.encode())]
        if self.secret is not None:
            headers.insert(0, (SIGNATURE_HEADER, sign_value(self.secret, value).encode()))
        return value, headers

    async def produce(self, datum: dict[str, Any]) -> str:
        """Produce a UserMessage datum to ingress (acknowledged by all replicas); returns its trace id."""
        if self._producer is None:
            raise RuntimeError("AgentClient is not started")
        traceparent, trace_id = new_traceparent()
        value, headers = self.encode(datum, traceparent)
        await self._producer.send_and_wait(
            self.kafka.topic("ingress"),
            value,
            key=session_key(datum["tenant_id"], datum["session_id"]),
            headers=headers,
        )
        return trace_id

    async def send(
        self,
        session: str,
        text: str,
        *,
        message_id: str | None = None,
        policy: str | None = None,
        timeout_s: float = 60.0,
        on_delta: Callable[[str], None] | None = None,
    ) -> SendResult:
        """Send ``text`` to ``session`` and wait for its AgentResponse (or ``timeout_s`` seconds)."""
        datum = build_user_message(self.tenant, session, text, message_id=message_id, policy=policy)
        trace_id = await self.produce(datum)
        started = time.monotonic()
        result = SendResult(message_id=datum["message_id"], trace_id=trace_id, kind="TIMEOUT")
        response = await self.wait_for(session, datum["message_id"], result, timeout_s, on_delta, started)
        result.latency_s = time.monotonic() - started
        if response is not None:
            result.kind = str(response["kind"])
            result.text = response["text"]
            result.reason = response["reason"]
            result.steps = int(response["steps"])
            result.turn_id = response["turn_id"]
        return result

    async def wait_for(
        self,
        session: str,
        message_id: str,
        result: SendResult,
        timeout_s: float,
        on_delta: Callable[[str], None] | None = None,
        started: float | None = None,
    ) -> dict[str, Any] | None:
        """Read responses until the AgentResponse of ``message_id``; deltas go to ``on_delta``."""
        if self._consumer is None:
            raise RuntimeError("AgentClient is not started")
        started = time.monotonic() if started is None else started
        deadline = started + timeout_s
        seen: set[int] = set()
        while (left := deadline - time.monotonic()) > 0:
            batches = await self._consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000) + 1)
            for records in batches.values():
                for record in records:
                    try:
                        decoded = self.codec.decode(record.value, ("AgentResponse", "AgentResponseDelta"))
                    except CodecError:
                        continue  # not ours to judge: operators see it with `agentctl tail`
                    d = decoded.datum
                    if (d["tenant_id"], d["session_id"], d["message_id"]) != (
                        self.tenant,
                        session,
                        message_id,
                    ):
                        continue
                    if decoded.name == "AgentResponse":
                        return d
                    if d["index"] in seen:
                        continue  # a delta published twice (a retried step)
                    seen.add(d["index"])
                    if result.first_delta_s is None:
                        result.first_delta_s = time.monotonic() - started
                    result.deltas.append(d["delta"])
                    if on_delta is not None:
                        on_delta(d["delta"])
        return None


def print_result(result: SendResult, out: TextIO = sys.stdout) -> None:
    """Print how a send ended: kind, text, reason, steps."""
    if result.kind == "TIMEOUT":
        print(f"TIMEOUT: no response to message {result.message_id} (trace {result.trace_id})", file=out)
        return
    reason = f" ({result.reason})" if result.reason else ""
    print(f"{result.kind}{reason}: {result.text}", file=out)
    print(
        f"  steps={result.steps} turn={result.turn_id} message={result.message_id} "
        f"trace={result.trace_id} latency={result.latency_s * 1000:.0f}ms",
        file=out,
    )


async def send(
    kafka: KafkaSettings,
    *,
    tenant: str,
    secret: str | None,
    session: str,
    text: str,
    message_id: str | None = None,
    policy: str | None = None,
    timeout_s: float = 60.0,
    out: TextIO = sys.stdout,
) -> SendResult:
    """``agentctl send``: one message, deltas printed as they come, then the response."""
    streamed = False

    def on_delta(delta: str) -> None:
        nonlocal streamed
        streamed = True
        print(delta, end="", file=out, flush=True)

    async with AgentClient(kafka, tenant=tenant, secret=secret) as client:
        result = await client.send(
            session, text, message_id=message_id, policy=policy, timeout_s=timeout_s, on_delta=on_delta
        )
    if streamed:
        print(file=out)
    print_result(result, out)
    return result


# --------------------------------------------------------------------------- history

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _short(text: str, limit: int = 100) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _tool_names(raw_output: str) -> list[str]:
    names = []
    for block in _TOOL_CALL.findall(raw_output):
        try:
            call = json.loads(block)
        except ValueError:
            names.append("?")
            continue
        names.append(str(call.get("name", "?")) if isinstance(call, dict) else "?")
    return names


def _tool_output(output: str | None) -> str:
    """A tool output (JSON text) in a few words: its ``result``/``value`` if it has one."""
    if output is None:
        return ""
    try:
        value = json.loads(output)
    except ValueError:
        return _short(output, 80)
    if isinstance(value, dict):
        for key in ("result", "value"):
            if key in value:
                inner = value[key]
                return _short(inner if isinstance(inner, str) else json.dumps(inner, ensure_ascii=False), 80)
    return _short(json.dumps(value, ensure_ascii=False, separators=(",", ":")), 80)


def summarise_event(event: dict[str, Any]) -> str:
    """The human summary of one decoded SessionEvent (the last column of ``history``)."""
    kind = event["event_type"]
    p = event["payload"] or {}
    if kind == "USER_MESSAGE_ACCEPTED":
        return f"user: {_short(p['text'])}"
    if kind == "MODEL_DECIDED":
        took = f" ({p['latency_ms']} ms)"
        if p["decision_kind"] == "TOOL_CALLS":
            return f"model → tool_calls {', '.join(_tool_names(p['raw_output'])) or '?'}{took}"
        if p["decision_kind"] == "ANSWER":
            return f"model → answer: {_short(p['raw_output'], 80)}{took}"
        return f"model → malformed: {_short(p['raw_output'], 60)}{took}"
    if kind == "TOOL_CALLED":
        return f"call {p['tool']} {_short(p['arguments_json'], 80)} [{p['call_id']}]"
    if kind == "TOOL_RESULT_RECEIVED":
        if p.get("artifact"):
            a = p["artifact"]
            detail = f"artifact {a['artifact_id']} ({a['size_bytes']} bytes)"
        elif p.get("error"):
            detail = _short(p["error"], 80)
        else:
            detail = _tool_output(p.get("output"))
        return f"tool {p['tool']} {p['status']} → {detail}"
    if kind == "RESPONSE_SENT":
        reason = f" ({p['reason']})" if p.get("reason") else ""
        return f"response {p['kind']}{reason}: {_short(p['text'])}"
    if kind == "TURN_CANCELLED":
        return f"turn cancelled: {p['reason']}"
    if kind == "CONTEXT_SUMMARISED":
        return f"context summarised through seq {p['through_seq']}: {_short(p['summary'], 60)}"
    return "(an event type this agentctl does not know)"


def _time(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%H:%M:%S.%f")[:-3]
    return str(value)


def format_event(event: dict[str, Any]) -> str:
    """``seq  time  turn  EVENT_TYPE  summary`` for one decoded SessionEvent."""
    return (
        f"{event['seq']:>5}  {_time(event['occurred_at'])}  {_short(event['turn_id'], 12):<12}  "
        f"{event['event_type']:<20}  {summarise_event(event)}"
    )


def format_state(state: SessionState) -> str:
    """The folded state of a session in one line."""
    if state.active is None:
        active = "none"
    else:
        a = state.active
        pending = f", waiting for {', '.join(sorted(a.pending_calls.values()))}" if a.pending_calls else ""
        active = f"{a.turn_id} (steps {a.steps}{pending})"
    return (
        f"turns answered: {state.answered}; active turn: {active}; queued: {len(state.queued)}; "
        f"last seq: {state.seq}"
    )


def history_lines(tenant: str, session: str, events: Sequence[dict[str, Any]]) -> list[str]:
    """Every line ``agentctl history`` prints: one per event, then the folded state."""
    lines = [format_event(e) for e in events]
    try:
        state = fold(tenant, session, list(events))
    except ValueError as exc:  # a gap or a duplicate in the log
        lines.append(f"state: cannot fold the log: {exc}")
    else:
        lines.append(f"state: {format_state(state)}")
    return lines


async def read_history(
    statements: Statements, tenant: str, session: str, codec: AvroCodec | None = None
) -> list[dict[str, Any]]:
    """The session's events from Cassandra, decoded, in seq order (undecodable rows are described)."""
    codec = codec or default_codec()
    out: list[dict[str, Any]] = []
    for stored in await EventLog(statements).read(tenant, session):
        try:
            out.append(codec.decode(stored.record, "SessionEvent").datum)
        except CodecError as exc:
            out.append(
                {
                    "tenant_id": tenant,
                    "session_id": session,
                    "seq": stored.seq,
                    "turn_id": stored.turn_id,
                    "event_type": "UNDECODABLE",
                    "payload": {"error": str(exc)},
                    "trace_id": stored.trace_id,
                    "occurred_at": stored.occurred_at,
                }
            )
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def to_json(datum: dict[str, Any]) -> str:
    """A decoded record as one JSON line (timestamps ISO 8601, bytes hex)."""
    return json.dumps(datum, default=_json_default, ensure_ascii=False)


# --------------------------------------------------------------------------- sessions

_SESSIONS = "SELECT session_id, status, last_seq, updated_at FROM {ks}.sessions WHERE tenant_id = ?"


async def list_sessions(statements: Statements, tenant: str) -> list[dict[str, Any]]:
    """The tenant's rows of the session index: session_id, status, last_seq, updated_at."""
    return await statements.run(_SESSIONS, (tenant,))


def session_lines(rows: Iterable[dict[str, Any]]) -> list[str]:
    rows = list(rows)
    width = max([len("session_id"), *(len(r["session_id"]) for r in rows)])
    lines = [f"{'session_id':<{width}}  {'status':<10}  {'last_seq':>8}  updated_at"]
    for r in rows:
        updated = r["updated_at"].isoformat(sep=" ", timespec="seconds") if r["updated_at"] else "-"
        last_seq = "-" if r["last_seq"] is None else str(r["last_seq"])
        lines.append(f"{r['session_id']:<{width}}  {r['status'] or '-':<10}  {last_seq:>8}  {updated}")
    return lines


# --------------------------------------------------------------------------- tail


def format_record(name: str, d: dict[str, Any]) -> str:
    """One decoded record of any agentbus topic, in a line."""
    who = f"{d.get('tenant_id', '?')}/{d.get('session_id', '?')}"
    if name == "DeadLetter":
        return (
            f"DeadLetter {d['reason_code']}: {_short(d['reason'], 160)} "
            f"(from {d['source_topic']}[{d['source_partition']}]@{d['source_offset']}, "
            f"service {d['service']}{', ' + d['error_type'] if d.get('error_type') else ''})"
        )
    if name == "AgentResponse":
        reason = f" ({d['reason']})" if d.get("reason") else ""
        return (
            f"AgentResponse {who} {d['message_id']} {d['kind']}{reason} steps={d['steps']}: "
            f"{_short(d['text'], 160)}"
        )
    if name == "AgentResponseDelta":
        return f"AgentResponseDelta {who} {d['message_id']} #{d['index']}: {d['delta']!r}"
    if name == "SessionEvent":
        return f"SessionEvent {who} {format_event(d)}"
    if name in ("UserMessage", "TurnRequested"):
        policy = d.get("concurrency_policy") or "default"
        return f"{name} {who} {d['message_id']} [{policy}]: {_short(d['text'], 120)}"
    if name == "ToolCall":
        return (
            f"ToolCall {who} turn={d['turn_id']} step={d['step']} {d['tool']} "
            f"{_short(d['arguments_json'], 100)} [{d['call_id']}]"
        )
    if name == "ToolResult":
        detail = _short(d["error"], 100) if d.get("error") else _tool_output(d.get("output"))
        return (
            f"ToolResult {who} turn={d['turn_id']} step={d['step']} {d['tool']} {d['status']} → {detail} "
            f"(attempts {d['attempts']})"
        )
    if name == "CancelRequested":
        return f"CancelRequested {who} {d['message_id']} turn={d.get('turn_id')}: {d['reason']}"
    return f"{name} {_short(to_json(d), 200)}"


async def tail(
    kafka: KafkaSettings,
    topic: str,
    *,
    from_beginning: bool = False,
    max_records: int | None = None,
    idle_timeout: float | None = None,
    as_json: bool = False,
    codec: AvroCodec | None = None,
    out: TextIO = sys.stdout,
    ready: asyncio.Event | None = None,
) -> int:
    """Print the records of ``<prefix>.<topic>`` as they arrive; returns how many were printed.

    Ends after ``max_records``, or when nothing arrived for ``idle_timeout`` seconds.
    ``ready`` is set once the consumer is positioned (records produced afterwards are seen).
    """
    codec = codec or default_codec()
    full = kafka.topic(topic)
    consumer = make_consumer(kafka, group_id=None, client_id=f"agentctl-tail-{os.getpid()}")
    await consumer.start()
    printed = 0
    try:
        tps = await topic_partitions(consumer, full)
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        if ready is not None:
            ready.set()
        last = time.monotonic()
        while max_records is None or printed < max_records:
            if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                break
            batches = await consumer.getmany(timeout_ms=500)
            records = sorted(
                (r for rs in batches.values() for r in rs), key=lambda r: (r.timestamp, r.partition, r.offset)
            )
            for record in records:
                if max_records is not None and printed >= max_records:
                    break
                last = time.monotonic()
                where = f"{record.partition}:{record.offset}"
                try:
                    decoded = codec.decode(record.value)
                except CodecError as exc:
                    line = f"{where}  undecodable ({exc.reason_code}): {exc}"
                else:
                    if as_json:
                        line = to_json({"record": decoded.name, **decoded.datum})
                    else:
                        line = f"{where}  {format_record(decoded.name, decoded.datum)}"
                print(line, file=out, flush=True)
                printed += 1
    finally:
        await consumer.stop()
    return printed
