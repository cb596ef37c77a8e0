"""tool-exec's tool layer against the real Cassandra: idempotency classes, limits, artifacts, tools."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import pytest
from aiohttp import web

from services.tool_exec.idempotency import ClaimOutcome, StoredResult, ToolResultStore, ToolStatus
from services.tool_exec.registry import ToolRegistry
from services.tool_exec.runner import ToolCallRequest, ToolRunner
from services.tool_exec.settings import ToolExecSettings
from services.tool_exec.tools.base import (
    Effect,
    Tool,
    ToolContext,
    ToolError,
    ToolOutput,
    TransientToolError,
)
from shared.avro import default_codec
from shared.cassandra import Statements
from shared.settings import CassandraSettings

# ---------------------------------------------------------------------------- test-only tools


class Counting(Tool):
    """Counts its runs; behaviour per instance."""

    name = "test.counting"
    description = "counts runs"
    parameters: ClassVar[dict[str, Any]] = {"type": "object"}
    effect = Effect.IDEMPOTENT_WRITE

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        self.runs += 1
        return ToolOutput({"run": self.runs, "args": args})


class Flaky(Tool):
    """Raises TransientToolError ``fail_times`` times, then succeeds."""

    name = "test.flaky"
    description = "flaky"
    parameters: ClassVar[dict[str, Any]] = {"type": "object"}
    effect = Effect.READ_ONLY

    def __init__(self, fail_times: int) -> None:
        self.fail_times = fail_times
        self.runs = 0

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        self.runs += 1
        if self.runs <= self.fail_times:
            raise TransientToolError(f"flaky failure {self.runs}")
        return ToolOutput({"runs": self.runs})


class FlakyIrreversible(Flaky):
    name = "test.flaky_irreversible"
    effect = Effect.IRREVERSIBLE


class FailsPermanently(Tool):
    name = "test.fails"
    description = "fails"
    parameters: ClassVar[dict[str, Any]] = {"type": "object"}
    effect = Effect.IRREVERSIBLE

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        raise ToolError("the mail server refused the address")


class SlowIrreversible(Tool):
    name = "test.slow_irreversible"
    description = "an irreversible call that takes a while"
    parameters: ClassVar[dict[str, Any]] = {"type": "object"}
    effect = Effect.IRREVERSIBLE
    timeout_s = 5.0

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        await asyncio.sleep(0.5)
        return ToolOutput({"sent": True})


class Slow(Tool):
    name = "test.slow"
    description = "sleeps past its timeout"
    parameters: ClassVar[dict[str, Any]] = {"type": "object"}
    effect = Effect.READ_ONLY
    timeout_s = 0.2

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        await asyncio.sleep(5)
        return ToolOutput("never")


class Big(Tool):
    name = "test.big"
    description = "a large output"
    parameters: ClassVar[dict[str, Any]] = {"type": "object", "properties": {"n": {"type": "integer"}}}
    effect = Effect.IDEMPOTENT_WRITE

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        return ToolOutput({"rows": [f"row {i} ünïcode" for i in range(args["n"])]})


class Gauge(Tool):
    """Records how many runs overlap."""

    name = "test.gauge"
    description = "concurrency gauge"
    parameters: ClassVar[dict[str, Any]] = {"type": "object"}
    effect = Effect.READ_ONLY

    def __init__(self, name: str, max_concurrency: int | None) -> None:
        self.name = name  # type: ignore[misc]
        self.max_concurrency = max_concurrency  # type: ignore[misc]
        self.current = 0
        self.peak = 0

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        self.current += 1
        self.peak = max(self.peak, self.current)
        await asyncio.sleep(0.05)
        self.current -= 1
        return ToolOutput(None)


# ---------------------------------------------------------------------------- fixtures

RunnerFactory = Callable[..., ToolRunner]


@pytest.fixture
def settings(cassandra_settings: CassandraSettings) -> ToolExecSettings:
    return ToolExecSettings.from_env(
        cassandra_keyspace=cassandra_settings.cassandra_keyspace,
        artifact_threshold_bytes=1024,
        max_attempts=3,
        http_allowlist=("127.0.0.1",),
    )


@pytest.fixture
def registry() -> ToolRegistry:
    return ToolRegistry.from_entry_points()


@pytest.fixture
def store(statements: Statements) -> ToolResultStore:
    return ToolResultStore(statements)


@pytest.fixture
def make_runner(registry: ToolRegistry, store: ToolResultStore, settings: ToolExecSettings) -> RunnerFactory:
    def make(**kwargs: Any) -> ToolRunner:
        runner_settings = dataclasses.replace(settings, **kwargs.pop("settings", {}))
        kwargs.setdefault("backoff_base_s", 0.01)
        return ToolRunner(registry, store, runner_settings, **kwargs)

    return make


@pytest.fixture
def runner(make_runner: RunnerFactory) -> ToolRunner:
    return make_runner()


def _call(
    run_id: str, tool: str, args: Any, *, step: int = 1, tenant: str = "tenant-a", **kw: Any
) -> ToolCallRequest:
    return ToolCallRequest(
        tenant_id=tenant,
        session_id=f"session-{run_id}",
        turn_id="turn-1",
        call_id=f"call-{step}",
        step=step,
        tool=tool,
        args=args,
        **kw,
    )


async def _outbox_rows(statements: Statements, key: str) -> list[dict[str, Any]]:
    return await statements.run(
        "SELECT notification_id, channel, message FROM {ks}.notify_outbox WHERE idempotency_key = ?", (key,)
    )


# ---------------------------------------------------------------------------- irreversible


async def test_notify_runs_once_under_20_concurrent_executions(
    make_runner: RunnerFactory, statements: Statements, run_id: str
) -> None:
    replicas = [make_runner(replica_id=f"replica-{i}") for i in range(4)]  # four replicas, one table
    call = _call(run_id, "notify", {"channel": "ops", "message": "deploy finished"})
    results = await asyncio.gather(*(replicas[i % 4].execute(call) for i in range(20)))

    rows = await _outbox_rows(statements, call.idempotency_key)
    assert len(rows) == 1
    assert {r.status for r in results} == {ToolStatus.OK}  # the losers waited for the winner's result
    assert sum(not r.replayed for r in results) == 1
    notification_id = str(rows[0]["notification_id"])
    assert all(r.value() == {"notification_id": notification_id} for r in results)

    again = await replicas[0].execute(call)  # a redelivered call: the recorded result, not a second send
    assert again.replayed and again.value() == {"notification_id": notification_id}
    assert len(await _outbox_rows(statements, call.idempotency_key)) == 1


class CountingStore(ToolResultStore):
    """The real store, counting its Paxos (serial) reads and claims."""

    serial_reads = 0
    claims = 0

    async def get(self, key: str, *, serial: bool = False) -> StoredResult | None:
        self.serial_reads += serial
        return await super().get(key, serial=serial)

    async def claim(self, key: str, **kw: Any) -> ClaimOutcome:
        self.claims += 1
        return await super().claim(key, **kw)


async def test_a_redelivered_irreversible_call_is_answered_without_paxos(
    registry: ToolRegistry, statements: Statements, settings: ToolExecSettings, run_id: str
) -> None:
    store = CountingStore(statements)
    runner = ToolRunner(registry, store, settings)
    call = _call(run_id, "notify", {"channel": "ops", "message": "replayed backlog"})
    first = await runner.execute(call)
    assert first.status is ToolStatus.OK and not first.replayed
    assert (store.claims, store.serial_reads) == (1, 1)
    for _ in range(3):  # a re-seeked group delivers the call again
        again = await runner.execute(call)
        assert again.replayed and again.value() == first.value()
    assert (store.claims, store.serial_reads) == (1, 1)
    assert len(await _outbox_rows(statements, call.idempotency_key)) == 1


async def test_a_cancelled_caller_does_not_leave_a_claim_without_result(
    make_runner: RunnerFactory, registry: ToolRegistry, store: ToolResultStore, run_id: str
) -> None:
    """A rebalance cancels in-flight calls; a claimed irreversible call still records its result."""
    registry.register(SlowIrreversible())
    call = _call(run_id, "test.slow_irreversible", {})
    task = asyncio.create_task(make_runner().execute(call))
    await asyncio.sleep(0.2)  # claimed, running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(40):
        row = await store.get(call.idempotency_key, serial=True)
        if row is not None and row.completed:
            break
        await asyncio.sleep(0.05)
    assert row is not None and row.status == "OK" and row.output == '{"sent": true}'
    again = await make_runner().execute(call)  # the next owner's redelivery: the recorded result
    assert again.replayed and again.value() == {"sent": True}


async def test_a_claim_without_result_is_outcome_unknown_and_not_rerun(
    make_runner: RunnerFactory, store: ToolResultStore, statements: Statements, run_id: str
) -> None:
    call = _call(run_id, "notify", {"channel": "ops", "message": "crash"})
    claim = await store.claim(  # a replica claimed the call and died before recording a result
        call.idempotency_key,
        tenant_id=call.tenant_id,
        session_id=call.session_id,
        tool="notify",
        claimed_by="dead-replica",
    )
    assert claim.won
    runner = make_runner(claim_wait_s=0.5)
    started = time.monotonic()
    result = await runner.execute(call)
    assert result.status is ToolStatus.OUTCOME_UNKNOWN
    assert "dead-replica" in (result.error or "") and "not re-run" in (result.error or "")
    assert 0.4 < time.monotonic() - started < 3  # it polled for a result for claim_wait_s
    assert await _outbox_rows(statements, call.idempotency_key) == []
    row = await store.get(call.idempotency_key, serial=True)
    assert row is not None and row.status == "CLAIMED" and row.claimed_by == "dead-replica"


async def test_an_old_claim_is_reported_without_waiting(
    make_runner: RunnerFactory, store: ToolResultStore, statements: Statements, run_id: str
) -> None:
    call = _call(run_id, "notify", {"channel": "ops", "message": "old crash"})
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await store.claim(
        call.idempotency_key,
        tenant_id=call.tenant_id,
        session_id=call.session_id,
        tool="notify",
        claimed_by="dead-replica",
        now=long_ago,
    )
    started = time.monotonic()
    result = await make_runner(claim_wait_s=5).execute(call)
    assert result.status is ToolStatus.OUTCOME_UNKNOWN
    assert time.monotonic() - started < 2
    assert await _outbox_rows(statements, call.idempotency_key) == []


async def test_a_loser_waits_for_the_claimants_result(
    make_runner: RunnerFactory, store: ToolResultStore, statements: Statements, run_id: str
) -> None:
    call = _call(run_id, "notify", {"channel": "ops", "message": "slow winner"})
    await store.claim(
        call.idempotency_key,
        tenant_id=call.tenant_id,
        session_id=call.session_id,
        tool="notify",
        claimed_by="other-replica",
    )
    pending = asyncio.create_task(make_runner(claim_wait_s=5).execute(call))
    await asyncio.sleep(0.3)
    assert not pending.done()
    assert await store.complete(
        call.idempotency_key,
        status=ToolStatus.OK,
        claimed_by="other-replica",
        output='{"notification_id": "from-the-winner"}',
    )
    result = await pending
    assert result.status is ToolStatus.OK and result.replayed
    assert result.value() == {"notification_id": "from-the-winner"}
    assert await _outbox_rows(statements, call.idempotency_key) == []


async def test_only_the_claimant_can_complete_a_claim(store: ToolResultStore, run_id: str) -> None:
    key = f"key-{run_id}"
    first = await store.claim(key, tenant_id="t", session_id="s", tool="notify", claimed_by="a")
    second = await store.claim(key, tenant_id="t", session_id="s", tool="notify", claimed_by="b")
    assert first.won and not second.won
    assert second.existing is not None and second.existing.claimed_by == "a"
    assert not await store.complete(key, status=ToolStatus.OK, claimed_by="b", output="1")
    assert await store.complete(key, status=ToolStatus.OK, claimed_by="a", output="2")
    assert not await store.complete(key, status=ToolStatus.ERROR, claimed_by="a", error="twice")
    row = await store.get(key)
    assert row is not None and row.status == "OK" and row.output == "2" and row.completed


async def test_irreversible_tools_are_not_retried(
    make_runner: RunnerFactory, registry: ToolRegistry, run_id: str
) -> None:
    flaky = FlakyIrreversible(fail_times=1)
    registry.register(flaky)
    registry.register(FailsPermanently())
    runner = make_runner()
    result = await runner.execute(_call(run_id, flaky.name, {}))
    assert result.status is ToolStatus.OUTCOME_UNKNOWN and result.attempts == 1 and flaky.runs == 1
    again = await runner.execute(_call(run_id, flaky.name, {}))
    assert again.replayed and again.status is ToolStatus.OUTCOME_UNKNOWN and flaky.runs == 1

    failed = await runner.execute(_call(run_id, "test.fails", {}))
    assert failed.status is ToolStatus.ERROR and failed.error == "the mail server refused the address"


# ---------------------------------------------------------------------------- idempotent writes, kv


async def test_kv_put_then_get_round_trip(runner: ToolRunner, run_id: str) -> None:
    value = {"city": "Berlin", "days": [1, 2], "note": "naïve"}
    put = await runner.execute(_call(run_id, "kv.put", {"key": "plan", "value": value}))
    assert put.status is ToolStatus.OK and put.value() == {"key": "plan", "stored": True}

    got = await runner.execute(_call(run_id, "kv.get", {"key": "plan"}, step=2))
    assert got.status is ToolStatus.OK and got.value() == {"key": "plan", "found": True, "value": value}

    missing = await runner.execute(_call(run_id, "kv.get", {"key": "nope"}, step=3))
    assert missing.value() == {"key": "nope", "found": False}

    other_tenant = await runner.execute(_call(run_id, "kv.get", {"key": "plan"}, step=2, tenant="tenant-b"))
    assert other_tenant.value() == {"key": "plan", "found": False}


async def test_an_idempotent_write_re_executed_returns_the_recorded_result(
    make_runner: RunnerFactory, registry: ToolRegistry, run_id: str
) -> None:
    counting = Counting()
    registry.register(counting)
    call = _call(run_id, counting.name, {"x": 1})
    first = await make_runner().execute(call)
    second = await make_runner().execute(call)  # another replica, after a redelivery
    assert counting.runs == 1
    assert not first.replayed and second.replayed
    assert first.value() == second.value() == {"run": 1, "args": {"x": 1}}
    other_step = await make_runner().execute(_call(run_id, counting.name, {"x": 1}, step=2))
    assert counting.runs == 2 and other_step.value() == {"run": 2, "args": {"x": 1}}


async def test_read_only_tools_run_again(
    runner: ToolRunner, make_runner: RunnerFactory, store: ToolResultStore, run_id: str
) -> None:
    call = _call(run_id, "calculator", {"expression": "6 * 7"})
    first = await runner.execute(call)
    second = await runner.execute(call)
    assert first.value()["result"] == 42 and not second.replayed
    assert await store.get(call.idempotency_key) is None  # not recorded unless asked for
    recording = make_runner(settings={"record_read_only": True})
    third = await recording.execute(call)
    assert not third.replayed
    row = await store.get(call.idempotency_key)
    assert row is not None and row.status == "OK" and json.loads(row.output or "")["result"] == 42


# ---------------------------------------------------------------------------- timeouts, retries, limits


async def test_timeout(runner: ToolRunner, registry: ToolRegistry, run_id: str) -> None:
    registry.register(Slow())
    started = time.monotonic()
    result = await runner.execute(_call(run_id, "test.slow", {}))
    assert result.status is ToolStatus.TIMEOUT and "timed out after 0.2s" in (result.error or "")
    assert time.monotonic() - started < 2

    # the call's own timeout (ToolCall.timeout_ms) shortens the tool's
    short = await runner.execute(_call(run_id, "sleep", {"seconds": 5}, timeout_s=0.2))
    assert short.status is ToolStatus.TIMEOUT
    done = await runner.execute(_call(run_id, "sleep", {"seconds": 0.01}, step=2, timeout_s=0.5))
    assert done.status is ToolStatus.OK and done.value() == {"slept_s": 0.01}


async def test_transient_errors_are_retried_with_backoff(
    make_runner: RunnerFactory, registry: ToolRegistry, run_id: str
) -> None:
    flaky = Flaky(fail_times=2)
    registry.register(flaky)
    result = await make_runner().execute(_call(run_id, flaky.name, {}))
    assert result.status is ToolStatus.OK and result.attempts == 3 and result.value() == {"runs": 3}

    flaky.runs, flaky.fail_times = 0, 10
    gave_up = await make_runner().execute(_call(run_id, flaky.name, {}, step=2))
    assert gave_up.status is ToolStatus.ERROR and gave_up.attempts == 3 and flaky.runs == 3
    assert "gave up after 3 attempts" in (gave_up.error or "")


class StoreDown(Tool):
    """A tool whose own store (Cassandra) is unreachable ``fail_times`` times."""

    parameters: ClassVar[dict[str, Any]] = {"type": "object"}
    description = "store down"

    def __init__(self, name: str, effect: Effect, fail_times: int) -> None:
        self.name = name  # type: ignore[misc]
        self.effect = effect  # type: ignore[misc]
        self.fail_times = fail_times
        self.runs = 0

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        from cassandra.cluster import NoHostAvailable

        self.runs += 1
        if self.runs <= self.fail_times:
            raise NoHostAvailable("Unable to complete the operation against any hosts", {})
        return ToolOutput({"runs": self.runs})


async def test_a_tool_whose_store_is_down_waits_for_it_instead_of_answering_an_error(
    make_runner: RunnerFactory, registry: ToolRegistry, run_id: str
) -> None:
    from cassandra.cluster import NoHostAvailable

    # Found by the chaos run: kv.get during a Cassandra restart answered "internal error:
    # NoHostAvailable" to the model. A store outage is no answer; the call must wait for it.
    reader = StoreDown(f"test.store-down-{run_id}", Effect.READ_ONLY, fail_times=2)
    registry.register(reader)
    ok = await make_runner().execute(_call(run_id, reader.name, {}))
    assert ok.status is ToolStatus.OK and ok.value() == {"runs": 3}
    reader.runs, reader.fail_times = 0, 10
    with pytest.raises(NoHostAvailable):  # the service's loop retries the call until the store is back
        await make_runner().execute(_call(run_id, reader.name, {}, step=2))
    assert reader.runs == 3
    # An irreversible tool may have acted before its store failed: reported, never re-run.
    sender = StoreDown(f"test.store-down-irr-{run_id}", Effect.IRREVERSIBLE, fail_times=1)
    registry.register(sender)
    unknown = await make_runner().execute(_call(run_id, sender.name, {}))
    assert unknown.status is ToolStatus.OUTCOME_UNKNOWN and sender.runs == 1


async def test_per_tool_concurrency_and_replica_slots(
    make_runner: RunnerFactory, registry: ToolRegistry, run_id: str
) -> None:
    limited, free = Gauge("test.limited", 2), Gauge("test.free", None)
    registry.register(limited)
    registry.register(free)
    runner = make_runner(settings={"slots": 3})
    await asyncio.gather(*(runner.execute(_call(run_id, limited.name, {}, step=i)) for i in range(8)))
    await asyncio.gather(*(runner.execute(_call(run_id, free.name, {}, step=i)) for i in range(8)))
    assert limited.peak == 2
    assert free.peak == 3


# ---------------------------------------------------------------------------- artifacts


async def test_a_large_output_is_stored_as_an_artifact(
    runner: ToolRunner, registry: ToolRegistry, statements: Statements, run_id: str
) -> None:
    registry.register(Big())
    call = _call(run_id, "test.big", {"n": 200})
    result = await runner.execute(call)
    assert result.status is ToolStatus.OK and result.output is None and result.artifact is not None
    ref = result.artifact
    rows = await statements.run(
        "SELECT tenant_id, session_id, content_type, size_bytes, sha256, data FROM {ks}.artifacts"
        " WHERE artifact_id = ?",
        (ref.artifact_id,),
    )
    (row,) = rows
    data = bytes(row["data"])
    assert json.loads(data) == {"rows": [f"row {i} ünïcode" for i in range(200)]}
    assert ref.size_bytes == len(data) == row["size_bytes"] > 1024
    assert ref.sha256 == hashlib.sha256(data).hexdigest() == row["sha256"]
    assert (row["tenant_id"], row["session_id"], row["content_type"]) == (
        call.tenant_id,
        call.session_id,
        "application/json",
    )
    assert await runner.artifacts.get(ref.artifact_id, tenant_id="tenant-b") is None

    replayed = await runner.execute(call)  # the recorded result carries the same pointer
    assert replayed.replayed and replayed.artifact == ref

    small = await runner.execute(_call(run_id, "test.big", {"n": 2}, step=2))
    assert small.artifact is None and small.value() == {"rows": ["row 0 ünïcode", "row 1 ünïcode"]}

    record = result.as_record(call)  # the ToolResult record for the inbox encodes
    assert default_codec().encode("ToolResult", record)


# ---------------------------------------------------------------------------- rejected


async def test_invalid_arguments_and_unknown_tools_are_rejected(runner: ToolRunner, run_id: str) -> None:
    bad = await runner.execute(_call(run_id, "sleep", {"seconds": "a while"}))
    assert bad.status is ToolStatus.REJECTED and "$.seconds" in (bad.error or "")
    assert bad.attempts == 0

    missing = await runner.execute(_call(run_id, "notify", {"channel": "ops"}))
    assert missing.status is ToolStatus.REJECTED
    assert "'message' is a required property" in (missing.error or "")

    unknown = await runner.execute(_call(run_id, "shell.exec", {"cmd": "rm -rf /"}))
    assert unknown.status is ToolStatus.REJECTED and "unknown tool 'shell.exec'" in (unknown.error or "")

    record = {
        "tenant_id": "tenant-a",
        "session_id": f"session-{run_id}",
        "turn_id": "turn-1",
        "call_id": "call-9",
        "step": 9,
        "tool": "calculator",
        "arguments_json": "{not json",
        "idempotency_key": "k" * 64,
        "timeout_ms": 1000,
    }
    garbled = await runner.execute(ToolCallRequest.from_record(record))
    assert garbled.status is ToolStatus.REJECTED and "JSON object" in (garbled.error or "")


# ---------------------------------------------------------------------------- http.get


@pytest.fixture
async def web_server() -> AsyncIterator[str]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello from the test", content_type="text/plain")

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (200 * 1024), content_type="application/octet-stream")

    async def away(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://example.com/")

    async def here(request: web.Request) -> web.Response:
        raise web.HTTPFound("/hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/large", large)
    app.router.add_get("/away", away)
    app.router.add_get("/here", here)
    app_runner = web.AppRunner(app)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await app_runner.cleanup()


async def test_http_get_allowlist_and_fetch(make_runner: RunnerFactory, web_server: str, run_id: str) -> None:
    runner = make_runner(settings={"artifact_threshold_bytes": 1024 * 1024})
    denied = await runner.execute(_call(run_id, "http.get", {"url": "http://example.com/"}))
    assert denied.status is ToolStatus.ERROR and "host not allowed" in (denied.error or "")
    scheme = await runner.execute(_call(run_id, "http.get", {"url": "file:///etc/passwd"}))
    assert scheme.status is ToolStatus.ERROR and "only http and https" in (scheme.error or "")

    ok = await runner.execute(_call(run_id, "http.get", {"url": f"{web_server}/hello"}))
    assert ok.status is ToolStatus.OK
    assert ok.value() == {
        "status": 200,
        "content_type": "text/plain",
        "body": "hello from the test",
        "truncated": False,
    }
    followed = await runner.execute(_call(run_id, "http.get", {"url": f"{web_server}/here"}))
    assert followed.value()["body"] == "hello from the test"

    redirected = await runner.execute(_call(run_id, "http.get", {"url": f"{web_server}/away"}))
    assert redirected.status is ToolStatus.ERROR
    assert "host not allowed: example.com" in (redirected.error or "")

    large = await runner.execute(_call(run_id, "http.get", {"url": f"{web_server}/large"}))
    assert large.value()["truncated"] is True and len(large.value()["body"]) == 64 * 1024


async def test_http_get_connection_errors_are_transient(make_runner: RunnerFactory, run_id: str) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # nothing listens on that port now
    result = await make_runner().execute(_call(run_id, "http.get", {"url": f"http://127.0.0.1:{port}/"}))
    assert result.status is ToolStatus.ERROR and result.attempts == 3
    assert "connection error" in (result.error or "") and "gave up after 3 attempts" in (result.error or "")
