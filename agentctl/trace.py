"""``agentctl trace SESSION [TURN]``: a turn's span tree, service by service.

The turn's trace id comes from its events in Cassandra (every SessionEvent stores
the trace id it was written under); the spans come from the JSON-lines span files
the services write under ``AGENTBUS_TRACE_DIR`` when no OTLP endpoint is set (with
an OTLP collector, open the same trace id in Jaeger or Tempo instead).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Span", "load_spans", "tree_lines", "turn_trace_ids"]

# Attributes worth a place on a span's line, in this order.
_SHOWN = (
    "agentbus.record",
    "agentbus.tool",
    "agentbus.step",
    "agentbus.tool.status",
    "agentbus.tool.replayed",
    "agentbus.outcome",
    "agentbus.reason",
    "model",
    "completion.chars",
    "db.operation",
    "db.statement",
    "messaging.kafka.partition",
    "messaging.kafka.offset",
    "agentbus.batch",
)


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    service: str
    start_ns: int
    end_ns: int
    status: str
    attributes: dict[str, Any]
    children: list[Span] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @classmethod
    def from_line(cls, data: dict[str, Any]) -> Span:
        return cls(
            trace_id=data["trace_id"],
            span_id=data["span_id"],
            parent_id=data.get("parent_id"),
            name=data["name"],
            service=data.get("service", "?"),
            start_ns=int(data["start_ns"]),
            end_ns=int(data["end_ns"]),
            status=data.get("status", "UNSET"),
            attributes=dict(data.get("attributes") or {}),
        )


def load_spans(trace_dir: Path, trace_ids: Iterable[str]) -> list[Span]:
    """Every span of ``trace_ids`` in the ``*.jsonl`` files under ``trace_dir`` (deduplicated)."""
    wanted = set(trace_ids)
    spans: dict[str, Span] = {}
    for path in sorted(trace_dir.glob("**/*.jsonl")):
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if not any(t in line for t in wanted):  # cheap filter before parsing
                    continue
                try:
                    data = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if data.get("trace_id") in wanted:
                    span = Span.from_line(data)
                    spans[span.span_id] = span
    return list(spans.values())


def turn_trace_ids(events: Sequence[dict[str, Any]], turn_id: str | None) -> tuple[str | None, list[str]]:
    """The turn (the session's last one when ``turn_id`` is None) and its events' trace ids."""
    turns = [e.get("turn_id") for e in events if e.get("turn_id")]
    if turn_id is None:
        if not turns:
            return None, []
        turn_id = turns[-1]
    ids: list[str] = []
    for e in events:
        trace_id = e.get("trace_id")
        if e.get("turn_id") == turn_id and trace_id and trace_id not in ids:
            ids.append(trace_id)
    return turn_id, ids


def _tree(spans: Sequence[Span]) -> list[Span]:
    by_id = {s.span_id: s for s in spans}
    roots: list[Span] = []
    for s in sorted(spans, key=lambda s: s.start_ns):
        parent = by_id.get(s.parent_id or "")
        if parent is None:
            roots.append(s)  # a true root, or the child of a span not exported (a client's)
        else:
            parent.children.append(s)
    return roots


def _attrs(span: Span) -> str:
    parts = []
    for key in _SHOWN:
        if key in span.attributes:
            value = str(span.attributes[key])
            if key == "db.statement":
                value = " ".join(value.split())[:60]
            parts.append(f"{key.removeprefix('agentbus.')}={value}")
    return " ".join(parts)


def tree_lines(spans: Sequence[Span]) -> list[str]:
    """The span tree: start offset, duration, service, name, key attributes; then a per-service sum."""
    if not spans:
        return []
    t0 = min(s.start_ns for s in spans)
    t1 = max(s.end_ns for s in spans)
    lines = [f"trace {spans[0].trace_id}: {len(spans)} spans over {(t1 - t0) / 1e6:.1f} ms"]

    def walk(span: Span, depth: int) -> None:
        error = " ERROR" if span.status == "ERROR" else ""
        lines.append(
            f"{(span.start_ns - t0) / 1e6:9.1f} ms {span.duration_ms:8.1f} ms  {'  ' * depth}"
            f"[{span.service}] {span.name}{error}  {_attrs(span)}".rstrip()
        )
        for child in span.children:
            walk(child, depth + 1)

    for root in _tree(spans):
        walk(root, 0)
    per_service: dict[str, tuple[int, float]] = {}
    for s in spans:
        if s.attributes.get("messaging.system") == "kafka":  # the per-record spans of each service
            n, ms = per_service.get(s.service, (0, 0.0))
            per_service[s.service] = (n + 1, ms + s.duration_ms)
    if per_service:
        lines.append(
            "records handled per service: "
            + ", ".join(f"{svc} {n} ({ms:.1f} ms)" for svc, (n, ms) in sorted(per_service.items()))
        )
    return lines
