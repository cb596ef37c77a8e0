"""Parsing the model's completion into a decision: tool calls or an answer.

The completion follows the Hermes/Qwen format of :mod:`shared.prompt`: zero or more
blocks ::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2+2"}}
    </tool_call>

A completion with at least one block is a ``TOOL_CALLS`` decision (its ``text`` is any
prose outside the blocks, stripped); one without is an ``ANSWER`` whose ``text`` is the
completion. A trailing ``<|im_end|>`` (or ``<|endoftext|>``) is ignored. Anything the
parser cannot trust raises :class:`MalformedDecisionError` with a machine-readable
``reason`` (one of :data:`MALFORMED_REASONS`), so the caller can feed it back to the
model or end the turn with that reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from shared.prompt import IM_END, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, dumps_json

__all__ = [
    "MALFORMED_REASONS",
    "Decision",
    "MalformedDecisionError",
    "ToolCallRequest",
    "format_tool_calls",
    "parse_decision",
]

MALFORMED_REASONS = (
    "empty_output",
    "unclosed_tool_call",
    "invalid_json",
    "missing_name",
    "arguments_not_object",
    "unknown_tool",
)

_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
_END_TOKENS = (IM_END, "<|endoftext|>")


@dataclass(frozen=True)
class ToolCallRequest:
    """One tool call the model asked for."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    """What the model decided: call tools (``tool_calls`` non-empty) or answer with ``text``."""

    kind: Literal["TOOL_CALLS", "ANSWER"]
    text: str
    tool_calls: tuple[ToolCallRequest, ...] = ()


class MalformedDecisionError(ValueError):
    """The completion is not a decision agentbus can act on; ``reason`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


def _strip_end(output: str) -> str:
    text = output.strip()
    stripped = True
    while stripped:
        stripped = False
        for token in _END_TOKENS:
            if text.endswith(token):
                text = text[: -len(token)].rstrip()
                stripped = True
    return text


def _parse_call(body: str, index: int, known_tools: Collection[str] | None) -> ToolCallRequest:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise MalformedDecisionError("invalid_json", f"tool call {index}: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedDecisionError(
            "invalid_json", f"tool call {index}: expected a JSON object, got {type(data).__name__}"
        )
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise MalformedDecisionError("missing_name", f"tool call {index}: no tool name")
    name = name.strip()
    arguments = data.get("arguments", {})
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):  # some models send the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise MalformedDecisionError(
                "arguments_not_object", f"tool call {index} ({name}): arguments string is not JSON"
            ) from exc
    if not isinstance(arguments, dict):
        raise MalformedDecisionError(
            "arguments_not_object",
            f"tool call {index} ({name}): arguments must be a JSON object, got {type(arguments).__name__}",
        )
    if known_tools is not None and name not in known_tools:
        raise MalformedDecisionError(
            "unknown_tool", f"tool call {index}: {name!r} is not one of {sorted(known_tools)}"
        )
    return ToolCallRequest(name=name, arguments=arguments)


def parse_decision(output: str, known_tools: Collection[str] | None = None) -> Decision:
    """Parse a completion into a :class:`Decision`.

    Args:
        output: the model's completion (without the prompt).
        known_tools: tool names the model may call; ``None`` accepts any name.

    Raises:
        MalformedDecisionError: ``reason`` is one of :data:`MALFORMED_REASONS`.
    """
    text = _strip_end(output)
    if not text:
        raise MalformedDecisionError("empty_output", "the model returned no text")
    calls: list[ToolCallRequest] = []
    prose: list[str] = []
    position = 0
    for index, match in enumerate(_BLOCK.finditer(text)):
        prose.append(text[position : match.start()])
        calls.append(_parse_call(match.group(1).strip(), index, known_tools))
        position = match.end()
    prose.append(text[position:])
    rest = "".join(prose)
    if TOOL_CALL_OPEN in rest or TOOL_CALL_CLOSE in rest:
        raise MalformedDecisionError(
            "unclosed_tool_call", "a <tool_call> block is not closed by </tool_call> (or the reverse)"
        )
    if not calls:
        return Decision(kind="ANSWER", text=text)
    return Decision(kind="TOOL_CALLS", text=rest.strip(), tool_calls=tuple(calls))


def format_tool_calls(calls: Iterable[ToolCallRequest]) -> str:
    """The assistant text that makes ``calls``: one ``<tool_call>`` block per call, newline-separated.

    ``parse_decision(format_tool_calls(calls)).tool_calls == tuple(calls)``.
    """
    return "\n".join(
        f"{TOOL_CALL_OPEN}\n{dumps_json({'name': call.name, 'arguments': call.arguments})}\n{TOOL_CALL_CLOSE}"
        for call in calls
    )
