"""The checkpoint's pure steps: decoding a batch, session progress, snapshot points."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from services.checkpoint.handlers import InRecord, decode_batch, session_progress, snapshot_points
from shared.avro import default_codec

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def session_event(tenant: str, session: str, seq: int, kind: str = "USER_MESSAGE_ACCEPTED") -> dict[str, Any]:
    payloads: dict[str, tuple[str, dict[str, Any]]] = {
        "USER_MESSAGE_ACCEPTED": ("agentbus.UserMessageAccepted", {"message_id": f"m{seq}", "text": "hi"}),
        "RESPONSE_SENT": ("agentbus.ResponseSent", {"kind": "FINAL", "text": "done", "reason": None}),
        "TURN_CANCELLED": ("agentbus.TurnCancelled", {"reason": "interrupted"}),
    }
    return {
        "tenant_id": tenant,
        "session_id": session,
        "seq": seq,
        "turn_id": f"t{seq}",
        "event_type": kind,
        "payload": payloads[kind],
        "trace_id": "0" * 31 + "1",
        "occurred_at": T0 + dt.timedelta(seconds=seq),
    }


def rec(value: bytes | None, offset: int = 0) -> InRecord:
    return InRecord("x.events", 0, offset, b"k", value)


@pytest.mark.parametrize(
    ("first", "last", "every", "points"),
    [
        (95, 104, 100, [99]),
        (0, 98, 100, []),
        (0, 99, 100, [99]),
        (99, 99, 100, [99]),
        (100, 198, 100, []),
        (0, 250, 100, [99, 199]),
        (0, 9, 3, [2, 5, 8]),
        (0, 5, 0, []),
    ],
)
def test_snapshot_points_are_every_nth_event(first: int, last: int, every: int, points: list[int]) -> None:
    assert snapshot_points(first, last, every) == points


def test_decode_batch_keeps_the_raw_bytes_and_rejects_garbage_with_a_reason() -> None:
    codec = default_codec()
    good = codec.encode("SessionEvent", session_event("t", "s", 0))
    wrong = codec.encode(
        "CancelRequested",
        {
            "tenant_id": "t",
            "session_id": "s",
            "message_id": "m",
            "turn_id": "x",
            "reason": "r",
            "requested_at": T0,
        },
    )
    negative = codec.encode("SessionEvent", session_event("t", "s", -1))
    batch = decode_batch(
        codec,
        [rec(good, 0), rec(b"junk", 1), rec(None, 2), rec(good[:-3], 3), rec(wrong, 4), rec(negative, 5)],
    )
    assert [(e.seq, e.record) for e in batch.events] == [(0, good)]
    assert batch.events[0].occurred_at == T0
    assert [(r.record.offset, r.reason_code) for r in batch.rejected] == [
        (1, "bad_magic"),
        (2, "truncated"),
        (3, "truncated"),
        (4, "unexpected_record"),
        (5, "invalid_seq"),
    ]


def test_session_progress_takes_the_newest_event_whatever_the_order() -> None:
    codec = default_codec()
    events = [
        session_event("t", "a", 5, "RESPONSE_SENT"),
        session_event("t", "a", 3),
        session_event("t", "b", 7, "TURN_CANCELLED"),
        session_event("t", "b", 8),
        session_event("u", "a", 1, "TURN_CANCELLED"),
    ]
    batch = decode_batch(codec, [rec(codec.encode("SessionEvent", e), i) for i, e in enumerate(events)])
    progress = session_progress(batch.events)
    assert {k: (p.first_seq, p.last_seq, p.last_turn_id, p.status) for k, p in progress.items()} == {
        ("t", "a"): (3, 5, "t5", "idle"),
        ("t", "b"): (7, 8, "t8", "running"),
        ("u", "a"): (1, 1, "t1", "idle"),
    }


def test_group_writes_puts_sessions_on_the_same_replicas_together_up_to_the_size() -> None:
    from services.checkpoint.handlers import group_writes

    a, b = frozenset({"node-a"}), frozenset({"node-b"})
    sessions = [
        (("t", "1"), a, 6_000),
        (("t", "2"), b, 6_000),
        (("t", "3"), a, 6_000),
        (("t", "4"), a, 6_000),  # would pass 16 KB with 1 and 3: starts a new group
        (("t", "5"), None, 10),  # replicas unknown: alone
        (("t", "6"), a, 40_000),  # bigger than the limit: alone, never split
        (("t", "7"), b, 6_000),
    ]
    groups = group_writes(sessions, max_bytes=16_384)
    assert groups == [
        [("t", "1"), ("t", "3")],
        [("t", "2"), ("t", "7")],
        [("t", "4")],
        [("t", "5")],
        [("t", "6")],
    ]
    assert sorted(s for g in groups for s in g) == sorted(s for s, _, _ in sessions)  # each once


def test_group_writes_with_a_limit_of_one_byte_writes_each_session_alone() -> None:
    from services.checkpoint.handlers import group_writes

    same = frozenset({"node"})
    assert group_writes([(("t", str(i)), same, 500) for i in range(3)], max_bytes=1) == [
        [("t", "0")],
        [("t", "1")],
        [("t", "2")],
    ]
