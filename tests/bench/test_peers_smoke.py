"""Smoke test of the benchmark peers: each runs 3 sessions x 2 steps end to end on the real Triton.

Marked ``bench`` (left out of ``make test``): it needs the bench extra, Debian's
PostgreSQL and restate-server (``tests/bench/peers/setup.sh``) and the local Triton
server (``make up``). Each peer runs as ``python -m tests.bench.peers``, as the bench
driver runs it.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.bench.peers.common import (
    REPO_ROOT,
    PeerResult,
    Workload,
    format_seconds,
    peer_command,
    percentile,
)

pytestmark = pytest.mark.bench

SESSIONS, STEPS = 3, 2
MODEL_LATENCY_MS, TOOL_LATENCY_MS = 5.0, 10.0


def test_workload_text_and_answer() -> None:
    workload = Workload(sessions=1, steps=3, tool_latency_s=0.05)
    assert workload.user_text() == "wait 0.05 seconds then wait 0.05 seconds then wait 0.05 seconds"
    assert workload.expected_answer() == "Waited 0.05 seconds. Waited 0.05 seconds. Waited 0.05 seconds."
    assert format_seconds(0) == "0"
    assert format_seconds(1.0) == "1"
    assert format_seconds(0.00001) == "0.00001"


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(map(float, range(101))), 99) == 99.0


def run_peer(peer: str) -> PeerResult:
    workload = Workload(
        SESSIONS,
        STEPS,
        model_latency_s=MODEL_LATENCY_MS / 1000,
        tool_latency_s=TOOL_LATENCY_MS / 1000,
        concurrency=2,
    )
    done = subprocess.run(
        peer_command(peer, workload),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return PeerResult(**json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("peer", ["langgraph", "restate"])
def test_peer_runs_the_workload(peer: str) -> None:
    result = run_peer(peer)
    expected = Workload(SESSIONS, STEPS, tool_latency_s=TOOL_LATENCY_MS / 1000).expected_answer()
    assert result.name == peer
    assert result.answer == expected == "Waited 0.01 seconds. Waited 0.01 seconds."
    assert result.sessions == SESSIONS
    assert result.steps_total == SESSIONS * STEPS
    assert result.model_calls == SESSIONS * (STEPS + 1)  # one decision per step, then the answer
    assert result.wall_s > 0 and result.steps_per_s > 0
    # A turn waits at least for its tools and model calls; the overhead is what is left.
    floor_ms = STEPS * TOOL_LATENCY_MS + (STEPS + 1) * MODEL_LATENCY_MS
    assert floor_ms <= result.turn_ms_p50 <= result.turn_ms_p99
    assert 0 <= result.overhead_ms_p50 <= result.overhead_ms_p99
    assert result.overhead_ms_p50 * STEPS <= result.turn_ms_p50
    assert result.rss_mib > 0 and result.pss_mib > 0
    assert all(v > 0 for v in result.rss_parts_mib.values()), result.rss_parts_mib
