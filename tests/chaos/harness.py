"""The chaos harness: a workload of N sessions x M turns while faults are injected.

Modelled on Kafka's system tests and faust's stress killer: the services run as real
processes (the project's supervisor), faults fire as the workload progresses, and at
the end one linear reader (``tests/chaos/verify.py``) rebuilds the truth from the
topics and Cassandra and checks the guarantees.

Faults: SIGKILL of random replicas of every service (singles and bursts), SIGSTOP of
a reasoning replica past the consumer session timeout then SIGCONT (a zombie), hard
restart of the Kafka broker (SIGKILL + start), restart of Cassandra, Redis FLUSHALL
and Redis restart, poison and schema-incompatible records, and duplicate delivery
(a consumer group re-seeked to the beginning of its topic).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import signal
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError

from infra.local.services import ServiceReplicas, free_base_port
from infra.local.stack import Cassandra, Kafka, Redis, StackSettings, port_open
from shared.avro import default_codec
from shared.kafka import make_producer
from shared.service import session_key
from shared.settings import KafkaSettings
from tests.integration.agent_stack import SECRETS, Client

SERVICES = ("ingress", "reasoning", "tool-exec", "checkpoint")
GROUP_INPUT = {
    "ingress": "ingress",
    "reasoning": "reasoning.inbox",
    "tool-exec": "tool.calls",
    "checkpoint": "events",
}


@dataclass
class ChaosConfig:
    sessions: int = 1000
    turns: int = 5
    replicas: int = 2
    concurrency: int = 250  # sessions talking at once
    kills: int = 20  # single SIGKILLs spread over every service
    bursts: int = 2  # bursts of one SIGKILL per service at once
    sigstop: bool = True
    broker_restart: bool = True
    cassandra_restart: bool = True
    redis_wipe: bool = True
    redis_restart: bool = True
    poison: bool = True
    replay: bool = True
    session_timeout_ms: int = 6000
    # A turn queued behind a replay backlog (the whole tool.calls topic re-delivered) can take
    # minutes on two cores; the verifier, not this timeout, judges losses.
    turn_timeout_s: float = 600.0
    seed: int = 7


@dataclass(frozen=True)
class Injected:
    topic: str
    value: bytes
    expect_reason: str | None


@dataclass
class FaultRecord:
    kind: str
    target: str
    at_s: float
    recovery_s: float | None = None
    note: str = ""


@dataclass
class Expectation:
    tenant: str
    session: str
    message_id: str
    text: str
    expect: str | None  # a substring of the final answer, when the workload knows it


@dataclass
class ChaosResult:
    config: ChaosConfig
    prefix: str
    faults: list[FaultRecord] = field(default_factory=list)
    sent: list[Expectation] = field(default_factory=list)
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    injected: list[Injected] = field(default_factory=list)
    wrong_answers: list[str] = field(default_factory=list)
    outcome_unknown: list[str] = field(default_factory=list)  # notify answered OUTCOME_UNKNOWN
    late_answers: int = 0  # answers published after the client's first wait ran out
    reader_misses: int = 0  # answers published in time that only a re-read from the start found
    turn_latencies: list[float] = field(default_factory=list)  # send -> final answer seen, seconds
    duration_s: float = 0.0
    groups: dict[str, str] = field(default_factory=dict)
    # Replicas not running once the workload is answered and every group caught up: the
    # harness restarts whatever it kills, so these ended by themselves (a crash).
    exited: list[str] = field(default_factory=list)

    def recovery(self, kind_prefix: str) -> tuple[float | None, float | None]:
        values = [
            f.recovery_s for f in self.faults if f.kind.startswith(kind_prefix) and f.recovery_s is not None
        ]
        if not values:
            return None, None
        return statistics.median(values), max(values)


def turn_text(session_index: int, turn: int) -> tuple[str, str | None]:
    """The workload's turn ``turn`` of session ``session_index`` and a word its answer must contain."""
    a, b, c = session_index % 7 + 1, turn + 2, session_index % 5 + 1
    kind = turn % 5
    if kind == 0:
        return f"what is {a}+{b}*{c}", str(a + b * c)
    if kind == 1:
        return f"remember that code is c{session_index}x{turn}", None
    if kind == 2:
        return f"notify ops that session {session_index} reached turn {turn}", "Notification sent"
    if kind == 3:
        return "what is my code", f"c{session_index}x{turn - 2}"
    return f"what is {a}*{b} and then notify audit that turn {turn} is done", str(a * b)


class Chaos:
    def __init__(self, config: ChaosConfig, kafka: KafkaSettings, keyspace: str, home: Path) -> None:
        self.config = config
        self.kafka = kafka
        self.keyspace = keyspace
        self.rng = random.Random(config.seed)
        prefix = kafka.topic_prefix
        self.groups = {name: f"{prefix}-{name}" for name in SERVICES}
        env = {
            "AGENTBUS_TOPIC_PREFIX": prefix,
            "AGENTBUS_TOPIC_PARTITIONS": str(kafka.topic_partitions),
            "AGENTBUS_CASSANDRA_KEYSPACE": keyspace,
            "AGENTBUS_TENANT_SECRETS": json.dumps(SECRETS),
            "AGENTBUS_INGRESS_GROUP": self.groups["ingress"],
            "AGENTBUS_REASONING_GROUP": self.groups["reasoning"],
            "AGENTBUS_TOOL_EXEC_GROUP": self.groups["tool-exec"],
            "AGENTBUS_CHECKPOINT_GROUP": self.groups["checkpoint"],
            "AGENTBUS_TENANT_RATE_PER_S": "100000",
            "AGENTBUS_TENANT_BURST": "100000",
            "AGENTBUS_MODEL_RATE_PER_S": "100000",
            "AGENTBUS_MODEL_BURST": "100000",
            "AGENTBUS_KAFKA_SESSION_TIMEOUT_MS": str(config.session_timeout_ms),
            "AGENTBUS_KAFKA_HEARTBEAT_MS": str(max(500, config.session_timeout_ms // 6)),
            "AGENTBUS_SHUTDOWN_GRACE_S": "15",
            "AGENTBUS_TURN_DEADLINE_S": "900",
            "AGENTBUS_LOG_LEVEL": "WARNING",
            "AGENTBUS_TRACE_DIR": str(home / "traces"),
        }
        self.sup = ServiceReplicas(
            StackSettings(home=str(home)), base_port=free_base_port(rng=self.rng), env=env
        )
        self.stack = StackSettings()
        self.result = ChaosResult(config, prefix, groups=self.groups)
        self.completed = 0
        self.finished = False
        self._progress = asyncio.Condition()
        self.t0 = 0.0

    # -- lifecycle ------------------------------------------------------------------------------

    def start_services(self) -> None:
        for name in SERVICES:
            self.sup.start(name, self.config.replicas, wait=False)
        for name in SERVICES:
            self.sup.wait_ready(self.sup.known(name), timeout=120)

    def stop_services(self) -> None:
        for name in SERVICES:
            self.sup.stop(name, timeout=30)

    def _now(self) -> float:
        return time.monotonic() - self.t0

    # -- the workload ---------------------------------------------------------------------------

    async def _session(self, client: Client, index: int, gate: asyncio.Semaphore) -> None:
        session = f"s{index}-{uuid.uuid4().hex[:6]}"
        async with gate:
            for turn in range(self.config.turns):
                text, expect = turn_text(index, turn)
                message_id = uuid.uuid4().hex
                self.result.sent.append(Expectation("acme", session, message_id, text, expect))
                sent_at = time.monotonic()
                await client.send("acme", session, text, message_id=message_id)
                try:
                    reply = await client.reply(message_id, within_s=self.config.turn_timeout_s)
                except TimeoutError:
                    # Before calling it lost, read the responses topic again from the start: the
                    # verifier, not this live reader, is the judge of what was published.
                    gave_up_ms = time.time() * 1000
                    await client.rescan()
                    try:
                        reply = await client.reply(message_id, within_s=60)
                    except TimeoutError:
                        self.result.wrong_answers.append(f"{session}: no answer to {text!r}")
                        return
                    # Published before the wait ran out yet unseen: the live reader missed it.
                    if client.published_ms.get(message_id, 0) < gave_up_ms - 1000:
                        self.result.reader_misses += 1
                    else:
                        self.result.late_answers += 1
                self.result.turn_latencies.append(time.monotonic() - sent_at)
                self.result.answers[message_id] = reply
                if reply["kind"] == "FINAL" and "(outcome unknown)" in (reply["text"] or ""):
                    # Designed: an irreversible call whose claimant died between claim and result
                    # is reported, never re-run (the verifier checks it ran at most once).
                    self.result.outcome_unknown.append(f"{session}: {text!r}")
                elif reply["kind"] != "FINAL" or (expect is not None and expect not in reply["text"]):
                    self.result.wrong_answers.append(
                        f"{session}: {text!r} -> {reply['kind']} {reply['text']!r}"
                    )
                self.completed += 1
                async with self._progress:
                    self._progress.notify_all()

    async def run(self) -> ChaosResult:
        self.start_services()
        self.t0 = time.monotonic()
        total = self.config.sessions * self.config.turns
        gate = asyncio.Semaphore(self.config.concurrency)
        try:
            async with Client(self.kafka) as client:
                faults = asyncio.create_task(self._faults(total))
                await asyncio.gather(*(self._session(client, i, gate) for i in range(self.config.sessions)))
                self.finished = True
                async with self._progress:
                    self._progress.notify_all()
                await faults
            self.result.duration_s = self._now()
            await self._wait_caught_up()
            self.result.exited = [
                r.name for name in SERVICES for r in self.sup.known(name) if r.running_pid() is None
            ]
        finally:
            self.stop_services()
        return self.result

    # -- faults ---------------------------------------------------------------------------------

    def _plan(self) -> list[Callable[[], Any]]:
        c = self.config
        plan: list[Callable[[], Any]] = []
        services = list(SERVICES)
        for i in range(c.kills):
            name = services[i % len(services)]
            plan.append(lambda name=name: self._kill(name))
        for _ in range(c.bursts):
            plan.append(self._burst)
        if c.sigstop:
            plan.append(self._sigstop_reasoning)
        if c.redis_wipe:
            plan.append(self._redis_wipe)
        if c.poison:
            plan.append(self._poison)
        if c.replay:
            plan.append(self._replay_tool_exec)
        if c.redis_restart:
            plan.append(self._redis_restart)
        if c.broker_restart:
            plan.append(self._broker_restart)
        if c.cassandra_restart:
            plan.append(self._cassandra_restart)
        self.rng.shuffle(plan)
        return plan

    async def _faults(self, total: int) -> None:
        """Fire each planned fault once the workload reaches its share of progress (5%..75%).

        Faults run as tasks, so a slow one (a SIGSTOP held past the session timeout, a
        Cassandra restart) overlaps the next: faults mix, as in production.
        """
        plan = self._plan()
        running: list[asyncio.Task[Any]] = []
        for i, fault in enumerate(plan):
            threshold = min(total, int(total * (0.05 + 0.7 * i / max(1, len(plan)))))
            async with self._progress:
                await self._progress.wait_for(lambda t=threshold: self.completed >= t or self.finished)
            running.append(asyncio.create_task(self._guarded(fault)))
            await asyncio.sleep(0.5)
        await asyncio.gather(*running)

    async def _guarded(self, fault: Callable[[], Any]) -> None:
        try:
            await fault()
        except Exception as exc:  # a harness failure is reported, it must not hang the run
            self._record("fault-failed", getattr(fault, "__name__", "fault"), f"{type(exc).__name__}: {exc}")

    def _record(self, kind: str, target: str, note: str = "") -> FaultRecord:
        record = FaultRecord(kind, target, round(self._now(), 2), note=note)
        self.result.faults.append(record)
        print(f"[chaos {record.at_s:7.1f}s] {kind} {target} {note}", file=sys.stderr, flush=True)
        return record

    def _owned(self, index: int) -> set[int]:
        port = self.sup.port("reasoning", index)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return set()
        owned = set()
        for line in text.splitlines():
            if line.startswith("agentbus_reasoning_partition_owned{") and line.endswith(" 1.0"):
                owned.add(int(line.split('partition="', 1)[1].split('"', 1)[0]))
        return owned

    async def _wait_owned(
        self, partitions: set[int], exclude: int | None, limit_s: float = 60.0
    ) -> float | None:
        """Seconds until every partition in ``partitions`` is owned by a live reasoning replica."""
        started = time.monotonic()
        while time.monotonic() - started < limit_s:
            owned: set[int] = set()
            for r in self.sup.running("reasoning"):
                if r.index != exclude:
                    owned |= await asyncio.to_thread(self._owned, r.index)
            if partitions <= owned:
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        return None

    async def _kill(self, name: str, restart_after: float | None = None) -> None:
        running = self.sup.running(name)
        if not running:
            return
        victim = self.rng.choice(running)
        owned = await asyncio.to_thread(self._owned, victim.index) if name == "reasoning" else set()
        await asyncio.to_thread(self.sup.kill, name, victim.index, signal.SIGKILL)
        record = self._record("kill", victim.name, f"partitions {sorted(owned)}" if owned else "")
        # The victim comes back on its own schedule, as an orchestrator would restart it;
        # recovery is measured meanwhile: until live replicas own all it had.
        delay = restart_after if restart_after is not None else self.rng.uniform(2.0, 5.0)
        restart = asyncio.create_task(self._restart_later(name, victim.index, delay))
        if owned:
            record.recovery_s = await self._wait_owned(owned, exclude=None)
        await restart

    async def _restart_later(self, name: str, index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await asyncio.to_thread(self.sup.restart, name, index, wait=False)

    async def _burst(self) -> None:
        self._record("burst", "one replica of every service")
        await asyncio.gather(*(self._kill(name, restart_after=3.0) for name in SERVICES))

    async def _sigstop_reasoning(self) -> None:
        # Needs a survivor to take over, and a victim that owns partitions (a replica without
        # any has nothing to be fenced from): wait (bounded) until two run and one owns some.
        candidates: list[tuple[Any, set[int]]] = []
        for _ in range(150):
            running = self.sup.running("reasoning")
            if len(running) >= 2:
                owned_by = [(r, await asyncio.to_thread(self._owned, r.index)) for r in running]
                candidates = [(r, owned) for r, owned in owned_by if owned]
                if candidates:
                    break
            await asyncio.sleep(0.2)
        else:
            why = "no replica owning partitions" if len(running) >= 2 else "no second replica running"
            self._record("sigstop-skipped", "reasoning", why)
            return
        victim, owned = self.rng.choice(candidates)
        await asyncio.to_thread(self.sup.kill, "reasoning", victim.index, signal.SIGSTOP)
        record = self._record("sigstop", victim.name, f"partitions {sorted(owned)}")
        if owned:
            record.recovery_s = await self._wait_owned(owned, exclude=victim.index)
        await asyncio.sleep(self.config.session_timeout_ms / 1000 + 4)
        await asyncio.to_thread(self.sup.kill, "reasoning", victim.index, signal.SIGCONT)
        self._record("sigcont", victim.name, "the zombie resumes: it must be fenced")

    async def _redis_wipe(self) -> None:
        from shared.redis import make_redis
        from shared.settings import RedisSettings

        client = make_redis(RedisSettings.from_env())
        await client.flushall()
        await client.aclose()
        self._record("redis-flushall", "redis")

    async def _server_restart(self, server: Any, kind: str, hard: bool) -> None:
        record = self._record(kind, server.name, "SIGKILL + start" if hard else "SIGTERM + start")
        started = time.monotonic()
        if hard:
            pid = server.running_pid()
            if pid is not None:
                await asyncio.to_thread(_killpg, pid)
        else:
            await asyncio.to_thread(server.stop, 60.0)
        # Start only once the old process is gone and its port is free (a JVM takes a moment).
        for _ in range(600):
            if server.running_pid() is None and not port_open(server.port):
                break
            await asyncio.sleep(0.1)
        await asyncio.to_thread(server.start, lambda _msg: None)
        while not await asyncio.to_thread(server.healthy):  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.5)
        record.recovery_s = round(time.monotonic() - started, 2)

    async def _redis_restart(self) -> None:
        await self._server_restart(Redis(self.stack), "redis-restart", hard=True)

    async def _broker_restart(self) -> None:
        await self._server_restart(Kafka(self.stack), "kafka-restart", hard=True)

    async def _cassandra_restart(self) -> None:
        await self._server_restart(Cassandra(self.stack), "cassandra-restart", hard=False)

    async def _poison(self) -> None:
        """Records every service must dead-letter with a reason, and keep going."""
        codec = default_codec()
        k = self.kafka
        now = dt.datetime.now(dt.UTC)
        key = session_key("acme", "poison")
        turn = codec.encode(
            "TurnRequested",
            {
                "tenant_id": "acme",
                "session_id": "poison",
                "message_id": "p1",
                "turn_id": "t-p1",
                "text": "hi",
                "concurrency_policy": "QUEUE",
                "requested_at": now,
                "metadata": {},
            },
        )
        event = codec.encode(
            "SessionEvent",
            {
                "tenant_id": "acme",
                "session_id": "poison",
                "seq": -5,
                "turn_id": "t-p1",
                "event_type": "TURN_CANCELLED",
                "payload": {"reason": "x"},
                "trace_id": "0" * 32,
                "occurred_at": now,
            },
        )
        injected = [
            # garbage and an unknown writer schema at every input topic
            *(
                Injected(k.topic(t), b"\x00\x01garbage-" + t.encode(), "bad_magic")
                for t in GROUP_INPUT.values()
            ),
            *(
                Injected(k.topic(t), b"\xc3\x01" + bytes(8) + t.encode(), "unknown_fingerprint")
                for t in GROUP_INPUT.values()
            ),
            # schema-incompatible: a valid record of the wrong type for the topic
            Injected(k.topic("ingress"), turn, "unexpected_record"),
            Injected(k.topic("tool.calls"), turn, "unexpected_record"),
            # poison: decodes, but breaks an invariant its handler checks
            Injected(k.topic("reasoning.inbox"), turn, "key_mismatch"),
            Injected(k.topic("events"), event, "invalid_seq"),
        ]
        producer = make_producer(k, client_id="chaos-poison")
        await producer.start()
        try:
            for item in injected:
                wrong_key = b"acme/someone-else" if item.expect_reason == "key_mismatch" else key
                await producer.send_and_wait(item.topic, item.value, key=wrong_key)
        finally:
            await producer.stop()
        self.result.injected.extend(injected)
        self._record("poison", "every input topic", f"{len(injected)} records")

    async def _replay_tool_exec(self) -> None:
        """Duplicate delivery: stop tool-exec, re-seek its group to the beginning, start it again."""
        record = self._record("replay", "tool-exec group", "re-seeked to the beginning")
        started = time.monotonic()
        await asyncio.to_thread(self.sup.stop, "tool-exec")
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.kafka_bootstrap,
            group_id=self.groups["tool-exec"],
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            topic = self.kafka.topic("tool.calls")
            parts = [TopicPartition(topic, p) for p in range(self.kafka.topic_partitions)]
            consumer.assign(parts)
            begin = await consumer.beginning_offsets(parts)
            # A replica SIGKILLed just before the stop stays a member until its session times
            # out, and the coordinator refuses a commit from outside a non-empty group: retry.
            deadline = time.monotonic() + 60
            while True:
                try:
                    await consumer.commit({tp: begin[tp] for tp in parts})
                    break
                except CommitFailedError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1.0)
        finally:
            await consumer.stop()
        for attempt in range(3):  # a kill fault may hit a replica while it starts
            try:
                start = self.sup.start
                await asyncio.to_thread(start, "tool-exec", self.config.replicas, wait=True, timeout=120)
                break
            except Exception as exc:  # ReplicaStartError: try once more
                if attempt == 2:
                    raise
                print(f"[chaos] tool-exec restart after the replay failed ({exc!r:.200})", file=sys.stderr)
        record.recovery_s = round(time.monotonic() - started, 2)

    async def _wait_caught_up(self, limit_s: float = 300.0) -> None:
        """Wait until every group has consumed its input topic to the end (lag 0)."""
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.kafka_bootstrap)
        await admin.start()
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.kafka_bootstrap, isolation_level="read_committed"
        )
        await reader.start()
        try:
            deadline = time.monotonic() + limit_s
            while time.monotonic() < deadline:
                lagging = 0
                for name, group in self.groups.items():
                    topic = self.kafka.topic(GROUP_INPUT[name])
                    parts = [TopicPartition(topic, p) for p in range(self.kafka.topic_partitions)]
                    ends = await reader.end_offsets(parts)
                    committed = await admin.list_consumer_group_offsets(group, partitions=parts)
                    for tp in parts:
                        meta = committed.get(tp)
                        at = meta.offset if meta is not None else 0
                        if at < ends[tp] and await _records_between(reader, tp, at, ends[tp]):
                            lagging += 1
                if lagging == 0:
                    return
                await asyncio.sleep(1.0)
        finally:
            await reader.stop()
            await admin.close()


async def _records_between(reader: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int) -> bool:
    """Whether data records lie in [start, end): a group that committed up to its last
    record stops at the transaction marker after it, one offset short of the end."""
    reader.assign([tp])
    reader.seek(tp, start)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        batches = await reader.getmany(tp, timeout_ms=300)
        if batches.get(tp):
            return True
        if await reader.position(tp) >= end:
            return False
    return True


def _killpg(pid: int) -> None:
    import contextlib
    import os

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
