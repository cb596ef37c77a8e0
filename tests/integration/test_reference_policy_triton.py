"""The reference policy through the real Triton: the prompt format in, a parseable decision out."""

from __future__ import annotations

import json

from shared.decision import ToolCallRequest, format_tool_calls, parse_decision
from shared.prompt import Message, ToolSpec, build_prompt
from shared.settings import TritonSettings
from shared.triton import TritonModel, make_triton_client

CALCULATOR = ToolSpec(
    name="calculator",
    description="Evaluate an arithmetic expression",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
)


async def test_tool_call_then_answer_over_grpc(triton_settings: TritonSettings) -> None:
    client = make_triton_client(triton_settings)
    try:
        model = TritonModel(client, triton_settings)
        messages = [Message("user", "what is 2+3*4")]

        first = parse_decision(
            await model.generate(build_prompt("sys", [CALCULATOR], messages)), {"calculator"}
        )
        assert first.kind == "TOOL_CALLS"
        assert first.tool_calls == (ToolCallRequest("calculator", {"expression": "2+3*4"}),)

        messages += [
            Message("assistant", format_tool_calls(first.tool_calls)),
            Message("tool", json.dumps({"status": "OK", "output": "14", "error": None}),
                    name="calculator", call_id="c-1"),
        ]  # fmt: skip
        prompt = build_prompt("sys", [CALCULATOR], messages)
        streamed = "".join([piece async for piece in model.stream(prompt)])
        second = parse_decision(streamed, {"calculator"})
        assert second.kind == "ANSWER"
        assert second.text == "2+3*4 = 14."
        assert await model.generate(prompt) == streamed, "deterministic, streamed or not"
    finally:
        await client.close()


async def test_latency_ms_delays_answers_without_queueing_them(triton_settings: TritonSettings) -> None:
    """The model that waits: 20 calls of 300 ms each overlap (a GPU batches; so does this)."""
    import asyncio
    import dataclasses
    import time

    import pytest

    from shared.triton import ModelCallError

    slow = dataclasses.replace(triton_settings, triton_sampling='{"latency_ms": 300}')
    client = make_triton_client(slow)
    try:
        model = TritonModel(client, slow)
        prompt = build_prompt("sys", [CALCULATOR], [Message("user", "what is 2+3*4")])
        started = time.perf_counter()
        answers = await asyncio.gather(*(model.generate(prompt) for _ in range(20)))
        elapsed = time.perf_counter() - started
        assert len(set(answers)) == 1 and "calculator" in answers[0]
        assert 0.3 <= elapsed < 1.5, elapsed  # all 20 waited 300 ms, together
        with pytest.raises(ModelCallError, match="latency_ms"):
            await model.generate(prompt, sampling={"latency_ms": -5})
    finally:
        await client.close()
