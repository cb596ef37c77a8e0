"""The scripted agentbus demo: a multi-turn conversation through the running services.

    python scripts/demo.py [--tenant demo] [--session ID] [--timeout 90]

Needs the servers (``make up``) and the services (``python -m infra.local.services up``);
``make demo`` does all of it and stops the services afterwards. Each turn is sent with
agentctl's client (signed with the tenant's secret), its answer printed with its
latency; then the session's event log (``agentctl history``) and per-turn figures
(model time, tool time, orchestration overhead) from the log. Exits 1 if a turn did
not end FINAL or its answer lacks what the reference policy should say.

The tenant's secret is ``AGENTBUS_TENANT_SECRET``, else the tenant's entry in
``AGENTBUS_TENANT_SECRETS`` (inline JSON) or ``AGENTBUS_TENANT_SECRETS_FILE`` — the
settings ingress verifies signatures with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python scripts/demo.py` from a checkout without the package installed
    sys.path.insert(0, str(ROOT))

from agentctl.commands import AgentClient, SendResult, history_lines, read_history  # noqa: E402
from shared.cassandra import Statements, connect  # noqa: E402
from shared.settings import CassandraSettings, KafkaSettings  # noqa: E402

# (message, what the answer must contain): phrased so the reference policy picks the tools.
CONVERSATION: tuple[tuple[str, str], ...] = (
    ("what is 2+3*4", "14"),
    ("remember that my colour is blue", "blue"),
    ("what is my colour", "blue"),
    ("wait 1 seconds and then notify ops that the demo ran", "ops"),
    ("what is (7+5)/4 and then remember that answer is 3", "3"),
)


def tenant_secret(tenant: str, environ: dict[str, str] | None = None) -> str:
    """The tenant's signing secret from the environment (see the module doc); "" if none."""
    env = dict(os.environ if environ is None else environ)
    if env.get("AGENTBUS_TENANT_SECRET"):
        return env["AGENTBUS_TENANT_SECRET"]
    sources = []
    if env.get("AGENTBUS_TENANT_SECRETS"):
        sources.append(env["AGENTBUS_TENANT_SECRETS"])
    if env.get("AGENTBUS_TENANT_SECRETS_FILE"):
        with contextlib.suppress(OSError):
            sources.append(Path(env["AGENTBUS_TENANT_SECRETS_FILE"]).read_text())
    for text in sources:
        try:
            entry = json.loads(text).get(tenant)
        except (ValueError, AttributeError):
            continue
        if isinstance(entry, dict):
            entry = entry.get("secret")
        if isinstance(entry, str) and entry:
            return entry
    return ""


@dataclass
class Exchange:
    text: str
    expect: str
    result: SendResult

    @property
    def ok(self) -> bool:
        return self.result.kind == "FINAL" and self.expect in self.result.text


async def converse(
    kafka: KafkaSettings, tenant: str, secret: str, session: str, timeout_s: float
) -> list[Exchange]:
    exchanges = []
    async with AgentClient(kafka, tenant=tenant, secret=secret, client_id="agentbus-demo") as client:
        for n, (text, expect) in enumerate(CONVERSATION, 1):
            print(f"\n[{n}] user  > {text}", flush=True)
            streamed = False

            def on_delta(delta: str) -> None:
                nonlocal streamed
                if not streamed:
                    print("    agent ~ ", end="", flush=True)
                    streamed = True
                print(delta, end="", flush=True)

            result = await client.send(session, text, timeout_s=timeout_s, on_delta=on_delta)
            if streamed:
                print()
            exchange = Exchange(text, expect, result)
            exchanges.append(exchange)
            if result.kind == "TIMEOUT":
                print(f"    agent ! no response within {timeout_s:.0f}s (message {result.message_id})")
                print("    stopping: the next messages would queue behind this turn")
                break
            else:
                reason = f" ({result.reason})" if result.reason else ""
                print(f"    agent < {result.text}")
                print(
                    f"            {result.kind}{reason}, {result.steps} steps, "
                    f"{result.latency_s * 1000:.0f} ms send→response"
                    + (
                        ""
                        if exchange.ok or result.kind != "FINAL"
                        else f"  (expected {expect!r} in the answer)"
                    )
                )
    return exchanges


async def stored_history(
    cassandra: CassandraSettings, tenant: str, session: str, responses: int, wait_s: float = 20.0
) -> list[dict[str, Any]]:
    """The session's log once checkpoint has projected ``responses`` RESPONSE_SENT events (or wait_s)."""
    cluster, db = await asyncio.to_thread(connect, cassandra)
    try:
        statements = Statements(db, cassandra.cassandra_keyspace)
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            events = await read_history(statements, tenant, session)
            done = sum(e["event_type"] == "RESPONSE_SENT" for e in events)
            if done >= responses or asyncio.get_running_loop().time() > deadline:
                return events
            await asyncio.sleep(0.5)
    finally:
        await asyncio.to_thread(cluster.shutdown)


def _ms(a: dt.datetime, b: dt.datetime) -> float:
    return (b - a).total_seconds() * 1000


def turn_figures(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per turn, from the log: steps, tool calls, server time, model time, tool time, overhead (ms)."""
    turns: dict[str, dict[str, Any]] = {}
    called: dict[str, dt.datetime] = {}
    for e in events:
        t = turns.setdefault(
            e["turn_id"],
            {"turn": e["turn_id"], "steps": 0, "calls": 0, "model_ms": 0.0, "tool_ms": 0.0, "start": None},
        )
        kind, p, at = e["event_type"], e["payload"], e["occurred_at"]
        if kind == "USER_MESSAGE_ACCEPTED":
            t["start"] = at
        elif kind == "MODEL_DECIDED":
            t["steps"] += 1
            t["model_ms"] += float(p["latency_ms"])
        elif kind == "TOOL_CALLED":
            t["calls"] += 1
            called[p["call_id"]] = at
        elif kind == "TOOL_RESULT_RECEIVED" and p["call_id"] in called:
            t["tool_ms"] += _ms(called[p["call_id"]], at)
        elif kind == "RESPONSE_SENT" and t["start"] is not None:
            t["server_ms"] = _ms(t["start"], at)
    rows = []
    for t in turns.values():
        if "server_ms" in t:
            t["overhead_ms"] = t["server_ms"] - t["model_ms"] - t["tool_ms"]
            rows.append(t)
    return rows


def print_figures(exchanges: Sequence[Exchange], events: Sequence[dict[str, Any]]) -> None:
    by_turn = {e.result.turn_id: e for e in exchanges}
    rows = turn_figures(events)
    if not rows:
        return
    print(
        f"\n{'turn':>4} {'steps':>5} {'tools':>5} {'client ms':>9} {'server ms':>9} {'model ms':>8} "
        f"{'tool ms':>8} {'orchestr. ms':>12}"
    )
    for n, row in enumerate(rows, 1):
        exchange = by_turn.get(row["turn"])
        client = f"{exchange.result.latency_s * 1000:9.0f}" if exchange else f"{'-':>9}"
        print(
            f"{n:>4} {row['steps']:>5} {row['calls']:>5} {client} {row['server_ms']:9.0f} "
            f"{row['model_ms']:8.0f} {row['tool_ms']:8.0f} {row['overhead_ms']:12.0f}"
        )
    print(
        "client: send acknowledged → response read; server: accepted → response event; "
        "orchestration: server - model - tool (Kafka hops, context, Cassandra)"
    )


async def run(args: argparse.Namespace) -> int:
    secret = tenant_secret(args.tenant)
    if not secret:
        print(
            f"no secret for tenant {args.tenant!r}: "
            "set AGENTBUS_TENANT_SECRET or AGENTBUS_TENANT_SECRETS(_FILE)",
            file=sys.stderr,
        )
        return 2
    kafka = KafkaSettings.from_env()
    cassandra = CassandraSettings.from_env()
    session = args.session or f"demo-{uuid.uuid4().hex[:8]}"
    print(f"agentbus demo: tenant {args.tenant}, session {session}, topics {kafka.topic('*')}")
    exchanges = await converse(kafka, args.tenant, secret, session, args.timeout)
    answered = sum(e.result.kind != "TIMEOUT" for e in exchanges)

    print(f"\n$ agentctl history --tenant {args.tenant} {session}")
    events = await stored_history(cassandra, args.tenant, session, answered)
    if events:
        print("\n".join(history_lines(args.tenant, session, events)))
        print_figures(exchanges, events)
    else:
        print("(no events in Cassandra yet: is the checkpoint service running?)")

    failed = [e for e in exchanges if not e.ok]
    if failed:
        print(
            f"\ndemo FAILED: {len(failed)} of {len(exchanges)} turns sent did not end as expected "
            f"({len(CONVERSATION) - len(exchanges)} not sent):",
            file=sys.stderr,
        )
        for e in failed:
            print(f"  {e.text!r}: {e.result.kind} {e.result.text!r}", file=sys.stderr)
        return 1
    total = sum(e.result.latency_s for e in exchanges)
    print_step_overhead(total)
    print(f"\ndemo OK: {len(exchanges)} turns answered FINAL in {total:.1f}s")
    return 0


def _histogram(text: str, name: str) -> dict[float, float]:
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = buckets.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def print_step_overhead(wall_s: float) -> None:
    """Per-record orchestration overhead (model time excluded) from the reasoning replicas' /metrics."""
    import urllib.request

    from infra.local.services import ServiceReplicas

    merged: dict[float, float] = {}
    steps = 0.0
    for port in ServiceReplicas().ports("reasoning"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
                text = response.read().decode()
        except OSError:
            continue
        for le, count in _histogram(text, "agentbus_reasoning_step_overhead_seconds").items():
            merged[le] = merged.get(le, 0.0) + count
        steps += sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("agentbus_reasoning_model_steps_total ")
        )
    if not merged:
        return
    total = merged[max(merged)]

    def quantile(q: float) -> str:
        for le in sorted(merged):
            if merged[le] >= q * total:
                return f"<= {le * 1000:g} ms"
        return "?"

    print(
        f"\nreasoning overhead per handled record (model time excluded, {int(total)} records): "
        f"p50 {quantile(0.5)}, p99 {quantile(0.99)}; {int(steps)} model steps in {wall_s:.1f}s of turns "
        f"= {steps / wall_s if wall_s else 0:.1f} steps/s (sequential turns, tool time included)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tenant", default=os.environ.get("AGENTBUS_TENANT") or "demo")
    parser.add_argument("--session", help="session id (default: a fresh one)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each response")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
