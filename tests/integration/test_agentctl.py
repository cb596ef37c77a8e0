"""agentctl against real Kafka and Cassandra, and the service-replica supervisor with a stand-in service.

The agentbus services are simulated by the test: it reads the UserMessage agentctl
produced from the ingress topic and answers on the responses topic.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from agentctl import cli, commands
from agentctl.commands import AgentClient
from infra.local.services import ReplicaStartError, ServiceReplicas, free_base_port
from infra.local.stack import StackSettings, _proc_start_time
from services.ingress.signing import signature_matches
from shared.avro import default_codec
from shared.cassandra import Statements
from shared.eventlog import EventLog, StoredEvent
from shared.kafka import make_consumer, make_producer
from shared.service import session_key
from shared.settings import CassandraSettings, KafkaSettings

SECRET = "test-secret-of-acme"
codec = default_codec()


async def _read_message(consumer: AIOKafkaConsumer, message_id: str | None) -> tuple[Any, dict[str, Any]]:
    """The first UserMessage on the ingress topic (with ``message_id`` if given), and its datum."""
    async with asyncio.timeout(20):
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    msg = codec.decode(record.value, "UserMessage").datum
                    if message_id is None or msg["message_id"] == message_id:
                        return record, msg


async def _ingress_reader(settings: KafkaSettings) -> AIOKafkaConsumer:
    consumer = make_consumer(
        settings, group_id=None, client_id="test-ingress-reader", topics=[settings.topic("ingress")]
    )
    await consumer.start()
    return consumer


def _response(msg: dict[str, Any], kind: str, text: str, reason: str | None, steps: int) -> bytes:
    return codec.encode(
        "AgentResponse",
        {
            "tenant_id": msg["tenant_id"],
            "session_id": msg["session_id"],
            "message_id": msg["message_id"],
            "turn_id": None if kind == "REJECTED" else "turn-1",
            "kind": kind,
            "text": text,
            "reason": reason,
            "steps": steps,
            "created_at": dt.datetime.now(dt.UTC),
        },
    )


async def _serve_one(
    settings: KafkaSettings, kind: str, reason: str | None, message_id: str | None = None
) -> dict[str, Any]:
    """Play the services for one message: check it, stream two deltas and answer with ``kind``."""
    reader = await _ingress_reader(settings)
    producer = make_producer(settings, client_id="test-services")
    await producer.start()
    try:
        record, msg = await _read_message(reader, message_id)
        key = session_key(msg["tenant_id"], msg["session_id"])
        responses = settings.topic("responses")
        # Someone else's response on the same session comes first: agentctl must skip it.
        other = dict(msg, message_id="someone-else")
        await producer.send_and_wait(responses, _response(other, "FINAL", "not yours", None, 1), key=key)
        if kind == "FINAL":
            for index, delta in enumerate(["The answer ", "is 14."]):
                value = codec.encode(
                    "AgentResponseDelta",
                    {
                        "tenant_id": msg["tenant_id"],
                        "session_id": msg["session_id"],
                        "message_id": msg["message_id"],
                        "turn_id": "turn-1",
                        "index": index,
                        "delta": delta,
                        "created_at": dt.datetime.now(dt.UTC),
                    },
                )
                await producer.send_and_wait(responses, value, key=key)
        text = "The answer is 14." if kind == "FINAL" else "a turn is running"
        await producer.send_and_wait(
            responses, _response(msg, kind, text, reason, 3 if kind == "FINAL" else 0), key=key
        )
        return {"record": record, "message": msg}
    finally:
        await producer.stop()
        await reader.stop()


async def test_send_signs_the_message_and_ends_at_its_final_response(topics: KafkaSettings) -> None:
    out = io.StringIO()
    services = asyncio.create_task(_serve_one(topics, "FINAL", None))
    result = await commands.send(
        topics,
        tenant="acme",
        secret=SECRET,
        session="sess-1",
        text="what is 2+3*4",
        message_id="msg-1",
        timeout_s=30,
        out=out,
    )
    seen = await services
    record, msg = seen["record"], seen["message"]
    # The record on the ingress topic: keyed by session, signed over its exact bytes, traced.
    assert record.key == session_key("acme", "sess-1")
    headers = dict(record.headers)
    assert signature_matches(SECRET, record.value, headers["x-agentbus-signature"])
    assert not signature_matches("another-secret", record.value, headers["x-agentbus-signature"])
    version, trace_id, _span, _flags = headers["traceparent"].decode().split("-")
    assert version == "00" and trace_id == result.trace_id
    assert codec.peek(record.value).version == 2
    assert (msg["tenant_id"], msg["session_id"], msg["message_id"], msg["text"]) == (
        "acme",
        "sess-1",
        "msg-1",
        "what is 2+3*4",
    )
    # The response: the FINAL of msg-1, not the decoy, with the deltas streamed first.
    assert (result.kind, result.text, result.steps, result.exit_code) == ("FINAL", "The answer is 14.", 3, 0)
    assert result.deltas == ["The answer ", "is 14."]
    printed = out.getvalue()
    assert printed.startswith("The answer is 14.\nFINAL: The answer is 14.\n")
    assert "steps=3" in printed and "not yours" not in printed


async def test_send_reports_a_rejection(topics: KafkaSettings) -> None:
    services = asyncio.create_task(_serve_one(topics, "REJECTED", "busy"))
    out = io.StringIO()
    result = await commands.send(
        topics,
        tenant="acme",
        secret=SECRET,
        session="sess-2",
        text="hi",
        policy="reject",
        timeout_s=30,
        out=out,
    )
    seen = await services
    assert seen["message"]["concurrency_policy"] == "REJECT"
    assert (result.kind, result.reason, result.exit_code) == ("REJECTED", "busy", 2)
    assert out.getvalue().startswith("REJECTED (busy): a turn is running")


async def test_send_times_out_without_a_response(topics: KafkaSettings) -> None:
    async with AgentClient(topics, tenant="acme", secret=SECRET) as client:
        result = await client.send("sess-3", "anyone there?", timeout_s=1.5)
    assert (result.kind, result.exit_code) == ("TIMEOUT", 3)
    assert 1.4 < result.latency_s < 5


async def test_one_client_sends_many_messages_in_turn(topics: KafkaSettings) -> None:
    async with AgentClient(topics, tenant="acme", secret=SECRET) as client:
        for n in range(2):
            services = asyncio.create_task(_serve_one(topics, "FINAL", None, message_id=f"m-{n}"))
            result = await client.send("sess-4", f"message {n}", message_id=f"m-{n}", timeout_s=30)
            await services
            assert (result.kind, result.message_id) == ("FINAL", f"m-{n}")


async def test_tail_decodes_dead_letters(topics: KafkaSettings) -> None:
    out = io.StringIO()
    ready = asyncio.Event()
    tail = asyncio.create_task(
        commands.tail(topics, "dlq", max_records=2, idle_timeout=20, out=out, ready=ready)
    )
    await asyncio.wait_for(ready.wait(), 20)
    producer = make_producer(topics, client_id="test-dlq")
    await producer.start()
    try:
        dead = codec.encode(
            "DeadLetter",
            {
                "source_topic": topics.topic("ingress"),
                "source_partition": 1,
                "source_offset": 42,
                "value": b"garbage",
                "reason_code": "bad_magic",
                "reason": "value starts with 6761",
                "service": "ingress",
                "failed_at": dt.datetime.now(dt.UTC),
            },
        )
        await producer.send_and_wait(topics.topic("dlq"), dead, key=b"k")
        await producer.send_and_wait(topics.topic("dlq"), b"not avro", key=b"k")
    finally:
        await producer.stop()
    assert await asyncio.wait_for(tail, 30) == 2
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(
        f"DeadLetter bad_magic: value starts with 6761 (from {topics.topic('ingress')}[1]@42, "
        "service ingress)"
    )
    assert "undecodable (bad_magic)" in lines[1]


def _stored(event: dict[str, Any]) -> StoredEvent:
    return StoredEvent(
        event["tenant_id"],
        event["session_id"],
        event["seq"],
        event["turn_id"],
        event["event_type"],
        codec.encode("SessionEvent", event),
        event["trace_id"],
        event["occurred_at"],
    )


def _session_events(tenant: str, session: str) -> list[dict[str, Any]]:
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0)
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3*4"}}\n</tool_call>'
    payloads: list[tuple[str, dict[str, Any]]] = [
        ("USER_MESSAGE_ACCEPTED", {"message_id": "m-1", "text": "what is 2+3*4"}),
        (
            "MODEL_DECIDED",
            {"raw_output": call, "decision_kind": "TOOL_CALLS", "model": "ref", "latency_ms": 5},
        ),
        (
            "TOOL_CALLED",
            {
                "call_id": "c-1",
                "step": 1,
                "tool": "calculator",
                "arguments_json": '{"expression": "2+3*4"}',
                "idempotency_key": "ab" * 32,
            },
        ),
        (
            "TOOL_RESULT_RECEIVED",
            {"call_id": "c-1", "tool": "calculator", "status": "OK", "output": '{"result": "14"}'},
        ),
        (
            "MODEL_DECIDED",
            {"raw_output": "2+3*4 = 14.", "decision_kind": "ANSWER", "model": "ref", "latency_ms": 2},
        ),
        ("RESPONSE_SENT", {"kind": "FINAL", "text": "2+3*4 = 14.", "reason": None}),
    ]
    return [
        {
            "tenant_id": tenant,
            "session_id": session,
            "seq": seq,
            "turn_id": "turn-1",
            "event_type": kind,
            "payload": payload,
            "trace_id": "cd" * 16,
            "occurred_at": t0 + dt.timedelta(milliseconds=100 * seq),
        }
        for seq, (kind, payload) in enumerate(payloads)
    ]


def _cli_connection(cassandra_settings: CassandraSettings) -> list[str]:
    return [
        "--keyspace",
        cassandra_settings.cassandra_keyspace,
        "--cassandra-port",
        str(cassandra_settings.cassandra_port),
    ]


def test_history_prints_the_stored_events(
    statements: Statements, cassandra_settings: CassandraSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    session = f"s-{uuid.uuid4().hex[:8]}"
    events = _session_events("acme", session)
    asyncio.run(EventLog(statements).append([_stored(e) for e in events]))
    # Another tenant's session of the same id must not show.
    asyncio.run(EventLog(statements).append([_stored(_session_events("other", session)[0])]))

    assert cli.main(["history", "--tenant", "acme", *_cli_connection(cassandra_settings), session]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    assert [line.split()[3] for line in lines[:6]] == [e["event_type"] for e in events]
    assert lines[0].endswith("user: what is 2+3*4")
    assert "model → tool_calls calculator" in lines[1]
    assert lines[3].endswith("tool calculator OK → 14")
    assert lines[5].endswith("response FINAL: 2+3*4 = 14.")
    assert lines[6] == "state: turns answered: 1; active turn: none; queued: 0; last seq: 5"

    assert (
        cli.main(["history", "--json", "--tenant", "acme", *_cli_connection(cassandra_settings), session])
        == 0
    )
    json_lines = capsys.readouterr().out.splitlines()
    assert len(json_lines) == 6 and '"event_type": "TOOL_CALLED"' in json_lines[2]

    assert cli.main(["history", "--tenant", "nobody", *_cli_connection(cassandra_settings), session]) == 0
    assert capsys.readouterr().out.startswith("no events")


def test_sessions_lists_the_tenants_index(
    statements: Statements, cassandra_settings: CassandraSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    for session, status, last_seq in (("s-a", "idle", 5), ("s-b", "running", 12)):
        statements.session.execute(
            f"INSERT INTO {statements.keyspace}.sessions (tenant_id, session_id, status, last_seq,"
            " updated_at) VALUES (%s, %s, %s, %s, %s)",
            (tenant, session, status, last_seq, now),
        )
    assert cli.main(["sessions", "--tenant", tenant, *_cli_connection(cassandra_settings)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["session_id", "status", "last_seq"],
        ["s-a", "idle", "5"],
        ["s-b", "running", "12"],
    ]


# ------------------------------------------------------------------------- replica supervisor

HERE = Path(__file__).resolve().parent


def _supervisor(tmp_path: Path, **env: str) -> ServiceReplicas:
    pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return ServiceReplicas(
        StackSettings(home=str(tmp_path)),
        modules={"fake": "fake_service", "other": "fake_service"},
        base_port=free_base_port(services=2),
        env={"PYTHONPATH": pythonpath, **env},
    )


def _alive(pid: int) -> bool:
    return _proc_start_time(pid) is not None


def test_replicas_start_ready_one_is_killed_and_down_stops_the_rest(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, FAKE_READY_DELAY_S="0.5", FAKE_STOP_DELAY_S="0.3")
    try:
        replicas = sup.start("fake", 2, timeout=30)
        assert [r.index for r in replicas] == [1, 2]
        assert sup.ports("fake") == [sup.base_port + 1, sup.base_port + 2]
        assert all(r.healthy() for r in replicas)
        assert (tmp_path / "run" / "svc-fake-1.pid").exists()
        assert "serving on" in (tmp_path / "logs" / "svc-fake-2.log").read_text()
        sup.start("other", 1, timeout=30)
        assert sup.ports("other") == [sup.base_port + 11]
        pids = sup.pids("fake") + sup.pids("other")
        assert len(pids) == 3

        killed = sup.kill("fake", 1, signal.SIGKILL)
        assert not _alive(killed)
        assert sup.ports("fake") == [sup.base_port + 2]
        assert [(s.index, s.pid is None) for s in sup.status(["fake"])] == [(1, True), (2, False)]

        # A killed replica comes back on its own port.
        sup.restart("fake", 1, timeout=30)
        assert sup.ports("fake") == [sup.base_port + 1, sup.base_port + 2]
        pids = sup.pids("fake") + sup.pids("other")

        outcomes = sup.stop(timeout=10)
        assert outcomes == {"svc-fake-1": "stopped", "svc-fake-2": "stopped", "svc-other-1": "stopped"}
        assert not any(_alive(pid) for pid in pids)
        assert not list((tmp_path / "run").glob("*.pid"))
        assert "fake service: stopped" in (tmp_path / "logs" / "svc-fake-2.log").read_text()
    finally:
        sup.stop(timeout=5)


def test_scaling_down_stops_the_extra_replicas(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    try:
        sup.start("fake", 3, timeout=30)
        extra = sup.replica("fake", 3).running_pid()
        assert extra is not None
        sup.start("fake", 2, timeout=30)
        assert sup.ports("fake") == [sup.base_port + 1, sup.base_port + 2]
        assert not _alive(extra)
    finally:
        sup.stop(timeout=5)


def test_a_replica_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, FAKE_STOP_DELAY_S="30")
    try:
        sup.start("fake", 1, timeout=30)
        pid = sup.pids("fake")[0]
        assert sup.stop("fake", timeout=1) == {"svc-fake-1": "killed after timeout"}
        assert not _alive(pid)
    finally:
        sup.stop(timeout=5)


def test_a_crashing_replica_fails_the_start_with_its_log(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, FAKE_CRASH="1")
    try:
        with pytest.raises(ReplicaStartError, match="exited during start-up") as info:
            sup.start("fake", 1, timeout=30)
        assert "crashing on purpose" in info.value.log_tail
    finally:
        sup.stop(timeout=5)


def test_a_replica_that_never_gets_ready_times_out(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, FAKE_READY_DELAY_S="600")
    try:
        with pytest.raises(ReplicaStartError, match="not ready after 2s"):
            sup.start("fake", 1, timeout=2)
    finally:
        assert sup.stop(timeout=5) == {"svc-fake-1": "stopped"}
