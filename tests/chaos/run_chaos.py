"""``make chaos``: run a chaos scenario against the local servers and verify the guarantees.

    python -m tests.chaos.run_chaos [--sessions 1000] [--turns 5] [--kills 20] [--scenario full]

Prints the verifier's report, appends the scenario's figures to
``docs/chaos/results.json`` and rewrites the table in ``docs/RELIABILITY.md``.
Exit code 0 only when every guarantee held.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from shared.cassandra import Statements, connect
from shared.migrations import apply_migrations
from shared.settings import CassandraSettings, KafkaSettings
from shared.topics import ensure_topics
from tests.chaos.harness import Chaos, ChaosConfig, ChaosResult
from tests.chaos.verify import (
    ONE_FINAL_RESPONSE,
    SEQ_CONTIGUOUS,
    SIDE_EFFECTS_AT_MOST_ONCE,
    InjectedBadRecord,
    SentMessage,
    verify,
)
from tests.scratch import delete_topics, drop_keyspace

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "chaos" / "results.json"
RELIABILITY = ROOT / "docs" / "RELIABILITY.md"

SCENARIOS: dict[str, dict[str, Any]] = {
    # The target: 1,000 sessions x 5 turns, >= 20 kills over all four services,
    # a broker restart, a Cassandra restart and a Redis wipe, mixed with the other faults.
    "full": {},
    "kills-only": {
        "sigstop": False,
        "broker_restart": False,
        "cassandra_restart": False,
        "redis_wipe": False,
        "redis_restart": False,
        "poison": False,
        "replay": False,
    },
    "infra-restarts": {"kills": 0, "bursts": 0, "sigstop": False, "poison": False, "replay": False},
    # What `make test` runs: small, every kind of fault but the slow server restarts.
    "smoke": {
        "sessions": 30,
        "turns": 5,
        "kills": 4,
        "bursts": 1,
        "concurrency": 30,
        "broker_restart": False,
        "cassandra_restart": False,
        "redis_restart": False,
    },
}


async def run_scenario(config: ChaosConfig, *, partitions: int = 6) -> tuple[ChaosResult, Any]:
    prefix = f"chaos-{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings.from_env(topic_prefix=prefix, topic_partitions=partitions)
    await ensure_topics(kafka)
    cassandra = CassandraSettings.from_env(cassandra_keyspace=f"chaos_{uuid.uuid4().hex[:10]}")
    cluster, session = connect(cassandra, keyspace="")
    passed = False
    try:
        apply_migrations(session, cassandra)
        statements = Statements(session, cassandra.cassandra_keyspace)
        chaos = Chaos(config, kafka, cassandra.cassandra_keyspace, Path(tempfile.mkdtemp(prefix="chaos-")))
        result = await chaos.run()
        report = await verify(
            kafka,
            statements,
            groups=result.groups,
            expected_dlq=[InjectedBadRecord(i.topic, i.value, i.expect_reason) for i in result.injected],
            expected_messages=[SentMessage(m.tenant, m.session, m.message_id) for m in result.sent],
        )
        passed = run_passed(result, report)
        return result, report
    finally:
        if passed:  # a failed run's topics and keyspace stay, to be looked into
            await asyncio.to_thread(drop_keyspace, session, cassandra.cassandra_keyspace)
            await delete_topics(kafka, (prefix + ".",))
        else:
            kept = f"keyspace {cassandra.cassandra_keyspace} and topics {prefix}.*"
            print(f"chaos: kept {kept} for inspection", file=sys.stderr)
        cluster.shutdown()


def run_passed(result: ChaosResult, report: Any) -> bool:
    """Every verifier check held, every answer was right, and no replica ended by itself."""
    return bool(report.ok) and not result.wrong_answers and not result.exited


def summary_row(
    name: str, config: ChaosConfig, result: ChaosResult, report: Any, command: str
) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for f in result.faults:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    p50, worst = result.recovery("kill")
    _, stop_max = result.recovery("sigstop")
    totals = report.totals
    responses = report.check(ONE_FINAL_RESPONSE).counts
    seqs = report.check(SEQ_CONTIGUOUS).counts
    effects = report.check(SIDE_EFFECTS_AT_MOST_ONCE).counts
    return {
        "scenario": name,
        "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "ok": run_passed(result, report),
        "replicas_exited": result.exited,
        "faults": kinds,
        "sessions": config.sessions,
        "turns": len(result.sent),
        "answered": len(result.answers),
        "wrong_answers": len(result.wrong_answers),
        "notify_outcome_unknown": len(result.outcome_unknown),
        "client_late_answers": result.late_answers,
        "client_reader_misses": result.reader_misses,
        "turn_latency_s": _percentiles(result.turn_latencies),
        "lost": responses["lost"] + responses["lost_turn"],
        "duplicated": responses["duplicated"],
        "dlq": totals.get("dlq_records", 0),
        "dlq_injected": len(result.injected),
        "seq_violations": seqs["sessions_with_gap"] + seqs["sessions_with_duplicate_seq"],
        "notify_duplicates": effects["extra_executions"],
        "failed_checks": [c.name for c in report.checks if not c.ok],
        "reasoning_failover_p50_s": p50,
        "reasoning_failover_max_s": worst,
        "zombie_failover_s": stop_max,
        "duration_s": round(result.duration_s, 1),
        "command": command,
        "session_timeout_ms": config.session_timeout_ms,
    }


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 2)}


def write_reliability(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# Reliability: effectively-once under faults",
        "",
        "Each row is one run of `tests/chaos` against the local servers (2-core machine): a workload",
        "of sessions x turns through real service processes while faults fire, then one linear reader",
        "(`tests/chaos/verify.py`) rebuilds the truth from the topics and Cassandra. *Lost*: an accepted",
        "message without a final response; *duplicated*: a message with more than one; *DLQ'd*:",
        "dead letters (all of them injected bad records); *failover*: seconds from SIGKILL (or SIGSTOP)",
        "of a reasoning replica until a live replica owns every partition it had (consumer",
        "`session.timeout.ms` in the row; heartbeat = timeout / 6). *Notify outcome unknown*: turns",
        "whose irreversible `notify` was claimed by a tool-exec replica that was SIGKILLed before it",
        "recorded the result; by design it is reported, never re-run (the verifier checks at most",
        "one execution per key). *ok*: every verifier check held, every answer was right, and every",
        "service replica was still running at the end (the harness restarts what it kills, so one",
        "that is not ended by itself).",
        "",
        "| scenario | when | faults injected | sessions | turns | lost | duplicated | seq gaps/dups "
        "| notify dups | notify outcome unknown | DLQ'd (injected) | failover p50 / max (s) "
        "| zombie fenced after (s) | turn latency p50 / p99 / max (s) | duration (s) | ok | reproduce |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(r["faults"].items()))
        p50 = "-" if r["reasoning_failover_p50_s"] is None else f"{r['reasoning_failover_p50_s']:.1f}"
        worst = "-" if r["reasoning_failover_max_s"] is None else f"{r['reasoning_failover_max_s']:.1f}"
        zombie = "-" if r["zombie_failover_s"] is None else f"{r['zombie_failover_s']:.1f}"
        lat = r.get("turn_latency_s")
        latency = "-" if not lat else f"{lat['p50']:.2f} / {lat['p99']:.1f} / {lat['max']:.1f}"
        lines.append(
            f"| {r['scenario']} | {r['when']} | {faults} | {r['sessions']} | {r['turns']} | {r['lost']} "
            f"| {r['duplicated']} | {r['seq_violations']} | {r['notify_duplicates']} "
            f"| {r.get('notify_outcome_unknown', 0)} | {r['dlq']} "
            f"({r['dlq_injected']}) | {p50} / {worst} | {zombie} | {latency} | {r['duration_s']} "
            f"| {'yes' if r['ok'] else '**no**'} | `{r['command']}` |"
        )
    lines += [
        "",
        "Consumer settings behind the failover figures: `AGENTBUS_KAFKA_SESSION_TIMEOUT_MS` (the row's",
        "value; 10 s by default), `AGENTBUS_KAFKA_HEARTBEAT_MS` (timeout / 6),",
        "`group.initial.rebalance.delay.ms=0` on the broker. A SIGKILLed member is only noticed when its",
        "session times out, so failover is",
        "the session timeout plus one rebalance and the new owner's producer start and head scan.",
        "",
    ]
    RELIABILITY.parent.mkdir(parents=True, exist_ok=True)
    RELIABILITY.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="run_chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", default="full", choices=sorted(SCENARIOS))
    parser.add_argument("--sessions", type=int)
    parser.add_argument("--turns", type=int)
    parser.add_argument("--kills", type=int)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-record", action="store_true", help="do not write docs/")
    args = parser.parse_args(argv)
    overrides = dict(SCENARIOS[args.scenario])
    for name in ("sessions", "turns", "kills"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    config = dataclasses.replace(ChaosConfig(seed=args.seed), **overrides)
    command = "make chaos" + ("" if args.scenario == "full" else f" CHAOS_ARGS='--scenario {args.scenario}'")
    result, report = asyncio.run(run_scenario(config))
    sys.stdout.write(report.to_text() + "\n")
    for f in result.faults:
        recovery = "" if f.recovery_s is None else f" recovered in {f.recovery_s:.1f}s"
        sys.stdout.write(f"fault at {f.at_s:7.1f}s: {f.kind} {f.target} {f.note}{recovery}\n")
    for line in result.wrong_answers[:20]:
        sys.stdout.write(f"wrong answer: {line}\n")
    for name in result.exited:
        sys.stdout.write(f"replica ended by itself (not killed by the harness): {name}\n")
    row = summary_row(args.scenario, config, result, report, command)
    sys.stdout.write(json.dumps(row, indent=2) + "\n")
    if not args.no_record:
        rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        rows = [r for r in rows if r["scenario"] != row["scenario"]] + [row]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
        write_reliability(rows)
    return 0 if row["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
