"""The tool registry: plugins from the ``agentbus.tools`` entry points, argument validation, specs.

    registry = ToolRegistry.from_entry_points()
    tool = registry.get("calculator")          # UnknownTool if not registered
    registry.validate_args(tool, {"expression": "1+2"})   # InvalidArguments naming the JSON path
    registry.specs()                           # [{name, description, parameters}] for the prompt

Every tool's ``parameters`` is checked to be a valid Draft 2020-12 JSON schema when it is
registered, so a broken plugin fails at start-up, not on its first call.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from typing import Any

import jsonschema  # type: ignore[import-untyped]
from jsonschema import Draft202012Validator

from services.tool_exec.tools.base import Effect, InvalidArguments, Tool

__all__ = ["ENTRY_POINT_GROUP", "ToolLoadError", "ToolRegistry", "UnknownTool"]

ENTRY_POINT_GROUP = "agentbus.tools"


class UnknownTool(LookupError):
    """No tool of that name is registered."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        super().__init__(f"unknown tool {name!r}; registered tools: {', '.join(sorted(known)) or 'none'}")


class ToolLoadError(RuntimeError):
    """A tool plugin cannot be loaded or is malformed (bad schema, missing attribute, duplicate)."""


class ToolRegistry:
    """Tools by name, each with a compiled validator of its arguments."""

    def __init__(self, tools: Iterable[Tool | type[Tool]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, Any] = {}
        for tool in tools:
            self.register(tool)

    @classmethod
    def from_entry_points(cls, group: str = ENTRY_POINT_GROUP) -> ToolRegistry:
        """Every tool registered under ``group``; the entry point name must be the tool's name."""
        registry = cls()
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            try:
                loaded = ep.load()
            except Exception as exc:
                raise ToolLoadError(f"tool entry point {ep.name}={ep.value}: cannot load: {exc}") from exc
            tool = registry.register(loaded)
            if tool.name != ep.name:
                raise ToolLoadError(f"entry point {ep.name!r} names a tool called {tool.name!r}")
        return registry

    def register(self, tool: Tool | type[Tool]) -> Tool:
        """Add a tool (an instance, or a class instantiated without arguments); returns the instance."""
        instance = tool() if isinstance(tool, type) else tool
        if not isinstance(instance, Tool):
            raise ToolLoadError(f"{tool!r} is not a Tool")
        for attr in ("name", "description", "parameters", "effect"):
            if not hasattr(instance, attr):
                raise ToolLoadError(f"tool {type(instance).__name__} has no {attr}")
        name = instance.name
        if not isinstance(name, str) or not name:
            raise ToolLoadError(f"tool {type(instance).__name__}: name must be a non-empty string")
        if name in self._tools:
            raise ToolLoadError(f"two tools named {name!r}")
        if not isinstance(instance.effect, Effect):
            raise ToolLoadError(f"tool {name!r}: effect must be an Effect, not {instance.effect!r}")
        for limit in ("timeout_s", "max_concurrency"):
            value = getattr(instance, limit)
            if value is not None and not value > 0:
                raise ToolLoadError(f"tool {name!r}: {limit} must be positive or None")
        schema = instance.parameters
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise ToolLoadError(f"tool {name!r}: parameters must be a JSON schema of type object")
        try:
            Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            detail = exc.message
            raise ToolLoadError(f"tool {name!r}: parameters is not a valid JSON schema: {detail}") from exc
        self._tools[name] = instance
        self._validators[name] = Draft202012Validator(schema)
        return instance

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownTool(name, self._tools) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return sorted(self._tools)

    def validate_args(self, tool: Tool | str, args: object) -> dict[str, Any]:
        """``args`` if they match the tool's schema, else :class:`InvalidArguments` naming the path."""
        name = tool if isinstance(tool, str) else tool.name
        self.get(name)
        if not isinstance(args, dict):
            raise InvalidArguments(f"$: arguments must be a JSON object, not {type(args).__name__}")
        error = jsonschema.exceptions.best_match(self._validators[name].iter_errors(args))
        if error is not None:
            path = str(error.json_path)
            raise InvalidArguments(f"{name}: {path}: {error.message}", path)
        return args

    def specs(self) -> list[dict[str, Any]]:
        """``[{name, description, parameters}]`` of every tool, by name: what the prompt lists."""
        return [self._tools[name].spec() for name in sorted(self._tools)]
