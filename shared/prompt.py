"""The prompt format agentbus sends to the model: ChatML framing with Hermes/Qwen tool calls.

Real open models (Qwen2.5, Hermes-2/3, and everything vLLM's ``hermes`` tool parser
reads) are trained on this format, so a vLLM model behind Triton replaces the
reference policy by configuration alone. Triton's vLLM backend does not apply a chat
template (``text_input`` is the raw prompt), so agentbus renders it here.

The layout, exactly (``\\n`` between blocks, no trailing newline after the last header)::

    <|im_start|>system
    {system}

    # Tools
    You may call one or more tools. Tool signatures (JSON schema) inside <tools></tools>:
    <tools>
    {"name": "calculator", "description": "...", "parameters": {...}}
    </tools>
    To call tools, reply with one <tool_call></tool_call> block per call, each holding
    {"name": <tool name>, "arguments": <JSON object>}. To answer the user, reply with
    plain text and no <tool_call> block.<|im_end|>
    <|im_start|>user
    what is 2+2<|im_end|>
    <|im_start|>assistant
    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2+2"}}
    </tool_call><|im_end|>
    <|im_start|>tool
    <tool_response>
    {"name": "calculator", "call_id": "c1", "status": "OK", "output": "4"}
    </tool_response><|im_end|>
    <|im_start|>assistant

* The ``# Tools`` section (from the blank line after ``{system}`` on) is left out when
  there are no tools; with an empty ``system`` the block starts at ``# Tools``.
* Tools: one JSON object per line, ``{"name", "description", "parameters"}`` in that
  order, rendered with ``json.dumps`` defaults (``", "`` and ``": "`` separators, as a
  Jinja ``tojson`` does) and ``ensure_ascii=False``.
* An assistant message's content is the model's own output: prose and/or tool call
  blocks as :func:`shared.decision.format_tool_calls` renders them.
* A tool message's content is the JSON text of the result
  (``{"status": ..., "output": ..., "error": ...}``); it is rendered on one line as
  ``{"name": <Message.name>, "call_id": <Message.call_id>, <the result's keys...>}``
  (content that is not a JSON object becomes ``"output": <content>``).
* The prompt ends with the open ``<|im_start|>assistant\\n`` header: the model
  completes the assistant turn and stops at ``<|im_end|>``.

Escaping (so user or tool text can never forge structure). vLLM tokenises
``text_input`` with special tokens enabled, so a ``<|im_end|>`` typed by a user would
become the real token. Therefore:

* in plain text (system, user and assistant prose), the ``<`` that opens a *marker* is
  replaced by U+2039 (single left-pointing angle quotation mark, ``\\u2039``). Markers are
  every special token of the form ``<|word|>`` (``<|im_start|>``, ``<|im_end|>``,
  ``<|endoftext|>`` ...) and the tags ``<tool_call>``, ``</tool_call>``,
  ``<tool_response>``, ``</tool_response>``, ``<tools>``, ``</tools>``, matched
  case-insensitively: ``<|im_end|>`` becomes ``\\u2039|im_end|>``, ``<tool_call>`` becomes
  ``\\u2039tool_call>``. Assistant messages keep their ``<tool_call>`` tags (they are the
  model's own calls) but every other marker in them is escaped.
* in JSON (tool specs, tool calls, tool responses), the ``<`` of a marker inside a
  string is written as the JSON escape ``\\u003c``: the JSON still decodes to exactly
  the original value, and the marker never appears literally in the prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "IM_END",
    "IM_START",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "Message",
    "ToolSpec",
    "build_prompt",
    "dumps_json",
    "escape_text",
]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

TOOLS_PREAMBLE = (
    "# Tools\nYou may call one or more tools. Tool signatures (JSON schema) inside <tools></tools>:\n"
)
TOOLS_POSTAMBLE = (
    "To call tools, reply with one <tool_call></tool_call> block per call, each holding\n"
    '{"name": <tool name>, "arguments": <JSON object>}. To answer the user, reply with\n'
    "plain text and no <tool_call> block."
)

# The '<' that opens a marker: a special token <|word|> or one of the format's tags.
_SPECIAL = r"\|[A-Za-z0-9_.\-]{1,64}\|>"
_TAGS = r"/?(?:tool_call|tool_response|tools)>"
_MARKER = re.compile(rf"<(?={_SPECIAL}|{_TAGS})", re.IGNORECASE)
_MARKER_NOT_TOOL_CALL = re.compile(rf"<(?={_SPECIAL}|/?(?:tool_response|tools)>)", re.IGNORECASE)
ESCAPED_LT = "\u2039"


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call: its name, what it does, and the JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Message:
    """One message of the conversation.

    For ``role="tool"``: ``name`` is the tool's name, ``call_id`` the call it answers and
    ``content`` the JSON text of the result ``{"status": ..., "output": ..., "error": ...}``.
    """

    role: Literal["user", "assistant", "tool"]
    content: str
    name: str | None = None
    call_id: str | None = None


def escape_text(text: str) -> str:
    """Plain text with every marker's ``<`` replaced by U+2039 (see the module docstring)."""
    return _MARKER.sub(ESCAPED_LT, text)


def _escape_assistant(text: str) -> str:
    return _MARKER_NOT_TOOL_CALL.sub(ESCAPED_LT, text)


def dumps_json(value: Any) -> str:
    """One-line JSON with the ``<`` of any marker inside a string written as ``\\u003c``.

    ``<`` only occurs inside strings in JSON text, so the result decodes to ``value``.
    """
    return _MARKER.sub(r"\\u003c", json.dumps(value, ensure_ascii=False))


def _tool_line(tool: ToolSpec) -> str:
    return dumps_json({"name": tool.name, "description": tool.description, "parameters": tool.parameters})


# The tools section of the prompts of a tool list, by the list's identity: a replica builds
# one prompt per model call from the same few ToolSpec objects. The cached tuple keeps them
# alive, so an id cannot be reused while its entry stands.
_TOOL_SECTIONS: dict[tuple[int, ...], tuple[tuple[ToolSpec, ...], str]] = {}


def _tools_section(tools: Sequence[ToolSpec]) -> str:
    key = tuple(map(id, tools))
    hit = _TOOL_SECTIONS.get(key)
    if hit is not None:
        return hit[1]
    lines = "\n".join(_tool_line(tool) for tool in tools)
    section = f"{TOOLS_PREAMBLE}<tools>\n{lines}\n</tools>\n{TOOLS_POSTAMBLE}"
    if len(_TOOL_SECTIONS) >= 64:
        _TOOL_SECTIONS.clear()
    _TOOL_SECTIONS[key] = (tuple(tools), section)
    return section


def _system_block(system: str, tools: Sequence[ToolSpec]) -> str:
    body = escape_text(system)
    if tools:
        section = _tools_section(tools)
        body = f"{body}\n\n{section}" if body else section
    return f"{IM_START}system\n{body}{IM_END}"


def _tool_response(message: Message) -> str:
    record: dict[str, Any] = {"name": message.name, "call_id": message.call_id}
    try:
        result = json.loads(message.content)
    except ValueError:
        result = None
    if isinstance(result, dict):
        record.update({k: v for k, v in result.items() if k not in record})
    else:
        record["output"] = message.content
    return f"{TOOL_RESPONSE_OPEN}\n{dumps_json(record)}\n{TOOL_RESPONSE_CLOSE}"


def _message_block(message: Message) -> str:
    if message.role == "user":
        body = escape_text(message.content)
    elif message.role == "assistant":
        body = _escape_assistant(message.content)
    elif message.role == "tool":
        body = _tool_response(message)
    else:  # pragma: no cover - guarded by the Literal type
        raise ValueError(f"unknown role {message.role!r}")
    return f"{IM_START}{message.role}\n{body}{IM_END}"


def build_prompt(system: str, tools: Sequence[ToolSpec], messages: Sequence[Message]) -> str:
    """The whole prompt: system block (with tools), each message, then the open assistant header."""
    blocks = [_system_block(system, tools)]
    blocks.extend(_message_block(message) for message in messages)
    blocks.append(f"{IM_START}assistant\n")
    return "\n".join(blocks)
