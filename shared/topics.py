"""The topics of DESIGN.md and their idempotent creation.

    python -m shared.topics create     # create missing topics, grow partitions, fix configs
    python -m shared.topics describe   # what the broker has

Every topic is keyed by the session, so one session's records stay in order in one
partition. Partitions can only grow (and growing re-maps keys, so do it before
traffic); ``create`` never shrinks a topic and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import InvalidPartitionsError, TopicAlreadyExistsError, for_code

from shared.settings import KafkaSettings

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str  # without the prefix
    doc: str
    retention_ms: int
    cleanup_policy: str = "delete"
    partitions: int | None = None  # None: settings.topic_partitions

    def configs(self, settings: KafkaSettings) -> dict[str, str]:
        return {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
            "min.insync.replicas": str(min(2, settings.topic_replication)),
            # Timestamps are when the producer made the record (turn latency is measured from them).
            "message.timestamp.type": "CreateTime",
            "max.message.bytes": str(settings.kafka_max_request_bytes),
        }


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("ingress", "UserMessage from external producers and agentctl", 7 * DAY_MS),
    TopicSpec("reasoning.inbox", "TurnRequested, ToolResult, CancelRequested for reasoning", 7 * DAY_MS),
    TopicSpec("tool.calls", "ToolCall from reasoning to tool-exec", 7 * DAY_MS),
    TopicSpec("responses", "AgentResponse and AgentResponseDelta for clients", 7 * DAY_MS),
    # The source of truth that Cassandra projects; kept long enough to rebuild the projection.
    TopicSpec("events", "SessionEvent, written by reasoning only", 30 * DAY_MS),
    # Operators need time to look at what was refused.
    TopicSpec("dlq", "DeadLetter from every service", 90 * DAY_MS),
)


async def ensure_topics(settings: KafkaSettings, specs: Sequence[TopicSpec] = TOPICS) -> list[str]:
    """Create missing topics and grow short ones; returns one line per action taken or checked."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=settings.kafka_request_timeout_ms
    )
    await admin.start()
    report: list[str] = []
    try:
        existing = set(await admin.list_topics())
        wanted = {settings.topic(s.name): s for s in specs}
        missing = [
            NewTopic(
                name,
                s.partitions or settings.topic_partitions,
                settings.topic_replication,
                topic_configs=s.configs(settings),
            )
            for name, s in wanted.items()
            if name not in existing
        ]
        present = [n for n in wanted if n in existing]
        if missing:
            response = await admin.create_topics(missing)
            for topic, code, *rest in response.topic_errors:
                if code and for_code(code) is TopicAlreadyExistsError:
                    # Our metadata was stale (another creator won, or the broker's cache lagged).
                    present.append(topic)
                elif code:
                    message = rest[0] if rest else ""
                    raise RuntimeError(f"creating {topic}: {for_code(code).__name__} {message}")
                else:
                    report.append(f"created {topic}")
        if present:
            described = await _describe_settled(admin, present)
            for topic in described:
                name = topic["topic"]
                have = len(topic["partitions"])
                want = wanted[name].partitions or settings.topic_partitions
                if have < want:
                    try:
                        await admin.create_partitions({name: NewPartitions(want)})
                        report.append(f"grew {name} from {have} to {want} partitions")
                    except InvalidPartitionsError as exc:
                        # Our metadata lagged: the controller already has at least that many.
                        report.append(f"kept {name}: {exc}")
                elif have > want:
                    report.append(f"kept {name} at {have} partitions (asked for {want}; Kafka cannot shrink)")
                else:
                    report.append(f"ok {name} ({have} partitions)")
            await admin.alter_configs(
                [
                    ConfigResource(ConfigResourceType.TOPIC, name, configs=wanted[name].configs(settings))
                    for name in present
                ]
            )
    finally:
        await admin.close()
    return report


async def _describe_settled(admin: AIOKafkaAdminClient, names: list[str]) -> list[dict[str, Any]]:
    """Describe topics, retrying briefly while the broker's metadata still lags the controller."""
    described: list[dict[str, Any]] = []
    for _ in range(50):
        described = await admin.describe_topics(names)
        if all(t["error_code"] == 0 and t["partitions"] for t in described):
            break
        await asyncio.sleep(0.1)
    return described


async def describe_topics(settings: KafkaSettings) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        names = sorted(t for t in await admin.list_topics() if t.startswith(settings.topic_prefix + "."))
        described = await admin.describe_topics(names) if names else []
        return [f"{t['topic']}: {len(t['partitions'])} partitions" for t in described]
    finally:
        await admin.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agentbus-topics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["create", "describe"])
    args = parser.parse_args(argv)
    settings = KafkaSettings.from_env()
    lines = asyncio.run(ensure_topics(settings) if args.command == "create" else describe_topics(settings))
    for line in lines:
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
