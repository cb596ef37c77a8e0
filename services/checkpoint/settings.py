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
    commit_interval_ms: int = setting(
        "AGENTBUS_CHECKPOINT_COMMIT_INTERVAL_MS",
        1000,
        "Commit written offsets at most this often (and when idle, on revocation, on stop)",
    )
    write_concurrency: int = setting(
        "AGENTBUS_CHECKPOINT_WRITE_CONCURRENCY", 64, "Cassandra write requests of one batch in flight at once"
    )
    write_batch_bytes: int = setting(
        "AGENTBUS_CHECKPOINT_WRITE_BATCH_BYTES",
        16384,
        "Most event bytes in one Cassandra batch of sessions on the same replicas "
        "(keep under the cluster's batch_size_fail_threshold; 1 writes each session alone)",
    )
    snapshot_every: int = setting("AGENTBUS_SNAPSHOT_EVERY", 100, "Write a snapshot every N events")
