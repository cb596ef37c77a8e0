"""Running one tool call with the guard its effect asks for.

``READ_ONLY``         run (again); the result is recorded only with ``record_read_only`` (it reaches
                      the session's event log with the ToolResult either way, and nothing ever
                      reads it back: a redelivered read-only call runs again).
``IDEMPOTENT_WRITE``  a completed result already recorded for the key is returned; else run and record.
``IRREVERSIBLE``      a completed result is returned, never re-run. Otherwise the key is claimed with a
                      lightweight transaction; only the winner runs the tool (once, without retries)
                      and completes the row with another transaction. A loser that finds the row
                      still ``CLAIMED`` polls it briefly for the winner's result; a claim that stays
                      without a result (the claimant crashed, or is still running) is reported as
                      ``OUTCOME_UNKNOWN`` and the tool is not run again.

Every attempt runs under the tool's timeout (``TIMEOUT``), its own concurrency limit and the
replica's execution slots; transient errors of non-irreversible tools are retried with
exponential backoff up to ``max_attempts``. A store the tool itself uses being unavailable
(Cassandra, Redis) is retried the same way and then propagates like the runner's own store
errors, so the call waits for the store instead of answering an error (an irreversible tool
answers ``OUTCOME_UNKNOWN``: it may have acted). Outputs whose JSON is larger than
``artifact_threshold_bytes`` go to the artifact store and only a pointer is returned.
Errors of the stores themselves (Cassandra unavailable...) propagate: the caller retries the
call, which is safe by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import SpanKind

from services.tool_exec.artifacts import ArtifactRef, ArtifactStore
from services.tool_exec.idempotency import (
    StoredResult,
    ToolResultStore,
    ToolStatus,
    idempotency_key,
)
from services.tool_exec.registry import ToolRegistry, UnknownTool
from services.tool_exec.settings import ToolExecSettings
from services.tool_exec.tools.base import (
    Effect,
    InvalidArguments,
    Tool,
    ToolContext,
    ToolError,
    TransientToolError,
)
from shared.service import STORE_UNAVAILABLE
from shared.telemetry import child_span

__all__ = ["ToolCallRequest", "ToolResultView", "ToolRunner"]

log = logging.getLogger(__name__)
INTERNAL = SpanKind.INTERNAL


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class ToolCallRequest:
    """One tool call (the fields of a ``ToolCall`` record that matter here).

    ``args`` is whatever the caller decoded (validated by the runner); ``idempotency_key``
    defaults to :func:`~services.tool_exec.idempotency.idempotency_key` of the call.
    ``timeout_s`` (from ``ToolCall.timeout_ms``) can only shorten the tool's own timeout.
    """

    tenant_id: str
    session_id: str
    turn_id: str
    call_id: str
    step: int
    tool: str
    args: Any
    idempotency_key: str = ""
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.idempotency_key:
            key = idempotency_key(self.tenant_id, self.session_id, self.step, self.tool, self.args)
            object.__setattr__(self, "idempotency_key", key)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ToolCallRequest:
        """From a decoded ``ToolCall``; unparsable ``arguments_json`` is passed on (and rejected)."""
        try:
            args: Any = json.loads(record["arguments_json"])
        except ValueError:
            args = record["arguments_json"]
        timeout_ms = record.get("timeout_ms") or 0
        return cls(
            tenant_id=record["tenant_id"],
            session_id=record["session_id"],
            turn_id=record["turn_id"],
            call_id=record["call_id"],
            step=record["step"],
            tool=record["tool"],
            args=args,
            idempotency_key=record["idempotency_key"],
            timeout_s=timeout_ms / 1000 if timeout_ms > 0 else None,
        )


@dataclass(frozen=True)
class ToolResultView:
    """How a call ended: ``output`` is JSON text (None when failed or stored as ``artifact``)."""

    idempotency_key: str
    tool: str
    status: ToolStatus
    output: str | None = None
    artifact: ArtifactRef | None = None
    error: str | None = None
    attempts: int = 0
    started_at: dt.datetime = field(default_factory=_now)
    finished_at: dt.datetime = field(default_factory=_now)
    replayed: bool = False  # True: returned from tool_results, the tool did not run for this request

    def value(self) -> Any:
        """The output decoded (None if there is none inline)."""
        return None if self.output is None else json.loads(self.output)

    def as_record(self, call: ToolCallRequest) -> dict[str, Any]:
        """The ``ToolResult`` datum for ``agentbus.reasoning.inbox``."""
        return {
            "tenant_id": call.tenant_id,
            "session_id": call.session_id,
            "turn_id": call.turn_id,
            "call_id": call.call_id,
            "step": call.step,
            "tool": self.tool,
            "idempotency_key": self.idempotency_key,
            "status": str(self.status),
            "output": self.output,
            "artifact": None if self.artifact is None else self.artifact.as_dict(),
            "error": self.error,
            "attempts": self.attempts,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


@dataclass(frozen=True)
class _Outcome:
    status: ToolStatus
    output: str | None = None
    artifact: ArtifactRef | None = None
    error: str | None = None
    attempts: int = 0


class ToolRunner:
    """Executes tool calls. One per replica: it owns the replica's slots and per-tool limits."""

    def __init__(
        self,
        registry: ToolRegistry,
        store: ToolResultStore,
        settings: ToolExecSettings,
        *,
        artifacts: ArtifactStore | None = None,
        replica_id: str | None = None,
        claim_wait_s: float = 2.0,
        claim_poll_s: float = 0.05,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.registry = registry
        self.store = store
        self.settings = settings
        self.artifacts = artifacts or ArtifactStore(store.statements)
        self.replica_id = replica_id or (
            f"{settings.service_name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self.claim_wait_s = claim_wait_s
        self.claim_poll_s = claim_poll_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._slots = asyncio.Semaphore(settings.slots)
        self._tool_limits: dict[str, asyncio.Semaphore] = {}

    # ------------------------------------------------------------------ entry point

    async def execute(self, call: ToolCallRequest) -> ToolResultView:
        started = _now()
        key = call.idempotency_key
        try:
            tool = self.registry.get(call.tool)
            args = self.registry.validate_args(tool, call.args)
        except (UnknownTool, InvalidArguments) as exc:
            reason = exc.reason if isinstance(exc, InvalidArguments) else str(exc)
            return ToolResultView(key, call.tool, ToolStatus.REJECTED, error=reason, started_at=started)
        ctx = ToolContext(
            tenant_id=call.tenant_id,
            session_id=call.session_id,
            turn_id=call.turn_id,
            call_id=call.call_id,
            step=call.step,
            idempotency_key=key,
            statements=self.store.statements,
            settings=self.settings,
        )
        if tool.effect is Effect.IRREVERSIBLE:
            return await self._irreversible(tool, args, ctx, call, started)
        if tool.effect is Effect.IDEMPOTENT_WRITE:
            existing = await self.store.get(key)
            if existing is not None and existing.completed:
                return await self._replay(existing, call.tool)
        outcome = await self._attempts(tool, args, ctx, self._timeout(tool, call), retry=True)
        finished = _now()
        if tool.effect is Effect.READ_ONLY and not self.settings.record_read_only:
            return self._view(key, tool.name, outcome, started, finished)
        await self.store.record(
            key,
            tenant_id=call.tenant_id,
            session_id=call.session_id,
            tool=tool.name,
            status=outcome.status,
            claimed_by=self.replica_id,
            started_at=started,
            finished_at=finished,
            output=outcome.output,
            artifact_id=outcome.artifact.artifact_id if outcome.artifact else None,
            error=outcome.error,
            attempts=outcome.attempts,
        )
        return self._view(key, tool.name, outcome, started, finished)

    # ------------------------------------------------------------------ irreversible

    async def _irreversible(
        self, tool: Tool, args: dict[str, Any], ctx: ToolContext, call: ToolCallRequest, started: dt.datetime
    ) -> ToolResultView:
        key = ctx.idempotency_key
        timeout = self._timeout(tool, call)
        # A completed row never changes again (completion is the claim's last transaction), so a
        # plain read that finds one may answer a redelivered call without a Paxos round: a replayed
        # backlog of calls costs one ordinary read each. Anything else is decided through Paxos.
        existing = await self.store.get(key)
        if existing is not None and existing.completed:
            return await self._replay(existing, tool.name)
        existing = await self.store.get(key, serial=True)
        if existing is None:
            claim = await self.store.claim(
                key,
                tenant_id=call.tenant_id,
                session_id=call.session_id,
                tool=tool.name,
                claimed_by=self.replica_id,
                now=started,
            )
            if claim.won:
                # Shielded: once claimed, the call runs to its recorded result even if the caller
                # is cancelled (a rebalance, a shutdown); cancelled in between, the claim would
                # stay without a result and every redelivery would answer OUTCOME_UNKNOWN.
                return await asyncio.shield(self._run_claimed(tool, args, ctx, started, timeout))
            existing = claim.existing
        assert existing is not None
        if not existing.completed:
            existing = await self._await_claim(existing, timeout)
        if existing.completed:
            return await self._replay(existing, tool.name)
        return ToolResultView(
            key,
            tool.name,
            ToolStatus.OUTCOME_UNKNOWN,
            error=(
                f"claimed by {existing.claimed_by} at {existing.claimed_at} without a recorded result "
                "(the claimant crashed mid-call or is still running); an irreversible call is not re-run"
            ),
            attempts=existing.attempts,
            started_at=started,
        )

    async def _run_claimed(
        self, tool: Tool, args: dict[str, Any], ctx: ToolContext, started: dt.datetime, limit_s: float
    ) -> ToolResultView:
        key = ctx.idempotency_key
        outcome = await self._attempts(tool, args, ctx, limit_s, retry=False)
        finished = _now()
        applied = await self.store.complete(
            key,
            status=outcome.status,
            claimed_by=self.replica_id,
            output=outcome.output,
            artifact_id=outcome.artifact.artifact_id if outcome.artifact else None,
            error=outcome.error,
            attempts=outcome.attempts,
            now=finished,
        )
        if not applied:  # nobody else may touch a claimed row; say so loudly if it happened
            log.error("tool_results %s: claim of %s lost before completion", key, self.replica_id)
        return self._view(key, tool.name, outcome, started, finished)

    async def _await_claim(self, claimed: StoredResult, limit_s: float) -> StoredResult:
        """Poll a claimed row for its result, while its claimant may still be running the tool."""
        claimed_at = claimed.claimed_at or _now()
        age = (_now() - claimed_at).total_seconds()
        if age > limit_s + self.claim_wait_s:  # its claimant's run is over: it died before completing
            return claimed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.claim_wait_s
        current = claimed
        while loop.time() < deadline:
            await asyncio.sleep(self.claim_poll_s)
            row = await self.store.get(claimed.idempotency_key, serial=True)
            if row is None:  # cannot happen: claims are never deleted
                return current
            current = row
            if current.completed:
                break
        return current

    # ------------------------------------------------------------------ running

    def _timeout(self, tool: Tool, call: ToolCallRequest) -> float:
        timeout = tool.timeout_s or self.settings.default_timeout_s
        return min(timeout, call.timeout_s) if call.timeout_s else timeout

    @contextlib.asynccontextmanager
    async def _limits(self, tool: Tool) -> AsyncIterator[None]:
        """The tool's own limit first, then a replica slot (so a busy tool does not hold slots)."""
        limit = self._tool_limits.get(tool.name)
        if limit is None and tool.max_concurrency:
            limit = self._tool_limits.setdefault(tool.name, asyncio.Semaphore(tool.max_concurrency))
        async with contextlib.AsyncExitStack() as stack:
            if limit is not None:
                await stack.enter_async_context(limit)
            await stack.enter_async_context(self._slots)
            yield

    def _backoff(self, attempt: int) -> float:
        delay: float = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return delay * random.uniform(0.5, 1.0)  # jitter: replicas retrying together spread out

    async def _attempts(
        self, tool: Tool, args: dict[str, Any], ctx: ToolContext, limit_s: float, *, retry: bool
    ) -> _Outcome:
        irreversible = tool.effect is Effect.IRREVERSIBLE
        max_attempts = max(1, self.settings.max_attempts) if retry else 1
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._limits(tool), asyncio.timeout(limit_s):
                    with child_span(f"tool {tool.name}", kind=INTERNAL, attributes={"attempt": attempt}):
                        result = await tool.run(args, ctx)
            except TimeoutError:
                note = "; an irreversible tool may have acted" if irreversible else ""
                error = f"timed out after {limit_s:g}s{note}"
                return _Outcome(ToolStatus.TIMEOUT, error=error, attempts=attempt)
            except TransientToolError as exc:
                if attempt < max_attempts:
                    log.info("%s: transient error (attempt %d): %s", tool.name, attempt, exc.reason)
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                if irreversible:  # it may have acted before failing
                    return _Outcome(ToolStatus.OUTCOME_UNKNOWN, error=exc.reason, attempts=attempt)
                error = f"{exc.reason} (gave up after {attempt} attempts)"
                return _Outcome(ToolStatus.ERROR, error=error, attempts=attempt)
            except InvalidArguments as exc:
                return _Outcome(ToolStatus.REJECTED, error=exc.reason, attempts=attempt)
            except STORE_UNAVAILABLE as exc:
                # A store the tool uses being down is no fault of the tool or its arguments.
                if irreversible:  # it may have acted before its store failed
                    error = f"store unavailable: {type(exc).__name__}: {exc}"
                    return _Outcome(ToolStatus.OUTCOME_UNKNOWN, error=error, attempts=attempt)
                if attempt < max_attempts:
                    log.info("%s: store unavailable (attempt %d): %r", tool.name, attempt, exc)
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                raise  # the service retries the call once the store answers again
            except ToolError as exc:
                return _Outcome(ToolStatus.ERROR, error=exc.reason, attempts=attempt)
            except Exception as exc:  # a bug in the tool; the call ends, the service does not
                log.exception("tool %s failed", tool.name)
                status = ToolStatus.OUTCOME_UNKNOWN if irreversible else ToolStatus.ERROR
                error = f"internal error: {type(exc).__name__}: {exc}"
                return _Outcome(status, error=error, attempts=attempt)
            return await self._output(tool, result.output, result.content_type, ctx, attempt)

    async def _output(
        self, tool: Tool, value: Any, content_type: str, ctx: ToolContext, attempts: int
    ) -> _Outcome:
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            error = f"output of {tool.name} is not JSON-serialisable: {exc}"
            status = ToolStatus.OUTCOME_UNKNOWN if tool.effect is Effect.IRREVERSIBLE else ToolStatus.ERROR
            return _Outcome(status, error=error, attempts=attempts)
        data = text.encode()
        if len(data) <= self.settings.artifact_threshold_bytes:
            return _Outcome(ToolStatus.OK, output=text, attempts=attempts)
        ref = await self.artifacts.put(
            data, tenant_id=ctx.tenant_id, session_id=ctx.session_id, content_type=content_type
        )
        return _Outcome(ToolStatus.OK, artifact=ref, attempts=attempts)

    # ------------------------------------------------------------------ views

    @staticmethod
    def _view(
        key: str, tool: str, outcome: _Outcome, started: dt.datetime, finished: dt.datetime
    ) -> ToolResultView:
        return ToolResultView(
            key,
            tool,
            outcome.status,
            output=outcome.output,
            artifact=outcome.artifact,
            error=outcome.error,
            attempts=outcome.attempts,
            started_at=started,
            finished_at=finished,
        )

    async def _replay(self, row: StoredResult, tool: str) -> ToolResultView:
        try:
            status = ToolStatus(row.status or "")
        except ValueError:
            status = ToolStatus.ERROR
        artifact = await self.artifacts.ref(row.artifact_id) if row.artifact_id else None
        return ToolResultView(
            row.idempotency_key,
            tool,
            status,
            output=row.output,
            artifact=artifact,
            error=row.error,
            attempts=row.attempts,
            started_at=row.claimed_at or _now(),
            finished_at=row.completed_at or _now(),
            replayed=True,
        )
