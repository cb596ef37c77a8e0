"""Settings of the reasoning service (context, model calls, sequencing)."""

from dataclasses import dataclass

from shared.settings import (
    CassandraSettings,
    KafkaSettings,
    RedisSettings,
    ServiceSettings,
    TritonSettings,
    setting,
)


@dataclass(frozen=True)
class ReasoningSettings(ServiceSettings, KafkaSettings, CassandraSettings, RedisSettings, TritonSettings):
    service_name: str = setting("AGENTBUS_SERVICE_NAME", "reasoning", "Name in logs, traces and client ids")
    http_port: int = setting("AGENTBUS_HTTP_PORT", 8082, "Port of /healthz, /readyz and /metrics")
    group_id: str = setting("AGENTBUS_REASONING_GROUP", "agentbus-reasoning", "Consumer group of the inbox")
    checkpoint_group: str = setting(
        "AGENTBUS_CHECKPOINT_GROUP", "agentbus-checkpoint", "Checkpoint's group: where the head scan starts"
    )
    max_steps_per_turn: int = setting("AGENTBUS_MAX_STEPS_PER_TURN", 8, "Model decisions allowed in one turn")
    turn_deadline_s: float = setting(
        "AGENTBUS_TURN_DEADLINE_S", 120.0, "A turn older than this ends in error"
    )
    model_rate_per_s: float = setting("AGENTBUS_MODEL_RATE_PER_S", 200.0, "Model calls/s, shared by replicas")
    model_burst: int = setting("AGENTBUS_MODEL_BURST", 50, "Token bucket size of model calls")
    model_bucket_lease: int = setting(
        "AGENTBUS_MODEL_BUCKET_LEASE",
        16,
        "Model tokens a replica may take ahead while the shared bucket is over half full (0: none)",
    )
    model_bucket_lease_ms: int = setting(
        "AGENTBUS_MODEL_BUCKET_LEASE_MS", 100, "How long tokens taken ahead stay usable before they lapse"
    )
    max_inflight_model_calls: int = setting(
        "AGENTBUS_MAX_INFLIGHT_MODEL_CALLS", 64, "Above this the consumer pauses its partitions"
    )
    context_max_events: int = setting("AGENTBUS_CONTEXT_MAX_EVENTS", 60, "Summarise past this many events")
    tool_call_timeout_s: float = setting(
        "AGENTBUS_TOOL_CALL_TIMEOUT_S", 30.0, "timeout_ms given to each ToolCall (tool-exec enforces it)"
    )
    model_attempts: int = setting("AGENTBUS_MODEL_ATTEMPTS", 4, "Tries of a model call on transient errors")
    rebuild_wait_s: float = setting(
        "AGENTBUS_REBUILD_WAIT_S", 10.0, "Longest wait for the checkpoint to catch up on a cold rebuild"
    )
    context_cache_mb: int = setting(
        "AGENTBUS_CONTEXT_CACHE_MB", 64, "In-memory cache of the states this replica committed; 0: off"
    )
    offset_commit_interval_s: float = setting(
        "AGENTBUS_REASONING_OFFSET_COMMIT_S",
        1.0,
        "Inbox offsets ride one transaction per interval (others publish only); 0: every transaction",
    )
