"""agentctl: talk to agentbus from a shell.

    agentctl send --tenant T --session S [--message-id ID] [--policy queue|reject|interrupt]
                  [--timeout 60] TEXT...
    agentctl history [--tenant T] [--json] SESSION
    agentctl sessions [--tenant T]
    agentctl tail [--topic responses|events|dlq|tool.calls|reasoning.inbox|ingress]
                  [--from-beginning] [--max N] [--json]
    agentctl top [--interval S] [--once] [--targets HOST:PORT,...]
    agentctl trace [--tenant T] [--trace-dir DIR] SESSION [TURN]

Settings come from the environment (AGENTBUS_KAFKA_BOOTSTRAP, AGENTBUS_TOPIC_PREFIX,
AGENTBUS_CASSANDRA_*, AGENTBUS_TENANT, AGENTBUS_TENANT_SECRET); flags override them.
`send` exits 0 on FINAL, 1 on ERROR, 2 on REJECTED, 3 when no response came in time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from agentctl import commands
from agentctl.commands import AgentctlSettings
from shared.settings import CassandraSettings, KafkaSettings

EXIT_USAGE = 64


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection (defaults from the environment)")
    g.add_argument("--bootstrap", help="Kafka bootstrap servers (AGENTBUS_KAFKA_BOOTSTRAP)")
    g.add_argument("--topic-prefix", help="prefix of every topic (AGENTBUS_TOPIC_PREFIX)")
    g.add_argument("--cassandra-hosts", help="comma-separated contact points (AGENTBUS_CASSANDRA_HOSTS)")
    g.add_argument("--cassandra-port", type=int, help="CQL port (AGENTBUS_CASSANDRA_PORT)")
    g.add_argument("--keyspace", help="Cassandra keyspace (AGENTBUS_CASSANDRA_KEYSPACE)")
    g.add_argument("--tenant", help="tenant id (AGENTBUS_TENANT)")

    parser = argparse.ArgumentParser(
        prog="agentctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("send", parents=[common], help="send a message and wait for the agent's response")
    p.add_argument("--session", required=True, help="session id")
    p.add_argument("--message-id", help="client message id (default: a random uuid4 hex)")
    p.add_argument("--policy", choices=commands.POLICIES, help="what to do if a turn is running")
    p.add_argument("--timeout", type=float, help="seconds to wait for the response (default 60)")
    p.add_argument("--secret", help="the tenant's signing secret (AGENTBUS_TENANT_SECRET)")
    p.add_argument("--unsigned", action="store_true", help="send without a signature (ingress refuses it)")
    p.add_argument("text", nargs="+", help="the message (several words are joined by spaces)")

    p = sub.add_parser("history", parents=[common], help="a session's event log from Cassandra")
    p.add_argument("session", help="session id")
    p.add_argument("--json", action="store_true", help="print the decoded events as JSON lines")

    sub.add_parser("sessions", parents=[common], help="the tenant's sessions (the session index)")

    p = sub.add_parser("tail", parents=[common], help="print a topic's records as they arrive")
    p.add_argument("--topic", choices=commands.TOPIC_CHOICES, default="responses")
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest record")
    p.add_argument("--max", type=int, dest="max_records", help="stop after N records")
    p.add_argument("--idle-timeout", type=float, help="stop after this many seconds without a record")
    p.add_argument("--json", action="store_true", help="print the decoded records as JSON lines")

    p = sub.add_parser("trace", parents=[common], help="a turn's span tree (default: the last turn)")
    p.add_argument("session", help="session id")
    p.add_argument("turn", nargs="?", help="turn id (see `agentctl history`)")
    p.add_argument("--trace-dir", help="the services' span files (AGENTBUS_TRACE_DIR)")

    p = sub.add_parser("top", help="lag, load and scaling signal of every service replica (scrapes /metrics)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes (default 2)")
    p.add_argument("--once", action="store_true", help="print one refresh (two scrapes) and exit")
    p.add_argument(
        "--targets",
        help="comma-separated host:port of replicas' HTTP ports (default: the local replicas "
        "started by `python -m infra.local.services`)",
    )
    return parser


def kafka_settings(args: argparse.Namespace) -> KafkaSettings:
    overrides: dict[str, Any] = {}
    if args.bootstrap:
        overrides["kafka_bootstrap"] = args.bootstrap
    if args.topic_prefix:
        overrides["topic_prefix"] = args.topic_prefix
    return KafkaSettings.from_env(**overrides)


def cassandra_settings(args: argparse.Namespace) -> CassandraSettings:
    overrides: dict[str, Any] = {}
    if args.cassandra_hosts:
        overrides["cassandra_hosts"] = tuple(h.strip() for h in args.cassandra_hosts.split(",") if h.strip())
    if args.cassandra_port:
        overrides["cassandra_port"] = args.cassandra_port
    if args.keyspace:
        overrides["cassandra_keyspace"] = args.keyspace
    return CassandraSettings.from_env(**overrides)


def agentctl_settings(args: argparse.Namespace) -> AgentctlSettings:
    overrides: dict[str, Any] = {}
    if args.tenant:
        overrides["tenant"] = args.tenant
    if getattr(args, "secret", None):
        overrides["tenant_secret"] = args.secret
    if getattr(args, "timeout", None) is not None:
        overrides["timeout_s"] = args.timeout
    return AgentctlSettings.from_env(**overrides)


def _usage(message: str) -> int:
    print(f"agentctl: {message}", file=sys.stderr)
    return EXIT_USAGE


async def _with_statements(cassandra: CassandraSettings, work: Any) -> Any:
    """Connect to Cassandra (off the event loop), run ``work(statements)``, disconnect."""
    from shared.cassandra import Statements, connect

    cluster, session = await asyncio.to_thread(connect, cassandra)
    try:
        return await work(Statements(session, cassandra.cassandra_keyspace))
    finally:
        await asyncio.to_thread(cluster.shutdown)


async def _top(args: argparse.Namespace) -> int:
    from agentctl import top

    if args.interval <= 0:
        return _usage("--interval must be > 0")
    if args.targets:
        try:
            fixed = top.parse_targets(args.targets)
        except ValueError as exc:
            return _usage(str(exc))

        def targets() -> list[top.Target]:
            return fixed
    else:
        targets = top.local_targets
    clear = not args.once and sys.stdout.isatty()
    return await top.run_top(targets, interval_s=args.interval, once=args.once, out=sys.stdout, clear=clear)


async def _trace(args: argparse.Namespace, tenant: str) -> int:
    import os
    from pathlib import Path

    from agentctl import trace

    async def history(statements: Any) -> list[dict[str, Any]]:
        return await commands.read_history(statements, tenant, args.session)

    events = await _with_statements(cassandra_settings(args), history)
    turn, trace_ids = trace.turn_trace_ids(events, args.turn)
    if turn is None or not trace_ids:
        print(f"no events for session {tenant}/{args.session}" + (f" turn {args.turn}" if args.turn else ""))
        return 1
    trace_dir = Path(args.trace_dir or os.environ.get("AGENTBUS_TRACE_DIR") or ".local/traces")
    spans = await asyncio.to_thread(trace.load_spans, trace_dir, trace_ids)
    print(f"turn {turn} of {tenant}/{args.session}: trace {', '.join(trace_ids)}")
    if not spans:
        print(f"no spans of it under {trace_dir} (exported over OTLP? look the trace id up in Jaeger)")
        return 1
    for trace_id in trace_ids:
        print("\n".join(trace.tree_lines([s for s in spans if s.trace_id == trace_id])))
    return 0


async def run(args: argparse.Namespace) -> int:
    if args.command == "top":
        return await _top(args)
    ctl = agentctl_settings(args)
    if args.command == "send":
        if not ctl.tenant:
            return _usage("send needs a tenant: --tenant or AGENTBUS_TENANT")
        if not ctl.tenant_secret and not args.unsigned:
            return _usage("send needs the tenant secret: --secret or AGENTBUS_TENANT_SECRET (or --unsigned)")
        result = await commands.send(
            kafka_settings(args),
            tenant=ctl.tenant,
            secret=None if args.unsigned else ctl.tenant_secret,
            session=args.session,
            text=" ".join(args.text),
            message_id=args.message_id,
            policy=args.policy,
            timeout_s=ctl.timeout_s,
        )
        return result.exit_code
    if args.command == "tail":
        await commands.tail(
            kafka_settings(args),
            args.topic,
            from_beginning=args.from_beginning,
            max_records=args.max_records,
            idle_timeout=args.idle_timeout,
            as_json=args.json,
        )
        return 0
    if not ctl.tenant:
        return _usage(f"{args.command} needs a tenant: --tenant or AGENTBUS_TENANT")
    if args.command == "history":

        async def history(statements: Any) -> list[dict[str, Any]]:
            return await commands.read_history(statements, ctl.tenant, args.session)

        events = await _with_statements(cassandra_settings(args), history)
        if args.json:
            for event in events:
                print(commands.to_json(event))
        elif not events:
            print(f"no events for session {ctl.tenant}/{args.session}")
        else:
            print("\n".join(commands.history_lines(ctl.tenant, args.session, events)))
        return 0
    if args.command == "trace":
        return await _trace(args, ctl.tenant)
    # sessions

    async def sessions(statements: Any) -> list[dict[str, Any]]:
        return await commands.list_sessions(statements, ctl.tenant)

    rows = await _with_statements(cassandra_settings(args), sessions)
    print("\n".join(commands.session_lines(rows)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
