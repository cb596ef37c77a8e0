"""LangGraph with its Postgres checkpointer, running the bench's agent loop.

How LangGraph is deployed: your process runs the graph; its checkpointer persists the
graph state after every step. Here: a ``StateGraph`` ``agent`` → (tool call?) → ``tools``
→ ``agent`` ... → END, compiled with ``AsyncPostgresSaver`` on a ``psycopg_pool``
connection pool (as LangGraph documents for concurrent use) against a throwaway cluster
of Debian's PostgreSQL; one ``thread_id`` per session; S sessions run concurrently in one
asyncio process, at most ``concurrency`` at a time. The graph runs with
``durability="sync"``: a step's checkpoint is written before the next step starts, the
guarantee agentbus (a Kafka transaction per step) and Restate (an acknowledged journal
entry per ``ctx.run``) give. The state is plain dicts, so the checkpointer stores the
same conversation the prompt is built from, and the tool's result is in the checkpoint
of the ``tools`` step.
"""

from __future__ import annotations

import asyncio
import operator
import os
import time
import uuid
from typing import Annotated, Any, Literal, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import RetryPolicy
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from shared.decision import parse_decision
from shared.settings import TritonSettings
from shared.triton import ModelCallError, TritonModel, make_triton_client
from tests.bench.peers.common import (
    AgentSpec,
    MemorySampler,
    PeerError,
    PeerResult,
    TurnTiming,
    Workload,
    load_agent_spec,
    render_prompt,
    run_tool,
    summarize,
    tool_message,
    with_model_latency,
)
from tests.bench.peers.postgres import postgres_cluster

__all__ = ["run"]

Durability = Literal["sync", "async", "exit"]
MAX_MODEL_CALLS = 64  # a turn that loops longer than this is a bug, not a benchmark


class AgentState(TypedDict, total=False):
    messages: Annotated[list[dict[str, Any]], operator.add]
    pending: list[dict[str, Any]]  # the tool calls of the last decision, until the tools node runs them
    answer: str | None


class Meter:
    """Time spent inside the model callable and the tools, for one session's turn."""

    def __init__(self) -> None:
        self.model_s = 0.0
        self.tool_s = 0.0
        self.model_calls = 0
        self.tool_calls = 0


def _transient(exc: Exception) -> bool:
    return isinstance(exc, ModelCallError) and exc.transient


def build_graph(
    spec: AgentSpec, model: Any, meters: dict[str, Meter]
) -> StateGraph[AgentState, Any, AgentState, AgentState]:
    """The agent loop as a graph: ``agent`` decides, ``tools`` runs the calls, back to ``agent``."""

    def meter_of(config: RunnableConfig) -> Meter:
        return meters[config["configurable"]["thread_id"]]

    async def agent(state: AgentState, config: RunnableConfig) -> dict[str, Any]:
        meter = meter_of(config)
        if meter.model_calls >= MAX_MODEL_CALLS:
            raise PeerError(f"turn did not end within {MAX_MODEL_CALLS} model calls")
        prompt = render_prompt(spec, state["messages"])
        t0 = time.perf_counter()
        try:
            completion = await model(prompt)
        finally:
            meter.model_s += time.perf_counter() - t0
        meter.model_calls += 1
        decision = parse_decision(completion, spec.tool_names)
        assistant = {"role": "assistant", "content": completion}
        if decision.kind == "ANSWER":
            return {"messages": [assistant], "pending": [], "answer": decision.text}
        step = meter.model_calls
        calls = [
            {"call_id": f"s{step}c{i}", "name": call.name, "arguments": call.arguments}
            for i, call in enumerate(decision.tool_calls)
        ]
        return {"messages": [assistant], "pending": calls}

    async def tools(state: AgentState, config: RunnableConfig) -> dict[str, Any]:
        meter = meter_of(config)
        replies = []
        for call in state.get("pending", []):
            t0 = time.perf_counter()
            result = await run_tool(call["name"], call["arguments"])
            meter.tool_s += time.perf_counter() - t0
            meter.tool_calls += 1
            replies.append(tool_message(call["call_id"], call["name"], result))
        return {"messages": replies, "pending": []}

    def route(state: AgentState) -> str:
        return "tools" if state.get("pending") else END

    graph = StateGraph(AgentState)
    # Transient model errors are retried, as agentbus's reasoning and Restate's ctx.run do.
    graph.add_node("agent", agent, retry_policy=RetryPolicy(max_attempts=3, retry_on=_transient))
    graph.add_node("tools", tools)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route, ["tools", END])
    graph.add_edge("tools", "agent")
    return graph


async def run(
    workload: Workload,
    *,
    triton_settings: TritonSettings,
    durability: Durability = "sync",
    fsync: bool = True,
    spec: AgentSpec | None = None,
) -> PeerResult:
    """Run ``workload`` on LangGraph + Postgres; one warm-up turn first (not measured).

    ``fsync=False`` runs PostgreSQL with ``synchronous_commit=off`` (a commit returns before
    its WAL is flushed; the WAL writer flushes within ~0.6 s), for comparison with stores
    that do not flush on every write.
    """
    spec = spec or load_agent_spec()
    pg_settings = {} if fsync else {"synchronous_commit": "off"}
    pool_size = workload.concurrency
    with postgres_cluster(max_connections=max(100, pool_size + 10), settings=pg_settings) as pg:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            pg.dsn,
            min_size=pool_size,
            max_size=pool_size,
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
            open=False,
        )
        await pool.open(wait=True, timeout=60)
        triton = make_triton_client(triton_settings)
        try:
            checkpointer = AsyncPostgresSaver(pool)
            await checkpointer.setup()
            model = with_model_latency(
                TritonModel(triton, triton_settings).generate, workload.model_latency_s
            )
            meters: dict[str, Meter] = {}
            app = build_graph(spec, model, meters).compile(checkpointer=checkpointer)
            text = workload.user_text()
            run_id = uuid.uuid4().hex[:8]

            async def turn(session_id: str) -> TurnTiming:
                meter = meters[session_id] = Meter()
                config: RunnableConfig = {"configurable": {"thread_id": session_id}}
                t0 = time.perf_counter()
                final = await app.ainvoke(
                    {"messages": [{"role": "user", "content": text}]}, config, durability=durability
                )
                turn_s = time.perf_counter() - t0
                return TurnTiming(
                    turn_s,
                    meter.model_s,
                    meter.tool_s,
                    meter.tool_calls,
                    meter.model_calls,
                    final["answer"] or "",
                )

            await turn(f"warmup-{run_id}")
            slots = asyncio.Semaphore(workload.concurrency)

            async def bounded(session_id: str) -> TurnTiming:
                async with slots:
                    return await turn(session_id)

            sampler = MemorySampler({"python": lambda: [os.getpid()], "postgres": pg.pids})
            with sampler:
                t0 = time.perf_counter()
                turns = await asyncio.gather(*(bounded(f"s{i}-{run_id}") for i in range(workload.sessions)))
                wall_s = time.perf_counter() - t0
        finally:
            await triton.close()
            await pool.close()
    notes = (
        f"LangGraph StateGraph, AsyncPostgresSaver on a psycopg pool of {pool_size}, "
        f"durability={durability}; {pg.version}, initdb defaults "
        f"({'synchronous_commit on' if fsync else 'synchronous_commit off'}); one process, no broker"
    )
    return summarize("langgraph", workload, wall_s, turns, sampler, notes)
