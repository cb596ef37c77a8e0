"""scripts/demo.py helpers: where the demo tenant's secret comes from, and per-turn figures."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agentbus_demo", ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["agentbus_demo"] = module
    spec.loader.exec_module(module)
    return module


demo = _demo()


def test_secret_from_each_source(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"demo": {"secret": "from-file", "default_policy": "queue"}, "x": "y"}))
    assert demo.tenant_secret("demo", {"AGENTBUS_TENANT_SECRET": "direct"}) == "direct"
    assert demo.tenant_secret("demo", {"AGENTBUS_TENANT_SECRETS": '{"demo": "inline"}'}) == "inline"
    assert demo.tenant_secret("demo", {"AGENTBUS_TENANT_SECRETS_FILE": str(path)}) == "from-file"
    both = {"AGENTBUS_TENANT_SECRETS": '{"other": "z"}', "AGENTBUS_TENANT_SECRETS_FILE": str(path)}
    assert demo.tenant_secret("demo", both) == "from-file"
    assert demo.tenant_secret("demo", {"AGENTBUS_TENANT_SECRETS": "not json"}) == ""
    assert demo.tenant_secret("demo", {"AGENTBUS_TENANT_SECRETS_FILE": str(tmp_path / "missing")}) == ""


def test_turn_figures_split_server_time() -> None:
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

    def ev(ms: int, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "turn_id": "t1",
            "event_type": kind,
            "payload": payload,
            "occurred_at": t0 + dt.timedelta(milliseconds=ms),
        }

    events = [
        ev(0, "USER_MESSAGE_ACCEPTED", {}),
        ev(20, "MODEL_DECIDED", {"latency_ms": 15}),
        ev(21, "TOOL_CALLED", {"call_id": "c1"}),
        ev(121, "TOOL_RESULT_RECEIVED", {"call_id": "c1"}),
        ev(140, "MODEL_DECIDED", {"latency_ms": 10}),
        ev(141, "RESPONSE_SENT", {}),
    ]
    (row,) = demo.turn_figures(events)
    assert (row["steps"], row["calls"], row["server_ms"], row["model_ms"], row["tool_ms"]) == (
        2,
        1,
        141,
        25,
        100,
    )
    assert row["overhead_ms"] == 16


def test_the_conversation_uses_every_kind_of_tool_phrase() -> None:
    texts = [text for text, _ in demo.CONVERSATION]
    assert any(t.startswith("what is 2+3*4") for t in texts)
    assert any("remember that" in t for t in texts) and any("what is my" in t for t in texts)
    assert any(t.startswith("wait 1 seconds") and "notify ops" in t for t in texts)
