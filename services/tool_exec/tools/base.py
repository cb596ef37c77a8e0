"""The tool plugin contract.

A tool is a class with a name, a description and a JSON schema of its arguments (what
reasoning puts in the prompt), an :class:`Effect` that decides how tool-exec guards it
against running twice, optional timeout and concurrency limits, and ``run``. Tools are
registered as entry points of the group ``agentbus.tools`` (see ``pyproject.toml``).

``run`` reports failure by raising: :class:`ToolError` for a permanent failure (the
tool did not act, retrying will not help), :class:`TransientToolError` for one worth
retrying (connection refused, 503). Anything else is a bug and reads as an error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from services.tool_exec.settings import ToolExecSettings
from shared.cassandra import Statements


class Effect(StrEnum):
    """What running a tool does to the world, which decides its idempotency guard."""

    READ_ONLY = "read_only"  # just run it (again)
    IDEMPOTENT_WRITE = "idempotent_write"  # running twice is harmless; a recorded result is re-used
    IRREVERSIBLE = "irreversible"  # at most once: claimed with a lightweight transaction first


@dataclass(frozen=True)
class ToolContext:
    """Who is calling, and the adapters a tool may use. Nothing here outlives the call."""

    tenant_id: str
    session_id: str
    turn_id: str
    call_id: str
    step: int
    idempotency_key: str
    statements: Statements
    settings: ToolExecSettings


@dataclass(frozen=True)
class ToolOutput:
    """A tool's result: any JSON-serialisable value."""

    output: Any
    content_type: str = "application/json"


class ToolFailure(Exception):
    """Base of the failures a tool (or its argument validation) reports; ``reason`` is for humans."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ToolError(ToolFailure):
    """A permanent failure: the tool did not act and retrying will not help."""


class TransientToolError(ToolFailure):
    """A failure worth retrying (with backoff), e.g. a refused connection."""


class InvalidArguments(ToolFailure):
    """The arguments do not match the tool's JSON schema; ``path`` is the JSON path at fault."""

    def __init__(self, reason: str, path: str = "$") -> None:
        super().__init__(reason)
        self.path = path


class Tool(ABC):
    """A tool plugin. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]
    description: ClassVar[str]
    parameters: ClassVar[dict[str, Any]]  # JSON schema (Draft 2020-12) of the arguments object
    effect: ClassVar[Effect]
    timeout_s: ClassVar[float | None] = None  # None: the service default (AGENTBUS_TOOL_TIMEOUT_S)
    max_concurrency: ClassVar[int | None] = None  # None: bounded only by the replica's slots

    @abstractmethod
    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        """Run with validated ``args``; raise :class:`ToolError` / :class:`TransientToolError` on failure."""

    def spec(self) -> dict[str, Any]:
        """What reasoning puts in the prompt."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}
