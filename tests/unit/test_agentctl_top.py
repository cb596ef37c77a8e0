"""agentctl top without servers: parsing /metrics text, rates, quantiles, aggregation, rendering."""

from __future__ import annotations

import datetime as dt
import io
import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agentctl import cli, top
from agentctl.top import Scrape, Target

# What a reasoning replica serves on /metrics (prometheus_client's text format, trimmed).
REASONING_1 = """\
# HELP agentbus_dead_letters_total Records sent to agentbus.dlq
# TYPE agentbus_dead_letters_total counter
agentbus_dead_letters_total{reason_code="bad_magic",service="reasoning"} 2.0
agentbus_dead_letters_created{reason_code="bad_magic",service="reasoning"} 1.7466e+09
# HELP agentbus_reasoning_records_total Inbox records handled
# TYPE agentbus_reasoning_records_total counter
agentbus_reasoning_records_total{outcome="handled"} 100.0
agentbus_reasoning_records_total{outcome="retried"} 7.0
# HELP agentbus_model_call_seconds Latency of one model call
# TYPE agentbus_model_call_seconds histogram
agentbus_model_call_seconds_bucket{le="0.005"} 0.0
agentbus_model_call_seconds_bucket{le="0.01"} 10.0
agentbus_model_call_seconds_bucket{le="0.025"} 40.0
agentbus_model_call_seconds_bucket{le="0.05"} 50.0
agentbus_model_call_seconds_bucket{le="+Inf"} 50.0
agentbus_model_call_seconds_count 50.0
agentbus_model_call_seconds_sum 0.9
# HELP agentbus_reasoning_sessions_in_flight Sessions with records being handled
# TYPE agentbus_reasoning_sessions_in_flight gauge
agentbus_reasoning_sessions_in_flight 3.0
# HELP agentbus_reasoning_model_calls_in_flight Model calls in flight
# TYPE agentbus_reasoning_model_calls_in_flight gauge
agentbus_reasoning_model_calls_in_flight 2.0
# HELP agentbus_consumer_lag_records Records of an assigned partition not yet fetched
# TYPE agentbus_consumer_lag_records gauge
agentbus_consumer_lag_records{group="g-reasoning",partition="0",service="reasoning",topic="ab.inbox"} 10.0
agentbus_consumer_lag_records{group="g-reasoning",partition="1",service="reasoning",topic="ab.inbox"} 0.0
# HELP agentbus_scaling_signal max(lag/target, busy/capacity)
# TYPE agentbus_scaling_signal gauge
agentbus_scaling_signal{service="reasoning"} 0.5
# HELP agentbus_scaling_busy Work in use
# TYPE agentbus_scaling_busy gauge
agentbus_scaling_busy{service="reasoning"} 2.0
# HELP agentbus_scaling_capacity Capacity
# TYPE agentbus_scaling_capacity gauge
agentbus_scaling_capacity{service="reasoning"} 4.0
# HELP agentbus_token_bucket_saturation 0 = full, 1 = empty
# TYPE agentbus_token_bucket_saturation gauge
agentbus_token_bucket_saturation{bucket="model"} 0.25
# HELP agentbus_checkpoint_lag_seconds Age of the oldest event of the last batch
# TYPE agentbus_checkpoint_lag_seconds gauge
agentbus_checkpoint_lag_seconds 0.0
# HELP agentbus_checkpoint_last_event_timestamp_seconds occurred_at of that event
# TYPE agentbus_checkpoint_last_event_timestamp_seconds gauge
agentbus_checkpoint_last_event_timestamp_seconds 0.0
"""

# The same replica two seconds later: 40 more records handled, 50 more model calls.
REASONING_1_LATER = (
    REASONING_1.replace('{outcome="handled"} 100.0', '{outcome="handled"} 140.0')
    .replace('{outcome="retried"} 7.0', '{outcome="retried"} 70.0')
    .replace('{le="0.01"} 10.0', '{le="0.01"} 10.0')
    .replace('{le="0.025"} 40.0', '{le="0.025"} 40.0')
    .replace('{le="0.05"} 50.0', '{le="0.05"} 100.0')
    .replace('{le="+Inf"} 50.0', '{le="+Inf"} 100.0')
)

# A second replica that also (briefly, mid-rebalance) reports partition 0, and owns 2.
REASONING_2 = """\
# HELP agentbus_reasoning_records_total Inbox records handled
# TYPE agentbus_reasoning_records_total counter
agentbus_reasoning_records_total{outcome="handled"} 5.0
# HELP agentbus_consumer_lag_records Records not yet fetched
# TYPE agentbus_consumer_lag_records gauge
agentbus_consumer_lag_records{group="g-reasoning",partition="0",service="reasoning",topic="ab.inbox"} 12.0
agentbus_consumer_lag_records{group="g-reasoning",partition="2",service="reasoning",topic="ab.inbox"} 30.0
# HELP agentbus_scaling_signal max(lag/target, busy/capacity)
# TYPE agentbus_scaling_signal gauge
agentbus_scaling_signal{service="reasoning"} 1.25
# HELP agentbus_scaling_busy Work in use
# TYPE agentbus_scaling_busy gauge
agentbus_scaling_busy{service="reasoning"} 5.0
# HELP agentbus_scaling_capacity Capacity
# TYPE agentbus_scaling_capacity gauge
agentbus_scaling_capacity{service="reasoning"} 4.0
# HELP agentbus_token_bucket_saturation 0 = full, 1 = empty
# TYPE agentbus_token_bucket_saturation gauge
agentbus_token_bucket_saturation{bucket="model"} 1.0
# HELP agentbus_dead_letters_total Records sent to agentbus.dlq
# TYPE agentbus_dead_letters_total counter
agentbus_dead_letters_total{reason_code="bad_magic",service="reasoning"} 1.0
agentbus_dead_letters_total{reason_code="handler_error",service="reasoning"} 1.0
"""

CHECKPOINT = """\
# HELP agentbus_checkpoint_events_written_total Events written to the Cassandra log
# TYPE agentbus_checkpoint_events_written_total counter
agentbus_checkpoint_events_written_total 500.0
agentbus_checkpoint_events_written_created 1.7466e+09
# HELP agentbus_checkpoint_lag_seconds Age of the oldest event of the last batch
# TYPE agentbus_checkpoint_lag_seconds gauge
agentbus_checkpoint_lag_seconds 0.35
# HELP agentbus_checkpoint_last_event_timestamp_seconds occurred_at of that event
# TYPE agentbus_checkpoint_last_event_timestamp_seconds gauge
agentbus_checkpoint_last_event_timestamp_seconds 1.7466e+09
# HELP agentbus_scaling_signal max(lag/target, busy/capacity)
# TYPE agentbus_scaling_signal gauge
agentbus_scaling_signal{service="checkpoint"} 0.0
"""

INGRESS = """\
# HELP agentbus_ingress_records_total Ingress records by outcome and reason
# TYPE agentbus_ingress_records_total counter
agentbus_ingress_records_total{outcome="forwarded",reason=""} 20.0
agentbus_ingress_records_total{outcome="rejected",reason="rate_limited"} 2.0
# HELP agentbus_token_bucket_saturation 0 = full, 1 = empty
# TYPE agentbus_token_bucket_saturation gauge
agentbus_token_bucket_saturation{bucket="tenant"} 0.1
"""

TOOL_EXEC = """\
# HELP agentbus_tool_calls_total Tool calls finished
# TYPE agentbus_tool_calls_total counter
agentbus_tool_calls_total{status="OK",tool="calculator"} 3.0
# HELP agentbus_tool_slots_in_use Tool calls executing or waiting on this replica
# TYPE agentbus_tool_slots_in_use gauge
agentbus_tool_slots_in_use 1.0
"""


def _scrape(address: str, text: str | None, at: float, service: str | None = None) -> Scrape:
    target = Target(address, service)
    if text is None:
        return Scrape(target, at, error="ConnectionRefusedError")
    return Scrape(target, at, top.parse_metrics(text))


def test_parse_keeps_sample_names_and_labels() -> None:
    m = top.parse_metrics(REASONING_1)
    assert m.total("agentbus_reasoning_records_total") == 107.0
    assert m.total("agentbus_reasoning_records_total", {"outcome": "retried"}) == 100.0
    assert m.total("agentbus_reasoning_sessions_in_flight") == 3.0
    assert m.total("agentbus_nothing") is None
    lags = {s.labels["partition"]: s.value for s in m.get("agentbus_consumer_lag_records")}
    assert lags == {"0": 10.0, "1": 0.0}
    assert m.has_family("agentbus_dead_letters")


@pytest.mark.parametrize(
    ("text", "service"),
    [(REASONING_1, "reasoning"), (CHECKPOINT, "checkpoint"), (INGRESS, "ingress"), (TOOL_EXEC, "tool-exec")],
)
def test_the_service_is_recognised_from_its_metrics(text: str, service: str) -> None:
    assert top.detect_service(top.parse_metrics(text)) == service


def test_a_counter_family_without_samples_still_names_the_service() -> None:
    text = "# HELP agentbus_tool_calls_total Tool calls\n# TYPE agentbus_tool_calls_total counter\n"
    assert top.detect_service(top.parse_metrics(text)) == "tool-exec"
    assert top.detect_service(top.parse_metrics("# TYPE x gauge\nx 1\n")) is None


def test_counter_rate_handles_a_restart_and_missing_readings() -> None:
    assert top.counter_rate(100, 140, 2.0) == 20.0
    assert top.counter_rate(100, 30, 2.0) == 15.0  # the process restarted: counts from zero
    assert top.counter_rate(None, 5, 2.0) is None
    assert top.counter_rate(1, 5, 0) is None


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.01, 10.0), (0.025, 40.0), (0.05, 50.0), (math.inf, 50.0)]
    assert top.histogram_quantile(0.5, buckets) == pytest.approx(0.01 + 0.015 * (25 - 10) / 30)
    assert top.histogram_quantile(0.99, buckets) == pytest.approx(0.025 + 0.025 * (49.5 - 40) / 10)
    assert top.histogram_quantile(0.1, buckets) == pytest.approx(0.005)  # first bucket starts at 0
    # Ranks in the +Inf bucket get the largest finite bound; no observations, no quantile.
    assert top.histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1
    assert top.histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert top.histogram_quantile(0.5, []) is None


def test_views_aggregate_replicas_of_a_service() -> None:
    before = {
        "h:1": _scrape("h:1", REASONING_1, 10.0),
        "h:9": _scrape("h:9", CHECKPOINT.replace("500.0", "100.0"), 10.0),
    }
    after = [
        _scrape("h:1", REASONING_1_LATER, 12.0),
        _scrape("h:2", REASONING_2, 12.0),  # new replica: no rate yet
        _scrape("h:3", None, 12.0, service="reasoning"),  # down
        _scrape("h:9", CHECKPOINT, 12.5),
        _scrape("h:5", INGRESS, 12.0),
    ]
    views = {v.service: v for v in top.build_views(before, after)}
    assert list(views) == ["ingress", "reasoning", "checkpoint"]  # pipeline order
    r = views["reasoning"]
    assert (r.replicas_up, r.replicas_known) == (2, 3)
    assert r.records_per_s == pytest.approx(20.0)  # handled 100 -> 140 in 2 s; retries left out
    assert r.lag_total == 12.0 + 0.0 + 30.0  # partition 0 counted once, at its larger reading
    assert (r.lag_max, r.lag_max_partition, r.partitions) == (30.0, "2", 3)
    assert (r.busy, r.capacity) == (7.0, 8.0)
    assert (r.signal_sum, r.signal_max) == (1.75, 1.25)
    assert r.wanted_replicas == 2
    assert r.gauges == [("sessions in flight", 3.0), ("model calls in flight", 2.0)]
    # The window holds the 50 calls of the last 2 s, all between 25 and 50 ms.
    assert r.latency_window and r.latency_calls == 50.0
    assert r.latency_p50 == pytest.approx(0.025 + 0.025 * 25 / 50)
    assert r.buckets == {"model": 1.0}
    assert r.dead_letters == {"bad_magic": 3.0, "handler_error": 1.0}
    assert r.checkpoint_lag_s is None  # a reasoning replica never wrote a checkpoint
    c = views["checkpoint"]
    assert c.records_per_s == pytest.approx(400 / 2.5)
    assert c.checkpoint_lag_s == 0.35
    assert c.wanted_replicas == 1  # a signal of 0 still needs one replica
    assert views["ingress"].buckets == {"tenant": 0.1}
    assert views["ingress"].records_per_s is None  # first scrape of it


def test_without_calls_in_the_window_latency_is_lifetime() -> None:
    before = {"h:1": _scrape("h:1", REASONING_1, 0.0)}
    (view,) = top.build_views(before, [_scrape("h:1", REASONING_1, 2.0)])
    assert not view.latency_window and view.latency_calls == 50.0
    assert view.latency_p50 is not None


def test_wanted_replicas_are_capped_by_the_partitions() -> None:
    view = top.ServiceView("reasoning", signal_sum=7.2, partitions=4)
    assert view.wanted_replicas == 4
    assert top.ServiceView("x", signal_sum=2.0).wanted_replicas == 2
    assert top.ServiceView("x").wanted_replicas is None


def test_render_shows_a_row_per_service_and_the_details() -> None:
    before = {"h:1": _scrape("h:1", REASONING_1, 10.0)}
    after = [_scrape("h:1", REASONING_1_LATER, 12.0), _scrape("h:2", REASONING_2, 12.0)]
    after.append(_scrape("h:7", TOOL_EXEC, 12.0))
    text = top.render(
        top.build_views(before, after), interval_s=2.0, now=dt.datetime(2025, 5, 1, 12, 0, 3, tzinfo=dt.UTC)
    )
    lines = text.splitlines()
    assert lines[0].startswith("agentbus top  12:00:03")
    row = next(line for line in lines if line.startswith("reasoning "))
    assert row.split() == ["reasoning", "2/2", "20.0", "42", "30", "(p2)", "7/8", "1.75/1.25", "2"]
    assert any(line.startswith("tool-exec ") and "1/1" in line for line in lines)
    assert "sessions in flight 3 · model calls in flight 2 · model call p50 38 ms" in text
    assert "token buckets: model 1.00" in text
    assert "dead letters: bad_magic 3, handler_error 1" in text
    assert "slots in use 1" in text


def test_render_says_which_replicas_are_down() -> None:
    after = [_scrape("h:1", None, 1.0, service="ingress"), _scrape("h:2", INGRESS, 1.0)]
    text = top.render(top.build_views({}, after), interval_s=1)
    assert "1 replica(s) not answering /metrics" in text
    assert any(line.split()[:2] == ["ingress", "1/2"] for line in text.splitlines())


def test_real_exposition_from_prometheus_client_parses() -> None:
    registry = CollectorRegistry()
    Counter("agentbus_tool_calls_total", "calls", ["tool", "status"], registry=registry).labels(
        "calculator", "OK"
    ).inc(4)
    Gauge("agentbus_scaling_signal", "signal", ["service"], registry=registry).labels("tool-exec").set(0.5)
    Histogram("agentbus_model_call_seconds", "latency", registry=registry, buckets=(0.1, 1.0)).observe(0.05)
    m = top.parse_metrics(generate_latest(registry).decode())
    assert top.detect_service(m) == "tool-exec"
    assert m.total("agentbus_tool_calls_total") == 4.0
    assert m.total("agentbus_scaling_signal") == 0.5
    assert m.total("agentbus_model_call_seconds_count") == 1.0


def test_targets_are_parsed() -> None:
    assert top.parse_targets("h1:8101, 8111,,") == [Target("h1:8101"), Target("127.0.0.1:8111")]
    with pytest.raises(ValueError, match="host:port"):
        top.parse_targets("nohost")


def test_top_arguments() -> None:
    args = cli.build_parser().parse_args(["top", "--interval", "0.5", "--once", "--targets", "a:1,b:2"])
    assert (args.command, args.interval, args.once, args.targets) == ("top", 0.5, True, "a:1,b:2")
    args = cli.build_parser().parse_args(["top"])
    assert (args.interval, args.once, args.targets) == (2.0, False, None)


async def test_once_without_replicas_says_how_to_start_them() -> None:
    out = io.StringIO()
    assert await top.run_top(lambda: [], interval_s=0.01, once=True, out=out) == 1
    assert "make services-up" in out.getvalue()


async def test_once_scrapes_twice_and_prints_one_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = iter([INGRESS, INGRESS.replace("20.0", "30.0")])
    clock = iter([0.0, 0.5])

    async def fake_scrape(targets: list[Target], *, timeout_s: float = 2.0) -> list[Scrape]:
        return [Scrape(t, next(clock), top.parse_metrics(next(texts))) for t in targets]

    monkeypatch.setattr(top, "scrape", fake_scrape)
    out = io.StringIO()
    code = await top.run_top(lambda: [Target("h:1")], interval_s=0.01, once=True, out=out)
    assert code == 0
    row = next(line for line in out.getvalue().splitlines() if line.startswith("ingress "))
    assert row.split()[:3] == ["ingress", "1/1", "20.0"]  # 10 records in 0.5 s
    assert top.CLEAR not in out.getvalue()


async def test_an_unreachable_target_is_a_down_replica() -> None:
    (result,) = await top.scrape([Target("127.0.0.1:9")], timeout_s=0.5)
    assert result.metrics is None and result.error
    (stopped,) = await top.scrape([Target("127.0.0.1:9", "ingress", running=False)])
    assert stopped.error == "not running" and stopped.service == "ingress"
