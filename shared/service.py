"""What every agentbus service process shares: probes, metrics, signals, dead letters.

A service's ``main.py`` builds its dependencies, registers readiness checks and
runs its loop under :func:`run_service`, which serves

- ``/healthz``: 200 while the process's event loop answers (liveness);
- ``/readyz``: 200 when every registered dependency check passes, else 503 with
  the failing ones (readiness);
- ``/metrics``: Prometheus text format;

and turns SIGTERM/SIGINT into a graceful stop: the loop is told to stop taking
work, finish or hand back what is in flight, commit and leave its group, within
``shutdown_grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from aiohttp import web
from cassandra import CoordinationFailure as CassandraCoordinationFailure
from cassandra import OperationTimedOut as CassandraOperationTimedOut
from cassandra import ReadTimeout as CassandraReadTimeout
from cassandra import Unavailable as CassandraUnavailable
from cassandra import WriteTimeout as CassandraWriteTimeout
from cassandra.cluster import NoHostAvailable
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.avro import AvroCodec
from shared.kafka import OutRecord
from shared.settings import ServiceSettings
from shared.telemetry import configure_tracing, shutdown_tracing

# Cassandra or Redis down, restarting or too slow: the work is retried until they answer,
# never rejected, dead-lettered or answered with an error for this.
STORE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    NoHostAvailable,
    CassandraOperationTimedOut,
    CassandraUnavailable,
    CassandraReadTimeout,
    CassandraWriteTimeout,
    CassandraCoordinationFailure,
    RedisConnectionError,
    RedisTimeoutError,
)

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[bool]]

DEAD_LETTERS = Counter(
    "agentbus_dead_letters_total", "Records sent to agentbus.dlq", ["service", "reason_code"]
)


def session_key(tenant_id: str, session_id: str) -> bytes:
    """The Kafka key of every session-scoped record: one session, one partition, in order."""
    return f"{tenant_id}/{session_id}".encode()


def dead_letter(
    codec: AvroCodec,
    *,
    service: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    reason_code: str,
    reason: str,
    error_type: str | None = None,
) -> bytes:
    """Encode a DeadLetter for a record that could not be processed (and count it)."""
    DEAD_LETTERS.labels(service, reason_code).inc()
    return codec.encode(
        "DeadLetter",
        {
            "source_topic": topic,
            "source_partition": partition,
            "source_offset": offset,
            "key": key,
            "value": value,
            "headers": [{"key": k, "value": v} for k, v in headers],
            "reason_code": reason_code,
            "reason": reason[:2000],
            "service": service,
            "error_type": error_type,
            "failed_at": dt.datetime.now(dt.UTC),
        },
    )


class Probes:
    """Readiness checks by name; each must answer within a few seconds."""

    def __init__(self) -> None:
        self._checks: dict[str, ReadinessCheck] = {}
        self.started = False

    def add(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    async def run(self) -> dict[str, bool]:
        async def one(check: ReadinessCheck) -> bool:
            try:
                async with asyncio.timeout(3):
                    return await check()
            except Exception:  # noqa: BLE001 - a failing dependency is "not ready", not a crash
                return False

        names = list(self._checks)
        results = await asyncio.gather(*(one(self._checks[n]) for n in names))
        return dict(zip(names, results, strict=True))


async def _serve_http(settings: ServiceSettings, probes: Probes) -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "service": settings.service_name})

    async def readyz(_: web.Request) -> web.Response:
        results = await probes.run()
        ready = probes.started and all(results.values())
        body: dict[str, Any] = {"ready": ready, "started": probes.started, "checks": results}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "0.0.0.0", settings.http_port)  # probes come from the orchestrator
    await site.start()
    return runner


def configure_logging(settings: ServiceSettings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {settings.service_name} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("cassandra").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatedLogFilter())


class RepeatedLogFilter(logging.Filter):
    """The first of a client library's repeated messages per window; the rest only counted.

    While the broker restarts, aiokafka logs "Got error produce response" for every batch
    it retries: one chaos run's tool-exec replica wrote 12,932 such lines in 80 s. Per
    logger and message template (the text before its ``%`` arguments are filled in), one
    record passes per ``window_s``; the next one to pass says how many were held back.
    Only loggers under ``prefixes`` are filtered: agentbus's own messages always pass.
    """

    MAX_KEYS = 1024  # templates remembered at once (a library logging pre-formatted text)

    def __init__(
        self,
        prefixes: Sequence[str] = ("aiokafka", "cassandra"),
        *,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._prefixes = tuple(prefixes)
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()  # the Cassandra driver logs from its own threads
        self._windows: dict[tuple[str, str], list[float]] = {}  # -> [window start, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window[0] < self._window_s:
                window[1] += 1
                return False
            if len(self._windows) >= self.MAX_KEYS:
                self._windows.clear()
            self._windows[key] = [now, 0]
        if window is not None and window[1]:
            held, seconds = int(window[1]), now - window[0]
            record.msg = f"{record.msg} [and {held} more like it in the {seconds:.0f}s before, not logged]"
        return True


def tune_gc(settings: ServiceSettings) -> None:
    """Fewer cyclic-GC passes: a service allocates short-lived objects (records, spans,
    futures) by the thousand per second, and with Python's default young-generation
    threshold (700) it spends ~10% of its CPU collecting them. What was loaded at start-up
    (modules, schemas) is frozen out of every later pass."""
    if settings.gc_gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(settings.gc_gen0_threshold, max(gen1, 20), max(gen2, 20))


async def run_service(
    settings: ServiceSettings,
    body: Callable[[asyncio.Event, Probes], Coroutine[Any, Any, None]],
) -> int:
    """Serve probes and run ``body(stop, probes)`` until it returns or a signal asks to stop.

    ``body`` must return promptly (within ``shutdown_grace_s``) once ``stop`` is set.
    Returns the process exit code.
    """
    configure_tracing(settings)
    tune_gc(settings)
    stop = asyncio.Event()
    probes = Probes()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    runner = await _serve_http(settings, probes)
    task = asyncio.create_task(body(stop, probes))
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # re-raise a crash of the body
            return 0
        log.info("stopping: finishing in-flight work (grace %.0fs)", settings.shutdown_grace_s)
        try:
            async with asyncio.timeout(settings.shutdown_grace_s):
                await task
        except TimeoutError:
            log.warning("grace period over; abandoning in-flight work (it will be redelivered)")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return 0
    finally:
        stopper.cancel()
        await runner.cleanup()
        await asyncio.to_thread(shutdown_tracing)


def dump_tasks(out: Any = None) -> int:
    """Write every pending asyncio task with its stack to ``out`` (stderr): ``kill -USR1 <pid>``.

    What a hung replica waits on, without stopping it (thread stacks come from py-spy;
    coroutine stacks only from inside the process). Returns the number of tasks written.
    """
    stream = out or sys.stderr
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    stream.write(f"==== {len(tasks)} pending asyncio tasks of pid {os.getpid()}\n")
    for task in tasks:
        stream.write(f"---- {task.get_name()}: {task.get_coro()!r}\n")
        task.print_stack(limit=25, file=stream)
    stream.flush()
    return len(tasks)


def client_id(settings: ServiceSettings) -> str:
    """A client id naming the service and this process (for broker logs and quotas)."""
    return f"{settings.service_name}-{socket.gethostname()}-{os.getpid()}"


def dead_letter_record(
    codec: AvroCodec,
    *,
    service: str,
    dlq_topic: str,
    record: Any,
    reason_code: str,
    reason: str,
    error_type: str | None = None,
) -> OutRecord:
    """The DLQ record for a consumed Kafka ``record`` (any object with aiokafka's record fields)."""
    value = dead_letter(
        codec,
        service=service,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        headers=list(record.headers or ()),
        reason_code=reason_code,
        reason=reason,
        error_type=error_type,
    )
    return OutRecord(dlq_topic, value, key=record.key)
