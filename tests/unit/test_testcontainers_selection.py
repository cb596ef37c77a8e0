"""The testcontainers opt-in: which servers the integration tests use, and how settings follow."""

from __future__ import annotations

import pytest

from shared.settings import CassandraSettings, KafkaSettings, RedisSettings
from tests.integration import containers
from tests.integration.containers import ContainersUnavailable, Endpoints, select_backend


class Ping:
    """A stand-in for the Docker ping that records whether it was asked."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("environ", [{}, {"AGENTBUS_TESTCONTAINERS": "0"}, {"AGENTBUS_TESTCONTAINERS": ""}])
def test_unset_or_zero_keeps_the_local_servers_and_never_asks_docker(environ: dict[str, str]) -> None:
    ping = Ping(error=AssertionError("must not be called"))
    assert select_backend(environ, ping) == "local"
    assert ping.calls == 0


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_set_with_a_docker_engine_selects_containers(value: str) -> None:
    ping = Ping()
    assert select_backend({"AGENTBUS_TESTCONTAINERS": value}, ping) == "testcontainers"
    assert ping.calls == 1


def test_set_without_a_docker_engine_fails_clearly_instead_of_falling_back() -> None:
    ping = Ping(error=ConnectionError("No such file or directory: /var/run/docker.sock"))
    with pytest.raises(ContainersUnavailable) as failure:
        select_backend({"AGENTBUS_TESTCONTAINERS": "1"}, ping)
    message = str(failure.value)
    assert "AGENTBUS_TESTCONTAINERS=1" in message
    assert "no Docker engine answers" in message
    assert "docker.sock" in message  # the engine's own error is kept
    assert "make up" in message  # and the way back to the local servers is named


def test_a_value_that_is_neither_yes_nor_no_is_an_error() -> None:
    with pytest.raises(ValueError, match="AGENTBUS_TESTCONTAINERS='maybe'"):
        select_backend({"AGENTBUS_TESTCONTAINERS": "maybe"}, Ping())


def test_settings_read_from_the_environment_point_at_the_containers() -> None:
    endpoints = Endpoints(
        kafka_bootstrap="localhost:32801",
        cassandra_host="172.17.0.1",
        cassandra_port=32802,
        cassandra_local_dc="datacenter1",
        redis_url="redis://localhost:32803/0",
    )
    environ = containers.settings_env(endpoints)
    assert all(name.startswith("AGENTBUS_") for name in environ)
    assert KafkaSettings.from_env(environ).kafka_bootstrap == "localhost:32801"
    cassandra = CassandraSettings.from_env(environ)
    assert cassandra.cassandra_hosts == ("172.17.0.1",)
    assert cassandra.cassandra_port == 32802
    assert cassandra.cassandra_local_dc == "datacenter1"
    assert RedisSettings.from_env(environ).redis_url == "redis://localhost:32803/0"


def test_the_container_broker_has_the_local_brokers_transaction_and_topic_settings() -> None:
    env = containers.kafka_broker_env()
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    # Hosts, listeners and paths are the container's own.
    assert not {"KAFKA_LISTENERS", "KAFKA_ADVERTISED_LISTENERS", "KAFKA_LOG_DIRS", "KAFKA_NODE_ID"} & set(env)


def test_confluent_variable_names_escape_underscores_and_dashes() -> None:
    env = containers.kafka_broker_env("# comment\nsome_prop.with-dash=7\nlisteners=PLAINTEXT://x:1\n")
    assert env == {"KAFKA_SOME__PROP_WITH___DASH": "7"}


def test_only_kafka_cassandra_and_redis_leave_the_local_launcher() -> None:
    from infra.local.stack import SERVERS

    assert set(SERVERS) > containers.CONTAINERIZED
    assert set(SERVERS) - containers.CONTAINERIZED == {"triton"}
