"""Typed settings: every field declares its environment variable, default and description.

A settings class is a frozen dataclass whose fields are made with :func:`setting`.
Classes compose by inheritance (a service's settings inherit the adapters' groups it
uses), so every service has exactly one settings object, read once at start-up:

    settings = IngressSettings.from_env()
    print(IngressSettings.describe())   # what `--help` shows
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """An environment variable holds a value its setting cannot take."""


def setting(env: str, default: T, doc: str) -> T:
    """Declare a settings field read from ``env``, with ``default`` and a one-line ``doc``."""
    return dataclasses.field(default=default, metadata={"env": env, "doc": doc})


def _parse(raw: str, kind: Any, env: str) -> object:
    origin = typing.get_origin(kind)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
        return tuple(_parse(part.strip(), item, env) for part in raw.split(",") if part.strip())
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if raw == "" else _parse(raw, args[0], env)
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
    except ValueError as exc:
        raise SettingsError(f"{env}={raw!r}: {exc}") from exc
    raise TypeError(f"{env}: unsupported settings type {kind!r}")


@dataclass(frozen=True)
class Settings:
    """Base of every settings group."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Read every field from ``environ`` (default ``os.environ``); ``overrides`` win over both."""
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif f.metadata.get("env") in env:
                values[f.name] = _parse(env[f.metadata["env"]], hints[f.name], f.metadata["env"])
        return cls(**values)

    @classmethod
    def describe(cls) -> str:
        """One line per field: environment variable, default, description."""
        rows = [(f.metadata["env"], repr(f.default), f.metadata["doc"]) for f in dataclasses.fields(cls)]
        width = max(len(r[0]) for r in rows) if rows else 0
        dwidth = min(max((len(r[1]) for r in rows), default=0), 30)
        return "\n".join(f"{env:<{width}}  {default:<{dwidth}}  {doc}" for env, default, doc in rows)

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> environment variable."""
        return {f.name: f.metadata["env"] for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class ServiceSettings(Settings):
    service_name: str = setting("AGENTBUS_SERVICE_NAME", "agentbus", "Name in logs, traces and client ids")
    http_port: int = setting("AGENTBUS_HTTP_PORT", 8080, "Port of /healthz, /readyz and /metrics")
    log_level: str = setting("AGENTBUS_LOG_LEVEL", "INFO", "Python logging level")
    shutdown_grace_s: float = setting(
        "AGENTBUS_SHUTDOWN_GRACE_S", 30.0, "SIGTERM: time to finish in-flight work"
    )
    gc_gen0_threshold: int = setting(
        "AGENTBUS_GC_GEN0_THRESHOLD",
        20000,
        "Allocations between young-generation GC passes (Python's default: 700; 0 keeps it)",
    )
    trace_dir: str = setting(
        "AGENTBUS_TRACE_DIR",
        ".local/traces",
        "Span files (JSON lines) when OTEL_EXPORTER_OTLP_ENDPOINT is unset; empty: no export",
    )


@dataclass(frozen=True)
class KafkaSettings(Settings):
    kafka_bootstrap: str = setting("AGENTBUS_KAFKA_BOOTSTRAP", "127.0.0.1:19092", "Kafka bootstrap servers")
    topic_prefix: str = setting("AGENTBUS_TOPIC_PREFIX", "agentbus", "Prefix of every topic name")
    topic_partitions: int = setting("AGENTBUS_TOPIC_PARTITIONS", 12, "Partitions of each topic at creation")
    topic_replication: int = setting("AGENTBUS_TOPIC_REPLICATION", 1, "Replication factor at topic creation")
    kafka_request_timeout_ms: int = setting(
        "AGENTBUS_KAFKA_REQUEST_TIMEOUT_MS", 30000, "Client request timeout"
    )
    kafka_session_timeout_ms: int = setting(
        "AGENTBUS_KAFKA_SESSION_TIMEOUT_MS", 10000, "Consumer group session timeout (failover time)"
    )
    kafka_heartbeat_ms: int = setting("AGENTBUS_KAFKA_HEARTBEAT_MS", 3000, "Consumer heartbeat interval")
    kafka_max_poll_interval_ms: int = setting(
        "AGENTBUS_KAFKA_MAX_POLL_INTERVAL_MS", 300000, "Longest gap between polls before the group evicts us"
    )
    kafka_max_poll_records: int = setting("AGENTBUS_KAFKA_MAX_POLL_RECORDS", 500, "Records per getmany()")
    commit_batch: int = setting(
        "AGENTBUS_COMMIT_BATCH", 500, "Most input records finished in one transaction (group commit)"
    )
    kafka_linger_ms: int = setting(
        "AGENTBUS_KAFKA_LINGER_MS",
        0,
        "Producer batching delay (records still batch while a send is in flight)",
    )
    kafka_retry_backoff_ms: int = setting(
        "AGENTBUS_KAFKA_RETRY_BACKOFF_MS", 10, "Producer wait before retrying a failed request"
    )
    kafka_txn_retry_backoff_ms: int = setting(
        "AGENTBUS_KAFKA_TXN_RETRY_BACKOFF_MS",
        5,
        "Wait before asking again to start a transaction while the previous one's markers are written",
    )
    kafka_compression: str = setting(
        "AGENTBUS_KAFKA_COMPRESSION", "lz4", "Producer compression codec or none"
    )
    kafka_max_batch_bytes: int = setting("AGENTBUS_KAFKA_MAX_BATCH_BYTES", 262144, "Producer batch size")
    kafka_max_request_bytes: int = setting(
        "AGENTBUS_KAFKA_MAX_REQUEST_BYTES", 1048576, "Largest produce request (and so record)"
    )
    kafka_transaction_timeout_ms: int = setting(
        "AGENTBUS_KAFKA_TRANSACTION_TIMEOUT_MS", 60000, "Broker aborts a transaction left open this long"
    )
    kafka_transaction_deadline_ms: int = setting(
        "AGENTBUS_KAFKA_TRANSACTION_DEADLINE_MS",
        30000,
        "A transaction (or producer start) not done by then is abandoned and its producer replaced",
    )
    scale_lag_target: int = setting(
        "AGENTBUS_SCALE_LAG_TARGET", 1000, "Consumer lag per replica that scaling aims at"
    )

    def topic(self, name: str) -> str:
        """Full topic name of a logical topic (``inbox`` -> ``agentbus.reasoning.inbox``)."""
        return f"{self.topic_prefix}.{name}"


@dataclass(frozen=True)
class CassandraSettings(Settings):
    cassandra_hosts: tuple[str, ...] = setting("AGENTBUS_CASSANDRA_HOSTS", ("127.0.0.1",), "Contact points")
    cassandra_port: int = setting("AGENTBUS_CASSANDRA_PORT", 19042, "CQL native transport port")
    cassandra_keyspace: str = setting("AGENTBUS_CASSANDRA_KEYSPACE", "agentbus", "Keyspace of every table")
    cassandra_local_dc: str = setting("AGENTBUS_CASSANDRA_LOCAL_DC", "datacenter1", "Data centre to prefer")
    cassandra_replication: int = setting(
        "AGENTBUS_CASSANDRA_REPLICATION", 1, "Replication factor when the migrations create the keyspace"
    )
    cassandra_consistency: str = setting(
        "AGENTBUS_CASSANDRA_CONSISTENCY", "LOCAL_QUORUM", "Consistency of reads and writes"
    )
    cassandra_serial_consistency: str = setting(
        "AGENTBUS_CASSANDRA_SERIAL_CONSISTENCY", "LOCAL_SERIAL", "Consistency of lightweight transactions"
    )
    cassandra_request_timeout_s: float = setting("AGENTBUS_CASSANDRA_TIMEOUT_S", 10.0, "Per-request timeout")


@dataclass(frozen=True)
class RedisSettings(Settings):
    redis_url: str = setting("AGENTBUS_REDIS_URL", "redis://127.0.0.1:16379/0", "Redis URL")
    redis_timeout_s: float = setting("AGENTBUS_REDIS_TIMEOUT_S", 2.0, "Socket connect and read timeout")
    redis_max_connections: int = setting("AGENTBUS_REDIS_MAX_CONNECTIONS", 64, "Connection pool size")
    hot_context_ttl_s: int = setting("AGENTBUS_HOT_CONTEXT_TTL_S", 3600, "TTL of a session's hot context")


@dataclass(frozen=True)
class TritonSettings(Settings):
    triton_url: str = setting("AGENTBUS_TRITON_URL", "127.0.0.1:18001", "Triton gRPC endpoint host:port")
    triton_model: str = setting("AGENTBUS_TRITON_MODEL", "reference_policy", "Model to generate with")
    triton_timeout_s: float = setting("AGENTBUS_TRITON_TIMEOUT_S", 30.0, "Deadline of one generation")
    triton_max_tokens: int = setting("AGENTBUS_TRITON_MAX_TOKENS", 512, "max_tokens sampling parameter")
    triton_temperature: float = setting("AGENTBUS_TRITON_TEMPERATURE", 0.0, "temperature sampling parameter")
    triton_sampling: str = setting(
        "AGENTBUS_TRITON_SAMPLING", "", "More sampling parameters, a JSON object merged into every request"
    )
