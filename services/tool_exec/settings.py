"""Settings of the tool-exec service (slots, timeouts, retries, artifacts)."""

from dataclasses import dataclass

from shared.settings import CassandraSettings, KafkaSettings, RedisSettings, ServiceSettings, setting


@dataclass(frozen=True)
class ToolExecSettings(ServiceSettings, KafkaSettings, CassandraSettings, RedisSettings):
    service_name: str = setting("AGENTBUS_SERVICE_NAME", "tool-exec", "Name in logs, traces and client ids")
    http_port: int = setting("AGENTBUS_HTTP_PORT", 8083, "Port of /healthz, /readyz and /metrics")
    group_id: str = setting("AGENTBUS_TOOL_EXEC_GROUP", "agentbus-tool-exec", "Consumer group of tool.calls")
    slots: int = setting("AGENTBUS_TOOL_SLOTS", 64, "Tool executions in flight per replica")
    commit_interval_s: float = setting(
        "AGENTBUS_TOOL_COMMIT_INTERVAL_S", 0.5, "How often finished tool.calls offsets are committed"
    )
    default_timeout_s: float = setting("AGENTBUS_TOOL_TIMEOUT_S", 30.0, "Timeout of a tool without its own")
    max_attempts: int = setting("AGENTBUS_TOOL_MAX_ATTEMPTS", 3, "Attempts for transient tool errors")
    record_read_only: bool = setting(
        "AGENTBUS_RECORD_READ_ONLY_RESULTS",
        False,
        "Also keep read-only tools' results in tool_results (they are in the event log either way)",
    )
    artifact_threshold_bytes: int = setting(
        "AGENTBUS_ARTIFACT_THRESHOLD_BYTES", 8192, "Outputs larger than this are stored as artifacts"
    )
    http_allowlist: tuple[str, ...] = setting(
        "AGENTBUS_HTTP_ALLOWLIST", ("127.0.0.1", "localhost"), "Hosts http.get may fetch"
    )
