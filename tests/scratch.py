"""The bench's and the chaos runs' scratch data: each run's own topics and keyspace, dropped after it.

A run creates ``<prefix>.*`` topics and a keyspace of its own. Left behind, they pile up:
hundreds of keyspaces hold Cassandra's heap nearly full (its GC then costs more CPU per
request than the requests) and leftover partitions slow every broker restart. A run drops
them when it ends; ``python -m tests.scratch`` drops what earlier runs left (every
``bench_*`` and ``chaos_*`` keyspace, every ``bench-*`` and ``chaos-*`` topic); run it
only while no bench or chaos run is going.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from shared.cassandra import connect
from shared.settings import CassandraSettings, KafkaSettings

KEYSPACE_PREFIXES = ("bench_", "chaos_")
TOPIC_PREFIXES = ("bench-", "chaos-")


async def delete_topics(kafka: KafkaSettings, prefixes: tuple[str, ...]) -> list[str]:
    """Delete the topics whose names start with one of ``prefixes``; failures are reported, not raised."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.kafka_bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefixes)]
        if names:
            await admin.delete_topics(names)
        return names
    except Exception as exc:
        print(f"could not delete topics {prefixes}: {exc}", file=sys.stderr)
        return []
    finally:
        await admin.close()


def drop_keyspace(session: Any, keyspace: str) -> None:
    """DROP KEYSPACE (blocking); a failure is reported, not raised: the run's result stands."""
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
    except Exception as exc:
        print(f"could not drop keyspace {keyspace}: {exc}", file=sys.stderr)


def main() -> int:
    cluster, session = connect(CassandraSettings.from_env(), keyspace="")
    try:
        rows = session.execute("SELECT keyspace_name FROM system_schema.keyspaces")
        keyspaces = [r["keyspace_name"] for r in rows if r["keyspace_name"].startswith(KEYSPACE_PREFIXES)]
        for keyspace in keyspaces:
            drop_keyspace(session, keyspace)
    finally:
        cluster.shutdown()
    topics = asyncio.run(delete_topics(KafkaSettings.from_env(), TOPIC_PREFIXES))
    print(f"dropped {len(keyspaces)} keyspaces and {len(topics)} topics left by bench and chaos runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
