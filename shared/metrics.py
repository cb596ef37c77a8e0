"""Load, lag and saturation metrics, and the one number per replica that scaling follows.

Every service exports, on its ``/metrics``:

- ``agentbus_consumer_lag_records{service,group,topic,partition}``: per assigned input
  partition, the records not yet fetched: end offset (the last stable offset, since every
  agentbus consumer reads ``read_committed``) minus the consumer's position. Kept by
  :class:`LagMonitor`, a background task that reads what the consumer already knows from its
  fetches and asks the broker (one ListOffsets) only for partitions it has not fetched lately
  (paused for backpressure, or holding a buffer).
- ``agentbus_scaling_signal{service}``: :func:`scaling_signal` of this replica, where 1.0
  means "at target" and 2.0 "twice as much work as one replica should have".
- ``agentbus_token_bucket_saturation{bucket}`` and ``agentbus_token_bucket_takes_total``:
  how close a rate limit is to refusing (:func:`observe_bucket`, :class:`MeteredLimiter`).
- ``agentbus_checkpoint_lag_seconds``: how old the events the checkpoint writes are
  (:func:`observe_checkpoint`).

Nothing here raises into a service: a metric that cannot be read is skipped and counted
in ``agentbus_lag_monitor_errors_total``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import REGISTRY, Counter, Gauge

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_LAG_SECONDS",
    "CONSUMER_LAG",
    "SCALING_SIGNAL",
    "TOKEN_BUCKET_SATURATION",
    "TOKEN_BUCKET_TAKES",
    "BusyFn",
    "LagMonitor",
    "MeteredLimiter",
    "bucket_waiting",
    "busy_from_gauge",
    "observe_bucket",
    "observe_checkpoint",
    "scaling_signal",
    "set_scaling_signal",
]

CONSUMER_LAG = Gauge(
    "agentbus_consumer_lag_records",
    "Records of an assigned partition not yet fetched: end offset (LSO under read_committed) - position",
    ["service", "group", "topic", "partition"],
)
SCALING_SIGNAL = Gauge(
    "agentbus_scaling_signal",
    "max(consumer lag / AGENTBUS_SCALE_LAG_TARGET, busy / capacity) of this replica; 1 = at target",
    ["service"],
)
SCALING_BUSY = Gauge(
    "agentbus_scaling_busy",
    "Work in use that the scaling signal counts (reasoning: model calls, tool-exec: tool calls)",
    ["service"],
)
SCALING_CAPACITY = Gauge(
    "agentbus_scaling_capacity",
    "Capacity of that work on this replica (AGENTBUS_MAX_INFLIGHT_MODEL_CALLS, AGENTBUS_TOOL_SLOTS)",
    ["service"],
)
LAG_MONITOR_ERRORS = Counter(
    "agentbus_lag_monitor_errors_total",
    "Lag readings that failed (broker unreachable, partition moving); the last value is kept",
    ["service"],
)
TOKEN_BUCKET_SATURATION = Gauge(
    "agentbus_token_bucket_saturation",
    "0 = bucket full, 1 = empty or callers waiting (tenant: share of takes refused in the last 10 s)",
    ["bucket"],
)
TOKEN_BUCKET_TAKES = Counter(
    "agentbus_token_bucket_takes_total",
    "Token bucket takes by result (granted, denied = the caller waits or is refused)",
    ["bucket", "result"],
)
CHECKPOINT_LAG_SECONDS = Gauge(
    "agentbus_checkpoint_lag_seconds",
    "Age (now - occurred_at) of the oldest event of the last batch the checkpoint wrote to Cassandra",
)
CHECKPOINT_LAST_EVENT = Gauge(
    "agentbus_checkpoint_last_event_timestamp_seconds",
    "occurred_at (Unix time) of that event: time() - this grows while the checkpoint writes nothing",
)

BusyFn = Callable[[], tuple[float, float]]
"""Returns (busy, capacity) of a replica, e.g. (model calls in flight, AGENTBUS_MAX_INFLIGHT_MODEL_CALLS)."""


# ------------------------------------------------------------------------------- scaling signal


def scaling_signal(lag_total: float, lag_target: float, busy: float = 0.0, capacity: float = 0.0) -> float:
    """One replica's need for replicas: ``max(lag_total / lag_target, busy / capacity)``.

    1.0 means the replica is at its target; the replica count a service needs is about the
    sum of its replicas' signals. A part whose denominator is not positive counts 0.

    Why the maximum: lag and busy measure two different bottlenecks. A backlog with idle
    workers (records arriving faster than one replica's fetch-and-handle loop) and full
    workers with no backlog yet (every model call or tool slot taken, the buffer about to
    pause the consumer) each need more replicas on their own. A sum would ask for replicas
    when both are half used and neither limits anything; an average or product would hide a
    saturated resource behind an idle one. The larger ratio is the binding constraint.
    """
    lag_part = lag_total / lag_target if lag_target > 0 else 0.0
    busy_part = busy / capacity if capacity > 0 else 0.0
    return max(0.0, lag_part, busy_part)


def set_scaling_signal(
    service: str, *, lag_total: float, lag_target: float, busy: float = 0.0, capacity: float = 0.0
) -> float:
    """Compute :func:`scaling_signal`, export it (and busy/capacity when given); return it."""
    value = scaling_signal(lag_total, lag_target, busy, capacity)
    SCALING_SIGNAL.labels(service).set(value)
    if capacity > 0:
        SCALING_BUSY.labels(service).set(busy)
        SCALING_CAPACITY.labels(service).set(capacity)
    return value


def busy_from_gauge(name: str, capacity: float, labels: dict[str, str] | None = None) -> BusyFn:
    """A :data:`BusyFn` reading an unlabelled (or ``labels``) gauge of this process's registry.

    ``busy_from_gauge("agentbus_tool_slots_in_use", settings.slots)``: no reference to the
    service's internals is needed, only the metric's name.
    """

    def busy() -> tuple[float, float]:
        value = REGISTRY.get_sample_value(name, labels)
        return (value or 0.0, capacity)

    return busy


# ---------------------------------------------------------------------------------- lag monitor


class _Consumer(Protocol):
    """What :class:`LagMonitor` uses of an ``AIOKafkaConsumer``."""

    def assignment(self) -> Any: ...
    def highwater(self, partition: Any) -> int | None: ...
    def last_stable_offset(self, partition: Any) -> int | None: ...
    def last_poll_timestamp(self, partition: Any) -> int | None: ...
    async def position(self, partition: Any) -> int: ...
    async def end_offsets(self, partitions: list[Any]) -> dict[Any, int]: ...


class _ConsumerSettings(Protocol):
    """What :meth:`LagMonitor.of` reads from a service's settings."""

    @property
    def service_name(self) -> str: ...

    @property
    def group_id(self) -> str: ...

    @property
    def scale_lag_target(self) -> int: ...


class LagMonitor:
    """Exports the consumer lag of every assigned partition and the replica's scaling signal.

    Every ``interval_s`` it reads, per assigned partition, the end offset the consumer's last
    fetch returned (``last_stable_offset``; ``highwater`` when the broker gave no LSO) and the
    consumer's ``position``, both local. A partition not fetched for ``stale_after_s`` (paused
    for backpressure, or its fetched records not consumed yet) has a stale end, so those
    partitions' ends come from one ``end_offsets`` request (ListOffsets, which honours
    read_committed). Label sets of partitions no longer assigned are removed.

    It only reads consumer state on the event loop, awaits with timeouts, and catches every
    error (a broker restart or rebalance costs a reading, never the task), so it cannot
    block or crash the service's loop. ``busy`` gives (busy, capacity) for the signal.

        monitor = LagMonitor(consumer, service="reasoning", group=settings.group_id,
                             lag_target=settings.scale_lag_target, busy=...)
        monitor.start()
        ...
        await monitor.stop()
    """

    @classmethod
    def of(cls, consumer: Any, settings: _ConsumerSettings, *, busy: BusyFn | None = None) -> LagMonitor:
        """The monitor of a service's consumer group, from the service's settings."""
        return cls(
            consumer,
            service=settings.service_name,
            group=settings.group_id,
            lag_target=settings.scale_lag_target,
            busy=busy,
        )

    def __init__(
        self,
        consumer: Any,
        *,
        service: str,
        group: str,
        interval_s: float = 5.0,
        lag_target: float = 1000,
        busy: BusyFn | None = None,
        stale_after_s: float | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._consumer: _Consumer = consumer
        self.service = service
        self.group = group
        self.interval_s = interval_s
        self.lag_target = lag_target
        self._busy = busy
        stale_s = stale_after_s if stale_after_s is not None else max(2 * interval_s, 3.0)
        self._stale_after_ms = 1000 * stale_s
        self._timeout_s = request_timeout_s if request_timeout_s is not None else max(1.0, interval_s)
        self._lag: dict[tuple[str, int], int] = {}
        self._task: asyncio.Task[None] | None = None
        self.signal = 0.0

    @property
    def lag(self) -> dict[tuple[str, int], int]:
        """Last lag per (topic, partition) of the assigned partitions."""
        return dict(self._lag)

    @property
    def lag_total(self) -> int:
        return sum(self._lag.values())

    def start(self) -> None:
        """Start the background task (idempotent); call it on the service's event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"lag-monitor-{self.service}")

    async def stop(self) -> None:
        """Stop the task and remove this monitor's label sets."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})  # its CancelledError stays in the task
        for key in list(self._lag):
            self._forget(key)

    async def __aenter__(self) -> LagMonitor:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval_s)

    async def sample(self) -> float:
        """Take one reading, export it and return the scaling signal. Never raises (but cancels)."""
        try:
            await self._sample_lag()
        except Exception as exc:  # noqa: BLE001 - a metric must never take the service down
            self._error("lag", exc)
        busy, capacity = 0.0, 0.0
        if self._busy is not None:
            try:
                busy, capacity = self._busy()
            except Exception as exc:  # noqa: BLE001
                self._error("busy", exc)
        self.signal = set_scaling_signal(
            self.service, lag_total=self.lag_total, lag_target=self.lag_target, busy=busy, capacity=capacity
        )
        return self.signal

    async def _sample_lag(self) -> None:
        consumer = self._consumer
        try:
            assigned = list(consumer.assignment())
        except Exception:  # noqa: BLE001 - stopped or between subscriptions
            assigned = []
        keys = {(tp.topic, tp.partition) for tp in assigned}
        for key in [k for k in self._lag if k not in keys]:
            self._forget(key)
        if not assigned:
            return
        now_ms = time.time() * 1000
        ends: dict[Any, int] = {}
        stale: list[Any] = []
        for tp in assigned:
            end, polled_ms = self._local_end(tp)
            if end is None or polled_ms is None or now_ms - polled_ms > self._stale_after_ms:
                stale.append(tp)
            else:
                ends[tp] = end
        if stale:
            try:
                fetched = await asyncio.wait_for(consumer.end_offsets(stale), self._timeout_s)
                ends.update({tp: off for tp, off in fetched.items() if off is not None and off >= 0})
            except Exception as exc:  # noqa: BLE001 - broker away: keep the last values
                self._error("end_offsets", exc)
        tps = list(ends)
        positions = await asyncio.gather(*(self._position(tp) for tp in tps))
        for tp, position in zip(tps, positions, strict=True):
            if position is None:
                continue
            key = (tp.topic, tp.partition)
            if key not in keys:  # revoked while we awaited
                continue
            lag = max(0, ends[tp] - position)
            self._lag[key] = lag
            CONSUMER_LAG.labels(self.service, self.group, tp.topic, str(tp.partition)).set(lag)

    def _local_end(self, tp: Any) -> tuple[int | None, int | None]:
        """(end offset, when it was fetched in ms) from the consumer's last fetch of ``tp``."""
        consumer = self._consumer
        try:
            end = consumer.last_stable_offset(tp)
            if end is None or end < 0:  # read_uncommitted (-1), or a broker without LSO (None)
                end = consumer.highwater(tp)
            return end, consumer.last_poll_timestamp(tp)
        except Exception:  # noqa: BLE001 - AssertionError when revoked meanwhile
            return None, None

    async def _position(self, tp: Any) -> int | None:
        try:
            return int(await asyncio.wait_for(self._consumer.position(tp), self._timeout_s))
        except Exception:  # noqa: BLE001 - being reset or revoked; the next reading has it
            return None

    def _forget(self, key: tuple[str, int]) -> None:
        self._lag.pop(key, None)
        with contextlib.suppress(KeyError):
            CONSUMER_LAG.remove(self.service, self.group, key[0], str(key[1]))

    def _error(self, what: str, exc: BaseException) -> None:
        LAG_MONITOR_ERRORS.labels(self.service).inc()
        log.debug("lag monitor %s: %s failed: %s: %s", self.service, what, type(exc).__name__, exc)


# -------------------------------------------------------------------------------- token buckets


class _BucketView:
    """What this process last learned of one token bucket, projected forward by its refill rate."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.burst = 1.0
        self.rate = 0.0
        self.at = time.monotonic()
        self.known = False
        self.waiting = 0

    def saturation(self) -> float:
        if self.waiting > 0:
            return 1.0
        if not self.known:
            return 0.0
        tokens = min(self.burst, self.tokens + (time.monotonic() - self.at) * self.rate)
        return min(1.0, max(0.0, 1.0 - tokens / self.burst))


_BUCKETS: dict[str, _BucketView] = {}


def _bucket(name: str) -> _BucketView:
    view = _BUCKETS.get(name)
    if view is None:
        view = _BUCKETS[name] = _BucketView()
        TOKEN_BUCKET_SATURATION.labels(name).set_function(view.saturation)
    return view


def observe_bucket(name: str, *, tokens: float, rate: float, burst: float, granted: bool) -> None:
    """Record one take from bucket ``name``: the tokens left after it, and whether it was granted.

    The saturation gauge is ``1 - tokens / burst``, refilled at ``rate`` between takes (so an
    idle bucket drifts back to 0), and 1 while a caller waits (:func:`bucket_waiting`).
    """
    view = _bucket(name)
    view.tokens, view.rate, view.burst = max(0.0, tokens), max(0.0, rate), max(1.0, burst)
    view.at = time.monotonic()
    view.known = True
    TOKEN_BUCKET_TAKES.labels(name, "granted" if granted else "denied").inc()


@contextlib.contextmanager
def bucket_waiting(name: str) -> Iterator[None]:
    """Marks a caller sleeping until bucket ``name`` refills: saturation is 1 meanwhile."""
    view = _bucket(name)
    view.waiting += 1
    try:
        yield
    finally:
        view.waiting -= 1


class _Limiter(Protocol):
    async def allow(self, tenant_id: str) -> bool: ...


class MeteredLimiter:
    """Wraps a yes/no rate limiter (ingress's per-tenant buckets) and meters it as bucket ``name``.

    Such a limiter does not tell how many tokens are left, so saturation is the share of takes
    refused within the last ``window_s`` (0 when idle); takes are counted by result.
    """

    def __init__(self, inner: _Limiter, *, bucket: str = "tenant", window_s: float = 10.0) -> None:
        self._inner = inner
        self.bucket = bucket
        self._window_s = window_s
        self._takes: collections.deque[tuple[float, bool]] = collections.deque()
        TOKEN_BUCKET_SATURATION.labels(bucket).set_function(self.saturation)

    async def allow(self, tenant_id: str) -> bool:
        allowed = await self._inner.allow(tenant_id)
        self._takes.append((time.monotonic(), allowed))
        self._trim()
        TOKEN_BUCKET_TAKES.labels(self.bucket, "granted" if allowed else "denied").inc()
        return allowed

    def _trim(self) -> None:
        horizon = time.monotonic() - self._window_s
        while self._takes and self._takes[0][0] < horizon:
            self._takes.popleft()

    def saturation(self) -> float:
        self._trim()
        if not self._takes:
            return 0.0
        return sum(1 for _, allowed in self._takes if not allowed) / len(self._takes)


# ----------------------------------------------------------------------------------- checkpoint


def observe_checkpoint(occurred_at: dt.datetime, *, now: dt.datetime | None = None) -> float:
    """Record that the checkpoint wrote an event that occurred at ``occurred_at``; returns its age.

    Call it after a batch is written and committed, with the batch's oldest ``occurred_at``
    (the most behind event written). A naive datetime is taken as UTC.
    """
    if occurred_at.tzinfo is None:
        occurred_at = occurred_at.replace(tzinfo=dt.UTC)
    current = now if now is not None else dt.datetime.now(dt.UTC)
    age = max(0.0, (current - occurred_at).total_seconds())
    CHECKPOINT_LAG_SECONDS.set(age)
    CHECKPOINT_LAST_EVENT.set(occurred_at.timestamp())
    return age
