"""Fixtures for the Avro contract tests: the repository's registry, a codec and a sample generator."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import string
from collections.abc import Callable
from typing import Any

import pytest

from shared.avro import AvroCodec, SchemaRegistry, SchemaVersion, normalise_schema

_WORDS = [
    "agent", "tool", "weather", "Berlin", "tomorrow", "search", "invoice", "refund", "plan", "summary",
    "héllo", "naïve", "日本語", "emoji 🚀", "tab\tand\nnewline", '"quoted"', "back\\slash", "",
]  # fmt: skip

_INT_EDGES = [0, 1, -1, 2**31 - 1, -(2**31)]
_LONG_EDGES = [0, 1, -1, 2**63 - 1, -(2**63)]
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _snake_upper(name: str) -> str:
    """``ToolResultReceived`` -> ``TOOL_RESULT_RECEIVED``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


class SampleGenerator:
    """Builds realistic, seeded sample datums by walking a schema.

    Union branches are chosen round-robin by sample number, so ``count`` samples with ``count`` a
    multiple of every union's size cover every branch; ``union_hits`` records what was covered, by
    location, for the tests to assert. Values follow field names where that makes them realistic
    (ids, hex digests, JSON text, timestamps) and otherwise mix in edge cases.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.union_hits: dict[str, set[int]] = {}
        self.union_sizes: dict[str, int] = {}
        self._named: dict[str, dict[str, Any]] = {}
        self._turn = 0
        self._choices: dict[str, str] = {}

    def samples(self, sv: SchemaVersion, count: int) -> list[dict[str, Any]]:
        return [self.sample(sv, n) for n in range(count)]

    def sample(self, sv: SchemaVersion, n: int = 0) -> dict[str, Any]:
        self._named = {}
        self._choices = {}
        self._turn = n
        root = normalise_schema(sv.schema)
        self._index(root)
        datum = self._value(root, "", "")
        assert isinstance(datum, dict)
        if sv.name == "SessionEvent":  # keep the event realistic: the type names the payload branch
            datum["event_type"] = _snake_upper(self._choices["/payload"].rpartition(".")[2])
        return datum

    def _index(self, node: Any) -> None:
        if isinstance(node, list):
            for branch in node:
                self._index(branch)
        elif isinstance(node, dict):
            if node["type"] in ("record", "enum", "fixed"):
                self._named[node["name"]] = node
            for fld in node.get("fields", []):
                self._index(fld["type"])
            for key in ("items", "values"):
                if key in node:
                    self._index(node[key])

    def _value(self, node: Any, field: str, loc: str) -> Any:
        rng = self.rng
        if isinstance(node, str) and node in self._named:
            node = self._named[node]
        if isinstance(node, list):
            index = (self._turn + len(loc)) % len(node)  # round-robin, not in lock-step
            self.union_hits.setdefault(loc, set()).add(index)
            self.union_sizes[loc] = len(node)
            branch = node[index]
            self._choices[loc] = branch if isinstance(branch, str) else branch.get("name", branch["type"])
            return self._value(branch, field, loc)
        kind = node if isinstance(node, str) else node["type"]
        if isinstance(node, dict) and node.get("logicalType") == "timestamp-millis":
            millis = rng.randint(1_700_000_000_000, 1_800_000_000_000)
            return _EPOCH + dt.timedelta(milliseconds=millis)
        if kind == "null":
            return None
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "int":
            return rng.choice(_INT_EDGES) if rng.random() < 0.3 else rng.randint(0, 500)
        if kind == "long":
            return rng.choice(_LONG_EDGES) if rng.random() < 0.3 else rng.randint(0, 10**12)
        if kind in ("float", "double"):
            return rng.randint(-1000, 1000) / 4  # exactly representable in float32
        if kind == "bytes":
            return rng.randbytes(rng.randint(0, 40))
        if kind == "string":
            return self._string(field)
        if kind == "enum":
            return rng.choice(node["symbols"])
        if kind == "fixed":
            return rng.randbytes(node["size"])
        if kind == "array":
            return [self._value(node["items"], field, f"{loc}/items") for _ in range(rng.randint(0, 3))]
        if kind == "map":
            return {
                self._word(): self._value(node["values"], field, f"{loc}/values")
                for _ in range(rng.randint(0, 3))
            }
        if kind == "record":
            return {
                fld["name"]: self._value(fld["type"], fld["name"], f"{loc}/{fld['name']}")
                for fld in node["fields"]
            }
        raise AssertionError(f"sample generator does not handle {node!r}")

    def _word(self) -> str:
        return "".join(self.rng.choices(string.ascii_lowercase, k=self.rng.randint(1, 8)))

    def _string(self, field: str) -> str:
        rng = self.rng
        if field == "trace_id":
            return rng.randbytes(16).hex()
        if field in ("sha256", "idempotency_key"):
            return rng.randbytes(32).hex()
        if field == "tenant_id":
            return f"tenant-{rng.randint(1, 9)}"
        if field.endswith("_id"):
            return f"{field.removesuffix('_id')}-{rng.randbytes(6).hex()}"
        if field.endswith("_json") or field == "output":
            return json.dumps({"query": rng.choice(_WORDS), "limit": rng.randint(1, 10)}, ensure_ascii=False)
        if field == "content_type":
            return rng.choice(["application/json", "text/plain", "image/png"])
        if field in ("tool", "model", "service", "source_topic"):
            return rng.choice(["web_search", "calculator", "reference-policy", "ingress", "agentbus.ingress"])
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 6)))


@pytest.fixture(scope="session")
def registry() -> SchemaRegistry:
    return SchemaRegistry()


@pytest.fixture(scope="session")
def codec(registry: SchemaRegistry) -> AvroCodec:
    return AvroCodec(registry)


@pytest.fixture
def make_samples() -> Callable[..., tuple[list[dict[str, Any]], SampleGenerator]]:
    """``make_samples(sv, count, seed=...)`` -> (samples, the generator that made them)."""

    def make(
        sv: SchemaVersion, count: int, seed: int = 20240601
    ) -> tuple[list[dict[str, Any]], SampleGenerator]:
        gen = SampleGenerator(seed)
        return gen.samples(sv, count), gen

    return make
