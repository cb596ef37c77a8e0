"""Settings of the checkpoint service (batching, snapshots)."""

from dataclasses import dataclass

from shared.settings import CassandraSettings, KafkaSettings, ServiceSettings, setting


@dataclass(frozen=True)
class CheckpointSettings(ServiceSettings, KafkaSettings, CassandraSettings):
    service_name: str = setting("AGENTBUS_SERVICE_NAME", "checkpoint", "Name in logs, traces and client ids")
    http_port: int = setting("AGENTBUS_HTTP_PORT", 8084, "Port of /healthz, /readyz and /metrics")
    group_id: str = setting("AGENTBUS_CHECKPOINT_GROUP", "agentbus-checkpoint", "Consumer group of events")
    batch_max_events: int = setting("AGENTBUS_CHECKPOINT_BATCH_MAX", 500, "Events per Cassandra write batch")
    batch_linger_ms: int = setting("AGENTBUS_CHECKPOINT_LINGER_MS", 20, "Wait to fill a batch")
    snapshot_every: int = setting("AGENTBUS_SNAPSHOT_EVERY", 100, "Write a snapshot every N events")
