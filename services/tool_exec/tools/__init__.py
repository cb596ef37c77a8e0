"""Tool plugins: the :class:`~services.tool_exec.tools.base.Tool` contract and the built-in tools."""

from services.tool_exec.tools.base import (
    Effect,
    InvalidArguments,
    Tool,
    ToolContext,
    ToolError,
    ToolFailure,
    ToolOutput,
    TransientToolError,
)

__all__ = [
    "Effect",
    "InvalidArguments",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolFailure",
    "ToolOutput",
    "TransientToolError",
]
