"""The checkpoint service against the real Kafka and Cassandra: log, index, snapshots, DLQ, replay."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from services.checkpoint import main as checkpoint_main
from services.checkpoint.main import run_checkpoint
from services.checkpoint.settings import CheckpointSettings
from shared.avro import default_codec
from shared.cassandra import Statements
from shared.context import SessionState, fold
from shared.eventlog import EventLog
from shared.kafka import make_consumer, make_producer
from shared.service import Probes, session_key
from shared.settings import CassandraSettings, KafkaSettings

T0 = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
GRACE_S = 10.0
codec = default_codec()


def session_event(tenant: str, session: str, seq: int) -> dict[str, Any]:
    """A plausible session history: turns of accepted → decided → tool called → result → response."""
    turn = f"turn-{seq // 5}"
    step = seq % 5
    payload: tuple[str, dict[str, Any]]
    if seq == 120:
        kind, payload = (
            "CONTEXT_SUMMARISED",
            ("agentbus.ContextSummarised", {"summary": "so far", "through_seq": 110}),
        )
    elif step == 0:
        kind, payload = (
            "USER_MESSAGE_ACCEPTED",
            ("agentbus.UserMessageAccepted", {"message_id": f"m{seq}", "text": f"q{seq}"}),
        )
    elif step == 1:
        raw = '{"tool_calls": [{"tool": "calculator"}]}'
        kind, payload = (
            "MODEL_DECIDED",
            (
                "agentbus.ModelDecided",
                {"raw_output": raw, "decision_kind": "TOOL_CALLS", "model": "ref", "latency_ms": 3},
            ),
        )
    elif step == 2:
        kind, payload = (
            "TOOL_CALLED",
            (
                "agentbus.ToolCalled",
                {
                    "call_id": f"c{seq}",
                    "step": 1,
                    "tool": "calculator",
                    "arguments_json": "{}",
                    "idempotency_key": f"k{seq}",
                },
            ),
        )
    elif step == 3:
        kind, payload = (
            "TOOL_RESULT_RECEIVED",
            (
                "agentbus.ToolResultReceived",
                {
                    "call_id": f"c{seq - 1}",
                    "tool": "calculator",
                    "status": "OK",
                    "output": "4",
                    "artifact": None,
                    "error": None,
                },
            ),
        )
    else:
        kind, payload = (
            "RESPONSE_SENT",
            ("agentbus.ResponseSent", {"kind": "FINAL", "text": f"a{seq}", "reason": None}),
        )
    return {
        "tenant_id": tenant,
        "session_id": session,
        "seq": seq,
        "turn_id": turn,
        "event_type": kind,
        "payload": payload,
        "trace_id": TRACE,
        "occurred_at": T0 + dt.timedelta(milliseconds=seq),
    }


def settings_for(topics: KafkaSettings, cassandra: CassandraSettings, **overrides: Any) -> CheckpointSettings:
    options: dict[str, Any] = {
        "topic_prefix": topics.topic_prefix,
        "topic_partitions": 3,
        "cassandra_keyspace": cassandra.cassandra_keyspace,
        "group_id": f"checkpoint-{uuid.uuid4().hex[:8]}",
        "snapshot_every": 100,
        "batch_max_events": 100,
        "shutdown_grace_s": GRACE_S,
    }
    return CheckpointSettings.from_env(**(options | overrides))


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def lag_is_zero() -> bool:
    values = [
        REGISTRY.get_sample_value("agentbus_checkpoint_lag_records", {"partition": str(p)}) for p in range(3)
    ]
    return all(v == 0.0 for v in values)


class Running:
    """run_checkpoint in a task; stop() sets the event and checks the task ends within the grace period."""

    def __init__(self, settings: CheckpointSettings) -> None:
        self.settings = settings
        self.stop_event = asyncio.Event()
        self.probes = Probes()
        self.task = asyncio.create_task(run_checkpoint(settings, self.stop_event, self.probes))

    async def stop(self) -> float:
        started = time.monotonic()
        self.stop_event.set()
        await asyncio.wait_for(self.task, GRACE_S)
        return time.monotonic() - started


async def produce(settings: KafkaSettings, records: list[tuple[bytes, bytes]]) -> None:
    producer = make_producer(settings, client_id="test-checkpoint-producer")
    await producer.start()
    try:
        sends = [await producer.send(settings.topic("events"), value, key=key) for key, value in records]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def produce_session(settings: KafkaSettings, tenant: str, n_events: int) -> None:
    """Session ``s`` of ``tenant``: events 0..n_events-1 on the events topic."""
    encoded = [codec.encode("SessionEvent", session_event(tenant, "s", seq)) for seq in range(n_events)]
    await produce(settings, [(session_key(tenant, "s"), v) for v in encoded])


def writes_fail_while(monkeypatch: pytest.MonkeyPatch, failing: Callable[[], bool]) -> dict[str, int]:
    """Make the checkpoint's Cassandra writes raise while ``failing()``; returns the call count."""
    calls = {"n": 0}
    real_write = checkpoint_main.write_sessions

    async def flaky_write(*args: Any) -> None:
        calls["n"] += 1
        if failing():
            raise ConnectionError("cassandra went away")
        await real_write(*args)

    monkeypatch.setattr(checkpoint_main, "write_sessions", flaky_write)
    monkeypatch.setattr(checkpoint_main, "BACKOFF_START_S", 0.05)
    return calls


async def read_dlq(settings: KafkaSettings, want: int, within_s: float = 15.0) -> list[dict[str, Any]]:
    consumer = make_consumer(settings, group_id=None, client_id="test-dlq-reader")
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic("dlq"), p) for p in range(3)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + within_s
        while len(out) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(codec.decode(r.value, expected="DeadLetter").datum for r in records)
        # Anything more would be a duplicate: give it a moment to show up.
        for records in (await consumer.getmany(timeout_ms=500)).values():
            out.extend(codec.decode(r.value, expected="DeadLetter").datum for r in records)
        return out
    finally:
        await consumer.stop()


async def table_rows(statements: Statements, tenant: str, sessions: list[str]) -> dict[str, Any]:
    """Everything the checkpoint wrote for ``sessions``, comparable between two runs."""
    log = EventLog(statements)
    out: dict[str, Any] = {}
    for s in sessions:
        events = await log.read(tenant, s)
        snaps = await statements.run(
            "SELECT seq, state, summary FROM {ks}.session_snapshots WHERE tenant_id = ? AND session_id = ?",
            (tenant, s),
        )
        index = await statements.run(
            "SELECT status, last_seq, last_turn_id, created_at, updated_at FROM {ks}.sessions "
            "WHERE tenant_id = ? AND session_id = ?",
            (tenant, s),
        )
        out[s] = {"events": events, "snapshots": snaps, "index": index}
    return out


async def test_checkpoint_projects_events_snapshots_and_dead_letters_and_replays_idempotently(
    topics: KafkaSettings, cassandra_settings: CassandraSettings, statements: Statements
) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    sessions = [f"s{i}" for i in range(3)]
    n_events = 250
    datums = {s: [session_event(tenant, s, seq) for seq in range(n_events)] for s in sessions}
    encoded = {s: [codec.encode("SessionEvent", d) for d in datums[s]] for s in sessions}
    wrong_record = codec.encode(
        "CancelRequested",
        {
            "tenant_id": tenant,
            "session_id": "s0",
            "message_id": "m",
            "turn_id": None,
            "reason": "r",
            "requested_at": T0,
        },
    )
    garbage = {
        "s0": [(50, b"\x00not avro at all"), (180, wrong_record)],
        "s1": [(10, b""), (240, encoded["s1"][7][:-4])],
    }
    expected_reasons = Counter({"bad_magic": 1, "unexpected_record": 1, "truncated": 2})
    records: list[tuple[bytes, bytes]] = []
    for seq in range(n_events):  # sessions interleaved, as reasoning would publish them
        for s in sessions:
            records.extend((session_key(tenant, s), bad) for at, bad in garbage.get(s, []) if at == seq)
            records.append((session_key(tenant, s), encoded[s][seq]))
    await produce(topics, records)

    written_before = metric("agentbus_checkpoint_events_written_total")
    snapshots_before = metric("agentbus_checkpoint_snapshots_written_total")
    batch_s_before = metric("agentbus_checkpoint_batch_seconds_sum")
    first = Running(settings_for(topics, cassandra_settings))
    started = time.monotonic()
    log = EventLog(statements)

    async def all_checkpointed() -> bool:
        for s in sessions:
            rows = await statements.run(
                "SELECT last_seq FROM {ks}.sessions WHERE tenant_id = ? AND session_id = ?", (tenant, s)
            )
            if not rows or rows[0]["last_seq"] != n_events - 1:
                return False
        return True

    await wait_for("every session checkpointed", all_checkpointed)
    elapsed = time.monotonic() - started
    await wait_for("lag back to 0", lambda: asyncio.sleep(0, lag_is_zero()))
    assert first.probes.started
    assert await first.probes.run() == {"kafka": True, "cassandra": True}
    written = metric("agentbus_checkpoint_events_written_total") - written_before
    in_batches = metric("agentbus_checkpoint_batch_seconds_sum") - batch_s_before
    print(
        f"\ncheckpointed {written:.0f} events in {elapsed:.2f}s from start (group join included): "
        f"{written / elapsed:.0f} events/s; {written / in_batches:.0f} events/s inside batches"
    )

    for s in sessions:
        events = await log.read(tenant, s)
        assert [e.seq for e in events] == list(range(n_events))  # contiguous, no duplicates
        assert [e.record for e in events] == encoded[s]  # the records exactly as published
        assert events[-1].event_type == "RESPONSE_SENT" and events[-1].trace_id == TRACE
        (index,) = await statements.run(
            "SELECT status, last_seq, last_turn_id FROM {ks}.sessions WHERE tenant_id = ? AND session_id = ?",
            (tenant, s),
        )
        assert index == {"status": "idle", "last_seq": 249, "last_turn_id": "turn-49"}
        snaps = await statements.run(
            "SELECT seq, state, summary FROM {ks}.session_snapshots WHERE tenant_id = ? AND session_id = ?",
            (tenant, s),
        )
        assert [r["seq"] for r in snaps] == [199, 99]  # newest first
        decoded = [codec.decode(v, expected="SessionEvent").datum for v in encoded[s]]
        for snap in snaps:
            expected = fold(tenant, s, decoded[: snap["seq"] + 1])
            assert SessionState.from_json(snap["state"]) == expected
            assert snap["summary"] == expected.summary
        assert snaps[0]["summary"] == "so far"  # seq 120 summarised the context
    assert metric("agentbus_checkpoint_snapshots_written_total") - snapshots_before >= 6

    dead = await read_dlq(topics, want=4)
    assert Counter(d["reason_code"] for d in dead) == expected_reasons
    assert {d["service"] for d in dead} == {"checkpoint"}
    assert all(d["source_topic"] == topics.topic("events") for d in dead)
    assert {d["value"] for d in dead} == {bad for bads in garbage.values() for _, bad in bads}
    stopped_in = await first.stop()
    assert stopped_in < GRACE_S

    # Replay: a new group reads everything again and leaves exactly the same rows.
    before = await table_rows(statements, tenant, sessions)
    written_before = metric("agentbus_checkpoint_events_written_total")
    second = Running(settings_for(topics, cassandra_settings))

    async def replayed() -> bool:
        done = metric("agentbus_checkpoint_events_written_total") - written_before >= len(sessions) * n_events
        return done and lag_is_zero()

    await wait_for("the replay", replayed)
    await second.stop()
    after = await table_rows(statements, tenant, sessions)
    for s in sessions:
        assert after[s]["events"] == before[s]["events"]
        assert [(r["seq"], r["state"], r["summary"]) for r in after[s]["snapshots"]] == [
            (r["seq"], r["state"], r["summary"]) for r in before[s]["snapshots"]
        ]
        # Not even updated_at moved: the replay wrote the same cells at the same seq timestamps.
        assert after[s]["index"] == before[s]["index"]


async def test_a_failing_cassandra_write_is_retried_never_skipped(
    topics: KafkaSettings,
    cassandra_settings: CassandraSettings,
    statements: Statements,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    n_events = 60
    await produce_session(topics, tenant, n_events)
    failures = {"left": 3}

    def three_times() -> bool:
        failures["left"] -= 1
        return failures["left"] >= 0

    writes_fail_while(monkeypatch, three_times)
    failed_before = metric("agentbus_checkpoint_batch_failures_total", {"stage": "events"})
    running = Running(settings_for(topics, cassandra_settings, batch_max_events=25, snapshot_every=50))
    log = EventLog(statements)

    async def complete() -> bool:
        return len(await log.read(tenant, "s")) == n_events and lag_is_zero()

    await wait_for("the log after retries", complete)
    await running.stop()
    assert failures["left"] < 0  # failed three times, then wrote
    assert metric("agentbus_checkpoint_batch_failures_total", {"stage": "events"}) - failed_before == 3
    assert [e.seq for e in await log.read(tenant, "s")] == list(range(n_events))
    snaps = await statements.run(
        "SELECT seq FROM {ks}.session_snapshots WHERE tenant_id = ? AND session_id = ?", (tenant, "s")
    )
    assert [r["seq"] for r in snaps] == [49]


async def test_the_session_index_only_moves_forward_without_lwt(statements: Statements) -> None:
    from services.checkpoint.handlers import SessionProgress, advance_session

    tenant, session = f"tenant-{uuid.uuid4().hex[:8]}", "s"
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    # A row as the earlier version wrote it: ordinary (wall-clock) write timestamps.
    await statements.run(
        "INSERT INTO {ks}.sessions (tenant_id, session_id, status, last_seq, last_turn_id, created_at,"
        " updated_at) VALUES (?, ?, 'running', 3, 't0', ?, ?)",
        (tenant, session, t0, t0),
    )

    def progress(first: int, last: int, turn: str, status: str) -> SessionProgress:
        at = t0 + dt.timedelta(seconds=last)
        return SessionProgress(tenant, session, first, last, turn, status, last_at=at, first_at=None)

    async def index() -> dict[str, Any]:
        rows = await statements.run(
            "SELECT status, last_seq, last_turn_id, updated_at FROM {ks}.sessions"
            " WHERE tenant_id = ? AND session_id = ?",
            (tenant, session),
        )
        return rows[0]

    now = dt.datetime.now(dt.UTC)
    await advance_session(statements, progress(4, 9, "t1", "idle"), now)
    assert (await index())["last_seq"] == 9  # overtakes the old row
    await advance_session(statements, progress(4, 7, "t1", "running"), now)  # a late, older batch
    row = await index()
    assert (row["last_seq"], row["status"], row["last_turn_id"]) == (9, "idle", "t1")
    await advance_session(statements, progress(10, 12, "t2", "running"), now)
    row = await index()
    assert (row["last_seq"], row["status"], row["last_turn_id"]) == (12, "running", "t2")
    assert row["updated_at"].replace(tzinfo=dt.UTC) == t0 + dt.timedelta(seconds=12)


async def test_offsets_are_committed_only_once_written_and_then_without_waiting_for_the_interval(
    topics: KafkaSettings,
    cassandra_settings: CassandraSettings,
    statements: Statements,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    n_events = 30
    await produce_session(topics, tenant, n_events)
    parts = [TopicPartition(topics.topic("events"), p) for p in range(3)]
    down = {"on": True}
    calls = writes_fail_while(monkeypatch, lambda: down["on"])
    # An interval far longer than the test: the commit it sees is the one made on going idle.
    settings = settings_for(topics, cassandra_settings, commit_interval_ms=600_000)
    admin = AIOKafkaAdminClient(bootstrap_servers=topics.kafka_bootstrap)
    await admin.start()
    consumer = make_consumer(topics, group_id=None, client_id="test-checkpoint-ends")
    await consumer.start()

    async def committed_to_the_end() -> bool:
        ends = await consumer.end_offsets(parts)
        offsets = await admin.list_consumer_group_offsets(settings.group_id, partitions=parts)
        return all(max(0, meta.offset if (meta := offsets.get(tp)) else 0) == ends[tp] for tp in parts)

    running = Running(settings)
    try:
        await wait_for("failing writes", lambda: asyncio.sleep(0, calls["n"] >= 3))
        offsets = await admin.list_consumer_group_offsets(settings.group_id, partitions=parts)
        assert all(meta is None or meta.offset <= 0 for meta in offsets.values()), offsets  # none written
        down["on"] = False
        await wait_for("the commit on going idle", committed_to_the_end)
        assert [e.seq for e in await EventLog(statements).read(tenant, "s")] == list(range(n_events))
    finally:
        await running.stop()
        await consumer.stop()
        await admin.close()
