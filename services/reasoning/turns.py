"""The turn logic of the reasoning service: one inbox record in, events and records out.

``TurnEngine.handle`` takes a session's state and one decoded inbox record
(TurnRequested, ToolResult or CancelRequested) and returns what to publish: the
SessionEvents (each already folded into the state, with its ``seq``), ToolCalls and
AgentResponses. It never waits on a tool: when the model asks for tools it
publishes the calls and returns; the ToolResults come back later as inbox records.

Everything it decides is a function of the state and the record, except the model's
output, which is cached per ``(session, seq)`` so a step retried after a crash reuses
the decision it already paid for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.reasoning.settings import ReasoningSettings
from services.tool_exec.idempotency import canonical_json, idempotency_key
from shared.avro import AvroCodec
from shared.context import ContextMessage, SessionState, fold_event
from shared.decision import MalformedDecisionError, parse_decision
from shared.prompt import Message, ToolSpec, build_prompt
from shared.telemetry import current_trace_id
from shared.triton import ModelCallError

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are an agent running on agentbus. Use the tools when they help, one step at a time, "
    "and answer the user briefly and truthfully from the conversation and the tool results."
)


class DecisionCache(Protocol):
    async def get(self, tenant_id: str, session_id: str, seq: int) -> str | None: ...

    async def put(self, tenant_id: str, session_id: str, seq: int, output: str) -> None: ...


ModelCall = Callable[[str], Awaitable[str]]


def trace_id_for(turn_id: str) -> str:
    """A trace id derived from the turn id: what an event records when no trace is running."""
    return hashlib.sha256(turn_id.encode()).hexdigest()[:32]


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Outputs:
    """What one inbox record produces; published in one transaction with its offset."""

    events: list[bytes] = field(default_factory=list)
    tool_calls: list[bytes] = field(default_factory=list)
    responses: list[bytes] = field(default_factory=list)
    model_calls: int = 0
    dropped: str | None = None  # why the record changed nothing (duplicate, late result...)
    # The record's first attempt, never delivered before: no decision can be cached for it yet.
    first_attempt: bool = False

    @property
    def empty(self) -> bool:
        return not (self.events or self.tool_calls or self.responses)


class ModelUnavailableError(RuntimeError):
    """The model could not be reached; the record is retried later, nothing was published."""


@dataclass
class TurnEngine:
    settings: ReasoningSettings
    codec: AvroCodec
    model: ModelCall
    decisions: DecisionCache
    tools: Sequence[ToolSpec]
    model_name: str = "reference_policy"

    # -- emitting ------------------------------------------------------------------------------

    def _event(
        self, state: SessionState, out: Outputs, turn_id: str, event_type: str, payload: dict[str, Any]
    ) -> None:
        datum = {
            "tenant_id": state.tenant_id,
            "session_id": state.session_id,
            "seq": state.next_seq,
            "turn_id": turn_id,
            "event_type": event_type,
            "payload": payload,
            "trace_id": current_trace_id() or trace_id_for(turn_id),
            "occurred_at": now(),
        }
        out.events.append(self.codec.encode("SessionEvent", datum))
        fold_event(state, datum)

    def _respond(
        self,
        state: SessionState,
        out: Outputs,
        *,
        message_id: str,
        turn_id: str | None,
        kind: str,
        text: str,
        reason: str | None,
        steps: int,
    ) -> None:
        out.responses.append(
            self.codec.encode(
                "AgentResponse",
                {
                    "tenant_id": state.tenant_id,
                    "session_id": state.session_id,
                    "message_id": message_id,
                    "turn_id": turn_id,
                    "kind": kind,
                    "text": text,
                    "reason": reason,
                    "steps": steps,
                    "created_at": now(),
                },
            )
        )

    def _finish(
        self, state: SessionState, out: Outputs, *, kind: str, text: str, reason: str | None = None
    ) -> None:
        """Give the active turn its one final response (and start the next queued turn)."""
        turn = state.active
        assert turn is not None
        steps = turn.steps
        self._event(state, out, turn.turn_id, "RESPONSE_SENT", {"kind": kind, "text": text, "reason": reason})
        self._respond(
            state,
            out,
            message_id=turn.message_id,
            turn_id=turn.turn_id,
            kind=kind,
            text=text,
            reason=reason,
            steps=steps,
        )

    def _cancel_active(self, state: SessionState, out: Outputs, reason: str, text: str) -> None:
        turn = state.active
        assert turn is not None
        self._event(state, out, turn.turn_id, "TURN_CANCELLED", {"reason": reason})
        self._respond(
            state,
            out,
            message_id=turn.message_id,
            turn_id=turn.turn_id,
            kind="ERROR",
            text=text,
            reason=reason,
            steps=turn.steps,
        )

    # -- the inbox records ---------------------------------------------------------------------

    async def handle(
        self, state: SessionState, name: str, record: dict[str, Any], *, first_attempt: bool = False
    ) -> Outputs:
        """What ``record`` does to ``state`` (folded in place) and publishes.

        ``first_attempt``: the record was never delivered before (see
        :class:`services.reasoning.main.PartitionWorker`), so the decision cache is not read.
        """
        out = Outputs(first_attempt=first_attempt)
        name = name.rsplit(".", 1)[-1]
        if name == "TurnRequested":
            await self._on_turn_requested(state, record, out)
        elif name == "ToolResult":
            await self._on_tool_result(state, record, out)
        elif name == "CancelRequested":
            await self._on_cancel(state, record, out)
        else:
            raise ValueError(f"reasoning cannot handle {name}")
        return out

    async def _on_turn_requested(self, state: SessionState, rec: dict[str, Any], out: Outputs) -> None:
        turn_id, message_id = rec["turn_id"], rec["message_id"]
        if state.has_seen_turn(turn_id) or state.has_seen_message(message_id):
            out.dropped = "duplicate_turn"
            return
        policy = rec["concurrency_policy"]
        if state.active is not None and policy == "REJECT":
            text = "another turn of this session is still running"
            self._event(
                state,
                out,
                turn_id,
                "RESPONSE_SENT",
                {"kind": "REJECTED", "text": text, "reason": "turn_in_progress"},
            )
            self._respond(
                state,
                out,
                message_id=message_id,
                turn_id=turn_id,
                kind="REJECTED",
                text=text,
                reason="turn_in_progress",
                steps=0,
            )
            return
        if state.active is not None and policy == "INTERRUPT":
            self._cancel_active(state, out, "interrupted", "interrupted by a newer message")
        self._event(
            state, out, turn_id, "USER_MESSAGE_ACCEPTED", {"message_id": message_id, "text": rec["text"]}
        )
        await self._advance(state, out)

    async def _on_tool_result(self, state: SessionState, rec: dict[str, Any], out: Outputs) -> None:
        turn = state.active
        if turn is None or turn.turn_id != rec["turn_id"] or rec["call_id"] not in turn.pending_calls:
            out.dropped = "late_or_duplicate_tool_result"
            return
        self._event(
            state,
            out,
            turn.turn_id,
            "TOOL_RESULT_RECEIVED",
            {
                "call_id": rec["call_id"],
                "tool": rec["tool"],
                "status": rec["status"],
                "output": rec.get("output"),
                "artifact": rec.get("artifact"),
                "error": rec.get("error"),
            },
        )
        await self._advance(state, out)

    async def _on_cancel(self, state: SessionState, rec: dict[str, Any], out: Outputs) -> None:
        wanted = rec.get("turn_id")
        if state.active is not None and wanted in (None, state.active.turn_id):
            self._cancel_active(state, out, "cancelled", rec.get("reason") or "cancelled")
            await self._advance(state, out)
            return
        for turn in state.queued:
            if turn.turn_id == wanted:
                self._event(state, out, turn.turn_id, "TURN_CANCELLED", {"reason": "cancelled"})
                self._respond(
                    state,
                    out,
                    message_id=turn.message_id,
                    turn_id=turn.turn_id,
                    kind="ERROR",
                    text=rec.get("reason") or "cancelled",
                    reason="cancelled",
                    steps=0,
                )
                return
        out.dropped = "nothing_to_cancel"

    # -- model steps ---------------------------------------------------------------------------

    async def _advance(self, state: SessionState, out: Outputs) -> None:
        """Run model steps while the active turn is not waiting on tools; start queued turns."""
        while state.active is not None and not state.active.pending_calls:
            turn = state.active
            age_s = time.time() - turn.accepted_at_ms / 1000
            if turn.steps >= self.settings.max_steps_per_turn:
                self._finish(
                    state, out, kind="ERROR", text="the turn used all its steps", reason="step_limit"
                )
                continue
            if age_s > self.settings.turn_deadline_s:
                self._finish(state, out, kind="ERROR", text="the turn passed its deadline", reason="deadline")
                continue
            await self._model_step(state, out)
        self._maybe_summarise(state, out)

    async def _model_step(self, state: SessionState, out: Outputs) -> None:
        turn = state.active
        assert turn is not None
        decision_seq = state.next_seq
        started = time.perf_counter()
        raw = (
            None
            if out.first_attempt
            else await self.decisions.get(state.tenant_id, state.session_id, decision_seq)
        )
        if raw is None:
            try:
                raw = await self.model(self.prompt(state))
            except ModelCallError as exc:
                if exc.transient:
                    raise ModelUnavailableError(str(exc)) from exc
                self._finish(state, out, kind="ERROR", text=f"the model failed: {exc}", reason="model_error")
                return
            out.model_calls += 1
            await self.decisions.put(state.tenant_id, state.session_id, decision_seq, raw)
        latency_ms = int((time.perf_counter() - started) * 1000)
        try:
            decision = parse_decision(raw, known_tools={t.name for t in self.tools})
        except MalformedDecisionError as exc:
            log.info("session %s: malformed model output (%s)", state.session_id, exc.reason)
            self._event(
                state,
                out,
                turn.turn_id,
                "MODEL_DECIDED",
                {
                    "raw_output": raw,
                    "decision_kind": "MALFORMED",
                    "model": self.model_name,
                    "latency_ms": latency_ms,
                },
            )
            return  # counted as a step; the loop retries until the step limit
        self._event(
            state,
            out,
            turn.turn_id,
            "MODEL_DECIDED",
            {
                "raw_output": raw,
                "decision_kind": decision.kind,
                "model": self.model_name,
                "latency_ms": latency_ms,
            },
        )
        if decision.kind == "ANSWER":
            self._finish(state, out, kind="FINAL", text=decision.text)
            return
        step = turn.steps
        deadline = dt.datetime.fromtimestamp(turn.accepted_at_ms / 1000, dt.UTC) + dt.timedelta(
            seconds=self.settings.turn_deadline_s
        )
        for index, call in enumerate(decision.tool_calls):
            call_id = f"{turn.turn_id}/{step}/{index}"
            key = idempotency_key(state.tenant_id, state.session_id, step, call.name, call.arguments)
            arguments_json = canonical_json(call.arguments)
            seq = state.next_seq
            self._event(
                state,
                out,
                turn.turn_id,
                "TOOL_CALLED",
                {
                    "call_id": call_id,
                    "step": step,
                    "tool": call.name,
                    "arguments_json": arguments_json,
                    "idempotency_key": key,
                },
            )
            out.tool_calls.append(
                self.codec.encode(
                    "ToolCall",
                    {
                        "tenant_id": state.tenant_id,
                        "session_id": state.session_id,
                        "turn_id": turn.turn_id,
                        "call_id": call_id,
                        "step": step,
                        "seq": seq,
                        "tool": call.name,
                        "arguments_json": arguments_json,
                        "idempotency_key": key,
                        "timeout_ms": int(self.settings.tool_call_timeout_s * 1000),
                        "deadline": deadline,
                        "requested_at": now(),
                    },
                )
            )

    def prompt(self, state: SessionState) -> str:
        system = SYSTEM_PROMPT
        if state.summary:
            system += "\n\nSummary of the earlier conversation:\n" + state.summary
        messages = [
            Message(m.role, m.content, m.name, m.call_id)  # type: ignore[arg-type]
            for m in state.messages
        ]
        return build_prompt(system, self.tools, messages)

    def _maybe_summarise(self, state: SessionState, out: Outputs) -> None:
        """Fold old, finished turns into a summary once the window passes its bound."""
        bound = self.settings.context_max_events
        if len(state.messages) <= bound:
            return
        active_turn = state.active.turn_id if state.active else None
        keep_from = len(state.messages) - bound // 2
        old: list[ContextMessage] = []
        for m in state.messages[:keep_from]:
            if m.turn_id == active_turn:
                break
            old.append(m)
        if not old:
            return
        lines = [state.summary] if state.summary else []
        lines += [f"{m.role}: {_shorten(m.content)}" for m in old]
        summary = "\n".join(lines)[-4000:]
        self._event(
            state,
            out,
            old[-1].turn_id,
            "CONTEXT_SUMMARISED",
            {"summary": summary, "through_seq": old[-1].seq},
        )


def _shorten(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def tool_specs_from(specs: Sequence[dict[str, Any]]) -> list[ToolSpec]:
    return [ToolSpec(s["name"], s["description"], s["parameters"]) for s in specs]


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
