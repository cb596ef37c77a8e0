"""Opt-in testcontainers for the integration tests: Kafka, Cassandra and Redis in Docker.

By default (``AGENTBUS_TESTCONTAINERS`` unset or 0) the integration tests use the servers of
the local launcher (`make up`) and nothing here runs. With ``AGENTBUS_TESTCONTAINERS=1`` the
session starts a single-node KRaft Kafka, Cassandra 5.0 and Redis 7 with testcontainers and
points the settings at them by setting their ``AGENTBUS_*`` variables (every settings object
of the tests and every service process they start reads the environment). Triton stays on
the local launcher. Asking for containers where no Docker engine answers is an error, never
a quiet fallback to the local servers.

testcontainers 4.15 keeps its modules under ``testcontainers.community`` (the old
``testcontainers.kafka`` paths are deprecated aliases).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shared.settings import CassandraSettings, KafkaSettings, RedisSettings

FLAG = "AGENTBUS_TESTCONTAINERS"
# The local launcher's servers these containers replace (Triton is not among them).
CONTAINERIZED = frozenset({"kafka", "cassandra", "redis"})

# Confluent Platform 7.9 is Apache Kafka 3.9, the line the local launcher runs.
KAFKA_IMAGE = "confluentinc/cp-kafka:7.9.0"
CASSANDRA_IMAGE = "cassandra:5.0.4"
REDIS_IMAGE = "redis:7.4"

_SERVER_PROPERTIES = Path(__file__).resolve().parents[2] / "infra/local/kafka/server.properties.in"
# Properties that name hosts, ports, roles or paths: KafkaContainer sets its own.
_CONTAINER_OWNED = frozenset(
    {
        "process.roles",
        "node.id",
        "controller.quorum.voters",
        "listeners",
        "advertised.listeners",
        "listener.security.protocol.map",
        "controller.listener.names",
        "inter.broker.listener.name",
        "log.dirs",
    }
)

Backend = Literal["local", "testcontainers"]


class ContainersUnavailable(RuntimeError):
    """Containers were asked for and no Docker engine answers."""


def requested(environ: Mapping[str, str]) -> bool:
    """Whether ``AGENTBUS_TESTCONTAINERS`` asks for containers (1/true/yes/on; unset, 0: no)."""
    raw = environ.get(FLAG, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{FLAG}={environ[FLAG]!r}: expected 1 (containers) or 0 (local servers)")


def select_backend(environ: Mapping[str, str], docker_ping: Callable[[], object]) -> Backend:
    """Which servers the integration tests use; ``docker_ping`` is called only if containers are asked for.

    Raises:
        ContainersUnavailable: containers were asked for and ``docker_ping`` failed.
        ValueError: ``AGENTBUS_TESTCONTAINERS`` holds something other than a yes or no.
    """
    if not requested(environ):
        return "local"
    try:
        docker_ping()
    except Exception as exc:
        raise ContainersUnavailable(
            f"{FLAG}=1 asks for Kafka, Cassandra and Redis in testcontainers, but no Docker engine "
            f"answers ({type(exc).__name__}: {exc}). Start Docker (or set DOCKER_HOST), or unset "
            f"{FLAG} to test against the local servers of `make up`."
        ) from exc
    return "testcontainers"


def docker_ping() -> None:
    """Ask the Docker engine testcontainers would use (DOCKER_HOST, the docker context) for a ping."""
    from testcontainers.core.docker_client import DockerClient

    DockerClient().client.ping()


@dataclass(frozen=True)
class Endpoints:
    """Where the containers answer, as seen from this host."""

    kafka_bootstrap: str
    cassandra_host: str
    cassandra_port: int
    cassandra_local_dc: str
    redis_url: str


def settings_env(endpoints: Endpoints) -> dict[str, str]:
    """The ``AGENTBUS_*`` variables that point Kafka/Cassandra/Redis settings at ``endpoints``."""
    kafka, cassandra, redis = (
        KafkaSettings.env_names(),
        CassandraSettings.env_names(),
        RedisSettings.env_names(),
    )
    return {
        kafka["kafka_bootstrap"]: endpoints.kafka_bootstrap,
        cassandra["cassandra_hosts"]: endpoints.cassandra_host,
        cassandra["cassandra_port"]: str(endpoints.cassandra_port),
        cassandra["cassandra_local_dc"]: endpoints.cassandra_local_dc,
        redis["redis_url"]: endpoints.redis_url,
    }


def kafka_broker_env(properties: str | None = None) -> dict[str, str]:
    """The local broker's settings (server.properties.in) as Confluent image variables.

    Transactions need the transaction-state log at replication 1 on a single broker, and topics
    must not be auto-created: the same broker the local launcher runs, minus hosts and paths.
    """
    text = _SERVER_PROPERTIES.read_text() if properties is None else properties
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if key in _CONTAINER_OWNED:
            continue
        # Confluent's rule: '.' -> '_', '_' -> '__', '-' -> '___', upper case, prefix KAFKA_.
        name = key.replace("_", "__").replace("-", "___").replace(".", "_").upper()
        env[f"KAFKA_{name}"] = value
    return env


@contextlib.contextmanager
def started_containers(startup_timeout_s: int = 300) -> Iterator[Endpoints]:
    """Start Kafka (KRaft), Cassandra and Redis side by side; stop and remove them afterwards."""
    from testcontainers.community.cassandra import CassandraContainer
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.redis import RedisContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    kafka = KafkaContainer(KAFKA_IMAGE).with_kraft()
    for key, value in kafka_broker_env().items():
        kafka.with_env(key, value)
    # Cassandra 5 can take longer than testcontainers' default wait (120 s) on a small machine.
    cassandra = CassandraContainer(CASSANDRA_IMAGE).waiting_for(
        LogMessageWaitStrategy("Startup complete").with_startup_timeout(startup_timeout_s)
    )
    redis = RedisContainer(REDIS_IMAGE)
    starts: list[Callable[[], Any]] = [
        lambda: kafka.start(timeout=startup_timeout_s),
        cassandra.start,
        redis.start,
    ]
    with contextlib.ExitStack() as stack:
        for container in (kafka, cassandra, redis):
            stack.callback(container.stop)  # stop() of a container never created does nothing
        with ThreadPoolExecutor(max_workers=len(starts)) as pool:
            for future in [pool.submit(start) for start in starts]:
                future.result()
        (cassandra_host, cassandra_port), *_ = cassandra.get_contact_points()
        yield Endpoints(
            kafka_bootstrap=kafka.get_bootstrap_server(),
            cassandra_host=cassandra_host,
            cassandra_port=int(cassandra_port),
            cassandra_local_dc=cassandra.get_local_datacenter(),
            redis_url=f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(redis.port)}/0",
        )
