"""Restate, running the bench's agent loop as a Virtual Object keyed by session.

How Restate is deployed: the Restate server (from npm ``@restatedev/restate-server``)
owns the durable log and state; the service is an HTTP endpoint the server invokes,
here the Python ``restate-sdk`` app served by Hypercorn (HTTP/2, so each invocation is
one bidirectional stream) in its own process. The handler ``AgentSession/<session>/turn``
runs the whole agent loop: each model call and each tool call is a ``ctx.run`` (a
journaled side effect: the server acknowledges the journal entry before the handler
continues, and a retried invocation replays it instead of calling again), and the
conversation is the object's state (``ctx.get``/``ctx.set`` of ``messages``). Virtual
Objects run one exclusive handler per key at a time, which is Restate's per-session
sequencing. The bench registers the deployment through the admin API (``POST
/deployments``) and sends the S turns to the ingress HTTP API (``POST
/AgentSession/<key>/turn``, a request that waits for the handler's result), at most
``concurrency`` at a time.

``python -m tests.bench.peers.restate_peer serve --port P`` is the service process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import restate
from restate import ObjectContext, RunOptions, TerminalError

from shared.decision import MalformedDecisionError, parse_decision
from shared.settings import TritonSettings
from shared.triton import ModelCallError, TritonModel, make_triton_client
from tests.bench.peers.common import (
    BENCH_DIR,
    REPO_ROOT,
    AgentSpec,
    MemorySampler,
    PeerError,
    PeerResult,
    TurnTiming,
    Workload,
    free_port,
    load_agent_spec,
    port_open,
    render_prompt,
    run_tool,
    summarize,
    tool_message,
    wait_until,
    with_model_latency,
)

__all__ = ["RESTATE_SERVER_VERSION", "restate_server_binary", "run"]

RESTATE_SERVER_VERSION = "1.7.12"  # keep in step with setup.sh
SERVICE = "AgentSession"
MAX_MODEL_CALLS = 64
SPEC_ENV = "AGENTBUS_BENCH_SPEC"
MODEL_LATENCY_ENV = "AGENTBUS_BENCH_MODEL_LATENCY_S"


def restate_server_binary() -> Path:
    """The ``restate-server`` binary npm installed under ``.local/bench`` (by setup.sh).

    The npm package pulls the binary in as a per-platform optional dependency
    (``@restatedev/restate-server-linux-x64``, ``-linux-arm64`` ...).
    """
    found = sorted((BENCH_DIR / "node_modules" / "@restatedev").glob("restate-server-*/bin/restate-server"))
    if found:
        return found[0]
    on_path = shutil.which("restate-server")
    if on_path is None:
        raise PeerError(f"no restate-server under {BENCH_DIR}: run tests/bench/peers/setup.sh")
    return Path(on_path)


# --------------------------------------------------------------------------- the service


agent_session = restate.VirtualObject(SERVICE)


class _Service:
    """What the handler needs, set up by :func:`serve` in the service process."""

    spec: AgentSpec
    model: Any  # async (prompt) -> completion


async def _model_call(prompt: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        text = await _Service.model(prompt)
    except ModelCallError as exc:
        if not exc.transient:
            raise TerminalError(str(exc)) from exc
        raise
    return {"text": text, "elapsed_s": time.perf_counter() - t0}


async def _tool_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = await run_tool(name, arguments)
    return {"result": result, "elapsed_s": time.perf_counter() - t0}


@agent_session.handler()
async def turn(ctx: ObjectContext, request: dict[str, Any]) -> dict[str, Any]:
    """One user turn: the agent loop, every model and tool call journaled by ``ctx.run``.

    Returns the answer and the time spent inside the model and the tools (measured in the
    ``ctx.run`` actions and journaled with their results, so a replay keeps them).
    """
    spec = _Service.spec
    history: list[dict[str, Any]] = await ctx.get("messages", type_hint=list) or []
    messages = [*history, {"role": "user", "content": request["text"]}]
    model_s = tool_s = 0.0
    model_calls = tool_calls = 0
    retry = RunOptions[dict[str, Any]](type_hint=dict, max_attempts=3)
    while model_calls < MAX_MODEL_CALLS:
        prompt = render_prompt(spec, messages)
        completion = await ctx.run_typed("model", _model_call, retry, prompt)
        model_s += completion["elapsed_s"]
        model_calls += 1
        try:
            decision = parse_decision(completion["text"], spec.tool_names)
        except MalformedDecisionError as exc:
            raise TerminalError(f"malformed model output: {exc}") from exc
        messages.append({"role": "assistant", "content": completion["text"]})
        if decision.kind == "ANSWER":
            ctx.set("messages", messages)
            return {
                "answer": decision.text,
                "model_s": model_s,
                "tool_s": tool_s,
                "model_calls": model_calls,
                "tool_calls": tool_calls,
            }
        for index, call in enumerate(decision.tool_calls):
            outcome = await ctx.run_typed(f"tool {call.name}", _tool_call, retry, call.name, call.arguments)
            tool_s += outcome["elapsed_s"]
            tool_calls += 1
            messages.append(tool_message(f"s{model_calls}c{index}", call.name, outcome["result"]))
    raise TerminalError(f"turn did not end within {MAX_MODEL_CALLS} model calls")


app = restate.app(services=[agent_session])


async def serve(port: int) -> None:
    """Serve the Virtual Object on 127.0.0.1:``port`` with Hypercorn until SIGTERM/SIGINT."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config
    from restate.server import install_shutdown_hook

    settings = TritonSettings.from_env()
    triton = make_triton_client(settings)
    _Service.spec = AgentSpec.from_json(os.environ[SPEC_ENV])
    _Service.model = with_model_latency(
        TritonModel(triton, settings).generate, float(os.environ.get(MODEL_LATENCY_ENV, "0"))
    )
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    # Restate's documented production settings for Hypercorn: long-lived HTTP/2 connections.
    config.h2_max_concurrent_streams = 2147483647
    config.keep_alive_max_requests = 2147483647
    config.keep_alive_timeout = 2147483647
    config.accesslog = None
    config.loglevel = "WARNING"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The SDK's ASGI app owns the loop's SIGTERM handler (it drains its invocations on it);
    # a handler added with loop.add_signal_handler would be replaced, so join its hooks.
    install_shutdown_hook(loop, stop.set, signal.SIGTERM)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)
    finally:
        await triton.close()


# --------------------------------------------------------------------------- the server and the run


@dataclass(frozen=True)
class RestateStack:
    server: subprocess.Popen[bytes]
    service: subprocess.Popen[bytes]
    ingress_url: str
    admin_url: str
    version: str


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def restate_stack(
    spec: AgentSpec,
    model_latency_s: float,
    triton_settings: TritonSettings,
    *,
    fsync: bool = True,
    start_timeout_s: float = 60,
) -> Iterator[RestateStack]:
    """A fresh restate-server in a temp dir on free ports, plus the service process; both stopped after."""
    binary = restate_server_binary()
    base = Path(tempfile.mkdtemp(prefix="agentbus-bench-restate-"))
    ingress, admin, fabric, service_port = free_port(), free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "RESTATE_INGRESS__BIND_ADDRESS": f"127.0.0.1:{ingress}",
        "RESTATE_ADMIN__BIND_ADDRESS": f"127.0.0.1:{admin}",
        "RESTATE_BIND_ADDRESS": f"127.0.0.1:{fabric}",
        "RESTATE_ADVERTISED_ADDRESS": f"http://127.0.0.1:{fabric}/",
        "RESTATE_LISTEN_MODE": "tcp",
        "RESTATE_DISABLE_TELEMETRY": "true",
        "RESTATE_LOG_DISABLE_ANSI_CODES": "true",
    }
    if not fsync:
        # The log's RocksDB WAL is written but not fsynced on each append (the OS flushes it).
        env["RESTATE_LOG_SERVER__ROCKSDB_DISABLE_WAL_FSYNC"] = "true"
        env["RESTATE_BIFROST__LOCAL__ROCKSDB_DISABLE_WAL_FSYNC"] = "true"
    service_env = {
        **os.environ,
        **{name: str(getattr(triton_settings, field)) for field, name in TritonSettings.env_names().items()},
        SPEC_ENV: spec.to_json(),
        MODEL_LATENCY_ENV: repr(model_latency_s),
    }
    server: subprocess.Popen[bytes] | None = None
    service: subprocess.Popen[bytes] | None = None
    try:
        with open(base / "restate-server.log", "wb") as log:
            server = subprocess.Popen(
                [str(binary), "--base-dir", str(base), "--node-name", "bench", "--no-logo"],
                cwd=base,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        with open(base / "service.log", "wb") as log:
            service = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.bench.peers.restate_peer",
                    "serve",
                    "--port",
                    str(service_port),
                ],
                cwd=REPO_ROOT,
                env=service_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        version = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        admin_url, ingress_url = f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{ingress}"
        running = (server, service)
        wait_until(
            lambda: all(p.poll() is None for p in running) and _http_ok(f"{admin_url}/health"),
            start_timeout_s,
            f"restate-server admin API (log: {base / 'restate-server.log'})",
        )
        wait_until(
            lambda: all(p.poll() is None for p in running) and _http_ok(f"{ingress_url}/restate/health"),
            start_timeout_s,
            f"restate-server ingress (log: {base / 'restate-server.log'})",
        )
        wait_until(
            lambda: all(p.poll() is None for p in running) and port_open(service_port),
            start_timeout_s,
            f"the Restate service endpoint (log: {base / 'service.log'})",
        )
        _register(admin_url, f"http://127.0.0.1:{service_port}")
        yield RestateStack(server, service, ingress_url, admin_url, version)
    finally:
        for process in (server, service):
            if process is not None:
                _stop(process)
        shutil.rmtree(base, ignore_errors=True)


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(200 <= response.status < 300)
    except OSError:
        return False


def _register(admin_url: str, uri: str) -> None:
    """Register the service deployment with the server (``POST /deployments``)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{admin_url}/deployments",
        data=json.dumps({"uri": uri}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise PeerError(
            f"registering {uri} failed: {exc.code} {exc.read().decode(errors='replace')}"
        ) from exc
    names = [s.get("name") for s in body.get("services", [])]
    if SERVICE not in names:
        raise PeerError(f"registered {uri} but the server lists {names}, not {SERVICE}")


async def _invoke(session: aiohttp.ClientSession, ingress_url: str, key: str, text: str) -> dict[str, Any]:
    url = f"{ingress_url}/{SERVICE}/{key}/turn"
    async with session.post(url, json={"text": text}) as response:
        body = await response.text()
        if response.status != 200:
            raise PeerError(f"{url}: {response.status} {body[:500]}")
        result: dict[str, Any] = json.loads(body)
        return result


async def run(
    workload: Workload, *, triton_settings: TritonSettings, fsync: bool = True, spec: AgentSpec | None = None
) -> PeerResult:
    """Run ``workload`` on Restate; one warm-up turn first (not measured).

    ``fsync=False`` turns off the fsync of the log's RocksDB WAL on each append (Restate's
    default fsyncs), for comparison with stores that do not flush on every write.
    """
    spec = spec or load_agent_spec()
    text = workload.user_text()
    run_id = uuid.uuid4().hex[:8]
    per_turn_s = 30 + 2 * workload.steps * (workload.model_latency_s + workload.tool_latency_s + 1)
    timeout = aiohttp.ClientTimeout(total=per_turn_s * (1 + workload.sessions / workload.concurrency))
    with restate_stack(spec, workload.model_latency_s, triton_settings, fsync=fsync) as stack:
        connector = aiohttp.TCPConnector(limit=workload.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

            async def one_turn(key: str) -> TurnTiming:
                t0 = time.perf_counter()
                reply = await _invoke(http, stack.ingress_url, key, text)
                turn_s = time.perf_counter() - t0
                return TurnTiming(
                    turn_s,
                    reply["model_s"],
                    reply["tool_s"],
                    reply["tool_calls"],
                    reply["model_calls"],
                    reply["answer"],
                )

            # The ingress may learn the new deployment a moment after the admin API: retry the warm-up.
            deadline = time.monotonic() + 30
            while True:
                try:
                    await one_turn(f"warmup-{run_id}")
                    break
                except PeerError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

            slots = asyncio.Semaphore(workload.concurrency)

            async def bounded(key: str) -> TurnTiming:
                async with slots:
                    return await one_turn(key)

            sampler = MemorySampler(
                {
                    "restate-server": lambda: [stack.server.pid],
                    "service": lambda: [stack.service.pid],
                }
            )
            with sampler:
                t0 = time.perf_counter()
                turns = await asyncio.gather(*(bounded(f"s{i}-{run_id}") for i in range(workload.sessions)))
                wall_s = time.perf_counter() - t0
    notes = (
        f"{stack.version} (defaults: 24 partitions; log WAL fsync {'on' if fsync else 'off'}), restate-sdk "
        f"{_sdk_version()} Virtual Object under Hypercorn (1 worker, HTTP/2); every model and tool "
        f"call a ctx.run; turns sent to the ingress HTTP API; rss = restate-server + service process"
    )
    return summarize("restate", workload, wall_s, turns, sampler, notes)


def _sdk_version() -> str:
    from importlib.metadata import version

    return version("restate-sdk")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.peers.restate_peer")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve", help="serve the AgentSession Virtual Object (the service process)"
    )
    serve_parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
