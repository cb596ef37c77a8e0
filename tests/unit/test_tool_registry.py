"""Tool plugins from entry points, argument validation, specs and idempotency keys."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import pytest

from services.tool_exec.idempotency import canonical_json, idempotency_key
from services.tool_exec.registry import ToolLoadError, ToolRegistry, UnknownTool
from services.tool_exec.tools.base import Effect, InvalidArguments, Tool, ToolContext, ToolOutput

BUILTINS = {"calculator", "kv.put", "kv.get", "sleep", "notify", "http.get"}


@pytest.fixture(scope="module")
def tools() -> ToolRegistry:
    return ToolRegistry.from_entry_points()


def test_entry_points_load_every_builtin(tools: ToolRegistry) -> None:
    assert set(tools.names()) == BUILTINS
    effects = {name: tools.get(name).effect for name in BUILTINS}
    assert effects == {
        "calculator": Effect.READ_ONLY,
        "kv.put": Effect.IDEMPOTENT_WRITE,
        "kv.get": Effect.READ_ONLY,
        "sleep": Effect.READ_ONLY,
        "notify": Effect.IRREVERSIBLE,
        "http.get": Effect.READ_ONLY,
    }


def test_specs_are_what_the_prompt_lists(tools: ToolRegistry) -> None:
    specs = tools.specs()
    assert [s["name"] for s in specs] == sorted(BUILTINS)
    for spec in specs:
        assert set(spec) == {"name", "description", "parameters"}
        assert spec["description"] and spec["parameters"]["type"] == "object"


def test_unknown_tool_names_the_known_ones(tools: ToolRegistry) -> None:
    with pytest.raises(UnknownTool, match=r"unknown tool 'rm -rf'.*calculator"):
        tools.get("rm -rf")


@pytest.mark.parametrize(
    ("tool", "args", "path", "words"),
    [
        ("sleep", {"seconds": "soon"}, "$.seconds", "not of type 'number'"),
        ("sleep", {"seconds": 61}, "$.seconds", "maximum"),
        ("sleep", {"seconds": -1}, "$.seconds", "minimum"),
        ("sleep", {"seconds": True}, "$.seconds", "not of type"),
        ("sleep", {}, "$", "'seconds' is a required property"),
        ("notify", {"channel": "ops"}, "$", "'message' is a required property"),
        ("notify", {"channel": "", "message": "hi"}, "$.channel", "should be non-empty"),
        ("calculator", {"expression": "1", "extra": 1}, "$", "'extra' was unexpected"),
        ("kv.put", {"key": 7, "value": 1}, "$.key", "not of type 'string'"),
    ],
)
def test_invalid_arguments_name_the_field(
    tools: ToolRegistry, tool: str, args: dict[str, Any], path: str, words: str
) -> None:
    with pytest.raises(InvalidArguments) as info:
        tools.validate_args(tool, args)
    assert info.value.path == path
    assert path in info.value.reason and words in info.value.reason


def test_arguments_must_be_an_object(tools: ToolRegistry) -> None:
    with pytest.raises(InvalidArguments, match="must be a JSON object"):
        tools.validate_args("calculator", ["1+1"])


def test_valid_arguments_pass(tools: ToolRegistry) -> None:
    assert tools.validate_args("kv.put", {"key": "k", "value": {"any": [1, None]}}) == {
        "key": "k",
        "value": {"any": [1, None]},
    }
    tools.validate_args("sleep", {"seconds": 0.25})


class _Echo(Tool):
    name = "echo"
    description = "echo"
    parameters: ClassVar[dict[str, Any]] = {"type": "object"}
    effect = Effect.READ_ONLY

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        return ToolOutput(args)


def test_malformed_plugins_are_refused_at_load() -> None:
    class BadSchema(_Echo):
        name = "bad"
        parameters: ClassVar[dict[str, Any]] = {"type": "object", "properties": {"x": {"type": "nope"}}}

    class NotObject(_Echo):
        name = "notobj"
        parameters: ClassVar[dict[str, Any]] = {"type": "string"}

    class BadLimit(_Echo):
        name = "badlimit"
        max_concurrency = 0

    registry = ToolRegistry([_Echo])
    with pytest.raises(ToolLoadError, match="not a valid JSON schema"):
        registry.register(BadSchema)
    with pytest.raises(ToolLoadError, match="type object"):
        registry.register(NotObject)
    with pytest.raises(ToolLoadError, match="max_concurrency"):
        registry.register(BadLimit)
    with pytest.raises(ToolLoadError, match="two tools named 'echo'"):
        registry.register(_Echo())
    with pytest.raises(ToolLoadError, match="not a Tool"):
        registry.register(object())  # type: ignore[arg-type]
    assert registry.names() == ["echo"]


def test_idempotency_key_is_pinned() -> None:
    args = {"expression": "1+2", "b": [1, "é"]}
    key = idempotency_key("tenant-1", "session-1", 3, "calculator", args)
    assert key == "c1ce3ee6f3797c4317922ac8953375324fab6012a5a43044e27a0fa40bc06524"
    canonical = '["tenant-1","session-1",3,"calculator",{"b":[1,"é"],"expression":"1+2"}]'
    assert key == hashlib.sha256(canonical.encode()).hexdigest()


def test_idempotency_key_ignores_argument_order_but_not_content() -> None:
    a = {"channel": "ops", "message": "hi", "meta": {"x": 1, "y": [2, 3]}}
    b = {"meta": {"y": [2, 3], "x": 1}, "message": "hi", "channel": "ops"}
    assert canonical_json(a) == canonical_json(b)
    key = idempotency_key("t", "s", 1, "notify", a)
    assert key == idempotency_key("t", "s", 1, "notify", b)
    assert key != idempotency_key("t", "s", 2, "notify", a)  # another step
    assert key != idempotency_key("t2", "s", 1, "notify", a)  # another tenant's session
    assert key != idempotency_key("t", "s", 1, "notify", {**a, "meta": {"x": 1, "y": [3, 2]}})
    assert len(key) == 64 and key == key.lower()
