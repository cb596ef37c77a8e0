"""``make bench``: agentbus against LangGraph and Restate, in one run on this machine.

    python -m tests.bench.run_bench [--quick] [--skip-peers] [--only SCENARIO,...]

Scenarios (each prints a progress line while it runs):

overhead     S sessions x 5 steps, zero model and tool latency, one turn in flight ("serial":
             the overhead of the path itself, no queueing for the 2 cores) and 4 in flight:
             per-step orchestration overhead (turn time minus time in the model and in the
             tool, per step; p50/p99) and turn latency. agentbus and both peers.
throughput   many sessions x 5 steps, high concurrency, zero latency: steps per second. agentbus
             (also with 4 instead of 12 partitions per topic: every partition has its own
             transactional producer, so fewer partitions carry more records per transaction)
             and both peers.
multiplex    one reasoning replica; every session's tool waits 500 ms: how many sessions are
             in flight at once, and the reasoning replica's memory.
context      loading a session's context for 10, 100 and 1,000 events: hot (Redis) and cold
             (Cassandra: latest snapshot + later events; and a full replay from the first event).
scaling      model-bound (each call waits 100 ms, 4 calls in flight per replica): steps per
             second with 1, 2 and 4 reasoning replicas.

Results: ``docs/bench/results.json``, plots ``docs/bench/*.png``, the table
``docs/bench/README.md`` (also copied into the README between the bench markers).
The model is always the real Triton server's ``reference_policy``; model latency is its
``latency_ms`` sampling parameter (a model that waits), the same for every system.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.bench.agentbus_side import Deployment, deployed, measure
from tests.bench.peers.common import REPO_ROOT, PeerResult, Workload, peer_command, percentile

DOCS = REPO_ROOT / "docs" / "bench"
README = REPO_ROOT / "README.md"
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
RUN_SCENARIOS = ("serial", "overhead", "throughput")  # the workloads every system runs
PEERS = ("langgraph", "restate")


class Progress:
    """One status line on stderr, rewritten in place: ``[scenario] ████░░░░ 120/400 turns 3.1 s``."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        width = 24
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = f"[{self.label}] {bar} {done}/{total} turns {now - self.t0:6.1f} s"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        if done >= total and self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def say(self, text: str) -> None:
        sys.stderr.write(f"[{self.label}] {text}\n")
        sys.stderr.flush()


def _home(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))


def run_peer(peer: str, workload: Workload, model_latency_ms: float) -> PeerResult:
    """A peer in its own process (its memory is its own), on the same Triton model and latency."""
    env = dict(os.environ)
    env["AGENTBUS_TRITON_SAMPLING"] = json.dumps({"latency_ms": model_latency_ms})
    # The workload adds no model latency of its own (model_latency_s 0): the model waits itself
    # (latency_ms above), as it does for agentbus.
    command = peer_command(peer, workload)
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{peer} failed:\n{done.stderr[-3000:]}")
    return PeerResult.from_json(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- scenarios


async def warm_servers() -> None:
    """About a minute of agentbus load before anything is measured (not counted).

    The broker's and Cassandra's JVMs go on compiling their hot paths for minutes after a
    start: measured right after ``make up`` (or a chaos run's restarts), the JIT compiler
    threads took 1.4 to 2.4 ms of CPU per step in Cassandra and 0.7 to 2.2 ms in Kafka, against
    0.2 to 0.7 ms a few minutes later. A server in service has been up for days; each
    deployment's own 80-turn warm-up does not cover this.
    """
    progress = Progress("warm-up (not counted)")
    load = Workload(sessions=1500, steps=5, concurrency=100)
    await measure(Deployment(), load, _home("warm"), progress=progress, trace_every=LOAD_TRACE_EVERY)


async def overhead_and_throughput(quick: bool, peers: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    plans = {
        "serial": Workload(sessions=10 if quick else 40, steps=5, concurrency=1),
        "overhead": Workload(sessions=20 if quick else 60, steps=5, concurrency=4),
        "throughput": Workload(sessions=60 if quick else 400, steps=5, concurrency=30 if quick else 200),
    }
    for name, workload in plans.items():
        progress = Progress(f"{name}: agentbus")
        every = LOAD_TRACE_EVERY if name == "throughput" else 1
        result, _ = await measure(Deployment(), workload, _home(name), progress=progress, trace_every=every)
        rows = {"agentbus": asdict(result)}
        if name == "throughput":
            deployment = Deployment(partitions=FEW_PARTITIONS)
            progress = Progress(f"{name}: agentbus, {FEW_PARTITIONS} partitions")
            result, _ = await measure(deployment, workload, _home(name), progress=progress, trace_every=every)
            rows[f"agentbus ({FEW_PARTITIONS} partitions)"] = asdict(result)
        if peers:
            for peer in PEERS:
                Progress(f"{name}: {peer}").say(f"{workload.sessions} sessions x {workload.steps} steps")
                rows[peer] = asdict(await asyncio.to_thread(run_peer, peer, workload, 0.0))
        out[name] = {"workload": asdict(workload), "systems": rows}
    return out


async def multiplex(quick: bool) -> dict[str, Any]:
    sessions = 500 if quick else 5000
    workload = Workload(sessions=sessions, steps=1, tool_latency_s=0.5, concurrency=sessions)
    deployment = Deployment(reasoning=1, tool_exec=2, tool_slots=sessions, max_inflight_model_calls=256)
    progress = Progress("multiplex")
    result, outcome = await measure(
        deployment, workload, _home("multiplex"), progress=progress, trace_every=LOAD_TRACE_EVERY
    )
    return {
        "workload": asdict(workload),
        "peak_sessions_in_flight": outcome.peak_in_flight,
        "answered": len(outcome.turns),
        "wall_s": round(outcome.wall_s, 2),
        "turn_ms_p50": result.turn_ms_p50,
        "turn_ms_p99": result.turn_ms_p99,
        "reasoning_rss_mib": outcome.memory.get("reasoning"),
        "rss_mib_per_replica": outcome.memory,
    }


async def context(quick: bool) -> dict[str, Any]:
    """Sessions of ~10/100/1,000 events made by real turns, then their context loaded many times."""
    from services.reasoning.main import rebuild_from_cassandra
    from shared.avro import default_codec
    from shared.context import SessionState, fold
    from shared.eventlog import EventLog
    from shared.redis import HotContextStore, make_redis
    from shared.settings import RedisSettings
    from tests.integration.agent_stack import Client

    sizes = {10: 2, 100: 17, 1000: 167}  # events -> one-step turns (6 events each)
    if quick:
        sizes = {10: 2, 100: 17}
    codec = default_codec()
    out: dict[str, Any] = {}
    progress = Progress("context")
    async with deployed(Deployment(), _home("context")) as running:
        sessions = {n: f"ctx-{n}-{uuid.uuid4().hex[:6]}" for n in sizes}
        total = sum(sizes.values())
        done = 0

        async with Client(running.kafka) as client:

            async def fill(n: int) -> None:
                nonlocal done
                for _ in range(sizes[n]):
                    await client.ask("acme", sessions[n], "wait 0 seconds", within_s=120)
                    done += 1
                    progress(done, total)

            await asyncio.gather(*(fill(n) for n in sizes))
        redis = make_redis(RedisSettings.from_env())
        hot = HotContextStore(redis, ttl_s=3600)
        eventlog = EventLog(running.statements)

        class _Deps:  # what rebuild_from_cassandra reads
            statements = running.statements
            codec = default_codec()
            eventlog = EventLog(running.statements)

        try:
            for n, session in sessions.items():
                # Wait for the checkpoint: the whole log in Cassandra.
                for _ in range(100):
                    stored = await eventlog.read("acme", session)
                    if len(stored) >= sizes[n] * 6:
                        break
                    await asyncio.sleep(0.2)
                events = len(stored)
                state = await rebuild_from_cassandra(_Deps(), "acme", session)  # type: ignore[arg-type]
                await hot.put_if_newer("acme", session, state.seq, state.to_json())

                async def load_hot(session: str = session) -> None:
                    cached = await hot.get("acme", session)
                    assert cached is not None
                    SessionState.from_json(cached.data)

                async def load_cold(session: str = session) -> None:
                    await rebuild_from_cassandra(_Deps(), "acme", session)  # type: ignore[arg-type]

                async def replay(session: str = session) -> None:
                    rows = await eventlog.read("acme", session)
                    datums = [codec.decode(r.record, expected="SessionEvent").datum for r in rows]
                    fold("acme", session, datums)

                out[str(n)] = {
                    "events": events,
                    "state_bytes": len(state.to_json()),
                    "hot_ms": await _timed(load_hot, 200),
                    "cold_ms": await _timed(load_cold, 50),
                    "full_replay_ms": await _timed(replay, 20),
                }
                progress.say(f"{events} events: {out[str(n)]}")
        finally:
            await redis.aclose()
    return out


async def _timed(call: Callable[[], Any], times: int) -> dict[str, float]:
    samples = []
    for _ in range(times):
        t0 = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"p50": round(percentile(samples, 50), 3), "p99": round(percentile(samples, 99), 3)}


async def scaling(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    replicas = (1, 2) if quick else (1, 2, 4)
    sessions = 48 if quick else 120
    for n in replicas:
        workload = Workload(sessions=sessions, steps=2, concurrency=sessions)
        deployment = Deployment(
            reasoning=n, model_latency_ms=MODEL_BOUND_MS, max_inflight_model_calls=4, even_keys=True
        )
        progress = Progress(f"scaling: {n} reasoning")
        result, outcome = await measure(deployment, workload, _home(f"scaling-{n}"), progress=progress)
        out[str(n)] = {
            "steps_per_s": result.steps_per_s,
            "wall_s": result.wall_s,
            "model_calls_per_s": round(result.model_calls / result.wall_s, 1),
            "reasoning_rss_mib": outcome.memory.get("reasoning"),
        }
    base = out["1"]["steps_per_s"]
    for n in replicas:
        out[str(n)]["speedup"] = round(out[str(n)]["steps_per_s"] / base, 2)
        out[str(n)]["efficiency"] = round(out[str(n)]["speedup"] / n, 2)
    return out


SCENARIOS = ("overhead", "multiplex", "context", "scaling")
# Under load (warm-up, throughput, multiplex) one turn in this many carries the sampled flag,
# as a deployment samples its traces; the per-step overhead scenarios (1 and 4 in flight) and
# the scaling runs trace every turn. The peers record no traces at all.
LOAD_TRACE_EVERY = 10
# The throughput scenario's second agentbus deployment: one partition per 3 of the default 12
# still leaves room for the 4 replicas of the scaling scenario.
FEW_PARTITIONS = 4
# A model call that waits this long keeps even 4 replicas' CPU well inside 2 cores: the
# throughput is then set by the model, which is what "model-bound" means here.
MODEL_BOUND_MS = 500


async def run(args: argparse.Namespace) -> dict[str, Any]:
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}",
        "quick": args.quick,
    }
    if only & {"overhead", "multiplex", "context", "scaling"} and not args.quick:
        await warm_servers()
    if "overhead" in only:
        results.update(await overhead_and_throughput(args.quick, not args.skip_peers))
    if "multiplex" in only:
        results["multiplex"] = await multiplex(args.quick)
    if "context" in only:
        results["context"] = await context(args.quick)
    if "scaling" in only:
        results["scaling"] = await scaling(args.quick)
    return results


# ----------------------------------------------------------------------------------- reporting


def _ratio(a: float, b: float) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def table(results: dict[str, Any]) -> list[str]:
    quick = " (quick run)" if results.get("quick") else ""
    lines = [f"Measured {results['when']} on {results['machine']}{quick}"]
    lines.append("")
    for name in RUN_SCENARIOS:
        if name not in results:
            continue
        w = results[name]["workload"]
        systems = results[name]["systems"]
        ours = systems["agentbus"]
        lines += [
            f"**{name}**: {w['sessions']} sessions x {w['steps']} steps, {w['concurrency']} in flight, "
            "zero model and tool latency",
            "",
            "| system | steps/s | overhead/step p50 (ms) | p99 (ms) | turn p50 (ms) | turn p99 (ms) "
            "| RSS (MiB) | agentbus steps/s vs it | its overhead p50 vs agentbus |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for system, r in systems.items():
            lines.append(
                f"| {system} | {r['steps_per_s']:.1f} | {r['overhead_ms_p50']:.1f} "
                f"| {r['overhead_ms_p99']:.1f} | {r['turn_ms_p50']:.0f} | {r['turn_ms_p99']:.0f} "
                f"| {r['rss_mib']:.0f} "
                f"| {_ratio(ours['steps_per_s'], r['steps_per_s'])} "
                f"| {_ratio(r['overhead_ms_p50'], ours['overhead_ms_p50'])} |"
            )
        lines.append("")
    if "multiplex" in results:
        m = results["multiplex"]
        lines += [
            f"**multiplex**: {m['workload']['sessions']} sessions, each tool call waits 500 ms, one "
            f"reasoning replica: peak {m['peak_sessions_in_flight']} sessions in flight, all "
            f"{m['answered']} answered in {m['wall_s']} s (turn p50 {m['turn_ms_p50']:.0f} ms, "
            f"p99 {m['turn_ms_p99']:.0f} ms); "
            f"reasoning RSS {m['reasoning_rss_mib']} MiB",
            "",
        ]
    if "context" in results:
        lines += [
            "**context load** (ms): hot = Redis + decode; cold = Cassandra snapshot + later events; "
            "replay = every event folded",
            "",
            "| events | state bytes | hot p50 | hot p99 | cold p50 | cold p99 | full replay p50 | p99 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in results["context"].values():
            lines.append(
                f"| {c['events']} | {c['state_bytes']} | {c['hot_ms']['p50']:.2f} | {c['hot_ms']['p99']:.2f} "
                f"| {c['cold_ms']['p50']:.1f} | {c['cold_ms']['p99']:.1f} | {c['full_replay_ms']['p50']:.1f} "
                f"| {c['full_replay_ms']['p99']:.1f} |"
            )
        lines.append("")
    if "scaling" in results:
        lines += [
            f"**scaling** (model-bound: {MODEL_BOUND_MS} ms per call, 4 calls in flight per replica)",
            "",
            "| reasoning replicas | steps/s | model calls/s | speedup | efficiency |",
            "|---|---|---|---|---|",
        ]
        for n, s in results["scaling"].items():
            lines.append(
                f"| {n} | {s['steps_per_s']:.1f} | {s['model_calls_per_s']:.1f} | {s['speedup']:.2f}x "
                f"| {s['efficiency']:.2f} |"
            )
        lines.append("")
    return lines


def plots(results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name in RUN_SCENARIOS:
        if name not in results:
            continue
        systems = results[name]["systems"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        names = list(systems)
        left.bar(names, [systems[s]["steps_per_s"] for s in names], color="#4c72b0")
        left.set_title("steps / s")
        left.tick_params(axis="x", labelrotation=20)
        x = range(len(names))
        right.bar([i - 0.2 for i in x], [systems[s]["overhead_ms_p50"] for s in names], 0.4, label="p50")
        right.bar([i + 0.2 for i in x], [systems[s]["overhead_ms_p99"] for s in names], 0.4, label="p99")
        right.set_xticks(list(x), names, rotation=20)
        right.set_title("orchestration overhead per step (ms)")
        right.legend()
        fig.suptitle(f"{name}: {results[name]['workload']['sessions']} sessions x 5 steps")
        fig.tight_layout()
        path = DOCS / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)
    if "scaling" in results:
        s = results["scaling"]
        ns = [int(n) for n in s]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(ns, [s[str(n)]["steps_per_s"] for n in ns], "o-", label="measured")
        ax.plot(ns, [s["1"]["steps_per_s"] * n for n in ns], "--", label="linear")
        ax.set_xlabel("reasoning replicas")
        ax.set_ylabel("steps / s")
        ax.set_title("model-bound scaling")
        ax.legend()
        fig.tight_layout()
        fig.savefig(DOCS / "scaling.png", dpi=110)
        plt.close(fig)
        made.append("scaling.png")
    if "context" in results:
        c = results["context"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        sizes = [str(v["events"]) for v in c.values()]
        x = range(len(sizes))
        for offset, key in ((-0.27, "hot_ms"), (0.0, "cold_ms"), (0.27, "full_replay_ms")):
            ax.bar([i + offset for i in x], [v[key]["p50"] for v in c.values()], 0.27, label=key[:-3])
        ax.set_xticks(list(x), sizes)
        ax.set_xlabel("events in the session")
        ax.set_ylabel("ms (p50)")
        ax.set_yscale("log")
        ax.set_title("context load")
        ax.legend()
        fig.tight_layout()
        fig.savefig(DOCS / "context.png", dpi=110)
        plt.close(fig)
        made.append("context.png")
    return made


def write(results: dict[str, Any]) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    previous = DOCS / "results.json"
    if previous.exists():  # a partial run (--only) keeps the other scenarios' figures
        results = {**json.loads(previous.read_text()), **results}
    (DOCS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = table(results)
    images = plots(results)
    doc = ["# Benchmarks", "", "Produced by `make bench` (`tests/bench/run_bench.py`).", "", *lines]
    doc += [f"![{name}]({name})" for name in images]
    (DOCS / "README.md").write_text("\n".join(doc) + "\n")
    if README.exists():
        text = README.read_text()
        if MARK_START in text and MARK_END in text:
            head, rest = text.split(MARK_START, 1)
            _, tail = rest.split(MARK_END, 1)
            block = "\n".join([MARK_START, *lines, "Plots and raw figures: `docs/bench/`.", MARK_END])
            README.write_text(head + block + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--skip-peers", action="store_true", help="agentbus only")
    parser.add_argument("--only", help=f"comma-separated scenarios of {','.join(SCENARIOS)}")
    parser.add_argument("--no-record", action="store_true", help="print, do not write docs/")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    sys.stdout.write("\n".join(table(results)) + "\n")
    if not args.no_record:
        write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
