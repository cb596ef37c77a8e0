"""What every system in the benchmark shares: the workload, the agent loop's pieces, the numbers.

The workload is S sessions, each one turn of M steps; a step is one model decision plus
one tool call, and the turn ends with one more model call that answers in text. Every
system under test builds the same prompt (:func:`render_prompt`: agentbus's system prompt
and tool list, :mod:`shared.prompt`), calls the same model through the same wrapper
(:func:`with_model_latency` around :class:`shared.triton.TritonModel`), parses with
:func:`shared.decision.parse_decision` and runs the same ``sleep`` tool
(:func:`run_tool`). What differs is only the runtime around that loop.

Per-step orchestration overhead = (turn wall time - time inside the model callable - time
inside the tool) / steps, with both inner times measured by ``time.perf_counter()``
inside the callables (:class:`TurnTiming`, :func:`summarize`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.local.stack import port_open  # stdlib only: the launcher's own readiness check
from shared.prompt import Message, ToolSpec, build_prompt

__all__ = [
    "BENCH_DIR",
    "REPO_ROOT",
    "AgentSpec",
    "MemorySampler",
    "PeerError",
    "PeerResult",
    "TurnTiming",
    "Workload",
    "descendants",
    "format_seconds",
    "free_port",
    "load_agent_spec",
    "memory_of",
    "peer_command",
    "percentile",
    "port_open",
    "render_prompt",
    "run_tool",
    "summarize",
    "tool_message",
    "wait_until",
    "with_model_latency",
]

REPO_ROOT = Path(__file__).resolve().parents[3]
BENCH_DIR = REPO_ROOT / ".local" / "bench"


class PeerError(RuntimeError):
    """A peer could not be set up, or a turn did not end with the expected answer."""


# --------------------------------------------------------------------------- workload


def format_seconds(seconds: float) -> str:
    """A duration as the reference policy reads it: ``0``, ``0.05``, ``1.5`` (never ``1e-05``)."""
    text = f"{seconds:.6f}".rstrip("0").rstrip(".")
    return text or "0"


@dataclass(frozen=True)
class Workload:
    """S sessions, one turn of M steps each, at a given model and tool latency and concurrency."""

    sessions: int
    steps: int
    model_latency_s: float = 0.0
    tool_latency_s: float = 0.0
    concurrency: int = 8

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.steps < 1 or self.concurrency < 1:
            raise ValueError(f"sessions, steps and concurrency must be >= 1: {self}")
        if self.model_latency_s < 0 or not 0 <= self.tool_latency_s <= 60:
            raise ValueError(f"latencies must be >= 0 (tool latency <= 60 s, the tool's limit): {self}")

    def user_text(self) -> str:
        """The user message: M clauses ``wait {tool latency} seconds`` joined by `` then ``."""
        clause = f"wait {format_seconds(self.tool_latency_s)} seconds"
        return " then ".join([clause] * self.steps)

    def expected_answer(self) -> str:
        """What the reference policy answers once the M ``sleep`` calls are done."""
        return " ".join([f"Waited {format_seconds(self.tool_latency_s)} seconds."] * self.steps)


# --------------------------------------------------------------------------- the agent loop's pieces


@dataclass(frozen=True)
class AgentSpec:
    """The system prompt and tool list agentbus's reasoning service puts in every prompt."""

    system: str
    tools: tuple[ToolSpec, ...]

    @property
    def tool_names(self) -> frozenset[str]:
        return frozenset(tool.name for tool in self.tools)

    def to_json(self) -> str:
        return json.dumps({"system": self.system, "tools": [asdict(t) for t in self.tools]})

    @classmethod
    def from_json(cls, text: str) -> AgentSpec:
        raw = json.loads(text)
        return cls(raw["system"], tuple(ToolSpec(**t) for t in raw["tools"]))


def load_agent_spec() -> AgentSpec:
    """agentbus's system prompt and tool specs, read in a short-lived child process.

    A child, so the peer's own process does not import agentbus's services (tool-exec's
    registry, the Cassandra driver ...) and carry their memory into its measured RSS.
    """
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.peers.spec"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise PeerError(f"cannot read agentbus's prompt spec: {done.stderr.strip()}")
    return AgentSpec.from_json(done.stdout)


def render_prompt(spec: AgentSpec, messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt of a conversation whose messages are plain dicts (``role``, ``content`` ...)."""
    return build_prompt(
        spec.system,
        spec.tools,
        [Message(m["role"], m["content"], m.get("name"), m.get("call_id")) for m in messages],
    )


def with_model_latency(
    generate: Callable[[str], Awaitable[str]], latency_s: float
) -> Callable[[str], Awaitable[str]]:
    """The model callable of every system under test: the bench's model latency, then ``generate``.

    ``generate`` is :meth:`shared.triton.TritonModel.generate` (the real Triton server's
    ``reference_policy``); the added sleep stands in for a slower, real LLM.
    """

    async def call(prompt: str) -> str:
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        return await generate(prompt)

    return call


async def run_tool(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The bench's tool set: ``sleep`` as agentbus's tool-exec runs it; any other tool is an error.

    The result has the shape of agentbus's tool results: ``status`` and ``output`` (the
    JSON text of the tool's output) or ``error``.
    """
    if name != "sleep":
        return {"status": "ERROR", "error": f"the {name} tool is not part of the bench workload"}
    seconds = arguments.get("seconds")
    if not isinstance(seconds, int | float) or not 0 <= seconds <= 60:
        return {"status": "ERROR", "error": f"seconds must be a number in [0, 60], got {seconds!r}"}
    await asyncio.sleep(float(seconds))
    return {"status": "OK", "output": json.dumps({"slept_s": seconds}, ensure_ascii=False)}


def tool_message(call_id: str, name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The tool message appended to the conversation, with the content agentbus's context holds."""
    body = {"name": name, "call_id": call_id, **{k: v for k, v in result.items() if v is not None}}
    return {
        "role": "tool",
        "content": json.dumps(body, ensure_ascii=False, separators=(", ", ": ")),
        "name": name,
        "call_id": call_id,
    }


# --------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class TurnTiming:
    """One turn as its client saw it, with the time spent inside the model and the tools."""

    turn_s: float
    model_s: float
    tool_s: float
    steps: int
    model_calls: int
    answer: str

    @property
    def overhead_per_step_s(self) -> float:
        return (self.turn_s - self.model_s - self.tool_s) / max(self.steps, 1)


@dataclass
class PeerResult:
    """One system's run of one workload, as the bench driver reports it."""

    name: str
    sessions: int
    steps_total: int
    wall_s: float
    steps_per_s: float
    overhead_ms_p50: float
    overhead_ms_p99: float
    turn_ms_p50: float
    turn_ms_p99: float
    rss_mib: float
    notes: str = ""
    # Proportional set size (shared pages split between the processes sharing them).
    pss_mib: float = 0.0
    rss_parts_mib: dict[str, float] = field(default_factory=dict)
    model_calls: int = 0
    answer: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> PeerResult:
        return cls(**json.loads(text))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(
    name: str,
    workload: Workload,
    wall_s: float,
    turns: Sequence[TurnTiming],
    memory: MemorySampler | None,
    notes: str = "",
    *,
    timed: Sequence[TurnTiming] | None = None,
) -> PeerResult:
    """The :class:`PeerResult` of a run; raises :class:`PeerError` if a turn's answer is wrong.

    ``timed``: the turns whose model and tool time were measured, when that is not every
    turn (agentbus under load traces a sample); the overhead percentiles come from them.
    """
    expected = workload.expected_answer()
    wrong = [t.answer for t in turns if t.answer != expected]
    if len(turns) != workload.sessions or wrong:
        raise PeerError(
            f"{name}: {len(turns)}/{workload.sessions} turns, {len(wrong)} with a wrong answer"
            + (f", e.g. {wrong[0]!r} (expected {expected!r})" if wrong else "")
        )
    steps_total = sum(t.steps for t in turns)
    overhead_ms = [t.overhead_per_step_s * 1000 for t in (turns if timed is None else timed)]
    turn_ms = [t.turn_s * 1000 for t in turns]
    return PeerResult(
        name=name,
        sessions=len(turns),
        steps_total=steps_total,
        wall_s=round(wall_s, 4),
        steps_per_s=round(steps_total / wall_s, 2) if wall_s > 0 else math.inf,
        overhead_ms_p50=round(percentile(overhead_ms, 50), 3),
        overhead_ms_p99=round(percentile(overhead_ms, 99), 3),
        turn_ms_p50=round(percentile(turn_ms, 50), 2),
        turn_ms_p99=round(percentile(turn_ms, 99), 2),
        rss_mib=round(memory.peak_rss_mib, 1) if memory else 0.0,
        notes=notes,
        pss_mib=round(memory.peak_pss_mib, 1) if memory else 0.0,
        rss_parts_mib={k: round(v, 1) for k, v in memory.parts_at_peak.items()} if memory else {},
        model_calls=sum(t.model_calls for t in turns),
        answer=turns[0].answer if turns else "",
    )


# --------------------------------------------------------------------------- processes and memory


def peer_command(peer: str, workload: Workload) -> list[str]:
    """The ``python -m tests.bench.peers`` command line that runs ``workload`` on ``peer``."""
    return [
        sys.executable,
        "-m",
        "tests.bench.peers",
        "--peer",
        peer,
        "--sessions",
        str(workload.sessions),
        "--steps",
        str(workload.steps),
        "--model-latency-ms",
        str(workload.model_latency_s * 1000),
        "--tool-latency-ms",
        str(workload.tool_latency_s * 1000),
        "--concurrency",
        str(workload.concurrency),
    ]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _ppid(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_of(pids: Iterable[int]) -> tuple[float, float]:
    """(RSS, PSS) in MiB summed over ``pids``; a process that is gone counts 0."""
    rss = pss = 0
    for pid in pids:
        rss += _kib(f"/proc/{pid}/status", "VmRSS:")
        pss += _kib(f"/proc/{pid}/smaps_rollup", "Pss:")
    return rss / 1024, pss / 1024


class MemorySampler:
    """Samples the memory of a system's processes every ``interval_s`` in a thread; keeps the peak.

    ``parts`` maps a label (``python``, ``postgres``, ``restate-server`` ...) to a function
    returning that part's pids now (a server's pid list changes as it forks backends).
    The peak is of the sum over all parts; ``parts_at_peak`` is each part's RSS then.
    """

    def __init__(self, parts: Mapping[str, Callable[[], Iterable[int]]], interval_s: float = 0.2) -> None:
        self._parts = dict(parts)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss_mib = 0.0
        self.peak_pss_mib = 0.0
        self.parts_at_peak: dict[str, float] = {}

    def sample(self) -> None:
        per_part = {name: memory_of(pids()) for name, pids in self._parts.items()}
        rss = sum(r for r, _ in per_part.values())
        pss = sum(p for _, p in per_part.values())
        if rss > self.peak_rss_mib:
            self.peak_rss_mib = rss
            self.parts_at_peak = {name: r for name, (r, _) in per_part.items()}
        self.peak_pss_mib = max(self.peak_pss_mib, pss)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    """Poll ``check`` until it is true; :class:`PeerError` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise PeerError(f"{what} not ready within {timeout_s:.0f} s")
        time.sleep(interval_s)
