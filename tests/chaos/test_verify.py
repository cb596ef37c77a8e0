"""The verifier's checks on hand-made state (no servers); the end-to-end test is
tests/integration/test_chaos_verify.py."""

from __future__ import annotations

from tests.chaos.verify import (
    InjectedBadRecord,
    Report,
    SentMessage,
    _check_dlq,
    _check_responses,
    _check_seq,
    _Examples,
    _Offsets,
    _sha,
    _World,
)


def world(**kw: object) -> _World:
    w = _World(injected=set())
    for k, v in kw.items():
        setattr(w, k, v)
    return w


def test_every_message_gets_exactly_one_response() -> None:
    w = world(
        accepted={("t", "s", "a"), ("t", "s", "b"), ("t", "s", "c")},
        responses={
            ("t", "s", "a"): [("FINAL", None)],
            ("t", "s", "b"): [("FINAL", None), ("ERROR", "interrupted")],
            ("t", "s", "r"): [("REJECTED", "rate_limited")],  # rejected by ingress: fine
        },
    )
    r = _check_responses(w, [SentMessage("t", "s", "a"), SentMessage("t", "s", "z")])
    assert not r.ok
    assert r.counts == {"messages": 4, "accepted": 3, "lost": 1, "duplicated": 1, "lost_turn": 1}
    assert {e["kind"] for e in r.examples} == {"lost", "duplicated", "lost_turn"}


def test_seq_gap_and_identical_duplicate_are_violations() -> None:
    h = _sha(b"x")
    w = world(
        events={("t", "ok"): {0: [h], 1: [h]}, ("t", "gap"): {0: [h], 2: [h]}, ("t", "dup"): {0: [h, h]}}
    )
    r = _check_seq(w)
    assert not r.ok
    assert r.counts["sessions_with_gap"] == 1
    assert r.counts["sessions_with_duplicate_seq"] == 1
    dup = next(e for e in r.examples if e["kind"] == "duplicate_seq")
    assert dup["identical_bytes"] is True


def test_dlq_replays_are_informational_and_allowed_reasons_pass() -> None:
    def dl(value: bytes, code: str, reason: str = "why") -> dict[str, object]:
        return {
            "source_topic": "p.ingress",
            "value": value,
            "reason_code": code,
            "reason": reason,
            "service": "ingress",
            "source": "0@1",
        }

    bad = InjectedBadRecord("p.ingress", b"junk", "bad_magic")
    w = world(
        dead_letters=[dl(b"junk", "bad_magic"), dl(b"junk", "bad_magic"), dl(b"other", "handler_error")]
    )
    r = _check_dlq(w, [bad], allow_unexpected_reasons=("handler_error",))
    assert r.ok, r
    assert r.info["duplicates"] == 1 and r.info["allowed_unexpected"] == 1
    r = _check_dlq(world(dead_letters=[dl(b"junk", "truncated", "")]), [bad], ())
    assert not r.ok
    assert r.counts["reason_mismatch"] == 1 and r.counts["empty_reason"] == 1


def test_lag_counts_records_at_or_past_the_committed_offset() -> None:
    o = _Offsets()
    o.by_partition[0] = [0, 1, 2, 4]  # offset 3 and 5 are transaction markers
    assert o.lag(0, 5) == 0  # a service commits last + 1, the marker's offset
    assert o.lag(0, 6) == 0  # a consumer that read to the end commits past the marker
    assert o.lag(0, 4) == 1
    assert o.lag(0, -1) == 4  # never committed
    assert o.lag(1, -1) == 0  # an empty partition


def test_examples_are_capped_and_show_every_kind() -> None:
    ex = _Examples()
    for i in range(30):
        ex.add("a", i=i)
    ex.add("b", i=0)
    taken = ex.take()
    assert len(taken) == 10
    assert {e["kind"] for e in taken} == {"a", "b"}


def test_report_text_names_failed_checks() -> None:
    w = world(accepted={("t", "s", "a")})
    report = Report(checks=[_check_responses(w, None)], totals={"turns": 1})
    assert report.failed == ["one_final_response"]
    assert "FAILED (one_final_response)" in report.to_text()
    assert report.to_dict()["checks"][0]["counts"]["lost"] == 1
