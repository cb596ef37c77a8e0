"""Settings of the ingress service (validation, tenancy, de-duplication, rate limits)."""

from dataclasses import dataclass

from shared.settings import CassandraSettings, KafkaSettings, RedisSettings, ServiceSettings, setting


@dataclass(frozen=True)
class IngressSettings(ServiceSettings, KafkaSettings, RedisSettings, CassandraSettings):
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
        "AGENTBUS_TENANT_SECRETS_FILE",
        "",
        "JSON file {tenant_id: secret} (or {tenant_id: {secret, default_policy}}) for HMAC-SHA256 signatures",
    )
    tenant_secrets: str = setting(
        "AGENTBUS_TENANT_SECRETS",
        "",
        "Inline JSON in the format of AGENTBUS_TENANT_SECRETS_FILE; wins over the file for a tenant",
    )
    dedup_ttl_s: int = setting("AGENTBUS_INGRESS_DEDUP_TTL_S", 86400, "How long a message_id is remembered")
    owner_cache_ttl_s: int = setting(
        "AGENTBUS_INGRESS_OWNER_CACHE_TTL_S", 86400, "How long Redis caches a session's owning tenant"
    )
    tenant_rate_per_s: float = setting("AGENTBUS_TENANT_RATE_PER_S", 50.0, "Messages per second per tenant")
    tenant_burst: int = setting("AGENTBUS_TENANT_BURST", 100, "Token bucket size per tenant")
    default_policy: str = setting(
        "AGENTBUS_DEFAULT_CONCURRENCY_POLICY", "queue", "queue, reject or interrupt when a turn is running"
    )
    retry_backoff_s: float = setting(
        "AGENTBUS_INGRESS_RETRY_BACKOFF_S", 1.0, "Wait before retrying a partition after a dependency failed"
    )
