"""The four services running in this test process (N replicas each), and a client for them.

Every replica is the service's real ``run_*`` coroutine with its own consumers and
producers, so Kafka sees N independent group members per service; only the process
is shared. Tests that need to kill a replica's process use the process supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.checkpoint.main import run_checkpoint
from services.checkpoint.settings import CheckpointSettings
from services.ingress.main import run_ingress
from services.ingress.settings import IngressSettings
from services.ingress.signing import sign
from services.reasoning.main import run_reasoning
from services.reasoning.settings import ReasoningSettings
from services.tool_exec.main import run_tool_exec
from services.tool_exec.settings import ToolExecSettings
from shared.avro import CodecError, default_codec
from shared.kafka import make_consumer, make_producer, poll
from shared.service import Probes, session_key
from shared.settings import CassandraSettings, KafkaSettings

SECRETS = {"acme": "acme-secret", "globex": "globex-secret"}


@dataclass
class AgentStack:
    kafka: KafkaSettings
    cassandra: CassandraSettings
    replicas: int = 2
    overrides: dict[str, Any] = field(default_factory=dict)
    stops: list[asyncio.Event] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    probes: list[Probes] = field(default_factory=list)

    def _common(self, name: str) -> dict[str, Any]:
        prefix = self.kafka.topic_prefix
        return {
            "topic_prefix": prefix,
            "topic_partitions": self.kafka.topic_partitions,
            "group_id": f"{prefix}-{name}",
            "http_port": 0,
            "shutdown_grace_s": 10.0,
            "kafka_session_timeout_ms": 6000,
            "kafka_heartbeat_ms": 1000,
        }

    def settings(self) -> list[tuple[str, Any]]:
        ks = {"cassandra_keyspace": self.cassandra.cassandra_keyspace}
        prefix = self.kafka.topic_prefix
        out: list[tuple[str, Any]] = []
        for _ in range(self.replicas):
            out.append(
                (
                    "ingress",
                    IngressSettings.from_env(
                        **self._common("ingress"),
                        **ks,
                        tenant_secrets=json.dumps(SECRETS),
                        tenant_burst=100000,
                        tenant_rate_per_s=100000.0,
                        **self.overrides.get("ingress", {}),
                    ),
                )
            )
            out.append(
                (
                    "reasoning",
                    ReasoningSettings.from_env(
                        **self._common("reasoning"),
                        **ks,
                        checkpoint_group=f"{prefix}-checkpoint",
                        model_rate_per_s=100000.0,
                        model_burst=100000,
                        **self.overrides.get("reasoning", {}),
                    ),
                )
            )
            out.append(
                (
                    "tool-exec",
                    ToolExecSettings.from_env(
                        **self._common("tool-exec"), **ks, **self.overrides.get("tool-exec", {})
                    ),
                )
            )
            out.append(
                (
                    "checkpoint",
                    CheckpointSettings.from_env(
                        **self._common("checkpoint"), **ks, **self.overrides.get("checkpoint", {})
                    ),
                )
            )
        return out  # fmt: skip

    async def start(self) -> None:
        runners = {
            "ingress": run_ingress,
            "reasoning": run_reasoning,
            "tool-exec": run_tool_exec,
            "checkpoint": run_checkpoint,
        }
        for name, settings in self.settings():
            stop, probes = asyncio.Event(), Probes()
            self.stops.append(stop)
            self.probes.append(probes)
            self.tasks.append(asyncio.create_task(runners[name](settings, stop, probes), name=name))
        for _ in range(600):
            if all(p.started for p in self.probes):
                return
            for task in self.tasks:
                if task.done():
                    task.result()
            await asyncio.sleep(0.05)
        raise TimeoutError("services did not start")

    async def stop(self) -> None:
        for stop in self.stops:
            stop.set()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]


@dataclass
class Client:
    """Sends signed UserMessages and collects AgentResponses by message_id."""

    kafka: KafkaSettings
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    all_responses: list[dict[str, Any]] = field(default_factory=list)
    published_ms: dict[str, int] = field(default_factory=dict)  # message_id -> its response's timestamp
    _waiters: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    async def __aenter__(self) -> Client:
        self.codec = default_codec()
        self.producer = make_producer(self.kafka, client_id="test-client")
        await self.producer.start()
        self.consumer = make_consumer(
            self.kafka,
            group_id=None,
            client_id="test-client-responses",
            topics=[self.kafka.topic("responses")],
        )
        await self.consumer.start()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.consumer.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        # Survives broker restarts and anything undecodable: a client must not go deaf.
        while True:
            try:
                batches = await poll(self.consumer, timeout_ms=200)
            except Exception as exc:  # e.g. a connection reset mid-fetch
                print(f"response reader: {type(exc).__name__}: {exc}; continuing", file=sys.stderr)
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for r in records:
                    try:
                        decoded = self.codec.decode(r.value)
                    except CodecError:
                        continue
                    if decoded.name.endswith("AgentResponse"):
                        self.all_responses.append(decoded.datum)
                        message_id = decoded.datum["message_id"]
                        self.responses.setdefault(message_id, decoded.datum)
                        self.published_ms.setdefault(message_id, r.timestamp)
                        waiter = self._waiters.pop(message_id, None)
                        if waiter is not None and not waiter.done():
                            waiter.set_result(None)

    async def send(
        self,
        tenant: str,
        session: str,
        text: str,
        *,
        message_id: str | None = None,
        policy: str | None = None,
        secret: str | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> str:
        message_id = message_id or uuid.uuid4().hex
        value = self.codec.encode(
            "UserMessage",
            {
                "tenant_id": tenant,
                "session_id": session,
                "message_id": message_id,
                "text": text,
                "sent_at": dt.datetime.now(dt.UTC),
                "concurrency_policy": policy,
                "metadata": {},
            },
        )
        # secret None: the tenant's own; "" sends the message unsigned.
        secret = SECRETS[tenant] if secret is None else secret
        signed = [("x-agentbus-signature", sign(secret, value).encode())] if secret else []
        await self.producer.send_and_wait(
            self.kafka.topic("ingress"), value, key=session_key(tenant, session), headers=[*signed, *headers]
        )
        return message_id

    async def reply(self, message_id: str, within_s: float = 60.0) -> dict[str, Any]:
        """The final response to ``message_id``, waiting up to ``within_s``."""
        if message_id not in self.responses:
            waiter = self._waiters.get(message_id)
            if waiter is None or waiter.done():
                waiter = self._waiters[message_id] = asyncio.get_running_loop().create_future()
            async with asyncio.timeout(within_s):
                await asyncio.shield(waiter)  # a timeout must not cancel the shared future
        return self.responses[message_id]

    async def rescan(self) -> None:
        """Read the responses topic again from the beginning (the reader de-duplicates)."""
        parts = list(self.consumer.assignment())
        if parts:
            await self.consumer.seek_to_beginning(*parts)

    async def ask(
        self, tenant: str, session: str, text: str, *, within_s: float = 60.0, **kw: Any
    ) -> dict[str, Any]:
        return await self.reply(await self.send(tenant, session, text, **kw), within_s=within_s)


@contextlib.asynccontextmanager
async def running_stack(
    kafka: KafkaSettings, cassandra: CassandraSettings, replicas: int = 2, **overrides: Any
) -> AsyncIterator[AgentStack]:
    stack = AgentStack(kafka, cassandra, replicas, overrides)
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()


async def wait_for_value(probe: Callable[[], Awaitable[Any]], within_s: float = 30.0) -> Any:
    """``probe()`` polled until it returns something truthy; its last value after ``within_s``."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        value = await probe()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.3)
