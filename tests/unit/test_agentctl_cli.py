"""agentctl without servers: argument parsing, settings, message building, history lines."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from agentctl import cli, commands
from agentctl.commands import AgentctlSettings, SendResult
from shared.avro import AvroCodec
from shared.context import fold

T0 = dt.datetime(2025, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


def test_send_arguments_are_parsed_and_text_words_joined() -> None:
    args = cli.build_parser().parse_args(
        [
            "send",
            "--tenant",
            "acme",
            "--session",
            "s1",
            "--policy",
            "reject",
            "--timeout",
            "5",
            "what",
            "is",
            "2+2",
        ]
    )
    assert (args.command, args.tenant, args.session, args.policy, args.timeout) == (
        "send",
        "acme",
        "s1",
        "reject",
        5.0,
    )
    assert args.text == ["what", "is", "2+2"]
    assert args.message_id is None and not args.unsigned


def test_unknown_policy_and_topic_are_refused() -> None:
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["send", "--session", "s", "--policy", "later", "hi"])
    with pytest.raises(SystemExit):
        parser.parse_args(["tail", "--topic", "nope"])


def test_tail_and_history_arguments() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["tail", "--topic", "dlq", "--from-beginning", "--max", "3"])
    assert (args.topic, args.from_beginning, args.max_records) == ("dlq", True, 3)
    assert parser.parse_args(["tail"]).topic == "responses"
    args = parser.parse_args(["history", "--tenant", "t", "--json", "sess"])
    assert (args.session, args.tenant, args.json) == ("sess", "t", True)


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTBUS_TENANT", "from-env")
    monkeypatch.setenv("AGENTBUS_TENANT_SECRET", "s3cret")
    monkeypatch.setenv("AGENTBUS_TOPIC_PREFIX", "envprefix")
    args = cli.build_parser().parse_args(["send", "--session", "s", "hi"])
    ctl = cli.agentctl_settings(args)
    assert (ctl.tenant, ctl.tenant_secret, ctl.timeout_s) == ("from-env", "s3cret", 60.0)
    assert cli.kafka_settings(args).topic("ingress") == "envprefix.ingress"
    args = cli.build_parser().parse_args(
        [
            "send",
            "--tenant",
            "flag",
            "--secret",
            "x",
            "--topic-prefix",
            "p",
            "--timeout",
            "2",
            "--session",
            "s",
            "hi",
        ]
    )
    ctl = cli.agentctl_settings(args)
    assert (ctl.tenant, ctl.tenant_secret, ctl.timeout_s) == ("flag", "x", 2.0)
    assert cli.kafka_settings(args).topic("responses") == "p.responses"
    assert AgentctlSettings.from_env({}).tenant == ""


async def test_send_without_tenant_or_secret_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTBUS_TENANT", raising=False)
    monkeypatch.delenv("AGENTBUS_TENANT_SECRET", raising=False)
    parser = cli.build_parser()
    assert await cli.run(parser.parse_args(["send", "--session", "s", "hi"])) == cli.EXIT_USAGE
    assert (
        await cli.run(parser.parse_args(["send", "--tenant", "t", "--session", "s", "hi"])) == cli.EXIT_USAGE
    )
    assert await cli.run(parser.parse_args(["history", "s"])) == cli.EXIT_USAGE


def test_user_message_is_a_valid_v2_datum(codec: AvroCodec) -> None:
    datum = commands.build_user_message("acme", "s1", "hello", policy="interrupt")
    assert len(datum["message_id"]) == 32 and datum["concurrency_policy"] == "INTERRUPT"
    decoded = codec.decode(codec.encode("UserMessage", datum), "UserMessage")
    assert decoded.writer_version == 2
    assert decoded.datum["text"] == "hello" and decoded.datum["tenant_id"] == "acme"
    assert commands.build_user_message("a", "s", "x", message_id="m-1")["concurrency_policy"] is None
    with pytest.raises(ValueError, match="policy"):
        commands.build_user_message("a", "s", "x", policy="later")


def test_traceparent_is_w3c() -> None:
    header, trace_id = commands.new_traceparent()
    version, trace, span, flags = header.split("-")
    assert (version, flags, trace) == ("00", "01", trace_id)
    assert len(trace) == 32 and len(span) == 16 and int(trace, 16) and int(span, 16)


def test_signature_is_hex_hmac_sha256() -> None:
    import hashlib
    import hmac

    assert commands.sign_value("k", b"v") == hmac.new(b"k", b"v", hashlib.sha256).hexdigest()


def test_exit_codes() -> None:
    codes = {k: SendResult("m", "t", k).exit_code for k in ("FINAL", "ERROR", "REJECTED", "TIMEOUT")}
    assert codes == {"FINAL": 0, "ERROR": 1, "REJECTED": 2, "TIMEOUT": 3}


def _event(seq: int, kind: str, payload: dict[str, Any], turn: str = "turn-1") -> dict[str, Any]:
    return {
        "tenant_id": "acme",
        "session_id": "s1",
        "seq": seq,
        "turn_id": turn,
        "event_type": kind,
        "payload": payload,
        "trace_id": "ab" * 16,
        "occurred_at": T0 + dt.timedelta(milliseconds=250 * seq),
    }


def conversation() -> list[dict[str, Any]]:
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3*4"}}\n</tool_call>'
    return [
        _event(0, "USER_MESSAGE_ACCEPTED", {"message_id": "m-1", "text": "what is 2+3*4"}),
        _event(
            1,
            "MODEL_DECIDED",
            {"raw_output": call, "decision_kind": "TOOL_CALLS", "model": "ref", "latency_ms": 7},
        ),
        _event(
            2,
            "TOOL_CALLED",
            {
                "call_id": "c-1",
                "step": 1,
                "tool": "calculator",
                "arguments_json": '{"expression": "2+3*4"}',
                "idempotency_key": "0" * 64,
            },
        ),
        _event(
            3,
            "TOOL_RESULT_RECEIVED",
            {
                "call_id": "c-1",
                "tool": "calculator",
                "status": "OK",
                "output": json.dumps({"expression": "2+3*4", "result": "14"}),
                "artifact": None,
                "error": None,
            },
        ),
        _event(
            4,
            "MODEL_DECIDED",
            {"raw_output": "2+3*4 = 14.", "decision_kind": "ANSWER", "model": "ref", "latency_ms": 3},
        ),
        _event(5, "RESPONSE_SENT", {"kind": "FINAL", "text": "2+3*4 = 14.", "reason": None}),
        _event(6, "USER_MESSAGE_ACCEPTED", {"message_id": "m-2", "text": "notify ops"}, turn="turn-2"),
        _event(
            7,
            "TOOL_RESULT_RECEIVED",
            {
                "call_id": "c-2",
                "tool": "notify",
                "status": "OUTCOME_UNKNOWN",
                "output": None,
                "artifact": None,
                "error": "claimed, no result recorded",
            },
            turn="turn-2",
        ),
    ]


def test_history_lines_name_each_event() -> None:
    lines = commands.history_lines("acme", "s1", conversation())
    assert len(lines) == 9
    assert lines[0].split()[:4] == ["0", "12:00:00.000", "turn-1", "USER_MESSAGE_ACCEPTED"]
    assert lines[0].endswith("user: what is 2+3*4")
    assert "model → tool_calls calculator (7 ms)" in lines[1]
    assert 'call calculator {"expression": "2+3*4"} [c-1]' in lines[2]
    assert lines[3].endswith("tool calculator OK → 14")
    assert "model → answer: 2+3*4 = 14." in lines[4]
    assert lines[5].endswith("response FINAL: 2+3*4 = 14.")
    assert "12:00:01.500" in lines[6]
    assert lines[7].endswith("tool notify OUTCOME_UNKNOWN → claimed, no result recorded")
    assert lines[8] == "state: turns answered: 1; active turn: turn-2 (steps 0); queued: 0; last seq: 7"


def test_history_reports_a_gap_instead_of_failing() -> None:
    events = conversation()
    del events[3]
    assert commands.history_lines("acme", "s1", events)[-1].startswith("state: cannot fold the log")


def test_state_line_lists_pending_calls() -> None:
    state = fold("acme", "s1", conversation()[:3])
    assert commands.format_state(state) == (
        "turns answered: 0; active turn: turn-1 (steps 1, waiting for calculator); queued: 0; last seq: 2"
    )


def test_other_event_summaries() -> None:
    s = commands.summarise_event
    assert s(
        _event(
            0,
            "MODEL_DECIDED",
            {"raw_output": "<tool_call>{oops", "decision_kind": "MALFORMED", "model": "m", "latency_ms": 1},
        )
    ).startswith("model → malformed")
    assert s(
        _event(0, "RESPONSE_SENT", {"kind": "ERROR", "text": "too many steps", "reason": "max_steps"})
    ) == ("response ERROR (max_steps): too many steps")
    assert s(_event(0, "TURN_CANCELLED", {"reason": "interrupted"})) == "turn cancelled: interrupted"
    assert s(_event(0, "CONTEXT_SUMMARISED", {"summary": "earlier", "through_seq": 40})) == (
        "context summarised through seq 40: earlier"
    )
    artifact = {
        "artifact_id": "a-1",
        "content_type": "application/json",
        "size_bytes": 9000,
        "sha256": "0" * 64,
    }
    assert (
        s(
            _event(
                0,
                "TOOL_RESULT_RECEIVED",
                {
                    "call_id": "c",
                    "tool": "http.get",
                    "status": "OK",
                    "output": None,
                    "artifact": artifact,
                    "error": None,
                },
            )
        )
        == "tool http.get OK → artifact a-1 (9000 bytes)"
    )
    assert s(_event(0, "UNKNOWN", {})) == "(an event type this agentctl does not know)"


def test_events_print_as_json_lines() -> None:
    line = commands.to_json(conversation()[0])
    back = json.loads(line)
    assert back["occurred_at"] == "2025-05-01T12:00:00+00:00" and back["payload"]["text"] == "what is 2+3*4"


def test_record_lines_for_tail() -> None:
    dead = {
        "source_topic": "agentbus.ingress",
        "source_partition": 4,
        "source_offset": 17,
        "key": None,
        "value": b"junk",
        "headers": [],
        "reason_code": "forged_signature",
        "reason": "signature does not match",
        "service": "ingress",
        "error_type": None,
        "failed_at": T0,
    }
    assert commands.format_record("DeadLetter", dead) == (
        "DeadLetter forged_signature: signature does not match (from agentbus.ingress[4]@17, service ingress)"
    )
    response = {
        "tenant_id": "a",
        "session_id": "s",
        "message_id": "m",
        "turn_id": None,
        "kind": "REJECTED",
        "text": "busy",
        "reason": "busy",
        "steps": 0,
        "created_at": T0,
    }
    assert (
        commands.format_record("AgentResponse", response)
        == "AgentResponse a/s m REJECTED (busy) steps=0: busy"
    )
    assert commands.format_record("SessionEvent", conversation()[0]).startswith(
        "SessionEvent acme/s1     0  "
    )


def test_session_rows() -> None:
    rows = [
        {
            "session_id": "s-long-name",
            "status": "idle",
            "last_seq": 12,
            "updated_at": T0.replace(tzinfo=None),
        },
        {"session_id": "s2", "status": None, "last_seq": None, "updated_at": None},
    ]
    lines = commands.session_lines(rows)
    assert lines[0].split() == ["session_id", "status", "last_seq", "updated_at"]
    assert lines[1].split() == ["s-long-name", "idle", "12", "2025-05-01", "12:00:00"]
    assert lines[2].split() == ["s2", "-", "-", "-"]
