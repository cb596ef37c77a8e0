"""A session's state as a pure fold over its SessionEvents.

Reasoning folds the events it publishes, a cold rebuild folds Cassandra's log
(latest snapshot + later events), checkpoint folds to write snapshots, and tests
fold a stored log to prove it gives back the same context. The same function
everywhere, so every replica sees the same session.

Turns: a user message accepted while another turn runs is queued; it becomes
active (and its text enters the conversation) when the running turn gets its
final response or is cancelled. The state is plain JSON (Redis hot context,
Cassandra snapshots).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ContextMessage", "SessionState", "TurnState", "fold", "fold_event"]


@dataclass
class ContextMessage:
    """One entry of the conversation the model sees."""

    role: str  # "user" | "assistant" | "tool"
    content: str
    seq: int
    turn_id: str
    name: str | None = None  # tool name for role "tool"
    call_id: str | None = None


@dataclass
class TurnState:
    turn_id: str
    message_id: str
    text: str
    accepted_seq: int
    accepted_at_ms: int
    steps: int = 0
    malformed: int = 0
    pending_calls: dict[str, str] = field(default_factory=dict)  # call_id -> tool
    calls_made: int = 0


@dataclass
class SessionState:
    tenant_id: str
    session_id: str
    seq: int = -1  # the last event folded in; the next event gets seq + 1
    messages: list[ContextMessage] = field(default_factory=list)
    summary: str = ""
    summarised_through: int = -1
    active: TurnState | None = None
    queued: list[TurnState] = field(default_factory=list)
    seen_turns: list[str] = field(default_factory=list)  # every turn ever accepted or answered
    seen_messages: list[str] = field(default_factory=list)
    answered: int = 0

    @property
    def next_seq(self) -> int:
        return self.seq + 1

    def has_seen_turn(self, turn_id: str) -> bool:
        return turn_id in self.seen_turns

    def has_seen_message(self, message_id: str) -> bool:
        return message_id in self.seen_messages

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> SessionState:
        raw = json.loads(data)
        raw["messages"] = [ContextMessage(**m) for m in raw["messages"]]
        raw["active"] = TurnState(**raw["active"]) if raw["active"] else None
        raw["queued"] = [TurnState(**t) for t in raw["queued"]]
        return cls(**raw)


def _activate_next(state: SessionState) -> None:
    state.active = None
    if state.queued:
        turn = state.queued.pop(0)
        state.active = turn
        state.messages.append(ContextMessage("user", turn.text, turn.accepted_seq, turn.turn_id))


def fold_event(state: SessionState, event: dict[str, Any]) -> SessionState:
    """Apply one decoded SessionEvent (as the codec returns it) to ``state``, in place.

    Raises:
        ValueError: the event's seq is not the next one (a gap or a duplicate).
    """
    seq = int(event["seq"])
    if seq != state.seq + 1:
        raise ValueError(f"session {state.session_id}: expected seq {state.seq + 1}, got {seq}")
    state.seq = seq
    kind = event["event_type"]
    payload = event["payload"]
    turn_id = event["turn_id"]
    active = state.active
    if kind == "USER_MESSAGE_ACCEPTED":
        occurred = event["occurred_at"]
        at_ms = int(occurred.timestamp() * 1000) if hasattr(occurred, "timestamp") else int(occurred)
        turn = TurnState(turn_id, payload["message_id"], payload["text"], seq, at_ms)
        state.seen_turns.append(turn_id)
        state.seen_messages.append(payload["message_id"])
        if active is None:
            state.active = turn
            state.messages.append(ContextMessage("user", turn.text, seq, turn_id))
        else:
            state.queued.append(turn)
    elif kind == "MODEL_DECIDED":
        if active is not None and active.turn_id == turn_id:
            active.steps += 1
            if payload["decision_kind"] == "MALFORMED":
                active.malformed += 1
            else:
                state.messages.append(ContextMessage("assistant", payload["raw_output"], seq, turn_id))
    elif kind == "TOOL_CALLED":
        if active is not None and active.turn_id == turn_id:
            active.pending_calls[payload["call_id"]] = payload["tool"]
            active.calls_made += 1
    elif kind == "TOOL_RESULT_RECEIVED":
        if active is not None and active.turn_id == turn_id:
            active.pending_calls.pop(payload["call_id"], None)
        body = {"name": payload["tool"], "call_id": payload["call_id"], "status": payload["status"]}
        if payload.get("output") is not None:
            body["output"] = payload["output"]
        if payload.get("artifact") is not None:
            body["artifact"] = payload["artifact"]
        if payload.get("error") is not None:
            body["error"] = payload["error"]
        state.messages.append(
            ContextMessage(
                "tool",
                json.dumps(body, ensure_ascii=False, separators=(", ", ": ")),
                seq,
                turn_id,
                name=payload["tool"],
                call_id=payload["call_id"],
            )
        )
    elif kind == "RESPONSE_SENT":
        if turn_id not in state.seen_turns:
            state.seen_turns.append(turn_id)  # answered without being accepted (rejected)
        if active is not None and active.turn_id == turn_id:
            state.answered += 1
            _activate_next(state)
    elif kind == "TURN_CANCELLED":
        if active is not None and active.turn_id == turn_id:
            _activate_next(state)
        else:
            state.queued = [t for t in state.queued if t.turn_id != turn_id]
    elif kind == "CONTEXT_SUMMARISED":
        through = int(payload["through_seq"])
        state.summary = payload["summary"]
        state.summarised_through = through
        state.messages = [m for m in state.messages if m.seq > through]
    # Unknown event types (a newer writer) change nothing but the seq.
    return state


def fold(
    tenant_id: str, session_id: str, events: list[dict[str, Any]], start: SessionState | None = None
) -> SessionState:
    """Fold ``events`` (in seq order) onto ``start`` or an empty session."""
    state = start if start is not None else SessionState(tenant_id, session_id)
    for event in events:
        if int(event["seq"]) <= state.seq:
            continue  # already folded (a snapshot covers it)
        fold_event(state, event)
    return state
