"""Print agentbus's prompt spec (system prompt, tool specs) as JSON: ``python -m tests.bench.peers.spec``.

The peers put exactly what agentbus's reasoning service puts in its prompts, read from
agentbus itself (tool-exec's plugin registry, reasoning's system prompt), so the model
sees the same prompt in every system.
"""

from __future__ import annotations

import sys

from services.reasoning.turns import SYSTEM_PROMPT, tool_specs_from
from services.tool_exec.registry import ToolRegistry
from tests.bench.peers.common import AgentSpec


def agentbus_spec() -> AgentSpec:
    return AgentSpec(SYSTEM_PROMPT, tuple(tool_specs_from(ToolRegistry.from_entry_points().specs())))


if __name__ == "__main__":
    sys.stdout.write(agentbus_spec().to_json() + "\n")
