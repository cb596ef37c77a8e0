"""Metrics from real service processes: lag, scaling signal, dead letters by reason; agentctl top."""

from __future__ import annotations

import asyncio
import contextlib
import io
import urllib.request
import uuid
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from agentctl import cli
from infra.local.services import ServiceReplicas
from shared.kafka import make_producer
from shared.settings import KafkaSettings
from tests.integration.agent_stack import Client

SERVICES = ("ingress", "reasoning", "tool-exec", "checkpoint")


def _samples(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


async def test_every_replica_exports_lag_and_a_scaling_signal_and_top_shows_them(
    service_processes: Callable[..., ServiceReplicas], topics: KafkaSettings
) -> None:
    sup = service_processes(reasoning=1)
    async with Client(topics) as client:
        reply = await client.ask("acme", f"m-{uuid.uuid4().hex[:6]}", "what is 6*7", within_s=60)
    assert reply["kind"] == "FINAL"
    producer = make_producer(topics, client_id="metrics-test")
    await producer.start()
    try:
        await producer.send_and_wait(topics.topic("ingress"), b"not avro at all", key=b"acme/x")
    finally:
        await producer.stop()

    async def scraped() -> dict[str, dict[str, list[tuple[dict[str, str], float]]]]:
        return {name: await asyncio.to_thread(_samples, sup.ports(name)[0]) for name in SERVICES}

    for _ in range(40):  # the lag monitors sample every few seconds
        metrics = await scraped()
        lag_seen = all("agentbus_consumer_lag_records" in metrics[n] for n in SERVICES)
        dead = metrics["ingress"].get("agentbus_dead_letters_total", [])
        if lag_seen and any(labels.get("reason_code") == "bad_magic" for labels, _ in dead):
            break
        await asyncio.sleep(0.5)
    for name in SERVICES:
        lags = metrics[name]["agentbus_consumer_lag_records"]
        assert {labels["service"] for labels, _ in lags} == {name}
        assert all(value >= 0 for _, value in lags)
        (signal,) = metrics[name]["agentbus_scaling_signal"]
        assert signal[0] == {"service": name} and signal[1] >= 0
    dead = metrics["ingress"]["agentbus_dead_letters_total"]
    assert any(labels["reason_code"] == "bad_magic" and value >= 1 for labels, value in dead), dead
    assert metrics["reasoning"]["agentbus_model_call_seconds_count"][0][1] >= 2
    # The session was new: ingress's claim created it, so reasoning did not look it up.
    loads = dict(
        (labels["source"], v) for labels, v in metrics["reasoning"]["agentbus_reasoning_context_loads_total"]
    )
    assert loads.get("created", 0) >= 1 and "new" not in loads, loads
    assert "agentbus_checkpoint_lag_seconds" in metrics["checkpoint"]
    for name in ("ingress", "reasoning"):  # transactions opened while their records were handled
        txns = metrics[name]["agentbus_kafka_transactions_total"]
        early = sum(v for labels, v in txns if labels == {"opened": "early", "outcome": "committed"})
        assert early >= 1, txns
        assert metrics[name]["agentbus_kafka_transaction_seconds_count"][0][1] >= early

    targets = ",".join(f"127.0.0.1:{sup.ports(name)[0]}" for name in SERVICES)
    out = io.StringIO()
    args = cli.build_parser().parse_args(["top", "--once", "--interval", "0.5", "--targets", targets])
    with contextlib.redirect_stdout(out):
        assert await cli.run(args) == 0
    text = out.getvalue()
    for name in SERVICES:
        assert name in text, text
    assert "bad_magic" in text, text
