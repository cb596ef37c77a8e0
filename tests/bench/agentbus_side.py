"""agentbus under the bench workload: the four services as real processes on the local servers.

A run gets its own topics (fresh prefix) and keyspace, starts the services with the
project's supervisor (``infra.local.services``), sends the workload's turns as signed
UserMessages and times each turn from send to final AgentResponse. Each turn is sent
with its own W3C ``traceparent``, so the services' spans of that turn share a known
trace id: the time inside the model (``triton.infer`` spans in reasoning) and inside the
tool (``tool sleep`` spans in tool-exec) come from them, measured where they happen,
and the rest of the turn is orchestration (Kafka hops and transactions, Cassandra and
Redis, prompt building): :class:`tests.bench.peers.common.TurnTiming`, the same split
the peers report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.partitioner import DefaultPartitioner

from infra.local.services import ServiceReplicas, free_base_port
from infra.local.stack import StackSettings
from shared.cassandra import Statements, connect
from shared.migrations import apply_migrations
from shared.service import session_key
from shared.settings import CassandraSettings, KafkaSettings
from shared.topics import ensure_topics
from tests.bench.peers.common import MemorySampler, PeerResult, TurnTiming, Workload, summarize
from tests.integration.agent_stack import SECRETS, Client
from tests.scratch import delete_topics, drop_keyspace

SERVICES = ("ingress", "reasoning", "tool-exec", "checkpoint")


@dataclass(frozen=True)
class Deployment:
    """How many replicas of each service, and the knobs the bench turns."""

    reasoning: int = 1
    tool_exec: int = 1
    ingress: int = 1
    checkpoint: int = 1
    model_latency_ms: float = 0.0
    max_inflight_model_calls: int = 64
    tool_slots: int = 64
    partitions: int = 12
    # Session ids spread evenly over the partitions (the same number of sessions on each):
    # with a hundred random keys over 12 partitions, one replica of two can get a fifth more
    # sessions than the other, and a run lasts until the busier one is done.
    even_keys: bool = False
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {
            "ingress": self.ingress,
            "reasoning": self.reasoning,
            "tool-exec": self.tool_exec,
            "checkpoint": self.checkpoint,
        }


@dataclass
class Running:
    sup: ServiceReplicas
    kafka: KafkaSettings
    statements: Statements
    trace_dir: Path

    def pids(self, name: str) -> list[int]:
        return self.sup.pids(name)


@contextlib.asynccontextmanager
async def deployed(deployment: Deployment, home: Path) -> AsyncIterator[Running]:
    """Fresh topics and keyspace, the services started and ready; stopped and cleaned up after."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings.from_env(topic_prefix=prefix, topic_partitions=deployment.partitions)
    await ensure_topics(kafka)
    cassandra = CassandraSettings.from_env(cassandra_keyspace=f"bench_{uuid.uuid4().hex[:10]}")
    cluster, session = await asyncio.to_thread(connect, cassandra, keyspace="")
    trace_dir = home / "traces"
    try:
        await asyncio.to_thread(apply_migrations, session, cassandra)
        env = {
            "AGENTBUS_TOPIC_PREFIX": prefix,
            "AGENTBUS_TOPIC_PARTITIONS": str(deployment.partitions),
            "AGENTBUS_CASSANDRA_KEYSPACE": cassandra.cassandra_keyspace,
            "AGENTBUS_TENANT_SECRETS": json.dumps(SECRETS),
            "AGENTBUS_INGRESS_GROUP": f"{prefix}-ingress",
            "AGENTBUS_REASONING_GROUP": f"{prefix}-reasoning",
            "AGENTBUS_TOOL_EXEC_GROUP": f"{prefix}-tool-exec",
            "AGENTBUS_CHECKPOINT_GROUP": f"{prefix}-checkpoint",
            "AGENTBUS_TENANT_RATE_PER_S": "1000000",
            "AGENTBUS_TENANT_BURST": "1000000",
            "AGENTBUS_MODEL_RATE_PER_S": "1000000",
            "AGENTBUS_MODEL_BURST": "1000000",
            "AGENTBUS_MAX_INFLIGHT_MODEL_CALLS": str(deployment.max_inflight_model_calls),
            "AGENTBUS_TOOL_SLOTS": str(deployment.tool_slots),
            "AGENTBUS_TRITON_SAMPLING": json.dumps({"latency_ms": deployment.model_latency_ms}),
            "AGENTBUS_TURN_DEADLINE_S": "900",
            "AGENTBUS_LOG_LEVEL": "WARNING",
            "AGENTBUS_TRACE_DIR": str(trace_dir),
            "OTEL_BSP_SCHEDULE_DELAY": "500",
            "OTEL_BSP_MAX_QUEUE_SIZE": "200000",
            **deployment.extra_env,
        }
        sup = ServiceReplicas(StackSettings(home=str(home)), base_port=free_base_port(), env=env)
        try:
            for name, n in deployment.counts().items():
                await asyncio.to_thread(sup.start, name, n, wait=False)
            for name in deployment.counts():
                await asyncio.to_thread(sup.wait_ready, sup.known(name), timeout=120)
            yield Running(sup, kafka, Statements(session, cassandra.cassandra_keyspace), trace_dir)
        finally:
            for name in SERVICES:
                await asyncio.to_thread(sup.stop, name, timeout=30)
    finally:
        await asyncio.to_thread(drop_keyspace, session, cassandra.cassandra_keyspace)
        await asyncio.to_thread(cluster.shutdown)
        await delete_topics(kafka, (prefix + ".",))


@dataclass
class TurnRun:
    """What the client saw of one turn."""

    trace_id: str
    started: float
    finished: float
    answer: str
    sampled: bool = True
    """Sent with the W3C sampled flag: the services recorded its spans."""


@dataclass
class RunOutcome:
    turns: list[TurnRun]
    wall_s: float
    peak_in_flight: int
    memory: dict[str, float]  # service -> peak RSS MiB of one replica (the largest)


async def run_workload(
    running: Running,
    workload: Workload,
    *,
    progress: Callable[[int, int], None] | None = None,
    within_s: float = 600.0,
    even_partitions: int = 0,
    trace_every: int = 1,
) -> RunOutcome:
    """Send the workload's turns (``concurrency`` in flight), wait for every final answer.

    ``even_partitions`` > 0: session i lands on partition i mod ``even_partitions``.
    ``trace_every`` > 1: only turn 0, n, 2n, ... carries the sampled flag in its
    ``traceparent``; the services' parent-based sampler records no spans for the others
    (every turn is still one trace id end to end), as a deployment under load samples.
    """
    text = workload.user_text()
    turns: list[TurnRun] = []
    in_flight = 0
    peak = 0
    gate = asyncio.Semaphore(workload.concurrency)
    samplers = {
        name: MemorySampler({name: (lambda name=name: running.pids(name))}, interval_s=0.5)
        for name in SERVICES
    }
    async with Client(running.kafka) as client:

        async def one(i: int) -> None:
            nonlocal in_flight, peak
            async with gate:
                trace_id = secrets.token_hex(16)
                sampled = i % max(trace_every, 1) == 0
                traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-{'01' if sampled else '00'}".encode()
                started = time.perf_counter()
                in_flight += 1
                peak = max(peak, in_flight)
                session = _session_id(i, even_partitions)
                message_id = await client.send("acme", session, text, headers=[("traceparent", traceparent)])
                try:
                    reply = await client.reply(message_id, within_s=within_s)
                finally:
                    in_flight -= 1
                turns.append(
                    TurnRun(trace_id, started, time.perf_counter(), reply.get("text") or "", sampled)
                )
                if progress is not None:
                    progress(len(turns), workload.sessions)

        with contextlib.ExitStack() as stack:
            for sampler in samplers.values():
                stack.enter_context(sampler)
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(workload.sessions)))
            wall = time.perf_counter() - t0
    memory = {name: _per_replica_peak(s, len(running.pids(name)) or 1) for name, s in samplers.items()}
    return RunOutcome(turns, wall, peak, memory)


def _per_replica_peak(sampler: MemorySampler, replicas: int) -> float:
    return round(sampler.peak_rss_mib / replicas, 1)


def span_times(trace_dir: Path, trace_ids: set[str]) -> dict[str, dict[str, float]]:
    """Per trace: seconds inside the model (``triton.infer``) and the tool (``tool sleep``), and counts."""
    out: dict[str, dict[str, float]] = {}
    for path in sorted(trace_dir.glob("*.jsonl")):
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    span = json.loads(line)
                except ValueError:
                    continue
                trace_id = span.get("trace_id")
                if trace_id not in trace_ids:
                    continue
                name = span.get("name")
                if name not in ("triton.infer", "tool sleep"):
                    continue
                bucket = out.setdefault(
                    trace_id, {"model_s": 0.0, "tool_s": 0.0, "model_calls": 0, "tools": 0}
                )
                seconds = (int(span["end_ns"]) - int(span["start_ns"])) / 1e9
                if name == "triton.infer":
                    bucket["model_s"] += seconds
                    bucket["model_calls"] += 1
                else:
                    bucket["tool_s"] += seconds
                    bucket["tools"] += 1
    return out


async def timings(running: Running, workload: Workload, outcome: RunOutcome) -> dict[str, TurnTiming]:
    """Each sampled turn's :class:`TurnTiming` by trace id, once every service has exported its spans."""
    ids = {t.trace_id for t in outcome.turns if t.sampled}
    want_calls = workload.steps + 1
    deadline = time.monotonic() + 30
    while True:
        times = await asyncio.to_thread(span_times, running.trace_dir, ids)
        complete = sum(
            1 for t in times.values() if t["model_calls"] >= want_calls and t["tools"] >= workload.steps
        )
        if complete == len(ids) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    result = {}
    for t in outcome.turns:
        if t.trace_id not in ids:
            continue
        spans = times.get(t.trace_id, {})
        result[t.trace_id] = TurnTiming(
            turn_s=t.finished - t.started,
            model_s=spans.get("model_s", 0.0),
            tool_s=spans.get("tool_s", 0.0),
            steps=workload.steps,
            model_calls=int(spans.get("model_calls", 0)),
            answer=t.answer,
        )
    return result


def _session_id(i: int, partitions: int) -> str:
    """A fresh session id; with ``partitions``, one whose key the producer puts on partition i mod it."""
    while True:
        session = f"bench-{i}-{uuid.uuid4().hex[:6]}"
        if not partitions:
            return session
        every = list(range(partitions))
        if DefaultPartitioner()(session_key("acme", session), every, every) == i % partitions:
            return session


async def measure(
    deployment: Deployment,
    workload: Workload,
    home: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    label: str = "agentbus",
    trace_every: int = 1,
) -> tuple[PeerResult, RunOutcome]:
    """Deploy, warm up (not counted), run the workload, summarise like a peer.

    ``trace_every`` > 1: one turn in that many is traced (see :func:`run_workload`); the
    overhead percentiles come from those, everything else from every turn.
    """
    async with deployed(deployment, home) as running:
        # Warm-up (not counted): the broker's and Cassandra's JVMs compile their hot paths under
        # load, and a freshly (re)started server would otherwise be measured half-interpreted.
        # A model that waits is warm-up enough after a few turns.
        turns = 80 if deployment.model_latency_ms == 0 else 8
        warm = Workload(
            sessions=min(turns, workload.sessions), steps=2, concurrency=min(16, workload.concurrency)
        )
        await run_workload(running, warm, within_s=180)
        even = deployment.partitions if deployment.even_keys else 0
        outcome = await run_workload(
            running, workload, progress=progress, even_partitions=even, trace_every=trace_every
        )
        timed = await timings(running, workload, outcome)
    # An untraced turn's model calls are not counted from spans: its (checked) answer says the
    # turn made its steps + 1 calls.
    turns = [
        timed.get(t.trace_id)
        or TurnTiming(t.finished - t.started, 0.0, 0.0, workload.steps, workload.steps + 1, t.answer)
        for t in outcome.turns
    ]
    memory = ", ".join(f"{k} {v:.0f}" for k, v in outcome.memory.items())
    notes = (
        f"4 services as processes ({deployment.counts()}), {deployment.partitions} partitions; "
        "every step = 2 Kafka hops, 1 Kafka transaction, its events written to Cassandra by the "
        f"checkpoint; peak RSS per replica MiB: {memory}"
    )
    if trace_every > 1:
        notes += f"; 1 turn in {trace_every} traced, the overhead figures from those"
    result = summarize(label, workload, outcome.wall_s, turns, None, notes, timed=list(timed.values()))
    result.rss_parts_mib = dict(outcome.memory)
    result.rss_mib = round(sum(outcome.memory[n] * c for n, c in deployment.counts().items()), 1)
    return result, outcome


__all__ = [
    "Deployment",
    "RunOutcome",
    "Running",
    "deployed",
    "measure",
    "run_workload",
    "span_times",
    "timings",
]
