"""The filter that keeps a client library's retry warnings from flooding a service's log."""

from __future__ import annotations

import logging

from shared.service import RepeatedLogFilter


def _record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def test_one_message_per_template_and_window_then_the_count_of_the_rest() -> None:
    now = [100.0]
    filt = RepeatedLogFilter(window_s=10.0, clock=lambda: now[0])
    sender = "aiokafka.producer.sender"
    template = "Got error produce response: %s"
    assert filt.filter(_record(sender, template, "NodeNotReadyError"))
    passed = [filt.filter(_record(sender, template, f"error {i}")) for i in range(500)]
    assert not any(passed)
    # Another template, another logger: a window of their own.
    assert filt.filter(_record(sender, "Got error produce response on topic-partition %s", "tp"))
    assert filt.filter(_record("cassandra.pool", template, "x"))
    now[0] += 10.0
    last = _record(sender, template, "KafkaConnectionError")
    assert filt.filter(last)
    held = "[and 500 more like it in the 10s before, not logged]"
    assert last.getMessage() == f"Got error produce response: KafkaConnectionError {held}"
    following = _record(sender, template, "again")
    assert not filt.filter(following)  # a new window began with the one that passed
    now[0] += 30.0
    quiet = _record(sender, template, "later")
    assert (
        filt.filter(quiet)
        and quiet.getMessage()
        == "Got error produce response: later [and 1 more like it in the 30s before, not logged]"
    )


def test_agentbus_messages_always_pass() -> None:
    filt = RepeatedLogFilter(window_s=60.0, clock=lambda: 0.0)
    assert all(filt.filter(_record("agentbus.reasoning", "retrying %s", i)) for i in range(50))


def test_the_remembered_templates_are_bounded() -> None:
    filt = RepeatedLogFilter(window_s=60.0, clock=lambda: 0.0)
    for i in range(RepeatedLogFilter.MAX_KEYS * 3):
        assert filt.filter(_record("cassandra.cluster", f"host {i} is down"))  # pre-formatted text
    assert len(filt._windows) <= RepeatedLogFilter.MAX_KEYS
