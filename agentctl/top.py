"""``agentctl top``: the load, lag and scaling signal of every service replica, live.

It scrapes each replica's ``/metrics`` twice, ``interval`` apart, and prints one row per
service (replicas up, records/s, consumer lag, work in use, scaling signal and the replica
count it asks for) and a few detail lines (sessions in flight, slots in use, model-call
latency, token-bucket saturation, dead letters by reason, checkpoint lag).

Targets are the local replicas that ``python -m infra.local.services`` started (their pid
files in ``.local/run/svc-<service>-<n>.pid``, port ``base + 10*i + n``), or ``host:port``
addresses given with ``--targets``, whose service is recognised from the metrics they export.

Everything but :func:`scrape` and :func:`run_top` is a pure function of the scraped text.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "SERVICES",
    "Metrics",
    "Scrape",
    "ServiceView",
    "Target",
    "build_views",
    "counter_rate",
    "detect_service",
    "histogram_quantile",
    "local_targets",
    "parse_metrics",
    "parse_targets",
    "render",
    "run_top",
]

SERVICES = ("ingress", "reasoning", "tool-exec", "checkpoint")

# A family only that service registers (checked in this order); counters without their _total.
SERVICE_MARKERS: tuple[tuple[str, str], ...] = (
    ("reasoning", "agentbus_reasoning_records"),
    ("tool-exec", "agentbus_tool_calls"),
    ("checkpoint", "agentbus_checkpoint_events_written"),
    ("ingress", "agentbus_ingress_records"),
)

# The counter of records a service finishes, and label values that are not a finished record.
THROUGHPUT: dict[str, tuple[str, Mapping[str, str]]] = {
    "ingress": ("agentbus_ingress_records_total", {}),
    "reasoning": ("agentbus_reasoning_records_total", {"outcome": "retried"}),
    "tool-exec": ("agentbus_tool_calls_total", {}),
    "checkpoint": ("agentbus_checkpoint_events_written_total", {}),
}

# Gauges summed over a service's replicas and shown on its detail line.
DETAIL_GAUGES: dict[str, tuple[tuple[str, str], ...]] = {
    "reasoning": (
        ("sessions in flight", "agentbus_reasoning_sessions_in_flight"),
        ("model calls in flight", "agentbus_reasoning_model_calls_in_flight"),
        ("buffered", "agentbus_reasoning_buffered_records"),
        ("paused", "agentbus_reasoning_paused"),
    ),
    "tool-exec": (("slots in use", "agentbus_tool_slots_in_use"),),
}

MODEL_LATENCY = "agentbus_model_call_seconds"
CLEAR = "\x1b[H\x1b[2J"


# ------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Sample:
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class Metrics:
    """One scrape: samples by sample name (``x_total``, ``x_bucket``...) and the family names."""

    samples: Mapping[str, Sequence[Sample]]
    families: frozenset[str]

    def get(self, name: str) -> Sequence[Sample]:
        return self.samples.get(name, ())

    def total(self, name: str, exclude: Mapping[str, str] | None = None) -> float | None:
        """Sum of the samples of ``name`` (None when it has none), leaving out ``exclude`` matches."""
        values = [
            s.value
            for s in self.get(name)
            if not exclude or not any(s.labels.get(k) == v for k, v in exclude.items())
        ]
        return sum(values) if values else None

    def has_family(self, family: str) -> bool:
        return family in self.families or f"{family}_total" in self.families


def parse_metrics(text: str) -> Metrics:
    """Parse Prometheus text exposition format (what ``/metrics`` serves)."""
    samples: dict[str, list[Sample]] = defaultdict(list)
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[s.name].append(Sample(dict(s.labels), float(s.value)))
    return Metrics(dict(samples), frozenset(families))


def detect_service(metrics: Metrics) -> str | None:
    """Which agentbus service exported ``metrics`` (from a family only that service has)."""
    for service, family in SERVICE_MARKERS:
        if metrics.has_family(family):
            return service
    return None


# -------------------------------------------------------------------------------- arithmetic


def counter_rate(before: float | None, after: float | None, seconds: float) -> float | None:
    """Per-second increase of a counter between two readings; a reset counts from zero."""
    if before is None or after is None or seconds <= 0:
        return None
    increase = after - before if after >= before else after
    return increase / seconds


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative ``(le, count)`` buckets, interpolated as Prometheus does.

    None without observations; a rank in the ``+Inf`` bucket returns the largest finite bound.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            in_bucket = count - prev_count
            if in_bucket <= 0:
                return le
            start = prev_le if prev_le < le else 0.0
            return start + (le - start) * (rank - prev_count) / in_bucket
        prev_le, prev_count = le, count
    return prev_le


def _buckets(metrics: Metrics, name: str) -> dict[float, float]:
    out: dict[float, float] = defaultdict(float)
    for s in metrics.get(f"{name}_bucket"):
        le = s.labels.get("le")
        if le is not None:
            out[float(le)] += s.value
    return out


# ------------------------------------------------------------------------------------ scrapes


@dataclass(frozen=True)
class Target:
    """A replica to scrape: ``address`` is ``host:port``; ``service`` None = recognise it."""

    address: str
    service: str | None = None
    running: bool = True


@dataclass(frozen=True)
class Scrape:
    target: Target
    at: float  # time.monotonic() of the answer
    metrics: Metrics | None = None
    error: str | None = None

    @property
    def service(self) -> str:
        if self.target.service is not None:
            return self.target.service
        detected = detect_service(self.metrics) if self.metrics is not None else None
        return detected or self.target.address


@dataclass
class ServiceView:
    """What one row and its detail lines show for a service."""

    service: str
    replicas_known: int = 0
    replicas_up: int = 0
    records_per_s: float | None = None
    lag_total: float | None = None
    lag_max: float | None = None
    lag_max_partition: str | None = None
    partitions: int = 0
    busy: float | None = None
    capacity: float | None = None
    signal_sum: float | None = None
    signal_max: float | None = None
    gauges: list[tuple[str, float]] = field(default_factory=list)
    latency_p50: float | None = None
    latency_p99: float | None = None
    latency_calls: float = 0.0
    latency_window: bool = True
    buckets: dict[str, float] = field(default_factory=dict)
    dead_letters: dict[str, float] = field(default_factory=dict)
    checkpoint_lag_s: float | None = None

    @property
    def wanted_replicas(self) -> int | None:
        """Replicas the signal asks for: ceil(sum of signals), at least 1, at most the partitions."""
        if self.signal_sum is None:
            return None
        want = max(1, math.ceil(self.signal_sum - 1e-9))
        return min(want, self.partitions) if self.partitions > 0 else want


def _order(service: str) -> tuple[int, str]:
    return (SERVICES.index(service), "") if service in SERVICES else (len(SERVICES), service)


def build_views(before: Mapping[str, Scrape], after: Sequence[Scrape]) -> list[ServiceView]:
    """Aggregate the ``after`` scrapes by service; rates and latency windows against ``before``.

    ``before`` maps a target address to its previous scrape (may lack new replicas).
    """
    groups: dict[str, list[Scrape]] = defaultdict(list)
    for scrape in after:
        groups[scrape.service].append(scrape)
    return [_view(name, groups[name], before) for name in sorted(groups, key=_order)]


def _view(service: str, scrapes: Sequence[Scrape], before: Mapping[str, Scrape]) -> ServiceView:
    view = ServiceView(service, replicas_known=len(scrapes))
    up = [s for s in scrapes if s.metrics is not None]
    view.replicas_up = len(up)
    if not up:
        return view
    counter, exclude = THROUGHPUT.get(service, ("", {}))
    rates: list[float] = []
    lag: dict[tuple[str, str, str], float] = {}
    signals: list[float] = []
    busy: list[float] = []
    capacity: list[float] = []
    window: dict[float, float] = defaultdict(float)
    lifetime: dict[float, float] = defaultdict(float)
    gauges: dict[str, float] = defaultdict(float)
    for scrape in up:
        m = scrape.metrics
        assert m is not None
        prev = before.get(scrape.target.address)
        prev_m = prev.metrics if prev is not None else None
        if counter and prev is not None and prev_m is not None:
            rate = counter_rate(
                prev_m.total(counter, exclude), m.total(counter, exclude), scrape.at - prev.at
            )
            if rate is not None:
                rates.append(rate)
        for s in m.get("agentbus_consumer_lag_records"):
            # During a rebalance two replicas may both report a partition: count it once.
            key = (s.labels.get("group", ""), s.labels.get("topic", ""), s.labels.get("partition", ""))
            lag[key] = max(lag.get(key, 0.0), s.value)
        signals += [s.value for s in m.get("agentbus_scaling_signal")]
        busy += [s.value for s in m.get("agentbus_scaling_busy")]
        capacity += [s.value for s in m.get("agentbus_scaling_capacity")]
        now_buckets = _buckets(m, MODEL_LATENCY)
        old_buckets = _buckets(prev_m, MODEL_LATENCY) if prev_m is not None else {}
        reset = any(v < old_buckets.get(le, 0.0) for le, v in now_buckets.items())
        for le, v in now_buckets.items():
            lifetime[le] += v
            window[le] += v if reset else v - old_buckets.get(le, 0.0)
        for label, name in DETAIL_GAUGES.get(service, ()):
            value = m.total(name)
            if value is not None:
                gauges[label] += value
        for s in m.get("agentbus_token_bucket_saturation"):
            bucket = s.labels.get("bucket", "?")
            view.buckets[bucket] = max(view.buckets.get(bucket, 0.0), s.value)
        for s in m.get("agentbus_dead_letters_total"):
            reason = s.labels.get("reason_code", "?")
            view.dead_letters[reason] = view.dead_letters.get(reason, 0.0) + s.value
        # Only a process that wrote a checkpoint has a last event time (the gauges exist everywhere).
        checkpoint_lag = m.total("agentbus_checkpoint_lag_seconds")
        last_written = m.total("agentbus_checkpoint_last_event_timestamp_seconds") or 0.0
        if checkpoint_lag is not None and last_written > 0:
            view.checkpoint_lag_s = max(view.checkpoint_lag_s or 0.0, checkpoint_lag)
    view.records_per_s = sum(rates) if rates else None
    if lag:
        view.lag_total = sum(lag.values())
        (_, _, partition), view.lag_max = max(lag.items(), key=lambda kv: kv[1])
        view.lag_max_partition = partition
        view.partitions = len({(t, p) for _, t, p in lag})
    if signals:
        view.signal_sum, view.signal_max = sum(signals), max(signals)
    if capacity:
        view.busy, view.capacity = sum(busy), sum(capacity)
    view.gauges = [(label, gauges[label]) for label, _ in DETAIL_GAUGES.get(service, ()) if label in gauges]
    buckets, view.latency_window = (window, True) if window.get(math.inf, 0.0) > 0 else (lifetime, False)
    view.latency_calls = buckets.get(math.inf, 0.0)
    pairs = list(buckets.items())
    view.latency_p50 = histogram_quantile(0.5, pairs)
    view.latency_p99 = histogram_quantile(0.99, pairs)
    return view


# ---------------------------------------------------------------------------------- rendering


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def render(views: Sequence[ServiceView], *, interval_s: float, now: dt.datetime | None = None) -> str:
    """The table and detail lines of one refresh."""
    stamp = (now or dt.datetime.now()).strftime("%H:%M:%S")  # noqa: DTZ005 - local time for a human
    lines = [f"agentbus top  {stamp}  (rates over {interval_s:g} s; counts since each replica started)"]
    w = max([12, *(len(v.service) + 2 for v in views)])
    header = (
        f"{'SERVICE':<{w}}{'UP':>5}{'REC/S':>9}{'LAG':>8}  {'MAX PART':<10}{'BUSY':>10}"
        f"{'SIGNAL sum/max':>16}{'WANT':>6}"
    )
    lines += ["", header]
    for v in views:
        up = f"{v.replicas_up}/{v.replicas_known}"
        max_part = f"{_num(v.lag_max)} (p{v.lag_max_partition})" if v.lag_max_partition is not None else "-"
        busy = f"{_num(v.busy)}/{_num(v.capacity)}" if v.capacity else "-"
        signal = f"{_num(v.signal_sum, 2)}/{_num(v.signal_max, 2)}" if v.signal_sum is not None else "-"
        want = str(v.wanted_replicas) if v.wanted_replicas is not None else "-"
        lines.append(
            f"{v.service:<{w}}{up:>5}{_num(v.records_per_s, 1):>9}{_num(v.lag_total):>8}  {max_part:<10}"
            f"{busy:>10}{signal:>16}{want:>6}"
        )
    lines.append("")
    for v in views:
        details = _details(v)
        for i, detail in enumerate(details):
            lines.append(f"{v.service if i == 0 else '':<{w}}{detail}")
    return "\n".join(lines) + "\n"


def _details(v: ServiceView) -> list[str]:
    out = []
    first = [f"{label} {value:g}" for label, value in v.gauges]
    if v.latency_p50 is not None:
        when = f"last {v.latency_calls:g} calls" if v.latency_window else f"all {v.latency_calls:g} calls"
        first.append(f"model call p50 {_ms(v.latency_p50)} p99 {_ms(v.latency_p99)} ({when})")
    if v.checkpoint_lag_s is not None:
        first.append(f"checkpoint lag {v.checkpoint_lag_s:.2f} s")
    if first:
        out.append(" · ".join(first))
    if v.buckets:
        out.append("token buckets: " + ", ".join(f"{b} {s:.2f}" for b, s in sorted(v.buckets.items())))
    if v.dead_letters:
        counts = ", ".join(f"{r} {c:g}" for r, c in sorted(v.dead_letters.items()) if c > 0)
        if counts:
            out.append(f"dead letters: {counts}")
    if v.replicas_up < v.replicas_known:
        out.append(f"{v.replicas_known - v.replicas_up} replica(s) not answering /metrics")
    return out


# ---------------------------------------------------------------------------------- targets


def parse_targets(spec: str) -> list[Target]:
    """``host:port,host:port`` (a bare port means 127.0.0.1) -> targets."""
    targets = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        address = f"127.0.0.1:{part}" if part.isdigit() else part
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"target {part!r} is not host:port")
        targets.append(Target(address))
    return targets


def local_targets() -> list[Target]:
    """The local replicas that have a pid file (``infra.local.services``), running or not."""
    from infra.local.services import ServiceReplicas

    sup = ServiceReplicas()
    targets = []
    for name in sup.modules:
        for replica in sup.known(name):
            running = replica.running_pid() is not None
            targets.append(Target(f"127.0.0.1:{replica.port}", name, running))
    return targets


async def scrape(targets: Sequence[Target], *, timeout_s: float = 2.0) -> list[Scrape]:
    """GET every target's /metrics concurrently; a failure is a Scrape with ``error``."""
    import aiohttp

    async def one(session: aiohttp.ClientSession, target: Target) -> Scrape:
        if not target.running:
            return Scrape(target, time.monotonic(), error="not running")
        try:
            async with session.get(f"http://{target.address}/metrics") as response:
                response.raise_for_status()
                text = await response.text()
            return Scrape(target, time.monotonic(), parse_metrics(text))
        except Exception as exc:  # noqa: BLE001 - a replica down is a row, not a crash
            return Scrape(target, time.monotonic(), error=f"{type(exc).__name__}: {exc}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        return list(await asyncio.gather(*(one(session, t) for t in targets)))


async def run_top(
    targets: Callable[[], Sequence[Target]],
    *,
    interval_s: float = 2.0,
    once: bool = False,
    out: TextIO,
    clear: bool = False,
) -> int:
    """Print a refresh every ``interval_s`` (one, after two scrapes, with ``once``)."""
    current = list(targets())
    if not current and once:
        out.write(
            "no service replicas found: start them (make services-up) or pass --targets host:port,...\n"
        )
        return 1
    previous = {s.target.address: s for s in await scrape(current)}
    while True:
        await asyncio.sleep(interval_s)
        scrapes = await scrape(list(targets()))
        text = render(build_views(previous, scrapes), interval_s=interval_s)
        if not scrapes:
            text += "no service replicas found (make services-up, or --targets host:port,...)\n"
        out.write((CLEAR if clear else "") + text)
        out.flush()
        if once:
            return 0
        previous = {s.target.address: s for s in scrapes}
