"""Settings of the ingress service (validation, tenancy, de-duplication, rate limits)."""

from dataclasses import dataclass

from shared.settings import KafkaSettings, RedisSettings, ServiceSettings, setting


@dataclass(frozen=True)
class IngressSettings(ServiceSettings, KafkaSettings, RedisSettings):
    service_name: str = setting("AGENTBUS_SERVICE_NAME", "ingress", "Name in logs, traces and client ids")
    http_port: int = setting("AGENTBUS_HTTP_PORT", 8081, "Port of /healthz, /readyz and /metrics")
    group_id: str = setting(
        "AGENTBUS_INGRESS_GROUP", "agentbus-ingress", "Consumer group of agentbus.ingress"
    )
    max_record_bytes: int = setting(
        "AGENTBUS_INGRESS_MAX_RECORD_BYTES", 65536, "Larger records go to the DLQ"
    )
    max_text_chars: int = setting("AGENTBUS_INGRESS_MAX_TEXT_CHARS", 16000, "Longer messages are rejected")
    tenant_secrets_file: str = setting(
        "AGENTBUS_TENANT_SECRETS_FILE", "", "JSON file {tenant_id: hex secret} for HMAC-SHA256 signatures"
    )
    dedup_ttl_s: int = setting("AGENTBUS_INGRESS_DEDUP_TTL_S", 86400, "How long a message_id is remembered")
    tenant_rate_per_s: float = setting("AGENTBUS_TENANT_RATE_PER_S", 50.0, "Messages per second per tenant")
    tenant_burst: int = setting("AGENTBUS_TENANT_BURST", 100, "Token bucket size per tenant")
    default_policy: str = setting(
        "AGENTBUS_DEFAULT_CONCURRENCY_POLICY", "queue", "queue, reject or interrupt when a turn is running"
    )
