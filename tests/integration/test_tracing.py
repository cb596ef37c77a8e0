"""One turn, one trace: spans from ingress, reasoning (with the model call), tool-exec and checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentctl import cli
from agentctl.commands import read_history
from agentctl.trace import Span, load_spans, turn_trace_ids
from infra.local.services import ServiceReplicas
from shared.cassandra import Statements
from shared.settings import CassandraSettings, KafkaSettings
from tests.integration.agent_stack import Client, wait_for_value

SERVICES = {"ingress", "reasoning", "tool-exec", "checkpoint"}


async def test_one_turn_is_one_trace_across_the_four_services(
    service_processes: Callable[..., ServiceReplicas],
    topics: KafkaSettings,
    cassandra_settings: CassandraSettings,
    statements: Statements,
    tmp_path: Path,
) -> None:
    service_processes(reasoning=1)
    session = f"traced-{uuid.uuid4().hex[:8]}"
    async with Client(topics) as client:
        text = "what is 2+3 then remember that colour is blue"
        reply = await client.ask("acme", session, text, within_s=90)
    assert reply["kind"] == "FINAL", reply

    async def final_event() -> list[dict[str, Any]]:
        events = await read_history(statements, "acme", session)
        return events if any(e["event_type"] == "RESPONSE_SENT" for e in events) else []

    events = await wait_for_value(final_event)
    assert events, "the checkpoint wrote the turn's events"
    turn, trace_ids = turn_trace_ids(events, None)
    assert turn is not None and len(trace_ids) == 1, trace_ids  # every event of the turn, one trace
    trace_dir = tmp_path / "traces"

    async def spans_of_every_service() -> list[Span]:
        spans = await asyncio.to_thread(load_spans, trace_dir, trace_ids)
        checkpointed = sum(
            int(s.attributes.get("messaging.batch.message_count", 0))
            for s in spans
            if s.name == "checkpoint.append"
        )
        ids = {s.span_id for s in spans}
        whole = sum(s.parent_id not in ids for s in spans) == 1  # every parent exported too
        done = {s.service for s in spans} >= SERVICES and checkpointed >= len(events) and whole
        return spans if done else []

    spans = await wait_for_value(spans_of_every_service) or await asyncio.to_thread(
        load_spans, trace_dir, trace_ids
    )
    assert {s.service for s in spans} >= SERVICES, sorted({s.service for s in spans})
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.parent_id not in by_id]
    assert [r.name for r in roots] == ["ingress.admit"], [(r.name, r.service) for r in roots]

    def named(name: str) -> list[Span]:
        return [s for s in spans if s.name == name]

    handled = named("reasoning.handle")
    records = sorted(str(s.attributes.get("agentbus.record")) for s in handled)
    assert records == ["ToolResult", "ToolResult", "TurnRequested"], records
    model_calls = named("triton.infer")
    assert len(model_calls) == 3  # calculator, kv.put, then the answer
    assert all(by_id[m.parent_id or ""].name == "reasoning.handle" for m in model_calls)
    tools = named("tool.execute")
    assert sorted(str(t.attributes["agentbus.tool"]) for t in tools) == ["calculator", "kv.put"]
    assert all(t.service == "tool-exec" for t in tools)
    assert all(by_id[t.parent_id or ""].name == "reasoning.handle" for t in tools)
    # Each ToolResult continues from the tool-exec span that produced it.
    results = [h for h in handled if h.attributes.get("agentbus.record") == "ToolResult"]
    assert all(by_id[h.parent_id or ""].name == "tool.execute" for h in results)
    # The checkpoint gives the events one reasoning step published (one traceparent) one span.
    appended = named("checkpoint.append")
    assert sum(int(a.attributes["messaging.batch.message_count"]) for a in appended) == len(events)
    assert len(appended) <= len(handled) * 2  # per step and batch, not per event
    assert all(by_id[a.parent_id or ""].name == "reasoning.handle" for a in appended)
    # Cassandra and Redis calls made while handling a record are its children (Redis: ingress;
    # reasoning serves this session from its own memory and writes Redis behind the commit).
    assert {s.attributes.get("db.system") for s in spans} >= {"cassandra", "redis"}
    # Each handled record's wait for its transaction (reasoning) or produce (tool-exec).
    published = [by_id[p.parent_id or ""] for p in named("kafka.publish")]
    assert sorted(p.name for p in published) == sorted(
        ["reasoning.handle"] * len(handled) + ["tool.execute"] * 2
    )

    out = io.StringIO()
    args = cli.build_parser().parse_args(
        [
            "trace",
            "--tenant",
            "acme",
            "--keyspace",
            cassandra_settings.cassandra_keyspace,
            "--trace-dir",
            str(trace_dir),
            session,
        ]
    )
    with contextlib.redirect_stdout(out):
        assert await cli.run(args) == 0
    text = out.getvalue()
    assert trace_ids[0] in text and "[ingress] ingress.admit" in text
    assert "[checkpoint] checkpoint.append" in text
    assert "triton.infer" in text and "tool=calculator" in text


async def test_a_turn_sent_without_the_sampled_flag_keeps_its_trace_id_and_records_no_span(
    service_processes: Callable[..., ServiceReplicas],
    topics: KafkaSettings,
    statements: Statements,
    tmp_path: Path,
) -> None:
    """The services' sampler is parent-based: a client (or the bench) decides which turns are traced."""
    service_processes(reasoning=1)
    quiet, traced = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("unsampled", "sampled"))
    ids = {session: uuid.uuid4().hex for session in (quiet, traced)}
    async with Client(topics) as client:
        for session, flags in ((quiet, "00"), (traced, "01")):
            parent = f"00-{ids[session]}-{uuid.uuid4().hex[:16]}-{flags}".encode()
            text = "what is 2+3"
            reply = await client.ask("acme", session, text, within_s=90, headers=[("traceparent", parent)])
            assert reply["kind"] == "FINAL", reply

    async def both_logged() -> dict[str, list[dict[str, Any]]]:
        logs = {s: await read_history(statements, "acme", s) for s in ids}
        done = all(any(e["event_type"] == "RESPONSE_SENT" for e in log) for log in logs.values())
        return logs if done else {}

    logs = await wait_for_value(both_logged)
    assert logs, "the checkpoint wrote both turns"
    for session, log in logs.items():
        # Sampled or not, every event of the turn carries the client's trace id.
        assert {e["trace_id"] for e in log} == {ids[session]}, session
    trace_dir = tmp_path / "traces"

    async def traced_spans() -> list[Span]:
        spans = await asyncio.to_thread(load_spans, trace_dir, [ids[traced]])
        return spans if {s.service for s in spans} >= SERVICES else []

    assert await wait_for_value(traced_spans), "the sampled turn's spans from every service"
    assert await asyncio.to_thread(load_spans, trace_dir, [ids[quiet]]) == []
