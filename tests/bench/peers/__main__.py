"""Run one peer on one workload and print its :class:`PeerResult` as one line of JSON.

    python -m tests.bench.peers --peer langgraph|restate --sessions 20 --steps 5 \\
        --model-latency-ms 0 --tool-latency-ms 0 --concurrency 8

The bench driver runs each peer in its own process so that its memory is measured alone.
Triton is read from the usual ``AGENTBUS_TRITON_*`` variables (default 127.0.0.1:18001).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from shared.settings import TritonSettings
from tests.bench.peers.common import PeerResult, Workload, load_agent_spec

PEERS = ("langgraph", "restate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--peer", choices=PEERS, required=True)
    parser.add_argument("--sessions", type=int, default=20, help="sessions, one turn each (default 20)")
    parser.add_argument("--steps", type=int, default=5, help="model decision + tool call steps per turn")
    parser.add_argument("--model-latency-ms", type=float, default=0.0, help="added before each model call")
    parser.add_argument("--tool-latency-ms", type=float, default=0.0, help="what the sleep tool sleeps")
    parser.add_argument("--concurrency", type=int, default=8, help="turns in flight at most")
    parser.add_argument(
        "--langgraph-durability",
        choices=("sync", "async", "exit"),
        default="sync",
        help="LangGraph checkpoint durability (default sync: persisted before the next step)",
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="the peer's store does not flush its log on each commit (Postgres synchronous_commit=off, "
        "Restate log WAL fsync off); default: each store's shipped setting, which flushes",
    )
    return parser.parse_args(argv)


async def run_peer(args: argparse.Namespace) -> PeerResult:
    workload = Workload(
        sessions=args.sessions,
        steps=args.steps,
        model_latency_s=args.model_latency_ms / 1000,
        tool_latency_s=args.tool_latency_ms / 1000,
        concurrency=args.concurrency,
    )
    settings = TritonSettings.from_env()
    spec = load_agent_spec()
    if args.peer == "langgraph":
        from tests.bench.peers import langgraph_peer

        return await langgraph_peer.run(
            workload,
            triton_settings=settings,
            durability=args.langgraph_durability,
            fsync=not args.no_fsync,
            spec=spec,
        )
    from tests.bench.peers import restate_peer

    return await restate_peer.run(workload, triton_settings=settings, fsync=not args.no_fsync, spec=spec)


def main(argv: list[str] | None = None) -> None:
    result = asyncio.run(run_peer(parse_args(argv)))
    sys.stdout.write(result.to_json() + "\n")


if __name__ == "__main__":
    main()
