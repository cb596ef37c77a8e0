"""Fixtures for tests against the real local servers (started by `make up`).

The servers are started once, by the project's own launcher, before pytest runs;
these fixtures fail (never skip) when one does not answer. Each test session gets
its own Cassandra keyspace, and each test its own topic prefix, so runs never see
each other's data.

With ``AGENTBUS_TESTCONTAINERS=1`` Kafka, Cassandra and Redis come from testcontainers
instead (``tests/integration/containers.py``); Triton stays on the local launcher.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from cassandra.cluster import Cluster, Session

from infra.local.services import ServiceReplicas, free_base_port
from infra.local.stack import SERVERS, StackSettings
from shared.cassandra import Statements, connect
from shared.migrations import apply_migrations
from shared.settings import CassandraSettings, KafkaSettings, RedisSettings, TritonSettings
from shared.topics import TOPICS, ensure_topics
from tests.integration import containers
from tests.integration.agent_stack import SECRETS

# Tests of the local launcher's own servers (status; the chaos run restarts them): meaningless
# against containers.
_LAUNCHER_TESTS = ("tests/integration/test_stack.py", "tests/integration/test_chaos_smoke.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    in_containers = containers.requested(os.environ)
    for item in items:
        if "tests/integration" not in str(item.fspath):
            continue
        item.add_marker(pytest.mark.integration)
        if in_containers and (
            str(item.fspath).endswith(_LAUNCHER_TESTS) or item.get_closest_marker("chaos") is not None
        ):
            item.add_marker(
                pytest.mark.skip(reason=f"{containers.FLAG}=1: exercises the local launcher's servers")
            )


@pytest.fixture(scope="session", autouse=True)
def backing_servers() -> Iterator[containers.Backend]:
    """Kafka, Cassandra and Redis: the local launcher's (default) or testcontainers' (opt-in).

    In containers mode their ``AGENTBUS_*`` variables are set for the whole session, before any
    settings object is read, so fixtures, tests and service processes all use the containers.
    """
    try:
        backend = containers.select_backend(os.environ, containers.docker_ping)
    except containers.ContainersUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    if backend == "local":
        yield backend
        return
    with containers.started_containers() as endpoints, pytest.MonkeyPatch.context() as patch:
        for name, value in containers.settings_env(endpoints).items():
            patch.setenv(name, value)
        yield backend


@pytest.fixture(scope="session", autouse=True)
def servers_up(backing_servers: containers.Backend) -> None:
    settings = StackSettings()
    local = (
        SERVERS
        if backing_servers == "local"
        else {name: cls for name, cls in SERVERS.items() if name not in containers.CONTAINERIZED}
    )
    down = [name for name, cls in local.items() if not cls(settings).healthy()]
    if down:
        pytest.fail(f"servers not answering: {down}; start them with `make up`", pytrace=False)


@pytest.fixture
def kafka_settings() -> KafkaSettings:
    """Kafka settings with a topic prefix of this test's own."""
    return KafkaSettings.from_env(topic_prefix=f"test-{uuid.uuid4().hex[:10]}", topic_partitions=3)


@pytest.fixture
async def topics(kafka_settings: KafkaSettings) -> KafkaSettings:
    await ensure_topics(kafka_settings, TOPICS)
    return kafka_settings


@pytest.fixture(scope="session")
def cassandra_settings() -> CassandraSettings:
    return CassandraSettings.from_env(cassandra_keyspace=f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def cassandra_session(cassandra_settings: CassandraSettings) -> Iterator[Session]:
    cluster: Cluster
    cluster, session = connect(cassandra_settings, keyspace="")
    apply_migrations(session, cassandra_settings)
    yield session
    if not os.environ.get("AGENTBUS_KEEP_TEST_KEYSPACE"):
        session.execute(f"DROP KEYSPACE IF EXISTS {cassandra_settings.cassandra_keyspace}", timeout=60)
    cluster.shutdown()


@pytest.fixture(scope="session")
def statements(cassandra_session: Session, cassandra_settings: CassandraSettings) -> Statements:
    return Statements(cassandra_session, cassandra_settings.cassandra_keyspace)


@pytest.fixture
async def redis_client() -> AsyncIterator[object]:
    from shared.redis import make_redis

    client = make_redis(RedisSettings.from_env())
    yield client
    await client.aclose()


@pytest.fixture
def triton_settings() -> TritonSettings:
    return TritonSettings.from_env()


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def service_processes(
    topics: KafkaSettings, cassandra_settings: CassandraSettings, cassandra_session: Session, tmp_path: Path
) -> Iterator[Callable[..., ServiceReplicas]]:
    """Start the four services as real processes (the project's supervisor) on this test's topics."""
    prefix = topics.topic_prefix
    env = {
        "AGENTBUS_TOPIC_PREFIX": prefix,
        "AGENTBUS_TOPIC_PARTITIONS": str(topics.topic_partitions),
        "AGENTBUS_CASSANDRA_KEYSPACE": cassandra_settings.cassandra_keyspace,
        "AGENTBUS_TENANT_SECRETS": json.dumps(SECRETS),
        "AGENTBUS_INGRESS_GROUP": f"{prefix}-ingress",
        "AGENTBUS_REASONING_GROUP": f"{prefix}-reasoning",
        "AGENTBUS_TOOL_EXEC_GROUP": f"{prefix}-tool-exec",
        "AGENTBUS_CHECKPOINT_GROUP": f"{prefix}-checkpoint",
        "AGENTBUS_TENANT_RATE_PER_S": "100000",
        "AGENTBUS_TENANT_BURST": "100000",
        # Failover is bounded by the session timeout: a dead member is noticed after it.
        "AGENTBUS_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "AGENTBUS_KAFKA_HEARTBEAT_MS": "1000",
        "AGENTBUS_SHUTDOWN_GRACE_S": "10",
        # Spans as JSON lines in this test's folder, exported within 0.2 s.
        "AGENTBUS_TRACE_DIR": str(tmp_path / "traces"),
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    sup = ServiceReplicas(StackSettings(home=str(tmp_path)), base_port=free_base_port(), env=env)

    def start(**counts: int) -> ServiceReplicas:
        names = {"ingress": 1, "tool_exec": 1, "checkpoint": 1, "reasoning": 2} | counts
        for name, n in names.items():
            sup.start(name.replace("_", "-"), n, wait=False)
        for name in names:
            sup.wait_ready(sup.known(name.replace("_", "-")), timeout=90)
        return sup

    try:
        yield start
    finally:
        for name in ("ingress", "reasoning", "tool-exec", "checkpoint"):
            sup.stop(name, timeout=20)
